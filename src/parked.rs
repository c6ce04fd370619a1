//! Parked entries as the admin API pages and takes them, whichever set they are in:
//! EDUs a destination refused (`federation::admin`) or held transactions a far side
//! refused (`offload::admin`).
//!
//! Owns paging (`?from=&limit=`, `next_from`) and [`take_in_batches`], the one walk
//! that requeues or discards: one at a time for the whole server, only what was
//! parked when the request came, each batch in one synced append that both removes
//! the entries from their parked set and (requeue) writes them back to their queue.
//!
//! It never parks anything, and never takes an entry but on an operator's request.

use axum::Json;
use axum::extract::Query;
use axum::extract::rejection::QueryRejection;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::app::App;
use crate::error::ApiError;
use crate::store::{Append, Store, StoreError};

/// Entries listed per page when the request names no `limit`, and at most.
const PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// `?from=SEQ&limit=N` of a listing of parked entries.
#[derive(Deserialize)]
pub struct PageParams {
    from: Option<u64>,
    limit: Option<usize>,
}

impl PageParams {
    /// `(after, limit)`, or 400 `M_INVALID_PARAM`.
    pub fn checked(
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

/// A page of parked entries: `head`'s fields, `parked`, and `next_from` (the last
/// entry's position) when the page is full.
pub fn page_answer(
    mut head: Value,
    seqs_and_entries: Vec<(u64, Value)>,
    limit: usize,
) -> Json<Value> {
    let full = seqs_and_entries.len() == limit;
    let last = seqs_and_entries
        .last()
        .map(|(seq, _)| *seq)
        .filter(|_| full);
    head["parked"] = Value::Array(seqs_and_entries.into_iter().map(|(_, e)| e).collect());
    if let Some(n) = last {
        head["next_from"] = json!(n);
    }
    Json(head)
}

/// A stored JSON text as JSON, or as a string if it is not (it was JSON when stored).
pub fn as_json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

/// What an operator does with parked entries.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// Back to the end of the queue.
    Requeue,
    /// Deleted for good.
    Discard,
}

/// How many entries a walk took, and how many it left in place.
#[derive(Debug, Default, Clone, Copy)]
pub struct Taken {
    pub taken: u64,
    pub left: u64,
}

/// Takes every entry parked when it begins, `batch` at a time: `read(store, after,
/// n)` lists up to `n` entries above position `after` (each with its position),
/// `ops(entries)` builds the append that takes them: an `Unpark`/`UnparkHeld` per
/// entry taken, with its `Outbox`/`Held` to requeue it; an entry without one is left
/// in place. `committed(n)` runs after each append that took `n`.
///
/// It runs in a task of its own, so an operator who hangs up mid-way leaves no
/// half-taken batch and no unwoken queue; and under `App::requeue_lock`, so two
/// cannot take the same entry. Only positions up to the last one handed out when it
/// begins are taken: an entry requeued here and parked again (the far side still
/// refuses it) waits for the next request, so every request ends.
pub async fn take_in_batches<T: Send + 'static>(
    app: App,
    batch: usize,
    read: impl Fn(&Store, u64, usize) -> Result<Vec<(u64, T)>, StoreError> + Send + 'static,
    mut ops: impl FnMut(Vec<(u64, T)>) -> Vec<Append> + Send + 'static,
    mut committed: impl FnMut(u64) + Send + 'static,
) -> Result<Taken, ApiError> {
    tokio::spawn(async move {
        let _one_at_a_time = app.requeue_lock.lock().await;
        let bound = app.store.last_seq();
        let (mut after, mut done) = (0, Taken::default());
        loop {
            let mut entries = read(&app.store, after, batch)?;
            entries.retain(|(seq, _)| *seq <= bound);
            let Some((last, _)) = entries.last() else {
                break;
            };
            after = *last;
            let listed = entries.len() as u64;
            let ops = ops(entries);
            let taken = ops
                .iter()
                .filter(|op| matches!(op, Append::Unpark { .. } | Append::UnparkHeld { .. }))
                .count() as u64;
            done.left += listed - taken;
            if taken == 0 {
                continue;
            }
            app.store.append(ops).await?;
            committed(taken);
            done.taken += taken;
        }
        Ok::<_, StoreError>(done)
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::from)
}
