//! The outbound federation HTTP client: discovery, TLS, X-Matrix signing, timeouts.
//!
//! Owns the one `reqwest::Client` courier uses to talk to other servers (its pool gives
//! connection reuse) and the signing of every request with our key. It never decides
//! what to do with an answer (retry, backoff, parking): that is the sender's job.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::StatusCode;
use serde_json::Value;

use crate::federation::discovery::{Discovery, DiscoveryError};
use crate::ids::ServerName;
use crate::signing::{self, SigningKey};

/// What came back from a peer.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    #[error("signing the request failed: {0}")]
    Sign(String),
    #[error("timed out")]
    Timeout,
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("request failed: {0}")]
    Other(String),
}

impl RequestError {
    pub fn from_reqwest(e: reqwest::Error) -> Self {
        if e.is_timeout() {
            RequestError::Timeout
        } else if e.is_connect() {
            RequestError::Connect(crate::error::chain(&e))
        } else {
            RequestError::Other(crate::error::chain(&e))
        }
    }
}

/// Signs and sends federation requests.
pub struct FederationClient {
    origin: ServerName,
    key: Arc<SigningKey>,
    discovery: Discovery,
    http: reqwest::Client,
    max_response_bytes: usize,
}

impl FederationClient {
    pub fn new(
        origin: ServerName,
        key: Arc<SigningKey>,
        config: &crate::config::Federation,
    ) -> Result<Self, reqwest::Error> {
        let mut discovery =
            Discovery::new(config.overrides.clone(), config.allow_private_destinations);
        let build = |timeout: Duration| {
            reqwest::Client::builder()
                .dns_resolver(discovery.resolver())
                .tls_danger_accept_invalid_certs(!config.verify_certificates)
                .http1_only()
                .connect_timeout(Duration::from_secs(10).min(timeout))
                .timeout(timeout)
                .pool_idle_timeout(Duration::from_secs(90))
                .pool_max_idle_per_host(4)
                .redirect(reqwest::redirect::Policy::limited(3))
                .user_agent(concat!("courier/", env!("CARGO_PKG_VERSION")))
                .build()
        };
        let http = build(config.request_timeout)?;
        discovery.set_http(build(Duration::from_secs(15))?);
        Ok(FederationClient {
            origin,
            key,
            discovery,
            http,
            max_response_bytes: 16 * 1024 * 1024,
        })
    }

    pub fn origin(&self) -> &ServerName {
        &self.origin
    }

    /// Sends an X-Matrix-signed request. `path` is the request target, starting
    /// at `/_matrix/` and including any query string.
    pub async fn request(
        &self,
        destination: &ServerName,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Reply, RequestError> {
        let header = self.sign(destination, &method, path, body)?;
        let body = body.map(|b| Bytes::from(serde_json::to_vec(b).expect("a Value serializes")));
        self.request_signed(destination, method, path, body, header)
            .await
    }

    /// The `Authorization: X-Matrix` header for a request (see [`Self::request`]).
    pub fn sign(
        &self,
        destination: &ServerName,
        method: &reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<String, RequestError> {
        signing::xmatrix::sign_request(
            method.as_str(),
            path,
            self.origin.as_str(),
            destination.as_str(),
            body,
            &self.key,
            signing::canonical::NumberMode::Python,
        )
        .map_err(|e| RequestError::Sign(e.to_string()))
    }

    /// The body and `Authorization: X-Matrix` header of a request whose body
    /// `write` appends as canonical JSON, written once for both (see
    /// [`signing::xmatrix::sign_request_writing`]); send them with
    /// [`Self::request_signed`].
    pub fn sign_writing(
        &self,
        destination: &ServerName,
        method: &reqwest::Method,
        path: &str,
        size_hint: usize,
        write: impl FnOnce(&mut String) -> Result<(), signing::canonical::CanonicalError>,
    ) -> Result<(Bytes, String), RequestError> {
        signing::xmatrix::sign_request_writing(
            method.as_str(),
            path,
            self.origin.as_str(),
            destination.as_str(),
            &self.key,
            size_hint,
            write,
        )
        .map_err(|e| RequestError::Sign(e.to_string()))
    }

    /// Sends a request signed beforehand ([`Self::sign`], [`Self::sign_writing`]);
    /// `body` is the serialized JSON the signature covers.
    pub async fn request_signed(
        &self,
        destination: &ServerName,
        method: reqwest::Method,
        path: &str,
        body: Option<Bytes>,
        header: String,
    ) -> Result<Reply, RequestError> {
        self.send(destination, method, path, body, Some(header))
            .await
    }

    /// Sends a request someone else prepared (offload mode): no signature of ours,
    /// `headers` and `body` exactly as given, `Host` and TLS name from discovery.
    /// Returns the response with its body unread, for streaming.
    pub async fn forward(
        &self,
        destination: &ServerName,
        method: reqwest::Method,
        path: &str,
        headers: reqwest::header::HeaderMap,
        body: reqwest::Body,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, RequestError> {
        let ep = self.discovery.resolve(destination).await?;
        let url = format!("https://{}{}", ep.authority, path);
        let mut req = self.http.request(method, &url).headers(headers).body(body);
        if let Some(h) = &ep.host_header {
            req = req.header(reqwest::header::HOST, h);
        }
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        req.send().await.map_err(RequestError::from_reqwest)
    }

    /// Sends an unsigned request (key fetches).
    pub async fn get_unsigned(
        &self,
        destination: &ServerName,
        path: &str,
    ) -> Result<Reply, RequestError> {
        self.send(destination, reqwest::Method::GET, path, None, None)
            .await
    }

    async fn send(
        &self,
        destination: &ServerName,
        method: reqwest::Method,
        path: &str,
        body: Option<Bytes>,
        auth: Option<String>,
    ) -> Result<Reply, RequestError> {
        let ep = self.discovery.resolve(destination).await?;
        let url = format!("https://{}{}", ep.authority, path);
        let mut req = self.http.request(method, &url);
        if let Some(h) = &ep.host_header {
            req = req.header(reqwest::header::HOST, h);
        }
        if let Some(a) = auth {
            req = req.header(reqwest::header::AUTHORIZATION, a);
        }
        if let Some(b) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(b);
        }
        let mut resp = req.send().await.map_err(RequestError::from_reqwest)?;
        let status = resp.status();
        let mut buf = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(RequestError::from_reqwest)? {
            if buf.len() + chunk.len() > self.max_response_bytes {
                return Err(RequestError::Other("response too large".into()));
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(Reply {
            status,
            body: Bytes::from(buf),
        })
    }
}
