//! Issue 3 as a user tries it: two real couriers on loopback, durable per-destination
//! queues, backoff across outages and restarts, and every bad inbound transaction.

mod common;

use std::time::{Duration, Instant};

use common::matrix::{assert_exactly_once, device, edu, send_many, sync_events, sync_until, txn};
use common::proxy::Signer;
use common::{Courier, insecure_client};
use serde_json::{Value, json};

#[tokio::test]
async fn a_large_batch_arrives_exactly_once() {
    let a = Courier::start().await;
    let b = Courier::start().await;
    let alice = device(&a, &format!("@alice:{}", a.server_name), "ALICE").await;
    let bob_id = format!("@bob:{}", b.server_name);
    let bob = device(&b, &bob_id, "BOB").await;
    send_many(&a.base(), &alice, &bob_id, "BOB", 0..2000).await;
    let seen = sync_until(&b.base(), &bob, 2000, Duration::from_secs(120)).await;
    if seen.len() != 2000 {
        std::fs::write("/tmp/a.log", a.log()).unwrap();
        std::fs::write("/tmp/b.log", b.log()).unwrap();
    }
    assert_exactly_once(&seen, 2000);
    // Several transactions of many EDUs carried them.
    let log = a.log();
    assert!(log.contains("transaction delivered"), "sender log");
    // And the latencies an operator watches were recorded on both sides.
    let count = |metrics: &str, name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}_count ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name}_count in\n{metrics}"))
    };
    let (ma, mb) = (a.metrics().await, b.metrics().await);
    assert!(count(&ma, "courier_send_to_device_seconds") >= 1);
    assert!(count(&ma, "courier_federation_round_trip_seconds") >= 1);
    assert!(count(&mb, "courier_inbound_transaction_seconds") >= 1);
}

#[tokio::test]
async fn receiver_outage_backs_off_then_delivers_everything_once() {
    let a = Courier::start_with("[federation]\nallow_private_destinations = true\nverify_certificates = false\nbackoff_initial = \"200ms\"\nbackoff_max = \"1s\"\n").await;
    let mut b = Courier::start().await;
    let alice = device(&a, &format!("@alice:{}", a.server_name), "ALICE").await;
    let bob_id = format!("@bob:{}", b.server_name);
    let bob = device(&b, &bob_id, "BOB").await;
    send_many(&a.base(), &alice, &bob_id, "BOB", 0..50).await;
    let first = sync_until(&b.base(), &bob, 50, Duration::from_secs(60)).await;
    assert_exactly_once(&first, 50);
    b.kill();
    // More than a whole transaction's worth queues up (1000 queued EDUs), so the
    // drain also runs with the next transaction prepared while one is in flight.
    send_many(&a.base(), &alice, &bob_id, "BOB", 50..2600).await;
    // The sender notices and backs off: visible in its log and its admin view.
    let end = Instant::now() + Duration::from_secs(30);
    while !a.log().contains("backing off") {
        assert!(Instant::now() < end, "no backoff in log:\n{}", a.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dests: Value = a.admin_get("/_courier/admin/v1/destinations").await;
    let d = &dests["destinations"][&b.server_name];
    assert!(d["failures"].as_u64().unwrap() >= 1, "{dests}");
    assert!(d["queued"].as_u64().unwrap() >= 1, "{dests}");
    b.spawn().await;
    let rest = sync_until(&b.base(), &bob, 2550, Duration::from_secs(90)).await;
    let all: Vec<u64> = first.iter().chain(rest.iter()).copied().collect();
    assert_exactly_once(&all, 2600);
}

#[tokio::test]
async fn sigkilled_sender_resumes_its_queue() {
    let mut a = Courier::start().await;
    let mut b = Courier::start().await;
    let alice = device(&a, &format!("@alice:{}", a.server_name), "ALICE").await;
    let bob_id = format!("@bob:{}", b.server_name);
    let bob = device(&b, &bob_id, "BOB").await;
    b.kill();
    send_many(&a.base(), &alice, &bob_id, "BOB", 0..200).await;
    a.kill();
    // Queued on disk: visible in A's store while A is down.
    {
        let store =
            courier::store::Store::open(&a.data_dir().join("db"), &Default::default()).unwrap();
        assert_eq!(store.outbox_depth(&b.server_name).unwrap().0, 200);
    }
    b.spawn().await;
    a.spawn().await;
    let seen = sync_until(&b.base(), &bob, 200, Duration::from_secs(60)).await;
    assert_exactly_once(&seen, 200);
    // Acknowledged and purged on A.
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        a.kill();
        let store =
            courier::store::Store::open(&a.data_dir().join("db"), &Default::default()).unwrap();
        if store.destinations_with_work().unwrap().is_empty() {
            break;
        }
        drop(store);
        assert!(Instant::now() < end, "outbox not purged");
        a.spawn().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn repeated_transactions_and_bad_input() {
    let origin = Courier::start().await; // only serves its keys
    let target = Courier::start().await;
    let s = Signer::of(&origin);
    let bob_id = format!("@bob:{}", target.server_name);
    let bob = device(&target, &bob_id, "BOB").await;
    let alice = format!("@alice:{}", origin.server_name);

    // The same transaction twice: processed once.
    let t = txn(&s.origin, vec![edu(&alice, "m1", &bob_id, 0)]);
    assert_eq!(
        s.put_txn(&target, "T1", &t).await,
        (200, json!({"pdus": {}}))
    );
    assert_eq!(s.put_txn(&target, "T1", &t).await.0, 200);
    // The same message in a new transaction: deduplicated by message_id.
    assert_eq!(s.put_txn(&target, "T2", &t).await.0, 200);
    // A malformed EDU next to a good one: the good one is kept.
    let t3 = txn(
        &s.origin,
        vec![
            json!({"edu_type": "m.direct_to_device", "content": {"sender": 5}}),
            edu(&alice, "m2", &bob_id, 1),
        ],
    );
    assert_eq!(s.put_txn(&target, "T3", &t3).await.0, 200);
    // A spoofed sender is dropped.
    let t4 = txn(
        &s.origin,
        vec![edu("@mallory:evil.example", "m3", &bob_id, 99)],
    );
    assert_eq!(s.put_txn(&target, "T4", &t4).await.0, 200);
    let seen = sync_until(&target.base(), &bob, 2, Duration::from_secs(10)).await;
    assert_eq!(seen, vec![0, 1]);

    let client = insecure_client();
    let uri = "/_matrix/federation/v1/send/BAD";
    let good = txn(&s.origin, vec![edu(&alice, "m9", &bob_id, 9)]);
    let put = |auth: Option<String>, body: Vec<u8>| {
        let mut rb = client
            .put(target.url(uri))
            .header("Content-Type", "application/json")
            .body(body);
        if let Some(a) = auth {
            rb = rb.header("Authorization", a);
        }
        async move {
            let r = rb.send().await.unwrap();
            let st = r.status().as_u16();
            (st, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let body = serde_json::to_vec(&good).unwrap();
    let h = s.header("PUT", uri, &target.server_name, Some(&good));

    // No signature at all.
    let (st, e) = put(None, body.clone()).await;
    assert_eq!((st, e["errcode"].as_str()), (401, Some("M_UNAUTHORIZED")));
    // A signature over different content.
    let other = txn(&s.origin, vec![]);
    let (st, _) = put(
        Some(s.header("PUT", uri, &target.server_name, Some(&other))),
        body.clone(),
    )
    .await;
    assert_eq!(st, 401);
    // Signed for another destination.
    let (st, _) = put(
        Some(s.header("PUT", uri, "elsewhere.example", Some(&good))),
        body.clone(),
    )
    .await;
    assert_eq!(st, 401);
    // An unknown key id.
    let (st, _) = put(
        Some(h.replace(&s.key.key_id(), "ed25519:nope")),
        body.clone(),
    )
    .await;
    assert_eq!(st, 401);
    // A mangled header.
    let (st, _) = put(Some("X-Matrix origin=".into()), body.clone()).await;
    assert!(st == 400 || st == 401, "{st}");
    // Not JSON.
    let (st, e) = put(Some(h.clone()), b"{nope".to_vec()).await;
    assert_eq!((st, e["errcode"].as_str()), (400, Some("M_NOT_JSON")));
    // Wrong types.
    let bad = json!({"origin": s.origin, "origin_server_ts": 1, "pdus": [], "edus": {}});
    let (st, e) = put(
        Some(s.header("PUT", uri, &target.server_name, Some(&bad))),
        serde_json::to_vec(&bad).unwrap(),
    )
    .await;
    assert_eq!((st, e["errcode"].as_str()), (400, Some("M_BAD_JSON")));
    // Body origin differs from the signer.
    let lie = json!({"origin": "other.example", "origin_server_ts": 1, "pdus": [], "edus": []});
    let (st, _) = put(
        Some(s.header("PUT", uri, &target.server_name, Some(&lie))),
        serde_json::to_vec(&lie).unwrap(),
    )
    .await;
    assert_eq!(st, 403);
    // Too many EDUs.
    let many = txn(
        &s.origin,
        (0..101)
            .map(|i| edu(&alice, &format!("x{i}"), &bob_id, 1000 + i))
            .collect(),
    );
    let (st, _) = put(
        Some(s.header("PUT", uri, &target.server_name, Some(&many))),
        serde_json::to_vec(&many).unwrap(),
    )
    .await;
    assert_eq!(st, 400);
    // Oversized body.
    let huge = txn(
        &s.origin,
        vec![json!({"edu_type": "m.x", "content": {"pad": "y".repeat(9 * 1024 * 1024)}})],
    );
    let (st, e) = put(
        Some(s.header("PUT", uri, &target.server_name, Some(&huge))),
        serde_json::to_vec(&huge).unwrap(),
    )
    .await;
    assert_eq!((st, e["errcode"].as_str()), (413, Some("M_TOO_LARGE")));

    // None of that delivered anything.
    let seen = sync_until(&target.base(), &bob, 1, Duration::from_secs(2)).await;
    assert!(seen.is_empty(), "{seen:?}");

    // A body that is not the bytes signed (spaced, a number spelled otherwise) but
    // the same JSON: verified by its canonical form, delivered. Its content comes
    // out as the same JSON.
    let mut spaced = edu(&alice, "m7", &bob_id, 7);
    spaced["content"]["messages"][&bob_id]["*"]["f"] = json!(0.625);
    let t7 = txn(&s.origin, vec![spaced]);
    let uri7 = "/_matrix/federation/v1/send/T7";
    let text = serde_json::to_string_pretty(&t7)
        .unwrap()
        .replace("0.625", "6.25e-1");
    let put7 = client
        .put(target.url(uri7))
        .header("Content-Type", "application/json")
        .header(
            "Authorization",
            s.header("PUT", uri7, &target.server_name, Some(&t7)),
        )
        .body(text)
        .send()
        .await
        .unwrap();
    assert_eq!(put7.status().as_u16(), 200);
    let events = sync_events(&target.base(), &bob, 1, Duration::from_secs(10)).await;
    assert_eq!(
        events.last().map(|e| &e["content"]),
        Some(&json!({"n": 7, "f": 0.625})),
        "{events:?}"
    );
    assert!(!target.log().contains("panicked"));
}

/// A fake federation receiver on loopback (TLS, self-signed) whose answer to each
/// `/send` is chosen by `answer(edu_count, body)`; records every transaction it saw.
struct FakeReceiver {
    port: u16,
    /// Every transaction received, with the status it was answered.
    seen: std::sync::Arc<std::sync::Mutex<Vec<(u16, Value)>>>,
    handle: axum_server::Handle<std::net::SocketAddr>,
}

impl FakeReceiver {
    async fn start(answer: fn(usize, &Value) -> u16) -> FakeReceiver {
        use axum::routing::put;
        courier::tls::install_crypto_provider();
        let seen: std::sync::Arc<std::sync::Mutex<Vec<(u16, Value)>>> = Default::default();
        let seen2 = seen.clone();
        let app = axum::Router::new().route(
            "/_matrix/federation/v1/send/{txn}",
            put(move |axum::Json(body): axum::Json<Value>| {
                let seen = seen2.clone();
                async move {
                    let n = body["edus"].as_array().map_or(0, |a| a.len());
                    let status = answer(n, &body);
                    seen.lock().unwrap().push((status, body));
                    (
                        axum::http::StatusCode::from_u16(status).unwrap(),
                        axum::Json(json!({"pdus": {}})),
                    )
                }
            }),
        );
        let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        let tls = axum_server::tls_rustls::RustlsConfig::from_pem(
            ck.cert.pem().into_bytes(),
            ck.signing_key.serialize_pem().into_bytes(),
        )
        .await
        .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let handle = axum_server::Handle::new();
        let server = axum_server::from_tcp_rustls(listener, tls)
            .unwrap()
            .handle(handle.clone());
        tokio::spawn(server.serve(app.into_make_service()));
        FakeReceiver { port, seen, handle }
    }

    fn server_name(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `content.n` of every EDU in every transaction answered 200.
    fn delivered(&self) -> Vec<u64> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(status, _)| *status == 200)
            .flat_map(|(_, t)| t["edus"].as_array().unwrap().clone())
            .flat_map(|e| {
                e["content"]["messages"]
                    .as_object()
                    .unwrap()
                    .values()
                    .flat_map(|d| {
                        d.as_object()
                            .unwrap()
                            .values()
                            .map(|c| c["n"].as_u64().unwrap())
                            .collect::<Vec<_>>()
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

impl Drop for FakeReceiver {
    fn drop(&mut self) {
        self.handle.shutdown();
    }
}

/// Set once the picky receiver's operator "fixed" it: the EDU carrying n == 13 is
/// accepted from then on. (Only the test below uses the picky receiver.)
static PICKY_FIXED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// 413 for any transaction of more than 3 EDUs; 400 for the EDU carrying n == 13
/// until [`PICKY_FIXED`].
fn picky(edus: usize, body: &Value) -> u16 {
    let poisoned = body["edus"].as_array().unwrap().iter().any(|e| {
        e["content"]["messages"]
            .as_object()
            .unwrap()
            .values()
            .any(|d| d.as_object().unwrap().values().any(|c| c["n"] == 13))
    });
    if edus > 3 {
        413
    } else if poisoned && !PICKY_FIXED.load(std::sync::atomic::Ordering::SeqCst) {
        400
    } else {
        200
    }
}

/// Waits until `fake` accepted `want` EDUs (or more); their `n`s, sorted.
async fn wait_delivered(fake: &FakeReceiver, want: usize, a: &Courier) -> Vec<u64> {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let mut got = fake.delivered();
        got.sort_unstable();
        if got.len() >= want {
            return got;
        }
        assert!(Instant::now() < end, "delivered only {got:?}\n{}", a.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn refused_transactions_are_split_and_a_refused_edu_is_parked_until_requeued_or_discarded() {
    let fake = FakeReceiver::start(picky).await;
    let a = Courier::start().await;
    let alice = device(&a, &format!("@alice:{}", a.server_name), "ALICE").await;
    let dest = fake.server_name();
    let to = format!("@x:{dest}");
    // Queue everything while the first transaction is refused, so transactions are big.
    send_many(&a.base(), &alice, &to, "X", 0..40).await;
    let got = wait_delivered(&fake, 39, &a).await;
    let want: Vec<u64> = (0..40).filter(|n| *n != 13).collect();
    assert_eq!(got, want, "everything but the poisoned EDU, once");
    // The poisoned EDU was parked, with a warning, and the queue is empty.
    let dests: Value = a.admin_get("/_courier/admin/v1/destinations").await;
    let d = &dests["destinations"][&dest];
    assert_eq!(d["parked"], 1, "{dests}");
    assert_eq!(d["queued"], 0, "{dests}");
    assert!(a.log().contains("parked"));
    assert!(a.log().contains("splitting"));
    // And counted, for operators' dashboards.
    let metrics = a.metrics().await;
    assert!(metrics.contains("courier_edus_parked_total 1"), "{metrics}");
    assert!(
        metrics.contains("courier_transactions_split_total"),
        "{metrics}"
    );
    let r = insecure_client()
        .get(a.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "metrics need the admin token");

    // The operator sees what was refused, and why, as the EDU itself.
    let config = a.config_path();
    let cli = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--config", config.to_str().unwrap()]);
        let (code, out, err) = common::run_cli(&all, "", a.dir.path());
        assert_eq!(code, 0, "{args:?}: {err}");
        serde_json::from_str::<Value>(&out).unwrap()
    };
    let parked = cli(&["destination", "parked", &dest]);
    let entries = parked["parked"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{parked}");
    assert!(
        entries[0]["reason"].as_str().unwrap().contains("400"),
        "{parked}"
    );
    assert_eq!(entries[0]["edu"]["edu_type"], "m.direct_to_device");
    let messages = &entries[0]["edu"]["content"]["messages"][&to];
    assert_eq!(messages["X"]["n"], 13, "{parked}");
    assert!(parked.get("next_from").is_none(), "one page: {parked}");
    // Paging: a full page names where the next starts.
    let first = cli(&["destination", "parked", &dest, "--limit", "1"]);
    assert_eq!(first["next_from"], entries[0]["seq"], "{first}");
    let from = first["next_from"].to_string();
    let rest = cli(&["destination", "parked", &dest, "--from", &from]);
    assert_eq!(rest["parked"], json!([]), "{rest}");
    // Bad input is refused clearly, not with a plain-text 400.
    let bad = insecure_client()
        .get(a.url("/_courier/admin/v1/destinations/not%20a%20server/parked"))
        .bearer_auth(common::ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let bad: Value = bad.json().await.unwrap();
    assert_eq!(bad["errcode"], "M_INVALID_PARAM", "{bad}");
    let (code, _, err) = common::run_cli(
        &[
            "destination",
            "parked",
            &dest,
            "--limit",
            "0",
            "--config",
            config.to_str().unwrap(),
        ],
        "",
        a.dir.path(),
    );
    assert_ne!(code, 0);
    assert!(err.contains("M_INVALID_PARAM"), "{err}");

    // Fixed on the far side; the operator requeues, and it is delivered exactly once.
    PICKY_FIXED.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(cli(&["destination", "requeue", &dest])["requeued"], 1);
    let got = wait_delivered(&fake, 40, &a).await;
    assert_eq!(got, (0..40).collect::<Vec<u64>>(), "each EDU once");
    let dests = cli(&["destination", "list"]);
    assert_eq!(dests["destinations"][&dest]["parked"], 0, "{dests}");
    assert_eq!(cli(&["destination", "requeue", &dest])["requeued"], 0);
    assert!(a.metrics().await.contains("courier_edus_requeued_total 1"));
    // Nothing more arrives: the requeued EDU was delivered once, not twice.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fake.delivered().len(), 40);

    // Refused again (from another device, so not a retransmission), and this time
    // the operator gives up on it: discarded for good, never delivered.
    PICKY_FIXED.store(false, std::sync::atomic::Ordering::SeqCst);
    let phone = device(&a, &format!("@alice:{}", a.server_name), "PHONE").await;
    send_many(&a.base(), &phone, &to, "X", 13..14).await;
    let end = Instant::now() + Duration::from_secs(30);
    while cli(&["destination", "list"])["destinations"][&dest]["parked"] != 1 {
        assert!(Instant::now() < end, "never parked again\n{}", a.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(cli(&["destination", "discard", &dest])["discarded"], 1);
    assert_eq!(
        cli(&["destination", "parked", &dest])["parked"],
        json!([]),
        "gone"
    );
    assert!(a.log().contains("discarded by an operator"));
    assert!(a.metrics().await.contains("courier_edus_discarded_total 1"));
    PICKY_FIXED.store(true, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fake.delivered().len(), 40, "a discarded EDU is never sent");
}

#[tokio::test]
async fn a_full_destination_queue_refuses_new_messages_with_429_then_recovers() {
    let a = Courier::start_with(
        "[federation]\nallow_private_destinations = true\nverify_certificates = false\nbackoff_initial = \"100ms\"\nbackoff_max = \"500ms\"\nmax_queued_per_destination = 5\n",
    )
    .await;
    let mut b = Courier::start().await;
    let alice = device(&a, &format!("@alice:{}", a.server_name), "ALICE").await;
    let bob_id = format!("@bob:{}", b.server_name);
    let bob = device(&b, &bob_id, "BOB").await;
    b.kill();
    send_many(&a.base(), &alice, &bob_id, "BOB", 0..5).await;
    let r = insecure_client()
        .put(a.url("/_matrix/client/v3/sendToDevice/m.test/over"))
        .bearer_auth(&alice)
        .json(&json!({"messages": {&bob_id: {"BOB": {"n": 99}}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().get("retry-after").is_some());
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["errcode"], "M_LIMIT_EXCEEDED");
    b.spawn().await;
    let seen = sync_until(&b.base(), &bob, 5, Duration::from_secs(30)).await;
    assert_exactly_once(&seen, 5);
    // Drained: the same request is accepted now (nothing was stored the first time).
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let r = insecure_client()
            .put(a.url("/_matrix/client/v3/sendToDevice/m.test/over"))
            .bearer_auth(&alice)
            .json(&json!({"messages": {&bob_id: {"BOB": {"n": 5}}}}))
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(
            Instant::now() < end,
            "queue never drained: {} {}",
            r.status(),
            r.text().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let more = sync_until(&b.base(), &bob, 1, Duration::from_secs(30)).await;
    assert_eq!(more, vec![5]);
}

#[tokio::test]
async fn device_list_and_key_queries_answer_for_our_users() {
    let origin = Courier::start().await;
    let target = Courier::start().await;
    let s = Signer::of(&origin);
    let bob_id = format!("@bob:{}", target.server_name);
    device(&target, &bob_id, "B1").await;
    device(&target, &bob_id, "B2").await;
    let client = insecure_client();

    let uri = format!(
        "/_matrix/federation/v1/user/devices/{}",
        bob_id.replace(':', "%3A")
    );
    let r = client
        .get(target.url(&uri))
        .header(
            "Authorization",
            s.header("GET", &uri, &target.server_name, None),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["user_id"], bob_id.as_str());
    assert!(v["stream_id"].is_u64());
    let ids: Vec<&str> = v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["B1", "B2"]);
    // Unsigned: refused.
    assert_eq!(
        client.get(target.url(&uri)).send().await.unwrap().status(),
        401
    );

    let uri = "/_matrix/federation/v1/user/keys/query";
    let body = json!({"device_keys": {&bob_id: [], "@x:elsewhere.example": []}});
    let r = client
        .post(target.url(uri))
        .header(
            "Authorization",
            s.header("POST", uri, &target.server_name, Some(&body)),
        )
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v, json!({"device_keys": {&bob_id: {}}}));
}
