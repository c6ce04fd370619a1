//! Admin views of outbound delivery, and the way back for parked EDUs.
//!
//! | method and path                                   | answer                                   |
//! |---------------------------------------------------|------------------------------------------|
//! | `GET /destinations`                               | per destination: queued, parked, failures, next attempt, last error, in-flight txn |
//! | `GET /destinations/{dest}/parked?from=&limit=`    | `{parked: [{seq, reason, edu}], next_from?}`, oldest first |
//! | `POST /destinations/{dest}/requeue`               | `{requeued: n}`: every parked EDU back at the end of its queue |
//! | `POST /destinations/{dest}/discard`                | `{discarded: n}`: every parked EDU deleted for good |
//!
//! A parked EDU is one the destination refused for good (a 4xx other than 429): it
//! waits in `parked` until an operator, having fixed whatever made it refusable,
//! requeues it. Requeueing moves each EDU in one synced commit (out of `parked`, into
//! the queue), so it is never in both places nor in neither; it bypasses
//! `max_queued_per_destination` (those EDUs were accepted once already).
//! Mounted with the rest of the admin API and guarded by the same token check.
//!
//! Discarding is the one way an operator drops parked EDUs (say, ones a destination
//! will never take); it is logged as a warning and counted.
//!
//! This module never delivers, and never drops, an EDU on its own initiative.

use std::collections::BTreeSet;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::app::App;
use crate::client::admin::Admin;
use crate::error::{ApiError, matrix};
use crate::federation::routes::path_param;
use crate::ids::ServerName;
use crate::store::{Append, StoreError, now_ms};

/// Parked EDUs listed per page when the request names no `limit`, and at most.
const PAGE: usize = 100;
const MAX_PAGE: usize = 1000;
/// Parked EDUs moved back per synced commit.
const REQUEUE_BATCH: usize = 1000;

pub fn router() -> Router<App> {
    Router::new()
        .route("/_courier/admin/v1/destinations", matrix(get(destinations)))
        .route(
            "/_courier/admin/v1/destinations/{dest}/parked",
            matrix(get(parked)),
        )
        .route(
            "/_courier/admin/v1/destinations/{dest}/requeue",
            matrix(post(requeue)),
        )
        .route(
            "/_courier/admin/v1/destinations/{dest}/discard",
            matrix(post(discard)),
        )
}

/// The `{dest}` of a path: a server name, else 400 `M_INVALID_PARAM`.
fn destination(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    server_name_param(path_param(path)?)
}

/// `name` if it is a server name, else 400 `M_INVALID_PARAM`.
pub(crate) fn server_name_param(name: String) -> Result<String, ApiError> {
    ServerName::parse(&name)
        .map_err(|e| ApiError::invalid_param(format!("`{name}` is not a server name: {e}")))?;
    Ok(name)
}

/// `?from=SEQ&limit=N` of a listing of parked entries.
#[derive(Deserialize)]
pub(crate) struct PageParams {
    from: Option<u64>,
    limit: Option<usize>,
}

impl PageParams {
    /// `(after, limit)`, or 400 `M_INVALID_PARAM`.
    pub(crate) fn checked(
        params: Result<Query<PageParams>, QueryRejection>,
    ) -> Result<(u64, usize), ApiError> {
        let Query(params) = params.map_err(|e| ApiError::invalid_param(e.body_text()))?;
        let limit = params.limit.unwrap_or(PAGE);
        if limit == 0 || limit > MAX_PAGE {
            return Err(ApiError::invalid_param(format!(
                "`limit` must be 1 to {MAX_PAGE}"
            )));
        }
        Ok((params.from.unwrap_or(0), limit))
    }
}

/// A stored JSON text as JSON, or as a string if it is not (it was JSON when stored).
pub(crate) fn as_json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

async fn parked(
    _: Admin,
    State(app): State<App>,
    path: Result<Path<String>, PathRejection>,
    params: Result<Query<PageParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let dest = destination(path)?;
    let (after, limit) = PageParams::checked(params)?;
    let page = app.store.parked(&dest, after, limit)?;
    let last = (page.len() == limit).then(|| page[limit - 1].seq);
    let entries = page
        .into_iter()
        .map(|p| json!({"seq": p.seq, "reason": p.reason, "edu": as_json(p.edu.as_bytes())}))
        .collect();
    Ok(page_answer(json!({ "destination": dest }), entries, last))
}

/// A page of parked entries: `head`'s fields, `parked`, and `next_from` (the last
/// entry's position) when the page was full.
pub(crate) fn page_answer(mut head: Value, entries: Vec<Value>, last: Option<u64>) -> Json<Value> {
    head["parked"] = Value::Array(entries);
    if let Some(n) = last {
        head["next_from"] = json!(n);
    }
    Json(head)
}

async fn requeue(
    _: Admin,
    State(app): State<App>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let n = take_parked(app, destination(path)?, Take::Requeue).await?;
    Ok(Json(json!({ "requeued": n })))
}

async fn discard(
    _: Admin,
    State(app): State<App>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let n = take_parked(app, destination(path)?, Take::Discard).await?;
    Ok(Json(json!({ "discarded": n })))
}

/// What an operator does with parked entries.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Take {
    /// Back to the end of the queue.
    Requeue,
    /// Deleted for good.
    Discard,
}

/// Takes every EDU `dest` had parked when the request came, in batches, each batch
/// in one synced commit; how many.
async fn take_parked(app: App, dest: String, take: Take) -> Result<u64, ApiError> {
    // In a task of its own: an operator who hangs up mid-way leaves no half-moved
    // batch and no unwoken queue. One at a time, so two cannot both take the same
    // parked EDU.
    tokio::spawn(async move {
        let _one_at_a_time = app.requeue_lock.lock().await;
        // Only what was parked before this request: an EDU requeued here and parked
        // again (the far side still refuses it) has a later position and waits for
        // the next requeue, so a request always ends.
        let bound = app.store.last_seq();
        let mut after = 0;
        let mut taken = 0u64;
        loop {
            let mut batch = app.store.parked(&dest, after, REQUEUE_BATCH)?;
            batch.retain(|p| p.seq <= bound);
            let Some(last) = batch.last() else {
                break;
            };
            after = last.seq;
            let n = batch.len() as u64;
            let mut ops = Vec::with_capacity(batch.len() * 2);
            for p in batch {
                if take == Take::Requeue {
                    ops.push(Append::Outbox {
                        dest: dest.clone(),
                        edu: p.edu.into_bytes(),
                    });
                }
                ops.push(Append::Unpark {
                    dest: dest.clone(),
                    seq: p.seq,
                });
            }
            app.store.append(ops).await?;
            if take == Take::Requeue {
                app.sender.enqueued(&dest, n);
            }
            taken += n;
        }
        match take {
            _ if taken == 0 => {}
            Take::Requeue => {
                metrics::counter!("courier_edus_requeued_total").increment(taken);
                tracing::info!(destination = %dest, edus = taken, "parked EDUs requeued by an operator");
            }
            Take::Discard => {
                metrics::counter!("courier_edus_discarded_total").increment(taken);
                tracing::warn!(destination = %dest, edus = taken, "parked EDUs discarded by an operator");
            }
        }
        Ok::<_, StoreError>(taken)
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::from)
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
