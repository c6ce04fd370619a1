//! Canonical JSON (`courier::signing::canonical`) on arbitrary text.
//!
//! Properties, beyond "never panics":
//! - `parse_strict` accepts a subset of what `serde_json` accepts, with the same value;
//! - whatever `encode` writes (in either number mode) parses back strictly and encodes
//!   to the same bytes: the canonical form is a fixed point, so what one server signs
//!   another re-derives byte for byte.
#![no_main]

use courier::signing::canonical::{NumberMode, encode, parse_strict};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(value) = parse_strict(text) else {
        return;
    };
    let plain: serde_json::Value =
        serde_json::from_str(text).expect("parse_strict accepted what serde_json refuses");
    assert_eq!(plain, value, "parse_strict and serde_json disagree");
    for mode in [NumberMode::Strict, NumberMode::Python] {
        let Ok(once) = encode(&value, mode) else {
            continue;
        };
        let again = parse_strict(&once)
            .unwrap_or_else(|e| panic!("{mode:?} encoding {once:?} does not parse back: {e}"));
        let twice = encode(&again, mode)
            .unwrap_or_else(|e| panic!("{mode:?} encoding {once:?} does not encode again: {e}"));
        assert_eq!(once, twice, "{mode:?} encoding is not a fixed point");
    }
});
