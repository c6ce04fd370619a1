//! Inbound transactions: from a verified `/send` body to durable inbox entries.
//!
//! Owns the per-EDU rules: only `m.direct_to_device` is kept; its `sender` must belong
//! to the origin; `(origin, message_id)` is processed once; `*` expands to the
//! recipient's devices at arrival; recipients on other servers, unknown users and
//! unknown devices are skipped. One malformed EDU is dropped and counted; the rest of
//! the transaction is accepted (a 400 for the whole would wedge the origin's queue).
//! Everything a transaction yields, with its `(origin, txnId)` marker, is one synced
//! batch: durable before the 200. It never authenticates (see `auth`) and never sends.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use serde_json::Value;

use crate::federation::edu::{self, DIRECT_TO_DEVICE};
use crate::store::dedupe::Marker;
use crate::store::{Append, Store, StoreError};

/// Transactions from one origin may not run concurrently (Synapse answers 429 too).
#[derive(Default)]
pub struct InFlight {
    origins: Mutex<HashSet<String>>,
}

/// Removes the origin from the in-flight set when dropped.
pub struct InFlightGuard<'a> {
    set: &'a InFlight,
    origin: String,
}

impl InFlight {
    pub fn enter(&self, origin: &str) -> Option<InFlightGuard<'_>> {
        let mut s = self.origins.lock().expect("inflight");
        if !s.insert(origin.to_owned()) {
            return None;
        }
        Some(InFlightGuard {
            set: self,
            origin: origin.to_owned(),
        })
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.set
            .origins
            .lock()
            .expect("inflight")
            .remove(&self.origin);
    }
}

/// A to-device event as a device's `/sync` serves it, serialized without copying
/// the content (fields in the order a sorted map would write them).
#[derive(serde::Serialize)]
struct StoredEvent<'a> {
    content: &'a Value,
    sender: &'a str,
    #[serde(rename = "type")]
    event_type: &'a str,
}

/// What processing a transaction produced, for logs and wake-ups.
#[derive(Debug, Default)]
pub struct Accepted {
    /// Local devices that got at least one message.
    pub woken: Vec<(String, String)>,
    pub delivered: usize,
    pub dropped_edus: usize,
    pub duplicate_edus: usize,
    pub other_edus: usize,
}

/// Turns a verified transaction from `origin` into inbox entries, durably.
/// `our_name` is this server's name. Returns `None` if `(origin, txn_id)` was seen.
pub async fn accept(
    store: &Store,
    our_name: &str,
    origin: &str,
    txn_id: &str,
    edus: &[Value],
) -> Result<Option<Accepted>, StoreError> {
    if store.seen(Marker::InboundTxn, &[origin, txn_id])? {
        return Ok(None);
    }
    let mut out = Accepted::default();
    // (user, device, event JSON) in arrival order.
    let mut entries: Vec<(String, String, Vec<u8>)> = Vec::new();
    let mut message_ids: Vec<&str> = Vec::new();
    // A user's devices, read once per transaction: for `*` and for checking named
    // devices (a transaction addresses the same devices again and again).
    let mut devices_cache: HashMap<&str, Vec<String>> = HashMap::new();
    for raw in edus {
        match edu::edu_type(raw) {
            Some(DIRECT_TO_DEVICE) => {}
            Some(other) => {
                tracing::debug!(origin, edu_type = other, "ignoring EDU type");
                metrics::counter!("courier_inbound_edus_ignored_total").increment(1);
                out.other_edus += 1;
                continue;
            }
            None => {
                tracing::info!(origin, "dropping EDU without edu_type");
                metrics::counter!("courier_inbound_edus_dropped_total").increment(1);
                out.dropped_edus += 1;
                continue;
            }
        }
        let td = match edu::parse_to_device(raw, origin) {
            Ok(td) => td,
            Err(e) => {
                tracing::warn!(origin, error = %e, "dropping malformed to-device EDU");
                metrics::counter!("courier_inbound_edus_dropped_total").increment(1);
                out.dropped_edus += 1;
                continue;
            }
        };
        if message_ids.contains(&td.message_id)
            || store.seen(Marker::MessageId, &[origin, td.message_id])?
        {
            out.duplicate_edus += 1;
            metrics::counter!("courier_inbound_edus_duplicate_total").increment(1);
            continue;
        }
        message_ids.push(td.message_id);
        for (user, devices) in td.messages {
            let Ok(uid) = crate::ids::UserId::parse(user) else {
                continue;
            };
            if uid.server_name() != our_name {
                tracing::info!(origin, user = %user, "skipping recipient that is not ours");
                continue;
            }
            let Some(devices) = devices.as_object() else {
                continue;
            };
            for (device, content) in devices {
                let event = serde_json::to_vec(&StoredEvent {
                    content,
                    sender: td.sender,
                    event_type: td.event_type,
                })
                .expect("a Value serializes");
                let known = match devices_cache.entry(user.as_str()) {
                    Entry::Occupied(e) => e.into_mut(),
                    Entry::Vacant(e) => e.insert(store.device_ids(user)?),
                };
                if device == "*" {
                    for d in known.iter() {
                        entries.push((user.clone(), d.clone(), event.clone()));
                    }
                } else if known.contains(device) {
                    entries.push((user.clone(), device.clone(), event));
                }
            }
        }
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
            parts: vec![origin.to_owned(), (*m).to_owned()],
        });
    }
    ops.push(Append::Mark {
        marker: Marker::InboundTxn,
        parts: vec![origin.to_owned(), txn_id.to_owned()],
    });
    store.append(ops).await?;
    metrics::counter!("courier_inbound_messages_total").increment(out.delivered as u64);
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::temp_store;
    use serde_json::json;

    fn to_device(sender: &str, mid: &str, messages: Value) -> Value {
        json!({"edu_type": DIRECT_TO_DEVICE, "content": {"sender": sender, "type": "m.t", "message_id": mid, "messages": messages}})
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
        let acc = accept(&s, "me", "o", "t1", &edus).await.unwrap().unwrap();
        assert_eq!(acc.delivered, 3, "2 from *, 1 to B1");
        assert_eq!(acc.duplicate_edus, 1);
        assert_eq!(acc.dropped_edus, 2, "spoofed sender and garbage");
        assert_eq!(acc.other_edus, 1);
        assert_eq!(s.inbox_len("@bob:me", "B1").unwrap(), 2);
        assert_eq!(s.inbox_len("@bob:me", "B2").unwrap(), 1);
        // The same transaction again is not processed.
        assert!(accept(&s, "me", "o", "t1", &edus).await.unwrap().is_none());
        // A new transaction repeating a message_id delivers nothing new.
        let acc = accept(&s, "me", "o", "t2", &edus[..1])
            .await
            .unwrap()
            .unwrap();
        assert_eq!((acc.delivered, acc.duplicate_edus), (0, 1));
        assert_eq!(s.inbox_len("@bob:me", "B1").unwrap(), 2);
        let page = s.inbox_page("@bob:me", "B1", 0, 10).unwrap();
        let ev: Value = serde_json::from_slice(&page[0].1).unwrap();
        assert_eq!(
            ev,
            json!({"sender": "@a:o", "type": "m.t", "content": {"n": 1}})
        );
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
