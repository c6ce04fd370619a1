//! The `edge` listener: inbound federation transactions for the homeserver.
//!
//! The homeserver's reverse proxy routes `/_matrix/federation/v1/send/` of its name
//! here. This module owns that door: the X-Matrix signature is verified against the
//! origin's published keys (addressed to `[offload] homeserver_name`, else 401), then
//! an EDU-only transaction is taken into custody for replay to the homeserver and
//! answered `200 {"pdus": {}}`; one with PDUs is passed through synchronously (unless
//! `custody = "all"`). Other federation requests that reach this listener are streamed
//! to the homeserver unchanged, so courier can also stand in for the reverse proxy;
//! a target with `.`/`..` segments or backslashes is refused (400 `M_INVALID_PARAM`),
//! because the HTTP client would resolve it to a path outside `/_matrix/federation/`.
//!
//! It never changes what it carries and never delivers to courier's own devices.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, Method, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::put;
use serde_json::json;

use crate::app::App;
use crate::error::{ApiError, matrix};
use crate::federation::routes::{path_param, same_origin, signed_json, transaction_body};
use crate::offload::{forward, hold, plain_target, request_target, takes_custody};
use crate::store::custody::Dir;

pub fn router() -> Router<App> {
    Router::new()
        // A wrong method on /send answers here, as the homeserver itself would
        // (405 M_UNRECOGNIZED), not through the pass-through.
        .route("/_matrix/federation/v1/send/{txn_id}", matrix(put(send)))
        .fallback(pass_through)
}

/// `PUT /_matrix/federation/v1/send/{txnId}` addressed to the homeserver.
async fn send(
    State(app): State<App>,
    txn_id: Result<Path<String>, axum::extract::rejection::PathRejection>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    if !plain_target(&request_target(&uri)) {
        return Err(not_plain());
    }
    let txn_id = path_param(txn_id)?;
    let body = transaction_body(body)?;
    let Some(hs_name) = &app.config.offload.homeserver_name else {
        return Err(ApiError::internal(
            "edge listener without [offload] homeserver_name",
        ));
    };
    let (content, origin) =
        signed_json(&app, hs_name.as_str(), &method, &uri, &headers, &body).await?;
    same_origin(&content, &origin)?;
    let path = request_target(&uri);
    if !takes_custody(app.config.offload.custody, &body) {
        return Ok(to_homeserver(&app, method, &path, &headers, reqwest::Body::from(body)).await);
    }
    hold(
        &app,
        Dir::In,
        origin.as_str(),
        &txn_id,
        &path,
        &headers,
        body,
    )
    .await?;
    Ok(axum::Json(json!({"pdus": {}})).into_response())
}

/// A target that would not reach the homeserver as it reads (see [`plain_target`]).
fn not_plain() -> ApiError {
    ApiError::invalid_param(
        "request paths with `.` or `..` segments or backslashes are not passed on",
    )
}

/// Any other request: federation and key requests go to the homeserver unchanged.
async fn pass_through(State(app): State<App>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let path = request_target(&parts.uri);
    if !(path.starts_with("/_matrix/federation/") || path.starts_with("/_matrix/key/")) {
        return ApiError::unrecognized().into_response();
    }
    if !plain_target(&path) {
        return not_plain().into_response();
    }
    let stream = reqwest::Body::wrap_stream(body.into_data_stream());
    to_homeserver(&app, parts.method, &path, &parts.headers, stream).await
}

async fn to_homeserver(
    app: &App,
    method: Method,
    path: &str,
    headers: &HeaderMap,
    body: reqwest::Body,
) -> Response {
    let Some(hs) = app.relay.homeserver() else {
        return ApiError::internal("edge listener without [offload] homeserver_url")
            .into_response();
    };
    metrics::counter!("courier_offload_passthrough_total", "direction" => "in").increment(1);
    match hs
        .send(
            method.clone(),
            path,
            forward::end_to_end(headers),
            body,
            app.config.offload.passthrough_timeout,
        )
        .await
    {
        Ok(resp) => forward::relay_response(resp),
        Err(e) => {
            let error = crate::error::chain(&e);
            tracing::info!(homeserver = hs.base(), %method, path, error, "pass-through to the homeserver failed");
            forward::bad_gateway(error)
        }
    }
}
