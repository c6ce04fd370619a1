//! Outbound delivery: drains each destination's queue, one transaction at a time.
//!
//! Owns the per-destination delivery loop and the timers that resume backed-off
//! destinations. Invariants:
//! - at most one transaction in flight per destination (the spec's ordering rule); a
//!   retry reuses the same txnId and the same EDUs (the in-flight record in the store
//!   names them), a new transaction gets a fresh txnId;
//! - EDUs leave the queue only on the destination's 200 (point deletes, and the
//!   destination's low-water mark `acked_seq` rises past them) or by being parked after a definitive refusal of that EDU alone; never by age or at start-up;
//! - a destination with no work costs no task and no connection: its task exits when
//!   the queue is empty or when it must back off, and one scheduler task holds the
//!   timers of every backed-off destination;
//! - the backoff state lives in the store, so a restart neither forgets a dead server
//!   nor hammers it; an authenticated request from a server resets its backoff.
//!
//! It never touches device inboxes or HTTP routing.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::RngExt;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::federation::client::{FederationClient, RequestError};
use crate::federation::edu;
use crate::federation::limit::Limit;
use crate::federation::retry::{Outcome, Policy, classify};
use crate::federation::wire::{Stored, write_groups};
use crate::ids::ServerName;
use crate::signing::canonical::write_string;
use crate::store::outbox::{DestState, Inflight, QueuedEdu};
use crate::store::{Batch, Store, StoreError, now_ms};

/// EDUs in one transaction: the spec's maximum.
pub const MAX_EDUS_PER_TXN: usize = 100;
/// Queued EDUs read for one transaction at most; consecutive ones that can are
/// coalesced (`edu::group`) into at most [`MAX_EDUS_PER_TXN`] EDUs on the wire.
pub const MAX_ROWS_PER_TXN: usize = 1000;
/// Spread of start-up wake-ups, per destination.
const STARTUP_STAGGER: Duration = Duration::from_millis(20);

/// Settings of the delivery machinery.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    pub policy: Policy,
    pub max_transaction_bytes: usize,
    /// Transactions in flight at once over all destinations.
    pub max_concurrent: usize,
    /// EDUs queued per destination at most.
    pub max_queued: u64,
}

impl SenderConfig {
    pub fn from_config(f: &crate::config::Federation) -> SenderConfig {
        SenderConfig {
            policy: Policy {
                initial: f.backoff_initial,
                multiplier: f.backoff_multiplier,
                max: f.backoff_max,
            },
            max_transaction_bytes: f.max_transaction_bytes,
            max_concurrent: f.max_concurrent_transactions,
            max_queued: f.max_queued_per_destination,
        }
    }
}

/// Handle to the delivery machinery; cheap to clone.
#[derive(Clone)]
pub struct Sender {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    client: Arc<FederationClient>,
    config: SenderConfig,
    /// Destinations with a running task; the flag says "look again before exiting".
    active: Mutex<HashMap<String, Arc<AtomicBool>>>,
    /// EDUs queued per destination (approximate: counted at start, then kept up to
    /// date on enqueue, acknowledgement and parking), for the queue bound.
    queued: Mutex<HashMap<String, u64>>,
    /// Destinations known to be backing off (saves a store read per inbound request).
    backing_off: Mutex<HashSet<String>>,
    /// Destinations whose running task is to reset its backoff (see `peer_is_up`).
    reset_backoff: Mutex<HashSet<String>>,
    timers: mpsc::UnboundedSender<(Instant, String)>,
    timer_rx: Mutex<Option<mpsc::UnboundedReceiver<(Instant, String)>>>,
    /// Transactions in flight at once, up to `max_concurrent` (see `federation::limit`).
    permits: Limit,
}

impl Sender {
    pub fn new(store: Store, client: Arc<FederationClient>, config: SenderConfig) -> Sender {
        let (tx, rx) = mpsc::unbounded_channel();
        Sender {
            inner: Arc::new(Inner {
                store,
                client,
                permits: Limit::new(config.max_concurrent),
                config,
                active: Mutex::default(),
                queued: Mutex::default(),
                backing_off: Mutex::default(),
                reset_backoff: Mutex::default(),
                timers: tx,
                timer_rx: Mutex::new(Some(rx)),
            }),
        }
    }

    /// Starts the timer task and resumes every destination with queued EDUs, with
    /// staggered wake-ups. Call once, inside the runtime.
    pub fn start(&self) -> Result<(), StoreError> {
        if let Some(rx) = self.inner.timer_rx.lock().expect("timer_rx").take() {
            tokio::spawn(run_timers(self.clone(), rx));
        }
        let dests = self.inner.store.destinations_with_work()?;
        if !dests.is_empty() {
            tracing::info!(
                destinations = dests.len(),
                "resuming delivery of queued EDUs"
            );
        }
        let now = Instant::now();
        for (i, dest) in dests.into_iter().enumerate() {
            let (depth, _) = self.inner.store.outbox_depth(&dest)?;
            self.inner
                .queued
                .lock()
                .expect("queued")
                .insert(dest.clone(), depth as u64);
            let st = self.inner.store.dest_state(&dest)?;
            if st.failures > 0 {
                self.inner
                    .backing_off
                    .lock()
                    .expect("backing_off")
                    .insert(dest.clone());
            }
            let _ = self
                .inner
                .timers
                .send((now + STARTUP_STAGGER * i as u32, dest));
        }
        Ok(())
    }

    /// Checks the per-destination queue bound before a request adds `adding` EDUs
    /// per destination; `Err(dest)` names the first destination that is full.
    pub fn admit<'a>(
        &self,
        adding: impl IntoIterator<Item = (&'a str, u64)>,
    ) -> Result<(), String> {
        let queued = self.inner.queued.lock().expect("queued");
        for (dest, n) in adding {
            if queued.get(dest).copied().unwrap_or(0) + n > self.inner.config.max_queued {
                metrics::counter!("courier_queue_full_refusals_total").increment(1);
                return Err(dest.to_owned());
            }
        }
        Ok(())
    }

    /// `n` EDUs were committed to `dest`'s queue: count them and wake its task.
    pub fn enqueued(&self, dest: &str, n: u64) {
        *self
            .inner
            .queued
            .lock()
            .expect("queued")
            .entry(dest.to_owned())
            .or_default() += n;
        self.wake(dest);
    }

    fn dequeued(&self, dest: &str, n: u64) {
        let mut q = self.inner.queued.lock().expect("queued");
        if let Some(c) = q.get_mut(dest) {
            *c = c.saturating_sub(n);
            if *c == 0 {
                q.remove(dest);
            }
        }
    }

    /// `dest` has new EDUs queued (call after the commit). Starts its delivery task
    /// unless one runs; a destination that is backing off stays backing off.
    pub fn wake(&self, dest: &str) {
        let mut active = self.inner.active.lock().expect("active");
        if let Some(flag) = active.get(dest) {
            flag.store(true, Ordering::SeqCst);
            return;
        }
        let flag = Arc::new(AtomicBool::new(false));
        active.insert(dest.to_owned(), flag.clone());
        drop(active);
        let this = self.clone();
        let dest = dest.to_owned();
        tokio::spawn(async move { this.deliver_loop(dest, flag).await });
    }

    /// An authenticated request came from `dest`: it is evidently up. Resets its
    /// backoff and wakes its queue.
    ///
    /// The destination's state record is its delivery task's (it names the
    /// transaction in flight and the acknowledged mark): while a task runs, it is
    /// asked to reset the backoff itself at its next step, since a write from here
    /// could put back an in-flight record the task has moved past. Only with no task
    /// running (checked, and kept so, under the lock `wake` takes) is it written here.
    pub fn peer_is_up(&self, dest: &str) {
        if !self
            .inner
            .backing_off
            .lock()
            .expect("backing_off")
            .remove(dest)
        {
            return;
        }
        let active = self.inner.active.lock().expect("active");
        if let Some(flag) = active.get(dest) {
            self.inner
                .reset_backoff
                .lock()
                .expect("reset_backoff")
                .insert(dest.to_owned());
            flag.store(true, Ordering::SeqCst);
            return;
        }
        let store = &self.inner.store;
        match store.dest_state(dest) {
            Ok(mut st) => {
                if reset_backoff(dest, &mut st)
                    && let Err(e) = store.write_dest_state(dest, &st)
                {
                    tracing::warn!(destination = dest, error = %e, "cannot reset backoff");
                }
            }
            Err(e) => {
                tracing::warn!(destination = dest, error = %e, "cannot read destination state")
            }
        }
        drop(active);
        self.wake(dest);
    }

    /// Whether `peer_is_up` asked `dest`'s running task to reset its backoff.
    fn take_reset(&self, dest: &str) -> bool {
        self.inner
            .reset_backoff
            .lock()
            .expect("reset_backoff")
            .remove(dest)
    }

    /// Delivers `dest`'s queue until it is empty or the destination fails.
    async fn deliver_loop(self, dest: String, again: Arc<AtomicBool>) {
        let mut max_rows = MAX_ROWS_PER_TXN;
        // The next transaction, built and signed while the previous one was in flight,
        // with the state write that records it (see `Next`).
        let mut next: Option<Next> = None;
        loop {
            let step = match ServerName::parse(&dest) {
                Ok(name) => self.step(&dest, &name, &mut max_rows, &mut next).await,
                Err(_) => Err(StepError::Fatal(format!("{dest} is not a server name"))),
            };
            match step {
                Ok(Step::Sent) => continue,
                Ok(Step::Idle) => {}
                Ok(Step::BackOff(at)) => {
                    let _ = self.inner.timers.send((at, dest.clone()));
                }
                Err(StepError::Store(e)) => {
                    tracing::error!(destination = %dest, error = %e, "store error in delivery; retrying in 5s");
                    let _ = self
                        .inner
                        .timers
                        .send((Instant::now() + Duration::from_secs(5), dest.clone()));
                }
                Err(StepError::Fatal(e)) => {
                    tracing::error!(destination = %dest, error = %e, "cannot deliver to this destination");
                }
            }
            // Exit unless someone woke us meanwhile (checked under the lock wake() takes).
            let mut active = self.inner.active.lock().expect("active");
            if again.swap(false, Ordering::SeqCst) {
                continue;
            }
            active.remove(&dest);
            return;
        }
    }

    /// One attempt: build (or rebuild) the transaction, send it, act on the answer.
    async fn step(
        &self,
        dest: &str,
        name: &ServerName,
        max_rows: &mut usize,
        next: &mut Option<Next>,
    ) -> Result<Step, StepError> {
        let store = &self.inner.store;
        let (mut st, mut pending, mut ready) = match next.take() {
            Some(n) => (n.state, Some(n.write), n.prepared),
            None => (store.dest_state(dest)?, None, None),
        };
        // Written with this step's next record of `st`.
        let reset = self.take_reset(dest) && reset_backoff(dest, &mut st);
        let now = now_ms();
        if let Some(wait) = self.inner.config.policy.remaining(st.next_attempt_ts, now) {
            if let Some(b) = pending.take() {
                store.commit_unsynced(b)?;
            }
            self.inner
                .backing_off
                .lock()
                .expect("backing_off")
                .insert(dest.to_owned());
            return Ok(Step::BackOff(Instant::now() + wait));
        }
        // The permit first: a transaction in memory (its EDUs, its body) exists only
        // while it holds one, so at most `max_concurrent` of them do. Taken after
        // building them, 1000 busy destinations held 1000 bodies while they waited
        // (840 MiB RSS measured).
        // The previous transaction's acknowledgement (`pending`) waits with us: it is
        // written with the record of the transaction formed once the permit is ours
        // (one write per transaction), and what arrives meanwhile can still join that
        // transaction. A crash before the write re-sends the acknowledged transaction
        // under its txnId, which the destination answers from its record.
        let _permit = match self.inner.permits.try_acquire() {
            Some(p) => p,
            None => {
                // Waiting: hold no prepared body meanwhile (see above).
                ready = None;
                self.inner.permits.acquire().await
            }
        };
        let max_bytes = self.inner.config.max_transaction_bytes;
        let prepared = match ready.take() {
            // Prepared during the previous transaction and recorded as in flight with
            // its acknowledgement: the same txnId, the same EDUs, already signed.
            Some(p) if st.inflight.as_ref().map(|i| &i.txn_id) == Some(&p.inflight.txn_id) => p,
            _ => {
                // The in-flight one again, or a fresh head of the queue.
                let found = match st.inflight.clone() {
                    Some(inf) => {
                        let rows = coalesced(store.outbox_head(
                            dest,
                            st.acked_seq,
                            usize::MAX,
                            usize::MAX,
                            Some(inf.last_seq),
                        )?);
                        if rows.edus.is_empty() {
                            st.inflight = None;
                            next_transaction(store, dest, &mut st, *max_rows, max_bytes)?
                        } else {
                            Some((inf, rows))
                        }
                    }
                    None => next_transaction(store, dest, &mut st, *max_rows, max_bytes)?,
                };
                let Some((inflight, rows)) = found else {
                    if pending.is_some() || st.inflight.is_some() || st.failures > 0 || reset {
                        st.inflight = None;
                        store.write_dest_state_with(
                            pending.take().unwrap_or_default(),
                            dest,
                            &st,
                        )?;
                    }
                    return Ok(Step::Idle);
                };
                // Recorded as in flight (with the previous acknowledgement) before it
                // leaves: a retry after a crash must rebuild these very EDUs. (A
                // rebuilt retry writes its unchanged record again: rare, and cheap.)
                store.write_dest_state_with(pending.take().unwrap_or_default(), dest, &st)?;
                prepare(&self.inner.client, name, inflight, rows)
            }
        };
        // While this transaction travels, the next one is read, built and signed on
        // the blocking pool (normal mode only, not while splitting a refused one):
        // one transaction in flight per destination, but no idle gap between two.
        // Only while permits are plentiful: when many destinations wait for them, a
        // prepared body would be thrown away at the next wait (CPU spent for nothing;
        // measured: 54k -> 40k msgs/s with 1000 busy destinations).
        // And only with a backlog behind this transaction (a whole next one already
        // queued): in a live stream, building the next one early would leave out what
        // arrives meanwhile and add a cycle of latency (measured: p99 13 -> 18 ms).
        let plentiful = self.inner.permits.available() * 2 >= self.inner.permits.current();
        let queued = self
            .inner
            .queued
            .lock()
            .expect("queued")
            .get(dest)
            .copied()
            .unwrap_or(0);
        let deep = queued >= (prepared.edus.len() + MAX_ROWS_PER_TXN) as u64;
        let lookahead = (*max_rows == MAX_ROWS_PER_TXN && plentiful && deep).then(|| {
            let (store, client) = (store.clone(), self.inner.client.clone());
            let (dest, name) = (dest.to_owned(), name.clone());
            let after = prepared.edus.last().map_or(0, |e| e.seq);
            let counter = st.txn_counter + 1;
            tokio::task::spawn_blocking(move || {
                prepare_next(&store, &client, &dest, &name, after, counter, max_bytes)
            })
        });
        let Prepared {
            inflight,
            edus,
            wire_edus,
            path,
            signed,
        } = prepared;
        let request = async {
            match signed {
                Ok((body, h)) => {
                    self.inner
                        .client
                        .request_signed(name, reqwest::Method::PUT, &path, Some(body), h)
                        .await
                }
                Err(e) => Err(RequestError::Sign(e)),
            }
        };
        // The previous transaction's acknowledgement is written while this one
        // travels: `join!` polls the request first, so it is on its way before the
        // write starts. A crash in between leaves the previous transaction recorded as
        // in flight: it is sent again (the destination answers from its txnId record)
        // and this one is rebuilt under a fresh txnId with the same EDUs grouped the
        // same way, so the same `message_id`s, which the destination has seen (the
        // spec's dedupe key). Same grouping because a transaction is prepared ahead
        // only with more than a further transaction queued behind it: its cut was
        // made by the limits, over rows that are all still there, never by the end
        // of the queue (where a later arrival could join one of its EDUs).
        // The write goes to the blocking pool: made on this worker it would hold up
        // the connection task that carries the body (woken by this task, so queued
        // behind it on this worker), and the transaction would leave only after the
        // write (~1 ms for a full transaction's acknowledgement).
        let started = Instant::now();
        let ack = pending.take().map(|b| {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.commit_unsynced(b))
        });
        let (reply, written) = tokio::join!(request, async {
            match ack {
                Some(write) => write.await.map_err(|e| StoreError::Task(e.to_string()))?,
                None => Ok(()),
            }
        });
        let round_trip = started.elapsed();
        written?;
        // A failed look-ahead only costs the overlap: the next step builds it anew.
        let prepared_next = match lookahead {
            Some(job) => match job.await {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => {
                    tracing::warn!(destination = dest, error = %e, "preparing the next transaction failed");
                    None
                }
                Err(e) => {
                    tracing::warn!(destination = dest, error = %e, "preparing the next transaction failed");
                    None
                }
            },
            None => None,
        };
        drop(_permit);
        let (status, detail) = match &reply {
            Ok(r) => (
                Some(r.status.as_u16()),
                String::from_utf8_lossy(&r.body[..r.body.len().min(200)]).into_owned(),
            ),
            Err(e) => (None, e.to_string()),
        };
        match classify(status) {
            Outcome::Delivered => {
                let fill = (wire_edus as f64 / MAX_EDUS_PER_TXN as f64)
                    .max(edus.len() as f64 / MAX_ROWS_PER_TXN as f64);
                self.inner.permits.observe(dest, round_trip, fill);
                metrics::histogram!("courier_federation_round_trip_seconds")
                    .record(round_trip.as_secs_f64());
                let mut b = Batch::new();
                store.outbox_ack(&mut b, dest, &edus);
                if let Some(last) = edus.last() {
                    st.acked_seq = st.acked_seq.max(last.seq);
                }
                st.inflight = None;
                st.failures = 0;
                st.next_attempt_ts = 0;
                st.last_error = None;
                // One write per transaction: every write here may wait behind the
                // intake's fsync. It carries this acknowledgement and the next
                // transaction's in-flight record: the prepared one's, made while that
                // one travels (see above); without one, the next step forms the
                // transaction once it holds a permit and adds its record to this write.
                if let Some(p) = &prepared_next {
                    st.txn_counter += 1;
                    st.inflight = Some(p.inflight.clone());
                }
                store.put_dest_state(&mut b, dest, &st);
                *next = Some(Next {
                    prepared: prepared_next,
                    state: st,
                    write: b,
                });
                self.inner
                    .backing_off
                    .lock()
                    .expect("backing_off")
                    .remove(dest);
                self.dequeued(dest, edus.len() as u64);
                *max_rows = MAX_ROWS_PER_TXN;
                metrics::counter!("courier_transactions_sent_total").increment(1);
                metrics::counter!("courier_edus_sent_total").increment(wire_edus as u64);
                metrics::counter!("courier_queued_edus_sent_total").increment(edus.len() as u64);
                tracing::debug!(destination = dest, txn = %inflight.txn_id, edus = wire_edus, queued = edus.len(), "transaction delivered");
                Ok(Step::Sent)
            }
            Outcome::Retry => {
                st.failures = st.failures.saturating_add(1);
                let jitter: f64 = rand::rng().random_range(0.0..1.0);
                let delay = self.inner.config.policy.delay(st.failures, jitter);
                st.next_attempt_ts = now_ms() + delay.as_millis() as u64;
                let why = match status {
                    Some(s) => format!("HTTP {s}: {detail}"),
                    None => detail,
                };
                st.last_error = Some(why.clone());
                store.write_dest_state(dest, &st)?;
                self.inner
                    .backing_off
                    .lock()
                    .expect("backing_off")
                    .insert(dest.to_owned());
                metrics::counter!("courier_transaction_failures_total").increment(1);
                tracing::warn!(
                    destination = dest,
                    txn = %inflight.txn_id,
                    failures = st.failures,
                    retry_in_ms = delay.as_millis() as u64,
                    error = %why,
                    "delivery failed; backing off"
                );
                Ok(Step::BackOff(Instant::now() + delay))
            }
            Outcome::Refused => {
                let why = format!("HTTP {}: {detail}", status.unwrap_or(0));
                let mut b = Batch::new();
                st.inflight = None;
                if edus.len() > 1 {
                    *max_rows = (edus.len() / 2).max(1);
                    tracing::warn!(destination = dest, edus = edus.len(), error = %why, "transaction refused; splitting it");
                    metrics::counter!("courier_transactions_split_total").increment(1);
                } else {
                    store.outbox_park(&mut b, dest, &edus[0], &why);
                    st.acked_seq = st.acked_seq.max(edus[0].seq);
                    self.dequeued(dest, 1);
                    tracing::warn!(destination = dest, seq = edus[0].seq, error = %why, "EDU refused by the destination; parked");
                    metrics::counter!("courier_edus_parked_total").increment(1);
                    *max_rows = MAX_ROWS_PER_TXN;
                }
                store.put_dest_state(&mut b, dest, &st);
                store.commit_unsynced(b)?;
                Ok(Step::Sent)
            }
        }
    }
}

/// Clears `st`'s backoff (the destination is back), logged and counted; whether
/// there was one to clear (and so `st` is to be written).
fn reset_backoff(dest: &str, st: &mut DestState) -> bool {
    if st.failures == 0 && st.next_attempt_ts == 0 {
        return false;
    }
    tracing::info!(
        destination = dest,
        failures = st.failures,
        "destination is back: backoff reset"
    );
    metrics::counter!("courier_backoff_resets_total").increment(1);
    st.failures = 0;
    st.next_attempt_ts = 0;
    true
}

/// Forms a fresh transaction from the queue head (above `st.acked_seq`) and sets it
/// as `st.inflight`, without writing anything: the caller records `st`. An empty
/// queue leaves `st` alone and yields `None`.
fn next_transaction(
    store: &Store,
    dest: &str,
    st: &mut DestState,
    max_rows: usize,
    max_bytes: usize,
) -> Result<Option<(Inflight, Coalesced)>, StoreError> {
    let found = head_transaction(
        store,
        dest,
        st.acked_seq,
        st.txn_counter + 1,
        max_rows,
        max_bytes,
    )?;
    if let Some((inflight, _)) = &found {
        st.txn_counter += 1;
        st.inflight = Some(inflight.clone());
    }
    Ok(found)
}

/// The queue head above `after` as a transaction with txn counter `counter`, without
/// writing anything. Only whole coalesced groups, at most [`MAX_EDUS_PER_TXN`] of them:
/// a retry rebuilds exactly this prefix into exactly these EDUs.
fn head_transaction(
    store: &Store,
    dest: &str,
    after: u64,
    counter: u64,
    max_rows: usize,
    max_bytes: usize,
) -> Result<Option<(Inflight, Coalesced)>, StoreError> {
    let rows = coalesced(store.outbox_head(dest, after, max_rows, max_bytes, None)?);
    let Some(last) = rows.edus.last() else {
        return Ok(None);
    };
    let now = now_ms();
    let inflight = Inflight {
        // Unique per destination across restarts: the counter is persisted with it,
        // and the time prefix covers a store that was wiped.
        txn_id: format!("{now}{counter}"),
        last_seq: last.seq,
        edu_count: rows.edus.len(),
        origin_server_ts: now,
    };
    Ok(Some((inflight, rows)))
}

/// What a delivered transaction hands to the next step: the destination's state
/// after its 200 and the write that records it (the acknowledgement, and the next
/// transaction as in flight when that one was prepared while this one travelled).
/// With a prepared transaction, the write is made while it travels; without, with
/// the record of the transaction the next step forms.
struct Next {
    prepared: Option<Prepared>,
    state: DestState,
    write: Batch,
}

/// A transaction ready to send: its rows, its body and its signature.
struct Prepared {
    inflight: Inflight,
    /// The queued EDUs it carries (acknowledged by its 200).
    edus: Vec<QueuedEdu>,
    /// EDUs on the wire, after coalescing.
    wire_edus: usize,
    path: String,
    /// The body (canonical JSON, the very bytes the signature covers) and the
    /// `Authorization` header; or why it cannot be encoded.
    signed: Result<(bytes::Bytes, String), String>,
}

/// Builds and signs the transaction `inflight` carrying `rows`.
fn prepare(
    client: &FederationClient,
    name: &ServerName,
    inflight: Inflight,
    rows: Coalesced,
) -> Prepared {
    let Coalesced {
        edus,
        wire,
        wire_edus,
    } = rows;
    let path = format!(
        "/_matrix/federation/v1/send/{}",
        percent_encoding::utf8_percent_encode(&inflight.txn_id, percent_encoding::NON_ALPHANUMERIC)
    );
    // Written once, in canonical form: it is both what is signed and what is sent.
    // Members in code-point order: edus < origin < origin_server_ts < pdus.
    let origin = client.origin().as_str();
    let signed = client
        .sign_writing(
            name,
            &reqwest::Method::PUT,
            &path,
            wire.len() + 128,
            |out| {
                out.push_str("{\"edus\":[");
                out.push_str(&wire);
                out.push_str("],\"origin\":");
                write_string(out, origin);
                out.push_str(",\"origin_server_ts\":");
                out.push_str(&inflight.origin_server_ts.to_string());
                out.push_str(",\"pdus\":[]}");
                Ok(())
            },
        )
        .map_err(|e| e.to_string());
    Prepared {
        inflight,
        edus,
        wire_edus,
        path,
        signed,
    }
}

/// The transaction that follows one ending at `after` (if the queue holds more), with
/// txn counter `counter`, prepared without writing anything: the caller records it as
/// in flight together with the acknowledgement of the current one.
fn prepare_next(
    store: &Store,
    client: &FederationClient,
    dest: &str,
    name: &ServerName,
    after: u64,
    counter: u64,
    max_bytes: usize,
) -> Result<Option<Prepared>, StoreError> {
    Ok(
        head_transaction(store, dest, after, counter, MAX_ROWS_PER_TXN, max_bytes)?
            .map(|(inflight, rows)| prepare(client, name, inflight, rows)),
    )
}

/// Queued EDUs cut to whole coalesced groups, and those groups written as the
/// canonical text of the transaction's EDUs (`wire`: the inside of its `edus`
/// array; `wire_edus` of them, at most [`MAX_EDUS_PER_TXN`]).
struct Coalesced {
    edus: Vec<QueuedEdu>,
    wire: String,
    wire_edus: usize,
}

fn coalesced(mut edus: Vec<QueuedEdu>) -> Coalesced {
    // Each row is read once: for grouping, and for writing it again.
    let (wire, grouping) = {
        let rows: Vec<&[u8]> = edus.iter().map(|e| e.edu.as_slice()).collect();
        let stored: Vec<Option<Stored>> = rows.iter().map(|r| Stored::read(r)).collect();
        let peeks: Vec<Option<edu::Peek>> = stored
            .iter()
            .zip(&rows)
            .map(|(s, r)| s.as_ref().map(|s| s.peek(r.len())))
            .collect();
        let grouping = edu::group(&peeks, MAX_EDUS_PER_TXN);
        let mut wire =
            String::with_capacity(rows[..grouping.rows].iter().map(|r| r.len() + 1).sum());
        let fast = write_groups(&mut wire, &rows, &stored, &grouping.groups);
        metrics::counter!("courier_edus_written_by_concatenation_total").increment(fast as u64);
        (wire, grouping)
    };
    edus.truncate(grouping.rows);
    Coalesced {
        edus,
        wire,
        wire_edus: grouping.groups.len(),
    }
}

enum Step {
    /// A transaction was answered; look at the queue again.
    Sent,
    /// Nothing to send.
    Idle,
    /// Try again at this instant.
    BackOff(Instant),
}

enum StepError {
    Store(StoreError),
    Fatal(String),
}

impl From<StoreError> for StepError {
    fn from(e: StoreError) -> Self {
        StepError::Store(e)
    }
}

/// The one task that holds every pending wake-up (backoff timers, staggered start).
async fn run_timers(sender: Sender, rx: mpsc::UnboundedReceiver<(Instant, String)>) {
    crate::wakeups::run(rx, |dest: String| sender.wake(&dest)).await
}
