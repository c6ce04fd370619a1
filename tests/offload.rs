//! Issue 8: offload mode with two real Synapse homeservers.
//!
//! ```text
//! alice -> Synapse A --(outbound_federation_restricted_to)--> courier A [offload]
//!   --(held, replayed verbatim)--> courier B [edge] --(held, replayed)--> Synapse B -> bob
//! ```
//! courier A resolves B's name to courier B's edge listener (a static override stands
//! in for B's reverse proxy). Runs in CI (fails there if Synapse is unavailable).

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::synapse::{Synapse, venv_or_skip};
use common::{Courier, free_port, insecure_client};
use serde_json::{Value, json};

const SECRET: &str = "offload-secret-0123456789abcdef";

/// Fast retries, so outages in the test cost seconds.
const FAST: &str = r#"
[federation]
allow_private_destinations = true
verify_certificates = false
backoff_initial = "500ms"
backoff_max = "2s"
"#;

/// courier A: the offload listener for Synapse A; B's name goes to courier B's edge.
async fn courier_a(offload_port: u16, synapse_b: &str, edge_b: u16) -> Courier {
    Courier::start_with(&format!(
        r#"
[[listeners]]
address = "127.0.0.1:{offload_port}"
tls = false
resources = ["offload"]

[offload]
secret = "{SECRET}"
{FAST}
[federation.overrides]
"{synapse_b}" = "127.0.0.1:{edge_b}"
"#
    ))
    .await
}

/// courier B: the edge in front of Synapse B.
async fn courier_b(edge_port: u16, synapse_b: &Synapse) -> Courier {
    Courier::start_with(&format!(
        r#"
[[listeners]]
address = "127.0.0.1:{edge_port}"
resources = ["edge"]

[offload]
homeserver_name = "{name}"
homeserver_url = "https://127.0.0.1:{port}"
verify_homeserver_certificate = false
homeserver_backoff_max = "2s"
{FAST}"#,
        name = synapse_b.server_name,
        port = synapse_b.port,
    ))
    .await
}

fn synapse_offloaded_to(venv: &std::path::Path, offload_port: u16) -> Synapse {
    Synapse::start_configured(
        venv,
        &format!(
            r#"instance_map:
  main: {{host: 127.0.0.1, port: {main}}}
  courier: {{host: 127.0.0.1, port: {offload_port}}}
outbound_federation_restricted_to: [courier]
worker_replication_secret: "{SECRET}"
"#,
            main = free_port()
        ),
    )
}

/// Sends `range` from alice (Synapse A) to bob's device on B, one message per request.
async fn send_batch(a: &Synapse, alice: &str, bob: &str, phase: &str, range: std::ops::Range<u64>) {
    let client = insecure_client();
    for n in range {
        let r = client
            .put(a.url(&format!(
                "/_matrix/client/v3/sendToDevice/m.offload.test/{phase}-{n}"
            )))
            .bearer_auth(alice)
            .json(&json!({"messages": {bob: {"BOBDEV": {"n": n, "phase": phase}}}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
}

/// Waits until `cond` holds, polling; panics with `what` after `limit`.
async fn wait_for(what: &str, limit: Duration, mut cond: impl AsyncFnMut() -> bool) {
    let end = Instant::now() + limit;
    while !cond().await {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Held transactions in a courier's admin view, by direction and queue.
async fn held(c: &Courier, direction: &str, queue: &str) -> u64 {
    c.admin_get("/_courier/admin/v1/offload").await[direction][queue]["held"]
        .as_u64()
        .unwrap_or(0)
}

/// One raw HTTP/1.1 request to the offload listener (absolute-form target, as Synapse
/// sends it); returns the status code and the body.
fn raw_proxy_request(port: u16, target: &str, bearer: Option<&str>) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let auth = bearer
        .map(|b| format!("Proxy-Authorization: Bearer {b}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET matrix-federation://{target} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synapse_offload_both_ways_survives_outages_and_sigkill() {
    let Some(venv) = venv_or_skip("synapse_offload_both_ways_survives_outages_and_sigkill") else {
        return;
    };
    let (offload_port, edge_port) = (free_port(), free_port());
    let sb = Synapse::start(&venv);
    let sa = synapse_offloaded_to(&venv, offload_port);
    let mut ca = courier_a(offload_port, &sb.server_name, edge_port).await;
    let mut cb = courier_b(edge_port, &sb).await;
    let (_alice_id, alice) = sa.register("alice", "ALICEDEV");
    let (bob_id, bob) = sb.register("bob", "BOBDEV");
    let client = insecure_client();

    // The proxy door: no secret 401, a wrong one 403, the right one passes a
    // non-/send request through courier A and courier B's edge to Synapse B.
    let version_target = format!("{}/_matrix/federation/v1/version", sb.server_name);
    assert_eq!(
        raw_proxy_request(offload_port, &version_target, None).0,
        401
    );
    assert_eq!(
        raw_proxy_request(offload_port, &version_target, Some("wrong-secret")).0,
        403
    );
    let (status, body) = raw_proxy_request(offload_port, &version_target, Some(SECRET));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Synapse"), "Synapse B's version: {body}");

    // A federation query made by Synapse A itself, end to end through both couriers.
    let r = client
        .put(sb.url(&format!("/_matrix/client/v3/profile/{bob_id}/displayname")))
        .bearer_auth(&bob)
        .json(&json!({"displayname": "Bob via courier"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let profile: Value = client
        .get(sa.url(&format!("/_matrix/client/v3/profile/{bob_id}")))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(profile["displayname"], "Bob via courier", "{profile}");
    assert!(
        ca.log().contains("/_matrix/federation/v1/query/profile"),
        "the query went through courier A"
    );

    // Phase 1: everything up.
    let per = 15u64;
    send_batch(&sa, &alice, &bob_id, "up", 0..per).await;

    // Phase 2: Synapse B is down. Synapse A's outbox still drains (custody moved to
    // courier A, then courier B's edge); courier B is SIGKILLed while holding them.
    let bob_since = {
        let (events, since) = common::matrix::sync_events_from(
            &sb.url(""),
            &bob,
            None,
            per as usize,
            Duration::from_secs(60),
        )
        .await;
        assert_eq!(events.len(), per as usize, "phase 1 delivered: {events:?}");
        since
    };
    sb.stop();
    send_batch(&sa, &alice, &bob_id, "hs-down", 0..per).await;
    wait_for(
        "Synapse A's outbox to drain (B down)",
        Duration::from_secs(60),
        async || sa.count_rows("device_federation_outbox") == 0,
    )
    .await;
    wait_for(
        "courier B to hold phase 2",
        Duration::from_secs(60),
        async || held(&cb, "inbound", &sa.server_name).await > 0,
    )
    .await;
    cb.kill();
    cb.spawn().await;
    sb.restart();

    // Phase 3: courier B is down; courier A holds, is SIGKILLed, restarts.
    wait_for(
        "courier B to replay phase 2",
        Duration::from_secs(90),
        async || held(&cb, "inbound", &sa.server_name).await == 0,
    )
    .await;
    cb.kill();
    send_batch(&sa, &alice, &bob_id, "edge-down", 0..per).await;
    wait_for(
        "Synapse A's outbox to drain (edge down)",
        Duration::from_secs(60),
        async || sa.count_rows("device_federation_outbox") == 0,
    )
    .await;
    wait_for(
        "courier A to hold phase 3",
        Duration::from_secs(30),
        async || held(&ca, "outbound", &sb.server_name).await > 0,
    )
    .await;
    let view = ca.admin_get("/_courier/admin/v1/offload").await;
    let q = &view["outbound"][&sb.server_name];
    assert!(q["oldest_age_ms"].as_u64().is_some(), "{view}");
    assert!(
        q["failures"].as_u64().unwrap_or(0) >= 1,
        "backing off: {view}"
    );
    ca.kill();
    ca.spawn().await;
    cb.spawn().await;

    // bob gets every message of every phase exactly once.
    let (events, _) = common::matrix::sync_events_from(
        &sb.url(""),
        &bob,
        bob_since,
        2 * per as usize,
        Duration::from_secs(120),
    )
    .await;
    let mut got: BTreeMap<(String, u64), usize> = BTreeMap::new();
    for e in &events {
        assert_eq!(e["type"], "m.offload.test", "{e}");
        let key = (
            e["content"]["phase"].as_str().unwrap().to_owned(),
            e["content"]["n"].as_u64().unwrap(),
        );
        *got.entry(key).or_default() += 1;
    }
    for phase in ["hs-down", "edge-down"] {
        for n in 0..per {
            assert_eq!(
                got.get(&(phase.to_owned(), n)),
                Some(&1),
                "{phase}/{n} exactly once; got {got:?}"
            );
        }
    }
    assert_eq!(got.len(), 2 * per as usize, "nothing else: {got:?}");
    // A late duplicate would show up on a further sync.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let extra = common::matrix::sync_events(&sb.url(""), &bob, 1, Duration::from_secs(3)).await;
    assert!(extra.is_empty(), "delivered twice: {extra:?}");

    wait_for(
        "both couriers to be empty",
        Duration::from_secs(30),
        async || {
            held(&ca, "outbound", &sb.server_name).await == 0
                && held(&cb, "inbound", &sa.server_name).await == 0
        },
    )
    .await;
    assert!(ca.log().contains("direction=\"out\"") || ca.log().contains("direction=out"));
    if std::env::var_os("COURIER_TEST_SHOW_LOGS").is_some() {
        eprintln!("=== courier A\n{}\n=== courier B\n{}", ca.log(), cb.log());
    }
    for c in [&ca, &cb] {
        let log = c.log();
        assert!(!log.contains("panicked"), "{log}");
        assert!(!log.contains("parked"), "nothing refused: {log}");
    }
}
