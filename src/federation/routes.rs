//! The federation HTTP surface: `/_matrix/key/v2/server`, `/_matrix/federation/v1/*`.
//!
//! Owns request parsing and response shapes for server-server endpoints. It decides
//! nothing about storage or delivery itself: it authenticates (`auth`), validates and
//! calls the module that owns the work (`inbound`, `keys`, the store's accounts).

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use crate::app::App;
use crate::error::{ApiError, matrix};
use crate::federation::auth::{authenticate, authenticate_for};
use crate::federation::keys::our_server_keys;
use crate::federation::{inbound, transaction};
use crate::ids::ServerName;
use crate::store::{StoreError, now_ms};

/// Most PDUs and EDUs one transaction may carry (the spec's limits).
const MAX_PDUS: usize = 50;
const MAX_EDUS: usize = 100;

/// Routes mounted on listeners with the `federation` resource.
pub fn router() -> Router<App> {
    Router::new()
        .route("/_matrix/key/v2/server", matrix(get(server_keys)))
        .route("/_matrix/federation/v1/version", matrix(get(version)))
        .route("/_matrix/federation/v1/send/{txn_id}", matrix(put(send)))
        .route(
            "/_matrix/federation/v1/user/devices/{user_id}",
            matrix(get(user_devices)),
        )
        .route(
            "/_matrix/federation/v1/user/keys/query",
            matrix(post(keys_query)),
        )
}

async fn server_keys(State(app): State<App>) -> Json<Value> {
    let validity = app.config.federation.key_validity.as_millis() as u64;
    Json(our_server_keys(
        app.config.server_name.as_str(),
        &app.key,
        now_ms() + validity,
    ))
}

async fn version() -> Json<Value> {
    Json(json!({"server": {"name": "courier", "version": env!("CARGO_PKG_VERSION")}}))
}

/// Parses a JSON body, mapping failures to the Matrix codes.
pub(crate) fn json_body(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::not_json(format!("body is not JSON: {e}")))
}

/// A JSON request body and the server whose X-Matrix signature (for `ours`)
/// covers it.
pub(crate) async fn signed_json(
    app: &App,
    ours: &str,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(Value, ServerName), ApiError> {
    let content = json_body(body)?;
    let received = crate::signing::xmatrix::Body {
        raw: body,
        parsed: Some(&content),
    };
    let origin = authenticate_for(app, ours, method, uri, headers, Some(received)).await?;
    Ok((content, origin))
}

/// A transaction's `origin` must be the server that signed the request (403 otherwise).
pub(crate) fn same_origin(
    content: &Value,
    signer: &crate::ids::ServerName,
) -> Result<(), ApiError> {
    transaction::check_origin(
        content.get("origin").and_then(Value::as_str),
        signer.as_str(),
    )
}

/// A transaction's body, or the Matrix error for why it could not be read.
pub(crate) fn transaction_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    request_body(body, "transaction")
}

/// A request body, or the Matrix error for why it could not be read (413
/// `M_TOO_LARGE` past the listener's limit, also for a chunked body that announced
/// no length): never axum's plain-text rejection.
fn request_body(body: Result<Bytes, BytesRejection>, what: &str) -> Result<Bytes, ApiError> {
    body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(format!("{what} too large"))
        } else {
            ApiError::bad_json(r.body_text())
        }
    })
}

/// A path parameter, or 400 `M_INVALID_PARAM` for one that does not decode (say,
/// percent-encoded bytes that are not UTF-8): never axum's plain-text rejection.
pub(crate) fn path_param(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(p)| p)
        .map_err(|e| ApiError::invalid_param(e.body_text()))
}

/// `name` if it is a server name, else 400 `M_INVALID_PARAM`.
pub(crate) fn server_name_param(name: String) -> Result<String, ApiError> {
    crate::ids::ServerName::parse(&name)
        .map_err(|e| ApiError::invalid_param(format!("`{name}` is not a server name: {e}")))?;
    Ok(name)
}

/// `PUT /_matrix/federation/v1/send/{txnId}`.
async fn send(
    State(app): State<App>,
    txn_id: Result<Path<String>, PathRejection>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let started = std::time::Instant::now();
    let txn_id = path_param(txn_id)?;
    let body = transaction_body(body)?;
    let ours = app.config.server_name.as_str();
    let received = transaction::Received::read(&body)?;
    let signed = crate::signing::xmatrix::Body {
        raw: &body,
        parsed: received.tree(),
    };
    let origin = authenticate_for(&app, ours, &method, &uri, &headers, Some(signed)).await?;
    let authenticated_at = started.elapsed();
    let mut rewritten = String::new();
    let txn = transaction::authenticated(received, origin.as_str(), &mut rewritten)?;
    let (pdus, edus) = (&txn.pdus, &txn.edus);
    if pdus.len() > MAX_PDUS || edus.len() > MAX_EDUS {
        return Err(ApiError::bad_json(format!(
            "too many PDUs ({}) or EDUs ({}): at most {MAX_PDUS} and {MAX_EDUS}",
            pdus.len(),
            edus.len()
        )));
    }
    let guard = app.inbound_inflight.enter(origin.as_str()).ok_or_else(|| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "M_UNKNOWN",
            "too many concurrent transactions",
        )
    })?;
    let devices_stable = app.store.devices_stable().await;
    let prepared = inbound::prepare(
        &app.store,
        app.config.server_name.as_str(),
        origin.as_str(),
        &txn_id,
        edus,
    )?;
    let prepared_at = started.elapsed();
    match prepared {
        None => {
            tracing::debug!(origin = %origin, txn = %txn_id, "repeated transaction; already processed")
        }
        Some((acc, ops)) => {
            // Write and wake in a task of their own, which holds the origin's guard
            // until the write is durable: if the origin hangs up mid-write, its retry
            // meets the guard (429) instead of markers not yet written, and is not
            // delivered a second time.
            let task_app = app.clone();
            let woken = acc.woken;
            tokio::spawn(async move {
                task_app.store.append(ops).await?;
                drop(devices_stable);
                drop(guard);
                for (user, device) in &woken {
                    task_app.notifier.wake_device(user, device);
                }
                Ok::<_, StoreError>(())
            })
            .await
            .map_err(ApiError::internal)??;
            metrics::counter!("courier_inbound_messages_total").increment(acc.delivered as u64);
            metrics::histogram!("courier_inbound_transaction_seconds")
                .record(started.elapsed().as_secs_f64());
            tracing::debug!(
                origin = %origin, txn = %txn_id, delivered = acc.delivered,
                duplicates = acc.duplicate_edus, dropped = acc.dropped_edus,
                dropped_messages = acc.dropped_messages,
                auth_us = authenticated_at.as_micros() as u64,
                prepare_us = (prepared_at - authenticated_at).as_micros() as u64,
                write_us = (started.elapsed() - prepared_at).as_micros() as u64,
                "transaction accepted"
            );
        }
    }
    Ok(Json(json!({"pdus": pdu_results(pdus)})))
}

/// courier keeps no rooms: every PDU is answered with an error, none is stored.
fn pdu_results(pdus: &[&RawValue]) -> Map<String, Value> {
    let mut out = Map::new();
    for pdu in pdus {
        if let Some(id) = transaction::pdu_event_id(pdu) {
            out.insert(
                id.into_owned(),
                json!({"error": "courier relays to-device EDUs only; PDUs are not accepted"}),
            );
        }
    }
    if !pdus.is_empty() {
        tracing::info!(pdus = pdus.len(), "ignored PDUs in a transaction");
        metrics::counter!("courier_inbound_pdus_ignored_total").increment(pdus.len() as u64);
    }
    out
}

/// Checks that `user_id` is a user of ours.
fn local_user(app: &App, user_id: &str) -> Result<(), ApiError> {
    let uid =
        crate::ids::UserId::parse(user_id).map_err(|e| ApiError::invalid_param(e.to_string()))?;
    if uid.server_name() != app.config.server_name.as_str() {
        return Err(ApiError::forbidden("not a user of this server"));
    }
    Ok(())
}

/// `GET /_matrix/federation/v1/user/devices/{userId}`: our user's device list.
async fn user_devices(
    State(app): State<App>,
    user_id: Result<Path<String>, PathRejection>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let user_id = path_param(user_id)?;
    authenticate(&app, &method, &uri, &headers, None).await?;
    local_user(&app, &user_id)?;
    let devices: Vec<Value> = app
        .store
        .device_ids(&user_id)?
        .into_iter()
        .map(|d| json!({"device_id": d}))
        .collect();
    Ok(Json(
        json!({"user_id": user_id, "stream_id": 0, "devices": devices}),
    ))
}

/// `POST /_matrix/federation/v1/user/keys/query`: courier holds no E2E keys, so
/// every queried user of ours maps to an empty device-key map.
async fn keys_query(
    State(app): State<App>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body = request_body(body, "request body")?;
    let ours = app.config.server_name.as_str();
    let (content, _) = signed_json(&app, ours, &method, &uri, &headers, &body).await?;
    let wanted = content
        .get("device_keys")
        .and_then(Value::as_object)
        .ok_or_else(|| ApiError::bad_json("`device_keys` missing"))?;
    let mut device_keys = Map::new();
    for user in wanted.keys() {
        if local_user(&app, user).is_ok() {
            device_keys.insert(user.clone(), json!({}));
        }
    }
    Ok(Json(json!({"device_keys": device_keys})))
}
