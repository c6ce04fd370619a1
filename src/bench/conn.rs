//! One client connection of the benchmark's measured traffic: HTTP/1.1 to one
//! server, over TLS when its base URL says `https`, requests one at a time, as one
//! device holds one connection. Senders and receivers each own one, so what the
//! benchmark itself costs per message is a request on an open connection, not a
//! general-purpose client's pool lookup, URL parse and header assembly.
//!
//! Owns: the connection (opened on first use, and again after a failure) and the
//! request's shape (method, path and query, the device's bearer token, a JSON body).
//! Certificates are not checked: the servers are the benchmark's own, on loopback,
//! with self-signed certificates. It never retries by itself (callers decide) and
//! never connects anywhere but the host and port of its base URL.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;

use super::node::Device;

/// A device's connection to its homeserver's client API.
pub struct Conn {
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    /// `host:port`, for connecting and for the `Host` header.
    authority: String,
    host: HeaderValue,
    bearer: HeaderValue,
    open: Option<SendRequest<Full<Bytes>>>,
}

/// An answer: its status and whole body.
pub struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Conn {
    /// A connection (not opened yet) to `base` (`http[s]://host:port`) for the device
    /// whose access token is `token`.
    pub fn new(base: &str, token: &str) -> Result<Conn, String> {
        let uri: http::Uri = base.parse().map_err(|e| format!("{base}: {e}"))?;
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{base}: no host"))?
            .as_str()
            .to_owned();
        let tls = match uri.scheme_str() {
            Some("https") => {
                let name = ServerName::try_from(uri.host().unwrap_or_default().to_owned())
                    .map_err(|e| format!("{base}: {e}"))?;
                Some((tokio_rustls::TlsConnector::from(client_config()), name))
            }
            Some("http") => None,
            _ => return Err(format!("{base}: not an http(s) URL")),
        };
        let header = |v: String| HeaderValue::from_str(&v).map_err(|e| format!("{base}: {e}"));
        Ok(Conn {
            tls,
            host: header(authority.clone())?,
            bearer: header(format!("Bearer {token}"))?,
            authority,
            open: None,
        })
    }

    /// The connection of `dev` to its homeserver.
    pub fn for_device(dev: &Device) -> Result<Conn, String> {
        Conn::new(&dev.base, &dev.token)
    }

    /// Sends one request and reads the whole answer, within `timeout`. After an
    /// error the connection is dropped; the next call opens a fresh one.
    pub async fn call(
        &mut self,
        method: Method,
        path_and_query: &str,
        body: Option<Bytes>,
        timeout: Duration,
    ) -> Result<Answer, String> {
        match tokio::time::timeout(timeout, self.exchange(method, path_and_query, body)).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => {
                self.open = None;
                Err(e)
            }
            Err(_) => {
                self.open = None;
                Err(format!("no answer within {timeout:?}"))
            }
        }
    }

    async fn exchange(
        &mut self,
        method: Method,
        path_and_query: &str,
        body: Option<Bytes>,
    ) -> Result<Answer, String> {
        let mut req = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(header::HOST, self.host.clone())
            .header(header::AUTHORIZATION, self.bearer.clone());
        if body.is_some() {
            req = req.header(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
        let req = req
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| e.to_string())?;
        let send = match &mut self.open {
            Some(s) if !s.is_closed() => s,
            _ => self.open.insert(self.connect().await?),
        };
        send.ready().await.map_err(|e| e.to_string())?;
        let res = send.send_request(req).await.map_err(|e| e.to_string())?;
        let status = res.status();
        let body = res
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(Answer { status, body })
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        let tcp = TcpStream::connect(&self.authority)
            .await
            .map_err(|e| format!("connecting to {}: {e}", self.authority))?;
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        let handshake_err = |e: hyper::Error| format!("HTTP/1.1 with {}: {e}", self.authority);
        match &self.tls {
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| format!("TLS with {}: {e}", self.authority))?;
                let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                    .await
                    .map_err(handshake_err)?;
                tokio::spawn(conn);
                Ok(send)
            }
            None => {
                let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                    .await
                    .map_err(handshake_err)?;
                tokio::spawn(conn);
                Ok(send)
            }
        }
    }
}

/// TLS for the benchmark's own loopback servers: HTTP/1.1, any certificate.
fn client_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            crate::tls::install_crypto_provider();
            let provider = rustls::crypto::CryptoProvider::get_default()
                .cloned()
                .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
            let mut cfg = rustls::ClientConfig::builder()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth();
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            Arc::new(cfg)
        })
        .clone()
}

/// Accepts any certificate, but still checks that the server holds its key.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
