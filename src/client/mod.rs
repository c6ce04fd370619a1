//! The client-server surface of courier: what a Matrix client (or a bot, or a bridge)
//! calls to send and receive to-device messages, plus the admin API that creates the
//! accounts it signs in with.
//!
//! Routes mounted on listeners with the `client` resource ([`router`]):
//! - `GET /_matrix/client/versions` (no token);
//! - `GET /_matrix/client/v3/account/whoami` → `{user_id, device_id, is_guest}`;
//! - `GET /_matrix/client/v3/devices` → `{devices: [{device_id, last_seen_ts?}]}`;
//! - `PUT /_matrix/client/v3/sendToDevice/{eventType}/{txnId}` ([`send`]);
//! - `GET /_matrix/client/v3/sync` ([`sync`]): the device's to-device inbox only.
//!
//! The admin routes ([`admin::router`]) go on listeners with the `admin` resource, and
//! [`housekeeping::run`] is the background task that enforces the inbox policies.
//! Tokens are checked by [`auth`]. courier has no login, registration or rooms: accounts
//! come from the admin API (`courier user add`, `courier device add`).
//!
//! Handlers here parse, check and answer; what is durable is done by `store`, what goes
//! to other servers by `federation`. Nothing here may panic on input.

pub mod admin;
pub mod auth;
pub mod housekeeping;
pub mod json;
pub mod send;
pub mod sync;

use axum::extract::State;
use axum::routing::{get, put};
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::app::App;
use crate::error::{ApiError, matrix};
use auth::Device;

/// The CORS headers the spec recommends for web clients ("Web Browser Clients"), on
/// every answer of a listener that serves the client API (`server` puts the layer
/// in front of its whole router); an `OPTIONS` request (a browser's pre-flight) is
/// answered by the layer itself, so no endpoint logic runs for it.
pub fn cors() -> tower_http::cors::CorsLayer {
    use axum::http::{Method, header};
    tower_http::cors::CorsLayer::new()
        .allow_origin(tower_http::cors::Any)
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers([
            header::HeaderName::from_static("x-requested-with"),
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
        ])
}

/// The spec versions courier's client endpoints follow (it implements the subset a
/// to-device relay needs; everything else answers 404 `M_UNRECOGNIZED`).
pub const SPEC_VERSIONS: &[&str] = &[
    "v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6", "v1.7", "v1.8", "v1.9", "v1.10", "v1.11",
    "v1.12",
];

/// Routes mounted on listeners with the `client` resource.
pub fn router() -> Router<App> {
    Router::new()
        .route("/_matrix/client/versions", matrix(get(versions)))
        .route("/_matrix/client/v3/account/whoami", matrix(get(whoami)))
        .route("/_matrix/client/v3/devices", matrix(get(devices)))
        .route(
            "/_matrix/client/v3/sendToDevice/{event_type}/{txn_id}",
            matrix(put(send::send_to_device)),
        )
        .route("/_matrix/client/v3/sync", matrix(get(sync::sync)))
}

async fn versions() -> Json<Value> {
    Json(json!({"versions": SPEC_VERSIONS, "unstable_features": {}}))
}

async fn whoami(device: Device) -> Json<Value> {
    Json(json!({"user_id": device.user_id, "device_id": device.device_id, "is_guest": false}))
}

async fn devices(device: Device, State(app): State<App>) -> Result<Json<Value>, ApiError> {
    let devices: Vec<Value> = app
        .store
        .list_devices(&device.user_id)?
        .into_iter()
        .map(|d| match d.last_seen_ts {
            Some(ts) => json!({"device_id": d.device_id, "last_seen_ts": ts}),
            None => json!({"device_id": d.device_id}),
        })
        .collect();
    Ok(Json(json!({"devices": devices})))
}
