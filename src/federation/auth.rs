//! Authenticating inbound federation requests (X-Matrix).
//!
//! Owns the receiver's half of request signing: parse every `Authorization: X-Matrix`
//! header, refuse a `destination` that is not us (401, as the spec requires), fetch the
//! origin's key through `RemoteKeys`, and verify. Non-integral numbers are checked in
//! the form Synapse signs them (Python's float repr), so real traffic verifies.
//! A success also tells the sender that the origin is up (its backoff is reset).
//! It never reads a body beyond what it is given, and never stores anything itself.

use axum::http::{HeaderMap, Method, Uri};

use crate::app::App;
use crate::error::ApiError;
use crate::ids::ServerName;
use crate::signing::{canonical::NumberMode, xmatrix};

/// Checks the request's X-Matrix signature; returns the authenticated origin.
pub async fn authenticate(
    app: &App,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    content: Option<xmatrix::Body<'_>>,
) -> Result<ServerName, ApiError> {
    let ours = app.config.server_name.as_str();
    authenticate_for(app, ours, method, uri, headers, content).await
}

/// As [`authenticate`], for a request addressed to `ours` (offload mode's edge checks
/// transactions addressed to the homeserver it stands in front of).
pub async fn authenticate_for(
    app: &App,
    ours: &str,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    content: Option<xmatrix::Body<'_>>,
) -> Result<ServerName, ApiError> {
    let path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or_else(|| uri.path());
    let mut last_err = ApiError::unauthorized("missing X-Matrix Authorization header");
    for value in headers.get_all(axum::http::header::AUTHORIZATION) {
        let Ok(text) = value.to_str() else {
            last_err = ApiError::unauthorized("Authorization header is not ASCII");
            continue;
        };
        if !text
            .trim_start()
            .to_ascii_lowercase()
            .starts_with("x-matrix")
        {
            continue;
        }
        let x = match xmatrix::parse(text) {
            Ok(x) => x,
            Err(e) => {
                last_err = ApiError::new(
                    axum::http::StatusCode::BAD_REQUEST,
                    "M_UNAUTHORIZED",
                    format!("malformed X-Matrix header: {e}"),
                );
                continue;
            }
        };
        if let Some(d) = &x.destination
            && d != ours
        {
            return Err(ApiError::unauthorized(format!(
                "request is for {d}, this server is {ours}"
            )));
        }
        let origin = ServerName::parse(&x.origin)
            .map_err(|_| ApiError::unauthorized("origin is not a server name"))?;
        let key = match app.remote_keys.get(&origin, &x.key).await {
            Ok(k) => k,
            Err(e) => {
                tracing::info!(origin = %origin, key = %x.key, error = %e, "no usable key for request");
                last_err = ApiError::unauthorized(format!("no usable key {} for {origin}", x.key));
                continue;
            }
        };
        match xmatrix::verify_request_body(
            &x,
            method.as_str(),
            path,
            ours,
            content,
            &key,
            NumberMode::Python,
        ) {
            Ok(()) => {
                app.sender.peer_is_up(origin.as_str());
                app.relay.peer_is_up(origin.as_str());
                return Ok(origin);
            }
            Err(e) => {
                tracing::info!(origin = %origin, error = %e, "X-Matrix signature refused");
                last_err = ApiError::unauthorized(format!("signature check failed: {e}"));
            }
        }
    }
    Err(last_err)
}
