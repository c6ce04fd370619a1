//! The admin HTTP API, `/_courier/admin/v1/*`, mounted on listeners with the `admin`
//! resource: local users and their devices (and, through them, access tokens).
//!
//! | method and path                              | body / answer                                   |
//! |----------------------------------------------|-------------------------------------------------|
//! | `POST /users`                                | `{user_id}` → `{user_id, created}` (201 or 200) |
//! | `POST /devices`                              | `{user_id, device_id?}` → `{user_id, device_id, access_token}` |
//! | `GET /devices/{user_id}`                     | → `{user_id, devices: [{device_id, created_ts, last_seen_ts}]}` |
//! | `DELETE /devices/{user_id}/{device_id}`      | → `{}`; the device's token, pending inbox and txnIds go with it |
//!
//! `POST /devices` creates the user if needed; for an existing device it issues a new
//! token and revokes the old one. Users must be ours (server part = `server_name`),
//! else 400 `M_INVALID_PARAM`.
//!
//! Every route, unknown ones included, first checks `Authorization: Bearer` against
//! `[admin] token`, in constant time: no token configured is 403 `M_FORBIDDEN` ("admin
//! API disabled"), no bearer 401 `M_MISSING_TOKEN`, a wrong one 401 `M_UNKNOWN_TOKEN`.
//! To add a route, add a handler taking [`Admin`] as its first argument.
//!
//! This module never accepts a client access token, and never logs a token.

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{FromRequestParts, Path, State};
use axum::http::StatusCode;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::routing::{any, delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::app::App;
use crate::error::{ApiError, matrix};
use crate::ids::{UserId, valid_device_id};
use crate::store::accounts::new_device_id;

/// Where the admin API lives.
pub const PREFIX: &str = "/_courier/admin/v1";

/// Routes mounted on listeners with the `admin` resource.
pub fn router() -> Router<App> {
    Router::new()
        .route("/_courier/admin/v1/users", matrix(post(add_user)))
        .route("/_courier/admin/v1/devices", matrix(post(add_device)))
        .route(
            "/_courier/admin/v1/devices/{user_id}",
            matrix(get(list_devices)),
        )
        .route(
            "/_courier/admin/v1/devices/{user_id}/{device_id}",
            matrix(delete(delete_device)),
        )
        .route("/_courier/admin/{*rest}", any(unrecognized))
}

/// Proof that the request carries the admin token. Take it first in every handler.
pub struct Admin;

impl FromRequestParts<App> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, Self::Rejection> {
        let Some(expected) = &app.config.admin.token else {
            return Err(ApiError::forbidden(
                "admin API disabled: no [admin] token is configured",
            ));
        };
        let header = match parts.headers.get(AUTHORIZATION) {
            None => None,
            Some(v) => Some(v.to_str().map_err(|_| ApiError::missing_token())?),
        };
        let given = super::auth::token_from(header, None)?;
        if token_matches(&given, expected) {
            Ok(Admin)
        } else {
            Err(ApiError::unknown_token())
        }
    }
}

/// Compares the digests, in constant time: neither the content nor the length of the
/// configured token leaks through timing.
pub(crate) fn token_matches(given: &str, expected: &str) -> bool {
    let (a, b) = (
        Sha256::digest(given.as_bytes()),
        Sha256::digest(expected.as_bytes()),
    );
    a.as_slice().ct_eq(b.as_slice()).into()
}

/// Parses `user_id` and checks that it is one of ours.
fn local_user(app: &App, user_id: &str) -> Result<UserId, ApiError> {
    let user = UserId::parse(user_id).map_err(|e| ApiError::invalid_param(e.to_string()))?;
    if user.server_name() != app.config.server_name.as_str() {
        return Err(ApiError::invalid_param(format!(
            "{user_id} is not a user of this server ({})",
            app.config.server_name
        )));
    }
    Ok(user)
}

#[derive(Deserialize)]
struct NewUser {
    user_id: String,
}

async fn add_user(
    _: Admin,
    State(app): State<App>,
    body: Result<Json<NewUser>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Json(req) = body?;
    let user = local_user(&app, &req.user_id)?;
    let created = app.store.add_user(user.as_str()).await?;
    if created {
        tracing::info!(user = %user, "user created");
    }
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(json!({"user_id": user.as_str(), "created": created})),
    ))
}

#[derive(Deserialize)]
struct NewDevice {
    user_id: String,
    device_id: Option<String>,
}

async fn add_device(
    _: Admin,
    State(app): State<App>,
    body: Result<Json<NewDevice>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(req) = body?;
    let user = local_user(&app, &req.user_id)?;
    let device = match req.device_id {
        Some(d) if d == "*" || !valid_device_id(&d) => {
            return Err(ApiError::invalid_param(
                "device_id must be 1 to 255 printable characters, and not `*`",
            ));
        }
        Some(d) => d,
        None => fresh_device_id(&app, user.as_str())?,
    };
    let token = app.store.add_device(user.as_str(), &device).await?;
    tracing::info!(user = %user, device = %device, "device created (or given a new token)");
    Ok(Json(
        json!({"user_id": user.as_str(), "device_id": device, "access_token": token}),
    ))
}

/// A generated device ID the user does not have yet.
fn fresh_device_id(app: &App, user: &str) -> Result<String, ApiError> {
    for _ in 0..8 {
        let d = new_device_id();
        if !app.store.device_exists(user, &d)? {
            return Ok(d);
        }
    }
    Err(ApiError::internal("no unused device ID after 8 tries"))
}

async fn list_devices(
    _: Admin,
    State(app): State<App>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path(user_id) = path.map_err(|e| ApiError::invalid_param(e.body_text()))?;
    let user = local_user(&app, &user_id)?;
    if !app.store.user_exists(user.as_str())? {
        return Err(ApiError::not_found(format!("no user {user}")));
    }
    let devices = app.store.list_devices(user.as_str())?;
    Ok(Json(json!({"user_id": user.as_str(), "devices": devices})))
}

async fn delete_device(
    _: Admin,
    State(app): State<App>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path((user_id, device_id)) = path.map_err(|e| ApiError::invalid_param(e.body_text()))?;
    let user = local_user(&app, &user_id)?;
    if !app.store.delete_device(user.as_str(), &device_id).await? {
        return Err(ApiError::not_found(format!(
            "{user} has no device {device_id}"
        )));
    }
    tracing::info!(user = %user, device = %device_id, "device deleted with its token and pending messages");
    Ok(Json(json!({})))
}

async fn unrecognized(_: Admin) -> ApiError {
    ApiError::unrecognized()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(token_matches("a-long-admin-token", "a-long-admin-token"));
        assert!(!token_matches("a-long-admin-token", "a-long-admin-tokem"));
        assert!(!token_matches("a-long-admin-token", "a-long-admin-token2"));
        assert!(!token_matches("", "a-long-admin-token"));
    }
}
