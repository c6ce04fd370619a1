//! Differential tests against ruma (dev-dependencies only, pinned with `=`).
//!
//! ruma is the Rust Matrix ecosystem's reference implementation; conduit,
//! continuwuity and tuwunel all sign and verify with it. Where our code and
//! ruma's overlap (integer-only canonical JSON, JSON signatures, X-Matrix),
//! both must agree on every input:
//!
//! (a) canonical JSON: ours == `CanonicalJsonValue`'s / `to_canonical_json_string_for_signing`;
//! (b) JSON signatures: ours verify with `ruma_signatures::verify_json`, and the reverse;
//! (c) X-Matrix: our header parses and verifies with ruma-federation-api's `XMatrix`,
//!     and a header ruma makes parses and verifies with ours.

use std::collections::BTreeMap;

use courier::signing::canonical::{self, CanonicalError, NumberMode};
use courier::signing::{self, SigningKey, xmatrix};
use proptest::prelude::*;
use ruma_common::canonical_json::try_from_json_map;
use ruma_common::serde::Base64;
use ruma_common::{CanonicalJsonObject, CanonicalJsonValue, OwnedServerName, ServerName};
use ruma_federation_api::authentication::{XMatrix as RumaXMatrix, XMatrixSigningInput};
use ruma_signatures::{Ed25519KeyPair, PublicKeyMap};
use serde_json::{Map, Value};

const MAX_SAFE: i64 = (1 << 53) - 1;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// ruma loads keys from PKCS#8 DER; for ed25519 (RFC 8410) a v1 document is a
/// fixed 16-byte header followed by the 32-byte seed.
fn ruma_key(version: &str, seed: [u8; 32]) -> Ed25519KeyPair {
    const PKCS8_V1_ED25519: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    let mut der = PKCS8_V1_ED25519.to_vec();
    der.extend_from_slice(&seed);
    Ed25519KeyPair::from_der(&der, version.to_owned()).unwrap()
}

fn ruma_public_keys(entity: &str, key: &SigningKey) -> PublicKeyMap {
    BTreeMap::from([(
        entity.to_owned(),
        BTreeMap::from([(
            key.key_id(),
            Base64::new(key.verifying_key().to_bytes().to_vec()),
        )]),
    )])
}

fn to_ruma(obj: &Map<String, Value>) -> CanonicalJsonObject {
    try_from_json_map(obj.clone()).unwrap()
}

fn from_ruma(obj: CanonicalJsonObject) -> Map<String, Value> {
    match Value::from(CanonicalJsonValue::Object(obj)) {
        Value::Object(m) => m,
        _ => unreachable!(),
    }
}

fn server(name: &str) -> OwnedServerName {
    OwnedServerName::try_from(name).unwrap()
}

// ---------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------

fn arb_string() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z_]{0,6}",
        "\\PC{0,10}",
        // Controls, quotes, backslashes, DEL, U+2028, astral: the escaping edge cases.
        proptest::collection::vec(
            prop_oneof![
                (0u32..0x20).prop_map(|c| char::from_u32(c).unwrap()),
                Just('"'),
                Just('\\'),
                Just('/'),
                Just('\u{7f}'),
                Just('\u{2028}'),
                Just('😀'),
                any::<char>(),
            ],
            0..8
        )
        .prop_map(|cs| cs.into_iter().collect()),
    ]
}

/// JSON values ruma accepts: integers within ±(2^53−1), no floats.
fn arb_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        (-MAX_SAFE..=MAX_SAFE).prop_map(|i| Value::Number(i.into())),
        prop_oneof![Just(MAX_SAFE), Just(-MAX_SAFE), Just(0)].prop_map(|i| Value::Number(i.into())),
        arb_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            arb_object_of(inner).prop_map(Value::Object),
        ]
    })
}

fn arb_object_of(
    values: impl Strategy<Value = Value>,
) -> impl Strategy<Value = Map<String, Value>> {
    proptest::collection::btree_map(arb_string(), values, 0..6)
        .prop_map(|m| m.into_iter().collect())
}

fn arb_object() -> impl Strategy<Value = Map<String, Value>> {
    arb_object_of(arb_value())
}

/// Objects that may carry `signatures`/`unsigned` (which signing must skip).
fn arb_signable() -> impl Strategy<Value = Map<String, Value>> {
    (
        arb_object(),
        proptest::option::of(arb_object()),
        any::<bool>(),
    )
        .prop_map(|(mut obj, unsigned, other_sig)| {
            if let Some(u) = unsigned {
                obj.insert("unsigned".into(), Value::Object(u));
            }
            if other_sig {
                obj.insert(
                    "signatures".into(),
                    serde_json::json!({"other.example": {"ed25519:x": "c2ln"}}),
                );
            } else {
                obj.remove("signatures");
            }
            obj
        })
}

fn arb_server_name() -> impl Strategy<Value = String> {
    (
        "[a-z][a-z0-9-]{0,10}",
        prop_oneof![Just(""), Just(":8448"), Just(":1")],
    )
        .prop_map(|(h, p)| format!("{h}.example{p}"))
}

fn arb_key_version() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_]{1,8}"
}

fn arb_uri() -> impl Strategy<Value = String> {
    (
        "[a-zA-Z0-9_/.~-]{0,30}",
        proptest::option::of("[a-z_]{1,6}=[a-zA-Z0-9%._-]{0,10}(&[a-z]{1,3}=[0-9]{1,3})?"),
    )
        .prop_map(|(path, query)| match query {
            Some(q) => format!("/_matrix/{path}?{q}"),
            None => format!("/_matrix/{path}"),
        })
}

fn arb_request() -> impl Strategy<Value = (String, String, Option<Value>)> {
    prop_oneof![
        (Just("GET".to_owned()), arb_uri(), Just(None)),
        (Just("DELETE".to_owned()), arb_uri(), Just(None)),
        (
            prop_oneof![Just("PUT".to_owned()), Just("POST".to_owned())],
            arb_uri(),
            arb_object().prop_map(|o| Some(Value::Object(o)))
        ),
    ]
}

fn http_request(method: &str, uri: &str, content: Option<&Value>) -> http::Request<Vec<u8>> {
    let body = content
        .map(|c| serde_json::to_vec(c).unwrap())
        .unwrap_or_default();
    http::Request::builder()
        .method(method)
        .uri(uri)
        .body(body)
        .unwrap()
}

// ---------------------------------------------------------------------------
// (a) canonical JSON
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn canonical_json_equals_ruma(v in arb_value()) {
        let ruma = CanonicalJsonValue::try_from(v.clone()).unwrap().to_string();
        prop_assert_eq!(canonical::to_canonical_string(&v).unwrap(), ruma.clone());
        prop_assert_eq!(canonical::encode(&v, NumberMode::Python).unwrap(), ruma.clone());

        // Parsing pretty-printed text: both sides read the same value.
        let pretty = serde_json::to_string_pretty(&v).unwrap();
        let ours = canonical::parse_strict(&pretty).unwrap();
        let theirs: CanonicalJsonValue = serde_json::from_str(&pretty).unwrap();
        prop_assert_eq!(canonical::to_canonical_string(&ours).unwrap(), theirs.to_string());
    }

    #[test]
    fn signing_form_equals_ruma(obj in arb_signable()) {
        let ruma = ruma_signatures::to_canonical_json_string_for_signing(&to_ruma(&obj)).unwrap();
        prop_assert_eq!(canonical::encode_for_signing(&obj, NumberMode::Strict).unwrap(), ruma);
    }

    /// Both refuse exactly the same integers.
    #[test]
    fn integer_range_agrees_with_ruma(n in prop_oneof![any::<i64>(), (MAX_SAFE - 3)..(MAX_SAFE + 3), (-MAX_SAFE - 3)..(-MAX_SAFE + 3)]) {
        let v = serde_json::json!({"n": n});
        let ours = canonical::to_canonical_string(&v);
        let theirs = CanonicalJsonValue::try_from(v);
        prop_assert_eq!(ours.is_ok(), theirs.is_ok(), "n = {}", n);
        if let Err(e) = ours {
            prop_assert_eq!(e, CanonicalError::IntegerOutOfRange(n.to_string()));
        }
    }
}

/// Where we knowingly differ from ruma, pinned down so a change is noticed.
#[test]
fn documented_differences_from_ruma() {
    // ruma rejects every float; the spec (and we, in Strict mode) turn an
    // integral one into the integer: `{"a": -0, "b": 1e10}` -> `{"a":0,"b":10000000000}`.
    let v = canonical::parse_strict(r#"{"a": -0, "b": 1e10}"#).unwrap();
    assert!(CanonicalJsonValue::try_from(v.clone()).is_err());
    assert_eq!(
        canonical::to_canonical_string(&v).unwrap(),
        r#"{"a":0,"b":10000000000}"#
    );

    // u64 beyond i64: both refuse.
    let v = serde_json::json!({"n": u64::MAX});
    assert!(CanonicalJsonValue::try_from(v.clone()).is_err());
    assert!(canonical::to_canonical_string(&v).is_err());

    // ruma (through serde_json) silently keeps the last of duplicate keys; we refuse.
    let text = r#"{"a": 1, "a": 2}"#;
    let theirs: CanonicalJsonValue = serde_json::from_str(text).unwrap();
    assert_eq!(theirs.to_string(), r#"{"a":2}"#);
    assert!(matches!(
        canonical::parse_strict(text),
        Err(CanonicalError::DuplicateKey { .. })
    ));
}

// ---------------------------------------------------------------------------
// (b) JSON signatures
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn our_signatures_verify_with_ruma(obj in arb_signable(), seed in any::<[u8; 32]>(), version in arb_key_version()) {
        let key = SigningKey::from_seed(&version, seed).unwrap();
        let mut signed = obj.clone();
        signing::sign_json(&mut signed, "a.example", &key, NumberMode::Strict).unwrap();
        // Only our entity, so ruma (which checks every entity present) has keys for all.
        if let Some(Value::Object(sigs)) = signed.get_mut("signatures") {
            sigs.remove("other.example");
        }
        let keys = ruma_public_keys("a.example", &key);
        prop_assert!(ruma_signatures::verify_json(&keys, &to_ruma(&signed)).is_ok());

        // And a change to the content breaks it for ruma too.
        signed.insert("injected".into(), Value::Bool(true));
        prop_assert!(ruma_signatures::verify_json(&keys, &to_ruma(&signed)).is_err());
    }

    #[test]
    fn ruma_signatures_verify_with_ours(obj in arb_signable(), seed in any::<[u8; 32]>(), version in arb_key_version()) {
        let ruma = ruma_key(&version, seed);
        let mut signed = to_ruma(&obj);
        ruma_signatures::sign_json("b.example", &ruma, &mut signed).unwrap();
        let signed = from_ruma(signed);

        let ours = SigningKey::from_seed(&version, seed).unwrap();
        let vk = ours.verifying_key();
        let key_id = ours.key_id();
        prop_assert_eq!(
            signing::verify_json(&signed, "b.example", |id| (id == key_id).then_some(vk), NumberMode::Strict),
            Ok(())
        );
        // Same key, same bytes: the signatures are identical (ed25519 is deterministic).
        let mut mine = obj.clone();
        signing::sign_json(&mut mine, "b.example", &ours, NumberMode::Strict).unwrap();
        prop_assert_eq!(&mine["signatures"]["b.example"], &signed["signatures"]["b.example"]);
    }
}

// ---------------------------------------------------------------------------
// (c) X-Matrix
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn our_header_parses_and_verifies_with_ruma(
        (method, uri, content) in arb_request(),
        origin in arb_server_name(),
        destination in arb_server_name(),
        seed in any::<[u8; 32]>(),
        version in arb_key_version(),
    ) {
        let key = SigningKey::from_seed(&version, seed).unwrap();
        let header = xmatrix::sign_request(&method, &uri, &origin, &destination, content.as_ref(), &key, NumberMode::Strict).unwrap();

        let parsed: RumaXMatrix = header.parse().unwrap();
        prop_assert_eq!(parsed.origin.as_str(), origin.as_str());
        prop_assert_eq!(parsed.destination.as_deref().map(ServerName::as_str), Some(destination.as_str()));
        prop_assert_eq!(parsed.key.as_str(), key.key_id());
        // Through the http::HeaderValue path too.
        let value = http::HeaderValue::from_str(&header).unwrap();
        prop_assert!(RumaXMatrix::try_from(&value).is_ok());

        let request = http_request(&method, &uri, content.as_ref());
        let keys = ruma_public_keys(&origin, &key);
        prop_assert!(parsed.verify_http_request(&request, &server(&destination), &keys).is_ok());
        // Tampered URI: ruma refuses.
        let other = http_request(&method, &format!("{uri}x"), content.as_ref());
        prop_assert!(parsed.verify_http_request(&other, &server(&destination), &keys).is_err());
    }

    #[test]
    fn ruma_header_parses_and_verifies_with_ours(
        (method, uri, content) in arb_request(),
        origin in arb_server_name(),
        destination in arb_server_name(),
        seed in any::<[u8; 32]>(),
        version in arb_key_version(),
    ) {
        let ruma = ruma_key(&version, seed);
        let request = http_request(&method, &uri, content.as_ref());
        let signed = RumaXMatrix::sign_http_request(
            &request,
            XMatrixSigningInput::new(server(&origin), server(&destination), &ruma),
        )
        .unwrap();
        // ruma writes `X-Matrix destination=...,key="...",origin=...,sig=...`,
        // quoting only where a value is not a token.
        let header = signed.to_string();

        let x = xmatrix::parse(&header).unwrap();
        prop_assert_eq!(&x.origin, &origin);
        prop_assert_eq!(x.destination.as_deref(), Some(destination.as_str()));
        prop_assert_eq!(&x.key, &format!("ed25519:{version}"));

        let ours = SigningKey::from_seed(&version, seed).unwrap();
        // The body as a receiver sees it: parsed from the bytes on the wire.
        let body = content.as_ref().map(|_| canonical::parse_strict(std::str::from_utf8(request.body()).unwrap()).unwrap());
        prop_assert_eq!(
            xmatrix::verify_request(&x, &method, &uri, &destination, body.as_ref(), &ours.verifying_key(), NumberMode::Strict),
            Ok(())
        );
        prop_assert_eq!(
            xmatrix::verify_request(&x, &method, &uri, &destination, body.as_ref(), &ours.verifying_key(), NumberMode::Python),
            Ok(())
        );
        // Same signature as ours over the same request.
        let mine = xmatrix::sign_request(&method, &uri, &origin, &destination, body.as_ref(), &ours, NumberMode::Strict).unwrap();
        prop_assert_eq!(xmatrix::parse(&mine).unwrap().sig, x.sig);
    }
}

/// ruma's own quoting test header, and a pre-v1.3 header without destination.
#[test]
fn ruma_style_headers_parse() {
    let x =
        xmatrix::parse(r#"X-Matrix origin="example.com:1234",key="abc\"def\\:ghi",sig=dGVzdA,"#)
            .unwrap();
    assert_eq!(
        (x.origin.as_str(), x.key.as_str(), x.sig.as_str()),
        ("example.com:1234", r#"abc"def\:ghi"#, "dGVzdA")
    );
    let x = xmatrix::parse(
        "X-Matrix origin=\"origin.hs.example.com\"  ,     destination=\"destination.hs.example.com\",key=\"ed25519:key1\", sig=\"dGVzdA\"",
    )
    .unwrap();
    assert_eq!(x.destination.as_deref(), Some("destination.hs.example.com"));
    let x =
        xmatrix::parse(r#"X-Matrix key="ed25519:key1",origin=origin.hs.example.com,sig=dGVzdA"#)
            .unwrap();
    assert_eq!(x.destination, None);
}
