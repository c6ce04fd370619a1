# Sourced by scripts/start and scripts/test: what a fresh Debian machine with Rust
# needs before courier builds. Idempotent and quiet when everything is already there.

# RocksDB's C++ is compiled once per machine; keep the build outside the clone so a
# fresh clone (CI) reuses it.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/courier-target}"

# librocksdb-sys runs bindgen, which needs libclang.
# (libclang-cpp, which fresh Debian images carry, is not what bindgen loads.)
if ! ldconfig -p 2>/dev/null | grep -qE 'libclang(-[0-9.]+)?\.so' \
   && ! ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/llvm-*/lib/libclang-[0-9]*.so* 2>/dev/null | grep -q .; then
  echo "courier: installing libclang-dev (needed to build RocksDB)" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libclang-dev g++ >&2
fi
