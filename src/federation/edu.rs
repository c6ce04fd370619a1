//! The `m.direct_to_device` EDU: building it (packed under a size budget) and
//! validating one received from a peer.
//!
//! Owns the EDU's wire shape and the packing rule: a client request's messages for one
//! destination become one EDU with a fresh `message_id`, split by recipient user and
//! then by device into several EDUs (each with its own `message_id`) when the canonical
//! size would pass [`SOFT_MAX_EDU_BYTES`] (as Synapse does). A single message larger
//! than that travels alone. Validation is per EDU: one bad EDU never fails a
//! transaction. At sending time, queued EDUs of one sender and type whose recipients
//! do not overlap are coalesced into one (see [`group`], [`merge`], and
//! `federation::wire`, which writes the groups): the spec caps a transaction at 100
//! EDUs, not messages, and one transaction is in flight per destination, so a
//! destination fed by many small requests is carried in fewer, fuller transactions.
//! No device's messages are ever reordered. This module does no I/O.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

pub const DIRECT_TO_DEVICE: &str = "m.direct_to_device";
/// Synapse's soft limit for one EDU.
pub const SOFT_MAX_EDU_BYTES: usize = 64 * 1024;
/// The spec's `message_id` limit, in code points: what courier sends keeps to it.
pub const MAX_MESSAGE_ID_CHARS: usize = 32;
/// The longest `message_id` courier accepts, in bytes. Longer than the spec's limit:
/// Synapse checks none, and a peer's longer IDs must not lose its messages; bounded
/// because each is kept as a dedupe marker.
pub const MAX_INBOUND_MESSAGE_ID_BYTES: usize = 255;

/// A fresh random `message_id` (16 alphanumerics, like Synapse's).
pub fn new_message_id() -> String {
    use rand::RngExt;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..16)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// A client request's messages for one server: user -> `[(device or "*", content)]`,
/// users in key order and each user's devices in key order, every content as the
/// compact JSON `serde_json` writes for it (keys sorted).
pub type Messages = BTreeMap<String, Vec<(String, Box<RawValue>)>>;

/// Serialized `m.direct_to_device` EDUs carrying `messages` from `sender`, packed so
/// each stays under `SOFT_MAX_EDU_BYTES` where it can. The bytes are written directly,
/// contents as they are: exactly what `serde_json` writes for the EDU as a tree (keys
/// in order, compact), without building one.
pub fn pack_to_device(sender: &str, event_type: &str, messages: &Messages) -> Vec<Vec<u8>> {
    let overhead = sender.len() + event_type.len() + 128;
    let mut out = Vec::new();
    let mut current: Vec<(&str, &str, &RawValue)> = Vec::new();
    let mut current_size = overhead;
    for (user, devices) in messages {
        for (device, content) in devices {
            let size = content.get().len() + user.len() + device.len() + 16;
            if current_size + size > SOFT_MAX_EDU_BYTES && !current.is_empty() {
                out.push(write_to_device(sender, event_type, &current));
                current.clear();
                current_size = overhead;
            }
            current.push((user, device, content));
            current_size += size;
        }
    }
    if !current.is_empty() {
        out.push(write_to_device(sender, event_type, &current));
    }
    out
}

/// One EDU for `units` (`(user, device, content)`, grouped by user, in order) under a
/// fresh `message_id`.
fn write_to_device(sender: &str, event_type: &str, units: &[(&str, &str, &RawValue)]) -> Vec<u8> {
    let body: usize = units
        .iter()
        .map(|(u, d, c)| u.len() + d.len() + c.get().len() + 8)
        .sum();
    let mut out = String::with_capacity(body + sender.len() + event_type.len() + 128);
    let by_user = units
        .chunk_by(|a, b| a.0 == b.0)
        .map(|run| (run[0].0, run.iter().map(|(_, d, c)| (*d, *c))));
    write_edu(&mut out, &new_message_id(), by_user, sender, event_type);
    out.into_bytes()
}

/// Writes an `m.direct_to_device` EDU into `out` as canonical JSON by concatenation:
/// `messages` (user -> `(device, content)`, both in code-point order, each content
/// written as it is) with the other fields around them. Shared by packing a client's
/// request and by coalescing queued EDUs (`federation::wire`).
pub(crate) fn write_edu<'m, D>(
    out: &mut String,
    message_id: &str,
    messages: impl IntoIterator<Item = (&'m str, D)>,
    sender: &str,
    event_type: &str,
) where
    D: IntoIterator<Item = (&'m str, &'m RawValue)>,
{
    use crate::signing::canonical::write_string;
    // Members in code-point order: content < edu_type; message_id < messages <
    // sender < type.
    out.push_str("{\"content\":{\"message_id\":");
    write_string(out, message_id);
    out.push_str(",\"messages\":{");
    for (ui, (user, devices)) in messages.into_iter().enumerate() {
        if ui > 0 {
            out.push(',');
        }
        write_string(out, user);
        out.push_str(":{");
        for (di, (device, content)) in devices.into_iter().enumerate() {
            if di > 0 {
                out.push(',');
            }
            write_string(out, device);
            out.push(':');
            out.push_str(content.get());
        }
        out.push('}');
    }
    out.push_str("},\"sender\":");
    write_string(out, sender);
    out.push_str(",\"type\":");
    write_string(out, event_type);
    out.push_str("},\"edu_type\":");
    write_string(out, DIRECT_TO_DEVICE);
    out.push('}');
}

/// What coalescing needs to know of a queued EDU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peek {
    sender: String,
    event_type: String,
    /// `(user, device)` pairs addressed (device may be `*`).
    recipients: Vec<(String, String)>,
    bytes: usize,
}

/// Reads the coalescing key of a serialized EDU; `None` for anything that is not a
/// well-formed `m.direct_to_device` EDU (it then travels alone, unchanged).
pub fn peek(raw: &[u8]) -> Option<Peek> {
    crate::federation::wire::Stored::read(raw).map(|s| s.peek(raw.len()))
}

impl Peek {
    pub fn new(
        sender: String,
        event_type: String,
        recipients: Vec<(String, String)>,
        bytes: usize,
    ) -> Peek {
        Peek {
            sender,
            event_type,
            recipients,
            bytes,
        }
    }
}

/// How a queue head travels: `groups` of row indices, each of which goes as one EDU
/// (in this order), covering the rows `0..rows`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grouping {
    pub groups: Vec<Vec<usize>>,
    pub rows: usize,
}

/// Groups queued EDUs so that each group can travel as one EDU: same sender and type,
/// no recipient twice (a `*` overlaps every device of its user), together under
/// [`SOFT_MAX_EDU_BYTES`]; at most `max_groups` groups, covering a prefix of `peeks`.
///
/// An EDU joins the first group of its sender and type that comes after every group
/// holding a message for one of its recipients, so each device still gets its
/// messages in queue order; only messages to different devices may change places.
/// (Merging consecutive runs only, concurrent senders' interleaving cut a run at the
/// first device addressed twice: ~5 messages per EDU to 8 devices, where this gives
/// ~8.) Anything `peek` cannot read travels alone, and nothing moves before it.
/// The result depends only on `peeks`, so a retry regroups the same rows the same way.
pub fn group(peeks: &[Option<Peek>], max_groups: usize) -> Grouping {
    use std::collections::HashMap;
    struct Open {
        bytes: usize,
        rows: Vec<usize>,
    }
    let mut groups: Vec<Open> = Vec::new();
    // Per (sender, type): its groups, in order.
    let mut by_key: HashMap<(&str, &str), Vec<usize>> = HashMap::new();
    // The last group holding a message for a device, for any device of a user, and a
    // `*` of a user.
    let mut device_last: HashMap<(&str, &str), usize> = HashMap::new();
    let mut user_last: HashMap<&str, usize> = HashMap::new();
    let mut star_last: HashMap<&str, usize> = HashMap::new();
    // Nothing moves before this group (an EDU that travels alone).
    let mut barrier: Option<usize> = None;
    let mut rows = 0;
    for (i, p) in peeks.iter().enumerate() {
        let Some(p) = p else {
            if groups.len() == max_groups {
                break;
            }
            groups.push(Open {
                bytes: 0,
                rows: vec![i],
            });
            barrier = Some(groups.len() - 1);
            rows = i + 1;
            continue;
        };
        // Every conflicting group comes before the one this EDU joins.
        let mut after = barrier;
        for (u, d) in &p.recipients {
            let last = if d == "*" {
                user_last.get(u.as_str()).copied()
            } else {
                device_last
                    .get(&(u.as_str(), d.as_str()))
                    .copied()
                    .max(star_last.get(u.as_str()).copied())
            };
            after = after.max(last);
        }
        let first = after.map_or(0, |a| a + 1);
        let key = (p.sender.as_str(), p.event_type.as_str());
        let candidates = by_key.entry(key).or_default();
        let from = candidates.partition_point(|&g| g < first);
        let found = candidates[from..]
            .iter()
            .copied()
            .find(|&g| groups[g].bytes + p.bytes <= SOFT_MAX_EDU_BYTES);
        let g = match found {
            Some(g) => g,
            None => {
                if groups.len() == max_groups {
                    break;
                }
                groups.push(Open {
                    bytes: 0,
                    rows: Vec::new(),
                });
                candidates.push(groups.len() - 1);
                groups.len() - 1
            }
        };
        groups[g].bytes += p.bytes;
        groups[g].rows.push(i);
        for (u, d) in &p.recipients {
            let at = if d == "*" {
                star_last.entry(u).or_default()
            } else {
                device_last.entry((u, d)).or_default()
            };
            *at = (*at).max(g);
            let any = user_last.entry(u).or_default();
            *any = (*any).max(g);
        }
        rows = i + 1;
    }
    Grouping {
        groups: groups.into_iter().map(|g| g.rows).collect(),
        rows,
    }
}

/// One EDU carrying every message of `run` (serialized EDUs of one [`group`], in
/// queue order).
/// A single EDU is returned as it is; several get a `message_id` derived from theirs,
/// so rebuilding the same transaction after a restart yields the same bytes.
pub fn merge(run: &[&[u8]]) -> Value {
    let parsed: Vec<Value> = run
        .iter()
        .map(|raw| serde_json::from_slice(raw).unwrap_or(Value::Null))
        .collect();
    if parsed.len() == 1 {
        return parsed.into_iter().next().expect("one");
    }
    let mut ids = Vec::with_capacity(parsed.len());
    let mut messages = Map::new();
    let (mut sender, mut event_type) = (Value::Null, Value::Null);
    for mut edu in parsed {
        let Some(content) = edu.get_mut("content").and_then(Value::as_object_mut) else {
            continue;
        };
        sender = content.remove("sender").unwrap_or(Value::Null);
        event_type = content.remove("type").unwrap_or(Value::Null);
        ids.push(
            content
                .remove("message_id")
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
        );
        if let Some(Value::Object(users)) = content.remove("messages") {
            for (user, devices) in users {
                let entry = messages
                    .entry(user)
                    .or_insert_with(|| Value::Object(Map::new()));
                if let (Some(into), Value::Object(devices)) = (entry.as_object_mut(), devices) {
                    into.extend(devices);
                }
            }
        }
    }
    json!({
        "edu_type": DIRECT_TO_DEVICE,
        "content": {
            "sender": sender,
            "type": event_type,
            "message_id": merged_message_id(&ids),
            "messages": messages,
        }
    })
}

/// `c` + 21 characters of the hash of the merged ids: within the spec's 32, and the
/// same ids always give the same id.
pub(crate) fn merged_message_id(ids: &[String]) -> String {
    use base64::Engine;
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for id in ids {
        h.update(id.as_bytes());
        h.update([0]);
    }
    let digest = h.finalize();
    let mut id = String::from("c");
    id.push_str(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest[..16]));
    id
}

/// A string of a received EDU, borrowed from the transaction's bytes where it has
/// no escapes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Deserialize)]
pub struct Str<'a>(#[serde(borrow)] pub Cow<'a, str>);

impl std::ops::Deref for Str<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

/// An EDU of a received transaction, read in place: its type and its content's bytes.
#[derive(Debug, serde::Deserialize)]
pub struct Received<'a> {
    #[serde(borrow)]
    pub edu_type: Str<'a>,
    #[serde(borrow)]
    pub content: Option<&'a RawValue>,
}

/// Reads one EDU of a transaction: `None` if it is not an object with a string
/// `edu_type` (given once).
pub fn read_edu(raw: &RawValue) -> Option<Received<'_>> {
    serde_json::from_str(raw.get()).ok()
}

/// A validated inbound to-device EDU, borrowed from the transaction's bytes.
#[derive(Debug, Clone)]
pub struct ToDevice<'a> {
    pub sender: Str<'a>,
    pub event_type: Str<'a>,
    pub message_id: Str<'a>,
    /// user -> the bytes of `{device or "*": content, ...}` (not yet checked)
    pub messages: BTreeMap<Str<'a>, &'a RawValue>,
}

/// Why an inbound EDU was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EduError {
    #[error("EDU is not an object with a string edu_type and an object content")]
    Shape,
    #[error("field `{0}` missing or of the wrong type")]
    Field(&'static str),
    #[error("message_id longer than 255 bytes or empty")]
    MessageId,
    #[error("sender {sender} does not belong to origin {origin}")]
    Spoofed { sender: String, origin: String },
}

/// Checks one `m.direct_to_device` EDU from `origin`.
pub fn parse_to_device<'a>(edu: &Received<'a>, origin: &str) -> Result<ToDevice<'a>, EduError> {
    /// The members read, each as bytes, so a wrong type names its field.
    #[derive(serde::Deserialize)]
    struct Content<'a> {
        #[serde(borrow)]
        sender: Option<&'a RawValue>,
        #[serde(borrow, rename = "type")]
        event_type: Option<&'a RawValue>,
        #[serde(borrow)]
        message_id: Option<&'a RawValue>,
        #[serde(borrow)]
        messages: Option<&'a RawValue>,
    }
    let content: Content<'a> = edu
        .content
        .and_then(|c| serde_json::from_str(c.get()).ok())
        .ok_or(EduError::Shape)?;
    fn string<'a>(raw: Option<&'a RawValue>, f: &'static str) -> Result<Str<'a>, EduError> {
        raw.and_then(|r| serde_json::from_str(r.get()).ok())
            .ok_or(EduError::Field(f))
    }
    let sender = string(content.sender, "sender")?;
    let event_type = string(content.event_type, "type")?;
    let message_id = string(content.message_id, "message_id")?;
    let messages: BTreeMap<Str<'a>, &'a RawValue> = content
        .messages
        .and_then(|r| serde_json::from_str(r.get()).ok())
        .ok_or(EduError::Field("messages"))?;
    if message_id.is_empty() || message_id.len() > MAX_INBOUND_MESSAGE_ID_BYTES {
        return Err(EduError::MessageId);
    }
    let user = crate::ids::UserId::parse(&sender).map_err(|_| EduError::Field("sender"))?;
    if user.server_name() != origin {
        return Err(EduError::Spoofed {
            sender: sender.to_string(),
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

/// One recipient user's `{device or "*": content}` of a received EDU; `None` if it
/// is not an object.
pub fn read_devices(raw: &RawValue) -> Option<BTreeMap<Str<'_>, &RawValue>> {
    serde_json::from_str(raw.get()).ok()
}

/// A queued row as `client::send` stores it: one EDU from `sender` carrying
/// `content` to each `(user, device)` of `to` (tests of coalescing).
#[cfg(test)]
pub(crate) fn queued_row(sender: &str, to: &[(&str, &str)], content: Value) -> Vec<u8> {
    let raw = serde_json::value::to_raw_value(&content).expect("a Value serializes");
    let mut messages = Messages::new();
    for (u, d) in to {
        let devices = messages.entry(u.to_string()).or_default();
        devices.push((d.to_string(), raw.clone()));
        devices.sort_by(|a, b| a.0.cmp(&b.0));
    }
    pack_to_device(sender, "m.t", &messages).remove(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What [`parse_to_device`] makes of an EDU given as a tree, owned.
    #[derive(Debug, PartialEq)]
    struct Checked {
        sender: String,
        message_id: String,
        messages: Map<String, Value>,
    }

    fn checked(edu: &Value, origin: &str) -> Result<Checked, EduError> {
        let text = serde_json::to_string(edu).unwrap();
        let raw: &RawValue = serde_json::from_str(&text).unwrap();
        let received = read_edu(raw).ok_or(EduError::Shape)?;
        let td = parse_to_device(&received, origin)?;
        let messages = td
            .messages
            .iter()
            .map(|(u, d)| (u.to_string(), serde_json::from_str(d.get()).unwrap()))
            .collect();
        Ok(Checked {
            sender: td.sender.to_string(),
            message_id: td.message_id.to_string(),
            messages,
        })
    }

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

    /// `messages` as a client request's parse hands them over.
    fn raw(m: &Map<String, Value>) -> Messages {
        m.iter()
            .map(|(u, devs)| {
                let devs = devs
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(d, c)| (d.clone(), serde_json::value::to_raw_value(c).unwrap()))
                    .collect();
                (u.clone(), devs)
            })
            .collect()
    }

    /// The EDU `pack_to_device` writes, built as a tree and serialized (what it wrote
    /// before it wrote the bytes itself), with the `message_id` it chose.
    fn as_tree(sender: &str, ty: &str, edu: &[u8]) -> Vec<u8> {
        let v: Value = serde_json::from_slice(edu).unwrap();
        let tree = json!({
            "edu_type": DIRECT_TO_DEVICE,
            "content": {
                "sender": sender,
                "type": ty,
                "message_id": v["content"]["message_id"],
                "messages": v["content"]["messages"],
            }
        });
        serde_json::to_vec(&tree).unwrap()
    }

    #[test]
    fn written_edus_are_the_bytes_of_their_tree() {
        let mut m = messages(3, 4, 30_000);
        m.insert(
            "@q\"uote\\:b.test".into(),
            json!({"D\u{1}\u{e9}": {"k": "\u{2028}\n", "a": [1, 2.5, null, {"z": 1, "b": true}]}}),
        );
        let (sender, ty) = ("@s\"x:a.test", "m.t\u{7f}\u{1f}");
        let edus = pack_to_device(sender, ty, &raw(&m));
        assert!(edus.len() > 2, "split under the soft limit");
        for e in &edus {
            assert_eq!(
                String::from_utf8_lossy(e),
                String::from_utf8_lossy(&as_tree(sender, ty, e))
            );
        }
        assert_eq!(count(&edus), 13);
        assert!(pack_to_device(sender, ty, &Messages::new()).is_empty());
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
        let edus = pack_to_device("@a:a.test", "m.t", &raw(&messages(3, 2, 10)));
        assert_eq!(edus.len(), 1);
        let v: Value = serde_json::from_slice(&edus[0]).unwrap();
        assert_eq!(v["edu_type"], DIRECT_TO_DEVICE);
        assert_eq!(v["content"]["message_id"].as_str().unwrap().len(), 16);
        assert_eq!(checked(&v, "a.test").unwrap().sender, "@a:a.test");
    }

    #[test]
    fn big_fan_out_is_split_under_the_soft_limit_losing_nothing() {
        let edus = pack_to_device("@a:a.test", "m.t", &raw(&messages(10, 10, 2000)));
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
        let edus = pack_to_device("@a:a.test", "m.t", &raw(&m));
        assert_eq!(edus.len(), 2);
        assert_eq!(count(&edus), 2);
    }

    fn queued(sender: &str, to: &[(&str, &str)], n: u64) -> Vec<u8> {
        queued_row(sender, to, json!({"n": n}))
    }

    #[test]
    fn disjoint_edus_of_one_sender_coalesce_keeping_each_device_in_order() {
        let rows = [
            queued("@a:x", &[("@b:y", "D1")], 0),
            queued("@a:x", &[("@b:y", "D2")], 1),
            queued("@a:x", &[("@b:y", "D1")], 2), // D1 again: a later group
            queued("@z:x", &[("@b:y", "D3")], 3), // another sender: its own group
            queued("@z:x", &[("@c:y", "*")], 4),
            queued("@z:x", &[("@c:y", "E")], 5), // overlaps the `*`: after it
            b"not json".to_vec(),                // alone, and nothing moves before it
            queued("@z:x", &[("@d:y", "F")], 7),
        ];
        let peeks: Vec<_> = rows.iter().map(|r| peek(r)).collect();
        assert!(peeks[6].is_none());
        let g = group(&peeks, 100);
        assert_eq!(
            g.groups,
            vec![vec![0, 1], vec![2], vec![3, 4], vec![5], vec![6], vec![7]]
        );
        assert_eq!(g.rows, 8);
        let g = group(&peeks, 2);
        assert_eq!(
            (g.groups, g.rows),
            (vec![vec![0, 1], vec![2]], 3),
            "a prefix, whole groups"
        );

        // Messages to different devices may change places, never two to one device:
        // D1 D1 D2 D2 travels as [D1 D2] [D1 D2].
        let swapped = [
            queued("@a:x", &[("@b:y", "D1")], 0),
            queued("@a:x", &[("@b:y", "D1")], 1),
            queued("@a:x", &[("@b:y", "D2")], 2),
            queued("@a:x", &[("@b:y", "D2")], 3),
        ];
        let swapped: Vec<_> = swapped.iter().map(|r| peek(r)).collect();
        assert_eq!(group(&swapped, 100).groups, vec![vec![0, 2], vec![1, 3]]);

        let slices: Vec<&[u8]> = rows[0..2].iter().map(|r| r.as_slice()).collect();
        let merged = merge(&slices);
        let td = checked(&merged, "x").unwrap();
        assert_eq!(td.sender, "@a:x");
        assert_eq!(td.messages["@b:y"]["D1"], json!({"n": 0}));
        assert_eq!(td.messages["@b:y"]["D2"], json!({"n": 1}));
        assert_eq!(merge(&slices), merged, "deterministic, message_id included");
        assert!(td.message_id.chars().count() <= MAX_MESSAGE_ID_CHARS);
        let one: Vec<&[u8]> = vec![rows[2].as_slice()];
        assert_eq!(
            merge(&one),
            serde_json::from_slice::<Value>(&rows[2]).unwrap(),
            "a lone EDU is unchanged"
        );
    }

    #[test]
    fn grouping_keeps_every_device_in_order_and_every_row_once() {
        // A small deterministic generator: 2 senders, 3 users, devices D1, D2 and `*`.
        let mut state = 0x2545_f491_u64;
        let mut next = |n: u64| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) % n
        };
        for round in 0..300 {
            let len = 1 + next(60) as usize;
            let rows: Vec<Vec<u8>> = (0..len)
                .map(|i| {
                    let sender = ["@a:x", "@b:x"][next(2) as usize];
                    let n = 1 + next(2);
                    let mut to = Vec::new();
                    for _ in 0..n {
                        let user = ["@u:y", "@v:y", "@w:y"][next(3) as usize];
                        let device = ["D1", "D2", "*"][next(3) as usize];
                        if !to.iter().any(|(u, _)| *u == user) {
                            to.push((user, device));
                        }
                    }
                    queued(sender, &to, i as u64)
                })
                .collect();
            let peeks: Vec<_> = rows.iter().map(|r| peek(r)).collect();
            let max = 1 + next(12) as usize;
            let g = group(&peeks, max);
            assert!(g.groups.len() <= max, "round {round}");
            let mut seen: Vec<usize> = g.groups.concat();
            seen.sort_unstable();
            assert_eq!(
                seen,
                (0..g.rows).collect::<Vec<_>>(),
                "round {round}: each row once"
            );
            // Position of each row in the output order.
            let mut at = vec![usize::MAX; g.rows];
            for (gi, grp) in g.groups.iter().enumerate() {
                let p0 = peeks[grp[0]].as_ref().unwrap();
                let mut addressed = std::collections::HashSet::new();
                for &r in grp {
                    at[r] = gi;
                    let p = peeks[r].as_ref().unwrap();
                    assert_eq!((&p.sender, &p.event_type), (&p0.sender, &p0.event_type));
                    for (u, d) in &p.recipients {
                        assert!(addressed.insert((u.clone(), d.clone())), "round {round}");
                    }
                }
                // A `*` shares its group with no other device of its user.
                for (u, d) in &addressed {
                    if d == "*" {
                        assert_eq!(addressed.iter().filter(|(au, _)| au == u).count(), 1);
                    }
                }
            }
            // Any two rows that address a common device (a `*` covers all of its
            // user's) travel in queue order: the earlier in an earlier group.
            let overlaps = |a: &Peek, b: &Peek| {
                a.recipients.iter().any(|(u, d)| {
                    b.recipients
                        .iter()
                        .any(|(bu, bd)| u == bu && (d == bd || d == "*" || bd == "*"))
                })
            };
            for i in 0..g.rows {
                for j in i + 1..g.rows {
                    let (pi, pj) = (peeks[i].as_ref().unwrap(), peeks[j].as_ref().unwrap());
                    if overlaps(pi, pj) {
                        assert!(at[i] < at[j], "round {round}: rows {i} and {j}");
                    }
                }
            }
        }
    }

    #[test]
    fn runs_stay_under_the_soft_limit() {
        let big = "x".repeat(20 * 1024);
        let rows: Vec<Vec<u8>> = (0..5)
            .map(|i| {
                let mut m = Map::new();
                m.insert("@b:y".into(), json!({ format!("D{i}"): {"pad": big} }));
                pack_to_device("@a:x", "m.t", &raw(&m)).remove(0)
            })
            .collect();
        let peeks: Vec<_> = rows.iter().map(|r| peek(r)).collect();
        let groups = group(&peeks, 100).groups;
        assert!(groups.len() >= 2, "{groups:?}");
        for grp in groups {
            let slices: Vec<&[u8]> = grp.iter().map(|&i| rows[i].as_slice()).collect();
            assert!(serde_json::to_vec(&merge(&slices)).unwrap().len() <= SOFT_MAX_EDU_BYTES);
        }
    }

    #[test]
    fn inbound_validation() {
        let ok = json!({"edu_type": DIRECT_TO_DEVICE, "content": {"sender": "@a:o.test", "type": "m.t", "message_id": "abc", "messages": {}}});
        assert!(checked(&ok, "o.test").is_ok());
        assert!(matches!(
            checked(&ok, "evil.test"),
            Err(EduError::Spoofed { .. })
        ));
        // Longer than the spec's 32 code points (Synapse takes them): accepted, up
        // to a bound.
        let mut long = ok.clone();
        long["content"]["message_id"] = json!("é".repeat(127));
        assert!(checked(&long, "o.test").is_ok());
        for id in ["x".repeat(256), String::new()] {
            let mut bad = ok.clone();
            bad["content"]["message_id"] = json!(id);
            assert_eq!(checked(&bad, "o.test"), Err(EduError::MessageId));
        }
        let mut bad = ok.clone();
        bad["content"]["messages"] = json!([]);
        assert_eq!(checked(&bad, "o.test"), Err(EduError::Field("messages")));
        assert_eq!(
            checked(&json!({"edu_type": 1}), "o.test"),
            Err(EduError::Shape)
        );
        let mut bad = ok.clone();
        bad["content"]["sender"] = json!("nobody");
        assert_eq!(checked(&bad, "o.test"), Err(EduError::Field("sender")));
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
            for e in pack_to_device("@s:a.test", "m.t", &raw(&messages)) {
                let v: Value = serde_json::from_slice(&e).unwrap();
                let td = checked(&v, "a.test").unwrap();
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
                let _ = checked(&v, "o.test");
            }
            let v = json!({"edu_type": DIRECT_TO_DEVICE, "content": {"sender": s.clone(), "type": s.clone(), "message_id": s.clone(), "messages": {}}});
            let _ = checked(&v, "o.test");
        }
    }
}
