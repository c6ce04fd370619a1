//! Starting and stopping courier: open what it owns, bind its listeners, drain on stop.
//!
//! Owns the start-up order (signing key, TLS material, store, app, listeners) and
//! graceful shutdown: on the shutdown signal listeners stop accepting, in-flight
//! requests get a bounded time to finish, then the process exits. It never handles a
//! request itself.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::any;
use axum_server::Handle;
use axum_server::accept::NoDelayAcceptor;
use axum_server::tls_rustls::RustlsConfig;

use crate::app::App;
use crate::config::{Config, Resource};
use crate::signing::{self, SigningKey};
use crate::store::{Store, StoreOptions};

/// How long in-flight requests may run after the shutdown signal.
const DRAIN: Duration = Duration::from_secs(10);

/// Connections the kernel completes and queues for a listener before courier
/// accepts them (capped by `net.core.somaxconn`). The standard library's 128 was
/// too few for a burst: with 256 clients connecting at once (`courier bench
/// --concurrency 256`) the queue overflowed, the kernel dropped the SYNs, and those
/// clients waited for TCP's 1-second retransmission (the 1.0-1.2 s maximum latency
/// of every such run). The same happens when many devices reconnect at once.
pub const LISTEN_BACKLOG: i32 = 1024;

/// A non-blocking listener on `addr` with [`LISTEN_BACKLOG`], and `SO_REUSEADDR`
/// as the standard library sets it (a restart binds while old connections linger
/// in `TIME_WAIT`).
pub fn listen(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Loads the signing key at `config.signing_key`, generating it on first start.
pub fn load_or_generate_key(config: &Config) -> anyhow::Result<SigningKey> {
    let path = &config.signing_key;
    if path.exists() {
        return signing::keyfile::read(path)
            .with_context(|| format!("reading signing key {}", path.display()));
    }
    let key = SigningKey::generate(&signing::keyfile::new_key_version())?;
    signing::keyfile::write_new(path, &key)
        .with_context(|| format!("writing signing key {}", path.display()))?;
    tracing::info!(path = %path.display(), key_id = %key.key_id(), "generated a new signing key");
    Ok(key)
}

/// Opens everything and returns the app, ready to serve.
pub fn open(config: Config) -> anyhow::Result<App> {
    crate::tls::install_crypto_provider();
    crate::telemetry::install();
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data_dir {}", config.data_dir.display()))?;
    let key = load_or_generate_key(&config)?;
    let store = Store::open(
        &config.data_dir.join("db"),
        &StoreOptions {
            dedupe_ttl: config.federation.dedupe_ttl,
        },
    )
    .with_context(|| format!("opening the store in {}", config.data_dir.display()))?;
    let app = App::new(config, store, key).context("building the federation client")?;
    Ok(app)
}

/// The router of one listener.
pub fn router(app: &App, resources: &[Resource]) -> Service {
    if resources.contains(&Resource::Offload) {
        // Absolute-form requests for other servers: one handler takes them all.
        let proxy = crate::offload::proxy::router()
            .layer(axum::middleware::from_fn_with_state(
                app.config.federation.max_request_bytes,
                refuse_announced_over,
            ))
            .with_state(app.clone());
        return listener_service(proxy, false);
    }
    let mut r: Router<App> = Router::new();
    for res in resources {
        r = match res {
            Resource::Federation => r.merge(
                crate::federation::routes::router()
                    .layer(DefaultBodyLimit::max(
                        app.config.federation.max_request_bytes,
                    ))
                    .layer(axum::middleware::from_fn_with_state(
                        app.config.federation.max_request_bytes,
                        refuse_announced_over,
                    )),
            ),
            Resource::Client => r.merge(crate::client::router().layer(
                axum::middleware::from_fn_with_state(
                    app.config.client.max_request_bytes,
                    refuse_announced_over,
                ),
            )),
            Resource::Admin => r
                .merge(crate::client::admin::router())
                .merge(crate::federation::admin::router())
                .merge(crate::offload::admin::router())
                .merge(crate::telemetry::router()),
            Resource::Edge => r.merge(
                crate::offload::edge::router()
                    .layer(DefaultBodyLimit::max(
                        app.config.federation.max_request_bytes,
                    ))
                    .layer(axum::middleware::from_fn_with_state(
                        app.config.federation.max_request_bytes,
                        refuse_announced_over,
                    )),
            ),
            Resource::Offload => r,
        };
    }
    if !resources.contains(&Resource::Edge) {
        // The edge passes unknown federation requests to the homeserver instead.
        r = r.route("/_matrix/{*rest}", any(crate::error::unrecognized));
    }
    let web_clients = resources.contains(&Resource::Client);
    listener_service(r.with_state(app.clone()), web_clients)
}

type WithDeadline = tower_http::timeout::RequestBodyDeadline<Router>;

/// The service of one listener: its router behind the deadline for reading a body,
/// and for a listener with the `client` resource the CORS layer web clients need
/// (`client::cors`; every answer of that listener then carries its headers).
pub type Service = tower::util::Either<tower_http::cors::Cors<WithDeadline>, WithDeadline>;

/// Puts the layers in front of the whole router, once, rather than through
/// `Router::layer`, which wraps every route in them: each layer wrapped that way is
/// one more boxed service that axum clones, and one more boxed future, for every
/// request.
fn listener_service(router: Router, web_clients: bool) -> Service {
    use tower_layer::Layer;
    let inner = tower_http::timeout::RequestBodyDeadlineLayer::new(BODY_READ_TIMEOUT).layer(router);
    tower::util::option_layer(web_clients.then(crate::client::cors)).layer(inner)
}

/// Serves every configured listener until `shutdown` completes.
pub async fn run(app: App, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let handle: Handle<SocketAddr> = Handle::new();
    let mut tasks = tokio::task::JoinSet::new();
    for listener in &app.config.listeners {
        let router = router(&app, &listener.resources);
        let addr = listener.address;
        let service = axum::ServiceExt::<axum::extract::Request>::into_make_service(router);
        if listener.tls {
            let (cert, key) = crate::tls::cert_paths(&app.config, listener);
            if listener.tls_cert.is_none() {
                let names = vec![
                    app.config
                        .server_name
                        .host()
                        .trim_matches(['[', ']'])
                        .to_owned(),
                    "localhost".to_owned(),
                    "127.0.0.1".to_owned(),
                ];
                if crate::tls::ensure_self_signed(&app.config.data_dir, &names)? {
                    tracing::warn!(cert = %cert.display(), "generated a self-signed TLS certificate; peers must be told to accept it");
                }
            }
            let tls = RustlsConfig::from_config(crate::tls::server_config(&cert, &key)?);
            let std_listener = listen(addr).with_context(|| format!("binding {addr}"))?;
            tracing::info!(%addr, tls = true, resources = ?listener.resources, "listening");
            let mut server = axum_server::from_tcp_rustls(std_listener, tls)?
                .map(|tls| tls.acceptor(NoDelayAcceptor::new()))
                .handle(handle.clone());
            harden(server.http_builder());
            tasks.spawn(async move { server.serve(service).await });
        } else {
            let std_listener = listen(addr).with_context(|| format!("binding {addr}"))?;
            tracing::info!(%addr, tls = false, resources = ?listener.resources, "listening");
            let mut server = axum_server::from_tcp(std_listener)?
                .acceptor(NoDelayAcceptor::new())
                .handle(handle.clone());
            harden(server.http_builder());
            tasks.spawn(async move { server.serve(service).await });
        }
    }
    app.sender.start()?;
    app.relay.start()?;
    tokio::spawn(crate::client::housekeeping::run(app.clone()));
    tokio::spawn(crate::telemetry::upkeep());
    tracing::info!(server_name = %app.config.server_name, "courier is up");
    tokio::select! {
        _ = shutdown => {
            tracing::info!("shutting down: no new connections, draining in-flight requests");
            handle.graceful_shutdown(Some(DRAIN));
        }
        res = tasks.join_next() => {
            if let Some(Ok(Err(e))) = res {
                return Err(e).context("a listener failed");
            }
        }
    }
    while let Some(res) = tasks.join_next().await {
        if let Ok(Err(e)) = res {
            tracing::warn!(error = %e, "listener ended with an error");
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// A client that does not send its request headers within this time is dropped
/// (slow-loris); one that has not sent its whole body within `BODY_READ_TIMEOUT`
/// (a total deadline: dribbling one byte at a time does not extend it).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Refuses at once (413 `M_TOO_LARGE`) a request whose `Content-Length` announces
/// more than `limit` bytes, instead of waiting for a body it would refuse anyway.
async fn refuse_announced_over(
    axum::extract::State(limit): axum::extract::State<usize>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let announced = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit as u64) {
        return crate::error::ApiError::too_large(format!("request body over {limit} bytes"))
            .into_response();
    }
    next.run(req).await
}

/// Connection-level limits shared by every listener.
fn harden(builder: &mut hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>) {
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_concurrent_streams(256);
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

#[cfg(test)]
mod tests {
    use std::net::TcpStream;
    use std::time::Duration;

    use super::*;

    /// `net.core.somaxconn`, which caps every listener's queue (Linux only).
    fn somaxconn() -> Option<usize> {
        std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    #[test]
    fn a_listener_queues_a_burst_of_connections_nobody_has_accepted_yet() {
        const BURST: usize = 300;
        match somaxconn() {
            Some(n) if n > BURST => {}
            other => {
                eprintln!(
                    "skipped: net.core.somaxconn is {other:?}, which caps the queue below {BURST}"
                );
                return;
            }
        }
        let listener = listen(([127, 0, 0, 1], 0).into()).unwrap();
        let addr = listener.local_addr().unwrap();
        // Nothing accepts: the kernel completes each handshake and queues it, up to
        // the backlog. Past it the kernel drops the SYN, and connect waits for
        // retransmissions nobody will answer (with the standard library's 128, the
        // 130th connection timed out here).
        let conns: Vec<TcpStream> = (0..BURST)
            .map(|i| {
                TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                    .unwrap_or_else(|e| panic!("connection {i} of the burst: {e}"))
            })
            .collect();
        assert_eq!(conns.len(), BURST);
    }

    #[test]
    fn a_port_in_use_is_refused_not_shared() {
        let first = listen(([127, 0, 0, 1], 0).into()).unwrap();
        let addr = first.local_addr().unwrap();
        // SO_REUSEADDR lets a restart bind past TIME_WAIT; it must not let a second
        // server take the same port (that would be SO_REUSEPORT).
        let err = listen(addr).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
    }
}
