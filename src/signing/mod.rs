//! Signing: our ed25519 key, and signing/verifying JSON objects the Matrix way.
//!
//! This module owns the server's [`SigningKey`], the spec's "Signing JSON" and
//! "Checking for a Signature" algorithms ([`sign_json`], [`verify_json`]) and
//! the unpadded-base64 helpers. Its children own the rest of the pure
//! cryptographic plumbing:
//!
//! * [`canonical`]: canonical JSON, the exact bytes that get signed;
//! * [`keyfile`]: Synapse's signing-key file format;
//! * [`xmatrix`]: the `Authorization: X-Matrix ...` request signature.
//!
//! Everything here is pure: no network, no storage, no clock (callers pass
//! times in and decide which keys they trust), and no panics on any input.
//! Secrets never appear in `Debug` output or error messages.
//!
//! # How a JSON signature works (spec appendix, "Signing JSON")
//!
//! 1. Take `signatures` and `unsigned` out of the object.
//! 2. Encode the rest as canonical JSON and sign those bytes with ed25519.
//! 3. Put the two fields back, adding the new signature as
//!    `signatures[<entity>]["ed25519:<version>"] = <unpadded base64>`.
//!
//! `unsigned` and `signatures` are never covered, so anyone along the way can
//! add co-signatures or unsigned metadata without breaking existing ones.

pub mod canonical;
pub mod keyfile;
pub mod xmatrix;

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::{DecodePaddingMode, general_purpose::STANDARD_NO_PAD};
use ed25519_dalek::{Signature, Signer as _, VerifyingKey};
use rand::TryRng as _;
use serde_json::{Map, Value};

pub use canonical::{CanonicalError, NumberMode};

/// The only signing algorithm Matrix defines.
pub const ED25519: &str = "ed25519";

// ---------------------------------------------------------------------------
// Unpadded base64
// ---------------------------------------------------------------------------

/// Decodes standard-alphabet base64 with or without `=` padding, and with
/// non-zero trailing bits accepted. That is what Synapse (Python's
/// `b64decode`) and ruma accept, so a peer's slightly unusual encoding of a
/// valid signature still verifies.
const DECODER: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// Encodes `bytes` as unpadded standard base64 (`"foob"` → `"Zm9vYg"`).
pub fn encode_base64(bytes: &[u8]) -> String {
    STANDARD_NO_PAD.encode(bytes)
}

/// Decodes standard base64, padded or not (`"Zm9vYg"` and `"Zm9vYg=="` both
/// give `"foob"`).
pub fn decode_base64(text: &str) -> Result<Vec<u8>, Base64Error> {
    DECODER.decode(text).map_err(|e| Base64Error(e.to_string()))
}

/// Text that is not valid base64.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid base64: {0}")]
pub struct Base64Error(String);

// ---------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------

/// Problems with key material or key names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Key versions (the part after `ed25519:`) must match `[a-zA-Z0-9_]+`.
    #[error("invalid key version {0:?}: expected one or more of [a-zA-Z0-9_]")]
    InvalidVersion(String),
    /// The operating system's random number generator failed.
    #[error("no randomness available from the operating system: {0}")]
    Randomness(String),
    /// A public key that is not valid base64.
    #[error("public key: {0}")]
    BadBase64(#[from] Base64Error),
    /// A public key that decodes to the wrong number of bytes.
    #[error("public key is {0} bytes long, expected 32")]
    BadLength(usize),
    /// 32 bytes that are not a valid ed25519 point.
    #[error("public key is not a valid ed25519 point")]
    InvalidPoint,
}

/// Checks a key version against the spec's grammar, `[a-zA-Z0-9_]+`.
pub fn is_valid_key_version(version: &str) -> bool {
    !version.is_empty()
        && version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Our server's ed25519 signing key, with its version (`ed25519:<version>`).
///
/// The `Debug` output shows the key ID and the public key only, never the
/// secret.
#[derive(Clone)]
pub struct SigningKey {
    version: String,
    key: ed25519_dalek::SigningKey,
}

impl SigningKey {
    /// A fresh key from the operating system's random number generator.
    pub fn generate(version: &str) -> Result<Self, KeyError> {
        let mut seed = [0u8; 32];
        rand::rngs::SysRng
            .try_fill_bytes(&mut seed)
            .map_err(|e| KeyError::Randomness(e.to_string()))?;
        let key = Self::from_seed(version, seed);
        seed.fill(0);
        key
    }

    /// The key with this 32-byte ed25519 seed (what Synapse's key file stores).
    pub fn from_seed(version: &str, seed: [u8; 32]) -> Result<Self, KeyError> {
        if !is_valid_key_version(version) {
            return Err(KeyError::InvalidVersion(version.to_owned()));
        }
        Ok(Self {
            version: version.to_owned(),
            key: ed25519_dalek::SigningKey::from_bytes(&seed),
        })
    }

    /// `ed25519:<version>`, the name signatures are filed under.
    pub fn key_id(&self) -> String {
        format!("{ED25519}:{}", self.version)
    }

    /// The version part of the key ID.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The public key as unpadded base64, as published in `verify_keys`.
    pub fn public_key_base64(&self) -> String {
        encode_base64(self.key.verifying_key().as_bytes())
    }

    /// The public half of the key.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// Signs `message` and returns the 64-byte signature as unpadded base64.
    pub fn sign(&self, message: &[u8]) -> String {
        encode_base64(&self.key.sign(message).to_bytes())
    }

    /// The 32-byte seed, for writing the key file. Private to this module tree.
    fn seed(&self) -> [u8; 32] {
        self.key.to_bytes()
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("key_id", &self.key_id())
            .field("public_key", &self.public_key_base64())
            .finish_non_exhaustive()
    }
}

/// Parses an unpadded (or padded) base64 ed25519 public key, as found in
/// `verify_keys[..].key`.
pub fn parse_verify_key(b64: &str) -> Result<VerifyingKey, KeyError> {
    let bytes = decode_base64(b64)?;
    let bytes: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| KeyError::BadLength(bytes.len()))?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::InvalidPoint)
}

// ---------------------------------------------------------------------------
// Signing and verifying JSON
// ---------------------------------------------------------------------------

/// Why [`sign_json`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    /// The object cannot be encoded as canonical JSON in the chosen mode.
    #[error("cannot sign: {0}")]
    Canonical(#[from] CanonicalError),
    /// `signatures` (or `signatures[entity]`) exists but is not an object, so
    /// the new signature has nowhere to go.
    #[error("cannot sign: `{0}` is not a JSON object")]
    MalformedSignatures(String),
}

/// Signs `obj` as `entity` with `key`, adding
/// `signatures[entity][key.key_id()]`.
///
/// Signatures already present (other entities, other keys of this entity)
/// are kept; an old signature under the same key ID is replaced. On error
/// `obj` is left unchanged.
///
/// ```
/// use courier::signing::{sign_json, verify_json, SigningKey, NumberMode};
/// let key = SigningKey::from_seed("1", [1; 32]).unwrap();
/// let mut obj = serde_json::Map::new();
/// obj.insert("hello".into(), "world".into());
/// sign_json(&mut obj, "example.org", &key, NumberMode::Strict).unwrap();
/// let vk = key.verifying_key();
/// verify_json(&obj, "example.org", |_| Some(vk), NumberMode::Strict).unwrap();
/// ```
pub fn sign_json(
    obj: &mut Map<String, Value>,
    entity: &str,
    key: &SigningKey,
    mode: NumberMode,
) -> Result<(), SignError> {
    // Check where the signature will go before doing any work.
    match obj.get("signatures") {
        None => {}
        Some(Value::Object(sigs)) => match sigs.get(entity) {
            None | Some(Value::Object(_)) => {}
            Some(_) => {
                return Err(SignError::MalformedSignatures(format!(
                    "signatures.{entity}"
                )));
            }
        },
        Some(_) => return Err(SignError::MalformedSignatures("signatures".into())),
    }
    // Encoding skips `signatures` and `unsigned` without taking them out: the
    // same bytes as the spec's remove/encode/put back, with nothing to undo.
    let canonical = canonical::encode_for_signing(obj, mode)?;
    let signature = key.sign(canonical.as_bytes());

    let sigs = obj
        .entry("signatures")
        .or_insert_with(|| Value::Object(Map::new()));
    if let Value::Object(sigs) = sigs
        && let Value::Object(mine) = sigs
            .entry(entity)
            .or_insert_with(|| Value::Object(Map::new()))
    {
        mine.insert(key.key_id(), Value::String(signature));
    }
    Ok(())
}

/// Why [`verify_json`] refused an object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// No `signatures` object at all.
    #[error("the object has no `signatures` object")]
    MissingSignatures,
    /// `signatures` has no (object) entry for the entity we are checking.
    #[error("no signatures from {0}")]
    NoSignatureFromEntity(String),
    /// The entity signed only with algorithms we do not support.
    #[error("no ed25519 signature from {0}")]
    NoSupportedKey(String),
    /// None of the entity's ed25519 key IDs is one we have a key for.
    #[error("signing key {0} is not known")]
    UnknownKey(String),
    /// The signature under this key ID is not base64 (or not a string).
    #[error("signature by {0} is not valid base64")]
    BadBase64(String),
    /// The signature under this key ID does not match.
    #[error("signature by {0} does not verify")]
    BadSignature(String),
    /// The object cannot be encoded as canonical JSON in the chosen mode.
    #[error("cannot check signature: {0}")]
    Canonical(#[from] CanonicalError),
}

/// Checks that `obj` carries a valid signature from `entity`
/// (spec appendix, "Checking for a Signature").
///
/// `keys` maps a key ID (`ed25519:abc`) to the entity's public key, if the
/// caller knows and trusts one (for requests: a current `verify_keys` entry).
///
/// 1. `signatures[entity]` must exist.
/// 2. Only `ed25519:` key IDs count; if there are none, fail.
/// 3. Key IDs without a known key are skipped; if none is known, fail.
/// 4. Each remaining signature is base64-decoded and checked with
///    `verify_strict` against the canonical JSON of `obj` without
///    `signatures`/`unsigned`. One valid signature is enough; if none is
///    valid, the first failure (in key-ID order) is returned.
pub fn verify_json(
    obj: &Map<String, Value>,
    entity: &str,
    keys: impl Fn(&str) -> Option<VerifyingKey>,
    mode: NumberMode,
) -> Result<(), VerifyError> {
    let Some(Value::Object(sigs)) = obj.get("signatures") else {
        return Err(VerifyError::MissingSignatures);
    };
    let Some(Value::Object(mine)) = sigs.get(entity) else {
        return Err(VerifyError::NoSignatureFromEntity(entity.to_owned()));
    };
    let mut supported = mine
        .iter()
        .filter(|(id, _)| {
            id.strip_prefix(ED25519)
                .is_some_and(|rest| rest.starts_with(':'))
        })
        .peekable();
    let Some((first_id, _)) = supported.peek() else {
        return Err(VerifyError::NoSupportedKey(entity.to_owned()));
    };
    let first_id = first_id.to_string();

    let mut canonical: Option<String> = None;
    let mut first_failure = None;
    for (id, sig) in supported {
        let Some(key) = keys(id) else { continue };
        let result = (|| {
            let bytes = sig
                .as_str()
                .and_then(|s| decode_base64(s).ok())
                .ok_or_else(|| VerifyError::BadBase64(id.clone()))?;
            let bytes: [u8; 64] = bytes
                .try_into()
                .map_err(|_| VerifyError::BadSignature(id.clone()))?;
            // Encode once, and only once a signature is worth checking.
            if canonical.is_none() {
                canonical = Some(canonical::encode_for_signing(obj, mode)?);
            }
            let message = canonical.as_deref().unwrap_or_default();
            key.verify_strict(message.as_bytes(), &Signature::from_bytes(&bytes))
                .map_err(|_| VerifyError::BadSignature(id.clone()))
        })();
        match result {
            Ok(()) => return Ok(()),
            Err(e) => {
                first_failure.get_or_insert(e);
            }
        }
    }
    Err(first_failure.unwrap_or(VerifyError::UnknownKey(first_id)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The spec's test-vector seed (appendix, "Cryptographic Test Vectors").
    pub(crate) fn spec_key() -> SigningKey {
        let seed = decode_base64("YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1").unwrap();
        SigningKey::from_seed("1", seed.try_into().unwrap()).unwrap()
    }

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    /// Signs `input` as `domain` with the spec key; compares the whole result.
    fn check(input: Value, expected: Value) {
        let mut o = obj(input);
        sign_json(&mut o, "domain", &spec_key(), NumberMode::Strict).unwrap();
        assert_eq!(Value::Object(o), expected);
    }

    #[test]
    fn spec_signing_vectors() {
        check(
            json!({}),
            json!({"signatures": {"domain": {"ed25519:1": "K8280/U9SSy9IVtjBuVeLr+HpOB4BQFWbg+UZaADMtTdGYI7Geitb76LTrr5QV/7Xg4ahLwYGYZzuHGZKM5ZAQ"}}}),
        );
        check(
            json!({"one": 1, "two": "Two"}),
            json!({"one": 1, "two": "Two", "signatures": {"domain": {"ed25519:1": "KqmLSbO39/Bzb0QIYE82zqLwsA+PDzYIpIRA2sRQ4sL53+sN6/fpNSoqE7BP7vBZhG6kYdD13EIMJpvhJI+6Bw"}}}),
        );
    }

    #[test]
    fn spec_key_public_half() {
        let key = spec_key();
        assert_eq!(
            key.public_key_base64(),
            "XGX0JRS2Af3be3knz2fBiRbApjm2Dh61gXDJA8kcJNI"
        );
        assert_eq!(key.key_id(), "ed25519:1");
        assert_eq!(key.version(), "1");
        assert_eq!(
            parse_verify_key(&key.public_key_base64()).unwrap(),
            key.verifying_key()
        );
    }

    #[test]
    fn signing_keeps_unsigned_and_other_signatures() {
        check(
            json!({"a": 1, "unsigned": {"age": 5}, "signatures": {"other": {"ed25519:x": "abc"}, "domain": {"ed25519:0": "old"}}}),
            json!({
                "a": 1,
                "unsigned": {"age": 5},
                "signatures": {
                    "other": {"ed25519:x": "abc"},
                    "domain": {
                        "ed25519:0": "old",
                        // Same bytes as signing {"a":1}: unsigned/signatures are not covered.
                        "ed25519:1": spec_key().sign(br#"{"a":1}"#),
                    }
                }
            }),
        );
    }

    #[test]
    fn signing_errors_leave_object_unchanged() {
        let key = spec_key();
        let cases = [
            (
                json!({"signatures": "nope"}),
                SignError::MalformedSignatures("signatures".into()),
            ),
            (
                json!({"signatures": {"domain": []}}),
                SignError::MalformedSignatures("signatures.domain".into()),
            ),
            (
                json!({"f": 1.5}),
                SignError::Canonical(CanonicalError::NotAnInteger("1.5".into())),
            ),
            (
                json!({"n": 9007199254740992u64}),
                SignError::Canonical(CanonicalError::IntegerOutOfRange("9007199254740992".into())),
            ),
        ];
        for (input, want) in cases {
            let mut o = obj(input.clone());
            assert_eq!(
                sign_json(&mut o, "domain", &key, NumberMode::Strict),
                Err(want)
            );
            assert_eq!(Value::Object(o), input);
        }
        // Python mode signs what Strict refuses.
        let mut o = obj(json!({"f": 1.5, "n": 9007199254740992u64}));
        sign_json(&mut o, "domain", &key, NumberMode::Python).unwrap();
        let vk = key.verifying_key();
        verify_json(&o, "domain", |_| Some(vk), NumberMode::Python).unwrap();
    }

    /// Runs `verify_json` on `input` for entity `domain`, knowing only the spec
    /// key as `ed25519:1`.
    fn check_verify(input: Value, expected: Result<(), VerifyError>) {
        let vk = spec_key().verifying_key();
        let got = verify_json(
            &obj(input.clone()),
            "domain",
            |id| (id == "ed25519:1").then_some(vk),
            NumberMode::Strict,
        );
        assert_eq!(got, expected, "input {input}");
    }

    #[test]
    fn verification() {
        const SIG_EMPTY: &str = "K8280/U9SSy9IVtjBuVeLr+HpOB4BQFWbg+UZaADMtTdGYI7Geitb76LTrr5QV/7Xg4ahLwYGYZzuHGZKM5ZAQ";
        const SIG_ONE_TWO: &str = "KqmLSbO39/Bzb0QIYE82zqLwsA+PDzYIpIRA2sRQ4sL53+sN6/fpNSoqE7BP7vBZhG6kYdD13EIMJpvhJI+6Bw";
        use VerifyError::*;
        let cases: Vec<(Value, Result<(), VerifyError>)> = vec![
            (
                json!({"signatures": {"domain": {"ed25519:1": SIG_EMPTY}}}),
                Ok(()),
            ),
            (
                json!({"one": 1, "two": "Two", "signatures": {"domain": {"ed25519:1": SIG_ONE_TWO}}}),
                Ok(()),
            ),
            // Padded base64 is accepted too.
            (
                json!({"signatures": {"domain": {"ed25519:1": format!("{SIG_EMPTY}==")}}}),
                Ok(()),
            ),
            // `unsigned` is not covered.
            (
                json!({"unsigned": {"x": 1}, "signatures": {"domain": {"ed25519:1": SIG_EMPTY}}}),
                Ok(()),
            ),
            // Unknown keys are skipped when a known one verifies.
            (
                json!({"signatures": {"domain": {"ed25519:0": "AAAA", "ed25519:1": SIG_EMPTY}}}),
                Ok(()),
            ),
            (json!({}), Err(MissingSignatures)),
            (json!({"signatures": []}), Err(MissingSignatures)),
            (
                json!({"signatures": {"other": {"ed25519:1": SIG_EMPTY}}}),
                Err(NoSignatureFromEntity("domain".into())),
            ),
            (
                json!({"signatures": {"domain": "x"}}),
                Err(NoSignatureFromEntity("domain".into())),
            ),
            (
                json!({"signatures": {"domain": {}}}),
                Err(NoSupportedKey("domain".into())),
            ),
            (
                json!({"signatures": {"domain": {"curve25519:1": SIG_EMPTY, "ed25519": "x", "ed25519x:1": "x"}}}),
                Err(NoSupportedKey("domain".into())),
            ),
            (
                json!({"signatures": {"domain": {"ed25519:2": SIG_EMPTY, "ed25519:3": SIG_EMPTY}}}),
                Err(UnknownKey("ed25519:2".into())),
            ),
            (
                json!({"signatures": {"domain": {"ed25519:1": "!!!"}}}),
                Err(BadBase64("ed25519:1".into())),
            ),
            (
                json!({"signatures": {"domain": {"ed25519:1": 5}}}),
                Err(BadBase64("ed25519:1".into())),
            ),
            (
                json!({"signatures": {"domain": {"ed25519:1": "AAAA"}}}),
                Err(BadSignature("ed25519:1".into())),
            ),
            (
                json!({"signatures": {"domain": {"ed25519:1": SIG_ONE_TWO}}}),
                Err(BadSignature("ed25519:1".into())),
            ),
            // Tampered content.
            (
                json!({"one": 2, "two": "Two", "signatures": {"domain": {"ed25519:1": SIG_ONE_TWO}}}),
                Err(BadSignature("ed25519:1".into())),
            ),
            (
                json!({"f": 0.5, "signatures": {"domain": {"ed25519:1": SIG_EMPTY}}}),
                Err(Canonical(CanonicalError::NotAnInteger("0.5".into()))),
            ),
        ];
        for (input, want) in cases {
            check_verify(input, want);
        }
    }

    #[test]
    fn base64_helpers() {
        let table: &[(&[u8], &str)] = &[
            (b"", ""),
            (b"f", "Zg"),
            (b"fo", "Zm8"),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg"),
            (b"fooba", "Zm9vYmE"),
            (b"foobar", "Zm9vYmFy"),
        ];
        for (raw, b64) in table {
            assert_eq!(encode_base64(raw), *b64);
            assert_eq!(decode_base64(b64).unwrap(), *raw);
            let padded = format!("{b64}{}", "=".repeat((4 - b64.len() % 4) % 4));
            assert_eq!(decode_base64(&padded).unwrap(), *raw, "{padded}");
        }
        for bad in ["Z", "Zm9v!", "Zm9v Yg", "Zm-_", "Zg=Zg", "Zm9vY==="] {
            assert!(decode_base64(bad).is_err(), "{bad}");
        }
        // Non-zero trailing bits are tolerated, like Python and ruma do.
        assert_eq!(decode_base64("Zh").unwrap(), b"f");
    }

    #[test]
    fn key_versions_and_errors() {
        for ok in ["1", "a_AbCd", "_", "Z9"] {
            assert!(SigningKey::from_seed(ok, [0; 32]).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "a:b", "é", "a-b", "a\n"] {
            assert_eq!(
                SigningKey::from_seed(bad, [0; 32]).unwrap_err(),
                KeyError::InvalidVersion(bad.into())
            );
        }
        assert!(matches!(
            parse_verify_key("!!"),
            Err(KeyError::BadBase64(_))
        ));
        assert_eq!(parse_verify_key("AAAA"), Err(KeyError::BadLength(3)));
        // y = 2 is not on the curve.
        let mut not_a_point = [0u8; 32];
        not_a_point[0] = 2;
        assert_eq!(
            parse_verify_key(&encode_base64(&not_a_point)),
            Err(KeyError::InvalidPoint)
        );
    }

    #[test]
    fn generated_keys_differ_and_debug_hides_secret() {
        let a = SigningKey::generate("a_1").unwrap();
        let b = SigningKey::generate("a_1").unwrap();
        assert_ne!(a.seed(), b.seed());
        let debug = format!("{a:?}");
        let seed_b64 = encode_base64(&a.seed());
        assert!(!debug.contains(&seed_b64), "{debug}");
        assert!(
            debug.contains("ed25519:a_1") && debug.contains(&a.public_key_base64()),
            "{debug}"
        );
        assert!(SigningKey::generate("bad version").is_err());
    }

    #[test]
    fn sign_then_verify_with_generated_key() {
        let key = SigningKey::generate("k").unwrap();
        let mut o = obj(json!({"x": [1, 2, {"y": "z"}]}));
        sign_json(&mut o, "a.test", &key, NumberMode::Strict).unwrap();
        let vk = key.verifying_key();
        assert_eq!(
            verify_json(&o, "a.test", |_| Some(vk), NumberMode::Strict),
            Ok(())
        );
        let other = SigningKey::generate("k").unwrap().verifying_key();
        assert_eq!(
            verify_json(&o, "a.test", |_| Some(other), NumberMode::Strict),
            Err(VerifyError::BadSignature("ed25519:k".into()))
        );
    }
}
