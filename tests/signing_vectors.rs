//! Byte-for-byte comparison with Synapse's own libraries.
//!
//! `tests/data/signedjson/*.json` were produced by `tools/gen_signedjson_vectors.py`
//! with Python `signedjson`/`canonicaljson` (versions recorded in the files). Synapse
//! signs with exactly these libraries, so matching them byte for byte is what lets
//! our signatures verify on Synapse and theirs on us.

use std::collections::BTreeMap;

use courier::signing::canonical::{self, CanonicalError, NumberMode};
use courier::signing::{self, SigningKey, xmatrix};
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize)]
struct Vectors {
    versions: BTreeMap<String, String>,
    signing_key: KeyInfo,
    json: Vec<JsonVector>,
    requests: Vec<RequestVector>,
}

#[derive(Deserialize)]
struct KeyInfo {
    seed: String,
    entity: String,
    key_id: String,
    verify_key: String,
}

#[derive(Deserialize)]
struct JsonVector {
    name: String,
    mode: String,
    input: String,
    canonical: String,
    signed: String,
    signature: String,
}

#[derive(Deserialize)]
struct RequestVector {
    name: String,
    mode: String,
    method: String,
    uri: String,
    origin: String,
    destination: String,
    content: Option<String>,
    signed_bytes: String,
    key_id: String,
    verify_key: String,
    header: String,
}

#[derive(Deserialize)]
struct Floats {
    versions: BTreeMap<String, String>,
    floats: Vec<(String, String)>,
}

fn load<T: for<'de> Deserialize<'de>>(file: &str) -> T {
    let path = format!(
        "{}/tests/data/signedjson/{file}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn mode_of(name: &str) -> NumberMode {
    match name {
        "strict" => NumberMode::Strict,
        "python" => NumberMode::Python,
        other => panic!("unknown mode {other:?}"),
    }
}

fn spec_key(info: &KeyInfo) -> SigningKey {
    let seed = signing::decode_base64(&info.seed).unwrap();
    let version = info.key_id.strip_prefix("ed25519:").unwrap();
    SigningKey::from_seed(version, seed.try_into().unwrap()).unwrap()
}

/// Keys the generator signs requests with, by key ID.
fn request_key(key_id: &str, info: &KeyInfo) -> SigningKey {
    match key_id {
        "ed25519:1" => spec_key(info),
        // The generator's second key: seed bytes 0, 1, ..., 31.
        "ed25519:a_AbCd" => {
            SigningKey::from_seed("a_AbCd", std::array::from_fn(|i| i as u8)).unwrap()
        }
        other => panic!("no key {other}"),
    }
}

fn object(v: Value) -> serde_json::Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

#[test]
fn files_record_library_versions() {
    let v: Vectors = load("vectors.json");
    let f: Floats = load("floats.json");
    for versions in [&v.versions, &f.versions] {
        for lib in ["signedjson", "canonicaljson", "pynacl", "python"] {
            assert!(
                versions.get(lib).is_some_and(|s| !s.is_empty()),
                "no {lib} version"
            );
        }
    }
    assert_eq!(
        v.signing_key.verify_key,
        spec_key(&v.signing_key).public_key_base64()
    );
}

/// Vectors where we knowingly differ from Python in `NumberMode::Python`, with
/// what we produce instead. serde_json reads the integer literal `-0` as the
/// float -0.0; Python reads it as the integer 0.
const KNOWN_PYTHON_DIVERGENCES: &[(&str, &str)] = &[(
    "spec_minus_zero_exponent",
    r#"{"a":-0.0,"b":10000000000.0}"#,
)];

#[test]
fn canonical_json_matches_canonicaljson() {
    let v: Vectors = load("vectors.json");
    assert!(v.json.len() >= 20, "vector file looks truncated");
    let (mut strict, mut python) = (0, 0);
    for vec in &v.json {
        let value =
            canonical::parse_strict(&vec.input).unwrap_or_else(|e| panic!("{}: {e}", vec.name));
        let ours_python = canonical::encode(&value, NumberMode::Python).unwrap();
        let ours_strict = canonical::encode(&value, NumberMode::Strict);
        match vec.mode.as_str() {
            "strict" => {
                strict += 1;
                assert_eq!(
                    ours_strict.as_deref(),
                    Ok(vec.canonical.as_str()),
                    "{} (strict)",
                    vec.name
                );
                assert_eq!(ours_python, vec.canonical, "{} (python)", vec.name);
            }
            _ => {
                python += 1;
                let expected = KNOWN_PYTHON_DIVERGENCES
                    .iter()
                    .find(|(name, _)| *name == vec.name)
                    .map_or(vec.canonical.as_str(), |(_, ours)| ours);
                assert_eq!(ours_python, expected, "{} (python)", vec.name);
            }
        }
    }
    assert!(
        strict >= 15 && python >= 4,
        "strict {strict}, python {python}"
    );
}

#[test]
fn strict_mode_refuses_what_only_python_accepts() {
    let v: Vectors = load("vectors.json");
    let strict_of = |name: &str| {
        let vec = v.json.iter().find(|j| j.name == name).unwrap();
        canonical::encode(
            &canonical::parse_strict(&vec.input).unwrap(),
            NumberMode::Strict,
        )
    };
    assert!(matches!(
        strict_of("floats_brief"),
        Err(CanonicalError::NotAnInteger(_))
    ));
    assert!(matches!(
        strict_of("floats_more"),
        Err(CanonicalError::NotAnInteger(_))
    ));
    assert!(matches!(
        strict_of("int_beyond"),
        Err(CanonicalError::IntegerOutOfRange(_))
    ));
    // The spec's own example: Strict gives the spec's answer, which is not Python's.
    assert_eq!(
        strict_of("spec_minus_zero_exponent").as_deref(),
        Ok(r#"{"a":0,"b":10000000000}"#)
    );
}

#[test]
fn sign_json_matches_signedjson() {
    let v: Vectors = load("vectors.json");
    let key = spec_key(&v.signing_key);
    let vk = key.verifying_key();
    for vec in v
        .json
        .iter()
        .filter(|j| !KNOWN_PYTHON_DIVERGENCES.iter().any(|(n, _)| *n == j.name))
    {
        let mode = mode_of(&vec.mode);
        let mut obj = object(canonical::parse_strict(&vec.input).unwrap());
        signing::sign_json(&mut obj, &v.signing_key.entity, &key, mode)
            .unwrap_or_else(|e| panic!("{}: {e}", vec.name));
        let mine = &obj["signatures"][&v.signing_key.entity][&v.signing_key.key_id];
        assert_eq!(
            mine,
            &Value::String(vec.signature.clone()),
            "{}: signature",
            vec.name
        );
        let signed = canonical::encode(&Value::Object(obj), mode).unwrap();
        assert_eq!(signed, vec.signed, "{}: signed object", vec.name);

        // And signedjson's output verifies with ours.
        let theirs = object(canonical::parse_strict(&vec.signed).unwrap());
        signing::verify_json(
            &theirs,
            &v.signing_key.entity,
            |id| (id == v.signing_key.key_id).then_some(vk),
            mode,
        )
        .unwrap_or_else(|e| panic!("{}: {e}", vec.name));
        // Tampering is caught.
        let mut tampered = theirs.clone();
        tampered.insert("tampered".into(), Value::Bool(true));
        assert_eq!(
            signing::verify_json(
                &tampered,
                &v.signing_key.entity,
                |id| (id == v.signing_key.key_id).then_some(vk),
                mode
            ),
            Err(signing::VerifyError::BadSignature(
                v.signing_key.key_id.clone()
            )),
            "{}",
            vec.name
        );
    }
}

#[test]
fn xmatrix_requests_match_signedjson() {
    let v: Vectors = load("vectors.json");
    assert!(v.requests.len() >= 5, "vector file looks truncated");
    for r in &v.requests {
        let mode = mode_of(&r.mode);
        let content = r
            .content
            .as_deref()
            .map(|c| canonical::parse_strict(c).unwrap());

        // The object that gets signed.
        let req = xmatrix::request_json(
            &r.method,
            &r.uri,
            &r.origin,
            &r.destination,
            content.as_ref(),
        );
        assert_eq!(
            canonical::encode(&Value::Object(req), mode).unwrap(),
            r.signed_bytes,
            "{}",
            r.name
        );

        // Their header (Synapse's parameter order) parses and verifies.
        let x = xmatrix::parse(&r.header).unwrap_or_else(|e| panic!("{}: {e}", r.name));
        assert_eq!(
            (x.origin.as_str(), x.destination.as_deref(), x.key.as_str()),
            (
                r.origin.as_str(),
                Some(r.destination.as_str()),
                r.key_id.as_str()
            ),
            "{}",
            r.name
        );
        let vk = signing::parse_verify_key(&r.verify_key).unwrap();
        xmatrix::verify_request(
            &x,
            &r.method,
            &r.uri,
            &r.destination,
            content.as_ref(),
            &vk,
            mode,
        )
        .unwrap_or_else(|e| panic!("{}: {e}", r.name));
        // Addressed to someone else: refused.
        assert!(matches!(
            xmatrix::verify_request(
                &x,
                &r.method,
                &r.uri,
                "someone.else",
                content.as_ref(),
                &vk,
                mode
            ),
            Err(xmatrix::XMatrixError::WrongDestination { .. })
        ));

        // Our signature over the same request is the same (ed25519 is deterministic).
        let key = request_key(&r.key_id, &v.signing_key);
        assert_eq!(key.public_key_base64(), r.verify_key);
        let ours = xmatrix::sign_request(
            &r.method,
            &r.uri,
            &r.origin,
            &r.destination,
            content.as_ref(),
            &key,
            mode,
        )
        .unwrap();
        let ours = xmatrix::parse(&ours).unwrap();
        assert_eq!(ours.sig, x.sig, "{}", r.name);
        assert_eq!(ours, x, "{}", r.name);
    }
}

#[test]
fn python_float_formatting_matches_json_dumps() {
    let f: Floats = load("floats.json");
    assert!(f.floats.len() >= 2000, "float table looks truncated");
    let mut failures = Vec::new();
    for (input, expected) in &f.floats {
        for text in [input, expected] {
            let got = canonical::parse_strict(text)
                .and_then(|v| canonical::encode(&v, NumberMode::Python));
            if got.as_deref() != Ok(expected.as_str()) {
                failures.push(format!("{text} -> {got:?}, want {expected}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches, first: {:#?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
}
