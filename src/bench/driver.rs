//! The traffic of a benchmark, the same against courier and Synapse: senders `PUT
//! sendToDevice` on the origin server, receivers long-poll `/sync` on the destination
//! servers and acknowledge by syncing on. Every message's content carries its id and
//! its send time (µs since the Unix epoch), padded to the payload size; a receiver
//! records the latency (receive time - send time) and whether it saw that id before.
//!
//! Owns: message addressing and bodies, the send loop (retransmitting the same txnId
//! on errors, as a client must), the sync loop, the shared counters a progress line
//! and the coordinator read. It never starts or stops a server, and never panics on
//! what a server answers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::Method;
use serde::Deserialize;
use tokio::sync::watch;

use super::conn::Conn;
use super::histogram::Histogram;
use super::node::Device;

/// Event type of measured messages.
pub const BENCH_TYPE: &str = "org.courier.bench";
/// Event type of the warm-up message (key exchange before measuring).
pub const WARMUP_TYPE: &str = "org.courier.bench.warmup";
/// Event type of the message a restarted destination sends back to the origin.
pub const POKE_TYPE: &str = "org.courier.bench.poke";
/// Long-poll timeout of receivers.
const SYNC_TIMEOUT_MS: u64 = 10_000;
/// Attempts per message before a sender gives up on it.
const SEND_ATTEMPTS: u32 = 8;

/// Microseconds since the Unix epoch.
pub fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Where messages go: per destination server, one recipient user and its devices.
#[derive(Debug, Clone)]
pub struct Target {
    pub user_id: String,
    pub device_ids: Vec<String>,
}

/// What the senders do.
#[derive(Debug, Clone)]
pub struct SendPlan {
    /// Stop after this many message ids were handed out...
    pub limit: u64,
    /// ...or once this instant has passed.
    pub deadline: Option<Instant>,
    /// Paced sending: message `n` is not sent before `start + n / rate` (messages per
    /// second over all senders); `None` sends as fast as the servers take them.
    pub pace: Option<(Instant, f64)>,
    pub payload: usize,
    /// Devices per message: 1 = one named device; more = `*` to a user with that many.
    pub fanout: usize,
    /// Targets per message: 1 = the next target, round robin; more = this many
    /// consecutive targets (round robin), each to its first device, in one request.
    pub spread: usize,
    pub targets: Vec<Target>,
}

impl SendPlan {
    /// The request body of message `n`, sent at `ts` (µs since the epoch).
    pub fn body(&self, n: u64, ts: u64) -> String {
        let content = self.content(n, ts);
        if self.spread > 1 {
            let d = self.targets.len().max(1) as u64;
            let first = n.wrapping_mul(self.spread as u64);
            let mut out = String::with_capacity(32 + self.spread * (content.len() + 64));
            out.push_str("{\"messages\":{");
            for i in 0..self.spread as u64 {
                let Some(t) = self.targets.get((first.wrapping_add(i) % d) as usize) else {
                    continue;
                };
                let device = t.device_ids.first().map_or("*", String::as_str);
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&format!("\"{}\":{{\"{device}\":{content}}}", t.user_id));
            }
            out.push_str("}}");
            return out;
        }
        let d = self.targets.len().max(1) as u64;
        let Some(target) = self.targets.get((n % d) as usize) else {
            return "{\"messages\":{}}".to_owned();
        };
        let device = if self.fanout > 1 {
            "*"
        } else {
            let k = target.device_ids.len().max(1) as u64;
            target
                .device_ids
                .get(((n / d) % k) as usize)
                .map(String::as_str)
                .unwrap_or("*")
        };
        format!(
            "{{\"messages\":{{\"{}\":{{\"{device}\":{content}}}}}}}",
            target.user_id
        )
    }

    /// The content of message `n`: its id and send time, padded to the payload size.
    fn content(&self, n: u64, ts: u64) -> String {
        let bare = format!("{{\"id\":{n},\"ts\":{ts},\"pad\":\"\"}}");
        let pad = self.payload.saturating_sub(bare.len());
        format!("{{\"id\":{n},\"ts\":{ts},\"pad\":\"{}\"}}", "x".repeat(pad))
    }
}

/// Counters shared by senders, receivers, the progress line and the coordinator.
#[derive(Debug)]
pub struct Shared {
    pub epoch: Instant,
    pub next_id: AtomicU64,
    pub sent: AtomicU64,
    pub send_failures: AtomicU64,
    pub delivered: AtomicU64,
    pub duplicates: AtomicU64,
    /// µs since `epoch` of the first send; `u64::MAX` before.
    pub first_send_us: AtomicU64,
    /// µs since `epoch` of the last accepted send; 0 before.
    pub last_send_us: AtomicU64,
    /// µs since `epoch` of the last new delivery; 0 before.
    pub last_delivery_us: AtomicU64,
    pub last_error: std::sync::Mutex<Option<String>>,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            epoch: Instant::now(),
            next_id: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            send_failures: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            first_send_us: AtomicU64::new(u64::MAX),
            last_send_us: AtomicU64::new(0),
            last_delivery_us: AtomicU64::new(0),
            last_error: std::sync::Mutex::new(None),
        }
    }
}

impl Shared {
    pub fn since_epoch_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    pub fn note_error(&self, e: String) {
        if let Ok(mut g) = self.last_error.lock() {
            *g = Some(e);
        }
    }
}

/// One `sendToDevice` on `conn` (the sending device's), retransmitted with the same
/// txnId on errors; true once 200.
async fn put_to_device(
    conn: &mut Conn,
    ty: &str,
    txn: &str,
    body: String,
    shared: &Shared,
) -> bool {
    let path = format!("/_matrix/client/v3/sendToDevice/{ty}/{txn}");
    let body = Bytes::from(body);
    for attempt in 1..=SEND_ATTEMPTS {
        let r = conn
            .call(
                Method::PUT,
                &path,
                Some(body.clone()),
                Duration::from_secs(60),
            )
            .await;
        let wait = match r {
            Ok(r) if r.status.is_success() => return true,
            Ok(r) => {
                let status = r.status;
                let text = String::from_utf8_lossy(&r.body);
                shared.note_error(format!("sendToDevice: {status} {text}"));
                if status.as_u16() == 429 {
                    serde_json::from_str::<serde_json::Value>(&text)
                        .ok()
                        .and_then(|v| v["retry_after_ms"].as_u64())
                        .map(Duration::from_millis)
                        .unwrap_or(Duration::from_millis(200))
                } else {
                    Duration::from_millis(100 * u64::from(attempt))
                }
            }
            Err(e) => {
                shared.note_error(format!("sendToDevice: {e}"));
                Duration::from_millis(100 * u64::from(attempt))
            }
        };
        tokio::time::sleep(wait).await;
    }
    false
}

/// A sender: takes the next id until the plan says stop, one request at a time on
/// a connection of its own.
pub async fn send_loop(from: Device, plan: Arc<SendPlan>, shared: Arc<Shared>) {
    let mut conn = match Conn::for_device(&from) {
        Ok(c) => c,
        Err(e) => {
            shared.note_error(e);
            return;
        }
    };
    loop {
        if plan.deadline.is_some_and(|d| Instant::now() >= d) {
            return;
        }
        let n = shared.next_id.fetch_add(1, Ordering::Relaxed);
        if n >= plan.limit {
            return;
        }
        if let Some((start, rate)) = plan.pace {
            let at = start + Duration::from_secs_f64(n as f64 / rate);
            if plan.deadline.is_some_and(|d| at >= d) {
                return;
            }
            tokio::time::sleep_until(at.into()).await;
        }
        shared
            .first_send_us
            .fetch_min(shared.since_epoch_us(), Ordering::Relaxed);
        let body = plan.body(n, unix_us());
        if put_to_device(&mut conn, BENCH_TYPE, &format!("b{n}"), body, &shared).await {
            shared.sent.fetch_add(1, Ordering::Relaxed);
            shared
                .last_send_us
                .fetch_max(shared.since_epoch_us(), Ordering::Relaxed);
        } else {
            shared.send_failures.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Sends one unmeasured message (warm-up, poke) on `conn`; true once accepted.
pub async fn send_one(
    conn: &mut Conn,
    ty: &str,
    txn: &str,
    to_user: &str,
    to_device: &str,
    shared: &Shared,
) -> bool {
    let body = format!(
        "{{\"messages\":{{\"{to_user}\":{{\"{to_device}\":{{\"at\":{}}}}}}}}}",
        unix_us()
    );
    put_to_device(conn, ty, txn, body, shared).await
}

/// Sends one unmeasured message to the first device of every target, in one request
/// on `conn`; true once accepted.
pub async fn send_to_all(
    conn: &mut Conn,
    ty: &str,
    txn: &str,
    targets: &[Target],
    shared: &Shared,
) -> bool {
    let at = unix_us();
    let messages: Vec<String> = targets
        .iter()
        .map(|t| {
            let device = t.device_ids.first().map_or("*", String::as_str);
            format!("\"{}\":{{\"{device}\":{{\"at\":{at}}}}}", t.user_id)
        })
        .collect();
    let body = format!("{{\"messages\":{{{}}}}}", messages.join(","));
    put_to_device(conn, ty, txn, body, shared).await
}

#[derive(Deserialize)]
struct SyncBody {
    next_batch: String,
    #[serde(default)]
    to_device: Option<ToDevice>,
}

#[derive(Deserialize)]
struct ToDevice {
    #[serde(default)]
    events: Vec<Event>,
}

#[derive(Deserialize)]
struct Event {
    #[serde(rename = "type", default)]
    ty: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize)]
struct Content {
    #[serde(default)]
    id: Option<u64>,
    #[serde(default)]
    ts: Option<u64>,
}

/// The answer of one sync: the next token and the (type, id, ts) of its events.
pub struct SyncPage {
    pub next_batch: String,
    pub events: Vec<(String, Option<u64>, Option<u64>)>,
}

/// One `/sync` on `conn` (the syncing device's); `Err` with a reason on anything but
/// a parsable 200.
pub async fn sync_once(
    conn: &mut Conn,
    since: Option<&str>,
    timeout_ms: u64,
) -> Result<SyncPage, String> {
    let mut path = format!("/_matrix/client/v3/sync?timeout={timeout_ms}");
    if let Some(s) = since {
        path.push_str("&since=");
        path.push_str(
            &percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC)
                .to_string(),
        );
    }
    let r = conn
        .call(
            Method::GET,
            &path,
            None,
            Duration::from_millis(timeout_ms) + Duration::from_secs(30),
        )
        .await?;
    let (status, bytes) = (r.status, r.body);
    if !status.is_success() {
        return Err(format!(
            "sync: {status} {}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
        ));
    }
    let body: SyncBody = serde_json::from_slice(&bytes).map_err(|e| format!("sync body: {e}"))?;
    let events = body
        .to_device
        .map(|t| t.events)
        .unwrap_or_default()
        .into_iter()
        .map(|e| {
            let (id, ts) = e.content.map(|c| (c.id, c.ts)).unwrap_or((None, None));
            (e.ty, id, ts)
        })
        .collect();
    Ok(SyncPage {
        next_batch: body.next_batch,
        events,
    })
}

/// Syncs `dev` until an event of type `ty` arrived (then acknowledges it) or
/// `within` passed; returns the token to continue from.
pub async fn sync_until_type(
    dev: &Device,
    since: Option<String>,
    ty: &str,
    within: Duration,
) -> Result<Option<String>, String> {
    let mut conn = Conn::for_device(dev)?;
    let deadline = Instant::now() + within;
    let mut since = since;
    let mut last_err = String::new();
    while Instant::now() < deadline {
        match sync_once(&mut conn, since.as_deref(), 2_000).await {
            Ok(page) => {
                let found = page.events.iter().any(|(t, _, _)| t == ty);
                since = Some(page.next_batch);
                if found {
                    // Acknowledge it at once.
                    if let Ok(p) = sync_once(&mut conn, since.as_deref(), 0).await {
                        since = Some(p.next_batch);
                    }
                    return Ok(since);
                }
            }
            Err(e) => {
                last_err = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    Err(format!(
        "{} on {} did not receive `{ty}` within {within:?} {last_err}",
        dev.device_id, dev.base
    ))
}

/// What one receiver saw.
#[derive(Debug, Default)]
pub struct Received {
    pub latency_us: Histogram,
    pub delivered: u64,
    pub duplicates: u64,
    /// The token it ended with (everything before it acknowledged).
    pub since: Option<String>,
}

/// A receiver: long-polls on a connection of its own until `stop` says so, then
/// acknowledges what it got.
pub async fn receive_loop(
    dev: Device,
    since: Option<String>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> Received {
    let mut out = Received {
        since,
        ..Received::default()
    };
    let mut seen: Vec<u64> = Vec::new();
    let mut conn = match Conn::for_device(&dev) {
        Ok(c) => c,
        Err(e) => {
            shared.note_error(e);
            return out;
        }
    };
    loop {
        if *stop.borrow() {
            break;
        }
        let page = tokio::select! {
            r = sync_once(&mut conn, out.since.as_deref(), SYNC_TIMEOUT_MS) => r,
            _ = stop.changed() => break,
        };
        let page = match page {
            Ok(p) => p,
            Err(e) => {
                shared.note_error(e);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let now = unix_us();
        for (ty, id, ts) in &page.events {
            let (Some(id), Some(ts)) = (id, ts) else {
                continue;
            };
            if ty != BENCH_TYPE {
                continue;
            }
            let (word, bit) = ((*id / 64) as usize, id % 64);
            if seen.len() <= word {
                seen.resize(word + 1, 0);
            }
            if seen[word] & (1 << bit) != 0 {
                out.duplicates += 1;
                shared.duplicates.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            seen[word] |= 1 << bit;
            out.delivered += 1;
            out.latency_us.record(now.saturating_sub(*ts));
            shared.delivered.fetch_add(1, Ordering::Relaxed);
            shared
                .last_delivery_us
                .fetch_max(shared.since_epoch_us(), Ordering::Relaxed);
        }
        out.since = Some(page.next_batch);
    }
    // Acknowledge the last page: nothing we saw may stay on the server.
    if let Some(s) = out.since.clone() {
        for _ in 0..3 {
            match sync_once(&mut conn, Some(&s), 0).await {
                Ok(page) => {
                    if page.events.is_empty() {
                        out.since = Some(page.next_batch);
                    }
                    break;
                }
                Err(e) => {
                    shared.note_error(format!("final acknowledgement: {e}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(fanout: usize, payload: usize) -> SendPlan {
        SendPlan {
            limit: 10,
            deadline: None,
            pace: None,
            payload,
            fanout,
            spread: 1,
            targets: vec![
                Target {
                    user_id: "@r:127.0.0.1:1".into(),
                    device_ids: vec!["D0".into(), "D1".into()],
                },
                Target {
                    user_id: "@r:127.0.0.1:2".into(),
                    device_ids: vec!["D0".into(), "D1".into()],
                },
            ],
        }
    }

    #[test]
    fn bodies_are_padded_json_addressed_round_robin() {
        let p = plan(1, 300);
        let b: serde_json::Value = serde_json::from_str(&p.body(3, 42)).unwrap();
        // 3 % 2 = destination 1; (3 / 2) % 2 = device 1.
        let c = &b["messages"]["@r:127.0.0.1:2"]["D1"];
        assert_eq!(c["id"], 3);
        assert_eq!(c["ts"], 42);
        assert_eq!(serde_json::to_string(c).unwrap().len(), 300);
        let p = plan(5, 10);
        let b: serde_json::Value = serde_json::from_str(&p.body(4, 1)).unwrap();
        assert_eq!(b["messages"]["@r:127.0.0.1:1"]["*"]["id"], 4);
    }

    #[test]
    fn spread_bodies_address_consecutive_targets() {
        let mut p = plan(1, 100);
        p.targets.push(Target {
            user_id: "@r:127.0.0.1:3".into(),
            device_ids: vec!["D0".into()],
        });
        p.spread = 2;
        // Message 1 goes to targets 2 and 0 (of 3).
        let b: serde_json::Value = serde_json::from_str(&p.body(1, 7)).unwrap();
        let m = b["messages"].as_object().unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m["@r:127.0.0.1:3"]["D0"]["id"], 1);
        assert_eq!(m["@r:127.0.0.1:1"]["D0"]["ts"], 7);
    }
}
