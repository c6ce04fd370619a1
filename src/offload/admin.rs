//! Admin view of offload mode: `GET /_courier/admin/v1/offload`.
//!
//! Read-only: per destination (outbound) and per origin (inbound), how many
//! transactions courier holds, the age of the oldest, how many were parked, and the
//! persisted replay state (failures, next attempt, last error). Guarded by the admin
//! token like the rest of the admin API.

use std::collections::BTreeSet;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Map, Value, json};

use crate::app::App;
use crate::client::admin::Admin;
use crate::error::{ApiError, matrix};
use crate::store::custody::Dir;
use crate::store::now_ms;

pub fn router() -> Router<App> {
    Router::new().route("/_courier/admin/v1/offload", matrix(get(offload)))
}

async fn offload(_: Admin, State(app): State<App>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({
        "outbound": queues(&app, Dir::Out)?,
        "inbound": queues(&app, Dir::In)?,
    })))
}

fn queues(app: &App, dir: Dir) -> Result<Value, ApiError> {
    let store = &app.store;
    let states = store.custody_states(dir)?;
    let mut names: BTreeSet<String> = store.custody_queues(dir)?.into_iter().collect();
    names.extend(states.iter().map(|(q, _)| q.clone()));
    names.extend(store.custody_parked_queues(dir)?);
    let now = now_ms();
    let mut out = Map::new();
    for name in names {
        let st = states
            .iter()
            .find(|(q, _)| *q == name)
            .map(|(_, s)| s.clone())
            .unwrap_or_default();
        let (held, oldest) = store.custody_depth(dir, &name)?;
        out.insert(
            name.clone(),
            json!({
                "held": held,
                "oldest_age_ms": oldest.map(|ts| now.saturating_sub(ts)),
                "parked": store.custody_parked_count(dir, &name),
                "failures": st.failures,
                "retry_in_ms": st.next_attempt_ts.saturating_sub(now),
                "last_error": st.last_error,
            }),
        );
    }
    Ok(Value::Object(out))
}
