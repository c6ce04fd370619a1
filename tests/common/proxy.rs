//! Faulty networks and fake peers for tests: a TCP proxy whose behaviour can be
//! switched at run time, a fake TLS federation server that answers with HTTP errors or
//! loses answers, and a fake origin server (a key server plus a request signer) for
//! hand-made, hostile transactions.
//!
//! TLS runs end to end through [`Proxy`], so it can only break, slow or silence the
//! byte stream ([`Fault`]). HTTP-level failures (500, 502, 429, an answer lost after
//! the receiver committed) come from [`FakeServer`]: the proxy diverts connections to
//! it with [`Fault::Divert`], and it either answers by itself or forwards the request
//! to the real receiver ([`HttpFault`]).
//!
//! Switching the fault closes every connection the proxy holds, so a client's pooled
//! keep-alive connections cannot outlive the switch: the next request meets the new
//! behaviour.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

// ---------------------------------------------------------------------------
// The TCP proxy
// ---------------------------------------------------------------------------

/// What the proxy does with the connections it accepts.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Forward both ways, unchanged.
    Pass,
    /// Forward, but close both sides once this many bytes went from the client to
    /// the server on a connection: the request is cut in the middle.
    CutAfter(usize),
    /// Forward, holding every chunk this long first (both directions).
    Delay(Duration),
    /// Accept and reset at once (RST, through `SO_LINGER` 0).
    Reset,
    /// Accept, read and discard everything, never answer (until the next switch).
    BlackHole,
    /// Forward to this address instead of the target (a [`FakeServer`]).
    Divert(SocketAddr),
}

/// A TCP proxy on 127.0.0.1 in front of `target`; stops when dropped.
pub struct Proxy {
    pub port: u16,
    fault: watch::Sender<Fault>,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy to `target` (passing everything through).
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (fault, _) = watch::channel(Fault::Pass);
        let accepted = Arc::new(AtomicUsize::new(0));
        let (fault2, accepted2) = (fault.clone(), accepted.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                accepted2.fetch_add(1, Ordering::Relaxed);
                let rx = fault2.subscribe();
                tokio::spawn(connection(client, target, rx));
            }
        });
        Proxy {
            port,
            fault,
            accepted,
            task,
        }
    }

    /// `127.0.0.1:port`, for `[federation.overrides]`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Switches the behaviour; every open connection is closed.
    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }

    pub fn fault(&self) -> Fault {
        self.fault.borrow().clone()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        // Live connections end at the switch.
        self.fault.send_replace(Fault::Reset);
    }
}

/// How one direction of a forwarded connection ended.
enum End {
    /// The reader reached EOF; the writer was shut down (half-close).
    Eof,
    /// The fault ends the whole connection now.
    Cut,
}

async fn connection(client: TcpStream, target: SocketAddr, mut rx: watch::Receiver<Fault>) {
    let fault = rx.borrow_and_update().clone();
    let upstream = match &fault {
        Fault::Reset => {
            reset(client);
            return;
        }
        Fault::BlackHole => {
            let mut client = client;
            let mut buf = [0u8; 4096];
            loop {
                tokio::select! {
                    r = client.read(&mut buf) => if matches!(r, Ok(0) | Err(_)) { return },
                    _ = rx.changed() => return,
                }
            }
        }
        Fault::Divert(addr) => *addr,
        _ => target,
    };
    let Ok(server) = TcpStream::connect(upstream).await else {
        reset(client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let sent = AtomicUsize::new(0);
    let up = pump(&mut cr, &mut sw, &fault, Some(&sent));
    let down = pump(&mut sr, &mut cw, &fault, None);
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        tokio::select! {
            e = &mut up, if !up_done => match e {
                End::Eof => up_done = true,
                End::Cut => break,
            },
            e = &mut down, if !down_done => match e {
                End::Eof => down_done = true,
                End::Cut => break,
            },
            _ = rx.changed() => break,
        }
    }
}

/// Copies `from` to `to` under `fault`; `sent` counts the bytes of the client's side.
async fn pump<R, W>(from: &mut R, to: &mut W, fault: &Fault, sent: Option<&AtomicUsize>) -> End
where
    R: AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return End::Eof;
            }
            Ok(n) => n,
        };
        let mut chunk = &buf[..n];
        match fault {
            Fault::Delay(d) => tokio::time::sleep(*d).await,
            Fault::CutAfter(limit) => {
                if let Some(sent) = sent {
                    let before = sent.fetch_add(n, Ordering::Relaxed);
                    if before + n > *limit {
                        chunk = &chunk[..limit.saturating_sub(before)];
                        let _ = to.write_all(chunk).await;
                        return End::Cut;
                    }
                }
            }
            _ => {}
        }
        if to.write_all(chunk).await.is_err() {
            return End::Cut;
        }
    }
}

/// Drops `stream` with an RST instead of a FIN.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

// ---------------------------------------------------------------------------
// HTTP-level faults
// ---------------------------------------------------------------------------

/// What [`FakeServer`] does with each request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpFault {
    /// Forward it to the real server and relay the answer.
    Forward,
    /// Answer with this status (e.g. 500, 502, 429) without forwarding.
    Status(u16),
    /// Forward it, wait for the real answer, then break the connection instead of
    /// relaying it: the receiver committed, the sender never hears so.
    LoseResponse,
}

/// What [`FakeServer`] did so far.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FakeStats {
    pub forwarded: usize,
    /// Answers given by the fake itself, by status.
    pub answered: std::collections::BTreeMap<u16, usize>,
    /// Requests the real server answered but whose answer was thrown away.
    pub lost: usize,
}

/// A TLS server (self-signed) that stands in for a federation receiver at HTTP level.
pub struct FakeServer {
    pub addr: SocketAddr,
    mode: Arc<Mutex<HttpFault>>,
    stats: Arc<Mutex<FakeStats>>,
    handle: axum_server::Handle<SocketAddr>,
}

impl FakeServer {
    /// Starts a fake in front of `upstream` (`https://127.0.0.1:port`), forwarding.
    pub async fn start(upstream: String) -> FakeServer {
        let mode = Arc::new(Mutex::new(HttpFault::Forward));
        let stats: Arc<Mutex<FakeStats>> = Arc::default();
        let http = reqwest::Client::builder()
            .tls_danger_accept_invalid_certs(true)
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let (mode2, stats2) = (mode.clone(), stats.clone());
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let (mode, stats, http, upstream) = (
                    mode2.clone(),
                    stats2.clone(),
                    http.clone(),
                    upstream.clone(),
                );
                async move {
                    let fault = *mode.lock().unwrap();
                    if let HttpFault::Status(s) = fault {
                        *stats.lock().unwrap().answered.entry(s).or_default() += 1;
                        return status_reply(s, Body::from(r#"{"errcode":"M_UNKNOWN"}"#));
                    }
                    let mut req = http.request(method, format!("{upstream}{uri}"));
                    for (name, value) in &headers {
                        if name != "host" && name != "content-length" {
                            req = req.header(name, value);
                        }
                    }
                    let reply = match req.body(body).send().await {
                        Ok(r) => r,
                        Err(_) => return status_reply(502, Body::empty()),
                    };
                    let status = reply.status().as_u16();
                    let bytes = reply.bytes().await.unwrap_or_default();
                    if fault == HttpFault::LoseResponse {
                        stats.lock().unwrap().lost += 1;
                        // Headers go out, then the body fails: the connection breaks.
                        let broken = futures::stream::once(async {
                            Err::<Bytes, std::io::Error>(std::io::Error::other("lost"))
                        });
                        return status_reply(200, Body::from_stream(broken));
                    }
                    stats.lock().unwrap().forwarded += 1;
                    status_reply(status, Body::from(bytes))
                }
            },
        );
        let (addr, handle) = serve_tls(app).await;
        FakeServer {
            addr,
            mode,
            stats,
            handle,
        }
    }

    pub fn set(&self, fault: HttpFault) {
        *self.mode.lock().unwrap() = fault;
    }

    pub fn stats(&self) -> FakeStats {
        self.stats.lock().unwrap().clone()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.handle.shutdown();
    }
}

fn status_reply(status: u16, body: Body) -> axum::response::Response {
    axum::response::Response::builder()
        .status(StatusCode::from_u16(status).unwrap())
        .header("content-type", "application/json")
        .body(body)
        .unwrap()
}

/// Serves `app` over TLS (a fresh self-signed certificate for 127.0.0.1) on a free
/// loopback port; stop it with the returned handle.
pub async fn serve_tls(app: axum::Router) -> (SocketAddr, axum_server::Handle<SocketAddr>) {
    courier::tls::install_crypto_provider();
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let tls = axum_server::tls_rustls::RustlsConfig::from_pem(
        ck.cert.pem().into_bytes(),
        ck.signing_key.serialize_pem().into_bytes(),
    )
    .await
    .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = axum_server::Handle::new();
    let server = axum_server::from_tcp_rustls(listener, tls)
        .unwrap()
        .handle(handle.clone());
    tokio::spawn(server.serve(app.into_make_service()));
    (addr, handle)
}

// ---------------------------------------------------------------------------
// Fake origins
// ---------------------------------------------------------------------------

/// Signs federation requests as `origin` with `key`.
pub struct Signer {
    pub origin: String,
    pub key: courier::signing::SigningKey,
}

impl Signer {
    /// Signs as courier `c`, with its own key file.
    pub fn of(c: &super::Courier) -> Signer {
        Signer {
            origin: c.server_name.clone(),
            key: courier::signing::keyfile::read(c.dir.path().join("keys/signing.key")).unwrap(),
        }
    }

    /// The `Authorization` header for a request to `dest`.
    pub fn header(
        &self,
        method: &str,
        uri: &str,
        dest: &str,
        body: Option<&serde_json::Value>,
    ) -> String {
        courier::signing::xmatrix::sign_request(
            method,
            uri,
            &self.origin,
            dest,
            body,
            &self.key,
            courier::signing::canonical::NumberMode::Python,
        )
        .unwrap()
    }

    /// `PUT /send/{txn}` of `body` to courier `to`: (status, JSON answer or null).
    pub async fn put_txn(
        &self,
        to: &super::Courier,
        txn: &str,
        body: &serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let uri = format!("/_matrix/federation/v1/send/{txn}");
        let r = super::insecure_client()
            .put(to.url(&uri))
            .header(
                "Authorization",
                self.header("PUT", &uri, &to.server_name, Some(body)),
            )
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }
}

/// A federation peer that is nothing but a key server: `127.0.0.1:port` publishes a
/// fresh key at `/_matrix/key/v2/server`, so couriers accept what [`Self::signer`]
/// signs. Cheaper than a whole courier as the origin of hand-made transactions.
/// [`Self::rotate`] publishes a new key and lists the old one under
/// `old_verify_keys`; [`Self::slow_keys`] delays the key server's answers.
pub struct FakeOrigin {
    pub name: String,
    key: Arc<Mutex<courier::signing::SigningKey>>,
    old: Arc<Mutex<Option<courier::signing::SigningKey>>>,
    delay: Arc<Mutex<Duration>>,
    handle: axum_server::Handle<SocketAddr>,
}

impl FakeOrigin {
    pub async fn start() -> FakeOrigin {
        let key = Arc::new(Mutex::new(
            courier::signing::SigningKey::generate("fake").unwrap(),
        ));
        let old: Arc<Mutex<Option<courier::signing::SigningKey>>> = Arc::default();
        let delay: Arc<Mutex<Duration>> = Arc::default();
        let name: Arc<Mutex<String>> = Arc::default();
        let (key2, old2, delay2, name2) = (key.clone(), old.clone(), delay.clone(), name.clone());
        let app = axum::Router::new().route(
            "/_matrix/key/v2/server",
            axum::routing::get(move || {
                let now = courier::store::now_ms();
                let name = name2.lock().unwrap().clone();
                let key = key2.lock().unwrap().clone();
                let mut body =
                    courier::federation::keys::our_server_keys(&name, &key, now + 24 * 3600 * 1000);
                if let Some(old) = old2.lock().unwrap().clone() {
                    let obj = body.as_object_mut().unwrap();
                    obj.remove("signatures");
                    obj.insert(
                        "old_verify_keys".into(),
                        serde_json::json!({ old.key_id(): {
                            "key": old.public_key_base64(), "expired_ts": now - 1000 }}),
                    );
                    courier::signing::sign_json(
                        obj,
                        &name,
                        &key,
                        courier::signing::canonical::NumberMode::Strict,
                    )
                    .unwrap();
                }
                let delay = *delay2.lock().unwrap();
                async move {
                    tokio::time::sleep(delay).await;
                    axum::Json(body)
                }
            }),
        );
        let (addr, handle) = serve_tls(app).await;
        let server_name = format!("127.0.0.1:{}", addr.port());
        *name.lock().unwrap() = server_name.clone();
        FakeOrigin {
            name: server_name,
            key,
            old,
            delay,
            handle,
        }
    }

    /// Signs with the key published now.
    pub fn signer(&self) -> Signer {
        Signer {
            origin: self.name.clone(),
            key: self.key.lock().unwrap().clone(),
        }
    }

    /// Publishes a new key; the current one moves to `old_verify_keys`.
    pub fn rotate(&self) {
        let fresh = courier::signing::SigningKey::generate("fresh").unwrap();
        let previous = std::mem::replace(&mut *self.key.lock().unwrap(), fresh);
        *self.old.lock().unwrap() = Some(previous);
    }

    /// The key server answers after `delay` from now on.
    pub fn slow_keys(&self, delay: Duration) {
        *self.delay.lock().unwrap() = delay;
    }
}

impl Drop for FakeOrigin {
    fn drop(&mut self) {
        self.handle.shutdown();
    }
}

// ---------------------------------------------------------------------------
// Recording receiver
// ---------------------------------------------------------------------------

/// One request a [`Recorder`] received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// Path and query, as received.
    pub target: String,
    pub authorization: Vec<String>,
    pub body: Bytes,
}

/// A TLS server that records every request and answers with a settable status and
/// body (200 `{"pdus": {}}` at first): a stand-in destination or homeserver.
pub struct Recorder {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Recorded>>>,
    answer: Arc<Mutex<(u16, String)>>,
    handle: axum_server::Handle<SocketAddr>,
}

impl Recorder {
    pub async fn start() -> Recorder {
        let seen: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let answer = Arc::new(Mutex::new((200u16, r#"{"pdus":{}}"#.to_owned())));
        let (seen2, answer2) = (seen.clone(), answer.clone());
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let (seen, answer) = (seen2.clone(), answer2.clone());
                async move {
                    seen.lock().unwrap().push(Recorded {
                        method: method.to_string(),
                        target: uri
                            .path_and_query()
                            .map(|p| p.as_str().to_owned())
                            .unwrap_or_default(),
                        authorization: headers
                            .get_all("authorization")
                            .iter()
                            .map(|v| v.to_str().unwrap().to_owned())
                            .collect(),
                        body,
                    });
                    let (status, text) = answer.lock().unwrap().clone();
                    status_reply(status, Body::from(text))
                }
            },
        );
        let (addr, handle) = serve_tls(app).await;
        Recorder {
            addr,
            seen,
            answer,
            handle,
        }
    }

    /// Answers every further request with `status` and `body`.
    pub fn answer(&self, status: u16, body: &str) {
        *self.answer.lock().unwrap() = (status, body.to_owned());
    }

    pub fn seen(&self) -> Vec<Recorded> {
        self.seen.lock().unwrap().clone()
    }

    /// How many requests arrived (whatever they were answered).
    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.handle.shutdown();
    }
}
