//! Issue 4 as a client and an operator see it: accounts through the admin API and the
//! CLI, `sendToDevice` and `/sync` against real courier processes, what is left in the
//! store afterwards, and delivery to a second courier over federation.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{ADMIN_TOKEN, Courier, run_cli};
use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};

/// Generous bound for answers that must come "at once": a sync that should return
/// without waiting is given `timeout=20000`, so one that waited for nothing would take
/// 20 s. This is not a latency check, only the way to tell the two apart.
const PROMPT: Duration = Duration::from_secs(15);

/// A device and its access token.
#[derive(Debug, Clone)]
struct Account {
    user_id: String,
    device_id: String,
    token: String,
}

/// HTTP helpers bound to one courier (pinned to its certificate).
struct Api {
    http: reqwest::Client,
    base: String,
    server_name: String,
}

impl Api {
    fn new(c: &Courier) -> Api {
        Api {
            http: c.pinned_client(),
            base: c.url(""),
            server_name: c.server_name.clone(),
        }
    }

    fn user(&self, localpart: &str) -> String {
        format!("@{localpart}:{}", self.server_name)
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let body = body.map(|b| serde_json::to_vec(&b).unwrap());
        self.call(
            method,
            &format!("/_courier/admin/v1{path}"),
            Some(ADMIN_TOKEN),
            body,
        )
        .await
    }

    async fn device(&self, localpart: &str, device: &str) -> Account {
        let (status, v) = self
            .admin(
                Method::POST,
                "/devices",
                Some(json!({"user_id": self.user(localpart), "device_id": device})),
            )
            .await;
        assert_eq!(status, 200, "{v}");
        Account {
            user_id: v["user_id"].as_str().unwrap().to_owned(),
            device_id: v["device_id"].as_str().unwrap().to_owned(),
            token: v["access_token"].as_str().unwrap().to_owned(),
        }
    }

    async fn send_raw(
        &self,
        from: &Account,
        event_type: &str,
        txn: &str,
        body: Vec<u8>,
    ) -> (u16, Value) {
        let path = format!("/_matrix/client/v3/sendToDevice/{event_type}/{txn}");
        self.call(Method::PUT, &path, Some(&from.token), Some(body))
            .await
    }

    /// Sends `messages`, asserting the 200 `{}`.
    async fn send(&self, from: &Account, event_type: &str, txn: &str, messages: Value) {
        let body = serde_json::to_vec(&json!({ "messages": messages })).unwrap();
        let (status, v) = self.send_raw(from, event_type, txn, body).await;
        assert_eq!((status, &v), (200, &json!({})), "sendToDevice {txn}");
    }

    /// A sync, asserting the 200.
    async fn sync(&self, who: &Account, since: Option<&str>, timeout_ms: u64) -> Value {
        let mut path = format!("/_matrix/client/v3/sync?timeout={timeout_ms}");
        if let Some(s) = since {
            path.push_str(&format!("&since={s}"));
        }
        let (status, v) = self.call(Method::GET, &path, Some(&who.token), None).await;
        assert_eq!(status, 200, "{v}");
        v
    }
}

fn events(sync: &Value) -> Vec<Value> {
    sync["to_device"]["events"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn next_batch(sync: &Value) -> String {
    sync["next_batch"].as_str().unwrap().to_owned()
}

/// The `n` field of each event's content, in order.
fn ns(sync: &Value) -> Vec<u64> {
    events(sync)
        .iter()
        .map(|e| e["content"]["n"].as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn a_message_reaches_the_named_device_only() {
    let c = Courier::start().await;
    let api = Api::new(&c);
    let alice = api.device("alice", "A1").await;
    let bob1 = api.device("bob", "B1").await;
    let bob2 = api.device("bob", "B2").await;
    api.send(
        &alice,
        "m.test",
        "t1",
        json!({ &bob1.user_id: {"B1": {"hello": "bob"}} }),
    )
    .await;

    let sync = api.sync(&bob1, None, 0).await;
    assert_eq!(
        events(&sync),
        vec![json!({"sender": alice.user_id, "type": "m.test", "content": {"hello": "bob"}})]
    );
    // A spec-shaped body that standard client libraries accept.
    assert!(next_batch(&sync).starts_with('s'));
    for field in [
        "rooms",
        "presence",
        "account_data",
        "device_lists",
        "device_one_time_keys_count",
    ] {
        assert!(sync[field].is_object(), "{field}: {sync}");
    }
    assert!(
        events(&api.sync(&bob2, None, 0).await).is_empty(),
        "B2 was not addressed"
    );
    assert!(events(&api.sync(&alice, None, 0).await).is_empty());
}

#[tokio::test]
async fn star_reaches_the_devices_the_user_has_now() {
    let c = Courier::start().await;
    let api = Api::new(&c);
    let alice = api.device("alice", "A1").await;
    let b1 = api.device("bob", "B1").await;
    let b2 = api.device("bob", "B2").await;
    api.send(
        &alice,
        "m.test",
        "t1",
        json!({ &b1.user_id: {"*": {"n": 1}} }),
    )
    .await;
    let b3 = api.device("bob", "B3").await;
    assert_eq!(ns(&api.sync(&b1, None, 0).await), vec![1]);
    assert_eq!(ns(&api.sync(&b2, None, 0).await), vec![1]);
    assert!(
        events(&api.sync(&b3, None, 0).await).is_empty(),
        "added after the send"
    );
}

#[tokio::test]
async fn a_named_device_wins_over_star_and_unknown_recipients_are_skipped() {
    let c = Courier::start().await;
    let api = Api::new(&c);
    let alice = api.device("alice", "A1").await;
    let b1 = api.device("bob", "B1").await;
    let b2 = api.device("bob", "B2").await;
    let nobody = api.user("nobody");
    api.send(
        &alice,
        "m.test",
        "t1",
        json!({
            &b1.user_id: {"*": {"n": 1}, "B1": {"n": 2}, "GONE": {"n": 3}},
            &nobody: {"*": {"n": 4}, "X": {"n": 5}},
        }),
    )
    .await;
    assert_eq!(
        ns(&api.sync(&b1, None, 0).await),
        vec![2],
        "one message per device"
    );
    assert_eq!(ns(&api.sync(&b2, None, 0).await), vec![1]);
}

#[tokio::test]
async fn a_retransmitted_txn_is_delivered_once() {
    let c = Courier::start().await;
    let api = Api::new(&c);
    let alice = api.device("alice", "A1").await;
    let alice2 = api.device("alice", "A2").await;
    let bob = api.device("bob", "B1").await;
    let to_bob = |n: u64| json!({ &bob.user_id: {"B1": {"n": n}} });
    api.send(&alice, "m.test", "t1", to_bob(1)).await;
    api.send(&alice, "m.test", "t1", to_bob(1)).await;
    // Same txnId, another event type: another request.
    api.send(&alice, "m.other", "t1", to_bob(2)).await;
    // Same txnId and type from another device: another request.
    api.send(&alice2, "m.test", "t1", to_bob(3)).await;
    let sync = api.sync(&bob, None, 0).await;
    assert_eq!(ns(&sync), vec![1, 2, 3]);
    let types: Vec<Value> = events(&sync)
        .into_iter()
        .map(|e| e["type"].clone())
        .collect();
    assert_eq!(types, vec!["m.test", "m.other", "m.test"]);
}

#[tokio::test]
async fn concurrent_retransmissions_deliver_once() {
    let c = Courier::start().await;
    let api = Api::new(&c);
    let alice = api.device("alice", "A1").await;
    let bob = api.device("bob", "B1").await;
    let body =
        serde_json::to_vec(&json!({"messages": { &bob.user_id: {"B1": {"n": 1}} }})).unwrap();
    let answers: Vec<(u16, Value)> = futures::stream::iter(0..8)
        .map(|_| api.send_raw(&alice, "m.test", "same", body.clone()))
        .buffer_unordered(8)
        .collect()
        .await;
    assert!(
        answers.iter().all(|a| *a == (200, json!({}))),
        "{answers:?}"
    );
    assert_eq!(ns(&api.sync(&bob, None, 0).await), vec![1]);
}

/// A device may reach the server through two client listeners (TLS and plain, or two
/// addresses): its retransmission must still wait for the first attempt.
#[tokio::test]
async fn concurrent_retransmissions_through_two_listeners_deliver_once() {
    let second = common::free_port();
    let c = Courier::start_with(&format!(
        "[[listeners]]\naddress = \"127.0.0.1:{second}\"\ntls = false\nresources = [\"client\"]\n"
    ))
    .await;
    let api = Api::new(&c);
    let plain = Api {
        http: reqwest::Client::new(),
        base: format!("http://127.0.0.1:{second}"),
        server_name: c.server_name.clone(),
    };
    let alice = api.device("alice", "A1").await;
    let bob = api.device("bob", "B1").await;
    // Each round: one txnId, 8 attempts through each listener at once. With one lock
    // set per listener, the first attempt on each side passes the marker check before
    // either has written it, and the message is delivered twice.
    const ROUNDS: u64 = 10;
    for n in 0..ROUNDS {
        let body =
            serde_json::to_vec(&json!({"messages": { &bob.user_id: {"B1": {"n": n}} }})).unwrap();
        let txn = format!("same-{n}");
        let answers: Vec<(u16, Value)> = futures::stream::iter(0..16)
            .map(|i| {
                let via = if i % 2 == 0 { &api } else { &plain };
                via.send_raw(&alice, "m.test", &txn, body.clone())
            })
            .buffer_unordered(16)
            .collect()
            .await;
        assert!(
            answers.iter().all(|a| *a == (200, json!({}))),
            "{answers:?}"
        );
    }
    // Every attempt was answered, so everything it wrote is in the store: one page
    // (up to 100 events) shows every message and any second copy.
    assert_eq!(
        ns(&api.sync(&bob, None, 0).await),
        (0..ROUNDS).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_txn_is_remembered_across_a_restart() {
    let mut c = Courier::start().await;
    let api = Api::new(&c);
    let alice = api.device("alice", "A1").await;
    let bob = api.device("bob", "B1").await;
    api.send(
        &alice,
        "m.test",
        "t1",
        json!({ &bob.user_id: {"B1": {"n": 1}} }),
    )
    .await;
    c.kill();
    c.spawn().await;
    api.send(
        &alice,
        "m.test",
        "t1",
        json!({ &bob.user_id: {"B1": {"n": 1}} }),
    )
    .await;
    assert_eq!(ns(&api.sync(&bob, None, 0).await), vec![1]);
}

#[tokio::test]
async fn a_restart_between_send_and_sync_loses_nothing() {
    let mut c = Courier::start().await;
    let api = Api::new(&c);
    let alice = api.device("alice", "A1").await;
    let bob = api.device("bob", "B1").await;
    for n in 0..3 {
        api.send(
            &alice,
            "m.test",
            &format!("t{n}"),
            json!({ &bob.user_id: {"B1": {"n": n}} }),
        )
        .await;
    }
    // SIGKILL right after the 200s: they promised durability, not a clean shutdown.
    c.kill();
    c.spawn().await;
    assert_eq!(ns(&api.sync(&bob, None, 0).await), vec![0, 1, 2]);
}

#[tokio::test]
async fn the_next_since_acknowledges_and_deletes_from_the_store() {
    let mut c = Courier::start().await;
    let api = Api::new(&c);
    let alice = api.device("alice", "A1").await;
    let bob = api.device("bob", "B1").await;
    for n in 0..3 {
        api.send(
            &alice,
            "m.test",
            &format!("t{n}"),
            json!({ &bob.user_id: {"B1": {"n": n}} }),
        )
        .await;
    }
    let first = api.sync(&bob, None, 0).await;
    assert_eq!(ns(&first), vec![0, 1, 2]);
    let t1 = next_batch(&first);
    api.send(
        &alice,
        "m.test",
        "t3",
        json!({ &bob.user_id: {"B1": {"n": 3}} }),
    )
    .await;
    let second = api.sync(&bob, Some(&t1), 0).await;
    assert_eq!(
        ns(&second),
        vec![3],
        "acknowledged messages are not served again"
    );
    c.terminate();
    let store = c.open_store();
    assert_eq!(
        store.inbox_len(&bob.user_id, &bob.device_id).unwrap(),
        1,
        "the first three are deleted; the fourth waits for its acknowledgement"
    );
    let acked = store
        .inbox_state(&bob.user_id, &bob.device_id)
        .unwrap()
        .acked;
    assert_eq!(format!("s{acked}"), t1);
}

#[tokio::test]
async fn an_older_token_gets_back_what_it_did_not_acknowledge() {
    let c = Courier::start().await;
    let api = Api::new(&c);
    let alice = api.device("alice", "A1").await;
    let bob = api.device("bob", "B1").await;
    let send = |txn: &'static str, n: u64| {
        api.send(
            &alice,
            "m.test",
            txn,
            json!({ &bob.user_id: {"B1": {"n": n}} }),
        )
    };
    send("t1", 1).await;
    send("t2", 2).await;
    let s1 = api.sync(&bob, None, 0).await;
    assert_eq!(ns(&s1), vec![1, 2]);
    // The response was "lost": the same request again gets the same page.
    assert_eq!(ns(&api.sync(&bob, None, 0).await), vec![1, 2]);
    let t1 = next_batch(&s1);
    let s2 = api.sync(&bob, Some(&t1), 0).await;
    assert!(events(&s2).is_empty());
    assert_eq!(next_batch(&s2), t1, "nothing new: the token stays");
    send("t3", 3).await;
    let s3 = api.sync(&bob, Some(&t1), 0).await;
    assert_eq!(ns(&s3), vec![3]);
    // Lost again: T1 is still the latest acknowledgement, so 3 comes back, 1 and 2 do not.
    assert_eq!(ns(&api.sync(&bob, Some(&t1), 0).await), vec![3]);
    assert_eq!(ns(&api.sync(&bob, None, 0).await), vec![3]);
    assert!(events(&api.sync(&bob, Some(&next_batch(&s3)), 0).await).is_empty());
}

#[tokio::test]
async fn a_long_poll_wakes_up_when_a_message_arrives() {
    let c = Courier::start().await;
    let api = Api::new(&c);
    let alice = api.device("alice", "A1").await;
    let bob = api.device("bob", "B1").await;
    let since = next_batch(&api.sync(&bob, None, 0).await);
    let waiting = api.sync(&bob, Some(&since), 20_000);
    let sending = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        api.send(
            &alice,
            "m.test",
            "t1",
            json!({ &bob.user_id: {"B1": {"n": 7}} }),
        )
        .await;
    };
    let (sync, ()) = tokio::time::timeout(PROMPT, async { tokio::join!(waiting, sending) })
        .await
        .expect("the long-poll returned before its 20 s timeout");
    assert_eq!(ns(&sync), vec![7]);
}

#[tokio::test]
async fn at_most_100_events_per_sync_and_a_backlog_returns_at_once() {
    let c = Courier::start().await;
    let api = Api::new(&c);
    let alice = api.device("alice", "A1").await;
    let bob = api.device("bob", "B1").await;
    let (api, alice, bob) = (&api, &alice, &bob);
    futures::stream::iter(0..250u64)
        .map(|n| async move {
            let txn = format!("t{n}");
            api.send(
                alice,
                "m.test",
                &txn,
                json!({ &bob.user_id: {"B1": {"n": n}} }),
            )
            .await
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    let mut since: Option<String> = None;
    let mut seen = BTreeSet::new();
    let mut sizes = Vec::new();
    for _ in 0..3 {
        let sync = tokio::time::timeout(PROMPT, api.sync(bob, since.as_deref(), 20_000))
            .await
            .expect("pending messages are served without waiting");
        sizes.push(events(&sync).len());
        seen.extend(ns(&sync));
        since = Some(next_batch(&sync));
    }
    assert_eq!(sizes, vec![100, 100, 50]);
    assert_eq!(
        seen,
        (0..250).collect::<BTreeSet<u64>>(),
        "each message exactly once"
    );
    assert!(events(&api.sync(bob, since.as_deref(), 0).await).is_empty());
}

#[tokio::test]
async fn deleting_a_device_deletes_its_token_and_inbox() {
    let mut c = Courier::start().await;
    let api = Api::new(&c);
    let alice = api.device("alice", "A1").await;
    let b1 = api.device("bob", "B1").await;
    let b2 = api.device("bob", "B2").await;
    api.send(
        &alice,
        "m.test",
        "t1",
        json!({ &b1.user_id: {"*": {"n": 1}} }),
    )
    .await;
    // The token works (and its owner is now held in memory)...
    let whoami = |token: String| {
        let api = &api;
        async move {
            api.call(
                Method::GET,
                "/_matrix/client/v3/account/whoami",
                Some(&token),
                None,
            )
            .await
        }
    };
    assert_eq!(whoami(b1.token.clone()).await.0, 200);
    // ...and stops working the moment the device is deleted.
    let path = format!("/devices/{}/B1", b1.user_id);
    assert_eq!(api.admin(Method::DELETE, &path, None).await.0, 200);
    assert_eq!(whoami(b1.token.clone()).await.0, 401);
    // Likewise a token replaced by a new one for the same device.
    assert_eq!(whoami(b2.token.clone()).await.0, 200);
    let b2_again = api.device("bob", "B2").await;
    assert_eq!(whoami(b2.token.clone()).await.0, 401);
    assert_eq!(whoami(b2_again.token.clone()).await.0, 200);
    let (status, v) = api
        .call(
            Method::GET,
            "/_matrix/client/v3/account/whoami",
            Some(&b1.token),
            None,
        )
        .await;
    assert_eq!(
        (status, v["errcode"].as_str()),
        (401, Some("M_UNKNOWN_TOKEN"))
    );
    let (status, v) = api.admin(Method::DELETE, &path, None).await;
    assert_eq!((status, v["errcode"].as_str()), (404, Some("M_NOT_FOUND")));
    c.terminate();
    let store = c.open_store();
    assert_eq!(store.inbox_len(&b1.user_id, "B1").unwrap(), 0);
    assert_eq!(
        store.inbox_len(&b1.user_id, "B2").unwrap(),
        1,
        "the other device keeps its message"
    );
}

/// A device deleted and created again under the same ID is a new device: a txnId
/// its predecessor used is a new request, not a retransmission.
#[tokio::test]
async fn a_recreated_device_does_not_inherit_its_predecessors_txn_ids() {
    let c = Courier::start().await;
    let api = Api::new(&c);
    let alice = api.device("alice", "A1").await;
    let bob = api.device("bob", "B1").await;
    api.send(
        &alice,
        "m.test",
        "t1",
        json!({ &bob.user_id: {"B1": {"n": 1}} }),
    )
    .await;
    let path = format!("/devices/{}/A1", alice.user_id);
    assert_eq!(api.admin(Method::DELETE, &path, None).await.0, 200);
    let again = api.device("alice", "A1").await;
    api.send(
        &again,
        "m.test",
        "t1",
        json!({ &bob.user_id: {"B1": {"n": 2}} }),
    )
    .await;
    // A retransmission by the new device is still one.
    api.send(
        &again,
        "m.test",
        "t1",
        json!({ &bob.user_id: {"B1": {"n": 3}} }),
    )
    .await;
    assert_eq!(ns(&api.sync(&bob, None, 0).await), vec![1, 2]);
}

#[tokio::test]
async fn an_inactive_device_has_its_pending_messages_purged() {
    let mut c = Courier::start_with("[client]\ninactive_device_purge = \"1s\"\n").await;
    let api = Api::new(&c);
    let alice = api.device("alice", "A1").await;
    let bob = api.device("bob", "B1").await;
    api.send(
        &alice,
        "m.test",
        "t1",
        json!({ &bob.user_id: {"B1": {"n": 1}} }),
    )
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !c
        .log()
        .contains("purged the pending messages of an inactive device")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no purge; log:\n{}",
            c.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(events(&api.sync(&bob, None, 0).await).is_empty());
    c.terminate();
    assert_eq!(c.open_store().inbox_len(&bob.user_id, "B1").unwrap(), 0);
}

#[tokio::test]
async fn an_inbox_over_its_bound_loses_its_oldest_with_a_warning() {
    let c =
        Courier::start_with("[client]\nmax_inbox_messages = 5\ninactive_device_purge = \"10s\"\n")
            .await;
    let api = Api::new(&c);
    let alice = api.device("alice", "A1").await;
    let bob = api.device("bob", "B1").await;
    for n in 0..8 {
        api.send(
            &alice,
            "m.test",
            &format!("t{n}"),
            json!({ &bob.user_id: {"B1": {"n": n}} }),
        )
        .await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !c.log().contains("device inbox over its bound") {
        assert!(
            std::time::Instant::now() < deadline,
            "no trim; log:\n{}",
            c.log()
        );
        // Syncing without a token keeps the device active and acknowledges nothing.
        api.sync(&bob, None, 0).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(ns(&api.sync(&bob, None, 0).await), vec![3, 4, 5, 6, 7]);
}

#[tokio::test]
async fn access_tokens_missing_unknown_and_in_the_query() {
    let c = Courier::start().await;
    let api = Api::new(&c);
    let bob = api.device("bob", "B1").await;
    let whoami = "/_matrix/client/v3/account/whoami";
    let (status, v) = api.call(Method::GET, whoami, None, None).await;
    assert_eq!(
        (status, v["errcode"].as_str()),
        (401, Some("M_MISSING_TOKEN"))
    );
    let (status, v) = api
        .call(Method::GET, whoami, Some("cou_not-a-token"), None)
        .await;
    assert_eq!(
        (status, v["errcode"].as_str()),
        (401, Some("M_UNKNOWN_TOKEN"))
    );
    let (status, v) = api
        .call(
            Method::PUT,
            "/_matrix/client/v3/sendToDevice/m.t/t1",
            None,
            Some(b"{\"messages\":{}}".to_vec()),
        )
        .await;
    assert_eq!(
        (status, v["errcode"].as_str()),
        (401, Some("M_MISSING_TOKEN"))
    );
    let (status, v) = api
        .call(Method::GET, "/_matrix/client/v3/sync", None, None)
        .await;
    assert_eq!(
        (status, v["errcode"].as_str()),
        (401, Some("M_MISSING_TOKEN"))
    );
    // The deprecated query parameter still works.
    let (status, v) = api
        .call(
            Method::GET,
            &format!("{whoami}?access_token={}", bob.token),
            None,
            None,
        )
        .await;
    assert_eq!(
        (status, v["user_id"].as_str()),
        (200, Some(bob.user_id.as_str()))
    );
}

#[tokio::test]
async fn malformed_requests_get_matrix_errors_and_deliver_nothing() {
    let c = Courier::start().await;
    let api = Api::new(&c);
    let alice = api.device("alice", "A1").await;
    let bob = api.device("bob", "B1").await;
    let to_bob = json!({ &bob.user_id: {"B1": {"n": 1}} });
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("m.t", b"{not json".to_vec(), "M_NOT_JSON"),
        ("m.t", b"{}".to_vec(), "M_BAD_JSON"),
        ("m.t", br#"{"messages": [1]}"#.to_vec(), "M_BAD_JSON"),
        (
            "m.t",
            serde_json::to_vec(&json!({"messages": {&bob.user_id: {"B1": "text"}}})).unwrap(),
            "M_BAD_JSON",
        ),
        (
            "m.t",
            br#"{"messages": {"bob": {"B1": {}}}}"#.to_vec(),
            "M_INVALID_PARAM",
        ),
        (
            "m.t%01",
            serde_json::to_vec(&json!({ "messages": to_bob })).unwrap(),
            "M_INVALID_PARAM",
        ),
        (
            "m.t%0A",
            serde_json::to_vec(&json!({ "messages": to_bob })).unwrap(),
            "M_INVALID_PARAM",
        ),
    ];
    for (i, (event_type, body, want)) in cases.into_iter().enumerate() {
        let (status, v) = api
            .send_raw(&alice, event_type, &format!("t{i}"), body)
            .await;
        assert_eq!(
            (status, v["errcode"].as_str()),
            (400, Some(want)),
            "case {i}: {v}"
        );
        assert!(v["error"].is_string());
    }
    let (status, v) = api.send_raw(&alice, "m.t", "t%00", b"{}".to_vec()).await;
    assert_eq!(
        (status, v["errcode"].as_str()),
        (400, Some("M_INVALID_PARAM")),
        "control char in txnId"
    );
    assert!(events(&api.sync(&bob, None, 0).await).is_empty());
    for bad in ["garbage", "s12x", "s99999999999999"] {
        let path = format!("/_matrix/client/v3/sync?since={bad}");
        let (status, v) = api.call(Method::GET, &path, Some(&bob.token), None).await;
        assert_eq!(
            (status, v["errcode"].as_str()),
            (400, Some("M_INVALID_PARAM")),
            "since={bad}"
        );
    }
}

#[tokio::test]
async fn too_large_messages_and_bodies_get_413() {
    let c =
        Courier::start_with("[client]\nmax_message_bytes = 1024\nmax_request_bytes = 8192\n").await;
    let api = Api::new(&c);
    let alice = api.device("alice", "A1").await;
    let bob = api.device("bob", "B1").await;
    let body = |content: Value| {
        serde_json::to_vec(&json!({"messages": { &bob.user_id: {"B1": content}}})).unwrap()
    };
    // One message over the per-message limit.
    let (status, v) = api
        .send_raw(&alice, "m.t", "big", body(json!({"x": "y".repeat(1100)})))
        .await;
    assert_eq!((status, v["errcode"].as_str()), (413, Some("M_TOO_LARGE")));
    // Many small messages over the per-request limit.
    let mut many = serde_json::Map::new();
    for i in 0..20 {
        many.insert(
            api.user(&format!("u{i}")),
            json!({"D": {"x": "y".repeat(500)}}),
        );
    }
    let (status, v) = api
        .send_raw(
            &alice,
            "m.t",
            "many",
            serde_json::to_vec(&json!({ "messages": many })).unwrap(),
        )
        .await;
    assert_eq!((status, v["errcode"].as_str()), (413, Some("M_TOO_LARGE")));
    assert!(events(&api.sync(&bob, None, 0).await).is_empty());
    // Just under the limit is fine.
    let (status, _) = api
        .send_raw(&alice, "m.t", "ok", body(json!({"x": "y".repeat(1000)})))
        .await;
    assert_eq!(status, 200);
    assert_eq!(events(&api.sync(&bob, None, 0).await).len(), 1);
}

#[tokio::test]
async fn whoami_devices_versions_and_unknown_endpoints() {
    let c = Courier::start().await;
    let api = Api::new(&c);
    let b1 = api.device("bob", "B1").await;
    let _b2 = api.device("bob", "B2").await;
    let (status, v) = api
        .call(Method::GET, "/_matrix/client/versions", None, None)
        .await;
    assert_eq!(status, 200);
    let versions: Vec<&str> = v["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        versions.contains(&"v1.1") && versions.contains(&"v1.12"),
        "{v}"
    );
    let (status, v) = api
        .call(
            Method::GET,
            "/_matrix/client/v3/account/whoami",
            Some(&b1.token),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        (v["user_id"].as_str(), v["device_id"].as_str()),
        (Some(b1.user_id.as_str()), Some("B1"))
    );
    let (status, v) = api
        .call(
            Method::GET,
            "/_matrix/client/v3/devices",
            Some(&b1.token),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["B1", "B2"]);
    let (status, v) = api
        .call(
            Method::POST,
            "/_matrix/client/v3/sync",
            Some(&b1.token),
            None,
        )
        .await;
    assert_eq!(
        (status, v["errcode"].as_str()),
        (405, Some("M_UNRECOGNIZED"))
    );
    let (status, v) = api
        .call(
            Method::GET,
            "/_matrix/client/v3/rooms",
            Some(&b1.token),
            None,
        )
        .await;
    assert_eq!(
        (status, v["errcode"].as_str()),
        (404, Some("M_UNRECOGNIZED"))
    );
}

#[tokio::test]
async fn the_admin_api_checks_its_token_and_our_server_name() {
    let c = Courier::start().await;
    let api = Api::new(&c);
    let bob = api.device("bob", "B1").await;
    let list = format!("/_courier/admin/v1/devices/{}", bob.user_id);
    // A wrong method on a known admin endpoint: a JSON 405, not axum's empty one.
    for path in [list.as_str(), "/_courier/admin/v1/destinations"] {
        let (status, v) = api
            .admin(Method::PUT, &path["/_courier/admin/v1".len()..], None)
            .await;
        assert_eq!(
            (status, v["errcode"].as_str()),
            (405, Some("M_UNRECOGNIZED")),
            "{path}"
        );
    }
    let (status, v) = api.call(Method::GET, &list, None, None).await;
    assert_eq!(
        (status, v["errcode"].as_str()),
        (401, Some("M_MISSING_TOKEN"))
    );
    let (status, v) = api
        .call(Method::GET, &list, Some("not-the-admin-token"), None)
        .await;
    assert_eq!(
        (status, v["errcode"].as_str()),
        (401, Some("M_UNKNOWN_TOKEN"))
    );
    let (status, _) = api.call(Method::GET, &list, Some(&bob.token), None).await;
    assert_eq!(status, 401, "a client token is not an admin token");
    let (status, v) = api
        .call(
            Method::GET,
            "/_courier/admin/v1/nothing",
            Some("wrong"),
            None,
        )
        .await;
    assert_eq!(
        status, 401,
        "unknown admin paths check the token first: {v}"
    );
    let (status, v) = api
        .admin(Method::GET, &format!("/devices/{}", bob.user_id), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(v["devices"][0]["device_id"], "B1");
    let (status, v) = api
        .admin(
            Method::POST,
            "/devices",
            Some(json!({"user_id": "@bob:elsewhere.example"})),
        )
        .await;
    assert_eq!(
        (status, v["errcode"].as_str()),
        (400, Some("M_INVALID_PARAM"))
    );
    let (status, v) = api
        .admin(
            Method::POST,
            "/devices",
            Some(json!({"user_id": bob.user_id, "device_id": "*"})),
        )
        .await;
    assert_eq!(
        (status, v["errcode"].as_str()),
        (400, Some("M_INVALID_PARAM"))
    );
    let (status, v) = api.admin(Method::GET, "/devices/@nobody:x", None).await;
    assert_eq!(status, 400, "{v}");

    let off = Courier::start_with_admin_token("", None).await;
    let off_api = Api::new(&off);
    let (status, v) = off_api
        .admin(
            Method::POST,
            "/users",
            Some(json!({"user_id": off_api.user("a")})),
        )
        .await;
    assert_eq!(
        (status, v["errcode"].as_str()),
        (403, Some("M_FORBIDDEN")),
        "{v}"
    );
}

#[tokio::test]
async fn cli_device_add_prints_one_json_object_whose_token_works() {
    let c = Courier::start().await;
    let api = Api::new(&c);
    let config = c.config_path();
    let config = config.to_str().unwrap();
    let bob = api.user("bob");
    let cli = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--config", config]);
        run_cli(&all, "", c.dir.path())
    };

    let (code, out, err) = cli(&["device", "add", &bob]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 1, "one line: {out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let keys: BTreeSet<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        BTreeSet::from(["user_id", "device_id", "access_token"])
    );
    let token = v["access_token"].as_str().unwrap();
    let (status, who) = api
        .call(
            Method::GET,
            "/_matrix/client/v3/account/whoami",
            Some(token),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(who["user_id"], bob.as_str());
    assert_eq!(who["device_id"], v["device_id"]);

    let (code, out, err) = cli(&["device", "add", &bob, "--device", "PHONE"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["device_id"],
        "PHONE"
    );
    let (code, out, _) = cli(&["device", "list", &bob]);
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["devices"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let (code, _, err) = cli(&["device", "delete", &bob, "PHONE"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = cli(&["device", "list", &bob]);
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["devices"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let (code, out, err) = cli(&["user", "add", &api.user("carol")]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["created"],
        true
    );

    // Refusals: nothing on stdout, one line on stderr, non-zero exit.
    for args in [
        vec!["device", "add", "@bob:elsewhere.example"],
        vec!["device", "delete", &bob, "NOPE"],
    ] {
        let (code, out, err) = cli(&args);
        assert_ne!(code, 0, "{args:?}");
        assert!(out.is_empty(), "{args:?}: {out}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
}

#[tokio::test]
async fn cli_pins_the_certificate_of_the_server_it_calls() {
    let a = Courier::start().await;
    let b = Courier::start().await;
    // A's config pointed at B's port: B's certificate is not the one A's config pins.
    let text = std::fs::read_to_string(a.config_path()).unwrap().replace(
        &format!("127.0.0.1:{}\"\nresources", a.port),
        &format!("127.0.0.1:{}\"\nresources", b.port),
    );
    let path = a.dir.path().join("pointed-at-b.toml");
    std::fs::write(&path, text).unwrap();
    // B's own user, and both use the same admin token: only the pin can refuse this.
    let (code, out, err) = run_cli(
        &[
            "device",
            "add",
            &format!("@bob:{}", b.server_name),
            "--config",
            path.to_str().unwrap(),
        ],
        "",
        a.dir.path(),
    );
    assert_ne!(
        code, 0,
        "a certificate other than the pinned one is refused: {out}"
    );
    assert!(out.is_empty());
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("cannot reach the admin API"), "{err}");
    // The same command with B's own config goes through.
    let (code, _, err) = run_cli(
        &[
            "device",
            "add",
            &format!("@bob:{}", b.server_name),
            "--config",
            b.config_path().to_str().unwrap(),
        ],
        "",
        b.dir.path(),
    );
    assert_eq!(code, 0, "{err}");
}

#[tokio::test]
async fn messages_for_another_server_are_delivered_and_acknowledged_there() {
    let mut a = Courier::start().await;
    let mut b = Courier::start().await;
    let api_a = Api::new(&a);
    let api_b = Api::new(&b);
    let alice = api_a.device("alice", "A1").await;
    let bob1 = api_b.device("bob", "B1").await;
    let bob2 = api_b.device("bob", "B2").await;
    api_a
        .send(
            &alice,
            "m.test",
            "t1",
            json!({ &bob1.user_id: {"*": {"n": 1}} }),
        )
        .await;
    for bob in [&bob1, &bob2] {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let sync = loop {
            let sync = api_b.sync(bob, None, 5_000).await;
            if !events(&sync).is_empty() {
                break sync;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "not delivered; A's log:\n{}",
                a.log()
            );
        };
        assert_eq!(
            events(&sync),
            vec![json!({"sender": alice.user_id, "type": "m.test", "content": {"n": 1}})]
        );
        assert!(events(&api_b.sync(bob, Some(&next_batch(&sync)), 0).await).is_empty());
    }
    a.terminate();
    b.terminate();
    let store_b = b.open_store();
    assert_eq!(store_b.inbox_len(&bob1.user_id, "B1").unwrap(), 0);
    assert_eq!(store_b.inbox_len(&bob1.user_id, "B2").unwrap(), 0);
    assert!(
        a.open_store().destinations_with_work().unwrap().is_empty(),
        "A's outbox is empty"
    );
}

/// Web clients: the spec's CORS headers on every client answer (errors included),
/// and an `OPTIONS` pre-flight answered without running the endpoint.
#[tokio::test]
async fn web_clients_get_cors_headers_and_preflights_run_no_endpoint() {
    let c = Courier::start().await;
    let api = Api::new(&c);
    let alice = api.device("alice", "A1").await;
    let bob = api.device("bob", "B1").await;
    let body =
        serde_json::to_vec(&json!({"messages": { &bob.user_id: {"B1": {"n": 1}} }})).unwrap();
    let preflight = api
        .http
        .request(
            Method::OPTIONS,
            format!("{}/_matrix/client/v3/sendToDevice/m.test/t1", api.base),
        )
        .header("origin", "https://app.example")
        .header("access-control-request-method", "PUT")
        .header(
            "access-control-request-headers",
            "authorization,content-type",
        )
        .bearer_auth(&alice.token)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), 200);
    let h = preflight.headers();
    assert_eq!(h["access-control-allow-origin"], "*");
    for m in ["GET", "POST", "PUT", "DELETE", "OPTIONS"] {
        assert!(
            h["access-control-allow-methods"]
                .to_str()
                .unwrap()
                .contains(m),
            "{h:?}"
        );
    }
    for name in ["x-requested-with", "content-type", "authorization"] {
        assert!(
            h["access-control-allow-headers"]
                .to_str()
                .unwrap()
                .to_ascii_lowercase()
                .contains(name),
            "{h:?}"
        );
    }
    // The pre-flight delivered nothing.
    assert!(events(&api.sync(&bob, None, 0).await).is_empty());
    // An ordinary answer and an error both carry the origin header.
    for token in [Some(alice.token.as_str()), None] {
        let mut req = api
            .http
            .get(format!("{}/_matrix/client/v3/sync?timeout=0", api.base))
            .header("origin", "https://app.example");
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), if token.is_some() { 200 } else { 401 });
        assert_eq!(resp.headers()["access-control-allow-origin"], "*");
    }
}
