//! Inbound transactions: from a verified `/send` body to durable inbox entries.
//!
//! Owns the per-EDU rules: only `m.direct_to_device` is kept; its `sender` must belong
//! to the origin; `(origin, message_id)` is processed once; `*` expands to the
//! recipient's devices at arrival, but for those the message also names (they get
//! their own content only, as for local sends); recipients on other servers, unknown users and
//! unknown devices are skipped. One malformed EDU is dropped and counted; the rest of
//! the transaction is accepted (a 400 for the whole would wedge the origin's queue).
//! Likewise one message whose content is not an object a JSON parser can hold (read
//! from the bytes received: see [`inbox_event`]) is dropped alone.
//! Everything a transaction yields, with its `(origin, txnId)` marker, is one synced
//! batch: durable before the 200. It never authenticates (see `auth`) and never sends.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use serde_json::value::RawValue;

use crate::federation::edu::{self, DIRECT_TO_DEVICE, Str};
use crate::store::dedupe::Marker;
use crate::store::{Append, Store, StoreError};

/// Transactions from one origin may not run concurrently (Synapse answers 429 too).
#[derive(Default)]
pub struct InFlight {
    origins: Arc<Mutex<HashSet<String>>>,
}

/// Removes the origin from the in-flight set when dropped. It owns its set, so the
/// task that finishes a transaction's write can hold it past the request: a retry
/// must not pass the marker checks while the first attempt's write is still queued.
pub struct InFlightGuard {
    set: Arc<Mutex<HashSet<String>>>,
    origin: String,
}

impl InFlight {
    pub fn enter(&self, origin: &str) -> Option<InFlightGuard> {
        let mut s = self.origins.lock().expect("inflight");
        if !s.insert(origin.to_owned()) {
            return None;
        }
        Some(InFlightGuard {
            set: self.origins.clone(),
            origin: origin.to_owned(),
        })
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.set.lock().expect("inflight").remove(&self.origin);
    }
}

/// A to-device event as a device's `/sync` serves it:
/// `{"content":…,"sender":…,"type":…}`. The content, as received, is checked and
/// rewritten compact in one pass, without a tree: it must be an object, and its
/// strings and numbers must be ones a JSON parser holds (no lone surrogate, no
/// number out of range), so no client is ever served an event it cannot read.
pub fn inbox_event(
    content: &RawValue,
    sender: &str,
    event_type: &str,
) -> Result<Vec<u8>, serde_json::Error> {
    let text = content.get();
    if !text.starts_with('{') {
        return Err(serde::de::Error::custom("content is not an object"));
    }
    let mut out = Vec::with_capacity(text.len() + sender.len() + event_type.len() + 32);
    out.extend_from_slice(b"{\"content\":");
    let mut reader = serde_json::Deserializer::from_str(text);
    serde_transcode::transcode(&mut reader, &mut serde_json::Serializer::new(&mut out))?;
    out.extend_from_slice(b",\"sender\":");
    serde_json::to_writer(&mut out, sender)?;
    out.extend_from_slice(b",\"type\":");
    serde_json::to_writer(&mut out, event_type)?;
    out.push(b'}');
    Ok(out)
}

/// What processing a transaction produced, for logs and wake-ups.
#[derive(Debug, Default)]
pub struct Accepted {
    /// Local devices that got at least one message.
    pub woken: Vec<(String, String)>,
    pub delivered: usize,
    pub dropped_edus: usize,
    /// Messages left out of an accepted EDU: a content that is not a readable object.
    pub dropped_messages: usize,
    pub duplicate_edus: usize,
    pub other_edus: usize,
}

/// Turns a verified transaction from `origin` into inbox entries, durably.
/// `our_name` is this server's name; `edus` are the transaction's EDUs as received.
/// Returns `None` if `(origin, txn_id)` was seen.
pub async fn accept(
    store: &Store,
    our_name: &str,
    origin: &str,
    txn_id: &str,
    edus: &[&RawValue],
) -> Result<Option<Accepted>, StoreError> {
    let Some((accepted, ops)) = prepare(store, our_name, origin, txn_id, edus)? else {
        return Ok(None);
    };
    store.append(ops).await?;
    Ok(Some(accepted))
}

/// What [`accept`] writes, not yet written: the caller appends the ops (in one
/// [`Store::append`]) and only then may answer 200. `None` if `(origin, txn_id)`
/// was seen.
pub fn prepare(
    store: &Store,
    our_name: &str,
    origin: &str,
    txn_id: &str,
    edus: &[&RawValue],
) -> Result<Option<(Accepted, Vec<Append>)>, StoreError> {
    if store.seen(Marker::InboundTxn, &[origin, txn_id])? {
        return Ok(None);
    }
    let mut out = Accepted::default();
    // (user, device, event JSON) in arrival order.
    let mut entries: Vec<(String, String, Vec<u8>)> = Vec::new();
    let mut message_ids: Vec<Str<'_>> = Vec::new();
    // A user's devices, read once per transaction: for `*` and for checking named
    // devices (a transaction addresses the same devices again and again).
    let mut devices_cache: HashMap<Str<'_>, Vec<String>> = HashMap::new();
    for &raw in edus {
        let Some(received) = edu::read_edu(raw) else {
            tracing::info!(origin, "dropping EDU without edu_type");
            metrics::counter!("courier_inbound_edus_dropped_total").increment(1);
            out.dropped_edus += 1;
            continue;
        };
        if &*received.edu_type != DIRECT_TO_DEVICE {
            tracing::debug!(origin, edu_type = &*received.edu_type, "ignoring EDU type");
            metrics::counter!("courier_inbound_edus_ignored_total").increment(1);
            out.other_edus += 1;
            continue;
        }
        let td = match edu::parse_to_device(&received, origin) {
            Ok(td) => td,
            Err(e) => {
                tracing::warn!(origin, error = %e, "dropping malformed to-device EDU");
                metrics::counter!("courier_inbound_edus_dropped_total").increment(1);
                out.dropped_edus += 1;
                continue;
            }
        };
        if message_ids.contains(&td.message_id)
            || store.seen(Marker::MessageId, &[origin, &td.message_id])?
        {
            out.duplicate_edus += 1;
            metrics::counter!("courier_inbound_edus_duplicate_total").increment(1);
            continue;
        }
        for (user, devices) in &td.messages {
            let Ok(uid) = crate::ids::UserId::parse(user) else {
                continue;
            };
            if uid.server_name() != our_name {
                tracing::info!(
                    origin,
                    user = &**user,
                    "skipping recipient that is not ours"
                );
                continue;
            }
            let Some(devices) = edu::read_devices(devices) else {
                continue;
            };
            let known = match devices_cache.entry(user.clone()) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => e.insert(store.device_ids(user)?),
            };
            for (device, content) in &devices {
                let star = &**device == "*";
                if !star && !known.iter().any(|d| d == &**device) {
                    continue;
                }
                let event = match inbox_event(content, &td.sender, &td.event_type) {
                    Ok(event) => event,
                    Err(e) => {
                        tracing::warn!(origin, user = &**user, device = &**device, error = %e,
                            "dropping a message whose content is not a readable object");
                        metrics::counter!("courier_inbound_messages_dropped_total").increment(1);
                        out.dropped_messages += 1;
                        continue;
                    }
                };
                if star {
                    // A device also named explicitly gets its own message only, as
                    // for local sends: one message per device and message ID.
                    for d in known.iter() {
                        if !devices.iter().any(|(named, _)| **named == **d) {
                            entries.push((user.to_string(), d.clone(), event.clone()));
                        }
                    }
                } else {
                    entries.push((user.to_string(), device.to_string(), event));
                }
            }
        }
        message_ids.push(td.message_id);
    }
    let mut woken = HashSet::new();
    let mut ops: Vec<Append> = Vec::with_capacity(entries.len() + message_ids.len() + 1);
    out.delivered = entries.len();
    for (user, device, event) in entries {
        woken.insert((user.clone(), device.clone()));
        ops.push(Append::Inbox {
            user,
            device,
            event,
        });
    }
    out.woken = woken.into_iter().collect();
    for m in &message_ids {
        ops.push(Append::Mark {
            marker: Marker::MessageId,
            parts: vec![origin.to_owned(), m.to_string()],
        });
    }
    ops.push(Append::Mark {
        marker: Marker::InboundTxn,
        parts: vec![origin.to_owned(), txn_id.to_owned()],
    });
    Ok(Some((out, ops)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::temp_store;
    use serde_json::{Value, json};

    fn to_device(sender: &str, mid: &str, messages: Value) -> Value {
        json!({"edu_type": DIRECT_TO_DEVICE, "content": {"sender": sender, "type": "m.t", "message_id": mid, "messages": messages}})
    }

    /// EDUs as a transaction's bytes carry them.
    fn raw(edus: &[Value]) -> Vec<Box<RawValue>> {
        edus.iter()
            .map(|v| serde_json::value::to_raw_value(v).unwrap())
            .collect()
    }

    async fn accept_all(s: &Store, txn: &str, edus: &[Box<RawValue>]) -> Option<Accepted> {
        let refs: Vec<&RawValue> = edus.iter().map(|b| &**b).collect();
        accept(s, "me", "o", txn, &refs).await.unwrap()
    }

    #[tokio::test]
    async fn expands_dedupes_and_drops_bad_edus_alone() {
        let (_d, s) = temp_store();
        s.add_device("@bob:me", "B1").await.unwrap();
        s.add_device("@bob:me", "B2").await.unwrap();
        let edus = vec![
            to_device("@a:o", "m1", json!({"@bob:me": {"*": {"n": 1}}})),
            to_device("@a:o", "m1", json!({"@bob:me": {"*": {"n": 1}}})),
            to_device("@a:evil", "m2", json!({"@bob:me": {"B1": {"n": 2}}})),
            json!({"edu_type": "m.typing", "content": {}}),
            json!("garbage"),
            to_device(
                "@a:o",
                "m3",
                json!({"@bob:me": {"B1": {"n": 3}, "NOPE": {}}, "@carol:me": {"X": {}}, "@x:other": {"Y": {}}}),
            ),
        ];
        let edus = raw(&edus);
        let acc = accept_all(&s, "t1", &edus).await.unwrap();
        assert_eq!(acc.delivered, 3, "2 from *, 1 to B1");
        assert_eq!(acc.duplicate_edus, 1);
        assert_eq!(acc.dropped_edus, 2, "spoofed sender and garbage");
        assert_eq!(acc.other_edus, 1);
        assert_eq!(s.inbox_len("@bob:me", "B1").unwrap(), 2);
        assert_eq!(s.inbox_len("@bob:me", "B2").unwrap(), 1);
        // The same transaction again is not processed.
        assert!(accept_all(&s, "t1", &edus).await.is_none());
        // A new transaction repeating a message_id delivers nothing new.
        let acc = accept_all(&s, "t2", &edus[..1]).await.unwrap();
        assert_eq!((acc.delivered, acc.duplicate_edus), (0, 1));
        assert_eq!(s.inbox_len("@bob:me", "B1").unwrap(), 2);
        let page = s.inbox_page("@bob:me", "B1", 0, 10).unwrap();
        let ev: Value = serde_json::from_slice(&page[0].1).unwrap();
        assert_eq!(
            ev,
            json!({"sender": "@a:o", "type": "m.t", "content": {"n": 1}})
        );
    }

    /// `*` and a named device in one message: the named device gets its own
    /// content only (as for local sends), every other device the `*` content.
    #[tokio::test]
    async fn a_device_named_beside_star_gets_only_its_own_message() {
        let (_d, s) = temp_store();
        for d in ["B1", "B2", "B3"] {
            s.add_device("@bob:me", d).await.unwrap();
        }
        let edus = raw(&[to_device(
            "@a:o",
            "m1",
            json!({"@bob:me": {"*": {"n": "all"}, "B2": {"n": "two"}}}),
        )]);
        let acc = accept_all(&s, "t1", &edus).await.unwrap();
        assert_eq!(acc.delivered, 3, "{acc:?}");
        for (device, n) in [("B1", "all"), ("B2", "two"), ("B3", "all")] {
            let page = s.inbox_page("@bob:me", device, 0, 10).unwrap();
            let got: Vec<Value> = page
                .iter()
                .map(|(_, e)| serde_json::from_slice::<Value>(e).unwrap()["content"]["n"].clone())
                .collect();
            assert_eq!(got, [json!(n)], "{device}");
        }
    }

    /// Content nested deeper than a JSON tree holds (Synapse's parser holds 1000
    /// levels): that message is dropped, the EDU's others delivered, no panic.
    #[tokio::test]
    async fn content_nested_too_deep_is_dropped_alone() {
        let (_d, s) = temp_store();
        s.add_device("@bob:me", "B1").await.unwrap();
        s.add_device("@bob:me", "B2").await.unwrap();
        for levels in [200, 1000, 100_000] {
            let deep = format!("{}1{}", "[".repeat(levels), "]".repeat(levels));
            let edu = format!(
                r#"{{"edu_type":"m.direct_to_device","content":{{"sender":"@a:o","type":"m.t","message_id":"m{levels}","messages":{{"@bob:me":{{"B1":{{"d":{deep}}},"B2":{{"ok":1}}}}}}}}}}"#
            );
            let edus = vec![RawValue::from_string(edu).unwrap()];
            let acc = accept_all(&s, &format!("t{levels}"), &edus).await.unwrap();
            assert_eq!(
                (acc.delivered, acc.dropped_messages),
                (1, 1),
                "{levels}: {acc:?}"
            );
        }
        assert_eq!(s.inbox_len("@bob:me", "B1").unwrap(), 0);
        assert_eq!(s.inbox_len("@bob:me", "B2").unwrap(), 3);
    }

    #[tokio::test]
    async fn unreadable_contents_are_dropped_alone() {
        let (_d, s) = temp_store();
        s.add_device("@bob:me", "B1").await.unwrap();
        s.add_device("@bob:me", "B2").await.unwrap();
        s.add_device("@bob:me", "B\"3").await.unwrap();
        // Written by hand: a tree cannot hold some of these.
        let edus: Vec<Box<RawValue>> = [
            // B1: a lone surrogate; B2: a number no parser holds. Both dropped, the
            // EDU's other message kept.
            r#"{"edu_type":"m.direct_to_device","content":{"sender":"@a:o","type":"m.t","message_id":"m1","messages":{"@bob:me":{"B1":{"s":"\ud800"},"B2":{"n":1e400},"B\"3":{"ok":1}}}}}"#,
            // Not objects.
            r#"{"edu_type":"m.direct_to_device","content":{"sender":"@a:o","type":"m.t","message_id":"m2","messages":{"@bob:me":{"B1":"text","B2":[1]}}}}"#,
            // Spaced, escaped, keys out of order: served compact, the same values.
            r#"{ "content" : { "type" : "m.\u0074" , "messages" : { "@b\u006fb:me" : { "B1" : { "z" : [ 1 , 2.5 , "\u00e9\n" ] , "a" : { } } } } , "message_id" : "m3" , "sender" : "@a:o" } , "edu_type" : "m.direct_to_device" }"#,
        ]
        .iter()
        .map(|t| RawValue::from_string(t.to_string()).unwrap())
        .collect();
        let acc = accept_all(&s, "t1", &edus).await.unwrap();
        assert_eq!((acc.delivered, acc.dropped_messages), (2, 4), "{acc:?}");
        assert_eq!(acc.dropped_edus, 0);
        let page = s.inbox_page("@bob:me", "B\"3", 0, 10).unwrap();
        assert_eq!(
            std::str::from_utf8(&page[0].1).unwrap(),
            r#"{"content":{"ok":1},"sender":"@a:o","type":"m.t"}"#
        );
        let page = s.inbox_page("@bob:me", "B1", 0, 10).unwrap();
        assert_eq!(page.len(), 1);
        let text = std::str::from_utf8(&page[0].1).unwrap();
        assert!(!text.contains(' '), "{text}");
        let ev: Value = serde_json::from_str(text).unwrap();
        assert_eq!(
            ev,
            json!({"sender": "@a:o", "type": "m.t", "content": {"z": [1, 2.5, "\u{e9}\n"], "a": {}}})
        );
        assert_eq!(s.inbox_len("@bob:me", "B2").unwrap(), 0);
        // Every message ID was seen, dropped messages or not.
        let again = accept_all(&s, "t2", &edus).await.unwrap();
        assert_eq!((again.delivered, again.duplicate_edus), (0, 3));
    }

    #[test]
    fn one_transaction_per_origin_at_a_time() {
        let f = InFlight::default();
        let g = f.enter("o.test").expect("first");
        assert!(
            f.enter("o.test").is_none(),
            "second concurrent one is refused (429)"
        );
        assert!(f.enter("p.test").is_some(), "other origins are independent");
        drop(g);
        assert!(
            f.enter("o.test").is_some(),
            "released when the first finishes"
        );
    }
}
