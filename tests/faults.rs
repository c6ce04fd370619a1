//! Issue 7, faulty networks: courier A delivers to courier B through a fault-injecting
//! proxy (`common::proxy`), and whatever the network does, everything arrives exactly
//! once after the faults stop; retries back off on the persisted schedule.
//!
//! A's `[federation.overrides]` sends B's traffic to the proxy. TLS runs end to end
//! through it, so TCP-level faults (cut mid-request, reset, black hole, delay) come
//! from the proxy and HTTP-level ones (500, 502, 429, an answer lost after B committed)
//! from a fake TLS server the proxy diverts to, which forwards to B or answers itself.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::Courier;
use common::matrix::{assert_exactly_once, device, send_many, sync_until};
use common::proxy::{FakeServer, Fault, HttpFault, Proxy, Signer};
use courier::federation::retry::Policy;
use serde_json::{Value, json};

/// Guard against hanging; never reached when things work.
const GUARD: Duration = Duration::from_secs(60);

/// A receiver B, a proxy in front of it, and a sender A whose traffic for B goes
/// through the proxy.
struct Rig {
    b: Courier,
    proxy: Proxy,
    a: Courier,
    alice: String,
    bob_id: String,
    bob: String,
}

impl Rig {
    /// `federation` is A's `[federation]` settings beyond the loopback ones.
    async fn start(federation: &str) -> Rig {
        let b = Courier::start().await;
        let target: SocketAddr = format!("127.0.0.1:{}", b.port).parse().unwrap();
        let proxy = Proxy::start(target).await;
        let a = Courier::start_with(&format!(
            "[federation]\nallow_private_destinations = true\nverify_certificates = false\n\
             {federation}\n[federation.overrides]\n\"{}\" = \"{}\"\n",
            b.server_name,
            proxy.addr()
        ))
        .await;
        let alice = device(&a, &format!("@alice:{}", a.server_name), "ALICE").await;
        let bob_id = format!("@bob:{}", b.server_name);
        let bob = device(&b, &bob_id, "BOB").await;
        Rig {
            b,
            proxy,
            a,
            alice,
            bob_id,
            bob,
        }
    }

    /// Sends messages `range` from alice on A to bob on B (one request each).
    async fn send(&self, range: std::ops::Range<u64>) {
        send_many(&self.a.base(), &self.alice, &self.bob_id, "BOB", range).await;
    }

    /// A's persisted delivery state for B, as the admin API shows it.
    async fn dest(&self) -> Value {
        dest_state(&self.a, &self.b.server_name).await
    }

    async fn failures(&self) -> u64 {
        self.dest().await["failures"].as_u64().unwrap_or(0)
    }

    /// Waits until `ok(state)` holds for A's state of B.
    async fn wait_for(&self, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let end = Instant::now() + GUARD;
        loop {
            let d = self.dest().await;
            if ok(&d) {
                return d;
            }
            assert!(
                Instant::now() < end,
                "{what}: never happened; last state {d}\nA log:\n{}",
                self.a.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn dest_state(c: &Courier, dest: &str) -> Value {
    c.admin_get("/_courier/admin/v1/destinations").await["destinations"][dest].clone()
}

#[tokio::test]
async fn every_network_fault_then_everything_arrives_exactly_once() {
    let rig =
        Rig::start("backoff_initial = \"100ms\"\nbackoff_max = \"1s\"\nrequest_timeout = \"2s\"")
            .await;
    let fake = FakeServer::start(rig.b.base()).await;
    let mut next = 0u64;
    // A first batch through a clean network: B learns A's key.
    rig.send(next..next + 10).await;
    next += 10;
    let mut seen = sync_until(&rig.b.base(), &rig.bob, 10, GUARD).await;

    let phases = [
        ("cut mid-request", Fault::CutAfter(2500), HttpFault::Forward),
        ("reset", Fault::Reset, HttpFault::Forward),
        ("black hole", Fault::BlackHole, HttpFault::Forward),
        ("HTTP 500", Fault::Divert(fake.addr), HttpFault::Status(500)),
        ("HTTP 502", Fault::Divert(fake.addr), HttpFault::Status(502)),
        ("HTTP 429", Fault::Divert(fake.addr), HttpFault::Status(429)),
        // A reverse proxy in maintenance or misrouted: about the address, not the
        // EDUs; splitting and parking on them would park the whole queue.
        ("HTTP 404", Fault::Divert(fake.addr), HttpFault::Status(404)),
        ("HTTP 405", Fault::Divert(fake.addr), HttpFault::Status(405)),
        ("HTTP 302", Fault::Divert(fake.addr), HttpFault::Status(302)),
        (
            "answer lost after B committed",
            Fault::Divert(fake.addr),
            HttpFault::LoseResponse,
        ),
    ];
    for (name, fault, http) in phases {
        fake.set(http);
        rig.proxy.set(fault);
        let before = rig.failures().await;
        rig.send(next..next + 20).await;
        next += 20;
        // The first failure may belong to an attempt that started before the switch;
        // the second certainly met this fault.
        let d = rig
            .wait_for(name, |d| d["failures"].as_u64().unwrap_or(0) >= before + 2)
            .await;
        println!("{name}: {}", d["last_error"]);
    }

    // A slow network delays but does not fail.
    rig.proxy.set(Fault::Delay(Duration::from_millis(100)));
    rig.send(next..next + 20).await;
    next += 20;
    rig.wait_for("delivery over a slow network", |d| d["queued"] == 0)
        .await;

    // A flapping link: resets and passes alternate while messages go out.
    let flapping = Arc::new(AtomicBool::new(true));
    let flapper = {
        let flapping = flapping.clone();
        let proxy = &rig.proxy;
        async move {
            let mut up = false;
            while flapping.load(Ordering::SeqCst) {
                proxy.set(if up { Fault::Pass } else { Fault::Reset });
                up = !up;
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        }
    };
    let sends = async {
        for chunk in 0..4 {
            rig.send(next + chunk * 10..next + chunk * 10 + 10).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        flapping.store(false, Ordering::SeqCst);
    };
    tokio::join!(flapper, sends);
    next += 40;

    // The network heals: everything arrives, once.
    rig.proxy.set(Fault::Pass);
    fake.set(HttpFault::Forward);
    seen.extend(sync_until(&rig.b.base(), &rig.bob, (next - 10) as usize, GUARD).await);
    assert_exactly_once(&seen, next);
    let d = rig
        .wait_for("an empty queue", |d| d["queued"] == 0 && d["failures"] == 0)
        .await;
    assert_eq!(d["parked"], 0, "network faults never park an EDU: {d}");

    // Each HTTP-level fault was met, and the lost answers were for transactions B had
    // committed: A's retries of them were recognised as repeats.
    let stats = fake.stats();
    for status in [500, 502, 429, 404, 405, 302] {
        assert!(
            stats.answered.get(&status).copied().unwrap_or(0) >= 1,
            "{stats:?}"
        );
    }
    assert!(stats.lost >= 1, "{stats:?}");
    assert!(
        rig.b.log().contains("repeated transaction"),
        "B never saw a retry of a transaction it had processed"
    );
    for c in [&rig.a, &rig.b] {
        assert!(!c.log().contains("panicked"), "{}", c.log());
    }
}

/// The schedule as persisted: each failure's `next_attempt_ts` is read from A's
/// admin API, so the test reads courier's own clock instead of timing anything.
/// A's attempt after failure `f - 1` cannot start before `next_attempt_ts(f - 1)`,
/// and failure `f` sets `next_attempt_ts(f) = its time + delay(f)`; so the gap between
/// two consecutive `next_attempt_ts` is at least `delay(f)`, whose low end (jitter 0) is
/// `Policy::delay(f, 0.0)`. And no wait is ever longer than `backoff_max`.
#[tokio::test]
async fn retries_follow_the_persisted_backoff_schedule_and_survive_a_restart() {
    let policy = Policy {
        initial: Duration::from_millis(100),
        multiplier: 2.0,
        max: Duration::from_millis(800),
    };
    let mut rig = Rig::start("backoff_initial = \"100ms\"\nbackoff_max = \"800ms\"").await;
    rig.proxy.set(Fault::Reset);
    rig.send(0..1).await;

    // failures -> next_attempt_ts, as first seen; and every retry_in_ms seen.
    let mut schedule: std::collections::BTreeMap<u64, u64> = Default::default();
    let mut longest_wait = 0;
    let end = Instant::now() + GUARD;
    while schedule.keys().last().copied().unwrap_or(0) < 8 {
        assert!(Instant::now() < end, "too few retries: {schedule:?}");
        let d = rig.dest().await;
        let (f, next) = (
            d["failures"].as_u64().unwrap_or(0),
            d["next_attempt_ts"].as_u64().unwrap_or(0),
        );
        if f > 0 {
            schedule.entry(f).or_insert(next);
            longest_wait = longest_wait.max(d["retry_in_ms"].as_u64().unwrap());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let gaps: Vec<(u64, u64)> = schedule
        .iter()
        .zip(schedule.iter().skip(1))
        .filter(|((f0, _), (f1, _))| *f1 - *f0 == 1)
        .map(|((_, t0), (f1, t1))| (*f1, t1 - t0))
        .collect();
    println!("backoff gaps (failures, ms): {gaps:?}; longest wait seen {longest_wait} ms");
    assert!(
        gaps.len() >= 4,
        "too few consecutive observations: {schedule:?}"
    );
    for (f, gap) in &gaps {
        let floor = policy.delay(*f as u32, 0.0).as_millis() as u64;
        assert!(
            gap + 1 >= floor,
            "failure {f}: retried after {gap} ms, the schedule says at least {floor} ms"
        );
    }
    assert!(
        longest_wait <= policy.max.as_millis() as u64,
        "waited {longest_wait} ms, backoff_max is {:?}",
        policy.max
    );

    // The state survives a SIGKILL: the restarted A neither forgets nor resets it.
    let before = rig.failures().await;
    rig.a.kill();
    rig.a.spawn().await;
    assert!(
        rig.failures().await >= before,
        "backoff state lost on restart"
    );

    // Once the network is back, the next retry delivers and the backoff resets.
    rig.proxy.set(Fault::Pass);
    let seen = sync_until(&rig.b.base(), &rig.bob, 1, GUARD).await;
    assert_exactly_once(&seen, 1);
    rig.wait_for("a reset backoff", |d| {
        d["failures"] == 0 && d["queued"] == 0
    })
    .await;
}

/// A persisted schedule further ahead than the policy ever sets (the wall clock
/// stepped back since it was written, or, as here, the operator lowered
/// `backoff_max` and restarted) is due at once: honouring it would stall the
/// destination for the old hour, across restarts.
#[tokio::test]
async fn a_schedule_beyond_backoff_max_is_due_at_once() {
    let mut rig = Rig::start("backoff_initial = \"1h\"\nbackoff_max = \"1h\"").await;
    rig.proxy.set(Fault::Reset);
    rig.send(0..1).await;
    let d = rig
        .wait_for("a failure", |d| d["failures"].as_u64().unwrap_or(0) >= 1)
        .await;
    assert!(d["retry_in_ms"].as_u64().unwrap() > 600_000, "{d}");

    rig.a.kill();
    let config = std::fs::read_to_string(rig.a.config_path()).unwrap();
    let lowered = config
        .replace("backoff_initial = \"1h\"", "backoff_initial = \"100ms\"")
        .replace("backoff_max = \"1h\"", "backoff_max = \"1s\"");
    assert_ne!(config, lowered);
    std::fs::write(rig.a.config_path(), lowered).unwrap();
    rig.proxy.set(Fault::Pass);
    rig.a.spawn().await;
    let seen = sync_until(&rig.b.base(), &rig.bob, 1, GUARD).await;
    assert_exactly_once(&seen, 1);
}

/// An authenticated request from a destination that A is backing off from proves it
/// is up: A resets the backoff at once and delivers, instead of waiting out a minute.
#[tokio::test]
async fn a_request_from_a_backed_off_peer_resets_its_backoff() {
    let rig = Rig::start("backoff_initial = \"60s\"\nbackoff_max = \"60s\"").await;
    rig.proxy.set(Fault::Reset);
    rig.send(0..1).await;
    let d = rig
        .wait_for("a failure", |d| d["failures"].as_u64().unwrap_or(0) >= 1)
        .await;
    assert!(d["retry_in_ms"].as_u64().unwrap() > 0, "{d}");
    rig.proxy.set(Fault::Pass);

    // B sends A a transaction (A fetches B's key through the proxy to check it).
    let b_signer = Signer::of(&rig.b);
    let empty = json!({"origin": rig.b.server_name, "origin_server_ts": 1, "pdus": [], "edus": []});
    let (status, body) = b_signer.put_txn(&rig.a, "hello", &empty).await;
    assert_eq!(status, 200, "{body}");
    let d = rig.dest().await;
    assert_eq!(d["failures"], 0, "backoff not reset by B's request: {d}");
    let seen = sync_until(&rig.b.base(), &rig.bob, 1, Duration::from_secs(30)).await;
    assert_exactly_once(&seen, 1);
}
