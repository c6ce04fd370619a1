//! Issue 5: interop with a real Synapse (pinned, from `../shared/peers/synapse/`), both
//! directions, numbers canonical JSON forbids, an outage, and a key moved from Synapse.
//! Skips with a message when Synapse cannot be installed, except under CI.

mod common;

use std::time::{Duration, Instant};

use common::Courier;
use common::matrix::{
    assert_exactly_once, device, send_many, send_typed, sync_events, sync_events_from, sync_until,
};
use common::synapse::{Synapse, venv_or_skip};
use serde_json::{Value, json};

/// The content Synapse signs with Python's float formatting (`1e+16`, `-0.0`, `1e-07`).
fn floaty(n: u64) -> Value {
    json!({"n": n, "f": 1.5, "g": 1e16, "h": -0.0, "i": 1e-7, "s": "ünï/\u{1F600}"})
}

fn assert_floaty(content: &Value, n: u64) {
    assert_eq!(content["n"], n);
    assert_eq!(content["f"].as_f64(), Some(1.5));
    assert_eq!(content["g"].as_f64(), Some(1e16));
    let h = content["h"].as_f64().unwrap();
    assert!(h == 0.0 && h.is_sign_negative(), "-0.0 kept: {content}");
    assert_eq!(content["i"].as_f64(), Some(1e-7));
    assert_eq!(content["s"], "ünï/\u{1F600}");
}

/// Fails on what a real peer asked and courier could not answer, in either log.
fn assert_clean_logs(c: &Courier, s: &Synapse) {
    let clog = c.log();
    assert!(
        !clog.contains("unrecognized request"),
        "courier got requests it does not serve:\n{clog}"
    );
    assert!(!clog.contains("panicked"), "{clog}");
    for line in s.log().lines() {
        let about_courier = line.contains(&c.server_name);
        let failed =
            line.contains("Got response headers: 4") || line.contains("Got response headers: 5");
        assert!(
            !(about_courier && failed),
            "Synapse saw an error from courier: {line}"
        );
    }
}

#[tokio::test]
async fn synapse_to_courier_device_and_star_with_floats() {
    let Some(venv) = venv_or_skip("synapse_to_courier_device_and_star_with_floats") else {
        return;
    };
    let mut c = Courier::start().await;
    let s = Synapse::start(&venv);
    let bob_id = format!("@bob:{}", c.server_name);
    let bob1 = device(&c, &bob_id, "BOB1").await;
    let bob2 = device(&c, &bob_id, "BOB2").await;
    let (alice_id, alice) = s.register("alice", "ALICEDEV");

    send_typed(
        &s.url(""),
        &alice,
        "m.room_key_request",
        "a1",
        json!({ &bob_id: {"BOB1": floaty(0)} }),
    )
    .await;
    send_typed(
        &s.url(""),
        &alice,
        "m.room_key_request",
        "a2",
        json!({ &bob_id: {"*": floaty(1)} }),
    )
    .await;

    let ev1 = sync_events(&c.base(), &bob1, 2, Duration::from_secs(60)).await;
    let ev2 = sync_events(&c.base(), &bob2, 1, Duration::from_secs(30)).await;
    assert_eq!(ev1.len(), 2, "{ev1:?}\ncourier log:\n{}", c.log());
    assert_eq!(ev2.len(), 1, "{ev2:?}");
    for (ev, n) in ev1.iter().zip([0, 1]).chain(ev2.iter().zip([1])) {
        assert_eq!(ev["sender"], alice_id.as_str());
        assert_eq!(ev["type"], "m.room_key_request");
        assert_floaty(&ev["content"], n);
    }
    assert_clean_logs(&c, &s);
    // Acknowledged: nothing left in courier's store.
    c.kill();
    let store = courier::store::Store::open(&c.data_dir().join("db"), &Default::default()).unwrap();
    assert_eq!(store.inbox_len(&bob_id, "BOB1").unwrap(), 0);
    assert_eq!(store.inbox_len(&bob_id, "BOB2").unwrap(), 0);
}

#[tokio::test]
async fn courier_to_synapse_exactly_once_with_floats() {
    let Some(venv) = venv_or_skip("courier_to_synapse_exactly_once_with_floats") else {
        return;
    };
    let c = Courier::start().await;
    let s = Synapse::start(&venv);
    let bob_id = format!("@bob:{}", c.server_name);
    let bob = device(&c, &bob_id, "BOB").await;
    let (alice_id, alice) = s.register("alice", "ALICEDEV");

    send_typed(
        &c.base(),
        &bob,
        "m.room_key_request",
        "b1",
        json!({ &alice_id: {"ALICEDEV": floaty(7)} }),
    )
    .await;
    send_many(&c.base(), &bob, &alice_id, "ALICEDEV", 0..5).await;
    let (events, since) =
        sync_events_from(&s.url(""), &alice, None, 6, Duration::from_secs(60)).await;
    let f: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "m.room_key_request")
        .collect();
    assert_eq!(f.len(), 1, "{events:?}\ncourier log:\n{}", c.log());
    assert_eq!(f[0]["sender"], bob_id.as_str());
    assert_floaty(&f[0]["content"], 7);
    let ns: Vec<u64> = events
        .iter()
        .filter(|e| e["type"] == "m.test")
        .filter_map(|e| e["content"]["n"].as_u64())
        .collect();
    assert_exactly_once(&ns, 5);
    // Nothing more arrives later (no duplicate delivery).
    let (later, _) = sync_events_from(&s.url(""), &alice, since, 1, Duration::from_secs(3)).await;
    assert!(later.is_empty(), "{later:?}");
    assert_clean_logs(&c, &s);
}

#[tokio::test]
async fn synapse_outage_backs_off_and_delivers_once() {
    let Some(venv) = venv_or_skip("synapse_outage_backs_off_and_delivers_once") else {
        return;
    };
    let c = Courier::start_with(
        "[federation]\nallow_private_destinations = true\nverify_certificates = false\nbackoff_initial = \"300ms\"\nbackoff_max = \"2s\"\n",
    )
    .await;
    let s = Synapse::start(&venv);
    let bob_id = format!("@bob:{}", c.server_name);
    let bob = device(&c, &bob_id, "BOB").await;
    let (alice_id, alice) = s.register("alice", "ALICEDEV");
    send_many(&c.base(), &bob, &alice_id, "ALICEDEV", 0..3).await;
    let first = sync_until(&s.url(""), &alice, 3, Duration::from_secs(60)).await;
    assert_exactly_once(&first, 3);

    s.stop();
    send_many(&c.base(), &bob, &alice_id, "ALICEDEV", 3..30).await;
    let end = Instant::now() + Duration::from_secs(30);
    while !c.log().contains("backing off") {
        assert!(
            Instant::now() < end,
            "courier did not back off:\n{}",
            c.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.restart();
    let rest = sync_until(&s.url(""), &alice, 27, Duration::from_secs(90)).await;
    let all: Vec<u64> = first.iter().chain(rest.iter()).copied().collect();
    assert_exactly_once(&all, 30);
    assert!(
        c.log().contains("transaction delivered") || c.log().contains("backoff reset"),
        "delivery resumed"
    );
}

#[tokio::test]
async fn a_signing_key_moved_from_synapse_is_published_unchanged() {
    let Some(venv) = venv_or_skip("a_signing_key_moved_from_synapse_is_published_unchanged") else {
        return;
    };
    let s = Synapse::start(&venv);
    let synapse_keys: Value = common::insecure_client()
        .get(s.url("/_matrix/key/v2/server"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    s.stop();
    let key_text = std::fs::read_to_string(s.signing_key_path()).unwrap();
    // A courier whose key file is Synapse's, byte for byte.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("keys")).unwrap();
    std::fs::write(dir.path().join("keys/signing.key"), &key_text).unwrap();
    let mut c = Courier::start().await;
    c.kill();
    std::fs::copy(
        dir.path().join("keys/signing.key"),
        c.dir.path().join("keys/signing.key"),
    )
    .unwrap();
    c.spawn().await;
    let ours: Value = c
        .pinned_client()
        .get(c.url("/_matrix/key/v2/server"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        ours["verify_keys"], synapse_keys["verify_keys"],
        "same key id and public key as Synapse published"
    );
    let version = key_text.split_whitespace().nth(1).unwrap();
    assert!(
        ours["verify_keys"]
            .get(format!("ed25519:{version}"))
            .is_some()
    );
}

#[tokio::test]
async fn our_published_keys_verify_with_synapse_signedjson() {
    let Some(venv) = venv_or_skip("our_published_keys_verify_with_synapse_signedjson") else {
        return;
    };
    let c = Courier::start().await;
    let body = c
        .pinned_client()
        .get(c.url("/_matrix/key/v2/server"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // Synapse's own libraries (signedjson) check the self-signature; a tampered copy fails.
    let script = r#"
import json, sys
from signedjson.key import decode_verify_key_bytes
from signedjson.sign import verify_signed_json, SignatureVerifyException
from unpaddedbase64 import decode_base64
k = json.loads(sys.stdin.read())
def check(obj):
    for kid, v in obj["verify_keys"].items():
        verify_signed_json(obj, obj["server_name"], decode_verify_key_bytes(kid, decode_base64(v["key"])))
check(k)
k["valid_until_ts"] += 1
try:
    check(k)
    print("TAMPERED-ACCEPTED")
except SignatureVerifyException:
    print("OK")
"#;
    use std::io::Write;
    let mut child = std::process::Command::new(venv.join("bin/python"))
        .arg("-c")
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "OK",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `courier bench --synapse` in many-destinations: a real Synapse sends to the
/// benchmark's simulated destinations (named by their addresses), which must answer
/// as a real server does. They once answered `text/plain`; Synapse took every
/// transaction for failed and sent its messages again (duplicates, and every row
/// left in its outbox).
#[test]
fn bench_many_destinations_side_by_side_with_synapse() {
    if venv_or_skip("bench_many_destinations_side_by_side_with_synapse").is_none() {
        return;
    }
    let out = std::process::Command::new(common::bin())
        .args([
            "bench",
            "--scenario",
            "many-destinations",
            "--destinations",
            "20",
            "--fanout",
            "5",
            "--messages",
            "40",
            "--concurrency",
            "4",
            "--synapse",
            "--json",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap();
    for side in [&v, &v["synapse"]] {
        assert_eq!(side["delivered"], 200, "{side}");
        assert_eq!(side["duplicates"], 0, "{side}");
        assert_eq!(side["pending_rows_a"], 0, "{side}");
        assert!(side["transactions"].as_u64().unwrap() > 0, "{side}");
    }
    assert_eq!(v["synapse"]["server"], "Synapse");
    assert!(v["courier_vs_synapse"].as_f64().unwrap() > 0.0, "{v}");
}
