//! How many transactions may be in flight at once, over all destinations: a limit
//! that follows the round trips it sees.
//!
//! Every transaction costs the origin about the same whatever it carries (a
//! signature, an HTTPS request, a bookkeeping write), so a transaction sent the
//! moment a permit is free carries only what arrived since the last one. When the
//! origin itself is the bottleneck (its CPU: round trips lengthen because its own
//! tasks queue), many small transactions in flight only lengthen each other's round
//! trips, and the EDUs they could have carried together cost a transaction each:
//! with 1000 busy destinations and 256 permits, transactions carried ~6 EDUs; with
//! 32, ~56, and the same machine delivered twice as much.
//!
//! So the limit moves between a floor and `max_concurrent_transactions`: each
//! acknowledged transaction's round trip is compared with the fastest seen for its
//! destination (so a far server's long round trips are its normal, not a sign of
//! load); much slower, while transactions are small on average (under 35 % of the
//! EDUs or rows one may carry), lowers the limit by one; otherwise it creeps up.
//! Destinations then wait for a permit and their transactions grow; transactions
//! that are already large gain little from waiting (with every request to all 1000
//! destinations, ~45 EDUs each, lowering the limit for them mostly added latency),
//! and far servers on a quiet origin keep the whole ceiling.
//!
//! Owns the count of transactions in flight and the per-destination fastest round
//! trips. Must never block a transaction below the floor, nor read a clock itself
//! (callers pass the round trips).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};

/// The limit never goes below this (nor above the configured ceiling).
pub const FLOOR: usize = 32;
/// A round trip this many times its destination's fastest counts as slow.
const SLOW: f64 = 4.0;
/// Added to the limit per round trip that was not slow (the limit climbs from the
/// floor to 256 in ~2,200 of them).
const CLIMB: f64 = 0.1;
/// Transactions fuller than this on average (of the EDUs or rows one may carry)
/// gain little from being fuller: the limit is lowered only below it.
const FULL_ENOUGH: f64 = 0.35;
/// Weight of one transaction in the running average of how full they are.
const FILL_WEIGHT: f64 = 1.0 / 64.0;
/// A destination's fastest round trip creeps up by this share per sample, so a
/// path that became slower for good is accepted as its new normal.
const BASELINE_CREEP: f64 = 1.0 / 256.0;

/// Permits are a FIFO semaphore's (a destination that just finished a transaction
/// cannot overtake one that has waited: unfair hand-outs measured p99 ~9 s with 1000
/// destinations); the limit adds permits to it or retires them.
pub struct Limit {
    permits: Semaphore,
    state: Mutex<State>,
}

struct State {
    limit: f64,
    floor: f64,
    ceiling: f64,
    /// Permits in existence (free or held): the limit, once `retire` are gone.
    issued: usize,
    /// Permits to retire as they come back (lowered while all were held).
    retire: usize,
    /// Running average of how full transactions are (0 to 1).
    fill: f64,
    /// Fastest recent round trip per destination, in seconds.
    fastest: HashMap<String, f64>,
}

/// One transaction's place in flight; dropping it frees the place.
pub struct Permit<'a> {
    limit: &'a Limit,
    permit: Option<SemaphorePermit<'a>>,
}

impl Limit {
    /// Starts at the ceiling (a quiet origin sends as soon as it can).
    pub fn new(ceiling: usize) -> Limit {
        let ceiling = ceiling.max(1);
        Limit {
            permits: Semaphore::new(ceiling),
            state: Mutex::new(State {
                limit: ceiling as f64,
                floor: ceiling.min(FLOOR) as f64,
                ceiling: ceiling as f64,
                issued: ceiling,
                retire: 0,
                fill: 1.0,
                fastest: HashMap::new(),
            }),
        }
    }

    pub fn try_acquire(&self) -> Option<Permit<'_>> {
        let permit = self.permits.try_acquire().ok()?;
        Some(Permit {
            limit: self,
            permit: Some(permit),
        })
    }

    pub async fn acquire(&self) -> Permit<'_> {
        let permit = self
            .permits
            .acquire()
            .await
            .expect("the semaphore is never closed");
        Permit {
            limit: self,
            permit: Some(permit),
        }
    }

    /// Places free now.
    pub fn available(&self) -> usize {
        self.permits.available_permits()
    }

    /// The limit now.
    pub fn current(&self) -> usize {
        let s = self.state.lock().expect("limit");
        s.issued - s.retire
    }

    /// `dest` acknowledged a transaction after `rtt`; `fill`: how full it was, 0 to 1
    /// (the larger of its share of the EDUs and of the rows a transaction may carry).
    pub fn observe(&self, dest: &str, rtt: Duration, fill: f64) {
        let rtt = rtt.as_secs_f64();
        let mut s = self.state.lock().expect("limit");
        s.fill += (fill.clamp(0.0, 1.0) - s.fill) * FILL_WEIGHT;
        let roomy = s.fill < FULL_ENOUGH;
        let fastest = match s.fastest.get_mut(dest) {
            Some(f) => {
                *f = (*f * (1.0 + BASELINE_CREEP)).min(rtt);
                *f
            }
            None => {
                s.fastest.insert(dest.to_owned(), rtt);
                rtt
            }
        };
        s.limit = if roomy && rtt > fastest * SLOW {
            (s.limit - 1.0).max(s.floor)
        } else {
            (s.limit + CLIMB).min(s.ceiling)
        };
        let target = s.limit as usize;
        while s.issued - s.retire > target {
            match self.permits.try_acquire() {
                Ok(p) => {
                    p.forget();
                    s.issued -= 1;
                }
                Err(_) => s.retire += 1,
            }
        }
        while s.issued - s.retire < target {
            if s.retire > 0 {
                s.retire -= 1;
            } else {
                self.permits.add_permits(1);
                s.issued += 1;
            }
        }
        metrics::gauge!("courier_federation_transaction_limit").set((s.issued - s.retire) as f64);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut s = self.limit.state.lock().expect("limit");
        let permit = self.permit.take().expect("set until drop");
        if s.retire > 0 {
            s.retire -= 1;
            s.issued -= 1;
            permit.forget();
        }
        // Otherwise the permit goes back to the semaphore (its first waiter) here.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn slow_round_trips_of_small_transactions_lower_the_limit_to_the_floor() {
        let l = Limit::new(256);
        assert_eq!(l.current(), 256);
        l.observe("a", 2 * MS, 0.1);
        for _ in 0..50 {
            l.observe("a", 200 * MS, 0.1);
        }
        assert_eq!(
            l.current(),
            256,
            "the average fill is still over the line after 50 small ones"
        );
        for _ in 0..550 {
            l.observe("a", 200 * MS, 0.1);
        }
        assert_eq!(l.current(), FLOOR, "never below the floor");
        for _ in 0..100 {
            l.observe("a", 2 * MS, 0.1);
        }
        assert!(
            (FLOOR + 9..=FLOOR + 10).contains(&l.current()),
            "climbs back slowly: {}",
            l.current()
        );
        for _ in 0..10_000 {
            l.observe("a", 2 * MS, 0.1);
        }
        assert_eq!(l.current(), 256, "never above the ceiling");
    }

    #[test]
    fn full_transactions_do_not_lower_the_limit() {
        let l = Limit::new(256);
        l.observe("a", MS, 0.1);
        for _ in 0..100 {
            l.observe("a", 20 * MS, 1.0);
        }
        assert_eq!(l.current(), 256);
    }

    #[test]
    fn a_limit_lowered_while_all_are_held_retires_them_as_they_return() {
        let l = Limit::new(40);
        for _ in 0..100 {
            l.observe("a", MS, 0.0);
        }
        let held: Vec<_> = (0..40).map(|_| l.try_acquire().unwrap()).collect();
        for _ in 0..5 {
            l.observe("a", 20 * MS, 0.0);
        }
        assert_eq!(l.current(), 35);
        drop(held);
        assert_eq!(l.available(), 35, "five retired on their way back");
    }

    #[test]
    fn a_far_destination_is_judged_by_its_own_round_trips() {
        let l = Limit::new(256);
        l.observe("near", MS, 0.1);
        for _ in 0..200 {
            l.observe("far", 300 * MS, 0.1);
            l.observe("near", MS, 0.1);
        }
        assert_eq!(l.current(), 256);
        assert_eq!(
            Limit::new(8).current(),
            8,
            "a ceiling under the floor holds"
        );
    }

    #[test]
    fn a_path_that_became_slower_is_accepted_in_time() {
        let l = Limit::new(256);
        l.observe("a", MS, 0.1);
        for _ in 0..400 {
            l.observe("a", 10 * MS, 0.1);
        }
        let low = l.current();
        for _ in 0..400 {
            l.observe("a", 10 * MS, 0.1);
        }
        assert!(low < 256 && l.current() > low, "{low} -> {}", l.current());
    }

    #[tokio::test]
    async fn permits_up_to_the_limit_and_waiters_get_freed_ones() {
        let l = Limit::new(2);
        let a = l.try_acquire().unwrap();
        let _b = l.try_acquire().unwrap();
        assert!(l.try_acquire().is_none());
        assert_eq!(l.available(), 0);
        let waiting = l.acquire();
        tokio::pin!(waiting);
        assert!(futures::poll!(waiting.as_mut()).is_pending());
        drop(a);
        assert!(futures::poll!(waiting.as_mut()).is_ready());
    }
}
