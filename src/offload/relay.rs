//! Replaying held transactions: one queue per destination (outbound) or per origin
//! (inbound), one transaction in flight per queue, in the order they were accepted.
//!
//! Owns the delivery loops and timers of offload mode's custody. Invariants:
//! - a held transaction leaves the store only on the far side's 2xx (deleted) or a
//!   definitive refusal of it (parked, with the reason); never by age or at start-up.
//!   Definitive: a 4xx other than 401/404/405/408/429, or a 401 once its origin's key server
//!   no longer lists the key it was signed with (rotated out while courier held it:
//!   no replay can pass, and it would block its queue for good);
//! - it is replayed byte for byte: same target, same `Authorization`, same body (the
//!   origin's signature covers them; a changed byte would be refused);
//! - a failing queue backs off exponentially, with the schedule persisted in the store,
//!   so a restart neither forgets an unreachable server nor hammers it; outbound
//!   queues use `[federation]`'s schedule, the homeserver's `[offload]
//!   homeserver_backoff_max` caps the inbound ones (it is local, and usually back soon).
//!
//! A lost acknowledgement (crash between the far side's 200 and our delete) replays
//! the transaction once more; receivers deduplicate by `(origin, txnId)`, as the spec
//! requires. It never parses or rewrites a body and never touches courier's own queues.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::RngExt;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;

use crate::federation::client::FederationClient;
use crate::federation::keys::RemoteKeys;
use crate::federation::retry::{Outcome, Policy, classify};
use crate::ids::ServerName;
use crate::offload::forward::{self, Homeserver};
use crate::signing::xmatrix;
use crate::store::custody::{Dir, Held, QueueState};
use crate::store::{Batch, Store, StoreError, now_ms};

/// Spread of start-up wake-ups, per queue.
const STARTUP_STAGGER: Duration = Duration::from_millis(20);
/// Longest answer body read back from a replay (for the log).
const ANSWER_SNIPPET: usize = 300;

type QueueId = (Dir, String);

/// Handle to the replay machinery; cheap to clone.
#[derive(Clone)]
pub struct Relay {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    federation: Arc<FederationClient>,
    keys: Arc<RemoteKeys>,
    homeserver: Option<Homeserver>,
    out_policy: Policy,
    in_policy: Policy,
    timeout: Duration,
    /// Queues with a running task; the flag says "look again before exiting".
    active: Mutex<HashMap<QueueId, Arc<AtomicBool>>>,
    /// Destinations whose outbound queue is backing off (spares a store read on
    /// every authenticated inbound request).
    backing_off: Mutex<HashSet<String>>,
    timers: mpsc::UnboundedSender<(Instant, QueueId)>,
    timer_rx: Mutex<Option<mpsc::UnboundedReceiver<(Instant, QueueId)>>>,
    permits: Semaphore,
}

impl Relay {
    pub fn new(
        store: Store,
        federation: Arc<FederationClient>,
        keys: Arc<RemoteKeys>,
        config: &crate::config::Config,
    ) -> Result<Relay, reqwest::Error> {
        let f = &config.federation;
        let o = &config.offload;
        let homeserver = match &o.homeserver_url {
            Some(url) => Some(Homeserver::new(url, o.verify_homeserver_certificate)?),
            None => None,
        };
        let out_policy = Policy {
            initial: f.backoff_initial,
            multiplier: f.backoff_multiplier,
            max: f.backoff_max,
        };
        let in_policy = Policy {
            initial: f.backoff_initial.min(o.homeserver_backoff_max),
            multiplier: f.backoff_multiplier,
            max: o.homeserver_backoff_max,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        Ok(Relay {
            inner: Arc::new(Inner {
                store,
                federation,
                keys,
                homeserver,
                out_policy,
                in_policy,
                timeout: f.request_timeout,
                active: Mutex::default(),
                backing_off: Mutex::default(),
                timers: tx,
                timer_rx: Mutex::new(Some(rx)),
                permits: Semaphore::new(f.max_concurrent_transactions),
            }),
        })
    }

    /// The homeserver client, when `[offload] homeserver_url` is set.
    pub fn homeserver(&self) -> Option<&Homeserver> {
        self.inner.homeserver.as_ref()
    }

    /// Starts the timer task and resumes every queue that holds transactions,
    /// staggered. Call once, inside the runtime.
    pub fn start(&self) -> Result<(), StoreError> {
        if let Some(rx) = self.inner.timer_rx.lock().expect("timer_rx").take() {
            tokio::spawn(run_timers(self.clone(), rx));
        }
        let now = Instant::now();
        let mut i = 0u32;
        for dir in [Dir::Out, Dir::In] {
            let queues = self.inner.store.custody_queues(dir)?;
            if !queues.is_empty() {
                tracing::info!(
                    direction = dir.tag(),
                    queues = queues.len(),
                    "resuming replay of held transactions"
                );
            }
            for q in queues {
                let _ = self
                    .inner
                    .timers
                    .send((now + STARTUP_STAGGER * i, (dir, q)));
                i += 1;
            }
        }
        Ok(())
    }

    /// A queue got a new transaction (call after the commit): start its task unless
    /// one runs. A queue that is backing off stays backing off.
    pub fn wake(&self, dir: Dir, queue: &str) {
        let id = (dir, queue.to_owned());
        let mut active = self.inner.active.lock().expect("active");
        if let Some(flag) = active.get(&id) {
            flag.store(true, Ordering::SeqCst);
            return;
        }
        let flag = Arc::new(AtomicBool::new(false));
        active.insert(id.clone(), flag.clone());
        drop(active);
        let this = self.clone();
        tokio::spawn(async move { this.deliver_loop(id, flag).await });
    }

    /// `server` sent us an authenticated request: it is up. Clears the backoff of the
    /// outbound queue held for it, if any, and replays at once.
    pub fn peer_is_up(&self, server: &str) {
        if !self.backing_off(server, false) {
            return;
        }
        let store = &self.inner.store;
        match store.custody_state(Dir::Out, server) {
            Ok(st) if st.failures > 0 => {
                tracing::info!(
                    destination = server,
                    failures = st.failures,
                    "destination is back: replay backoff reset"
                );
                let mut b = Batch::new();
                store.put_custody_state(&mut b, Dir::Out, server, &QueueState::default());
                if let Err(e) = store.commit_unsynced(b) {
                    tracing::warn!(destination = server, error = %e, "cannot reset backoff");
                    return;
                }
                self.wake(Dir::Out, server);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(destination = server, error = %e, "cannot read queue state"),
        }
    }

    /// The backoff policy of `dir`'s queues.
    fn policy(&self, dir: Dir) -> &Policy {
        match dir {
            Dir::Out => &self.inner.out_policy,
            Dir::In => &self.inner.in_policy,
        }
    }

    /// Marks `dest`'s outbound queue as backing off or not; returns whether it was.
    fn backing_off(&self, dest: &str, on: bool) -> bool {
        let mut set = self.inner.backing_off.lock().expect("backing_off");
        if on {
            !set.insert(dest.to_owned())
        } else {
            set.remove(dest)
        }
    }

    async fn deliver_loop(self, id: QueueId, again: Arc<AtomicBool>) {
        let (dir, queue) = (id.0, id.1.as_str());
        loop {
            match self.step(dir, queue).await {
                Ok(Step::Sent) => continue,
                Ok(Step::Idle) => {}
                Ok(Step::BackOff(at)) => {
                    let _ = self.inner.timers.send((at, id.clone()));
                }
                Err(e) => {
                    tracing::error!(direction = dir.tag(), queue, error = %e, "store error in replay; retrying in 5s");
                    let _ = self
                        .inner
                        .timers
                        .send((Instant::now() + Duration::from_secs(5), id.clone()));
                }
            }
            let mut active = self.inner.active.lock().expect("active");
            if again.swap(false, Ordering::SeqCst) {
                continue;
            }
            active.remove(&id);
            return;
        }
    }

    /// One attempt at the queue's head.
    async fn step(&self, dir: Dir, queue: &str) -> Result<Step, StoreError> {
        let store = &self.inner.store;
        let mut st = store.custody_state(dir, queue)?;
        let now = now_ms();
        if let Some(wait) = self.policy(dir).remaining(st.next_attempt_ts, now) {
            return Ok(Step::BackOff(Instant::now() + wait));
        }
        let Some(held) = store.custody_head(dir, queue)? else {
            if st != QueueState::default() {
                let mut b = Batch::new();
                store.put_custody_state(&mut b, dir, queue, &QueueState::default());
                store.commit_unsynced(b)?;
            }
            return Ok(Step::Idle);
        };
        let permit = self.inner.permits.acquire().await;
        let answer = self.replay(dir, queue, &held).await;
        drop(permit);
        let (status, detail) = match answer {
            Ok((s, body)) => (Some(s), body),
            Err(e) => (None, e),
        };
        let labels = [("direction", dir.tag())];
        let mut outcome = classify(status);
        let mut detail = detail;
        if status == Some(401)
            && let Some(why) = self.withdrawn_key(&held).await
        {
            outcome = Outcome::Refused;
            detail = format!("{detail} ({why})");
        }
        match outcome {
            Outcome::Delivered => {
                let mut b = Batch::new();
                store.custody_ack(&mut b, dir, queue, held.seq);
                store.put_custody_state(&mut b, dir, queue, &QueueState::default());
                store.commit_unsynced(b)?;
                if dir == Dir::Out {
                    self.backing_off(queue, false);
                }
                metrics::counter!("courier_offload_replayed_total", &labels).increment(1);
                tracing::debug!(
                    direction = dir.tag(),
                    queue,
                    txn = %held.envelope.txn_id,
                    held_ms = now_ms().saturating_sub(held.envelope.received_ts),
                    "held transaction delivered"
                );
                Ok(Step::Sent)
            }
            Outcome::Retry => {
                st.failures = st.failures.saturating_add(1);
                let jitter: f64 = rand::rng().random_range(0.0..1.0);
                let delay = self.policy(dir).delay(st.failures, jitter);
                st.next_attempt_ts = now_ms() + delay.as_millis() as u64;
                let why = match status {
                    Some(s) => format!("HTTP {s}: {detail}"),
                    None => detail,
                };
                st.last_error = Some(why.clone());
                let mut b = Batch::new();
                store.put_custody_state(&mut b, dir, queue, &st);
                store.commit_unsynced(b)?;
                if dir == Dir::Out {
                    self.backing_off(queue, true);
                }
                metrics::counter!("courier_offload_replay_failures_total", &labels).increment(1);
                tracing::warn!(
                    direction = dir.tag(),
                    queue,
                    txn = %held.envelope.txn_id,
                    failures = st.failures,
                    retry_in_ms = delay.as_millis() as u64,
                    error = %why,
                    "replay failed; backing off"
                );
                Ok(Step::BackOff(Instant::now() + delay))
            }
            Outcome::Refused => {
                let why = format!("HTTP {}: {detail}", status.unwrap_or(0));
                let mut b = Batch::new();
                store.custody_park(&mut b, dir, queue, &held, &why);
                store.put_custody_state(&mut b, dir, queue, &QueueState::default());
                store.commit_unsynced(b)?;
                metrics::counter!("courier_offload_parked_total", &labels).increment(1);
                tracing::warn!(
                    direction = dir.tag(),
                    queue,
                    txn = %held.envelope.txn_id,
                    error = %why,
                    "held transaction refused by the far side; parked"
                );
                Ok(Step::Sent)
            }
        }
    }

    /// For a held transaction the far side answered 401: `Some(why)` when no replay
    /// can ever pass, because its origin's key server no longer lists the key it was
    /// signed with. `None` when the key is still listed or that cannot be told (the
    /// key server is down): the 401 may then pass (the far side failed to fetch the
    /// keys), so the transaction is retried.
    async fn withdrawn_key(&self, held: &Held) -> Option<String> {
        let mut withdrawn = None;
        for (name, value) in &held.envelope.headers {
            if !name.eq_ignore_ascii_case("authorization") {
                continue;
            }
            let Ok(x) = xmatrix::parse(value) else {
                continue;
            };
            let Ok(origin) = ServerName::parse(&x.origin) else {
                continue;
            };
            match self.inner.keys.still_published(&origin, &x.key).await {
                Ok(false) => {
                    withdrawn = Some(format!(
                        "signed with {}, which {} no longer publishes",
                        x.key, x.origin
                    ))
                }
                Ok(true) => return None,
                Err(e) => {
                    tracing::info!(origin = %origin, error = %e, "cannot tell whether a held transaction's key is still published");
                    return None;
                }
            }
        }
        withdrawn
    }

    /// Sends `held` unchanged; returns the status and the start of the answer.
    async fn replay(&self, dir: Dir, queue: &str, held: &Held) -> Result<(u16, String), String> {
        let headers = forward::from_pairs(&held.envelope.headers);
        let body = reqwest::Body::from(held.body.clone());
        let method = reqwest::Method::PUT;
        let resp = match dir {
            Dir::Out => {
                let name = ServerName::parse(queue).map_err(|e| e.to_string())?;
                self.inner
                    .federation
                    .forward(
                        &name,
                        method,
                        &held.envelope.path,
                        headers,
                        body,
                        Some(self.inner.timeout),
                    )
                    .await
                    .map_err(|e| e.to_string())?
            }
            Dir::In => {
                let hs = self
                    .inner
                    .homeserver
                    .as_ref()
                    .ok_or("no [offload] homeserver_url configured")?;
                hs.send(
                    method,
                    &held.envelope.path,
                    headers,
                    body,
                    self.inner.timeout,
                )
                .await
                .map_err(|e| crate::federation::client::RequestError::from_reqwest(e).to_string())?
            }
        };
        let status = resp.status().as_u16();
        // Only the status decides; the answer's start is kept for the logs. Reading
        // no further bounds what a far side can make courier hold (an endless body
        // would otherwise grow in memory until the timeout, for every replay).
        let mut resp = resp;
        let mut bytes = Vec::new();
        while bytes.len() < ANSWER_SNIPPET {
            match resp.chunk().await {
                Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
                _ => break,
            }
        }
        let snippet =
            String::from_utf8_lossy(&bytes[..bytes.len().min(ANSWER_SNIPPET)]).into_owned();
        Ok((status, snippet))
    }
}

enum Step {
    /// The head was answered; look at the queue again.
    Sent,
    /// Nothing held.
    Idle,
    /// Try again at this instant.
    BackOff(Instant),
}

/// The one task holding every pending wake-up (backoff timers, staggered start).
async fn run_timers(relay: Relay, rx: mpsc::UnboundedReceiver<(Instant, QueueId)>) {
    crate::wakeups::run(rx, |(dir, queue): QueueId| relay.wake(dir, &queue)).await
}
