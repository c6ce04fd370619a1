//! An inbound `/send` body, read in place.
//!
//! Owns the transaction's top level: `origin`, `pdus` and `edus`, read as slices of
//! the received bytes, without a `serde_json::Value` tree (a transaction of 100
//! coalesced EDUs carries hundreds of messages; building, walking and dropping a tree
//! of them cost more than reading them). A body the in-place reading refuses is read
//! again as a tree, only to answer what a tree reading answers: `M_NOT_JSON` for what
//! is not JSON, then (after authentication) `M_BAD_JSON` for a wrong shape. A valid
//! body the in-place reading refuses (a member given twice) is written back from
//! its tree, which keeps the last of each, and read in place from that.
//! It never authenticates, and never looks inside a PDU or an EDU beyond a PDU's
//! `event_id` (see `edu`).

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

use crate::error::ApiError;

/// A transaction's members that courier reads; others are ignored.
#[derive(Debug, Deserialize)]
pub struct Transaction<'a> {
    #[serde(borrow)]
    pub origin: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub pdus: Vec<&'a RawValue>,
    #[serde(borrow, default)]
    pub edus: Vec<&'a RawValue>,
}

/// A received body as far as it could be read before authentication.
pub enum Received<'a> {
    /// Read in place.
    InPlace(Transaction<'a>),
    /// JSON the in-place reading refused: its tree.
    Tree(Value),
}

impl<'a> Received<'a> {
    /// Reads `body`; `M_NOT_JSON` if it is not JSON at all.
    pub fn read(body: &'a [u8]) -> Result<Self, ApiError> {
        match serde_json::from_slice::<Transaction<'a>>(body) {
            // Skipping what it does not read, the in-place reading has no depth
            // limit: content nested deeper than a tree holds is left to the EDU
            // reading, which drops that message alone. (Refusing the transaction for
            // it would wedge the origin's queue: it retries the same one for good.)
            Ok(t) => Ok(Received::InPlace(t)),
            Err(_) => serde_json::from_slice(body)
                .map(Received::Tree)
                .map_err(|e| ApiError::not_json(format!("body is not JSON: {e}"))),
        }
    }

    /// The tree, for verifying a signature over a body that is not the bytes signed.
    pub fn tree(&self) -> Option<&Value> {
        match self {
            Received::InPlace(_) => None,
            Received::Tree(v) => Some(v),
        }
    }
}

/// The transaction of a body whose request `signer` signed, with the Matrix error
/// for what courier does not take: `M_BAD_JSON` for what is not an object, 403
/// `M_FORBIDDEN` for an `origin` that is not the signer, then `M_BAD_JSON` for
/// `pdus` or `edus` that are not arrays (the order a tree reading checks them in).
/// `rewritten` holds the bytes of a body written back from its tree.
pub fn authenticated<'b>(
    received: Received<'b>,
    signer: &str,
    rewritten: &'b mut String,
) -> Result<Transaction<'b>, ApiError> {
    let tree = match received {
        Received::InPlace(t) => {
            check_origin(t.origin.as_deref(), signer)?;
            return Ok(t);
        }
        Received::Tree(tree) => tree,
    };
    let obj = tree
        .as_object()
        .ok_or_else(|| ApiError::bad_json("transaction is not an object"))?;
    check_origin(obj.get("origin").and_then(Value::as_str), signer)?;
    for field in ["pdus", "edus"] {
        if obj.get(field).is_some_and(|v| !v.is_array()) {
            return Err(ApiError::bad_json(format!("`{field}` is not an array")));
        }
    }
    *rewritten = serde_json::to_string(&tree).map_err(ApiError::internal)?;
    serde_json::from_str(rewritten)
        .map_err(|e| ApiError::bad_json(format!("transaction could not be read: {e}")))
}

/// A transaction's `origin` must be the server that signed the request (403 otherwise).
pub fn check_origin(origin: Option<&str>, signer: &str) -> Result<(), ApiError> {
    if origin != Some(signer) {
        return Err(ApiError::forbidden(
            "transaction origin does not match the signing server",
        ));
    }
    Ok(())
}

/// A PDU's `event_id`, if it is an object with a string one.
pub fn pdu_event_id(pdu: &RawValue) -> Option<Cow<'_, str>> {
    #[derive(Deserialize)]
    struct Pdu<'a> {
        #[serde(borrow)]
        event_id: Option<Cow<'a, str>>,
    }
    serde_json::from_str::<Pdu>(pdu.get()).ok()?.event_id
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    type Outcome = Result<(Vec<Value>, Vec<Value>), &'static str>;

    /// What reading the body as a tree answers (courier's reading before this
    /// module): the PDUs and EDUs, or the error code.
    fn by_tree(body: &str, signer: &str) -> Outcome {
        let v: Value = serde_json::from_str(body).map_err(|_| "M_NOT_JSON")?;
        let obj = v.as_object().ok_or("M_BAD_JSON")?;
        if obj.get("origin").and_then(Value::as_str) != Some(signer) {
            return Err("M_FORBIDDEN");
        }
        let list = |f: &str| match obj.get(f) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => Ok(a.clone()),
            Some(_) => Err("M_BAD_JSON"),
        };
        Ok((list("pdus")?, list("edus")?))
    }

    fn by_reader(body: &str, signer: &str) -> Outcome {
        let received = Received::read(body.as_bytes()).map_err(|e| e.errcode)?;
        let mut rewritten = String::new();
        let t = authenticated(received, signer, &mut rewritten).map_err(|e| e.errcode)?;
        let values = |l: &[&RawValue]| -> Vec<Value> {
            l.iter()
                .map(|r| serde_json::from_str(r.get()).unwrap())
                .collect()
        };
        Ok((values(&t.pdus), values(&t.edus)))
    }

    #[test]
    fn answers_what_a_tree_reading_answers() {
        for body in [
            r#"{"origin":"o.test","pdus":[],"edus":[{"edu_type":"m.typing","content":{}}]}"#,
            r#"{"origin":"o.t\u0065st","edus":[1,"x",null,{"a":[1,2.5]}],"origin_server_ts":5}"#,
            r#" { "edus" : [ { "edu_type" : "m.x" } ] , "origin" : "o.test" } "#,
            r#"{"origin":"o.test","edus":[],"edus":[{"edu_type":"last"}]}"#,
            r#"{"origin":"o.test","pdus":[{"event_id":"$1"}],"origin":"o.test"}"#,
            r#"{"origin":"evil.test","edus":[]}"#,
            r#"{"origin":5,"edus":[{"edu_type":"x"}]}"#,
            r#"{"origin":5,"edus":{}}"#,
            r#"{"origin":"evil.test","edus":{}}"#,
            r#"{"origin":"o.test","edus":{}}"#,
            r#"{"origin":"o.test","pdus":null}"#,
            r#"{"origin":null}"#,
            r#"{}"#,
            r#"[]"#,
            r#""text""#,
            r#"{"edus":[}"#,
            r#"{"origin":"o.test","edus":[]} x"#,
        ] {
            assert_eq!(by_reader(body, "o.test"), by_tree(body, "o.test"), "{body}");
        }
        // Nesting around the tree's limit, at the top: not a transaction either way.
        for levels in 120..140 {
            let body = format!("{}{}", "[".repeat(levels), "]".repeat(levels));
            assert_eq!(
                by_reader(&body, "o.test"),
                by_tree(&body, "o.test"),
                "{levels}"
            );
        }
    }

    #[test]
    fn nesting_a_tree_cannot_hold_is_left_to_the_edu_reading() {
        // Inside an EDU, 1000 levels (Python's parser, Synapse's, holds them): the
        // transaction is read, its EDUs as received; a tree reading refuses it.
        let (open, close) = ("[".repeat(1000), "]".repeat(1000));
        let deep = format!("{open}1{close}");
        let body = format!(r#"{{"origin":"o.test","edus":[{{"s":"[[[\"{{{{"}},{deep}]}}"#);
        assert!(by_tree(&body, "o.test").is_err());
        let received = Received::read(body.as_bytes()).unwrap();
        let mut rewritten = String::new();
        let t = authenticated(received, "o.test", &mut rewritten).unwrap();
        assert_eq!(t.edus.len(), 2);
        assert_eq!(t.edus[1].get(), deep);
    }

    #[test]
    fn values_a_tree_cannot_hold_are_left_to_the_edu_reading() {
        // Valid JSON grammar, refused by a tree: read in place, so only the EDU
        // that holds it is dropped (by `inbound`), not the whole transaction.
        for body in [r#"{"edus":["\ud800",{}]}"#, r#"{"edus":[1e400,{}]}"#] {
            assert!(serde_json::from_str::<Value>(body).is_err());
            let Ok(Received::InPlace(t)) = Received::read(body.as_bytes()) else {
                panic!("{body} not read in place");
            };
            assert_eq!(t.edus.len(), 2);
        }
    }

    #[test]
    fn a_usual_body_is_read_in_place() {
        let body = json!({"origin": "o.test", "origin_server_ts": 1, "pdus": [], "edus": [{"edu_type": "m.x", "content": {"k": "v"}}]}).to_string();
        let Ok(Received::InPlace(t)) = Received::read(body.as_bytes()) else {
            panic!("not read in place");
        };
        assert_eq!(t.origin.as_deref(), Some("o.test"));
        assert_eq!(t.edus[0].get(), r#"{"content":{"k":"v"},"edu_type":"m.x"}"#);
    }

    #[test]
    fn event_ids_of_pdus() {
        fn r(s: &str) -> &RawValue {
            serde_json::from_str(s).unwrap()
        }
        assert_eq!(
            pdu_event_id(r(r#"{"event_id":"$a","x":1}"#)).as_deref(),
            Some("$a")
        );
        assert_eq!(pdu_event_id(r(r#"{"event_id":5}"#)), None);
        assert_eq!(pdu_event_id(r(r#"[1]"#)), None);
        assert_eq!(pdu_event_id(r(r#"{}"#)), None);
    }
}
