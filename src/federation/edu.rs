//! The `m.direct_to_device` EDU: building it (packed under a size budget) and
//! validating one received from a peer.
//!
//! Owns the EDU's wire shape and the packing rule: a client request's messages for one
//! destination become one EDU with a fresh `message_id`, split by recipient user and
//! then by device into several EDUs (each with its own `message_id`) when the canonical
//! size would pass [`SOFT_MAX_EDU_BYTES`] (as Synapse does). A single message larger
//! than that travels alone. Validation is per EDU: one bad EDU never fails a
//! transaction. This module does no I/O.

use serde_json::{Map, Value, json};

pub const DIRECT_TO_DEVICE: &str = "m.direct_to_device";
/// Synapse's soft limit for one EDU.
pub const SOFT_MAX_EDU_BYTES: usize = 64 * 1024;
/// The spec's `message_id` limit, in code points.
pub const MAX_MESSAGE_ID_CHARS: usize = 32;

/// A fresh random `message_id` (16 alphanumerics, like Synapse's).
pub fn new_message_id() -> String {
    use rand::RngExt;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..16)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Serialized `m.direct_to_device` EDUs carrying `messages` (user -> device -> content)
/// from `sender`, packed so each stays under `SOFT_MAX_EDU_BYTES` where it can.
pub fn pack_to_device(
    sender: &str,
    event_type: &str,
    messages: &Map<String, Value>,
) -> Vec<Vec<u8>> {
    // Flatten into (user, device, content, size) units, in order.
    let mut units: Vec<(&str, &str, &Value, usize)> = Vec::new();
    for (user, devices) in messages {
        if let Some(devices) = devices.as_object() {
            for (device, content) in devices {
                let size = serde_json::to_vec(content).map(|v| v.len()).unwrap_or(0)
                    + user.len()
                    + device.len()
                    + 16;
                units.push((user, device, content, size));
            }
        }
    }
    let overhead = sender.len() + event_type.len() + 128;
    let mut out = Vec::new();
    let mut current: Map<String, Value> = Map::new();
    let mut current_size = overhead;
    let flush = |current: &mut Map<String, Value>, out: &mut Vec<Vec<u8>>| {
        if current.is_empty() {
            return;
        }
        let edu = json!({
            "edu_type": DIRECT_TO_DEVICE,
            "content": {
                "sender": sender,
                "type": event_type,
                "message_id": new_message_id(),
                "messages": std::mem::take(current),
            }
        });
        out.push(serde_json::to_vec(&edu).expect("a Value serializes"));
    };
    for (user, device, content, size) in units {
        if current_size + size > SOFT_MAX_EDU_BYTES && !current.is_empty() {
            flush(&mut current, &mut out);
            current_size = overhead;
        }
        current
            .entry(user.to_owned())
            .or_insert_with(|| Value::Object(Map::new()))
            .as_object_mut()
            .expect("inserted as object")
            .insert(device.to_owned(), content.clone());
        current_size += size;
    }
    flush(&mut current, &mut out);
    out
}

/// A validated inbound to-device EDU.
#[derive(Debug, Clone, PartialEq)]
pub struct ToDevice<'a> {
    pub sender: &'a str,
    pub event_type: &'a str,
    pub message_id: &'a str,
    /// user -> device (or `*`) -> content
    pub messages: &'a Map<String, Value>,
}

/// Why an inbound EDU was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EduError {
    #[error("EDU is not an object with a string edu_type and an object content")]
    Shape,
    #[error("field `{0}` missing or of the wrong type")]
    Field(&'static str),
    #[error("message_id longer than 32 code points or empty")]
    MessageId,
    #[error("sender {sender} does not belong to origin {origin}")]
    Spoofed { sender: String, origin: String },
}

/// The `edu_type` of a raw EDU, if it has one.
pub fn edu_type(edu: &Value) -> Option<&str> {
    edu.get("edu_type")?.as_str()
}

/// Checks one `m.direct_to_device` EDU from `origin`.
pub fn parse_to_device<'a>(edu: &'a Value, origin: &str) -> Result<ToDevice<'a>, EduError> {
    let content = edu
        .get("content")
        .and_then(Value::as_object)
        .ok_or(EduError::Shape)?;
    let s = |f: &'static str| {
        content
            .get(f)
            .and_then(Value::as_str)
            .ok_or(EduError::Field(f))
    };
    let sender = s("sender")?;
    let event_type = s("type")?;
    let message_id = s("message_id")?;
    let messages = content
        .get("messages")
        .and_then(Value::as_object)
        .ok_or(EduError::Field("messages"))?;
    let n = message_id.chars().count();
    if n == 0 || n > MAX_MESSAGE_ID_CHARS {
        return Err(EduError::MessageId);
    }
    let user = crate::ids::UserId::parse(sender).map_err(|_| EduError::Field("sender"))?;
    if user.server_name() != origin {
        return Err(EduError::Spoofed {
            sender: sender.to_owned(),
            origin: origin.to_owned(),
        });
    }
    Ok(ToDevice {
        sender,
        event_type,
        message_id,
        messages,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(users: usize, devices: usize, bytes: usize) -> Map<String, Value> {
        let mut m = Map::new();
        for u in 0..users {
            let mut d = Map::new();
            for i in 0..devices {
                d.insert(format!("D{i}"), json!({"body": "x".repeat(bytes)}));
            }
            m.insert(format!("@u{u}:b.test"), Value::Object(d));
        }
        m
    }

    fn count(edus: &[Vec<u8>]) -> usize {
        edus.iter()
            .map(|e| {
                let v: Value = serde_json::from_slice(e).unwrap();
                v["content"]["messages"]
                    .as_object()
                    .unwrap()
                    .values()
                    .map(|d| d.as_object().unwrap().len())
                    .sum::<usize>()
            })
            .sum()
    }

    #[test]
    fn small_fan_out_is_one_edu() {
        let edus = pack_to_device("@a:a.test", "m.t", &messages(3, 2, 10));
        assert_eq!(edus.len(), 1);
        let v: Value = serde_json::from_slice(&edus[0]).unwrap();
        assert_eq!(v["edu_type"], DIRECT_TO_DEVICE);
        assert_eq!(v["content"]["message_id"].as_str().unwrap().len(), 16);
        assert_eq!(parse_to_device(&v, "a.test").unwrap().sender, "@a:a.test");
    }

    #[test]
    fn big_fan_out_is_split_under_the_soft_limit_losing_nothing() {
        let edus = pack_to_device("@a:a.test", "m.t", &messages(10, 10, 2000));
        assert!(edus.len() > 1);
        assert!(edus.iter().all(|e| e.len() <= SOFT_MAX_EDU_BYTES));
        assert_eq!(count(&edus), 100);
        let ids: std::collections::HashSet<String> = edus
            .iter()
            .map(|e| {
                serde_json::from_slice::<Value>(e).unwrap()["content"]["message_id"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(ids.len(), edus.len(), "each split has its own message_id");
    }

    #[test]
    fn a_huge_message_travels_alone() {
        let mut m = messages(1, 1, 10);
        m.insert(
            "@big:b.test".into(),
            json!({"D": {"body": "y".repeat(100_000)}}),
        );
        let edus = pack_to_device("@a:a.test", "m.t", &m);
        assert_eq!(edus.len(), 2);
        assert_eq!(count(&edus), 2);
    }

    #[test]
    fn inbound_validation() {
        let ok = json!({"edu_type": DIRECT_TO_DEVICE, "content": {"sender": "@a:o.test", "type": "m.t", "message_id": "abc", "messages": {}}});
        assert!(parse_to_device(&ok, "o.test").is_ok());
        assert!(matches!(
            parse_to_device(&ok, "evil.test"),
            Err(EduError::Spoofed { .. })
        ));
        let mut bad = ok.clone();
        bad["content"]["message_id"] = json!("x".repeat(33));
        assert_eq!(parse_to_device(&bad, "o.test"), Err(EduError::MessageId));
        let mut bad = ok.clone();
        bad["content"]["messages"] = json!([]);
        assert_eq!(
            parse_to_device(&bad, "o.test"),
            Err(EduError::Field("messages"))
        );
        assert_eq!(
            parse_to_device(&json!({"edu_type": 1}), "o.test"),
            Err(EduError::Shape)
        );
        let mut bad = ok.clone();
        bad["content"]["sender"] = json!("nobody");
        assert_eq!(
            parse_to_device(&bad, "o.test"),
            Err(EduError::Field("sender"))
        );
    }

    proptest::proptest! {
        /// Whatever courier packs, it accepts back unchanged and complete: every
        /// (user, device, content) comes out of exactly one EDU.
        #[test]
        fn packed_edus_parse_back_complete(
            users in proptest::collection::btree_map("@[a-z]{1,8}:b\\.test", proptest::collection::btree_map("[A-Z]{1,6}", ".{0,3000}", 1..6), 1..8),
        ) {
            let mut messages = Map::new();
            let mut want = std::collections::BTreeSet::new();
            for (u, devs) in &users {
                let mut d = Map::new();
                for (dev, body) in devs {
                    d.insert(dev.clone(), json!({"body": body}));
                    want.insert((u.clone(), dev.clone(), body.clone()));
                }
                messages.insert(u.clone(), Value::Object(d));
            }
            let mut got = std::collections::BTreeSet::new();
            for e in pack_to_device("@s:a.test", "m.t", &messages) {
                let v: Value = serde_json::from_slice(&e).unwrap();
                let td = parse_to_device(&v, "a.test").unwrap();
                for (u, devs) in td.messages {
                    for (dev, c) in devs.as_object().unwrap() {
                        proptest::prop_assert!(got.insert((u.clone(), dev.clone(), c["body"].as_str().unwrap().to_owned())));
                    }
                }
            }
            proptest::prop_assert_eq!(got, want);
        }

        /// No JSON value makes the EDU validator panic.
        #[test]
        fn validation_never_panics(s in ".{0,200}") {
            if let Ok(v) = serde_json::from_str::<Value>(&s) {
                let _ = parse_to_device(&v, "o.test");
            }
            let v = json!({"edu_type": DIRECT_TO_DEVICE, "content": {"sender": s.clone(), "type": s.clone(), "message_id": s.clone(), "messages": {}}});
            let _ = parse_to_device(&v, "o.test");
        }
    }
}
