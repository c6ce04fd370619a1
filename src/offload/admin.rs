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
use crate::federation::routes::server_name_param;
use crate::parked::{PageParams, Take, Taken, as_json, page_answer, take_in_batches};
use crate::store::custody::{self, Dir};
use crate::store::{Append, now_ms};

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
    let entries = app
        .store
        .custody_parked(dir, &queue, after, limit)?
        .into_iter()
        .map(|p| {
            let entry = json!({
                "seq": p.seq,
                "reason": p.reason,
                "txn_id": p.envelope.txn_id,
                "path": p.envelope.path,
                "received_ts": p.envelope.received_ts,
                "requeueable": p.replayable,
                "body": as_json(&p.body),
            });
            (p.seq, entry)
        })
        .collect();
    Ok(page_answer(json!({ "queue": queue }), entries, limit))
}

async fn requeue(
    _: Admin,
    State(app): State<App>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let (dir, queue) = queue(path)?;
    let done = take(app, dir, queue, Take::Requeue).await?;
    Ok(Json(
        json!({ "requeued": done.taken, "not_requeueable": done.left }),
    ))
}

async fn discard(
    _: Admin,
    State(app): State<App>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let (dir, queue) = queue(path)?;
    let done = take(app, dir, queue, Take::Discard).await?;
    Ok(Json(json!({ "discarded": done.taken })))
}

/// Requeues or discards every transaction a queue had parked (see
/// [`take_in_batches`]); a requeue leaves those parked without their headers.
async fn take(app: App, dir: Dir, queue: String, take: Take) -> Result<Taken, ApiError> {
    let relay = app.relay.clone();
    let (read_queue, ops_queue, woken_queue) = (queue.clone(), queue.clone(), queue.clone());
    let done = take_in_batches(
        app,
        REQUEUE_BATCH,
        move |store, after, n| {
            let page = store.custody_parked(dir, &read_queue, after, n)?;
            Ok(page.into_iter().map(|p| (p.seq, p)).collect())
        },
        move |entries| {
            let mut ops = Vec::with_capacity(entries.len() * 2);
            for (seq, p) in entries {
                if take == Take::Requeue {
                    if !p.replayable {
                        continue;
                    }
                    ops.push(Append::Held {
                        dir,
                        queue: ops_queue.clone(),
                        record: custody::encode(&p.envelope, &p.body),
                    });
                }
                ops.push(Append::UnparkHeld {
                    dir,
                    queue: ops_queue.clone(),
                    seq,
                });
            }
            ops
        },
        move |_| {
            if take == Take::Requeue {
                relay.wake(dir, &woken_queue);
            }
        },
    )
    .await?;
    let labels = [("direction", dir.tag())];
    match take {
        _ if done.taken == 0 => {}
        Take::Requeue => {
            metrics::counter!("courier_offload_requeued_total", &labels).increment(done.taken);
            tracing::info!(direction = dir.tag(), queue = %queue, transactions = done.taken, "parked transactions requeued by an operator");
        }
        Take::Discard => {
            metrics::counter!("courier_offload_discarded_total", &labels).increment(done.taken);
            tracing::warn!(direction = dir.tag(), queue = %queue, transactions = done.taken, "parked transactions discarded by an operator");
        }
    }
    if done.left > 0 {
        tracing::warn!(direction = dir.tag(), queue = %queue, transactions = done.left, "parked transactions kept: parked without their headers, they cannot be replayed (discard them instead)");
    }
    Ok(done)
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
