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

use common::proxy::{FakeOrigin, Recorder, Signer};
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

/// A courier with only an offload listener (plain HTTP; returned with its port),
/// `dest.test` mapped to the recording destination `dest`; `offload` adds lines to
/// the `[offload]` section.
async fn offload_to(dest_port: u16, offload: &str) -> (Courier, u16) {
    let port = free_port();
    let c = Courier::start_with(&format!(
        r#"
[[listeners]]
address = "127.0.0.1:{port}"
tls = false
resources = ["offload"]

[offload]
secret = "{SECRET}"
{offload}
{FAST}
[federation.overrides]
"dest.test" = "127.0.0.1:{dest_port}"
"#
    ))
    .await;
    (c, port)
}

/// A courier whose `edge` listener (TLS; returned with its port) fronts the
/// recording homeserver `hs` as `hs.test`, backing off at most 1 s.
async fn edge_for(hs: &Recorder) -> (Courier, u16) {
    let edge_port = free_port();
    let c = Courier::start_with(&format!(
        r#"
[[listeners]]
address = "127.0.0.1:{edge_port}"
resources = ["edge"]

[offload]
homeserver_name = "hs.test"
homeserver_url = "https://127.0.0.1:{hs_port}"
verify_homeserver_certificate = false
homeserver_backoff_max = "1s"
{FAST}"#,
        hs_port = hs.addr.port()
    ))
    .await;
    (c, edge_port)
}

/// PUTs `body` as transaction `txn` to the edge on `edge_port`, signed by `signer`
/// for `dest`; the status.
async fn put_to_edge(edge_port: u16, signer: &Signer, txn: &str, dest: &str, body: &Value) -> u16 {
    let uri = format!("/_matrix/federation/v1/send/{txn}");
    insecure_client()
        .put(format!("https://127.0.0.1:{edge_port}{uri}"))
        .header(
            "Authorization",
            signer.header("PUT", &uri, dest, Some(body)),
        )
        .json(body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
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

/// The txnIds of the PUTs `r` received, in order, each retry of the same one folded
/// into its first arrival (retries after a failure repeat it back to back).
fn arrivals(r: &Recorder) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for rec in r.seen().iter().filter(|rec| rec.method == "PUT") {
        let txn = rec.target.rsplit('/').next().unwrap_or("").to_owned();
        if out.last() != Some(&txn) {
            out.push(txn);
        }
    }
    out
}

/// One raw HTTP/1.1 request to the offload listener (absolute-form target, as Synapse
/// sends it); returns the status code and the body.
fn raw_proxy_request(port: u16, target: &str, bearer: Option<&str>) -> (u16, String) {
    raw_request(
        port,
        "GET",
        &format!("matrix-federation://{target}"),
        bearer,
        &[],
        b"",
    )
}

/// One raw HTTP/1.1 request (`request_target` as given: absolute or origin form);
/// returns the status code and the body (chunk framing left in place).
fn raw_request(
    port: u16,
    method: &str,
    request_target: &str,
    bearer: Option<&str>,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut head =
        format!("{method} {request_target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    if let Some(b) = bearer {
        head.push_str(&format!("Proxy-Authorization: Bearer {b}\r\n"));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
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
        let mut ns: Vec<u64> = events
            .iter()
            .filter_map(|e| e["content"]["n"].as_u64())
            .collect();
        ns.sort_unstable();
        assert_eq!(
            ns,
            (0..per).collect::<Vec<_>>(),
            "phase 1 exactly once: {events:?}"
        );
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

/// The custody rules of the offload listener against a recording destination (no
/// Synapse needed): verbatim replay, replays not stored twice, order through an
/// outage, a refused transaction parked until requeued, PDUs passed through with the real answer.
// Multi-threaded: the raw requests block a worker while the recorder answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offload_custody_replays_verbatim_in_order_and_parks_refusals_until_requeued() {
    let dest = Recorder::start().await;
    let (c, port) = offload_to(dest.addr.port(), "").await;
    let auth = r#"X-Matrix origin="hs.test",destination="dest.test",key="ed25519:a",sig="c2ln""#;
    let put = |txn: &str, body: &[u8]| {
        raw_request(
            port,
            "PUT",
            &format!("matrix-federation://dest.test/_matrix/federation/v1/send/{txn}"),
            Some(SECRET),
            &[
                ("Authorization", auth),
                ("Content-Type", "application/json"),
            ],
            body,
        )
    };
    let edus = |n: u32| {
        format!(
            r#"{{ "origin":"hs.test",  "origin_server_ts":{n},"pdus":[],"edus":[{{"edu_type":"m.direct_to_device","content":{{"n":{n}, "f":1.0}}}}] }}"#
        )
    };
    let held_view =
        async || c.admin_get("/_courier/admin/v1/offload").await["outbound"]["dest.test"].clone();

    // Held, answered at once, replayed byte for byte (odd spacing and 1.0 included).
    let (status, body) = put("t1", edus(1).as_bytes());
    assert_eq!((status, body.as_str()), (200, r#"{"pdus":{}}"#));
    wait_for(
        "t1 at the destination",
        Duration::from_secs(20),
        async || dest.count() == 1,
    )
    .await;
    let got = &dest.seen()[0];
    assert_eq!(got.method, "PUT");
    assert_eq!(got.target, "/_matrix/federation/v1/send/t1");
    assert_eq!(got.authorization, vec![auth.to_owned()]);
    assert_eq!(got.body, edus(1).as_bytes());

    // The homeserver retries t1 (it lost our answer): answered the same, not stored again.
    assert_eq!(put("t1", edus(1).as_bytes()).0, 200);

    // The destination fails: t2 and t3 wait, in order, backing off.
    dest.answer(500, r#"{"errcode":"M_UNKNOWN"}"#);
    assert_eq!(put("t2", edus(2).as_bytes()).0, 200);
    assert_eq!(put("t3", edus(3).as_bytes()).0, 200);
    wait_for(
        "t2/t3 held with failures",
        Duration::from_secs(20),
        async || {
            let v = held_view().await;
            v["held"] == 2 && v["failures"].as_u64().unwrap_or(0) >= 1
        },
    )
    .await;
    dest.answer(200, r#"{"pdus":{}}"#);
    wait_for("t2/t3 delivered", Duration::from_secs(20), async || {
        held_view().await["held"].as_u64().unwrap_or(0) == 0
    })
    .await;
    let accepted: Vec<String> = dest
        .seen()
        .iter()
        .map(|r| r.target.rsplit('/').next().unwrap().to_owned())
        .collect();
    let firsts: Vec<&String> = accepted.iter().fold(Vec::new(), |mut v, t| {
        if v.last() != Some(&t) {
            v.push(t);
        }
        v
    });
    assert_eq!(
        firsts,
        ["t1", "t2", "t3"],
        "in order, t1 once: {accepted:?}"
    );
    assert_eq!(accepted.last().unwrap(), "t3");

    // A transaction refused for good is parked; the queue goes on.
    dest.answer(400, r#"{"errcode":"M_BAD_JSON"}"#);
    assert_eq!(put("t4", edus(4).as_bytes()).0, 200);
    wait_for("t4 parked", Duration::from_secs(20), async || {
        held_view().await["parked"] == 1
    })
    .await;
    dest.answer(200, r#"{"pdus":{}}"#);
    assert_eq!(put("t5", edus(5).as_bytes()).0, 200);
    wait_for("t5 delivered", Duration::from_secs(20), async || {
        dest.seen()
            .last()
            .is_some_and(|r| r.target.ends_with("/t5"))
    })
    .await;

    // The operator reads what was refused and why, then (the far side fixed) requeues
    // it: replayed once more, byte for byte with the origin's Authorization, after t5.
    let config = c.config_path();
    let cli = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--config", config.to_str().unwrap()]);
        let (code, out, err) = common::run_cli(&all, "", c.dir.path());
        assert_eq!(code, 0, "{args:?}: {err}");
        serde_json::from_str::<Value>(&out).unwrap()
    };
    let parked = cli(&["offload", "parked", "outbound", "dest.test"]);
    let entries = parked["parked"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{parked}");
    assert_eq!(entries[0]["txn_id"], "t4");
    assert_eq!(entries[0]["requeueable"], true);
    assert!(
        entries[0]["reason"].as_str().unwrap().contains("400"),
        "{parked}"
    );
    assert_eq!(entries[0]["body"]["edus"][0]["content"]["n"], 4);
    let (code, _, err) = common::run_cli(
        &["offload", "requeue", "sideways", "dest.test"],
        "",
        c.dir.path(),
    );
    assert_ne!(code, 0, "a direction that does not exist: {err}");
    let requeued = cli(&["offload", "requeue", "outbound", "dest.test"]);
    assert_eq!(requeued, json!({"requeued": 1, "not_requeueable": 0}));
    wait_for("t4 replayed again", Duration::from_secs(20), async || {
        dest.seen()
            .last()
            .is_some_and(|r| r.target.ends_with("/t4"))
    })
    .await;
    let again = dest.seen().last().cloned().unwrap();
    assert_eq!(again.authorization, vec![auth.to_owned()]);
    assert_eq!(again.body, edus(4).as_bytes());
    let view = cli(&["offload", "list"]);
    assert_eq!(
        view["outbound"]["dest.test"]["parked"]
            .as_u64()
            .unwrap_or(0),
        0,
        "{view}"
    );
    assert!(
        c.metrics()
            .await
            .contains("courier_offload_requeued_total{direction=\"out\"} 1")
    );
    // Refused again, and given up on: discarded, never replayed.
    dest.answer(400, r#"{"errcode":"M_BAD_JSON"}"#);
    assert_eq!(put("t4b", edus(4).as_bytes()).0, 200);
    wait_for("t4b parked", Duration::from_secs(20), async || {
        held_view().await["parked"] == 1
    })
    .await;
    dest.answer(200, r#"{"pdus":{}}"#);
    let before = dest.count();
    let discarded = cli(&["offload", "discard", "outbound", "dest.test"]);
    assert_eq!(discarded, json!({"discarded": 1}));
    assert_eq!(
        cli(&["offload", "parked", "outbound", "dest.test"])["parked"],
        json!([])
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        dest.count(),
        before,
        "a discarded transaction is not replayed"
    );

    // PDUs: passed through, the destination's own answer comes back, nothing held.
    dest.answer(200, r#"{"pdus":{"$ev":{"error":"the real answer"}}}"#);
    let before = dest.count();
    let (status, body) = put(
        "t6",
        br#"{"origin":"hs.test","origin_server_ts":6,"pdus":[{"event_id":"$ev"}],"edus":[]}"#,
    );
    assert_eq!(status, 200);
    assert!(body.contains("the real answer"), "{body}");
    assert_eq!(dest.count(), before + 1);
    assert_eq!(held_view().await["held"].as_u64().unwrap_or(0), 0);

    // Not a proxy request, or no secret: refused before anything is touched.
    let (status, body) = raw_request(
        port,
        "GET",
        "/_matrix/federation/v1/version",
        Some(SECRET),
        &[],
        b"",
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("M_UNRECOGNIZED"), "{body}");
    let (status, _) = raw_request(
        port,
        "PUT",
        "matrix-federation://dest.test/_matrix/federation/v1/send/t7",
        None,
        &[],
        edus(7).as_bytes(),
    );
    assert_eq!(status, 401);
    assert!(!dest.seen().iter().any(|r| r.target.ends_with("/t7")));
}

/// The edge: signatures checked against the origin's keys and the homeserver's name,
/// transactions held and replayed verbatim to the homeserver, in order through its
/// outage; other federation requests passed to it, anything else refused.
#[tokio::test]
async fn edge_verifies_holds_and_replays_to_the_homeserver() {
    let hs = Recorder::start().await;
    let origin = FakeOrigin::start().await;
    let signer = origin.signer();
    let (c, edge_port) = edge_for(&hs).await;
    let client = insecure_client();
    let edge = |path: &str| format!("https://127.0.0.1:{edge_port}{path}");
    let put = async |txn: &str, dest: &str, n: u64| {
        let body = json!({"origin": origin.name, "origin_server_ts": n, "pdus": [],
            "edus": [{"edu_type": "m.direct_to_device", "content": {"n": n}}]});
        put_to_edge(edge_port, &signer, txn, dest, &body).await
    };
    let held_view =
        async || c.admin_get("/_courier/admin/v1/offload").await["inbound"][&origin.name].clone();

    assert_eq!(put("e1", "hs.test", 1).await, 200);
    wait_for(
        "e1 at the homeserver",
        Duration::from_secs(20),
        async || hs.count() == 1,
    )
    .await;
    let got = &hs.seen()[0];
    assert_eq!(got.target, "/_matrix/federation/v1/send/e1");
    let sent = json!({"origin": origin.name, "origin_server_ts": 1, "pdus": [],
        "edus": [{"edu_type": "m.direct_to_device", "content": {"n": 1}}]});
    assert_eq!(
        got.authorization,
        vec![signer.header(
            "PUT",
            "/_matrix/federation/v1/send/e1",
            "hs.test",
            Some(&sent)
        )]
    );
    assert_eq!(serde_json::from_slice::<Value>(&got.body).unwrap(), sent);

    // Addressed to another server, or unsigned: 401, nothing reaches the homeserver.
    assert_eq!(put("e2", &c.server_name, 2).await, 401);
    let r = client
        .put(edge("/_matrix/federation/v1/send/e3"))
        .json(&json!({"origin": origin.name, "pdus": [], "edus": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(hs.count(), 1);

    // The homeserver is down: held in order, replayed when it is back.
    hs.answer(503, "");
    for (i, txn) in ["e4", "e5", "e6"].iter().enumerate() {
        assert_eq!(put(txn, "hs.test", 4 + i as u64).await, 200);
    }
    wait_for(
        "held while the homeserver is down",
        Duration::from_secs(20),
        async || {
            let v = held_view().await;
            v["held"] == 3 && v["failures"].as_u64().unwrap_or(0) >= 1
        },
    )
    .await;
    hs.answer(200, r#"{"pdus":{}}"#);
    wait_for("replayed", Duration::from_secs(20), async || {
        held_view().await["held"].as_u64().unwrap_or(0) == 0
    })
    .await;
    assert_eq!(arrivals(&hs), ["e1", "e4", "e5", "e6"]);

    // Other federation requests go to the homeserver; the rest is not ours.
    hs.answer(200, r#"{"server":{"name":"recorder"}}"#);
    let v: Value = client
        .get(edge("/_matrix/federation/v1/version"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["server"]["name"], "recorder");
    let r = client
        .get(edge("/_matrix/client/versions"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

/// A held transaction the homeserver refuses as unauthenticated is retried while its
/// origin still publishes the key it was signed with (the homeserver may just have
/// failed to fetch it), and parked once the origin rotated that key out: no replay
/// could ever pass, and it would block every transaction behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_transaction_signed_with_a_key_rotated_out_is_parked_not_retried_forever() {
    let hs = Recorder::start().await;
    let origin = FakeOrigin::start().await;
    let (c, edge_port) = edge_for(&hs).await;
    // Signed with the origin's key of the moment.
    let put = async |txn: &str| {
        let body = json!({"origin": origin.name, "origin_server_ts": 1, "pdus": [],
            "edus": [{"edu_type": "m.direct_to_device", "content": {"txn": txn}}]});
        put_to_edge(edge_port, &origin.signer(), txn, "hs.test", &body).await
    };
    let view =
        async || c.admin_get("/_courier/admin/v1/offload").await["inbound"][&origin.name].clone();

    hs.answer(
        401,
        r#"{"errcode":"M_UNAUTHORIZED","error":"Failed to find any key"}"#,
    );
    assert_eq!(put("k1").await, 200);
    wait_for("401s retried", Duration::from_secs(20), async || {
        view().await["failures"].as_u64().unwrap_or(0) >= 3
    })
    .await;
    let v = view().await;
    assert_eq!(
        (v["held"].as_u64(), v["parked"].as_u64()),
        (Some(1), Some(0)),
        "{v}"
    );

    // The origin rotates its key: k1 can no longer be verified by anyone.
    origin.rotate();
    wait_for("k1 parked", Duration::from_secs(60), async || {
        view().await["parked"] == 1
    })
    .await;
    assert_eq!(view().await["held"], 0);
    assert!(c.log().contains("no longer publishes"), "{}", c.log());

    // What the origin signs now goes through.
    hs.answer(200, r#"{"pdus":{}}"#);
    assert_eq!(put("k2").await, 200);
    wait_for("k2 delivered", Duration::from_secs(20), async || {
        arrivals(&hs).last().map(String::as_str) == Some("k2")
    })
    .await;
    assert_eq!(arrivals(&hs), ["k1", "k2"]);
}

/// The other side of that rule: a 401 is retried, never parked, while the origin's
/// key server cannot be asked (here it answers too slowly), however often the
/// destination refuses; the transaction goes through once the destination accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_is_retried_while_the_origins_key_server_cannot_be_asked() {
    let dest = Recorder::start().await;
    let origin = FakeOrigin::start().await;
    // Longer than courier waits for a key server.
    origin.slow_keys(Duration::from_secs(15));
    let (c, port) = offload_to(dest.addr.port(), "").await;
    dest.answer(
        401,
        r#"{"errcode":"M_UNAUTHORIZED","error":"Failed to find any key"}"#,
    );
    let body = json!({"origin": origin.name, "origin_server_ts": 1, "pdus": [],
        "edus": [{"edu_type": "m.direct_to_device", "content": {}}]});
    let uri = "/_matrix/federation/v1/send/s1";
    let auth = origin.signer().header("PUT", uri, "dest.test", Some(&body));
    let (status, _) = raw_request(
        port,
        "PUT",
        &format!("matrix-federation://dest.test{uri}"),
        Some(SECRET),
        &[
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/json"),
        ],
        body.to_string().as_bytes(),
    );
    assert_eq!(status, 200);
    let view =
        async || c.admin_get("/_courier/admin/v1/offload").await["outbound"]["dest.test"].clone();
    // The first key fetch times out; the retries after it find it failed.
    wait_for("401s retried", Duration::from_secs(40), async || {
        view().await["failures"].as_u64().unwrap_or(0) >= 4
    })
    .await;
    let v = view().await;
    assert_eq!(
        (v["held"].as_u64(), v["parked"].as_u64()),
        (Some(1), Some(0)),
        "{v}"
    );
    dest.answer(200, r#"{"pdus":{}}"#);
    wait_for("s1 delivered", Duration::from_secs(30), async || {
        held(&c, "outbound", "dest.test").await == 0
    })
    .await;
    // A queue with nothing held or parked drops out of the view.
    assert_eq!(view().await["parked"].as_u64().unwrap_or(0), 0);
    assert!(!c.log().contains("no longer publishes"), "{}", c.log());
    assert_eq!(arrivals(&dest), ["s1"]);
}

/// The edge's prefix check holds for the path the homeserver receives: targets that an
/// HTTP client would resolve out of `/_matrix/federation/` (dot segments, `%2e`,
/// backslashes) are refused, passed through or held, and never reach the homeserver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_refuses_targets_that_would_leave_the_federation_prefix() {
    let hs = Recorder::start().await;
    hs.answer(200, r#"{"server":{"name":"recorder"}}"#);
    let edge_port = free_port();
    let c = Courier::start_with(&format!(
        r#"
[[listeners]]
address = "127.0.0.1:{edge_port}"
tls = false
resources = ["edge"]

[offload]
homeserver_name = "hs.test"
homeserver_url = "https://127.0.0.1:{hs_port}"
verify_homeserver_certificate = false
{FAST}"#,
        hs_port = hs.addr.port()
    ))
    .await;
    for (method, target) in [
        (
            "GET",
            "/_matrix/federation/../../_synapse/admin/v1/server_version",
        ),
        (
            "GET",
            "/_matrix/federation/%2e%2e/%2E%2E/_synapse/admin/v1/users/@a:b",
        ),
        (
            "GET",
            "/_matrix/federation/v1/send/x/..\\..\\..\\..\\_synapse/admin/v1/users",
        ),
        (
            "PUT",
            "/_matrix/federation/v1/send/..\\..\\..\\..\\_synapse",
        ),
    ] {
        let (status, body) = raw_request(edge_port, method, target, None, &[], b"{}");
        assert_eq!(status, 400, "{method} {target}: {body}");
        assert!(
            body.contains("M_INVALID_PARAM"),
            "{method} {target}: {body}"
        );
    }
    assert_eq!(hs.count(), 0, "{:?}", hs.seen());
    // A plain federation request still goes through.
    let (status, body) = raw_request(
        edge_port,
        "GET",
        "/_matrix/federation/v1/version",
        None,
        &[],
        b"",
    );
    assert_eq!(status, 200, "{body}\n{}", c.log());
    assert_eq!(hs.count(), 1);
    assert_eq!(hs.seen()[0].target, "/_matrix/federation/v1/version");
}

/// A destination that answers 200 and then never ends its body: the held
/// transaction counts as delivered on the status, without courier reading (and
/// holding in memory) the rest until the request timeout, and then sending it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_answered_with_an_endless_body_is_delivered_on_its_status() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let hits = Arc::new(AtomicUsize::new(0));
    let seen = hits.clone();
    let endless = axum::Router::new().fallback(move || {
        seen.fetch_add(1, Ordering::SeqCst);
        async {
            let chunk = bytes::Bytes::from(vec![b' '; 64 * 1024]);
            let body = futures::stream::repeat_with(move || Ok::<_, std::io::Error>(chunk.clone()));
            axum::response::Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .body(axum::body::Body::from_stream(body))
                .unwrap()
        }
    });
    let (addr, handle) = common::proxy::serve_tls(endless).await;
    let (c, port) = offload_to(addr.port(), "").await;
    let body = br#"{"origin":"hs.test","origin_server_ts":1,"pdus":[],"edus":[]}"#;
    let (status, _) = raw_request(
        port,
        "PUT",
        "matrix-federation://dest.test/_matrix/federation/v1/send/x1",
        Some(SECRET),
        &[(
            "Authorization",
            "X-Matrix origin=\"hs.test\",key=\"ed25519:a\",sig=\"c2ln\"",
        )],
        body,
    );
    assert_eq!(status, 200);
    wait_for("the replay", Duration::from_secs(20), async || {
        hits.load(Ordering::SeqCst) >= 1
    })
    .await;
    wait_for(
        "delivery on the status",
        Duration::from_secs(20),
        async || {
            let v = c.admin_get("/_courier/admin/v1/offload").await;
            v["outbound"]["dest.test"]["held"].as_u64().unwrap_or(0) == 0
        },
    )
    .await;
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "delivered on the first answer"
    );
    handle.shutdown();
}

/// `custody = "all"`: a transaction with PDUs is held too, answered at once while the
/// destination fails, and delivered verbatim when it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custody_all_holds_pdu_transactions_too() {
    let dest = Recorder::start().await;
    dest.answer(502, "");
    let (c, port) = offload_to(dest.addr.port(), "custody = \"all\"").await;
    let body = br#"{"origin":"hs.test","origin_server_ts":1,"pdus":[{"event_id":"$e"}],"edus":[]}"#;
    let (status, answer) = raw_request(
        port,
        "PUT",
        "matrix-federation://dest.test/_matrix/federation/v1/send/p1",
        Some(SECRET),
        &[(
            "Authorization",
            "X-Matrix origin=\"hs.test\",key=\"ed25519:a\",sig=\"c2ln\"",
        )],
        body,
    );
    assert_eq!((status, answer.as_str()), (200, r#"{"pdus":{}}"#));
    wait_for("a failed attempt", Duration::from_secs(20), async || {
        dest.count() >= 1
    })
    .await;
    dest.answer(200, r#"{"pdus":{}}"#);
    wait_for("delivery", Duration::from_secs(20), async || {
        let v = c.admin_get("/_courier/admin/v1/offload").await;
        v["outbound"]["dest.test"]["held"].as_u64().unwrap_or(0) == 0
    })
    .await;
    assert!(
        dest.count() >= 2,
        "held through the failure, then delivered"
    );
    let got = dest.seen();
    assert!(
        got.iter().all(|r| r.body == body.as_slice()),
        "verbatim every time"
    );
}
