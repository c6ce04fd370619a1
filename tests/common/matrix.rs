//! A tiny Matrix client for tests: admin device creation on courier, `sendToDevice`
//! and `/sync` against any homeserver (courier or Synapse).

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{ADMIN_TOKEN, Courier, insecure_client};

/// Creates a device on courier `c` through the admin API; returns its access token.
pub async fn device(c: &Courier, user: &str, device: &str) -> String {
    let r: Value = insecure_client()
        .post(c.url("/_courier/admin/v1/devices"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"user_id": user, "device_id": device}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    r["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("{r}"))
        .to_owned()
}

/// `PUT sendToDevice/{ty}/{txn}` on `base` (e.g. `https://127.0.0.1:8448`).
pub async fn send_typed(base: &str, token: &str, ty: &str, txn: &str, messages: Value) {
    let r = insecure_client()
        .put(format!("{base}/_matrix/client/v3/sendToDevice/{ty}/{txn}"))
        .bearer_auth(token)
        .json(&json!({ "messages": messages }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

pub async fn send(base: &str, token: &str, txn: &str, messages: Value) {
    send_typed(base, token, "m.test", txn, messages).await
}

/// Syncs on `base` until `want` to-device events arrived or `deadline` passed,
/// acknowledging as it goes (and the last batch at the end). Returns every event,
/// duplicates included.
pub async fn sync_events(base: &str, token: &str, want: usize, deadline: Duration) -> Vec<Value> {
    sync_events_from(base, token, None, want, deadline).await.0
}

/// `sync_events` starting at `since`; also returns the last `next_batch`.
pub async fn sync_events_from(
    base: &str,
    token: &str,
    since: Option<String>,
    want: usize,
    deadline: Duration,
) -> (Vec<Value>, Option<String>) {
    let client = insecure_client();
    let mut since = since;
    let mut seen = Vec::new();
    let end = Instant::now() + deadline;
    while seen.len() < want && Instant::now() < end {
        let mut url = format!("{base}/_matrix/client/v3/sync?timeout=2000");
        if let Some(s) = &since {
            url.push_str(&format!("&since={s}"));
        }
        let Ok(r) = client.get(url).bearer_auth(token).send().await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let Ok(body) = r.json::<Value>().await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        if let Some(events) = body["to_device"]["events"].as_array() {
            seen.extend(events.iter().cloned());
        }
        if let Some(nb) = body["next_batch"].as_str() {
            since = Some(nb.to_owned());
        }
    }
    if let Some(s) = &since {
        let _ = client
            .get(format!("{base}/_matrix/client/v3/sync?timeout=0&since={s}"))
            .bearer_auth(token)
            .send()
            .await;
    }
    (seen, since)
}

/// `sync_events`, keeping only `content.n`.
pub async fn sync_until(base: &str, token: &str, want: usize, deadline: Duration) -> Vec<u64> {
    sync_events(base, token, want, deadline)
        .await
        .iter()
        .filter_map(|e| e["content"]["n"].as_u64())
        .collect()
}

/// Asserts `seen` holds each of `0..n` exactly once.
pub fn assert_exactly_once(seen: &[u64], n: u64) {
    let mut sorted = seen.to_vec();
    sorted.sort_unstable();
    let want: Vec<u64> = (0..n).collect();
    assert_eq!(sorted.len(), want.len(), "count (lost or duplicated)");
    assert_eq!(sorted, want, "every message exactly once");
}

/// Sends one message per request, 32 requests at a time, `content.n` = each of `range`.
pub async fn send_many(
    base: &str,
    token: &str,
    to: &str,
    device: &str,
    range: std::ops::Range<u64>,
) {
    let mut futs = Vec::new();
    for n in range {
        futs.push(async move {
            send(
                base,
                token,
                &format!("t{n}"),
                json!({ to: { device: {"n": n}} }),
            )
            .await;
        });
        if futs.len() == 32 {
            futures::future::join_all(futs.drain(..)).await;
        }
    }
    futures::future::join_all(futs).await;
}

impl Courier {
    /// `GET` an admin path with the admin token; the JSON answer.
    pub async fn admin_get(&self, path: &str) -> Value {
        self.admin_response(path).await.json().await.unwrap()
    }

    /// The Prometheus text of `/metrics` (admin token).
    pub async fn metrics(&self) -> String {
        self.admin_response("/metrics").await.text().await.unwrap()
    }

    async fn admin_response(&self, path: &str) -> reqwest::Response {
        insecure_client()
            .get(self.url(path))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
    }

    /// Base URL for client requests.
    pub fn base(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }
}

/// A federation transaction body from `origin` carrying `edus`.
pub fn txn(origin: &str, edus: Vec<Value>) -> Value {
    json!({"origin": origin, "origin_server_ts": 1, "pdus": [], "edus": edus})
}

/// An `m.direct_to_device` EDU from `sender` to every device of `to`, content `{"n": n}`.
pub fn edu(sender: &str, mid: &str, to: &str, n: u64) -> Value {
    json!({"edu_type": "m.direct_to_device", "content": {
        "sender": sender, "type": "m.test", "message_id": mid,
        "messages": {to: {"*": {"n": n}}}}})
}
