//! A request body read without owning it: [`Json`] is the shape of a parsed JSON
//! value whose strings borrow from the body where they hold no escape, and whose
//! objects are sorted vectors, not maps.
//!
//! Owns one equivalence: writing a [`Json`] back (`serde_json::to_string`, or
//! `to_raw_value`) gives exactly the bytes that parsing the same text into a
//! `serde_json::Value` and writing that would give: members in key order, the last
//! of a repeated key kept, numbers and string escapes as `serde_json` spells them.
//! The parse is `serde_json`'s own (same errors, same recursion limit); only the
//! tree it builds is cheaper: `sendToDevice` rewrites every content this way, and a
//! `Value` per content cost an owned string per key and a map node per object. A
//! property test checks the equivalence against `Value`. It never validates what a
//! value means; callers do.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::Number;

/// A parsed JSON value borrowing from the text it was read from.
#[derive(Debug, Clone, PartialEq)]
pub enum Json<'a> {
    Null,
    Bool(bool),
    Number(Number),
    String(Cow<'a, str>),
    Array(Vec<Json<'a>>),
    /// Members sorted by key (byte order), each key once (the last one read).
    Object(Vec<(Cow<'a, str>, Json<'a>)>),
}

impl<'a> Json<'a> {
    /// The members, if this is an object.
    pub fn as_object(&self) -> Option<&[(Cow<'a, str>, Json<'a>)]> {
        match self {
            Json::Object(m) => Some(m),
            _ => None,
        }
    }

    /// Takes the member `key` out of an object.
    pub fn take(&mut self, key: &str) -> Option<Json<'a>> {
        let Json::Object(m) = self else {
            return None;
        };
        let at = m.binary_search_by(|(k, _)| k.as_ref().cmp(key)).ok()?;
        Some(m.remove(at).1)
    }
}

impl<'de> Deserialize<'de> for Json<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any valid JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Json<'de>, E> {
        Ok(Json::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Json<'de>, E> {
        Ok(Json::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Json<'de>, E> {
        Ok(Json::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Json<'de>, E> {
        // As `Value` does: a number that is not finite becomes null.
        Ok(Number::from_f64(v).map_or(Json::Null, Json::Number))
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Json<'de>, E> {
        Ok(Json::String(Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Json<'de>, E> {
        Ok(Json::String(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E>(self, v: String) -> Result<Json<'de>, E> {
        Ok(Json::String(Cow::Owned(v)))
    }

    fn visit_none<E>(self) -> Result<Json<'de>, E> {
        Ok(Json::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Json<'de>, D::Error> {
        Json::deserialize(d)
    }

    fn visit_unit<E>(self) -> Result<Json<'de>, E> {
        Ok(Json::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json<'de>, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Json::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json<'de>, A::Error> {
        let mut read: Vec<(Cow<'de, str>, Json<'de>)> = Vec::new();
        while let Some(Key(k)) = map.next_key()? {
            read.push((k, map.next_value()?));
        }
        // A stable sort keeps a repeated key's occurrences in reading order; of each
        // run the last one read stays (swapped into the kept slot), as a map keeps it.
        read.sort_by(|a, b| a.0.cmp(&b.0));
        read.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                std::mem::swap(later, kept);
            }
            same
        });
        Ok(Json::Object(read))
    }
}

/// An object key, borrowed when it holds no escape.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

impl Serialize for Json<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Json::Null => s.serialize_unit(),
            Json::Bool(b) => s.serialize_bool(*b),
            Json::Number(n) => n.serialize(s),
            Json::String(v) => s.serialize_str(v),
            Json::Array(items) => items.serialize(s),
            Json::Object(members) => {
                let mut m = s.serialize_map(Some(members.len()))?;
                for (k, v) in members {
                    m.serialize_entry(k.as_ref(), v)?;
                }
                m.end()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    /// What writing `text` back gives through `Json` and through `Value`.
    fn both(text: &str) -> (Result<String, String>, Result<String, String>) {
        let ours = serde_json::from_str::<Json>(text)
            .map(|j| serde_json::to_string(&j).expect("writes"))
            .map_err(|e| e.to_string());
        let tree = serde_json::from_str::<Value>(text)
            .map(|v| serde_json::to_string(&v).expect("writes"))
            .map_err(|e| e.to_string());
        (ours, tree)
    }

    #[test]
    fn writes_what_a_value_writes() {
        for text in [
            r#"{"ts":1,"id":2,"pad":"xx"}"#,
            r#"{"a":1,"b":2,"a":3}"#,
            r#"{"é":"\u00e9\/\n\"","e":"\ud83d\ude00","a":[1,-2,3.50,1e16,1E+2,-0,0.0]}"#,
            r#"{"big":18446744073709551616,"neg":-9223372036854775809,"f":1.7976931348623157e308}"#,
            r#" { "nested" : { "z" : null , "y" : [ true , false , { } , [ ] ] } } "#,
            r#"{"k":"v""#,
            r#"{"k":1e400}"#,
            r#"[{"b":1,"a":2},"s"]"#,
            "\"lone \\ud800 surrogate\"",
        ] {
            let (ours, tree) = both(text);
            assert_eq!(ours, tree, "{text}");
        }
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let (ours, tree) = both(&deep);
        assert!(ours.is_err());
        assert_eq!(ours, tree);
    }

    #[test]
    fn take_removes_a_member() {
        let mut j: Json = serde_json::from_str(r#"{"b":2,"a":1,"b":3}"#).unwrap();
        assert_eq!(j.take("b"), Some(Json::Number(3.into())));
        assert_eq!(j.take("b"), None);
        assert_eq!(serde_json::to_string(&j).unwrap(), r#"{"a":1}"#);
    }

    fn json_text() -> impl Strategy<Value = String> {
        let key = prop_oneof![
            Just("a".to_owned()),
            Just("b".to_owned()),
            Just("\\u0061".to_owned()),
            "[a-c\\\\\"é]{0,3}".prop_map(|s| s.replace('\\', "\\\\").replace('"', "\\\"")),
        ];
        let leaf = prop_oneof![
            Just("null".to_owned()),
            Just("true".to_owned()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<u64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|f| format!("{f:e}")),
            Just("-0".to_owned()),
            Just("1.50".to_owned()),
            "[ -~é]{0,6}"
                .prop_map(|s| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\u0022"))),
        ];
        leaf.prop_recursive(4, 32, 5, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4)
                    .prop_map(|v| format!("[{}]", v.join(" , "))),
                prop::collection::vec((key.clone(), inner), 0..5).prop_map(|m| {
                    let members: Vec<String> =
                        m.into_iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
                    format!("{{ {} }}", members.join(","))
                }),
            ]
        })
    }

    proptest! {
        #[test]
        fn writing_back_matches_value(text in json_text()) {
            let (ours, tree) = both(&text);
            prop_assert_eq!(ours, tree);
        }
    }
}
