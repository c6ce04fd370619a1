//! What to do after a delivery attempt, and when to try again. Pure: no clock, no I/O.
//!
//! Owns the classification of a destination's answer ([`Outcome`]) and the backoff
//! schedule (`initial * multiplier^(failures-1)`, capped, with ±20 % jitter). The
//! state it computes is persisted by the sender in `store::outbox` (`DestState`), so
//! a restart neither forgets a dead server nor hammers it.

use std::time::Duration;

/// What an attempt's answer means for the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 200: the EDUs are the destination's now; delete them.
    Delivered,
    /// Try the same transaction again later: no answer, 5xx, 401, 408, 429, and the
    /// answers that speak of the address rather than of the transaction (3xx, 404,
    /// 405: a reverse proxy in maintenance or misrouted). Those say nothing about the
    /// EDUs; splitting and parking on them would park a whole queue in seconds.
    Retry,
    /// The destination refuses this transaction for good (other 4xx): split it, or
    /// park its single EDU.
    Refused,
}

/// Classifies an HTTP status (`None` = no answer: connection error or timeout).
pub fn classify(status: Option<u16>) -> Outcome {
    match status {
        Some(200..=299) => Outcome::Delivered,
        None | Some(300..=399) | Some(401) | Some(404) | Some(405) | Some(408) | Some(429)
        | Some(500..) => Outcome::Retry,
        Some(_) => Outcome::Refused,
    }
}

/// The backoff policy (from `[federation]`).
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub initial: Duration,
    pub multiplier: f64,
    pub max: Duration,
}

impl Policy {
    /// The wait after the `failures`-th consecutive failure (1-based), with `jitter`
    /// in [0, 1) spreading it over ±20 %; never above `max`.
    pub fn delay(&self, failures: u32, jitter: f64) -> Duration {
        let exp = failures.saturating_sub(1).min(64) as i32;
        let base = self.initial.as_secs_f64() * self.multiplier.powi(exp);
        let capped = base.min(self.max.as_secs_f64());
        let spread = capped * (0.8 + 0.4 * jitter.clamp(0.0, 1.0));
        Duration::from_secs_f64(spread.min(self.max.as_secs_f64()))
    }

    /// How long a queue scheduled for `next_attempt_ts` (wall clock, ms) still waits
    /// at `now`; `None` when it is due. A schedule further ahead than this policy
    /// ever sets one is due as well: the clock stepped back since it was written (or
    /// `max` was lowered), and honouring it would stall the queue for as long as the
    /// step, across restarts, since the schedule is persisted.
    pub fn remaining(&self, next_attempt_ts: u64, now: u64) -> Option<Duration> {
        let ahead = Duration::from_millis(next_attempt_ts.checked_sub(now)?);
        (!ahead.is_zero() && ahead <= self.max).then_some(ahead)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Policy = Policy {
        initial: Duration::from_secs(5),
        multiplier: 2.0,
        max: Duration::from_secs(7200),
    };

    #[test]
    fn classification() {
        assert_eq!(classify(Some(200)), Outcome::Delivered);
        for s in [None, Some(401), Some(429), Some(500), Some(502), Some(503)] {
            assert_eq!(classify(s), Outcome::Retry, "{s:?}");
        }
        for s in [301, 302, 307, 404, 405, 408] {
            assert_eq!(classify(Some(s)), Outcome::Retry, "{s}");
        }
        for s in [400, 403, 413, 422] {
            assert_eq!(classify(Some(s)), Outcome::Refused, "{s}");
        }
    }

    #[test]
    fn a_schedule_beyond_the_policy_is_due() {
        let now = 1_000_000_000;
        assert_eq!(P.remaining(now - 1, now), None);
        assert_eq!(P.remaining(now, now), None);
        assert_eq!(P.remaining(now + 5000, now), Some(Duration::from_secs(5)));
        let max = P.max.as_millis() as u64;
        assert_eq!(P.remaining(now + max, now), Some(P.max));
        // Written before the clock stepped back a day.
        assert_eq!(P.remaining(now + max + 1, now), None);
        assert_eq!(P.remaining(now + 86_400_000, now), None);
    }

    #[test]
    fn schedule_grows_then_caps() {
        let mid: Vec<u64> = (1..=12).map(|n| P.delay(n, 0.5).as_secs()).collect();
        assert_eq!(
            mid,
            vec![5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560, 5120, 7200]
        );
        assert_eq!(P.delay(1000, 0.5), Duration::from_secs(7200));
    }

    #[test]
    fn jitter_stays_within_bounds() {
        for n in 1..20 {
            for j in [0.0, 0.3, 0.999] {
                let d = P.delay(n, j).as_secs_f64();
                let mid = P.delay(n, 0.5).as_secs_f64();
                assert!(
                    d >= mid * 0.8 - 1e-9 && d <= (mid * 1.2).min(7200.0) + 1e-9,
                    "{n} {j} {d}"
                );
            }
        }
        assert!(P.delay(1, 0.0) < P.delay(1, 0.99));
    }
}
