//! Issue 7, hostile input: a real courier against oversized and deeply nested bodies,
//! slow-loris connections, floods of unknown origins, replayed and forged
//! transactions. Each test checks that courier answers as the spec says, stays up and
//! responsive, and that its store holds exactly what it should afterwards (read from
//! the stopped process's RocksDB).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::matrix::{device, edu, sync_until, txn};
use common::proxy::{FakeOrigin, Signer};
use common::{Courier, free_port, insecure_client};
use courier::store::cf;
use futures::StreamExt;
use serde_json::{Value, json};

/// Guard against hanging; never reached when things work.
const GUARD: Duration = Duration::from_secs(90);

/// `(status, errcode)` of a response.
async fn answer(r: reqwest::Response) -> (u16, Option<String>) {
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    (status, body["errcode"].as_str().map(str::to_owned))
}

/// The courier still serves (a cheap probe).
async fn serves(c: &Courier) -> bool {
    match insecure_client()
        .get(c.url("/_matrix/federation/v1/version"))
        .send()
        .await
    {
        Ok(r) => r.status() == 200,
        Err(_) => false,
    }
}

fn assert_no_panic(c: &Courier) {
    assert!(!c.log().contains("panicked"), "{}", c.log());
}

// ---------------------------------------------------------------------------
// Raw TLS connections (for what reqwest will not send)
// ---------------------------------------------------------------------------

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Where raw connections go: a courier's port and its generated certificate.
#[derive(Clone)]
struct Raw {
    port: u16,
    cert_pem: Vec<u8>,
}

impl Raw {
    fn of(c: &Courier) -> Raw {
        Raw {
            port: c.port,
            cert_pem: std::fs::read(c.data_dir().join("tls/cert.pem")).unwrap(),
        }
    }
}

/// A TLS connection to `to`, trusting exactly its certificate.
fn tls_connect(to: &Raw) -> Tls {
    use rustls_pki_types::pem::PemObject;
    courier::tls::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_slice(&to.cert_pem).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls_pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let sock = TcpStream::connect(("127.0.0.1", to.port)).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).unwrap();
    }
    tls
}

/// Waits up to `wait` for the peer: `Some(bytes)` once it answered something or
/// closed (empty), `None` if it stayed silent.
fn poll_peer(
    stream: &mut (impl Read + ?Sized),
    sock: &TcpStream,
    wait: Duration,
) -> Option<Vec<u8>> {
    sock.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 4096];
    match stream.read(&mut buf) {
        Ok(n) => Some(buf[..n].to_vec()),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => None,
        Err(_) => Some(Vec::new()),
    }
}

/// Sends `request` over TLS in pieces, stopping early if courier answers before the
/// end (as it should for a body over the limit); returns the whole answer.
fn raw_exchange(to: &Raw, pieces: Vec<Vec<u8>>) -> String {
    let mut tls = tls_connect(to);
    let mut got = Vec::new();
    for piece in pieces {
        if tls.write_all(&piece).and_then(|_| tls.flush()).is_err() {
            break;
        }
        let sock = tls.sock.try_clone().unwrap();
        if let Some(b) = poll_peer(&mut tls, &sock, Duration::from_millis(5)) {
            got.extend(b);
            break;
        }
    }
    let sock = tls.sock.try_clone().unwrap();
    let end = Instant::now() + GUARD;
    while Instant::now() < end {
        match poll_peer(&mut tls, &sock, Duration::from_millis(500)) {
            Some(b) if b.is_empty() => break,
            Some(b) => got.extend(b),
            None if !got.is_empty() && String::from_utf8_lossy(&got).contains("\r\n\r\n") => {
                break;
            }
            None => {}
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// The status code of a raw HTTP/1.1 answer.
fn status_of(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"))
}

/// A chunked request of `total` bytes of JSON-ish body, in 8 KiB chunks.
fn chunked(head: &str, total: usize) -> Vec<Vec<u8>> {
    let mut pieces = vec![head.as_bytes().to_vec()];
    let mut left = total;
    while left > 0 {
        let n = left.min(8192);
        let mut p = format!("{n:x}\r\n").into_bytes();
        p.extend(std::iter::repeat_n(b' ', n));
        p.extend_from_slice(b"\r\n");
        pieces.push(p);
        left -= n;
    }
    pieces.push(b"0\r\n\r\n".to_vec());
    pieces
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test]
async fn oversized_bodies_get_413_and_store_nothing() {
    let mut t = Courier::start_with(
        "[federation]\nallow_private_destinations = true\nverify_certificates = false\n\
         max_request_bytes = 65536\n[client]\nmax_request_bytes = 65536\nmax_message_bytes = 1024\n",
    )
    .await;
    let origin = FakeOrigin::start().await;
    let s = origin.signer();
    let bob_id = format!("@bob:{}", t.server_name);
    let bob = device(&t, &bob_id, "BOB").await;
    let alice = format!("@alice:{}", origin.name);
    let big = txn(
        &s.origin,
        vec![
            edu(&alice, "big", &bob_id, 1),
            json!({"edu_type": "m.x", "content": {"pad": "y".repeat(100_000)}}),
        ],
    );
    let uri = "/_matrix/federation/v1/send/BIG";
    let http = insecure_client();

    // Federation, with a Content-Length: unsigned, then signed.
    let r = http.put(t.url(uri)).json(&big).send().await.unwrap();
    assert_eq!(answer(r).await, (413, Some("M_TOO_LARGE".into())));
    let r = http
        .put(t.url(uri))
        .header(
            "Authorization",
            s.header("PUT", uri, &t.server_name, Some(&big)),
        )
        .json(&big)
        .send()
        .await
        .unwrap();
    assert_eq!(answer(r).await, (413, Some("M_TOO_LARGE".into())));
    // Client, with a Content-Length.
    let send_uri = "/_matrix/client/v3/sendToDevice/m.test/big";
    let body = json!({"messages": {&bob_id: {"BOB": {"pad": "y".repeat(100_000)}}}});
    let r = http
        .put(t.url(send_uri))
        .bearer_auth(&bob)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(answer(r).await, (413, Some("M_TOO_LARGE".into())));

    // Chunked bodies (no length announced), on both surfaces.
    let host = format!("Host: {}\r\n", t.server_name);
    let fed = format!(
        "PUT {uri} HTTP/1.1\r\n{host}Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    let cli = format!(
        "PUT {send_uri} HTTP/1.1\r\n{host}Authorization: Bearer {bob}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    let to = Raw::of(&t);
    for (what, pieces) in [
        ("federation, chunked", chunked(&fed, 100_000)),
        ("client, chunked", chunked(&cli, 100_000)),
    ] {
        let to = to.clone();
        let got = tokio::task::spawn_blocking(move || raw_exchange(&to, pieces))
            .await
            .unwrap();
        assert_eq!(status_of(&got), 413, "{what}: {got}");
        assert!(got.contains("M_TOO_LARGE"), "{what}: {got}");
    }

    // Up, and nothing was stored.
    assert!(serves(&t).await);
    assert!(
        sync_until(&t.base(), &bob, 1, Duration::from_secs(2))
            .await
            .is_empty()
    );
    t.kill();
    assert_no_panic(&t);
    let store = t.open_store();
    assert_eq!(store.inbox_len(&bob_id, "BOB").unwrap(), 0);
    assert_eq!(store.count(cf::INBOUND_TXNS), 0);
    assert_eq!(store.count(cf::CLIENT_TXNS), 0);
}

/// A body announced larger than the limit is refused on sight, without waiting for
/// bytes that will never come.
#[tokio::test]
async fn an_announced_length_over_the_limit_is_refused_at_once() {
    let t = Courier::start_with(
        "[federation]\nallow_private_destinations = true\nverify_certificates = false\n\
         max_request_bytes = 65536\n[client]\nmax_request_bytes = 65536\nmax_message_bytes = 1024\n",
    )
    .await;
    let bob = device(&t, &format!("@bob:{}", t.server_name), "BOB").await;
    let host = format!("Host: {}\r\n", t.server_name);
    let to = Raw::of(&t);
    for (what, head) in [
        (
            "federation",
            format!("PUT /_matrix/federation/v1/send/L HTTP/1.1\r\n{host}"),
        ),
        (
            "client",
            format!(
                "PUT /_matrix/client/v3/sendToDevice/m.test/L HTTP/1.1\r\n{host}Authorization: Bearer {bob}\r\n"
            ),
        ),
    ] {
        let request = format!("{head}Content-Length: 1000000000000\r\n\r\n{{}}");
        let to = to.clone();
        let got =
            tokio::task::spawn_blocking(move || raw_exchange(&to, vec![request.into_bytes()]))
                .await
                .unwrap();
        assert_eq!(status_of(&got), 413, "{what}: {got}");
        assert!(got.contains("M_TOO_LARGE"), "{what}: {got}");
    }
}

#[tokio::test]
async fn deeply_nested_json_is_refused_or_dropped_alone_and_the_server_stays_up() {
    let mut t = Courier::start().await;
    let bob_id = format!("@bob:{}", t.server_name);
    let bob = device(&t, &bob_id, "BOB").await;
    let origin = FakeOrigin::start().await;
    let s = origin.signer();
    let http = insecure_client();
    let arrays = "[".repeat(100_000);
    let objects = "{\"a\":".repeat(100_000);
    let inside = format!(
        "{{\"messages\": {{\"{bob_id}\": {{\"BOB\": {{\"deep\": {}1{}}}}}}}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let fed = "/_matrix/federation/v1/send/DEEP";
    for (i, body) in [&arrays, &objects, &inside].into_iter().enumerate() {
        // Federation: refused before (unsigned) and after (signed) authentication.
        let r = http
            .put(t.url(fed))
            .header("Content-Type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let (status, code) = answer(r).await;
        if body == &inside {
            // Valid JSON: read in place, refused unauthenticated.
            assert_eq!((status, code.as_deref()), (401, Some("M_UNAUTHORIZED")));
        } else {
            assert_eq!(status, 400, "federation body {i}");
            assert!(
                matches!(code.as_deref(), Some("M_NOT_JSON" | "M_BAD_JSON")),
                "{code:?}"
            );
        }
        let r = http
            .put(t.url(fed))
            .header("Content-Type", "application/json")
            .header(
                "Authorization",
                s.header("PUT", fed, &t.server_name, Some(&json!({}))),
            )
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let expected = if body == &inside { 401 } else { 400 };
        assert_eq!(answer(r).await.0, expected, "signed federation body {i}");
        // Client.
        let r = http
            .put(t.url(&format!("/_matrix/client/v3/sendToDevice/m.test/deep{i}")))
            .bearer_auth(&bob)
            .header("Content-Type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let (status, code) = answer(r).await;
        assert_eq!(status, 400, "client body {i}");
        assert!(
            matches!(code.as_deref(), Some("M_NOT_JSON" | "M_BAD_JSON")),
            "{code:?}"
        );
        assert!(serves(&t).await, "down after body {i}");
    }
    // Nesting that JSON parsers accept (under serde_json's 128 levels) in a signed
    // transaction is delivered like any other content.
    let alice = format!("@alice:{}", origin.name);
    let mut deep = json!(7);
    for _ in 0..100 {
        deep = json!([deep]);
    }
    let mut e = edu(&alice, "m1", &bob_id, 1);
    e["content"]["messages"][&bob_id]["*"]["deep"] = deep.clone();
    assert_eq!(s.put_txn(&t, "OK", &txn(&s.origin, vec![e])).await.0, 200);
    let (got, since) = common::matrix::sync_events_from(&t.base(), &bob, None, 1, GUARD).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["content"]["deep"], deep);
    // Deeper than a JSON tree holds (Synapse's parser holds it): that message is
    // dropped alone; the transaction is accepted, or its origin would retry it for
    // good and send us nothing else.
    for _ in 0..100 {
        deep = json!([deep]);
    }
    let mut e = edu(&alice, "m2", &bob_id, 2);
    e["content"]["messages"][&bob_id]["*"]["deep"] = deep;
    let next = edu(&alice, "m3", &bob_id, 3);
    assert_eq!(
        s.put_txn(&t, "DEEPER", &txn(&s.origin, vec![e, next]))
            .await
            .0,
        200
    );
    let (got, _) = common::matrix::sync_events_from(&t.base(), &bob, since, 1, GUARD).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["content"]["n"], 3);
    t.kill();
    assert_no_panic(&t);
    let store = t.open_store();
    assert_eq!(store.inbox_len(&bob_id, "BOB").unwrap(), 0);
    assert_eq!(
        store.count(cf::CLIENT_TXNS),
        0,
        "no deep sendToDevice was accepted"
    );
    assert_eq!(
        store.count(cf::INBOUND_TXNS),
        2,
        "only the signed transactions"
    );
}

/// Slow-loris: connections that never finish the TLS handshake or dribble their
/// request headers one byte per second are dropped by courier within a bound (its
/// handshake and header-read timeouts), and courier keeps serving everyone else
/// meanwhile.
#[tokio::test]
async fn slow_loris_connections_are_dropped() {
    let t = Courier::start().await;
    let to = Raw::of(&t);
    let started = Instant::now();
    // How long each kind of slow connection lived; `None`: still open at the guard.
    let mut kinds = Vec::new();
    for kind in ["silent", "slow handshake", "slow headers"] {
        let to = to.clone();
        kinds.push((
            kind,
            tokio::task::spawn_blocking(move || slow_connection(&to, kind)),
        ));
    }
    // A crowd of silent TCP connections on top.
    let crowd: Vec<TcpStream> = (0..32)
        .map(|_| TcpStream::connect(("127.0.0.1", t.port)).unwrap())
        .collect();
    // Everyone else is still served while they hang.
    let bob = device(&t, &format!("@bob:{}", t.server_name), "BOB").await;
    for _ in 0..5 {
        assert!(serves(&t).await, "not serving while slow clients hang");
        let r = insecure_client()
            .get(t.url("/_matrix/client/v3/sync?timeout=0"))
            .bearer_auth(&bob)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (kind, task) in kinds {
        let lived = task.await.unwrap();
        println!("slow-loris {kind}: dropped after {lived:?}");
        assert!(lived.is_some(), "a {kind} connection was never dropped");
    }
    // The silent crowd was dropped too (the handshake timeout).
    for mut s in crowd {
        let sock = s.try_clone().unwrap();
        let end = started + GUARD;
        let mut closed = false;
        while Instant::now() < end {
            if poll_peer(&mut s, &sock, Duration::from_millis(500)).is_some() {
                closed = true;
                break;
            }
        }
        assert!(closed, "a silent connection was never dropped");
    }
    assert!(serves(&t).await);
    assert_no_panic(&t);
}

/// Slow-loris on the body: complete headers announcing 100 000 bytes, then one byte
/// per second. courier must drop it (or answer) within a bound.
#[tokio::test]
async fn a_slow_body_is_dropped_within_a_bound() {
    let t = Courier::start().await;
    let to = Raw::of(&t);
    let lived = tokio::task::spawn_blocking(move || slow_connection(&to, "slow body"))
        .await
        .unwrap();
    println!("slow-loris slow body: dropped after {lived:?}");
    assert!(lived.is_some(), "a slow body connection was never dropped");
    assert!(serves(&t).await);
}

/// One slow connection of `kind`; returns how long it lived until courier closed it
/// (or answered it), `None` if it was still open after [`GUARD`].
fn slow_connection(to: &Raw, kind: &str) -> Option<Duration> {
    // The first bytes of a TLS ClientHello.
    const HELLO: &[u8] = &[
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    const HEAD: &[u8] =
        b"GET /_matrix/federation/v1/version HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: ";
    const BODY_HEAD: &[u8] =
        b"PUT /_matrix/federation/v1/send/slow HTTP/1.1\r\nHost: 127.0.0.1\r\n\
        Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n";
    match kind {
        "silent" | "slow handshake" => {
            let mut tcp = TcpStream::connect(("127.0.0.1", to.port)).unwrap();
            let sock = tcp.try_clone().unwrap();
            let hello = if kind == "silent" { &[][..] } else { HELLO };
            dribble(&mut tcp, &sock, hello.iter().copied())
        }
        "slow headers" => {
            let mut tls = tls_connect(to);
            let sock = tls.sock.try_clone().unwrap();
            dribble(
                &mut tls,
                &sock,
                HEAD.iter().copied().chain(std::iter::repeat(b'a')),
            )
        }
        "slow body" => {
            let mut tls = tls_connect(to);
            let sock = tls.sock.try_clone().unwrap();
            tls.write_all(BODY_HEAD).and_then(|_| tls.flush()).unwrap();
            dribble(&mut tls, &sock, std::iter::repeat(b' '))
        }
        _ => unreachable!(),
    }
}

/// Writes `bytes` one per second (then nothing) until courier answers or closes the
/// connection; returns how long that took, `None` if it did not within [`GUARD`].
fn dribble(
    stream: &mut (impl Read + Write),
    sock: &TcpStream,
    mut bytes: impl Iterator<Item = u8>,
) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < GUARD {
        if let Some(b) = bytes.next()
            && stream.write_all(&[b]).and_then(|_| stream.flush()).is_err()
        {
            return Some(start.elapsed());
        }
        if poll_peer(stream, sock, Duration::from_secs(1)).is_some() {
            return Some(start.elapsed());
        }
    }
    None
}

/// Many signed requests claiming origins whose keys cannot be fetched (closed ports,
/// and listeners that hang up at once) are each refused with 401; courier fetches each
/// claimed origin's keys at most once (no request cannon), and keeps serving.
#[tokio::test]
async fn a_flood_of_unknown_origins_gets_401_without_hammering() {
    let mut t = Courier::start().await;
    let bob_id = format!("@bob:{}", t.server_name);
    let bob = device(&t, &bob_id, "BOB").await;
    let key = courier::signing::SigningKey::generate("flood").unwrap();
    // Listeners that count connections and hang up at once.
    let mut counters = Vec::new();
    let mut origins = Vec::new();
    for _ in 0..4 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let count = Arc::new(AtomicUsize::new(0));
        let c2 = count.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                c2.fetch_add(1, Ordering::SeqCst);
                drop(s);
            }
        });
        counters.push((port, count));
        origins.extend(std::iter::repeat_n(format!("127.0.0.1:{port}"), 25));
    }
    origins.extend((0..200).map(|_| format!("127.0.0.1:{}", free_port())));
    let refused = AtomicUsize::new(0);
    let flooding = AtomicBool::new(true);
    let http = insecure_client();
    let flood = async {
        futures::stream::iter(origins.iter().enumerate())
            .for_each_concurrent(32, |(i, origin)| {
                let (http, key, t, bob_id, refused) = (&http, &key, &t, &bob_id, &refused);
                async move {
                    let s = Signer {
                        origin: origin.clone(),
                        key: key.clone(),
                    };
                    let body = txn(origin, vec![edu(&format!("@m:{origin}"), "x", bob_id, 9)]);
                    let uri = format!("/_matrix/federation/v1/send/f{i}");
                    let r = http
                        .put(t.url(&uri))
                        .header(
                            "Authorization",
                            s.header("PUT", &uri, &t.server_name, Some(&body)),
                        )
                        .json(&body)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(
                        answer(r).await,
                        (401, Some("M_UNAUTHORIZED".into())),
                        "{origin}"
                    );
                    refused.fetch_add(1, Ordering::SeqCst);
                }
            })
            .await;
        flooding.store(false, Ordering::SeqCst);
    };
    // A client keeps syncing through the flood.
    let probe = async {
        let mut served = 0;
        while flooding.load(Ordering::SeqCst) {
            let r = http
                .get(t.url("/_matrix/client/v3/sync?timeout=0"))
                .bearer_auth(&bob)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            served += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        served
    };
    let ((), served) = tokio::time::timeout(GUARD, async { tokio::join!(flood, probe) })
        .await
        .expect("the flood was not answered in time");
    assert_eq!(refused.load(Ordering::SeqCst), origins.len());
    assert!(served >= 1);
    for (port, count) in &counters {
        let n = count.load(Ordering::SeqCst);
        assert!(
            n <= 1,
            "127.0.0.1:{port} claimed 25 times, its keys fetched {n} times"
        );
    }
    t.kill();
    assert_no_panic(&t);
    let store = t.open_store();
    assert_eq!(store.inbox_len(&bob_id, "BOB").unwrap(), 0);
    assert_eq!(store.count(cf::INBOUND_TXNS), 0);
    assert_eq!(store.count(cf::SERVER_KEYS), 0, "no key was cached");
}

/// Origins whose key servers accept connections but never answer hold courier's key
/// fetches until they time out. Meanwhile a genuine peer, seen for the first time,
/// must still get its transaction through (after at most a retry).
#[tokio::test]
async fn black_holed_key_servers_do_not_lock_out_a_new_peer() {
    let t = Courier::start().await;
    let bob_id = format!("@bob:{}", t.server_name);
    let bob = device(&t, &bob_id, "BOB").await;
    let key = courier::signing::SigningKey::generate("hole").unwrap();
    // 24 listeners that accept and then say nothing.
    let mut holes = Vec::new();
    let mut held = Vec::new();
    for _ in 0..24 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        holes.push(format!("127.0.0.1:{}", l.local_addr().unwrap().port()));
        held.push(tokio::spawn(async move {
            let mut keep = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                keep.push(s);
            }
        }));
    }
    let http = insecure_client();
    let mut pending = Vec::new();
    for (i, origin) in holes.iter().enumerate() {
        let s = Signer {
            origin: origin.clone(),
            key: key.clone(),
        };
        let body = txn(origin, vec![]);
        let uri = format!("/_matrix/federation/v1/send/h{i}");
        let req = http
            .put(t.url(&uri))
            .header(
                "Authorization",
                s.header("PUT", &uri, &t.server_name, Some(&body)),
            )
            .json(&body);
        pending.push(tokio::spawn(
            async move { req.send().await.map(|r| r.status()) },
        ));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A real peer appears now; like any sender it retries a refused transaction.
    let origin = FakeOrigin::start().await;
    let s = origin.signer();
    let body = txn(
        &s.origin,
        vec![edu(&format!("@a:{}", origin.name), "m1", &bob_id, 1)],
    );
    let mut status = 0;
    for _ in 0..3 {
        status = s.put_txn(&t, "real", &body).await.0;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let why: Vec<String> = t
        .log()
        .lines()
        .filter(|l| l.contains(&origin.name))
        .map(str::to_owned)
        .collect();
    assert_eq!(
        status,
        200,
        "a genuine new peer was locked out:\n{}",
        why.join("\n")
    );
    assert_eq!(sync_until(&t.base(), &bob, 1, GUARD).await, vec![1]);
    for p in pending {
        p.abort();
    }
    for h in held {
        h.abort();
    }
}

/// `GET /user/devices/{user}` signed by `s`: the status.
async fn signed_devices_get(t: &Courier, s: &Signer, user: &str) -> u16 {
    let uri = format!("/_matrix/federation/v1/user/devices/{user}");
    insecure_client()
        .get(t.url(&uri))
        .header("Authorization", s.header("GET", &uri, &t.server_name, None))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// A new peer's first requests arrive together, while courier fetches its keys: each
/// waits for that one fetch and none is refused (a refused request makes a sender
/// such as Synapse back off from us).
#[tokio::test]
async fn requests_arriving_while_the_origins_keys_are_fetched_wait_for_them() {
    let t = Courier::start().await;
    let bob_id = format!("@bob:{}", t.server_name);
    device(&t, &bob_id, "B1").await;
    let origin = FakeOrigin::start().await;
    origin.slow_keys(Duration::from_millis(700));
    let s = origin.signer();
    let statuses =
        futures::future::join_all((0..4).map(|_| signed_devices_get(&t, &s, &bob_id))).await;
    assert_eq!(statuses, vec![200; 4]);
    assert_eq!(
        t.log().matches("fetched server keys").count(),
        1,
        "one fetch for all four"
    );
}

/// A key the origin moved to `old_verify_keys` stops authenticating its requests at
/// the next fetch of its keys, even though it was cached as valid for another day.
#[tokio::test]
async fn a_key_the_origin_rotated_out_no_longer_authenticates() {
    let t = Courier::start().await;
    let bob_id = format!("@bob:{}", t.server_name);
    device(&t, &bob_id, "B1").await;
    let origin = FakeOrigin::start().await;
    let before = origin.signer();
    assert_eq!(signed_devices_get(&t, &before, &bob_id).await, 200);
    origin.rotate();
    let after = origin.signer();
    // A key courier does not know makes it fetch again, once the refetch interval
    // since the first fetch is over.
    tokio::time::sleep(courier::federation::keys::REFETCH_INTERVAL + Duration::from_secs(1)).await;
    assert_eq!(signed_devices_get(&t, &after, &bob_id).await, 200);
    assert_eq!(
        signed_devices_get(&t, &before, &bob_id).await,
        401,
        "the rotated-out key still authenticates"
    );
}

#[tokio::test]
async fn replayed_transactions_and_messages_are_processed_once_even_across_a_restart() {
    let mut t = Courier::start().await;
    let bob_id = format!("@bob:{}", t.server_name);
    let b1 = device(&t, &bob_id, "B1").await;
    device(&t, &bob_id, "B2").await;
    let origin = FakeOrigin::start().await;
    let s = origin.signer();
    let alice = format!("@alice:{}", origin.name);
    let m = |mid: &str, n: u64| edu(&alice, mid, &bob_id, n);

    let t1 = txn(&s.origin, vec![m("m1", 1)]);
    assert_eq!(s.put_txn(&t, "T1", &t1).await.0, 200);
    assert_eq!(
        s.put_txn(&t, "T1", &t1).await.0,
        200,
        "a replay is answered 200"
    );
    // The same new transaction four times at once: one runs, the others wait their
    // turn (429) or find it done.
    let t2 = txn(&s.origin, vec![m("m2", 2)]);
    let statuses: Vec<u16> = futures::future::join_all((0..4).map(|_| s.put_txn(&t, "T2", &t2)))
        .await
        .into_iter()
        .map(|(st, _)| st)
        .collect();
    assert!(
        statuses.iter().all(|st| *st == 200 || *st == 429),
        "{statuses:?}"
    );
    assert!(statuses.contains(&200), "{statuses:?}");
    // An old message_id in a new transaction, next to a new one.
    let t3 = txn(&s.origin, vec![m("m1", 1), m("m3", 3)]);
    assert_eq!(s.put_txn(&t, "T3", &t3).await.0, 200);
    // The markers are durable: after a SIGKILL the same replays change nothing.
    t.kill();
    t.spawn().await;
    assert_eq!(s.put_txn(&t, "T1", &t1).await.0, 200);
    assert_eq!(s.put_txn(&t, "T3", &t3).await.0, 200);
    let t4 = txn(&s.origin, vec![m("m1", 1), m("m2", 2), m("m3", 3)]);
    assert_eq!(s.put_txn(&t, "T4", &t4).await.0, 200);

    let mut got = sync_until(&t.base(), &b1, 3, Duration::from_secs(10)).await;
    got.sort_unstable();
    assert_eq!(got, vec![1, 2, 3], "each message once");
    t.kill();
    assert_no_panic(&t);
    let store = t.open_store();
    assert_eq!(
        store.inbox_len(&bob_id, "B1").unwrap(),
        0,
        "B1 acknowledged"
    );
    assert_eq!(
        store.inbox_len(&bob_id, "B2").unwrap(),
        3,
        "B2: each message once"
    );
    assert_eq!(store.count(cf::MESSAGE_IDS), 3);
    assert_eq!(store.count(cf::INBOUND_TXNS), 4);
}

#[tokio::test]
async fn forged_senders_wrong_destinations_and_replayed_signatures_store_nothing() {
    let mut t = Courier::start().await;
    let bob_id = format!("@bob:{}", t.server_name);
    let bob = device(&t, &bob_id, "BOB").await;
    let origin = FakeOrigin::start().await;
    let s = origin.signer();
    let http = insecure_client();

    // EDUs whose sender is not of the origin are dropped; the transaction is accepted.
    let other_port = format!("@a:127.0.0.1:{}", free_port());
    let t1 = txn(
        &s.origin,
        vec![
            edu("@mallory:evil.example", "s1", &bob_id, 1),
            edu(&other_port, "s2", &bob_id, 2),
            edu(&bob_id, "s3", &bob_id, 3),
        ],
    );
    assert_eq!(s.put_txn(&t, "T1", &t1).await.0, 200);
    // A message for a user of another server is not ours to keep.
    let elsewhere = txn(
        &s.origin,
        vec![edu(
            &format!("@a:{}", origin.name),
            "e1",
            "@bob:elsewhere.example",
            4,
        )],
    );
    assert_eq!(s.put_txn(&t, "T2", &elsewhere).await.0, 200);

    let good = txn(
        &s.origin,
        vec![edu(&format!("@a:{}", origin.name), "g1", &bob_id, 5)],
    );
    let put = |uri: String, auth: String| {
        let req = http
            .put(t.url(&uri))
            .header("Authorization", auth)
            .json(&good);
        async move { answer(req.send().await.unwrap()).await }
    };
    // Signed for another destination.
    let uri = "/_matrix/federation/v1/send/T3".to_owned();
    let h = s.header("PUT", &uri, "127.0.0.1:1", Some(&good));
    assert_eq!(
        put(uri.clone(), h).await,
        (401, Some("M_UNAUTHORIZED".into()))
    );
    // A valid signature for one transaction, replayed on another txnId.
    let h = s.header(
        "PUT",
        "/_matrix/federation/v1/send/T4",
        &t.server_name,
        Some(&good),
    );
    assert_eq!(
        put("/_matrix/federation/v1/send/T5".into(), h).await,
        (401, Some("M_UNAUTHORIZED".into()))
    );
    // Claiming to be the receiver itself (with another key).
    let me = Signer {
        origin: t.server_name.clone(),
        key: courier::signing::SigningKey::generate("me").unwrap(),
    };
    let mine = txn(&t.server_name, vec![edu(&bob_id, "i1", &bob_id, 6)]);
    let uri = "/_matrix/federation/v1/send/T6";
    let r = http
        .put(t.url(uri))
        .header(
            "Authorization",
            me.header("PUT", uri, &t.server_name, Some(&mine)),
        )
        .json(&mine)
        .send()
        .await
        .unwrap();
    assert_eq!(answer(r).await, (401, Some("M_UNAUTHORIZED".into())));

    assert!(
        sync_until(&t.base(), &bob, 1, Duration::from_secs(2))
            .await
            .is_empty()
    );
    t.kill();
    assert_no_panic(&t);
    let store = t.open_store();
    assert_eq!(store.inbox_len(&bob_id, "BOB").unwrap(), 0);
    // Only the two accepted transactions left markers, and only e1 was processed.
    assert_eq!(store.count(cf::INBOUND_TXNS), 2);
    assert_eq!(store.count(cf::MESSAGE_IDS), 1);
}

/// What axum refuses by itself (a path parameter that does not decode, a chunked
/// body past the limit, a wrong method on a known path) still answers in Matrix
/// form: JSON with an `M_*` code and `application/json`, which a strict peer such as
/// Synapse requires of a JSON answer.
#[tokio::test]
async fn federation_refusals_from_axum_are_matrix_errors() {
    let t = Courier::start_with(
        "[federation]\nallow_private_destinations = true\nverify_certificates = false\nmax_request_bytes = 1000\n",
    )
    .await;
    let http = t.pinned_client();
    let big = format!("{{\"device_keys\":{{\"{}\":[]}}}}", "a".repeat(3000));
    // No Content-Length: the limit is found while reading, not announced.
    let chunked = reqwest::Body::wrap_stream(futures::stream::iter([Ok::<_, std::io::Error>(
        big.into_bytes(),
    )]));
    let cases = [
        (
            http.post(t.url("/_matrix/federation/v1/user/keys/query"))
                .body(chunked),
            413,
            "M_TOO_LARGE",
        ),
        (
            http.get(t.url("/_matrix/federation/v1/user/devices/%FF")),
            400,
            "M_INVALID_PARAM",
        ),
        (
            http.put(t.url("/_matrix/federation/v1/send/%FF"))
                .body("{}"),
            400,
            "M_INVALID_PARAM",
        ),
        // A known path with a wrong method: axum's own answer is an empty 405.
        (
            http.post(t.url("/_matrix/federation/v1/send/t1"))
                .body("{}"),
            405,
            "M_UNRECOGNIZED",
        ),
        (
            http.delete(t.url("/_matrix/key/v2/server")),
            405,
            "M_UNRECOGNIZED",
        ),
    ];
    for (req, status, code) in cases {
        let resp = req.send().await.unwrap();
        let got = resp.status().as_u16();
        let ctype = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body = resp.text().await.unwrap();
        assert_eq!(got, status, "{body}");
        assert_eq!(ctype, "application/json", "{body}");
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert_eq!(v["errcode"], code, "{body}");
    }
    assert_no_panic(&t);
}
