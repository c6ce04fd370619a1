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

use common::matrix::{device, sync_until};
use common::proxy::{FakeOrigin, Signer};
use common::{Courier, free_port, insecure_client};
use courier::store::cf;
use futures::StreamExt;
use serde_json::{Value, json};

/// Guard against hanging; never reached when things work.
const GUARD: Duration = Duration::from_secs(90);

fn txn(origin: &str, edus: Vec<Value>) -> Value {
    json!({"origin": origin, "origin_server_ts": 1, "pdus": [], "edus": edus})
}

fn edu(sender: &str, mid: &str, to: &str, n: u64) -> Value {
    json!({"edu_type": "m.direct_to_device", "content": {
        "sender": sender, "type": "m.test", "message_id": mid,
        "messages": {to: {"*": {"n": n}}}}})
}

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
    let name = rustls_pki_types::ServerName::IpAddress(
        std::net::Ipv4Addr::LOCALHOST.into(),
    );
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
fn poll_peer(stream: &mut impl Read, sock: &TcpStream, wait: Duration) -> Option<Vec<u8>> {
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
        vec![edu(&alice, "big", &bob_id, 1), json!({"edu_type": "m.x", "content": {"pad": "y".repeat(100_000)}})],
    );
    let uri = "/_matrix/federation/v1/send/BIG";
    let http = insecure_client();

    // Federation, with a Content-Length: unsigned, then signed.
    let r = http.put(t.url(uri)).json(&big).send().await.unwrap();
    assert_eq!(answer(r).await, (413, Some("M_TOO_LARGE".into())));
    let r = http
        .put(t.url(uri))
        .header("Authorization", s.header("PUT", uri, &t.server_name, Some(&big)))
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

    // Chunked bodies (no length announced) and a length that lies: both endpoints.
    let host = format!("Host: {}\r\n", t.server_name);
    let fed = format!(
        "PUT {uri} HTTP/1.1\r\n{host}Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    let cli = format!(
        "PUT {send_uri} HTTP/1.1\r\n{host}Authorization: Bearer {bob}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    let liar = format!(
        "PUT {send_uri} HTTP/1.1\r\n{host}Authorization: Bearer {bob}\r\nContent-Length: 1000000000000\r\n\r\n{{}}"
    );
    let fed_liar = format!("PUT {uri} HTTP/1.1\r\n{host}Content-Length: 1000000000000\r\n\r\n{{}}");
    let to = Raw::of(&t);
    for (what, pieces) in [
        ("federation, chunked", chunked(&fed, 100_000)),
        ("client, chunked", chunked(&cli, 100_000)),
        ("client, lying length", vec![liar.into_bytes()]),
        ("federation, lying length", vec![fed_liar.into_bytes()]),
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
    assert!(sync_until(&t.base(), &bob, 1, Duration::from_secs(2)).await.is_empty());
    t.kill();
    assert_no_panic(&t);
    let store = t.open_store();
    assert_eq!(store.inbox_len(&bob_id, "BOB").unwrap(), 0);
    assert_eq!(store.count(cf::INBOUND_TXNS), 0);
    assert_eq!(store.count(cf::CLIENT_TXNS), 0);
}
