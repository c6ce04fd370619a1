//! `PUT /_matrix/client/v3/sendToDevice/{eventType}/{txnId}`: from a client's request
//! to durable inbox entries (our users) and queued EDUs (other servers).
//!
//! Owns the request's rules:
//! - the body is `{"messages": {user_id: {device_id | "*": content}}}`; not JSON is
//!   `M_NOT_JSON`, a wrong shape `M_BAD_JSON`, a key that is not a user or device ID
//!   `M_INVALID_PARAM`; one content over `client.max_message_bytes` (serialized) fails
//!   the whole request with 413 `M_TOO_LARGE`, as Synapse does, and so does a body over
//!   `client.max_request_bytes`;
//! - `(user, device, eventType, txnId)` is processed once: the marker is written in the
//!   same batch as the messages, so a retransmission, even after a restart, answers
//!   `{}` and delivers nothing; a retransmission that arrives while the first attempt
//!   is still being written waits for it (see [`TxnLocks`]);
//! - for our users, `*` means the devices the user has now; a device named explicitly
//!   wins over `*` for that device, so each device gets one message per request;
//!   unknown users and devices are skipped silently, as the spec says;
//! - other servers' users are grouped by server name and packed into
//!   `m.direct_to_device` EDUs by `federation::edu::pack_to_device`.
//!
//! Everything one request produces, with its marker, is ONE synced batch; the 200 is
//! sent only after it is on disk. Wake-ups (sync long-polls, the federation sender)
//! follow the commit. This module never talks to another server itself and never
//! reads a device inbox.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use futures::StreamExt;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tokio::sync::Notify;

use super::auth::Device;
use super::json::Json as ReadJson;
use crate::app::App;
use crate::error::ApiError;
use crate::federation::edu::{Messages, pack_to_device};
use crate::ids::{UserId, valid_device_id};
use crate::store::dedupe::Marker;
use crate::store::{Append, Store, StoreError};

/// Longest `eventType` or `txnId` accepted in the path, in bytes.
const MAX_PATH_PARAM_BYTES: usize = 255;

/// The handler. Extractor order matters: the token is checked before anything else.
pub async fn send_to_device(
    State(app): State<App>,
    device: Device,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let started = std::time::Instant::now();
    let Path((event_type, txn_id)) = path.map_err(|e| ApiError::invalid_param(e.body_text()))?;
    check_path_param("eventType", &event_type)?;
    check_path_param("txnId", &txn_id)?;
    let body = read_body(body, app.config.client.max_request_bytes).await?;

    let txn = [
        device.user_id.as_str(),
        device.device_id.as_str(),
        event_type.as_str(),
        txn_id.as_str(),
    ];
    let guard = app.txn_locks.lock(txn.join("\0")).await;
    if app.store.seen(Marker::ClientTxn, &txn)? {
        tracing::debug!(user = %device.user_id, device = %device.device_id, txn = %txn_id, "sendToDevice retransmission; nothing delivered");
        metrics::counter!("courier_client_txn_repeats_total").increment(1);
        return Ok(Json(json!({})));
    }
    let request = parse(
        &body,
        app.config.server_name.as_str(),
        app.config.client.max_message_bytes,
    )?;
    let devices_stable = app.store.devices_stable().await;
    let local = local_deliveries(&app.store, &device.user_id, &event_type, &request.local)?;
    let edus: Vec<(String, Vec<u8>)> = request
        .remote
        .iter()
        .flat_map(|(dest, messages)| {
            pack_to_device(&device.user_id, &event_type, messages)
                .into_iter()
                .map(move |edu| (dest.clone(), edu))
        })
        .collect();

    // Commit and wake in a task of their own: a client that hangs up mid-commit must
    // not leave its recipients unwoken, nor release the txn lock before the marker is
    // on disk.
    let woken: BTreeSet<(String, String)> = local
        .iter()
        .map(|(u, d, _)| (u.clone(), d.clone()))
        .collect();
    let mut per_dest: BTreeMap<String, u64> = BTreeMap::new();
    for (dest, _) in &edus {
        *per_dest.entry(dest.clone()).or_default() += 1;
    }
    if let Err(full) = app
        .sender
        .admit(per_dest.iter().map(|(d, n)| (d.as_str(), *n)))
    {
        return Err(ApiError::limit_exceeded(
            format!("the queue for {full} is full; try again later"),
            30,
        ));
    }
    // One append: the writer numbers the rows in order and writes them, with the
    // txn marker, in one synced batch.
    let mut ops: Vec<Append> = Vec::with_capacity(local.len() + edus.len() + 1);
    ops.extend(
        local
            .into_iter()
            .map(|(user, device, event)| Append::Inbox {
                user,
                device,
                event,
            }),
    );
    ops.extend(
        edus.into_iter()
            .map(|(dest, edu)| Append::Outbox { dest, edu }),
    );
    ops.push(Append::Mark {
        marker: Marker::ClientTxn,
        parts: txn.iter().map(|p| p.to_string()).collect(),
    });
    let task_app = app.clone();
    let committed = tokio::spawn(async move {
        task_app.store.append(ops).await?;
        drop(devices_stable);
        drop(guard);
        for (user, dev) in &woken {
            task_app.notifier.wake_device(user, dev);
        }
        for (dest, n) in &per_dest {
            task_app.sender.enqueued(dest, *n);
        }
        Ok::<_, StoreError>((woken.len(), per_dest.len()))
    })
    .await
    .map_err(ApiError::internal)??;
    metrics::counter!("courier_client_local_messages_total").increment(committed.0 as u64);
    metrics::histogram!("courier_send_to_device_seconds").record(started.elapsed().as_secs_f64());
    tracing::debug!(
        sender = %device.user_id, event_type = %event_type, txn = %txn_id,
        local_devices = committed.0, destinations = committed.1,
        "sendToDevice accepted"
    );
    Ok(Json(json!({})))
}

fn check_path_param(name: &str, value: &str) -> Result<(), ApiError> {
    if value.is_empty() || value.len() > MAX_PATH_PARAM_BYTES || value.chars().any(char::is_control)
    {
        return Err(ApiError::invalid_param(format!(
            "`{name}` must be 1 to {MAX_PATH_PARAM_BYTES} bytes without control characters"
        )));
    }
    Ok(())
}

/// Reads the body, refusing it with 413 `M_TOO_LARGE` as soon as it passes `limit`
/// (without buffering the excess).
async fn read_body(body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::bad_json(format!("cannot read the request body: {e}")))?;
        if buf.len() + chunk.len() > limit {
            return Err(ApiError::too_large(format!(
                "request body over {limit} bytes"
            )));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

/// A checked request, split by where its messages go.
#[derive(Debug, Default)]
pub struct Request {
    /// Our users: user -> (device or `*`, serialized content), in key order.
    pub local: Messages,
    /// Other servers: server name -> the same, for that server's users.
    pub remote: BTreeMap<String, Messages>,
}

/// Checks a request body and splits it between `our_server`'s users and the others.
/// Every message is checked before anything is accepted: one bad message fails the
/// whole request, so a client never has to guess which half went through.
pub fn parse(body: &[u8], our_server: &str, max_message_bytes: usize) -> Result<Request, ApiError> {
    // Read in place (`client::json`): each content is written back exactly as a
    // `serde_json::Value` of it would be, without building an owned tree first.
    let mut top: ReadJson = serde_json::from_slice(body)
        .map_err(|e| ApiError::not_json(format!("body is not JSON: {e}")))?;
    if top.as_object().is_none() {
        return Err(ApiError::bad_json("body is not a JSON object"));
    }
    let Some(ReadJson::Object(messages)) = top.take("messages") else {
        return Err(ApiError::bad_json("`messages` is missing or not an object"));
    };
    let mut out = Request::default();
    for (user, devices) in messages {
        let uid = UserId::parse(&user).map_err(|e| ApiError::invalid_param(e.to_string()))?;
        let ReadJson::Object(devices) = devices else {
            return Err(ApiError::bad_json(format!(
                "`messages.{user}` is not an object"
            )));
        };
        let local = uid.server_name() == our_server;
        let mut parsed = Vec::with_capacity(devices.len());
        for (device, content) in devices {
            if device != "*" && !valid_device_id(&device) {
                return Err(ApiError::invalid_param(format!(
                    "`{device}` (for {user}) is not a device ID"
                )));
            }
            if content.as_object().is_none() {
                return Err(ApiError::bad_json(format!(
                    "the content for {user} / {device} is not an object"
                )));
            }
            let raw = serde_json::value::to_raw_value(&content).map_err(ApiError::internal)?;
            let size = raw.get().len();
            if size > max_message_bytes {
                return Err(ApiError::too_large(format!(
                    "the message for {user} / {device} is {size} bytes; the limit is {max_message_bytes}"
                )));
            }
            parsed.push((device.into_owned(), raw));
        }
        let user = user.into_owned();
        if local {
            out.local.insert(user, parsed);
        } else {
            out.remote
                .entry(uid.server_name().to_owned())
                .or_default()
                .insert(user, parsed);
        }
    }
    Ok(out)
}

/// A to-device event as a device's `/sync` serves it.
#[derive(Serialize)]
struct LocalEvent<'a> {
    sender: &'a str,
    #[serde(rename = "type")]
    event_type: &'a str,
    content: &'a RawValue,
}

/// The inbox entries for our users: `(user, device, event JSON)`, `*` expanded to the
/// user's current devices, unknown users and devices left out.
pub fn local_deliveries(
    store: &Store,
    sender: &str,
    event_type: &str,
    local: &Messages,
) -> Result<Vec<(String, String, Vec<u8>)>, StoreError> {
    let event = |content: &RawValue| {
        serde_json::to_vec(&LocalEvent {
            sender,
            event_type,
            content,
        })
        .expect("strings and raw JSON serialize")
    };
    let mut out = Vec::new();
    for (user, devices) in local {
        let star = devices.iter().find(|(d, _)| d == "*").map(|(_, c)| c);
        let explicit: HashSet<&str> = devices
            .iter()
            .filter(|(d, _)| d != "*")
            .map(|(d, _)| d.as_str())
            .collect();
        if let Some(content) = star {
            let bytes = event(content);
            for d in store.device_ids(user)? {
                if !explicit.contains(d.as_str()) {
                    out.push((user.clone(), d, bytes.clone()));
                }
            }
        }
        for (d, content) in devices {
            if d != "*" && store.device_exists(user, d)? {
                out.push((user.clone(), d.clone(), event(content)));
            }
        }
    }
    Ok(out)
}

/// Serializes concurrent attempts of the same `(user, device, eventType, txnId)`: a
/// client that times out and retransmits while its first attempt is still being
/// written must wait for it, then see its marker, instead of delivering twice.
/// In memory only (the marker in the store is the durable half), one per server
/// (`App::txn_locks`).
#[derive(Default)]
pub struct TxnLocks {
    held: Mutex<HashSet<String>>,
    released: Notify,
}

/// Holds one transaction key; releasing it wakes whoever waits for it.
pub struct TxnGuard {
    locks: Arc<TxnLocks>,
    key: String,
}

impl TxnLocks {
    pub async fn lock(self: &Arc<Self>, key: String) -> TxnGuard {
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if self.held.lock().expect("txn locks").insert(key.clone()) {
                return TxnGuard {
                    locks: self.clone(),
                    key,
                };
            }
            released.await;
        }
    }
}

impl Drop for TxnGuard {
    fn drop(&mut self) {
        self.locks.held.lock().expect("txn locks").remove(&self.key);
        self.locks.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::temp_store;

    fn code(body: &str) -> &'static str {
        parse(body.as_bytes(), "me", 100)
            .err()
            .map(|e| e.errcode)
            .unwrap_or("OK")
    }

    #[test]
    fn body_errors_map_to_matrix_codes() {
        assert_eq!(code("{"), "M_NOT_JSON");
        assert_eq!(code("[]"), "M_BAD_JSON");
        assert_eq!(code("{}"), "M_BAD_JSON");
        assert_eq!(code(r#"{"messages": []}"#), "M_BAD_JSON");
        assert_eq!(code(r#"{"messages": {"@b:me": []}}"#), "M_BAD_JSON");
        assert_eq!(
            code(r#"{"messages": {"@b:me": {"D": "text"}}}"#),
            "M_BAD_JSON"
        );
        assert_eq!(
            code(r#"{"messages": {"bob": {"D": {}}}}"#),
            "M_INVALID_PARAM"
        );
        assert_eq!(
            code(r#"{"messages": {"@b:me": {"": {}}}}"#),
            "M_INVALID_PARAM"
        );
        assert_eq!(
            code(r#"{"messages": {"@b:me": {"D\u0001": {}}}}"#),
            "M_INVALID_PARAM"
        );
        let big = format!(
            r#"{{"messages": {{"@b:other": {{"D": {{"x": "{}"}}}}}}}}"#,
            "y".repeat(100)
        );
        assert_eq!(
            code(&big),
            "M_TOO_LARGE",
            "the limit applies to remote messages too"
        );
        assert_eq!(code(r#"{"messages": {}}"#), "OK");
    }

    #[test]
    fn splits_local_and_remote() {
        let body = r#"{"messages": {
            "@a:me": {"*": {"n": 1}, "D1": {"n": 2}},
            "@b:other": {"X": {"n": 3}},
            "@c:other": {"*": {"n": 4}},
            "@d:third:8448": {"Y": {"n": 5}}
        }}"#;
        let r = parse(body.as_bytes(), "me", 1000).unwrap();
        assert_eq!(r.local.len(), 1);
        assert_eq!(r.local["@a:me"].len(), 2);
        assert_eq!(
            r.remote.keys().collect::<Vec<_>>(),
            vec!["other", "third:8448"]
        );
        assert_eq!(r.remote["other"].len(), 2);
    }

    #[tokio::test]
    async fn star_expands_explicit_wins_unknown_skipped() {
        let (_d, s) = temp_store();
        s.add_device("@a:me", "D1").await.unwrap();
        s.add_device("@a:me", "D2").await.unwrap();
        let body = r#"{"messages": {
            "@a:me": {"*": {"n": "star"}, "D1": {"n": "one"}, "GONE": {"n": "x"}},
            "@nobody:me": {"*": {"n": "x"}, "D": {"n": "x"}}
        }}"#;
        let r = parse(body.as_bytes(), "me", 1000).unwrap();
        let mut out = local_deliveries(&s, "@s:me", "m.t", &r.local).unwrap();
        out.sort();
        let got: Vec<(&str, Value)> = out
            .iter()
            .map(|(_, d, e)| (d.as_str(), serde_json::from_slice(e).unwrap()))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "D1",
                    json!({"sender": "@s:me", "type": "m.t", "content": {"n": "one"}})
                ),
                (
                    "D2",
                    json!({"sender": "@s:me", "type": "m.t", "content": {"n": "star"}})
                ),
            ]
        );
    }

    #[tokio::test]
    async fn a_second_attempt_waits_for_the_first() {
        let locks = Arc::new(TxnLocks::default());
        let first = locks.lock("k".into()).await;
        let other = locks.lock("other".into()).await;
        let waiting = locks.lock("k".into());
        tokio::pin!(waiting);
        assert!(futures::poll!(waiting.as_mut()).is_pending());
        drop(other);
        assert!(
            futures::poll!(waiting.as_mut()).is_pending(),
            "another key's release is not ours"
        );
        drop(first);
        assert!(futures::poll!(waiting.as_mut()).is_ready());
    }

    #[test]
    fn path_params() {
        assert!(check_path_param("txnId", "abc.1-_~").is_ok());
        assert!(check_path_param("txnId", "").is_err());
        assert!(check_path_param("txnId", "a\nb").is_err());
        assert!(check_path_param("txnId", &"x".repeat(256)).is_err());
    }
}
