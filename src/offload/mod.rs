//! Offload mode: courier takes custody of a homeserver's federation transactions.
//!
//! Two doors, each a listener resource:
//! - `offload` ([`proxy`]): the homeserver's outbound federation proxy (Synapse's
//!   `outbound_federation_restricted_to`). A `/send` carrying only EDUs is stored
//!   verbatim and answered `200 {"pdus": {}}` at once: custody has moved, and the
//!   homeserver forgets it. Every other request is streamed through to its
//!   destination and never stored.
//! - `edge` ([`edge`]): in front of the homeserver (its reverse proxy routes
//!   `/_matrix/federation/v1/send/` here). A verified EDU-only transaction is stored
//!   and answered 200; it is replayed verbatim to the homeserver.
//!
//! [`relay`] replays held transactions (one in flight per queue, in order, persisted
//! backoff); [`forward`] owns the pass-through plumbing. What is held lives in
//! `store::custody`. This module never signs anything: everything it carries was
//! signed by its origin, and is carried unchanged.

pub mod admin;
pub mod edge;
pub mod forward;
pub mod proxy;
pub mod relay;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};

use crate::app::App;
use crate::error::ApiError;
use crate::store::Append;
use crate::store::custody::{self, Dir, Envelope};
use crate::store::dedupe::Marker;
use crate::store::now_ms;

/// The path prefix of a federation transaction.
pub const SEND_PREFIX: &str = "/_matrix/federation/v1/send/";

/// The (percent-decoded) txnId of a `/send` path, if it is one.
pub fn send_txn_id(path: &str) -> Option<String> {
    let raw = path.strip_prefix(SEND_PREFIX)?;
    if raw.is_empty() || raw.contains('/') {
        return None;
    }
    Some(
        percent_encoding::percent_decode_str(raw)
            .decode_utf8_lossy()
            .into_owned(),
    )
}

/// Is a `/send` with this body taken into custody under `[offload] custody`? With
/// `edus`, only a readable body without PDUs is; anything else is passed through.
pub fn takes_custody(custody: crate::config::Custody, body: &[u8]) -> bool {
    match custody {
        crate::config::Custody::All => true,
        crate::config::Custody::Edus => carries_pdus(body) == Some(false),
    }
}

/// May this request target be handed to an HTTP client for the homeserver? Clients
/// (reqwest, through the `url` crate) resolve `.` and `..` segments, read `%2e` as a
/// dot and `\\` as a `/` before sending, so `/_matrix/federation/../../_synapse/admin`
/// would leave the federation prefix the edge checked. Such targets are refused: no
/// homeserver publishes a federation endpoint whose path needs them.
pub fn plain_target(target: &str) -> bool {
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    !path.contains('\\')
        && path.split('/').all(|segment| {
            let dots = segment.to_ascii_lowercase().replace("%2e", ".");
            dots != "." && dots != ".."
        })
}

/// The request target as received: path and query (`/` if there is none).
pub fn request_target(uri: &axum::http::Uri) -> String {
    uri.path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| uri.path().to_owned())
}

/// Does a `/send` body carry PDUs? (`None`: not a JSON object we can read.)
fn carries_pdus(body: &[u8]) -> Option<bool> {
    #[derive(serde::Deserialize)]
    struct Shape {
        #[serde(default)]
        pdus: Vec<serde::de::IgnoredAny>,
    }
    serde_json::from_slice::<Shape>(body)
        .ok()
        .map(|s| !s.pdus.is_empty())
}

/// Takes a transaction into custody: durable (fsync) before it returns, then queued
/// for replay. A `(dir, queue, txnId)` already held is not stored again (the sender
/// retried after losing our answer); both calls answer the same.
pub async fn hold(
    app: &App,
    dir: Dir,
    queue: &str,
    txn_id: &str,
    path: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<(), ApiError> {
    let lane = format!("{}\0{queue}", dir.tag());
    let _guard = app.custody_inflight.enter(&lane).ok_or_else(|| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "M_UNKNOWN",
            "too many concurrent transactions",
        )
    })?;
    let labels = [("direction", dir.tag())];
    if app
        .store
        .seen(Marker::CustodyTxn, &[dir.tag(), queue, txn_id])?
    {
        tracing::debug!(
            direction = dir.tag(),
            queue,
            txn = txn_id,
            "transaction already held"
        );
        metrics::counter!("courier_offload_repeats_total", &labels).increment(1);
        return Ok(());
    }
    let envelope = Envelope {
        txn_id: txn_id.to_owned(),
        path: path.to_owned(),
        headers: forward::kept_for_replay(headers),
        received_ts: now_ms(),
    };
    app.store
        .append(vec![
            Append::Held {
                dir,
                queue: queue.to_owned(),
                record: custody::encode(&envelope, &body),
            },
            Append::Mark {
                marker: Marker::CustodyTxn,
                parts: vec![dir.tag().to_owned(), queue.to_owned(), txn_id.to_owned()],
            },
        ])
        .await?;
    metrics::counter!("courier_offload_held_total", &labels).increment(1);
    tracing::debug!(
        direction = dir.tag(),
        queue,
        txn = txn_id,
        bytes = body.len(),
        "transaction held"
    );
    app.relay.wake(dir, queue);
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn targets_with_dot_segments_or_backslashes_are_not_plain() {
        for ok in [
            "/_matrix/federation/v1/version",
            "/_matrix/federation/v1/send/1701.2",
            "/_matrix/key/v2/query/a.b?minimum_valid_until_ts=1",
            "/_matrix/federation/v1/user/devices/@a:b.c",
            "/_matrix/federation/v1/x/...",
            "/_matrix/federation/v1/x?y=../..",
        ] {
            assert!(super::plain_target(ok), "{ok}");
        }
        for bad in [
            "/_matrix/federation/../../_synapse/admin/v1/server_version",
            "/_matrix/federation/%2e%2e/%2E%2E/_synapse/admin",
            "/_matrix/federation/.%2e/_synapse",
            "/_matrix/federation/v1/send/x/..\\..\\_synapse",
            "/_matrix/federation/v1/send/..\\x",
            "/_matrix/federation/./v1/version",
        ] {
            assert!(!super::plain_target(bad), "{bad}");
        }
    }

    use super::*;

    #[test]
    fn send_paths_and_txn_ids() {
        assert_eq!(
            send_txn_id("/_matrix/federation/v1/send/17%2F3").as_deref(),
            Some("17/3")
        );
        assert_eq!(send_txn_id("/_matrix/federation/v1/send/"), None);
        assert_eq!(send_txn_id("/_matrix/federation/v1/send/a/b"), None);
        assert_eq!(send_txn_id("/_matrix/federation/v1/query/profile"), None);
    }

    #[test]
    fn pdus_are_detected() {
        assert_eq!(carries_pdus(br#"{"edus":[{}]}"#), Some(false));
        assert_eq!(carries_pdus(br#"{"pdus":[],"edus":[]}"#), Some(false));
        assert_eq!(carries_pdus(br#"{"pdus":[{"x":1}]}"#), Some(true));
        assert_eq!(carries_pdus(b"not json"), None);
        assert_eq!(carries_pdus(br#"{"pdus":3}"#), None);
    }
}
