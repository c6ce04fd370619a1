//! X-Matrix `Authorization` headers (`courier::signing::xmatrix::parse`) on arbitrary
//! text.
//!
//! Properties, beyond "never panics":
//! - a parsed header, written back with `Display`, parses to the same credentials;
//! - checking a signature with whatever parsed never panics;
//! - a request signed for the parsed origin and destination verifies through its own
//!   header (sign, format, parse, verify is a round trip for any origin text).
#![no_main]

use std::sync::LazyLock;

use courier::signing::SigningKey;
use courier::signing::canonical::NumberMode;
use courier::signing::xmatrix::{parse, sign_request, verify_request};
use libfuzzer_sys::fuzz_target;
use serde_json::json;

static KEY: LazyLock<SigningKey> =
    LazyLock::new(|| SigningKey::from_seed("fuzz", [7; 32]).expect("valid version"));

const URI: &str = "/_matrix/federation/v1/send/1";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(x) = parse(text) else {
        return;
    };
    let shown = x.to_string();
    assert_eq!(parse(&shown).as_ref(), Ok(&x), "written back as {shown:?}");

    let body = json!({"origin": x.origin, "edus": []});
    let vk = KEY.verifying_key();
    let dest = x.destination.clone().unwrap_or_else(|| "d.test".to_owned());
    let _ = verify_request(&x, "PUT", URI, &dest, Some(&body), &vk, NumberMode::Python);

    let header = sign_request(
        "PUT",
        URI,
        &x.origin,
        &dest,
        Some(&body),
        &KEY,
        NumberMode::Python,
    )
    .expect("signing a small JSON body");
    let signed = parse(&header).unwrap_or_else(|e| panic!("our own header {header:?}: {e}"));
    assert_eq!(signed.origin, x.origin);
    verify_request(
        &signed,
        "PUT",
        URI,
        &dest,
        Some(&body),
        &vk,
        NumberMode::Python,
    )
    .unwrap_or_else(|e| panic!("our own signature {header:?} does not verify: {e}"));
});
