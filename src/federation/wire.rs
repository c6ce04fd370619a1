//! A transaction's EDUs as canonical JSON text, written from the queued rows.
//!
//! Owns the fast path from queued `m.direct_to_device` rows to the bytes a
//! transaction carries (and signs): each row is read once without building a tree
//! ([`Stored`], message contents kept as the stored bytes), which also gives
//! coalescing its [`Peek`]; each group of [`edu::group`] is then written by
//! concatenation: a lone row as it is stored, several as one EDU whose `messages`
//! are the union of theirs and whose `message_id` is derived from theirs.
//!
//! Stored rows are canonical JSON but for one thing: `serde_json` wrote them (keys
//! sorted, no spaces, the same string escapes), and it spells some non-integral
//! numbers differently from the canonical (Python) form (`1e16` vs `1e+16`). So a
//! row or content holding any non-integral number takes the slow path
//! ([`edu::merge`] and the canonical encoder), which gives the same result for
//! every row (tested against each other). It never reads the store or signs.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde_json::value::RawValue;

use crate::federation::edu::{self, DIRECT_TO_DEVICE, Peek};
use crate::signing::canonical::{self, NumberMode};

/// A queued `m.direct_to_device` EDU, read without building a tree.
#[derive(Debug, serde::Deserialize)]
pub struct Stored<'a> {
    #[serde(borrow)]
    edu_type: Cow<'a, str>,
    #[serde(borrow)]
    content: StoredContent<'a>,
}

#[derive(Debug, serde::Deserialize)]
struct StoredContent<'a> {
    #[serde(borrow)]
    sender: Cow<'a, str>,
    #[serde(borrow, rename = "type")]
    event_type: Cow<'a, str>,
    #[serde(borrow, default)]
    message_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    messages: BTreeMap<String, BTreeMap<String, &'a RawValue>>,
}

impl<'a> Stored<'a> {
    /// Reads a queued row; `None` for anything that is not a well-formed
    /// `m.direct_to_device` EDU (it then travels alone, unchanged).
    pub fn read(raw: &'a [u8]) -> Option<Stored<'a>> {
        let s: Stored = serde_json::from_slice(raw).ok()?;
        (s.edu_type == DIRECT_TO_DEVICE).then_some(s)
    }

    /// What coalescing needs to know of it; `bytes` is the row's size.
    pub fn peek(&self, bytes: usize) -> Peek {
        Peek::new(
            self.content.sender.to_string(),
            self.content.event_type.to_string(),
            self.content
                .messages
                .iter()
                .flat_map(|(u, devices)| devices.keys().map(move |d| (u.clone(), d.clone())))
                .collect(),
            bytes,
        )
    }
}

/// Writes the EDUs of `groups` (row indices into `rows`, whose reads are `stored`)
/// into `out` as canonical JSON, separated by commas: the inside of a transaction's
/// `edus` array. Returns how many groups were written by concatenation.
pub fn write_groups(
    out: &mut String,
    rows: &[&[u8]],
    stored: &[Option<Stored<'_>>],
    groups: &[Vec<usize>],
) -> usize {
    let mut fast = 0;
    for (gi, group) in groups.iter().enumerate() {
        if gi > 0 {
            out.push(',');
        }
        if write_fast(out, rows, stored, group) {
            fast += 1;
        } else {
            write_slow(out, rows, group);
        }
    }
    fast
}

/// The group through a tree ([`edu::merge`]) and the canonical encoder.
fn write_slow(out: &mut String, rows: &[&[u8]], group: &[usize]) {
    let parts: Vec<&[u8]> = group.iter().map(|&i| rows[i]).collect();
    // Every value a JSON parse yields encodes in Python mode (no non-finite
    // numbers), so this cannot fail.
    let _ = canonical::encode_into(out, &edu::merge(&parts), NumberMode::Python);
}

/// The group by concatenation, if its rows allow it; false (and `out` untouched)
/// otherwise.
fn write_fast(
    out: &mut String,
    rows: &[&[u8]],
    stored: &[Option<Stored<'_>>],
    group: &[usize],
) -> bool {
    if let [i] = group {
        // A lone row: as it is stored, if that is canonical.
        let Ok(text) = std::str::from_utf8(rows[*i]) else {
            return false;
        };
        if stored[*i].is_none() || has_fraction(text) {
            return false;
        }
        out.push_str(text);
        return true;
    }
    let mut parts: Vec<&Stored> = Vec::with_capacity(group.len());
    for &i in group {
        match &stored[i] {
            Some(s) if s.content.message_id.is_some() => parts.push(s),
            _ => return false,
        }
    }
    // The union of the parts' messages (coalescing never puts a device in twice).
    let mut messages: BTreeMap<&str, BTreeMap<&str, &RawValue>> = BTreeMap::new();
    for p in &parts {
        for (user, devices) in &p.content.messages {
            let into = messages.entry(user.as_str()).or_default();
            for (device, content) in devices {
                if has_fraction(content.get()) {
                    return false;
                }
                into.insert(device.as_str(), content);
            }
        }
    }
    let ids: Vec<String> = parts
        .iter()
        .map(|p| {
            p.content
                .message_id
                .as_deref()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    edu::write_edu(
        out,
        &edu::merged_message_id(&ids),
        messages
            .iter()
            .map(|(user, devices)| (*user, devices.iter().map(|(d, c)| (*d, *c)))),
        &parts[0].content.sender,
        &parts[0].content.event_type,
    );
    true
}

/// Whether compact JSON `text` holds a number with a fraction or an exponent
/// (outside strings): those may be spelled differently in canonical form.
fn has_fraction(text: &str) -> bool {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'-' | b'0'..=b'9' => {
                while i < bytes.len()
                    && matches!(bytes[i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                {
                    if matches!(bytes[i], b'.' | b'e' | b'E') {
                        return true;
                    }
                    i += 1;
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    false
}

/// The slow path alone, for tests: each group through [`edu::merge`] and the
/// canonical encoder.
#[cfg(test)]
fn write_groups_slow(out: &mut String, rows: &[&[u8]], groups: &[Vec<usize>]) {
    for (gi, group) in groups.iter().enumerate() {
        if gi > 0 {
            out.push(',');
        }
        write_slow(out, rows, group);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    use crate::federation::edu::queued_row as row;

    /// (fast output, slow output, groups, groups written fast)
    fn both(rows: &[Vec<u8>]) -> (String, String, usize, usize) {
        let raw: Vec<&[u8]> = rows.iter().map(|r| r.as_slice()).collect();
        let stored: Vec<Option<Stored>> = raw.iter().map(|r| Stored::read(r)).collect();
        let peeks: Vec<Option<Peek>> = stored
            .iter()
            .zip(&raw)
            .map(|(s, r)| s.as_ref().map(|s| s.peek(r.len())))
            .collect();
        let g = edu::group(&peeks, 100);
        let (mut fast, mut slow) = (String::new(), String::new());
        let n = write_groups(&mut fast, &raw, &stored, &g.groups);
        write_groups_slow(&mut slow, &raw, &g.groups);
        (fast, slow, g.groups.len(), n)
    }

    #[test]
    fn the_fast_path_writes_what_the_canonical_encoder_writes() {
        let awkward = json!({
            "z": "quote \" backslash \\ newline \n tab \t bell \u{7} del \u{7f} é 😀",
            "a": [1, -2, 0, 9007199254740991u64, {"y": null, "b": true, "ä": false}],
            "m": {"": "", "A": "upper before lower", "a": "x"}
        });
        let rows = vec![
            row("@a:x", &[("@b:y", "D1")], awkward.clone()),
            row("@a:x", &[("@b:y", "D2"), ("@c:y", "E")], json!({"n": 1})),
            row("@a:x", &[("@b:y", "D1")], json!({"n": 2})), // a later group
            row("@a:x", &[("@ä:y", "Ö")], json!({"k": "v"})), // non-ASCII ids
            row("@z:x", &[("@b:y", "*")], awkward),
            b"{\"edu_type\":\"m.typing\",\"content\":{}}".to_vec(),
            row("@z:x", &[("@c:y", "E")], json!({"n": 3})),
        ];
        let (fast, slow, groups, by_concatenation) = both(&rows);
        assert!(groups < rows.len(), "something was coalesced");
        assert_eq!(by_concatenation, groups - 1, "all but the m.typing EDU");
        assert_eq!(fast, slow);
        // And it is canonical JSON: encoding its parse gives it back.
        let array: Value = serde_json::from_str(&format!("[{fast}]")).unwrap();
        assert_eq!(
            canonical::encode(&array, NumberMode::Python).unwrap(),
            format!("[{fast}]")
        );
    }

    #[test]
    fn non_integral_numbers_take_the_canonical_encoder() {
        let rows = vec![
            row("@a:x", &[("@b:y", "D1")], json!({"f": 1e16, "g": 0.5})),
            row("@a:x", &[("@b:y", "D2")], json!({"n": 1})),
            row("@a:x", &[("@b:y", "D3")], json!({"big": 1.0e-7})),
        ];
        let (fast, slow, groups, by_concatenation) = both(&rows);
        assert_eq!((groups, by_concatenation), (1, 0));
        assert_eq!(fast, slow);
        assert!(fast.contains("1e+16"), "Python's spelling: {fast}");
        let lone = vec![row("@a:x", &[("@b:y", "D1")], json!({"f": 1e16}))];
        let (fast, slow, _, by_concatenation) = both(&lone);
        assert_eq!(by_concatenation, 0);
        assert_eq!(fast, slow);
        assert!(fast.contains("1e+16"), "{fast}");
    }

    #[test]
    fn fractions_are_found_outside_strings_only() {
        assert!(!has_fraction(
            r#"{"a":"1.5e3","b":[1,-2,30],"c":true,"d":false}"#
        ));
        assert!(!has_fraction(r#"{"a":"esc \" 1.5","b":-0}"#));
        assert!(has_fraction(r#"{"a":1.5}"#));
        assert!(has_fraction(r#"[1e3]"#));
        assert!(has_fraction(r#"[-2E-3]"#));
        assert!(has_fraction(r#"{"a":"x\\","b":0.1}"#));
    }
}
