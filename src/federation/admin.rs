//! Admin views of outbound delivery: `GET /_courier/admin/v1/destinations`.
//!
//! Read-only: per destination, how many EDUs wait, how many were parked, and the
//! persisted delivery state (failures, next attempt, last error, in-flight txn).
//! Mounted with the rest of the admin API and guarded by the same token check.

use std::collections::BTreeSet;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Map, Value, json};

use crate::app::App;
use crate::client::admin::Admin;
use crate::error::{ApiError, matrix};
use crate::store::now_ms;

pub fn router() -> Router<App> {
    Router::new().route("/_courier/admin/v1/destinations", matrix(get(destinations)))
}

async fn destinations(_: Admin, State(app): State<App>) -> Result<Json<Value>, ApiError> {
    let store = &app.store;
    let mut names: BTreeSet<String> = store.destinations_with_work()?.into_iter().collect();
    let states = store.all_dest_states()?;
    names.extend(states.iter().map(|(d, _)| d.clone()));
    let now = now_ms();
    let mut out = Map::new();
    for name in names {
        let st = states
            .iter()
            .find(|(d, _)| *d == name)
            .map(|(_, s)| s.clone())
            .unwrap_or_default();
        let (queued, _) = store.outbox_depth(&name)?;
        out.insert(
            name.clone(),
            json!({
                "queued": queued,
                "parked": store.parked_count(&name)?,
                "failures": st.failures,
                "next_attempt_ts": st.next_attempt_ts,
                "retry_in_ms": st.next_attempt_ts.saturating_sub(now),
                "last_error": st.last_error,
                "inflight_txn": st.inflight.as_ref().map(|i| i.txn_id.clone()),
            }),
        );
    }
    Ok(Json(json!({ "destinations": out })))
}
