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
//! the queue; see `crate::parked`), so it is never in both places nor in neither; it
//! bypasses `max_queued_per_destination` (those EDUs were accepted once already).
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
use serde_json::{Map, Value, json};

use crate::app::App;
use crate::client::admin::Admin;
use crate::error::{ApiError, matrix};
use crate::federation::routes::{path_param, server_name_param};
use crate::parked::{PageParams, Take, as_json, page_answer, take_in_batches};
use crate::store::{Append, now_ms};

/// Parked EDUs taken per synced commit.
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

async fn parked(
    _: Admin,
    State(app): State<App>,
    path: Result<Path<String>, PathRejection>,
    params: Result<Query<PageParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let dest = destination(path)?;
    let (after, limit) = PageParams::checked(params)?;
    let entries = app
        .store
        .parked(&dest, after, limit)?
        .into_iter()
        .map(|p| {
            let entry = json!({"seq": p.seq, "reason": p.reason, "edu": as_json(p.edu.as_bytes())});
            (p.seq, entry)
        })
        .collect();
    Ok(page_answer(json!({ "destination": dest }), entries, limit))
}

async fn requeue(
    _: Admin,
    State(app): State<App>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let n = take(app, destination(path)?, Take::Requeue).await?;
    Ok(Json(json!({ "requeued": n })))
}

async fn discard(
    _: Admin,
    State(app): State<App>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let n = take(app, destination(path)?, Take::Discard).await?;
    Ok(Json(json!({ "discarded": n })))
}

/// Requeues or discards every EDU `dest` had parked (see [`take_in_batches`]); how many.
async fn take(app: App, dest: String, take: Take) -> Result<u64, ApiError> {
    let sender = app.sender.clone();
    let (read_dest, ops_dest, woken_dest) = (dest.clone(), dest.clone(), dest.clone());
    let done = take_in_batches(
        app,
        REQUEUE_BATCH,
        move |store, after, n| {
            let page = store.parked(&read_dest, after, n)?;
            Ok(page.into_iter().map(|p| (p.seq, p.edu)).collect())
        },
        move |entries| {
            let mut ops = Vec::with_capacity(entries.len() * 2);
            for (seq, edu) in entries {
                if take == Take::Requeue {
                    ops.push(Append::Outbox {
                        dest: ops_dest.clone(),
                        edu: edu.into_bytes(),
                    });
                }
                ops.push(Append::Unpark {
                    dest: ops_dest.clone(),
                    seq,
                });
            }
            ops
        },
        move |n| {
            if take == Take::Requeue {
                sender.enqueued(&woken_dest, n);
            }
        },
    )
    .await?;
    match take {
        _ if done.taken == 0 => {}
        Take::Requeue => {
            metrics::counter!("courier_edus_requeued_total").increment(done.taken);
            tracing::info!(destination = %dest, edus = done.taken, "parked EDUs requeued by an operator");
        }
        Take::Discard => {
            metrics::counter!("courier_edus_discarded_total").increment(done.taken);
            tracing::warn!(destination = %dest, edus = done.taken, "parked EDUs discarded by an operator");
        }
    }
    Ok(done.taken)
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
