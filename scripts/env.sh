# Sourced by scripts/start and scripts/test: what a fresh Debian machine with Rust
# needs before courier builds. Idempotent and quiet when everything is already there.

# RocksDB's C++ is compiled once per machine; keep the build outside the clone so a
# fresh clone (CI) reuses it.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/courier-target}"

# librocksdb-sys runs bindgen, which needs libclang.
if ! ldconfig -p 2>/dev/null | grep -q 'libclang[-.0-9]*\.so' && ! ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1; then
  echo "courier: installing libclang-dev (needed to build RocksDB)" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libclang-dev g++ >&2
fi
