//! Passing requests through unchanged: header hygiene, streaming, the homeserver client.
//!
//! Owns which headers cross courier (end-to-end ones do; hop-by-hop ones, `Host` and
//! the proxy credentials never do), the streaming of bodies both ways, and the HTTP
//! client that reaches our own homeserver (`[offload] homeserver_url`). It never
//! stores anything and never signs: what it forwards was signed by someone else.

use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, header};
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// Headers meaningful to one connection only (RFC 9110 §7.6.1), plus those courier
/// sets itself or must never pass on.
const DROPPED: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
];

/// The headers a held transaction keeps for its replay (what Synapse's own proxy
/// forwards): the signature, the body's type, the sender's name.
pub const KEPT_FOR_REPLAY: &[HeaderName] = &[
    header::AUTHORIZATION,
    header::CONTENT_TYPE,
    header::USER_AGENT,
];

/// The end-to-end headers of `src` (also dropping any named by `Connection`).
pub fn end_to_end(src: &HeaderMap) -> HeaderMap {
    let named: Vec<String> = src
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::with_capacity(src.len());
    for (name, value) in src {
        let n = name.as_str();
        if DROPPED.contains(&n) || named.iter().any(|c| c == n) {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// The headers of `src` a held transaction keeps, as text pairs for the store.
pub fn kept_for_replay(src: &HeaderMap) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for name in KEPT_FOR_REPLAY {
        for v in src.get_all(name) {
            if let Ok(text) = v.to_str() {
                out.push((name.as_str().to_owned(), text.to_owned()));
            }
        }
    }
    out
}

/// Rebuilds a header map from stored pairs (skipping any that no longer parse).
pub fn from_pairs(pairs: &[(String, String)]) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (k, v) in pairs {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            out.append(k, v);
        }
    }
    out
}

/// Turns a far side's response into ours, body streamed as it arrives.
pub fn relay_response(resp: reqwest::Response) -> Response {
    let status = resp.status();
    let headers = end_to_end(resp.headers());
    let mut out = Response::new(Body::from_stream(resp.bytes_stream()));
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    out
}

/// The far side could not be reached: 502, as an HTTP proxy answers.
pub fn bad_gateway(what: impl std::fmt::Display) -> Response {
    ApiError::new(
        axum::http::StatusCode::BAD_GATEWAY,
        "M_UNKNOWN",
        format!("courier could not reach the server: {what}"),
    )
    .into_response()
}

/// Our homeserver's federation listener, as `[offload] homeserver_url` names it.
pub struct Homeserver {
    base: String,
    http: reqwest::Client,
}

impl Homeserver {
    pub fn new(url: &str, verify_certificates: bool) -> Result<Homeserver, reqwest::Error> {
        let http = reqwest::Client::builder()
            .tls_danger_accept_invalid_certs(!verify_certificates)
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(90))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Homeserver {
            base: url.trim_end_matches('/').to_owned(),
            http,
        })
    }

    /// Sends a request to the homeserver; `path` includes any query string.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: HeaderMap,
        body: reqwest::Body,
        timeout: Duration,
    ) -> Result<reqwest::Response, reqwest::Error> {
        self.http
            .request(method, format!("{}{}", self.base, path))
            .headers(headers)
            .body(body)
            .timeout(timeout)
            .send()
            .await
    }

    pub fn base(&self) -> &str {
        &self.base
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_proxy_headers_never_cross() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "X-Matrix origin=a".parse().unwrap());
        h.insert(header::PROXY_AUTHORIZATION, "Bearer s".parse().unwrap());
        h.insert(header::CONNECTION, "close, x-private".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert(header::HOST, "b.test".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        let out = end_to_end(&h);
        let names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["authorization", "content-type"]);
    }

    #[test]
    fn replay_headers_round_trip_all_values() {
        let mut h = HeaderMap::new();
        h.append(header::AUTHORIZATION, "X-Matrix one".parse().unwrap());
        h.append(header::AUTHORIZATION, "X-Matrix two".parse().unwrap());
        h.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        h.insert("x-other", "no".parse().unwrap());
        let pairs = kept_for_replay(&h);
        assert_eq!(pairs.len(), 3);
        let back = from_pairs(&pairs);
        assert_eq!(back.get_all(header::AUTHORIZATION).iter().count(), 2);
        assert!(back.get("x-other").is_none());
    }
}
