//! Synapse's signing-key file: read it, or create a new one.
//!
//! This module owns the on-disk format of our signing key, which is the one
//! Synapse (via `signedjson.key.write_signing_keys`) writes, so a key can move
//! between Synapse and courier unchanged:
//!
//! ```text
//! ed25519 a_AbCd 9nuDq7j8r4xH5wE1Vx3z5Zr0i1l0sI1dOZb2r0oqM0A
//! ```
//!
//! one key per line: algorithm, key version, and the 32-byte ed25519 seed as
//! unpadded base64, separated by whitespace.
//!
//! It must never overwrite an existing key file (losing a server's key breaks
//! its federation identity until every peer's cache expires), never write a
//! key readable by other users, and never put key material in an error
//! message.
//!
//! # Tolerance when reading
//!
//! Synapse's reader (`signedjson.key.read_signing_keys`) splits each line on
//! any whitespace, requires exactly three fields, and decodes base64 with or
//! without padding (and in the URL-safe alphabet too). We accept the same, and
//! also skip blank lines and lines of algorithms we do not know. The first
//! `ed25519` line is the key; later lines must still be well-formed so a typo
//! is not silently ignored.

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use rand::RngExt as _;

use super::{ED25519, KeyError, SigningKey, decode_base64, encode_base64, is_valid_key_version};

/// Key files are tiny; refuse to read anything larger than this.
const MAX_FILE_BYTES: u64 = 64 * 1024;

/// What went wrong with a key file. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// Reading, creating or writing the file failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// [`write_new`] found a file already there.
    #[error("{}: refusing to overwrite an existing signing key file", path.display())]
    AlreadyExists { path: PathBuf },
    /// A line that is not `ed25519 <version> <base64 seed>`.
    #[error("{}, line {line}: {reason}", path.display())]
    BadLine {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    /// The file holds no `ed25519` key.
    #[error("{}: no ed25519 signing key in file", path.display())]
    NoKey { path: PathBuf },
    /// The file is implausibly large for a key file.
    #[error("{}: file is larger than {MAX_FILE_BYTES} bytes; not a signing key file", path.display())]
    TooLarge { path: PathBuf },
}

/// Reads the first ed25519 key from the Synapse-format key file at `path`.
pub fn read(path: impl AsRef<Path>) -> Result<SigningKey, KeyFileError> {
    let path = path.as_ref();
    let io = |source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    };
    let meta = fs::metadata(path).map_err(io)?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(KeyFileError::TooLarge {
            path: path.to_owned(),
        });
    }
    let text = fs::read_to_string(path).map_err(io)?;
    parse(&text, path)
}

/// Parses key-file `text`; `path` is used only in error messages.
pub fn parse(text: &str, path: &Path) -> Result<SigningKey, KeyFileError> {
    let mut found = None;
    for (index, line) in text.lines().enumerate() {
        let bad = |reason: String| KeyFileError::BadLine {
            path: path.to_owned(),
            line: index + 1,
            reason,
        };
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [algorithm, version, seed_b64] = fields[..] else {
            if fields.is_empty() {
                continue;
            }
            let hint = if fields.len() == 1 {
                " (a bare seed is Synapse's pre-2015 format; prefix it with `ed25519 <version> `)"
            } else {
                ""
            };
            return Err(bad(format!(
                "expected 3 fields `ed25519 <version> <base64 seed>`, found {}{hint}",
                fields.len()
            )));
        };
        if algorithm != ED25519 {
            continue;
        }
        if !is_valid_key_version(version) {
            return Err(bad(format!(
                "invalid key version {version:?}: expected [a-zA-Z0-9_]+"
            )));
        }
        // Python's decoder also takes the URL-safe alphabet; map it over.
        let seed_b64 = seed_b64.replace('-', "+").replace('_', "/");
        let seed =
            decode_base64(&seed_b64).map_err(|_| bad("the seed is not valid base64".into()))?;
        let seed: [u8; 32] = seed.as_slice().try_into().map_err(|_| {
            bad(format!(
                "the seed is {} bytes long, expected 32",
                seed.len()
            ))
        })?;
        let key = SigningKey::from_seed(version, seed).map_err(|e: KeyError| bad(e.to_string()))?;
        found.get_or_insert(key);
    }
    found.ok_or_else(|| KeyFileError::NoKey {
        path: path.to_owned(),
    })
}

/// The key file line for `key`, newline included, exactly as Synapse writes it.
/// It contains the secret seed.
pub(crate) fn format_line(key: &SigningKey) -> String {
    format!(
        "{ED25519} {} {}\n",
        key.version(),
        encode_base64(&key.seed())
    )
}

/// Writes `key` to a new file at `path`, creating missing parent directories.
///
/// Refuses ([`KeyFileError::AlreadyExists`]) if anything exists at `path`; the
/// check and the creation are one atomic `open(O_CREAT|O_EXCL)`. On Unix the
/// file is created with mode `0600`. If writing fails half-way, the partial
/// file is removed.
pub fn write_new(path: impl AsRef<Path>, key: &SigningKey) -> Result<(), KeyFileError> {
    let path = path.as_ref();
    let io = |source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(io)?;
    }
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = match options.open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(KeyFileError::AlreadyExists {
                path: path.to_owned(),
            });
        }
        Err(e) => return Err(io(e)),
    };
    let written = file
        .write_all(format_line(key).as_bytes())
        .and_then(|()| file.sync_all());
    if let Err(e) = written {
        drop(file);
        let _ = fs::remove_file(path);
        return Err(io(e));
    }
    Ok(())
}

/// A fresh key version the way Synapse makes one: `a_` and four random ASCII
/// letters, e.g. `a_AbCd` (Synapse's `random_string` draws from
/// `string.ascii_letters`).
pub fn new_key_version() -> String {
    const LETTERS: &[u8; 52] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let mut rng = rand::rng();
    let mut version = String::from("a_");
    for _ in 0..4 {
        version.push(char::from(LETTERS[rng.random_range(0..LETTERS.len())]));
    }
    version
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC_SEED: &str = "YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1";
    const SPEC_PUBLIC: &str = "XGX0JRS2Af3be3knz2fBiRbApjm2Dh61gXDJA8kcJNI";

    /// `Ok((key_id, public_key))`, or `Err(substring of the error message)`.
    type Expected = Result<(&'static str, &'static str), &'static str>;

    /// Parses `text` and compares with `expected`.
    fn check(text: &str, expected: Expected) {
        let got = parse(text, Path::new("/k/signing.key"));
        match (&got, expected) {
            (Ok(key), Ok((id, public))) => {
                assert_eq!(
                    (key.key_id().as_str(), key.public_key_base64().as_str()),
                    (id, public),
                    "{text:?}"
                )
            }
            (Err(e), Err(reason)) => {
                let msg = e.to_string();
                assert!(msg.starts_with("/k/signing.key"), "{msg}");
                assert!(msg.contains(reason), "{text:?}: {msg:?} lacks {reason:?}");
                assert!(!msg.contains(SPEC_SEED), "error leaks the seed: {msg}");
            }
            _ => panic!("{text:?}: got {got:?}, want {expected:?}"),
        }
    }

    #[test]
    fn reading() {
        let ok = Ok(("ed25519:a_AbCd", SPEC_PUBLIC));
        let table: Vec<(String, Expected)> = vec![
            (format!("ed25519 a_AbCd {SPEC_SEED}"), ok),
            (format!("ed25519 a_AbCd {SPEC_SEED}\n"), ok),
            (format!("ed25519 a_AbCd {SPEC_SEED}\r\n"), ok),
            (format!("ed25519 a_AbCd {SPEC_SEED}=\n"), ok),
            (format!("ed25519\ta_AbCd   {SPEC_SEED}  \n"), ok),
            (format!("\n  \ned25519 a_AbCd {SPEC_SEED}\n\n"), ok),
            // URL-safe alphabet, as Python's decoder allows ("+" -> "-").
            (
                format!("ed25519 a_AbCd {}", SPEC_SEED.replace('+', "-")),
                ok,
            ),
            // First ed25519 key wins; unknown algorithms are skipped.
            (
                format!(
                    "curve448 x AAAA\ned25519 a_AbCd {SPEC_SEED}\ned25519 b {}\n",
                    "A".repeat(43)
                ),
                ok,
            ),
            (String::new(), Err("no ed25519 signing key")),
            ("\n\n".into(), Err("no ed25519 signing key")),
            ("foo 1 AAAA\n".into(), Err("no ed25519 signing key")),
            (SPEC_SEED.into(), Err("line 1: expected 3 fields")),
            (
                format!("ed25519 {SPEC_SEED}"),
                Err("line 1: expected 3 fields"),
            ),
            (
                format!("\ned25519 a b {SPEC_SEED}"),
                Err("line 2: expected 3 fields"),
            ),
            (
                format!("ed25519 a:b {SPEC_SEED}"),
                Err("invalid key version"),
            ),
            ("ed25519 a_AbCd !!!!".into(), Err("not valid base64")),
            (
                "ed25519 a_AbCd AAAA".into(),
                Err("3 bytes long, expected 32"),
            ),
            // Later lines are checked even after a key was found.
            (
                format!("ed25519 a_AbCd {SPEC_SEED}\ned25519 x\n"),
                Err("line 2: expected 3 fields"),
            ),
        ];
        for (text, want) in table {
            check(&text, want);
        }
    }

    #[test]
    fn write_then_read_round_trips_and_refuses_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/dir/signing.key");
        let key = SigningKey::generate(&new_key_version()).unwrap();
        write_new(&path, &key).unwrap();

        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text, format_line(&key));
        assert!(text.starts_with(&format!("ed25519 {} ", key.version())) && text.ends_with('\n'));
        let back = read(&path).unwrap();
        assert_eq!(back.key_id(), key.key_id());
        assert_eq!(back.public_key_base64(), key.public_key_base64());

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            assert_eq!(
                fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }

        let other = SigningKey::generate("other").unwrap();
        let err = write_new(&path, &other).unwrap_err();
        assert!(matches!(err, KeyFileError::AlreadyExists { .. }), "{err}");
        assert!(err.to_string().contains("signing.key"), "{err}");
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            text,
            "file was modified"
        );
    }

    #[test]
    fn read_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.key");
        let err = read(&missing).unwrap_err();
        assert!(
            matches!(err, KeyFileError::Io { .. }) && err.to_string().contains("missing.key"),
            "{err}"
        );

        let big = dir.path().join("big.key");
        fs::write(&big, vec![b' '; MAX_FILE_BYTES as usize + 1]).unwrap();
        assert!(matches!(read(&big), Err(KeyFileError::TooLarge { .. })));

        let binary = dir.path().join("binary.key");
        fs::write(&binary, [0xff, 0xfe, 0x00]).unwrap();
        assert!(matches!(read(&binary), Err(KeyFileError::Io { .. })));
    }

    #[test]
    fn spec_seed_has_non_canonical_trailing_bits() {
        // The spec's seed ends in "A1": its last character carries two bits
        // past the 32 bytes, and they are not zero. Decoding must tolerate
        // that (as Python does); re-encoding gives the canonical "A0".
        let key = parse(&format!("ed25519 1 {SPEC_SEED}\n"), Path::new("x")).unwrap();
        let canonical = format!("ed25519 1 {}0\n", &SPEC_SEED[..SPEC_SEED.len() - 1]);
        assert_eq!(format_line(&key), canonical);
        let again = parse(&canonical, Path::new("x")).unwrap();
        assert_eq!(again.public_key_base64(), SPEC_PUBLIC);
    }

    #[test]
    fn new_key_versions_look_like_synapse() {
        for _ in 0..50 {
            let v = new_key_version();
            assert_eq!(v.len(), 6, "{v}");
            assert!(
                v.starts_with("a_") && v[2..].bytes().all(|b| b.is_ascii_alphabetic()),
                "{v}"
            );
            assert!(is_valid_key_version(&v));
        }
        let distinct: std::collections::BTreeSet<String> =
            (0..20).map(|_| new_key_version()).collect();
        assert!(distinct.len() > 1, "versions are not random: {distinct:?}");
    }
}
