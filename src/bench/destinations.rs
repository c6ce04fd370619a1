//! Simulated remote servers for the `many-destinations` scenario: D server names
//! (`d0001.courier-bench.test`, ...), each with a federation endpoint of its own on a
//! loopback port of its own (the origin's `[federation.overrides]` map each name to
//! its port, so the origin keeps one queue, one delivery task and one connection per
//! destination, as it would for D real servers). An origin without such overrides
//! (Synapse) gets them named by their addresses instead (`127.0.0.1:port`). They run
//! inside the benchmark process and answer only
//! `PUT /_matrix/federation/v1/send/{txnId}`, in JSON labelled as such.
//!
//! What an endpoint checks before it answers 200: the X-Matrix signature (origin, our
//! name as destination, the origin's key fetched from its `/_matrix/key/v2/server`,
//! Python number mode, as courier's own receiver does), then the transaction's
//! `m.direct_to_device` EDUs. A transaction id seen before from the origin is answered
//! 200 and counted no further (a retry after a lost answer, which courier's receivers
//! dedupe the same way); every other (destination, message id) is a delivery, seen
//! twice a duplicate. Latency is the transaction's arrival minus the content's send
//! time: there is no recipient device and no `/sync` behind these endpoints, so this
//! scenario measures the origin's side (intake, per-destination queues, transactions),
//! not a receiving server's.
//!
//! Owns: the listeners (one per name; stopped on drop), TLS with a throwaway
//! self-signed certificate, verification and counting. It never sends a request
//! except the one key fetch, never stores anything on disk, and never panics on what
//! the origin sends (a bad request gets a 4xx and is counted as an error).

use std::collections::HashSet;
use std::net::TcpListener as StdTcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, anyhow, bail};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{OriginalUri, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::put;
use ed25519_dalek::VerifyingKey;
use serde_json::Value;

use super::driver::{BENCH_TYPE, Shared, WARMUP_TYPE, unix_us};
use super::histogram::Histogram;
use crate::signing::canonical::NumberMode;
use crate::signing::{parse_verify_key, xmatrix};

/// The name of simulated destination `i` (0-based).
pub fn name(i: usize) -> String {
    format!("d{:04}.courier-bench.test", i + 1)
}

/// What every endpoint shares.
struct Counts {
    origin: String,
    key_id: String,
    key: VerifyingKey,
    shared: Arc<Shared>,
    /// (destination, txnId) already answered.
    txns: Mutex<HashSet<(usize, String)>>,
    /// Per destination: a bit per message id seen.
    seen: Vec<Mutex<Vec<u64>>>,
    latency: Mutex<Histogram>,
    warmups: AtomicU64,
    body_bytes: AtomicU64,
    transactions: AtomicU64,
    /// EDUs in the transactions counted (not in repeats of one already answered).
    edus: AtomicU64,
}

/// D simulated destinations; stopped when dropped.
pub struct Destinations {
    pub names: Vec<String>,
    pub ports: Vec<u16>,
    counts: Arc<Counts>,
    handle: axum_server::Handle<std::net::SocketAddr>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Binds `count` loopback ports (before the origin starts: its configuration names
/// them); [`Destinations::serve`] starts answering on them.
pub fn bind(count: usize) -> anyhow::Result<Vec<StdTcpListener>> {
    (0..count)
        .map(|_| {
            crate::server::listen(([127, 0, 0, 1], 0).into())
                .context("binding a loopback port for a simulated destination (raise `ulimit -n`?)")
        })
        .collect()
}

/// The server names of the destinations on `listeners`: [`name`]s for an origin
/// that maps them to their ports ([`overrides`]), or each listener's own address
/// (`127.0.0.1:port`, an IP literal with a port: no discovery) for one that cannot,
/// such as Synapse.
pub fn names(listeners: &[StdTcpListener], by_address: bool) -> anyhow::Result<Vec<String>> {
    listeners
        .iter()
        .enumerate()
        .map(|(i, l)| {
            Ok(if by_address {
                format!("127.0.0.1:{}", l.local_addr()?.port())
            } else {
                name(i)
            })
        })
        .collect()
}

/// The `[federation.overrides]` table mapping every name to its port.
pub fn overrides(listeners: &[StdTcpListener]) -> anyhow::Result<String> {
    let mut out = String::from("\n[federation.overrides]\n");
    for (i, l) in listeners.iter().enumerate() {
        out.push_str(&format!(
            "\"{}\" = \"127.0.0.1:{}\"\n",
            name(i),
            l.local_addr()?.port()
        ));
    }
    Ok(out)
}

impl Destinations {
    /// Starts the endpoints on `listeners` (from [`bind`]), named `names` (from
    /// [`names`]), trusting the origin's key as published at `origin_base` (its
    /// client/federation listener).
    pub async fn serve(
        listeners: Vec<StdTcpListener>,
        names: Vec<String>,
        origin: &str,
        origin_base: &str,
        http: &reqwest::Client,
        shared: Arc<Shared>,
    ) -> anyhow::Result<Destinations> {
        let (key_id, key) = fetch_key(http, origin_base).await?;
        let count = listeners.len();
        let counts = Arc::new(Counts {
            origin: origin.to_owned(),
            key_id,
            key,
            shared,
            txns: Mutex::default(),
            seen: (0..count).map(|_| Mutex::default()).collect(),
            latency: Mutex::default(),
            warmups: AtomicU64::new(0),
            body_bytes: AtomicU64::new(0),
            transactions: AtomicU64::new(0),
            edus: AtomicU64::new(0),
        });
        let tls = axum_server::tls_rustls::RustlsConfig::from_config(tls_config()?);
        let handle = axum_server::Handle::new();
        let mut ports = Vec::with_capacity(count);
        let mut tasks = Vec::with_capacity(count);
        for (i, (listener, name)) in listeners.into_iter().zip(&names).enumerate() {
            ports.push(listener.local_addr()?.port());
            let app = Router::new()
                .route("/_matrix/federation/v1/send/{txn}", put(send))
                .with_state(Endpoint {
                    index: i,
                    name: name.clone(),
                    counts: counts.clone(),
                });
            let server =
                axum_server::from_tcp_rustls(listener, tls.clone())?.handle(handle.clone());
            tasks.push(tokio::spawn(async move {
                let _ = server.serve(app.into_make_service()).await;
            }));
        }
        Ok(Destinations {
            names,
            ports,
            counts,
            handle,
            tasks,
        })
    }

    /// Warm-up messages received so far (any destination).
    pub fn warmups(&self) -> u64 {
        self.counts.warmups.load(Ordering::Relaxed)
    }

    /// The latencies recorded so far.
    pub fn latency(&self) -> Histogram {
        self.counts
            .latency
            .lock()
            .map(|h| h.clone())
            .unwrap_or_default()
    }

    /// Bytes of transaction bodies received so far.
    pub fn body_bytes(&self) -> u64 {
        self.counts.body_bytes.load(Ordering::Relaxed)
    }

    /// Transactions answered 200 so far (retries included) and the EDUs they
    /// carried (each transaction's once), as an origin that cannot say would count.
    pub fn federation_counts(&self) -> (u64, u64) {
        (
            self.counts.transactions.load(Ordering::Relaxed),
            self.counts.edus.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Destinations {
    fn drop(&mut self) {
        self.handle.shutdown();
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The origin's current ed25519 key, from its key server.
async fn fetch_key(http: &reqwest::Client, base: &str) -> anyhow::Result<(String, VerifyingKey)> {
    let v: Value = http
        .get(format!("{base}/_matrix/key/v2/server"))
        .timeout(std::time::Duration::from_secs(30))
        .send()
        .await
        .context("fetching the origin's key")?
        .json()
        .await
        .context("reading the origin's key")?;
    let Some((id, k)) = v["verify_keys"]
        .as_object()
        .and_then(|m| m.iter().find(|(id, _)| id.starts_with("ed25519:")))
    else {
        bail!("the origin publishes no ed25519 key: {v}");
    };
    let key = k["key"]
        .as_str()
        .ok_or_else(|| anyhow!("verify key {id} has no `key`"))
        .and_then(|b| parse_verify_key(b).map_err(|e| anyhow!("verify key {id}: {e}")))?;
    Ok((id.clone(), key))
}

fn tls_config() -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let ck = rcgen::generate_simple_self_signed(vec!["courier-bench.test".to_owned()])
        .map_err(|e| anyhow!("generating a certificate: {e}"))?;
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let mut cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![ck.cert.der().clone()], key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

#[derive(Clone)]
struct Endpoint {
    index: usize,
    name: String,
    counts: Arc<Counts>,
}

/// A status and a JSON body, labelled `application/json` as a real server's is:
/// Synapse takes any other content type for a failed request and sends the
/// transaction's messages again.
type Answer = (
    StatusCode,
    [(axum::http::HeaderName, &'static str); 1],
    &'static str,
);

const JSON: [(axum::http::HeaderName, &str); 1] =
    [(axum::http::header::CONTENT_TYPE, "application/json")];

async fn send(
    State(ep): State<Endpoint>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    let c = &ep.counts;
    match check(&ep, &uri, &headers, &body) {
        Ok(Some(txn)) => {
            c.body_bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
            c.transactions.fetch_add(1, Ordering::Relaxed);
            count(&ep, &txn);
            (StatusCode::OK, JSON, "{\"pdus\":{}}")
        }
        Ok(None) => {
            c.transactions.fetch_add(1, Ordering::Relaxed);
            (StatusCode::OK, JSON, "{\"pdus\":{}}")
        }
        Err((status, why)) => {
            c.shared
                .note_error(format!("destination {}: {status} {why}", ep.name));
            (status, JSON, "{\"errcode\":\"M_UNAUTHORIZED\"}")
        }
    }
}

/// Verifies the request; the parsed transaction if it is new, `None` for a repeat.
fn check(
    ep: &Endpoint,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Option<Value>, (StatusCode, String)> {
    let c = &ep.counts;
    let unauthorized = |why: String| (StatusCode::UNAUTHORIZED, why);
    let header = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .ok_or_else(|| unauthorized("no Authorization header".into()))?;
    let x = xmatrix::parse(header).map_err(|e| unauthorized(format!("X-Matrix: {e}")))?;
    if x.origin != c.origin || x.key != c.key_id {
        return Err(unauthorized(format!(
            "signed by {} {}, expected {} {}",
            x.origin, x.key, c.origin, c.key_id
        )));
    }
    let txn: Value = serde_json::from_slice(body)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("body: {e}")))?;
    let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    xmatrix::verify_request_body(
        &x,
        "PUT",
        path,
        &ep.name,
        Some(xmatrix::Body {
            raw: body,
            parsed: Some(&txn),
        }),
        &c.key,
        NumberMode::Python,
    )
    .map_err(|e| unauthorized(format!("signature: {e}")))?;
    let txn_id = uri.path().rsplit('/').next().unwrap_or_default().to_owned();
    let fresh = c
        .txns
        .lock()
        .map(|mut t| t.insert((ep.index, txn_id)))
        .unwrap_or(false);
    Ok(fresh.then_some(txn))
}

/// Counts the deliveries of a new transaction.
fn count(ep: &Endpoint, txn: &Value) {
    let c = &ep.counts;
    let now = unix_us();
    let mut latencies = Vec::new();
    let (mut delivered, mut duplicates) = (0u64, 0u64);
    let Some(edus) = txn["edus"].as_array() else {
        return;
    };
    c.edus.fetch_add(edus.len() as u64, Ordering::Relaxed);
    let Some(Ok(mut seen)) = c.seen.get(ep.index).map(|m| m.lock()) else {
        return;
    };
    for edu in edus {
        if edu["edu_type"] != "m.direct_to_device" {
            continue;
        }
        let content = &edu["content"];
        let ty = content["type"].as_str().unwrap_or_default();
        let Some(users) = content["messages"].as_object() else {
            continue;
        };
        for devices in users.values() {
            let Some(devices) = devices.as_object() else {
                continue;
            };
            for msg in devices.values() {
                if ty == WARMUP_TYPE {
                    c.warmups.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if ty != BENCH_TYPE {
                    continue;
                }
                let (Some(id), Some(ts)) = (msg["id"].as_u64(), msg["ts"].as_u64()) else {
                    continue;
                };
                let (word, bit) = ((id / 64) as usize, id % 64);
                if seen.len() <= word {
                    seen.resize(word + 1, 0);
                }
                if seen[word] & (1 << bit) != 0 {
                    duplicates += 1;
                    continue;
                }
                seen[word] |= 1 << bit;
                delivered += 1;
                latencies.push(now.saturating_sub(ts));
            }
        }
    }
    drop(seen);
    if let Ok(mut h) = c.latency.lock() {
        for l in latencies {
            h.record(l);
        }
    }
    c.shared.duplicates.fetch_add(duplicates, Ordering::Relaxed);
    if delivered > 0 {
        c.shared.delivered.fetch_add(delivered, Ordering::Relaxed);
        c.shared
            .last_delivery_us
            .fetch_max(c.shared.since_epoch_us(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_server_names() {
        for i in [0, 9, 999, 4999] {
            assert!(
                crate::ids::ServerName::parse(&name(i)).is_ok(),
                "{}",
                name(i)
            );
        }
        assert_eq!(name(0), "d0001.courier-bench.test");
    }
}
