//! The `offload` listener: the homeserver's outbound federation proxy.
//!
//! Synapse with `outbound_federation_restricted_to` sends every federation request,
//! already signed, as an absolute-form request (`PUT matrix-federation://<dest>/...`)
//! with `Proxy-Authorization: Bearer <secret>`. This module owns that door:
//! - the bearer check, in constant time (missing: 401, wrong: 403), before anything;
//! - a `/send` with only EDUs (or any `/send` with `[offload] custody = "all"`) is taken
//!   into custody for its destination and answered `200 {"pdus": {}}`;
//! - everything else is streamed to the destination, answer streamed back, never stored.
//!
//! It never signs and never changes a request it carries.

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::app::App;
use crate::error::ApiError;
use crate::ids::ServerName;
use crate::offload::{forward, hold, request_target, send_txn_id, takes_custody};
use crate::store::custody::Dir;

/// The URI scheme Synapse uses for requests to its federation proxy.
pub const SCHEME: &str = "matrix-federation";

/// The whole listener: one handler for every request.
pub fn router() -> Router<App> {
    Router::new().fallback(handle)
}

async fn handle(State(app): State<App>, req: Request) -> Response {
    match route(app, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// Checks `Proxy-Authorization: Bearer <secret>` against `[offload] secret`.
fn check_bearer(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = &app.config.offload.secret else {
        return Err(ApiError::forbidden("offload is off: no [offload] secret"));
    };
    let mut values = headers.get_all(header::PROXY_AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "M_MISSING_TOKEN",
            "exactly one Proxy-Authorization: Bearer header is needed",
        ));
    };
    let given = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if crate::client::admin::token_matches(given, expected) {
        Ok(())
    } else {
        metrics::counter!("courier_offload_refused_total").increment(1);
        Err(ApiError::forbidden("wrong Proxy-Authorization secret"))
    }
}

async fn route(app: App, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    check_bearer(&app, &parts.headers)?;
    let uri = &parts.uri;
    if uri.scheme_str() != Some(SCHEME) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "M_UNRECOGNIZED",
            "this listener takes matrix-federation:// requests from a homeserver only",
        ));
    }
    let dest = uri
        .authority()
        .and_then(|a| ServerName::parse(a.as_str()).ok())
        .ok_or_else(|| ApiError::invalid_param("the request names no valid destination"))?;
    let path = request_target(uri);
    let txn_id = (parts.method == Method::PUT)
        .then(|| send_txn_id(uri.path()))
        .flatten();
    let Some(txn_id) = txn_id else {
        let stream = reqwest::Body::wrap_stream(body.into_data_stream());
        return Ok(pass_through(&app, &dest, parts.method, &path, &parts.headers, stream).await);
    };
    let limit = app.config.federation.max_request_bytes;
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::too_large(format!("transaction over {limit} bytes")))?;
    if !takes_custody(app.config.offload.custody, &bytes) {
        return Ok(pass_through(
            &app,
            &dest,
            parts.method,
            &path,
            &parts.headers,
            reqwest::Body::from(bytes),
        )
        .await);
    }
    hold(
        &app,
        Dir::Out,
        dest.as_str(),
        &txn_id,
        &path,
        &parts.headers,
        bytes,
    )
    .await?;
    Ok(axum::Json(json!({"pdus": {}})).into_response())
}

/// Streams a request to `dest` and its answer back; 502 if it cannot be reached.
async fn pass_through(
    app: &App,
    dest: &ServerName,
    method: Method,
    path: &str,
    headers: &HeaderMap,
    body: reqwest::Body,
) -> Response {
    metrics::counter!("courier_offload_passthrough_total", "direction" => "out").increment(1);
    match app
        .federation
        .forward(
            dest,
            method.clone(),
            path,
            forward::end_to_end(headers),
            body,
            Some(app.config.offload.passthrough_timeout),
        )
        .await
    {
        Ok(resp) => {
            tracing::debug!(destination = %dest, %method, path, status = resp.status().as_u16(), "passed through");
            forward::relay_response(resp)
        }
        Err(e) => {
            tracing::info!(destination = %dest, %method, path, error = %e, "pass-through failed");
            forward::bad_gateway(e)
        }
    }
}
