//! Admin view of offload mode, and the way back for parked held transactions.
//!
//! | method and path                                      | answer                                |
//! |------------------------------------------------------|---------------------------------------|
//! | `GET /offload`                                       | per destination (outbound) and origin (inbound): held, oldest age, parked, failures, next attempt, last error |
//! | `GET /offload/{outbound|inbound}/{queue}/parked?from=&limit=` | `{parked: [{seq, reason, txn_id, path, received_ts, requeueable, body}], next_from?}` |
//! | `POST /offload/{outbound|inbound}/{queue}/requeue`   | `{requeued, not_requeueable}`         |
//! | `POST /offload/{outbound|inbound}/{queue}/discard`   | `{discarded}`: deleted for good       |
//!
//! A requeued transaction is replayed byte for byte, headers included, as when it was
//! first held: each goes back to the end of its queue in the one synced commit that
//! removes it from `custody_parked`. Rows parked by a version that did not keep the
//! headers cannot be replayed (the origin's `Authorization` is gone); they stay, and
//! are counted as `not_requeueable` (discard is the way to be rid of them). Guarded
//! by the admin token like the rest of the admin API.
//!
//! Discarding, logged as a warning and counted, is the one way an operator drops
//! parked transactions; this module never replays or drops one on its own initiative.

use std::collections::BTreeSet;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Map, Value, json};

use crate::app::App;
use crate::client::admin::Admin;
use crate::error::{ApiError, matrix};
use crate::federation::admin::{PageParams, Take, as_json, page_answer, server_name_param};
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
        .route(
            "/_courier/admin/v1/offload/{direction}/{queue}/discard",
            matrix(post(discard)),
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
    let (moved, stuck) = take_parked(app, dir, queue, Take::Requeue).await?;
    Ok(Json(json!({ "requeued": moved, "not_requeueable": stuck })))
}

async fn discard(
    _: Admin,
    State(app): State<App>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let (dir, queue) = queue(path)?;
    let (n, _) = take_parked(app, dir, queue, Take::Discard).await?;
    Ok(Json(json!({ "discarded": n })))
}

/// As for parked EDUs (`federation::admin`): in a task of its own, one at a time,
/// only what was parked before the request, each batch in one synced commit. Returns
/// how many were taken, and (requeue) how many were left for lack of headers.
async fn take_parked(
    app: App,
    dir: Dir,
    queue: String,
    take: Take,
) -> Result<(u64, u64), ApiError> {
    tokio::spawn(async move {
        let _one_at_a_time = app.requeue_lock.lock().await;
        let bound = app.store.last_seq();
        let (mut after, mut taken, mut stuck) = (0, 0u64, 0u64);
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
                if take == Take::Requeue {
                    let Some(envelope) = p.envelope else {
                        stuck += 1;
                        continue;
                    };
                    ops.push(Append::Held {
                        dir,
                        queue: queue.clone(),
                        record: custody::encode(&envelope, &p.body),
                    });
                }
                ops.push(Append::UnparkHeld {
                    dir,
                    queue: queue.clone(),
                    seq: p.seq,
                });
                taken += 1;
            }
            if ops.is_empty() {
                continue;
            }
            app.store.append(ops).await?;
            if take == Take::Requeue {
                app.relay.wake(dir, &queue);
            }
        }
        let labels = [("direction", dir.tag())];
        match take {
            _ if taken == 0 => {}
            Take::Requeue => {
                metrics::counter!("courier_offload_requeued_total", &labels).increment(taken);
                tracing::info!(direction = dir.tag(), queue = %queue, transactions = taken, "parked transactions requeued by an operator");
            }
            Take::Discard => {
                metrics::counter!("courier_offload_discarded_total", &labels).increment(taken);
                tracing::warn!(direction = dir.tag(), queue = %queue, transactions = taken, "parked transactions discarded by an operator");
            }
        }
        if stuck > 0 {
            tracing::warn!(direction = dir.tag(), queue = %queue, transactions = stuck, "parked transactions kept: parked without their headers, they cannot be replayed (discard them instead)");
        }
        Ok::<_, StoreError>((taken, stuck))
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::from)
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
