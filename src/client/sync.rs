//! `GET /_matrix/client/v3/sync`, reduced to what a to-device relay has: the device's
//! inbox, acknowledged by the next `since`.
//!
//! Owns the delivery rules:
//! - tokens are `s<seq>`: the inbox position of the last event served. A sync with
//!   `since=T` first acknowledges (deletes) everything up to `T`, then serves up to
//!   [`PAGE`] events after `T`, oldest first; `next_batch` is the position of the last
//!   one, or, if there is none, `T` (or the device's low-water mark if that is higher).
//!   An older token therefore gets again whatever it did not acknowledge;
//! - a token that is not `s<digits>`, or names a position this server never handed
//!   out, is refused with 400 `M_INVALID_PARAM` rather than treated as "no token": a
//!   client that sends garbage must find out, not silently never acknowledge (and a
//!   token from the future would delete messages not yet served);
//! - with nothing pending, the request waits up to `timeout` ms (at most
//!   [`MAX_TIMEOUT`]) and returns as soon as a message arrives; with more than a page
//!   pending the next sync returns at once;
//! - every sync records the device's activity (`last_sync_ts`), which the inactivity
//!   purge in `housekeeping` reads.
//!
//! The response is a complete, spec-valid sync body (empty rooms, presence, account
//! data, device lists) so standard client libraries accept it. Events are served as
//! stored, byte for byte. `filter`, `full_state` and `set_presence` are accepted and
//! ignored. This module never writes an inbox entry, only acknowledgements.

use std::pin::Pin;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio::sync::futures::Notified;
use tokio::time::Instant;

use super::auth::Device;
use crate::app::App;
use crate::error::ApiError;
use crate::store::Batch;

/// Most to-device events in one response (the spec's recommendation, Synapse's limit).
pub const PAGE: usize = 100;
/// Longest long-poll, whatever the client asks for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(300);

/// The query parameters courier reads; the others (`filter`, `full_state`,
/// `set_presence`, the deprecated `access_token`) are ignored.
#[derive(Debug, Default, Deserialize)]
pub struct Params {
    pub since: Option<String>,
    pub timeout: Option<String>,
}

#[derive(Serialize)]
struct SyncBody<'a> {
    next_batch: String,
    to_device: Events<&'a RawValue>,
    rooms: Value,
    presence: Events<Value>,
    account_data: Events<Value>,
    device_lists: Value,
    device_one_time_keys_count: Value,
}

#[derive(Serialize)]
struct Events<T> {
    events: Vec<T>,
}

/// The handler.
pub async fn sync(
    State(app): State<App>,
    device: Device,
    params: Result<Query<Params>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::invalid_param(e.body_text()))?;
    let since = params.since.as_deref().map(parse_token).transpose()?;
    let timeout = parse_timeout(params.timeout.as_deref())?;
    let (user, dev) = (device.user_id.as_str(), device.device_id.as_str());
    let store = &app.store;

    // Acknowledge first: whatever happens next, what the client confirmed is gone.
    let after = since.unwrap_or(0);
    if after > store.last_seq() {
        return Err(ApiError::invalid_param(
            "`since` names a position this server never handed out",
        ));
    }
    // Serve only rows the writer has published (`last_seq`): a row is readable a
    // moment before its number is, and a token we hand out must never be one we would
    // refuse as "never handed out".
    let visible = |published: u64, mut page: Vec<(u64, Vec<u8>)>| {
        page.retain(|(seq, _)| *seq <= published);
        page
    };
    // A long poll registers for wake-ups before it first reads, so a message
    // committed after that read still wakes it, and an empty first read can wait
    // at once instead of reading again.
    let notify = (!timeout.is_zero()).then(|| app.notifier.device(user, dev));
    let woken = notify.as_deref().map(registered);
    // One pass: the acknowledgement (in `b`) and the page after it.
    let published = store.last_seq();
    let mut b = Batch::new();
    let (page, state) = store.inbox_sync(&mut b, user, dev, after, PAGE)?;
    // Unsynced: losing an acknowledgement to a power cut only re-delivers a page.
    store.commit_unsynced(b)?;
    let mut page = visible(published, page);
    // Later reads start above the mark this sync has just written.
    let above = after.max(state.acked);
    let read_page = || -> Result<Vec<(u64, Vec<u8>)>, ApiError> {
        let published = store.last_seq();
        Ok(visible(
            published,
            store.inbox_page_above(user, dev, above, PAGE)?,
        ))
    };
    if let (true, Some(notify), Some(mut waiting)) = (page.is_empty(), notify.as_deref(), woken) {
        let deadline = Instant::now() + timeout;
        loop {
            if tokio::time::timeout_at(deadline, waiting.as_mut())
                .await
                .is_err()
            {
                page = read_page()?;
                break;
            }
            // Register again before re-reading, for the same reason as above.
            waiting = registered(notify);
            page = read_page()?;
            if !page.is_empty() {
                break;
            }
        }
    }

    let next = match page.last() {
        Some((seq, _)) => *seq,
        None => after.max(state.acked),
    };
    let events: Vec<&RawValue> = page
        .iter()
        .filter_map(|(seq, bytes)| match serde_json::from_slice::<&RawValue>(bytes) {
            Ok(raw) => Some(raw),
            Err(e) => {
                tracing::error!(user, device = dev, seq, error = %e, "unreadable inbox entry skipped");
                None
            }
        })
        .collect();
    if !events.is_empty() {
        metrics::counter!("courier_sync_events_served_total").increment(events.len() as u64);
    }
    let body = SyncBody {
        next_batch: format_token(next),
        to_device: Events { events },
        rooms: json!({"join": {}, "invite": {}, "leave": {}, "knock": {}}),
        presence: Events { events: Vec::new() },
        account_data: Events { events: Vec::new() },
        device_lists: json!({"changed": [], "left": []}),
        device_one_time_keys_count: json!({}),
    };
    // Serialized here, while the borrowed events are alive; raw events are copied
    // into the body as they are, never parsed into a tree.
    let bytes = serde_json::to_vec(&body).map_err(ApiError::internal)?;
    Ok(([(CONTENT_TYPE, "application/json")], bytes).into_response())
}

/// A wake-up for `notify`, counted from now on (not from its first poll).
fn registered(notify: &Notify) -> Pin<Box<Notified<'_>>> {
    let mut woken = Box::pin(notify.notified());
    woken.as_mut().enable();
    woken
}

/// `s<seq>` for an inbox position.
pub fn format_token(seq: u64) -> String {
    format!("s{seq}")
}

/// The position in an `s<seq>` token.
pub fn parse_token(token: &str) -> Result<u64, ApiError> {
    token
        .strip_prefix('s')
        .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|d| d.parse().ok())
        .ok_or_else(|| ApiError::invalid_param("`since` is not a token this server gave out"))
}

/// `timeout` in milliseconds (absent: 0), capped at [`MAX_TIMEOUT`].
pub fn parse_timeout(timeout: Option<&str>) -> Result<Duration, ApiError> {
    let Some(t) = timeout else {
        return Ok(Duration::ZERO);
    };
    let ms: u64 = t
        .parse()
        .map_err(|_| ApiError::invalid_param("`timeout` is not a number of milliseconds"))?;
    Ok(Duration::from_millis(ms).min(MAX_TIMEOUT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_garbage_is_refused() {
        assert_eq!(parse_token(&format_token(42)).unwrap(), 42);
        assert_eq!(parse_token("s0").unwrap(), 0);
        for bad in [
            "",
            "s",
            "42",
            "s-1",
            "s1x",
            "s+1",
            "t1",
            "s99999999999999999999999",
        ] {
            assert_eq!(
                parse_token(bad).unwrap_err().errcode,
                "M_INVALID_PARAM",
                "{bad}"
            );
        }
    }

    #[test]
    fn timeouts() {
        assert_eq!(parse_timeout(None).unwrap(), Duration::ZERO);
        assert_eq!(
            parse_timeout(Some("1500")).unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(parse_timeout(Some("99999999")).unwrap(), MAX_TIMEOUT);
        assert!(parse_timeout(Some("soon")).is_err());
        assert!(parse_timeout(Some("-1")).is_err());
    }
}
