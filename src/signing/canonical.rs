//! Canonical JSON: the one byte sequence that gets signed.
//!
//! This module owns two things:
//!
//! * [`parse_strict`], a JSON parser that refuses everything a signature check
//!   must not silently "fix up": duplicate object keys (at any depth), trailing
//!   data, lone UTF-16 surrogates and absurd nesting.
//! * [`encode`], which writes a [`serde_json::Value`] in the Matrix canonical
//!   form (sorted keys, no whitespace, minimal escaping), with two ways of
//!   writing numbers, chosen by [`NumberMode`].
//!
//! It must never do I/O, never allocate per object key beyond the output
//! buffer, and never panic, whatever the input.
//!
//! # Why two number modes?
//!
//! The spec (appendix "Canonical JSON") allows only integers in
//! `[-(2^53)+1, 2^53-1]`. That is [`NumberMode::Strict`], and it is what we
//! use for everything *we* create (our server keys, for instance).
//!
//! Synapse does not enforce that rule. It signs with Python's
//! `json.dumps(..., ensure_ascii=False, separators=(",", ":"), sort_keys=True)`,
//! which writes any Python `int` as-is and any `float` with `repr()`. Real
//! federation traffic carries floats (clients put them in to-device content),
//! so to verify or re-sign what a Synapse server signed we must produce the same
//! bytes. That is [`NumberMode::Python`].
//!
//! # Key order
//!
//! The crate builds `serde_json` *without* `preserve_order`, so
//! [`serde_json::Map`] is a `BTreeMap<String, Value>`. Rust orders `String`s by
//! their UTF-8 bytes, and for valid UTF-8 byte order is the same as Unicode
//! code-point order, which is exactly what the spec asks for. So encoding just
//! walks the map; it never sorts.

use std::cell::Cell;
use std::fmt::{self, Write as _};

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Largest integer the spec allows: `2^53 - 1` (the smallest is its negation).
pub const MAX_SAFE_INTEGER: i64 = (1 << 53) - 1;

/// How deeply arrays and objects may nest in [`parse_strict`] input.
///
/// `serde_json` itself stops at 128; we stop a little earlier so that the
/// failure is our own typed [`CanonicalError::TooDeep`]. Nothing legitimate in
/// federation comes close.
pub const MAX_PARSE_DEPTH: usize = 100;

/// How deeply arrays and objects may nest in a value given to [`encode`].
///
/// Encoding is recursive; this bound turns a pathological, programmatically
/// built value into an error instead of a stack overflow. It is well above
/// [`MAX_PARSE_DEPTH`] so that anything we parsed can still be wrapped (for
/// instance as the `content` of an X-Matrix request object) and encoded.
pub const MAX_ENCODE_DEPTH: usize = 256;

/// How numbers are written. See the module docs for why there are two.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NumberMode {
    /// The spec's rule: integers within ±(2^53−1) only. A number written with
    /// a fraction or exponent whose value is such an integer (`1e10`, `-0.0`)
    /// is written as that integer; anything else is an error.
    #[default]
    Strict,
    /// What Synapse signs: integers as-is (no range check) and every float as
    /// Python's `repr(float)` writes it (`1.5`, `1e+16`, `-0.0`, `1e-07`).
    Python,
}

/// Everything that can go wrong while parsing or encoding canonical JSON.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CanonicalError {
    /// The text is not one valid JSON value: a syntax error, trailing data, a
    /// lone surrogate escape such as `"\ud800"`, a number too large for an
    /// `f64`, and so on. The message is `serde_json`'s and includes the
    /// position.
    #[error("invalid JSON: {0}")]
    Syntax(String),
    /// An object contains the same key twice. `serde_json` would silently keep
    /// the last one, which would let two parties sign and read different data.
    #[error("duplicate object key {key:?} at line {line} column {column}")]
    DuplicateKey {
        key: String,
        line: usize,
        column: usize,
    },
    /// Arrays/objects nest deeper than `limit`.
    #[error("JSON nests deeper than {limit} levels")]
    TooDeep { limit: usize },
    /// An integer outside ±(2^53−1) in [`NumberMode::Strict`].
    #[error("number {0} is outside the canonical JSON integer range ±(2^53-1)")]
    IntegerOutOfRange(String),
    /// A number with a real fractional part in [`NumberMode::Strict`].
    #[error("number {0} is not an integer; canonical JSON allows integers only")]
    NotAnInteger(String),
}

// ---------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------

/// Parses exactly one JSON value, refusing anything ambiguous.
///
/// On top of `serde_json`'s own checks (RFC 8259 syntax, no trailing data,
/// no raw control characters in strings, no lone surrogates in `\u` escapes,
/// no numbers beyond `f64`), this rejects duplicate object keys at any depth
/// and nesting deeper than [`MAX_PARSE_DEPTH`].
///
/// Numbers come out the way `serde_json` reads them: an integer literal that
/// fits `i64`/`u64` stays an integer, everything else (fractions, exponents,
/// huge integers, and — surprisingly — the literal `-0`) becomes an `f64`.
///
/// ```
/// use courier::signing::canonical::{parse_strict, CanonicalError};
/// assert!(parse_strict(r#"{"a": 1}"#).is_ok());
/// assert!(matches!(
///     parse_strict(r#"{"a": 1, "a": 2}"#),
///     Err(CanonicalError::DuplicateKey { .. })
/// ));
/// ```
pub fn parse_strict(text: &str) -> Result<Value, CanonicalError> {
    let failure = Cell::new(None);
    let mut de = serde_json::Deserializer::from_str(text);
    let seed = StrictValue {
        depth: 0,
        failure: &failure,
    };
    let result = seed.deserialize(&mut de).and_then(|v| de.end().map(|()| v));
    result.map_err(|e| match failure.take() {
        Some(Failure::Duplicate(key)) => CanonicalError::DuplicateKey {
            key,
            line: e.line(),
            column: e.column(),
        },
        Some(Failure::TooDeep) => CanonicalError::TooDeep {
            limit: MAX_PARSE_DEPTH,
        },
        None => CanonicalError::Syntax(e.to_string()),
    })
}

/// Why our visitor gave up. `serde` errors are stringly typed, so the visitor
/// leaves the real reason here for [`parse_strict`] to pick up.
enum Failure {
    Duplicate(String),
    TooDeep,
}

/// A `DeserializeSeed` that builds a [`Value`] like `serde_json` does, but
/// counts depth and refuses duplicate keys.
#[derive(Clone, Copy)]
struct StrictValue<'a> {
    depth: usize,
    failure: &'a Cell<Option<Failure>>,
}

impl StrictValue<'_> {
    fn nested<E: de::Error>(self) -> Result<Self, E> {
        let depth = self.depth + 1;
        if depth > MAX_PARSE_DEPTH {
            self.failure.set(Some(Failure::TooDeep));
            return Err(E::custom("nesting too deep"));
        }
        Ok(StrictValue {
            depth,
            failure: self.failure,
        })
    }
}

impl<'de> DeserializeSeed<'de> for StrictValue<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StrictValue<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }

    fn visit_i64<E>(self, n: i64) -> Result<Value, E> {
        Ok(Value::Number(n.into()))
    }

    fn visit_u64<E>(self, n: u64) -> Result<Value, E> {
        Ok(Value::Number(n.into()))
    }

    fn visit_f64<E: de::Error>(self, n: f64) -> Result<Value, E> {
        // serde_json never hands us NaN or infinity (it rejects `1e400`), but
        // `Number::from_f64` is the checked constructor, so use it.
        Number::from_f64(n)
            .map(Value::Number)
            .ok_or_else(|| E::custom("number is not finite"))
    }

    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::String(s.to_owned()))
    }

    fn visit_string<E>(self, s: String) -> Result<Value, E> {
        Ok(Value::String(s))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let inner = self.nested()?;
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(item) = seq.next_element_seed(inner)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let inner = self.nested()?;
        let mut map = Map::new();
        while let Some(key) = access.next_key::<String>()? {
            // Check before parsing the value, so the error position points at
            // the repeated key rather than the end of its value.
            if map.contains_key(&key) {
                self.failure.set(Some(Failure::Duplicate(key)));
                return Err(de::Error::custom("duplicate key"));
            }
            let value = access.next_value_seed(inner)?;
            map.insert(key, value);
        }
        Ok(Value::Object(map))
    }
}

// ---------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------

/// Encodes `value` as canonical JSON ([`NumberMode::Strict`]).
///
/// ```
/// use courier::signing::canonical::to_canonical_string;
/// let v = serde_json::json!({"b": "2", "a": "1"});
/// assert_eq!(to_canonical_string(&v).unwrap(), r#"{"a":"1","b":"2"}"#);
/// ```
pub fn to_canonical_string(value: &Value) -> Result<String, CanonicalError> {
    encode(value, NumberMode::Strict)
}

/// Encodes `value` as canonical JSON, writing numbers as `mode` says.
pub fn encode(value: &Value, mode: NumberMode) -> Result<String, CanonicalError> {
    let mut out = String::with_capacity(64);
    encode_into(&mut out, value, mode)?;
    Ok(out)
}

/// Appends the canonical encoding of `value` to `out`.
///
/// On error, `out` may hold a partial encoding; throw it away.
pub fn encode_into(
    out: &mut String,
    value: &Value,
    mode: NumberMode,
) -> Result<(), CanonicalError> {
    write_value(out, value, mode, 0)
}

/// Encodes `object` as it is signed: without its top-level `signatures` and
/// `unsigned` members (spec appendix, "Signing JSON").
///
/// This gives the same bytes as removing both keys and calling [`encode`],
/// without having to mutate or clone the object.
pub fn encode_for_signing(
    object: &Map<String, Value>,
    mode: NumberMode,
) -> Result<String, CanonicalError> {
    let mut out = String::with_capacity(64);
    write_object(
        &mut out,
        object
            .iter()
            .filter(|(k, _)| *k != "signatures" && *k != "unsigned"),
        mode,
        0,
    )?;
    Ok(out)
}

fn write_value(
    out: &mut String,
    value: &Value,
    mode: NumberMode,
    depth: usize,
) -> Result<(), CanonicalError> {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => write_number(out, n, mode)?,
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            let depth = enter(depth)?;
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, item, mode, depth)?;
            }
            out.push(']');
        }
        Value::Object(map) => write_object(out, map.iter(), mode, depth)?,
    }
    Ok(())
}

fn enter(depth: usize) -> Result<usize, CanonicalError> {
    if depth >= MAX_ENCODE_DEPTH {
        return Err(CanonicalError::TooDeep {
            limit: MAX_ENCODE_DEPTH,
        });
    }
    Ok(depth + 1)
}

/// Writes an object from entries that are already in code-point order (they
/// come from a `BTreeMap`, or from a filter over one).
fn write_object<'a>(
    out: &mut String,
    entries: impl Iterator<Item = (&'a String, &'a Value)>,
    mode: NumberMode,
    depth: usize,
) -> Result<(), CanonicalError> {
    let depth = enter(depth)?;
    out.push('{');
    for (i, (key, value)) in entries.enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_string(out, key);
        out.push(':');
        write_value(out, value, mode, depth)?;
    }
    out.push('}');
    Ok(())
}

/// Writes `s` as a JSON string literal with the spec's minimal escaping:
/// `\b \t \n \f \r \" \\` as short escapes, other C0 controls as `\u00xx`
/// (lower-case hex), and everything else — `/`, DEL, U+2028, astral-plane
/// characters — as raw UTF-8.
pub(crate) fn write_string(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.reserve(s.len() + 2);
    out.push('"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0x00..=0x1f => "",
            _ => continue,
        };
        // `i` indexes an ASCII byte, so both slice ends are char boundaries.
        out.push_str(&s[start..i]);
        if short.is_empty() {
            out.push_str("\\u00");
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        } else {
            out.push_str(short);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

fn write_number(out: &mut String, n: &Number, mode: NumberMode) -> Result<(), CanonicalError> {
    // `write!` into a `String` cannot fail; the `fmt::Result`s are ignored.
    match mode {
        NumberMode::Python => {
            if let Some(i) = n.as_i64() {
                let _ = write!(out, "{i}");
            } else if let Some(u) = n.as_u64() {
                let _ = write!(out, "{u}");
            } else if let Some(f) = n.as_f64() {
                write_python_float(out, f);
            }
        }
        NumberMode::Strict => {
            if let Some(i) = n.as_i64() {
                if !(-MAX_SAFE_INTEGER..=MAX_SAFE_INTEGER).contains(&i) {
                    return Err(CanonicalError::IntegerOutOfRange(i.to_string()));
                }
                let _ = write!(out, "{i}");
            } else if let Some(u) = n.as_u64() {
                // Only values above i64::MAX get here: always out of range.
                return Err(CanonicalError::IntegerOutOfRange(u.to_string()));
            } else if let Some(f) = n.as_f64() {
                if f.fract() != 0.0 {
                    return Err(CanonicalError::NotAnInteger(n.to_string()));
                }
                // Exact comparison is fine: 2^53-1 is representable in f64.
                if f.abs() > MAX_SAFE_INTEGER as f64 {
                    return Err(CanonicalError::IntegerOutOfRange(n.to_string()));
                }
                // In range and integral, so the cast is exact; `-0.0` becomes 0.
                let _ = write!(out, "{}", f as i64);
            }
        }
    }
    Ok(())
}

/// Writes `f` exactly as Python 3's `repr(float)` (and so `json.dumps`) does.
///
/// Python picks the shortest digit string that reads back as the same `f64`,
/// the one nearest the exact value if there are several, and on an exact tie
/// the one ending in an even digit. Then it lays the digits out:
///
/// * decimal exponent in `[-4, 16)`: fixed notation, always with at least one
///   fractional digit: `1.5`, `10000000000.0`, `0.0001`, `-0.0`;
/// * otherwise scientific, mantissa without a trailing `.0`, exponent with a
///   sign and at least two digits: `1e+16`, `1.5e+16`, `1e-07`, `1.234e-05`.
///
/// The digits come from `serde_json`'s own float formatting (the Ryū
/// algorithm), which makes the same choices, tie-breaking included. Rust's
/// `{:e}` does not: it rounds exact ties up, so `-271556098175374.125` comes
/// out as `…374.13` where Python writes `…374.12`.
///
/// `f` is finite here: a `serde_json::Number` cannot hold NaN or infinity.
pub(crate) fn write_python_float(out: &mut String, f: f64) {
    let Some(number) = Number::from_f64(f) else {
        return;
    };
    // Ryū's text: "1.5", "1e16", "1.234e-5", "-0.0", "123.45", "0.001", ...
    let text = number.to_string();
    let (negative, text) = match text.strip_prefix('-') {
        Some(t) => (true, t),
        None => (false, text.as_str()),
    };
    let (mantissa, exponent) = match text.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i32>().unwrap_or(0)),
        None => (text, 0),
    };
    let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));

    // Collect the significant digits and where the decimal point goes:
    // value = 0.DIGITS × 10^point.
    let mut digits = [0u8; 40];
    let mut len = 0;
    let mut point = i32::try_from(int_part.len()).unwrap_or(0) + exponent;
    for &b in int_part.as_bytes().iter().chain(frac_part.as_bytes()) {
        if len == 0 && b == b'0' {
            point -= 1; // a leading zero
        } else if len < digits.len() {
            digits[len] = b;
            len += 1;
        }
    }
    while len > 0 && digits[len - 1] == b'0' {
        len -= 1;
    }
    if len == 0 {
        digits[0] = b'0';
        len = 1;
        point = 1;
    }
    let digits = &digits[..len];
    // Scientific exponent: value = D.DDD × 10^sci.
    let sci = point - 1;

    if negative {
        out.push('-');
    }
    let push_digits =
        |out: &mut String, ds: &[u8]| ds.iter().for_each(|&d| out.push(char::from(d)));
    if (-4..16).contains(&sci) {
        if point <= 0 {
            // 0.000DDD
            out.push_str("0.");
            (0..-point).for_each(|_| out.push('0'));
            push_digits(out, digits);
        } else {
            let int_len = point.unsigned_abs() as usize;
            if digits.len() > int_len {
                push_digits(out, &digits[..int_len]);
                out.push('.');
                push_digits(out, &digits[int_len..]);
            } else {
                push_digits(out, digits);
                (digits.len()..int_len).for_each(|_| out.push('0'));
                out.push_str(".0");
            }
        }
    } else {
        push_digits(out, &digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            push_digits(out, &digits[1..]);
        }
        out.push('e');
        out.push(if sci < 0 { '-' } else { '+' });
        let _ = write!(out, "{:02}", sci.unsigned_abs());
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Parses `input` strictly, encodes it in `mode`, and compares with
    /// `expected` (`Ok(text)` or the `Err` kind).
    fn check(input: &str, mode: NumberMode, expected: Result<&str, &str>) {
        let got = parse_strict(input).and_then(|v| encode(&v, mode));
        match (&got, expected) {
            (Ok(text), Ok(want)) => assert_eq!(text, want, "input {input:?}"),
            (Err(e), Err(kind)) => assert_eq!(kind_of(e), kind, "input {input:?}: {e}"),
            _ => panic!("input {input:?} ({mode:?}): got {got:?}, want {expected:?}"),
        }
    }

    fn kind_of(e: &CanonicalError) -> &'static str {
        match e {
            CanonicalError::Syntax(_) => "Syntax",
            CanonicalError::DuplicateKey { .. } => "DuplicateKey",
            CanonicalError::TooDeep { .. } => "TooDeep",
            CanonicalError::IntegerOutOfRange(_) => "IntegerOutOfRange",
            CanonicalError::NotAnInteger(_) => "NotAnInteger",
        }
    }

    use NumberMode::{Python, Strict};

    #[test]
    fn spec_vectors() {
        let table: &[(&str, &str)] = &[
            ("{}", "{}"),
            (r#"{"one": 1, "two": "Two"}"#, r#"{"one":1,"two":"Two"}"#),
            (r#"{"b": "2", "a": "1"}"#, r#"{"a":"1","b":"2"}"#),
            (
                r#"{"auth": {"success": true, "mxid": "@john.doe:example.com", "profile": {
                    "display_name": "John Doe", "three_pids": [
                      {"medium": "email", "address": "john.doe@example.org"},
                      {"medium": "msisdn", "address": "123456789"}]}}}"#,
                r#"{"auth":{"mxid":"@john.doe:example.com","profile":{"display_name":"John Doe","three_pids":[{"address":"john.doe@example.org","medium":"email"},{"address":"123456789","medium":"msisdn"}]},"success":true}}"#,
            ),
            (r#"{"a": "日本語"}"#, r#"{"a":"日本語"}"#),
            (r#"{"本": 2, "日": 1}"#, r#"{"日":1,"本":2}"#),
            (r#"{"a": "\u65E5"}"#, r#"{"a":"日"}"#),
            (r#"{"a": null}"#, r#"{"a":null}"#),
            (r#"{"a": -0, "b": 1e10}"#, r#"{"a":0,"b":10000000000}"#),
        ];
        for (input, want) in table {
            check(input, Strict, Ok(want));
        }
    }

    #[test]
    fn strings_and_escapes() {
        let table: &[(&str, &str)] = &[
            (r#""\b\t\n\f\r\"\\""#, r#""\b\t\n\f\r\"\\""#),
            (
                r#""\u0000\u0001\u001f\u000B\u000e""#,
                r#""\u0000\u0001\u001f\u000b\u000e""#,
            ),
            (
                r#""\/ / \u007f \u2028 \u2029""#,
                "\"/ / \u{7f} \u{2028} \u{2029}\"",
            ),
            (r#""\ud83d\ude00 😀 𝄞""#, "\"😀 😀 𝄞\""),
            (r#""é ß \u00e9""#, r#""é ß é""#),
            ("\"\u{10FFFF}\"", "\"\u{10FFFF}\""),
            (r#""""#, r#""""#),
            (r#"{"\n": 1, "\u0000": 2}"#, r#"{"\u0000":2,"\n":1}"#),
        ];
        for (input, want) in table {
            check(input, Strict, Ok(want));
            check(input, Python, Ok(want));
        }
    }

    #[test]
    fn key_order_is_code_point_order() {
        // U+FF61 (3 UTF-8 bytes) sorts before U+10000 (4 bytes) by code point;
        // in UTF-16 order (JavaScript's sort) it would come after the surrogate pair.
        check(
            r#"{"𐀀": 1, "｡": 2, "a": 3, "A": 4, "": 5, "aa": 6, "é": 7}"#,
            Strict,
            Ok(r#"{"":5,"A":4,"a":3,"aa":6,"é":7,"｡":2,"𐀀":1}"#),
        );
    }

    #[test]
    fn containers_and_literals() {
        let table: &[(&str, &str)] = &[
            ("[]", "[]"),
            ("{}", "{}"),
            (
                r#"{"a": [], "b": {}, "c": [{}, []]}"#,
                r#"{"a":[],"b":{},"c":[{},[]]}"#,
            ),
            (" [ true , false , null ] ", "[true,false,null]"),
            ("\"x\"", "\"x\""),
            ("7", "7"),
            ("[3, 1, 2]", "[3,1,2]"),
        ];
        for (input, want) in table {
            check(input, Strict, Ok(want));
        }
    }

    #[test]
    fn strict_number_range() {
        let table: &[(&str, Result<&str, &str>)] = &[
            ("9007199254740991", Ok("9007199254740991")),
            ("-9007199254740991", Ok("-9007199254740991")),
            ("9007199254740992", Err("IntegerOutOfRange")),
            ("-9007199254740992", Err("IntegerOutOfRange")),
            ("9223372036854775807", Err("IntegerOutOfRange")),
            ("18446744073709551615", Err("IntegerOutOfRange")),
            ("18446744073709551616", Err("IntegerOutOfRange")), // parsed as f64
            ("9007199254740991.0", Ok("9007199254740991")),
            ("9.007199254740991e15", Ok("9007199254740991")),
            ("9007199254740992.0", Err("IntegerOutOfRange")),
            ("-0", Ok("0")),
            ("-0.0", Ok("0")),
            ("0e5", Ok("0")),
            ("1E2", Ok("100")),
            ("1.5", Err("NotAnInteger")),
            ("-0.5", Err("NotAnInteger")),
            ("1e-7", Err("NotAnInteger")),
            ("1e300", Err("IntegerOutOfRange")),
        ];
        for (input, want) in table {
            check(input, Strict, *want);
        }
    }

    /// Every `expected` here was produced by CPython 3.11:
    /// `python3 -c 'import json; print(json.dumps(float("<input>")))'`
    /// (integers: `json.dumps(int(...))`; `-0` parses as a float in serde_json).
    #[test]
    fn python_numbers() {
        let table: &[(&str, &str)] = &[
            ("1.5", "1.5"),
            ("-1.5", "-1.5"),
            ("1e16", "1e+16"),
            ("1.5e16", "1.5e+16"),
            ("1e-7", "1e-07"),
            ("1.234e-5", "1.234e-05"),
            ("1e22", "1e+22"),
            ("1e10", "10000000000.0"),
            ("-0.0", "-0.0"),
            ("0.0", "0.0"),
            ("0.0001", "0.0001"),
            ("0.00001", "1e-05"),
            ("0.1", "0.1"),
            ("100.0", "100.0"),
            ("1234567890123456.7", "1234567890123456.8"),
            ("9999999999999998.0", "9999999999999998.0"),
            ("123456789012345680.0", "1.2345678901234568e+17"),
            ("5e-324", "5e-324"),
            ("1.7976931348623157e308", "1.7976931348623157e+308"),
            ("2.2250738585072014e-308", "2.2250738585072014e-308"),
            ("1e100", "1e+100"),
            ("-1.5e-10", "-1.5e-10"),
            ("0.3", "0.3"),
            ("3.141592653589793", "3.141592653589793"),
            // An exact tie (the double is -271556098175374.125): Python rounds
            // the last digit to even; Rust's `{:e}` would give ...374.13.
            ("-271556098175374.12", "-271556098175374.12"),
            ("-271556098175374.125", "-271556098175374.12"),
            ("12345.678", "12345.678"),
            ("0.000123", "0.000123"),
            // Integers: as-is, no range check.
            ("9007199254740993", "9007199254740993"),
            ("-9223372036854775808", "-9223372036854775808"),
            ("18446744073709551615", "18446744073709551615"),
            ("0", "0"),
            // serde_json reads `-0` and integers beyond u64 as f64.
            ("-0", "-0.0"),
            ("18446744073709551616", "1.8446744073709552e+19"),
        ];
        for (input, want) in table {
            check(input, Python, Ok(want));
        }
        check(
            r#"{"f": 1.5, "g": 1e16, "h": -0.0, "i": 1e-7}"#,
            Python,
            Ok(r#"{"f":1.5,"g":1e+16,"h":-0.0,"i":1e-07}"#),
        );
    }

    #[test]
    fn parse_errors() {
        let table: &[(&str, &str)] = &[
            (r#"{"a": 1, "a": 2}"#, "DuplicateKey"),
            (r#"{"a": 1, "a": 1}"#, "DuplicateKey"),
            (r#"[{"x": {"y": 1, "y": 1}}]"#, "DuplicateKey"),
            (r#"{"\u0061": 1, "a": 2}"#, "DuplicateKey"),
            ("", "Syntax"),
            ("   ", "Syntax"),
            ("{", "Syntax"),
            ("[1,]", "Syntax"),
            (r#"{"a":1,}"#, "Syntax"),
            ("{} {}", "Syntax"),
            ("1 2", "Syntax"),
            ("{}x", "Syntax"),
            (r#""\ud800""#, "Syntax"),
            (r#""\udc00""#, "Syntax"),
            (r#""\ud800\u0041""#, "Syntax"),
            ("\"raw\ncontrol\"", "Syntax"),
            ("NaN", "Syntax"),
            ("Infinity", "Syntax"),
            ("1e400", "Syntax"),
            ("01", "Syntax"),
            ("+1", "Syntax"),
            (".5", "Syntax"),
            ("'a'", "Syntax"),
            (r#"{a: 1}"#, "Syntax"),
            ("\u{feff}{}", "Syntax"),
        ];
        for (input, want) in table {
            check(input, Strict, Err(want));
        }
    }

    #[test]
    fn duplicate_key_error_names_key_and_position() {
        let err = parse_strict("{\n  \"k\": 1,\n  \"k\": 2}").unwrap_err();
        assert_eq!(
            err,
            CanonicalError::DuplicateKey {
                key: "k".into(),
                line: 3,
                column: 5
            }
        );
        assert!(err.to_string().contains("\"k\""), "{err}");
    }

    #[test]
    fn nesting_limits() {
        let nest = |n: usize| "[".repeat(n) + &"]".repeat(n);
        assert!(parse_strict(&nest(MAX_PARSE_DEPTH)).is_ok());
        check(&nest(MAX_PARSE_DEPTH + 1), Strict, Err("TooDeep"));
        // Far beyond any stack: still an error, not a crash.
        check(&nest(1_000_000), Strict, Err("TooDeep"));
        check(&"{\"a\":".repeat(200_000), Strict, Err("TooDeep"));

        // A value built in code, deeper than the encoder allows.
        let mut v = Value::Null;
        for _ in 0..MAX_ENCODE_DEPTH {
            v = Value::Array(vec![v]);
        }
        assert!(encode(&v, Strict).is_ok());
        let v = Value::Array(vec![v]);
        assert_eq!(
            encode(&v, Strict),
            Err(CanonicalError::TooDeep {
                limit: MAX_ENCODE_DEPTH
            })
        );
    }

    #[test]
    fn encode_for_signing_drops_only_top_level_fields() {
        let v = parse_strict(r#"{"a": 1, "signatures": {"x": {}}, "unsigned": {"age": 3}, "z": {"signatures": 1, "unsigned": 2}}"#)
            .unwrap();
        let Value::Object(obj) = v else {
            unreachable!()
        };
        assert_eq!(
            encode_for_signing(&obj, Strict).unwrap(),
            r#"{"a":1,"z":{"signatures":1,"unsigned":2}}"#
        );
        assert_eq!(encode_for_signing(&Map::new(), Strict).unwrap(), "{}");
    }

    // -- properties --------------------------------------------------------

    fn arb_string() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z]{0,6}",
            "\\PC{0,8}",
            proptest::collection::vec(any::<char>(), 0..8).prop_map(|cs| cs.into_iter().collect()),
        ]
    }

    /// Values that are canonical-representable in Strict mode.
    pub(crate) fn arb_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            (-MAX_SAFE_INTEGER..=MAX_SAFE_INTEGER).prop_map(|i| Value::Number(i.into())),
            arb_string().prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map(arb_string(), inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Finite floats of all magnitudes, for Python mode.
    fn arb_float_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<f64>().prop_filter_map("finite", Number::from_f64),
            (-1e6f64..1e6).prop_filter_map("finite", Number::from_f64),
        ]
        .prop_map(Value::Number)
    }

    fn keys_sorted(v: &Value) -> bool {
        match v {
            Value::Array(items) => items.iter().all(keys_sorted),
            Value::Object(m) => {
                let keys: Vec<Vec<u32>> = m
                    .keys()
                    .map(|k| k.chars().map(u32::from).collect())
                    .collect();
                keys.windows(2).all(|w| w[0] < w[1]) && m.values().all(keys_sorted)
            }
            _ => true,
        }
    }

    proptest! {
        #[test]
        fn canonical_reparses_to_equal_value(v in arb_value()) {
            let text = to_canonical_string(&v).unwrap();
            prop_assert_eq!(parse_strict(&text).unwrap(), v.clone());
            // Same as serde_json reading it back.
            prop_assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), v);
        }

        #[test]
        fn encoding_is_idempotent(v in arb_value()) {
            for mode in [Strict, Python] {
                let once = encode(&v, mode).unwrap();
                let twice = encode(&parse_strict(&once).unwrap(), mode).unwrap();
                prop_assert_eq!(once, twice);
            }
        }

        #[test]
        fn keys_come_out_in_code_point_order(v in arb_value()) {
            let text = to_canonical_string(&v).unwrap();
            prop_assert!(keys_sorted(&parse_strict(&text).unwrap()));
            // No insignificant whitespace: re-encoding compact serde_json output
            // of the same value gives the same bytes.
            prop_assert_eq!(&text, &serde_json::to_string(&v).unwrap());
        }

        #[test]
        fn python_floats_round_trip(v in arb_float_value()) {
            let text = encode(&v, Python).unwrap();
            let back: f64 = text.parse().unwrap();
            prop_assert_eq!(back.to_bits(), v.as_f64().unwrap().to_bits());
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,40}") {
            let _ = parse_strict(&s);
        }
    }
}
