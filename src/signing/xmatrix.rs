//! X-Matrix request authentication: the `Authorization` header servers sign
//! their federation requests with.
//!
//! This module owns the header's grammar ([`parse`], and [`XMatrix`]'s
//! `Display` for the header we send), the JSON object a request signature
//! covers ([`request_json`]), and signing/verifying that object
//! ([`sign_request`], [`verify_request`]).
//!
//! It never looks up keys, reads clocks or touches the network: the caller
//! picks the origin's verify key for `x.key` and passes it in. It never
//! panics on any header text.
//!
//! # What is signed
//!
//! ```text
//! {"content": <parsed body, only if there is one>, "destination": "<receiver>",
//!  "method": "PUT", "origin": "<sender>", "uri": "/_matrix/federation/v1/send/1?x=y"}
//! ```
//!
//! `uri` is the request target exactly as sent (path plus `?query`), and the
//! names are server names before any delegation.
//!
//! # The header
//!
//! ```text
//! Authorization: X-Matrix origin="a.example",destination="b.example",key="ed25519:k1",sig="<base64>"
//! ```
//!
//! Parsing follows RFC 9110 §11.4 (`auth-scheme 1*SP #auth-param`) plus the
//! spec's compatibility note that unquoted values may contain `:`. Scheme and
//! parameter names are case-insensitive, parameters may come in any order,
//! spaces/tabs may surround commas and `=`, empty list elements are skipped
//! (RFC 9110 §5.6.1), unknown parameters are ignored. Everything else is an
//! error: duplicated or missing `origin`/`key`/`sig`, empty values,
//! unterminated quotes, characters outside the grammar (including any
//! non-ASCII byte), and junk after a value.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signature, VerifyingKey};
use serde_json::{Map, Value};

use super::canonical::{self, CanonicalError, NumberMode, write_string};
use super::{ED25519, SignError, SigningKey, decode_base64};

/// The parameters of an `Authorization: X-Matrix ...` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XMatrix {
    /// The sending server's name.
    pub origin: String,
    /// The receiving server's name. Senders must always include it (spec
    /// v1.3+), receivers must accept its absence.
    pub destination: Option<String>,
    /// The key ID the request was signed with, e.g. `ed25519:a_AbCd`.
    pub key: String,
    /// The signature, unpadded base64, as it appeared in the header.
    pub sig: String,
}

/// Why an X-Matrix header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XMatrixError {
    /// The scheme is not `X-Matrix` followed by a space.
    #[error("not an X-Matrix authorization header")]
    NotXMatrix,
    /// The parameter list breaks the grammar at byte offset `at`.
    #[error("malformed X-Matrix header at byte {at}: {reason}")]
    Syntax { at: usize, reason: &'static str },
    /// A quoted value has no closing `"`.
    #[error("malformed X-Matrix header: unterminated quoted value")]
    UnterminatedQuote,
    /// `origin`, `destination`, `key` or `sig` appears more than once.
    #[error("X-Matrix parameter `{0}` appears more than once")]
    DuplicateParam(&'static str),
    /// `origin`, `key` or `sig` is missing.
    #[error("X-Matrix header lacks the `{0}` parameter")]
    MissingParam(&'static str),
    /// A parameter has an empty value.
    #[error("X-Matrix parameter `{0}` is empty")]
    EmptyValue(String),
    /// The header names another server as destination (spec: reject with 401).
    #[error("request is addressed to {got:?}, not to us ({ours:?})")]
    WrongDestination { ours: String, got: String },
    /// The key ID is not an `ed25519:` key.
    #[error("unsupported signing key {0:?}: only ed25519 keys are supported")]
    UnsupportedKey(String),
    /// `sig` is not valid base64.
    #[error("X-Matrix signature is not valid base64")]
    BadBase64,
    /// The signature does not match the request.
    #[error("X-Matrix signature does not verify")]
    BadSignature,
    /// The request body cannot be canonical-encoded in the chosen mode.
    #[error("cannot check X-Matrix signature: {0}")]
    Canonical(#[from] CanonicalError),
}

// ---------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------

/// RFC 9110 `tchar`: the characters of a `token`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Characters allowed inside a quoted string (RFC 9110 `qdtext`, ASCII only)
/// and after a backslash (`quoted-pair`).
fn is_quotable(b: u8) -> bool {
    b == b'\t' || (0x20..=0x7e).contains(&b)
}

/// A cursor over the header bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    /// Skips optional whitespace (spaces and tabs).
    fn skip_ows(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.at += 1;
        }
    }

    fn syntax(&self, reason: &'static str) -> XMatrixError {
        XMatrixError::Syntax {
            at: self.at,
            reason,
        }
    }

    /// Reads `1*tchar` (plus `:` when `colon`); may return an empty slice.
    fn token(&mut self, colon: bool) -> &'a str {
        let start = self.at;
        while let Some(b) = self.peek() {
            if !(is_tchar(b) || (colon && b == b':')) {
                break;
            }
            self.at += 1;
        }
        // Only ASCII bytes were consumed, so this is valid UTF-8.
        let bytes: &'a [u8] = self.bytes;
        std::str::from_utf8(&bytes[start..self.at]).unwrap_or_default()
    }

    /// Reads a quoted string; the cursor is on the opening `"`.
    fn quoted(&mut self) -> Result<String, XMatrixError> {
        self.at += 1;
        let mut value = String::new();
        loop {
            match self.peek() {
                None => return Err(XMatrixError::UnterminatedQuote),
                Some(b'"') => {
                    self.at += 1;
                    return Ok(value);
                }
                Some(b'\\') => {
                    self.at += 1;
                    match self.peek() {
                        None => return Err(XMatrixError::UnterminatedQuote),
                        Some(b) if is_quotable(b) => value.push(char::from(b)),
                        Some(_) => return Err(self.syntax("invalid character after backslash")),
                    }
                }
                Some(b) if is_quotable(b) => value.push(char::from(b)),
                Some(_) => return Err(self.syntax("invalid character in quoted value")),
            }
            self.at += 1;
        }
    }
}

/// Parses the value of an `Authorization` header as X-Matrix credentials.
///
/// ```
/// use courier::signing::xmatrix::parse;
/// let x = parse(r#"X-Matrix origin="a.example",key="ed25519:k",sig="c2ln""#).unwrap();
/// assert_eq!((x.origin.as_str(), x.destination, x.key.as_str()), ("a.example", None, "ed25519:k"));
/// ```
pub fn parse(header_value: &str) -> Result<XMatrix, XMatrixError> {
    let (scheme, _) = header_value
        .split_once(' ')
        .ok_or(XMatrixError::NotXMatrix)?;
    if !scheme.eq_ignore_ascii_case("X-Matrix") {
        return Err(XMatrixError::NotXMatrix);
    }
    let mut cur = Cursor {
        bytes: header_value.as_bytes(),
        at: scheme.len(),
    };
    // `1*SP` after the scheme.
    while cur.peek() == Some(b' ') {
        cur.at += 1;
    }

    let (mut origin, mut destination, mut key, mut sig) = (None, None, None, None);
    loop {
        cur.skip_ows();
        match cur.peek() {
            None => break,
            Some(b',') => {
                // An empty list element: RFC 9110 says to accept and skip it.
                cur.at += 1;
                continue;
            }
            Some(_) => {}
        }
        let name = cur.token(false);
        if name.is_empty() {
            return Err(cur.syntax("expected a parameter name"));
        }
        let name = name.to_ascii_lowercase();
        cur.skip_ows();
        if cur.peek() != Some(b'=') {
            return Err(cur.syntax("expected `=` after the parameter name"));
        }
        cur.at += 1;
        cur.skip_ows();
        let value = if cur.peek() == Some(b'"') {
            cur.quoted()?
        } else {
            let token = cur.token(true);
            if token.is_empty() && matches!(cur.peek(), None | Some(b',' | b' ' | b'\t')) {
                return Err(XMatrixError::EmptyValue(name));
            }
            token.to_owned()
        };
        cur.skip_ows();
        match cur.peek() {
            None => {}
            Some(b',') => cur.at += 1,
            Some(_) => return Err(cur.syntax("expected `,` or the end after a parameter value")),
        }

        let slot = match name.as_str() {
            "origin" => (&mut origin, "origin"),
            "destination" => (&mut destination, "destination"),
            "key" => (&mut key, "key"),
            "sig" => (&mut sig, "sig"),
            _ => continue, // Unknown parameters are ignored.
        };
        if value.is_empty() {
            return Err(XMatrixError::EmptyValue(name));
        }
        if slot.0.replace(value).is_some() {
            return Err(XMatrixError::DuplicateParam(slot.1));
        }
    }
    Ok(XMatrix {
        origin: origin.ok_or(XMatrixError::MissingParam("origin"))?,
        destination,
        key: key.ok_or(XMatrixError::MissingParam("key"))?,
        sig: sig.ok_or(XMatrixError::MissingParam("sig"))?,
    })
}

impl FromStr for XMatrix {
    type Err = XMatrixError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s)
    }
}

/// Writes `value` as a quoted string, backslash-escaping `"` and `\`.
fn write_quoted(f: &mut fmt::Formatter<'_>, value: &str) -> fmt::Result {
    f.write_str("\"")?;
    let mut rest = value;
    while let Some(i) = rest.find(['"', '\\']) {
        f.write_str(&rest[..i])?;
        f.write_str("\\")?;
        f.write_str(&rest[i..=i])?;
        rest = &rest[i + 1..];
    }
    f.write_str(rest)?;
    f.write_str("\"")
}

/// The header value, in the form every server sends:
/// `X-Matrix origin="o",destination="d",key="ed25519:k",sig="..."`
/// (`destination` left out when `None`).
impl fmt::Display for XMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("X-Matrix origin=")?;
        write_quoted(f, &self.origin)?;
        if let Some(destination) = &self.destination {
            f.write_str(",destination=")?;
            write_quoted(f, destination)?;
        }
        f.write_str(",key=")?;
        write_quoted(f, &self.key)?;
        f.write_str(",sig=")?;
        write_quoted(f, &self.sig)
    }
}

// ---------------------------------------------------------------------------
// Signing and verifying
// ---------------------------------------------------------------------------

/// The JSON object a request signature covers. `content` is present only when
/// the request has a body.
pub fn request_json(
    method: &str,
    uri: &str,
    origin: &str,
    destination: &str,
    content: Option<&Value>,
) -> Map<String, Value> {
    let mut obj = Map::new();
    obj.insert("method".into(), method.into());
    obj.insert("uri".into(), uri.into());
    obj.insert("origin".into(), origin.into());
    obj.insert("destination".into(), destination.into());
    if let Some(content) = content {
        obj.insert("content".into(), content.clone());
    }
    obj
}

/// The canonical JSON of [`request_json`], written directly so the (possibly
/// large) body is never cloned. Keys in code-point order:
/// `content < destination < method < origin < uri`.
fn request_canonical(
    method: &str,
    uri: &str,
    origin: &str,
    destination: &str,
    content: Option<&Value>,
    mode: NumberMode,
) -> Result<String, CanonicalError> {
    let content = content.map(|c| canonical::encode(c, mode)).transpose()?;
    Ok(request_message(
        method,
        uri,
        origin,
        destination,
        content.as_deref(),
    ))
}

/// The signed message of a request whose body is already in canonical form
/// (`content`): the canonical JSON of [`request_json`], by concatenation.
fn request_message(
    method: &str,
    uri: &str,
    origin: &str,
    destination: &str,
    content: Option<&str>,
) -> String {
    // Room for everything: a transaction's body is hundreds of KiB, and growing
    // the string for the last few fields would copy all of it.
    let fields = fields_len(method, uri, origin, destination);
    let mut out = String::with_capacity(CONTENT_KEY.len() + content.map_or(0, str::len) + fields);
    out.push('{');
    if let Some(content) = content {
        out.push_str(CONTENT_KEY);
        out.push_str(content);
        out.push(',');
    }
    push_request_fields(&mut out, method, uri, origin, destination);
    out
}

/// At least the bytes [`push_request_fields`] writes (escapes aside), and the
/// punctuation around the content.
fn fields_len(method: &str, uri: &str, origin: &str, destination: &str) -> usize {
    method.len() + uri.len() + origin.len() + destination.len() + 64
}

/// `"content":`, the first member of a signed request with a body.
const CONTENT_KEY: &str = "\"content\":";

/// The members after `content`, in code-point order, and the closing brace.
fn push_request_fields(out: &mut String, method: &str, uri: &str, origin: &str, destination: &str) {
    for (i, (name, value)) in [
        ("destination", destination),
        ("method", method),
        ("origin", origin),
        ("uri", uri),
    ]
    .into_iter()
    .enumerate()
    {
        if i > 0 {
            out.push(',');
        }
        write_string(out, name);
        out.push(':');
        write_string(out, value);
    }
    out.push('}');
}

/// Signs a request and returns the `Authorization` header value.
///
/// `method` is upper-case, `uri` the request target (path and `?query`),
/// `origin`/`destination` server names before delegation, `content` the
/// JSON body if there is one.
pub fn sign_request(
    method: &str,
    uri: &str,
    origin: &str,
    destination: &str,
    content: Option<&Value>,
    key: &SigningKey,
    mode: NumberMode,
) -> Result<String, SignError> {
    let message = request_canonical(method, uri, origin, destination, content, mode)?;
    Ok(signed_header(origin, destination, key, &message))
}

/// The `Authorization` header value carrying `key`'s signature of `message`.
fn signed_header(origin: &str, destination: &str, key: &SigningKey, message: &str) -> String {
    XMatrix {
        origin: origin.to_owned(),
        destination: Some(destination.to_owned()),
        key: key.key_id(),
        sig: key.sign(message.as_bytes()),
    }
    .to_string()
}

/// Encodes `content` canonically and signs the request that carries it, in one
/// buffer: returns the body to send (the canonical bytes, a slice of the signed
/// message rather than a copy: canonical JSON is JSON) and the `Authorization`
/// header value. `size_hint` is the expected body size: a large body is written
/// into one allocation instead of a buffer regrown a dozen times (each growth of
/// a ~400 KiB transaction body touched fresh pages: page faults were a fifth of
/// the time spent preparing transactions).
#[allow(clippy::too_many_arguments)]
pub fn sign_request_with_body(
    method: &str,
    uri: &str,
    origin: &str,
    destination: &str,
    content: &Value,
    key: &SigningKey,
    mode: NumberMode,
    size_hint: usize,
) -> Result<(bytes::Bytes, String), SignError> {
    sign_request_writing(method, uri, origin, destination, key, size_hint, |out| {
        canonical::encode_into(out, content, mode)
    })
}

/// As [`sign_request_with_body`], with the body written by `write`, which must
/// append canonical JSON (the caller's promise: nothing here checks it).
pub fn sign_request_writing(
    method: &str,
    uri: &str,
    origin: &str,
    destination: &str,
    key: &SigningKey,
    size_hint: usize,
    write: impl FnOnce(&mut String) -> Result<(), CanonicalError>,
) -> Result<(bytes::Bytes, String), SignError> {
    let fields = fields_len(method, uri, origin, destination);
    let mut message = String::with_capacity(CONTENT_KEY.len() + size_hint + fields);
    message.push('{');
    message.push_str(CONTENT_KEY);
    let start = message.len();
    write(&mut message)?;
    let end = message.len();
    message.push(',');
    push_request_fields(&mut message, method, uri, origin, destination);
    let header = signed_header(origin, destination, key, &message);
    Ok((
        bytes::Bytes::from(message.into_bytes()).slice(start..end),
        header,
    ))
}

/// Checks a request's X-Matrix signature.
///
/// `key` is the origin's verify key for `x.key`, which the caller looked up
/// (and decided to trust). The signed object is rebuilt with *our* name as
/// destination; if the header names a different destination the request is
/// refused before any cryptography.
pub fn verify_request(
    x: &XMatrix,
    method: &str,
    uri: &str,
    our_name: &str,
    content: Option<&Value>,
    key: &VerifyingKey,
    mode: NumberMode,
) -> Result<(), XMatrixError> {
    let sig = check_header(x, our_name)?;
    let message = request_canonical(method, uri, &x.origin, our_name, content, mode)?;
    key.verify_strict(message.as_bytes(), &sig)
        .map_err(|_| XMatrixError::BadSignature)
}

/// A request body as received: its bytes and, if the caller built one, their parse.
#[derive(Debug, Clone, Copy)]
pub struct Body<'a> {
    pub raw: &'a [u8],
    /// Without it the bytes are parsed here, only if they are not the bytes signed.
    pub parsed: Option<&'a Value>,
}

/// As [`verify_request`], for a body as received: first against the body's own
/// bytes, then (if that fails) against the canonical encoding of its parse.
///
/// A sender that sends the canonical form it signed (courier does) verifies the
/// first way, without the body being encoded again. This is sound: the message
/// checked is `{"content":` + the raw bytes + a suffix built here from the
/// request, which equals the message the origin signed only if the origin signed
/// exactly the bytes that were parsed.
pub fn verify_request_body(
    x: &XMatrix,
    method: &str,
    uri: &str,
    our_name: &str,
    body: Option<Body<'_>>,
    key: &VerifyingKey,
    mode: NumberMode,
) -> Result<(), XMatrixError> {
    let sig = check_header(x, our_name)?;
    if let Some(raw) = body.and_then(|b| std::str::from_utf8(b.raw).ok()) {
        let message = request_message(method, uri, &x.origin, our_name, Some(raw));
        if key.verify_strict(message.as_bytes(), &sig).is_ok() {
            return Ok(());
        }
    }
    let tree;
    let parsed = match body {
        None => None,
        Some(Body {
            parsed: Some(p), ..
        }) => Some(p),
        Some(Body { raw, parsed: None }) => {
            // Not JSON a tree can hold (a lone surrogate, say): no canonical form,
            // so it cannot be what was signed.
            tree = serde_json::from_slice::<Value>(raw).map_err(|_| XMatrixError::BadSignature)?;
            Some(&tree)
        }
    };
    verify_request(x, method, uri, our_name, parsed, key, mode)
}

/// The header checks that need no cryptography; the signature's bytes.
fn check_header(x: &XMatrix, our_name: &str) -> Result<Signature, XMatrixError> {
    if let Some(destination) = &x.destination
        && destination != our_name
    {
        return Err(XMatrixError::WrongDestination {
            ours: our_name.to_owned(),
            got: destination.clone(),
        });
    }
    if !x
        .key
        .strip_prefix(ED25519)
        .is_some_and(|rest| rest.starts_with(':'))
    {
        return Err(XMatrixError::UnsupportedKey(x.key.clone()));
    }
    let sig = decode_base64(&x.sig).map_err(|_| XMatrixError::BadBase64)?;
    let sig: [u8; 64] = sig.try_into().map_err(|_| XMatrixError::BadSignature)?;
    Ok(Signature::from_bytes(&sig))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signing::canonical::encode;
    use proptest::prelude::*;
    use serde_json::json;

    fn x(origin: &str, destination: Option<&str>, key: &str, sig: &str) -> XMatrix {
        XMatrix {
            origin: origin.into(),
            destination: destination.map(Into::into),
            key: key.into(),
            sig: sig.into(),
        }
    }

    /// Parses `header`, expecting `Ok(XMatrix)` or `Err(error)`.
    fn check(header: &str, expected: Result<XMatrix, XMatrixError>) {
        assert_eq!(parse(header), expected, "header {header:?}");
    }

    #[test]
    fn parses_valid_headers() {
        let full = || Ok(x("o.example", Some("d.example"), "ed25519:k1", "c2ln"));
        let no_dest = || Ok(x("o.example", None, "ed25519:k1", "c2ln"));
        let table = [
            (
                r#"X-Matrix origin="o.example",destination="d.example",key="ed25519:k1",sig="c2ln""#,
                full(),
            ),
            // Order, case of scheme and names, unquoted tokens with ':'.
            (
                r#"X-Matrix sig="c2ln",key="ed25519:k1",destination="d.example",origin="o.example""#,
                full(),
            ),
            (
                r#"x-matrix ORIGIN="o.example",Destination="d.example",kEy="ed25519:k1",SIG="c2ln""#,
                full(),
            ),
            (
                "X-MATRIX origin=o.example,destination=d.example,key=ed25519:k1,sig=c2ln",
                full(),
            ),
            // Whitespace: several spaces after the scheme, spaces/tabs around commas and '='.
            (
                "X-Matrix    origin=\"o.example\" ,\tdestination=\"d.example\"\t, key=\"ed25519:k1\",  sig=\"c2ln\"",
                full(),
            ),
            (
                "X-Matrix origin = \"o.example\",destination\t=\td.example,key=ed25519:k1,sig=c2ln ",
                full(),
            ),
            // Empty list elements and a trailing comma.
            (
                "X-Matrix ,origin=o.example,,destination=d.example, ,key=ed25519:k1,sig=c2ln,",
                full(),
            ),
            // Unknown parameters are ignored, even repeated or empty-quoted.
            (
                r#"X-Matrix foo=bar,origin="o.example",foo="x",key="ed25519:k1",bar="",sig="c2ln""#,
                no_dest(),
            ),
            // Backslash escapes inside quotes.
            (
                r#"X-Matrix origin="o\.example",key="ed25519:k1",sig="c2ln""#,
                no_dest(),
            ),
            (
                r#"X-Matrix origin="a\"b\\c",key="ed25519:k 1",sig="c2ln==""#,
                Ok(x(r#"a"b\c"#, None, "ed25519:k 1", "c2ln==")),
            ),
            (
                r#"X-Matrix origin=",,=",key="k",sig="s""#,
                Ok(x(",,=", None, "k", "s")),
            ),
            (
                r#"X-Matrix origin="o:8448",key=k,sig=s"#,
                Ok(x("o:8448", None, "k", "s")),
            ),
        ];
        for (header, want) in table {
            check(header, want);
        }
    }

    #[test]
    fn rejects_malformed_headers() {
        use XMatrixError::*;
        let syntax = |at, reason| Err(Syntax { at, reason });
        let table: Vec<(&str, Result<XMatrix, XMatrixError>)> = vec![
            ("", Err(NotXMatrix)),
            ("X-Matrix", Err(NotXMatrix)),
            ("Bearer abc", Err(NotXMatrix)),
            ("X-Matrixorigin=o", Err(NotXMatrix)),
            ("X-Matrix\torigin=o,key=k,sig=s", Err(NotXMatrix)),
            (" X-Matrix origin=o,key=k,sig=s", Err(NotXMatrix)),
            ("X-Matrix ", Err(MissingParam("origin"))),
            ("X-Matrix key=k,sig=s", Err(MissingParam("origin"))),
            ("X-Matrix origin=o,sig=s", Err(MissingParam("key"))),
            ("X-Matrix origin=o,key=k", Err(MissingParam("sig"))),
            (
                "X-Matrix origin=o,key=k,sig=s,origin=o",
                Err(DuplicateParam("origin")),
            ),
            (
                "X-Matrix origin=o,key=k,sig=s,SIG=s",
                Err(DuplicateParam("sig")),
            ),
            (
                "X-Matrix origin=o,key=k,Key=\"k\",sig=s",
                Err(DuplicateParam("key")),
            ),
            (
                "X-Matrix destination=a,origin=o,destination=a,key=k,sig=s",
                Err(DuplicateParam("destination")),
            ),
            (
                "X-Matrix origin=\"\",key=k,sig=s",
                Err(EmptyValue("origin".into())),
            ),
            (
                "X-Matrix origin=,key=k,sig=s",
                Err(EmptyValue("origin".into())),
            ),
            (
                "X-Matrix origin=o,key=k,sig=",
                Err(EmptyValue("sig".into())),
            ),
            (
                "X-Matrix origin=o,key=k,sig= ,",
                Err(EmptyValue("sig".into())),
            ),
            ("X-Matrix origin=\"o,key=k,sig=s", Err(UnterminatedQuote)),
            ("X-Matrix origin=o,key=k,sig=\"s\\", Err(UnterminatedQuote)),
            (
                "X-Matrix origin=o,key=k,sig=\"s\\\"",
                Err(UnterminatedQuote),
            ),
            (
                "X-Matrix origin=o key=k,sig=s",
                syntax(18, "expected `,` or the end after a parameter value"),
            ),
            (
                "X-Matrix origin=\"o\"x,key=k,sig=s",
                syntax(19, "expected `,` or the end after a parameter value"),
            ),
            (
                "X-Matrix origin=o/p,key=k,sig=s",
                syntax(17, "expected `,` or the end after a parameter value"),
            ),
            (
                "X-Matrix origin,key=k,sig=s",
                syntax(15, "expected `=` after the parameter name"),
            ),
            (
                "X-Matrix abc",
                syntax(12, "expected `=` after the parameter name"),
            ),
            (
                "X-Matrix =o,key=k,sig=s",
                syntax(9, "expected a parameter name"),
            ),
            (
                "X-Matrix origin=o;key=k,sig=s",
                syntax(17, "expected `,` or the end after a parameter value"),
            ),
            (
                "X-Matrix origin=\"ö\",key=k,sig=s",
                syntax(17, "invalid character in quoted value"),
            ),
            (
                "X-Matrix origin=\"o\nx\",key=k,sig=s",
                syntax(18, "invalid character in quoted value"),
            ),
            (
                "X-Matrix origin=\"o\\\u{1}\",key=k,sig=s",
                syntax(19, "invalid character after backslash"),
            ),
            (
                "X-Matrix origin=ö,key=k,sig=s",
                syntax(16, "expected `,` or the end after a parameter value"),
            ),
            (
                "X-Matrix origin=o,key=k,sig=s, Bearer x",
                syntax(38, "expected `=` after the parameter name"),
            ),
            (
                "X-Matrix origin=o,key=k,sig=s\r\n",
                syntax(29, "expected `,` or the end after a parameter value"),
            ),
        ];
        for (header, want) in table {
            check(header, want);
        }
    }

    #[test]
    fn display_is_the_canonical_header_form() {
        let h = x("o.example", Some("d.example"), "ed25519:k1", "c2ln");
        assert_eq!(
            h.to_string(),
            r#"X-Matrix origin="o.example",destination="d.example",key="ed25519:k1",sig="c2ln""#
        );
        let h = x(r#"a"b\c"#, None, "ed25519:k1", "c2ln");
        assert_eq!(
            h.to_string(),
            r#"X-Matrix origin="a\"b\\c",key="ed25519:k1",sig="c2ln""#
        );
        assert_eq!(parse(&h.to_string()), Ok(h));
    }

    /// The X-Matrix vectors in matrix-notes.md §5.5 (spec seed, key `ed25519:1`).
    #[test]
    fn notes_request_vectors() {
        let key = crate::signing::tests::spec_key();
        let body = json!({"origin": "domain", "origin_server_ts": 1000000, "pdus": [], "edus": [{
            "edu_type": "m.direct_to_device",
            "content": {"message_id": "m1", "sender": "@a:domain", "type": "m.test",
                        "messages": {"@b:remote.example": {"*": {"k": "v"}}}}}]});
        let cases = [
            (
                "PUT",
                "/_matrix/federation/v1/send/txn1",
                Some(&body),
                r#"{"content":{"edus":[{"content":{"message_id":"m1","messages":{"@b:remote.example":{"*":{"k":"v"}}},"sender":"@a:domain","type":"m.test"},"edu_type":"m.direct_to_device"}],"origin":"domain","origin_server_ts":1000000,"pdus":[]},"destination":"remote.example","method":"PUT","origin":"domain","uri":"/_matrix/federation/v1/send/txn1"}"#,
                "nIpgKr4cXBt7MAkXkifMGccLhY8t9aqKrXWyiic9tJ1nB1BHksITEtMQU7ODhog3Memb55cXZlScQLnGz8s5BA",
            ),
            (
                "GET",
                "/_matrix/federation/v1/version",
                None,
                r#"{"destination":"remote.example","method":"GET","origin":"domain","uri":"/_matrix/federation/v1/version"}"#,
                "wR1E4UZ3G3F2knf0x+RNgxQ2N/hCiZ/ZdOktAey0wSvTWc/nHH8YPJaOvRhipwX46AZPntLZhHd0DFjZ7H7iDQ",
            ),
        ];
        for (method, uri, content, canonical_text, sig) in cases {
            let obj = request_json(method, uri, "domain", "remote.example", content);
            assert_eq!(
                encode(&Value::Object(obj), NumberMode::Strict).unwrap(),
                canonical_text
            );
            assert_eq!(
                request_canonical(
                    method,
                    uri,
                    "domain",
                    "remote.example",
                    content,
                    NumberMode::Strict
                )
                .unwrap(),
                canonical_text
            );
            let header = sign_request(
                method,
                uri,
                "domain",
                "remote.example",
                content,
                &key,
                NumberMode::Strict,
            )
            .unwrap();
            assert_eq!(
                header,
                format!(
                    r#"X-Matrix origin="domain",destination="remote.example",key="ed25519:1",sig="{sig}""#
                )
            );
            // Encoding and signing in one buffer gives the very same header, and
            // the body to send is the canonical encoding.
            if let Some(content) = content {
                let (body, same) = sign_request_with_body(
                    method,
                    uri,
                    "domain",
                    "remote.example",
                    content,
                    &key,
                    NumberMode::Strict,
                    0,
                )
                .unwrap();
                assert_eq!(same, header);
                assert_eq!(
                    body,
                    encode(content, NumberMode::Strict).unwrap().as_bytes()
                );
            }
            let parsed = parse(&header).unwrap();
            let vk = key.verifying_key();
            verify_request(
                &parsed,
                method,
                uri,
                "remote.example",
                content,
                &vk,
                NumberMode::Strict,
            )
            .unwrap();
        }
    }

    #[test]
    fn received_bodies_verify_by_their_bytes_or_by_their_parse() {
        let key = crate::signing::tests::spec_key();
        let vk = key.verifying_key();
        let content = json!({"b": [1, 2.5, "\u{e9}"], "a": {"z": null, "y": true}});
        let header = sign_request(
            "PUT",
            "/s/1",
            "o.example",
            "us.example",
            Some(&content),
            &key,
            NumberMode::Python,
        )
        .unwrap();
        let x = parse(&header).unwrap();
        // `with_parse`: the caller hands its parse of the body over, or not (then
        // the bytes are parsed only when they are not the bytes signed).
        let verify = |raw: &str, with_parse: bool| {
            let parsed: Option<Value> = with_parse.then(|| serde_json::from_str(raw).unwrap());
            let body = Body {
                raw: raw.as_bytes(),
                parsed: parsed.as_ref(),
            };
            verify_request_body(
                &x,
                "PUT",
                "/s/1",
                "us.example",
                Some(body),
                &vk,
                NumberMode::Python,
            )
        };
        let check = |raw: &str| verify(raw, true);
        let unparsed = |raw: &str| verify(raw, false);
        // The canonical bytes (what courier sends), checked as they are.
        let canonical = encode(&content, NumberMode::Python).unwrap();
        assert_eq!(check(&canonical), Ok(()));
        // Another spelling of the same JSON: checked through its canonical form.
        let spaced = serde_json::to_string_pretty(&content).unwrap();
        assert_ne!(spaced, canonical);
        assert_eq!(check(&spaced), Ok(()));
        // Other content fails both ways.
        assert_eq!(
            check(r#"{"a":{"y":true,"z":null},"b":[1,2.5,"e"]}"#),
            Err(XMatrixError::BadSignature)
        );
        // Without a parse from the caller: the same answers.
        assert_eq!(unparsed(&canonical), Ok(()));
        assert_eq!(unparsed(&spaced), Ok(()));
        assert_eq!(
            unparsed(r#"{"a":{"y":true,"z":null},"b":[1,2.5,"e"]}"#),
            Err(XMatrixError::BadSignature)
        );
        assert_eq!(
            unparsed(r#"{"a":"\ud800"}"#),
            Err(XMatrixError::BadSignature)
        );
        // So does the right content for another request target.
        let parsed: Value = serde_json::from_str(&canonical).unwrap();
        let body = Body {
            raw: canonical.as_bytes(),
            parsed: Some(&parsed),
        };
        assert_eq!(
            verify_request_body(
                &x,
                "PUT",
                "/s/2",
                "us.example",
                Some(body),
                &vk,
                NumberMode::Python
            ),
            Err(XMatrixError::BadSignature)
        );
    }

    #[test]
    fn verification_errors() {
        let key = crate::signing::tests::spec_key();
        let vk = key.verifying_key();
        let body = json!({"a": 1.5});
        let header = sign_request(
            "PUT",
            "/p?q=1",
            "o.example",
            "us.example",
            Some(&body),
            &key,
            NumberMode::Python,
        )
        .unwrap();
        let good = parse(&header).unwrap();
        let verify = |x: &XMatrix, method: &str, uri: &str, ours: &str, content: Option<&Value>| {
            verify_request(x, method, uri, ours, content, &vk, NumberMode::Python)
        };
        assert_eq!(
            verify(&good, "PUT", "/p?q=1", "us.example", Some(&body)),
            Ok(())
        );

        // Without a destination parameter the signature still covers our name.
        let no_dest = XMatrix {
            destination: None,
            ..good.clone()
        };
        assert_eq!(
            verify(&no_dest, "PUT", "/p?q=1", "us.example", Some(&body)),
            Ok(())
        );
        assert_eq!(
            verify(&no_dest, "PUT", "/p?q=1", "them.example", Some(&body)),
            Err(XMatrixError::BadSignature)
        );

        use XMatrixError::*;
        assert_eq!(
            verify(&good, "PUT", "/p?q=1", "them.example", Some(&body)),
            Err(WrongDestination {
                ours: "them.example".into(),
                got: "us.example".into()
            })
        );
        for (method, uri, content) in [
            ("POST", "/p?q=1", Some(&body)),
            ("PUT", "/p?q=2", Some(&body)),
            ("PUT", "/p", Some(&body)),
            ("PUT", "/p?q=1", None),
            ("PUT", "/p?q=1", Some(&json!({"a": 1.25}))),
        ] {
            assert_eq!(
                verify(&good, method, uri, "us.example", content),
                Err(BadSignature),
                "{method} {uri}"
            );
        }
        let bad = |f: &dyn Fn(&mut XMatrix)| {
            let mut x = good.clone();
            f(&mut x);
            verify(&x, "PUT", "/p?q=1", "us.example", Some(&body))
        };
        assert_eq!(
            bad(&|x| x.origin = "evil.example".into()),
            Err(BadSignature)
        );
        assert_eq!(bad(&|x| x.sig = "!!".into()), Err(BadBase64));
        assert_eq!(bad(&|x| x.sig = "c2ln".into()), Err(BadSignature));
        assert_eq!(
            bad(&|x| x.key = "curve25519:1".into()),
            Err(UnsupportedKey("curve25519:1".into()))
        );
        assert_eq!(
            bad(&|x| x.key = "ed25519".into()),
            Err(UnsupportedKey("ed25519".into()))
        );
        // Strict mode refuses the float body it cannot encode.
        assert!(matches!(
            verify_request(
                &good,
                "PUT",
                "/p?q=1",
                "us.example",
                Some(&body),
                &vk,
                NumberMode::Strict
            ),
            Err(Canonical(CanonicalError::NotAnInteger(_)))
        ));
    }

    proptest! {
        #[test]
        fn display_parse_round_trip(
            origin in "[\\x20-\\x7e\\t]{1,24}",
            destination in proptest::option::of("[\\x20-\\x7e\\t]{1,24}"),
            key in "[\\x20-\\x7e\\t]{1,24}",
            sig in "[\\x20-\\x7e\\t]{1,24}",
        ) {
            let h = XMatrix { origin, destination, key, sig };
            prop_assert_eq!(parse(&h.to_string()), Ok(h));
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,60}") {
            let _ = parse(&s);
            let _ = parse(&format!("X-Matrix {s}"));
        }

        #[test]
        fn request_canonical_matches_encode(
            method in "[A-Z]{1,7}",
            uri in "/\\PC{0,30}",
            origin in "\\PC{1,12}",
            destination in "\\PC{1,12}",
            content in proptest::option::of(crate::signing::canonical::tests::arb_value()),
        ) {
            for mode in [NumberMode::Strict, NumberMode::Python] {
                let direct = request_canonical(&method, &uri, &origin, &destination, content.as_ref(), mode).unwrap();
                let via_map = encode(&Value::Object(request_json(&method, &uri, &origin, &destination, content.as_ref())), mode).unwrap();
                prop_assert_eq!(direct, via_map);
            }
        }
    }
}
