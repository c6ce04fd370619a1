//! Admin view of offload mode, and the way back for parked held transactions.
//!
//! | method and path                                      | answer                                |
//! |------------------------------------------------------|---------------------------------------|
//! | `GET /offload`                                       | per destination (outbound) and origin (inbound): held, oldest age, parked, failures, next attempt, last error |
//! | `GET /offload/{outbound|inbound}/{queue}/parked?from=&limit=` | `{parked: [{seq, reason, txn_id, path, received_ts, requeueable, body}], next_from?}` |
//! | `POST /offload/{outbound|inbound}/{queue}/requeue`   | `{requeued, not_requeueable}`         |
//!
//! A requeued transaction is replayed byte for byte, headers included, as when it was
//! first held: each goes back to the end of its queue in the one synced commit that
//! removes it from `custody_parked`. Rows parked by a version that did not keep the
//! headers cannot be replayed (the origin's `Authorization` is gone); they stay, and
//! are counted as `not_requeueable`. Guarded by the admin token like the rest of the
//! admin API.
//!
//! This module never replays, and never drops, a held transaction itself.

use std::collections::BTreeSet;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Map, Value, json};

use crate::app::App;
use crate::client::admin::Admin;
use crate::error::{ApiError, matrix};
use crate::federation::admin::{PageParams, as_json, page_answer, server_name_param};
use crate::store::custody::{self, Dir};
use crate::store::{Append, StoreError, now_ms};

/// Parked transactions moved back per synced commit (they can be large).
const REQUEUE_BATCH: usize = 100;

pub fn router() -> Router<App> {
    Router::new()
        .route("/_courier/admin/v1/offload", matrix(get(offload)))
        .route(
            "/_courier/admin/v1/offload/{direction}/{queue}/parked",
            matrix(get(parked)),
        )
        .route(
            "/_courier/admin/v1/offload/{direction}/{queue}/requeue",
            matrix(post(requeue)),
        )
}

/// `{direction}/{queue}` of a path, or 400 `M_INVALID_PARAM`.
fn queue(path: Result<Path<(String, String)>, PathRejection>) -> Result<(Dir, String), ApiError> {
    let Path((direction, queue)) = path.map_err(|e| ApiError::invalid_param(e.body_text()))?;
    let dir = match direction.as_str() {
        "outbound" => Dir::Out,
        "inbound" => Dir::In,
        _ => {
            return Err(ApiError::invalid_param(
                "the direction is `outbound` (per destination) or `inbound` (per origin)",
            ));
        }
    };
    Ok((dir, server_name_param(queue)?))
}

async fn parked(
    _: Admin,
    State(app): State<App>,
    path: Result<Path<(String, String)>, PathRejection>,
    params: Result<Query<PageParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let (dir, queue) = queue(path)?;
    let (after, limit) = PageParams::checked(params)?;
    let page = app.store.custody_parked(dir, &queue, after, limit)?;
    let last = (page.len() == limit).then(|| page[limit - 1].seq);
    let entries = page
        .into_iter()
        .map(|p| {
            json!({
                "seq": p.seq,
                "reason": p.reason,
                "txn_id": p.txn_id,
                "path": p.path,
                "received_ts": p.received_ts,
                "requeueable": p.envelope.is_some(),
                "body": as_json(&p.body),
            })
        })
        .collect();
    Ok(page_answer(json!({ "queue": queue }), entries, last))
}

async fn requeue(
    _: Admin,
    State(app): State<App>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let (dir, queue) = queue(path)?;
    // As for parked EDUs (`federation::admin`): in a task of its own, one requeue at
    // a time, and only what was parked before the request.
    let task_app = app.clone();
    let (moved, stuck) = tokio::spawn(async move {
        let app = task_app;
        let _one_at_a_time = app.requeue_lock.lock().await;
        let bound = app.store.last_seq();
        let (mut after, mut moved, mut stuck) = (0, 0u64, 0u64);
        loop {
            let mut batch = app
                .store
                .custody_parked(dir, &queue, after, REQUEUE_BATCH)?;
            batch.retain(|p| p.seq <= bound);
            let Some(last) = batch.last() else {
                break;
            };
            after = last.seq;
            let mut ops = Vec::with_capacity(batch.len() * 2);
            for p in batch {
                let Some(envelope) = p.envelope else {
                    stuck += 1;
                    continue;
                };
                ops.push(Append::Held {
                    dir,
                    queue: queue.clone(),
                    record: custody::encode(&envelope, &p.body),
                });
                ops.push(Append::UnparkHeld {
                    dir,
                    queue: queue.clone(),
                    seq: p.seq,
                });
            }
            if ops.is_empty() {
                continue;
            }
            moved += ops.len() as u64 / 2;
            app.store.append(ops).await?;
            app.relay.wake(dir, &queue);
        }
        let labels = [("direction", dir.tag())];
        if moved > 0 {
            metrics::counter!("courier_offload_requeued_total", &labels).increment(moved);
            tracing::info!(direction = dir.tag(), queue = %queue, transactions = moved, "parked transactions requeued by an operator");
        }
        if stuck > 0 {
            tracing::warn!(direction = dir.tag(), queue = %queue, transactions = stuck, "parked transactions kept: parked without their headers, they cannot be replayed");
        }
        Ok::<_, StoreError>((moved, stuck))
    })
    .await
    .map_err(ApiError::internal)??;
    Ok(Json(json!({ "requeued": moved, "not_requeueable": stuck })))
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
