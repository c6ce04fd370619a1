//! The periodic pass over device inboxes: the two policies that make courier drop
//! messages nobody acknowledged. Both are logged and counted, never silent.
//!
//! - Inactive devices: a device whose last `/sync` (or, if it never synced, its
//!   creation) is older than `client.inactive_device_purge` has its pending messages
//!   purged. Messages that reach it later are purged by the next pass, until it syncs.
//! - Bounded inboxes: a device with more than `client.max_inbox_messages` pending
//!   loses the oldest, down to the bound. The bound is enforced here, not on push: the
//!   request paths stay free of per-device counting, and an inbox may run over it by
//!   what arrives between two passes.
//!
//! A pass walks every device and, per device, its pending keys (not values), on the
//! blocking pool. Deletions are range deletes written unsynced: one lost to a power cut
//! is simply done again by the next pass. It never deletes a device, never touches a
//! device that is within its bounds, and never runs on a request path.

use std::time::Duration;

use crate::app::App;
use crate::store::{Batch, Store, StoreError, now_ms};

/// Longest pause between two passes.
pub const MAX_INTERVAL: Duration = Duration::from_secs(600);
/// Shortest pause between two passes (for tiny test periods).
const MIN_INTERVAL: Duration = Duration::from_millis(200);
/// Longest wait before the first pass after start.
const FIRST_PASS_MAX: Duration = Duration::from_secs(30);

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub devices: usize,
    pub purged_devices: usize,
    pub purged_messages: u64,
    pub trimmed_devices: usize,
    pub trimmed_messages: u64,
}

/// The pause between passes: half the inactivity period (so a purge is late by at most
/// half a period), at most [`MAX_INTERVAL`].
pub fn interval(inactive_device_purge: Duration) -> Duration {
    (inactive_device_purge / 2).clamp(MIN_INTERVAL, MAX_INTERVAL)
}

/// Runs passes forever: the first shortly after start, then every [`interval`].
/// Spawn it once from `server::run`.
pub async fn run(app: App) {
    let every = interval(app.config.client.inactive_device_purge);
    tokio::time::sleep(every.min(FIRST_PASS_MAX)).await;
    loop {
        let store = app.store.clone();
        let inactive_after = app.config.client.inactive_device_purge;
        let max_inbox = app.config.client.max_inbox_messages;
        let started = std::time::Instant::now();
        match tokio::task::spawn_blocking(move || pass(&store, now_ms(), inactive_after, max_inbox))
            .await
        {
            Ok(Ok(r)) => tracing::debug!(
                devices = r.devices,
                purged_devices = r.purged_devices,
                purged_messages = r.purged_messages,
                trimmed_devices = r.trimmed_devices,
                trimmed_messages = r.trimmed_messages,
                took_ms = started.elapsed().as_millis() as u64,
                "housekeeping pass done"
            ),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "housekeeping pass failed; retrying at the next one")
            }
            Err(e) => tracing::error!(error = %e, "housekeeping pass panicked"),
        }
        tokio::time::sleep(every).await;
    }
}

/// One pass over every device, as of `now` (ms).
pub fn pass(
    store: &Store,
    now: u64,
    inactive_after: Duration,
    max_inbox: u64,
) -> Result<Report, StoreError> {
    let inactive_ms = u64::try_from(inactive_after.as_millis()).unwrap_or(u64::MAX);
    let mut report = Report::default();
    for item in store.device_records() {
        let (user, device, record) = item?;
        report.devices += 1;
        let last_active = store
            .inbox_state(&user, &device)?
            .last_sync_ts
            .unwrap_or(record.created_ts);
        let idle_ms = now.saturating_sub(last_active);
        let inactive = idle_ms > inactive_ms;
        let mut b = Batch::new();
        let dropped =
            store.inbox_trim(&mut b, &user, &device, if inactive { 0 } else { max_inbox })?;
        if dropped == 0 {
            continue;
        }
        store.commit_unsynced(b)?;
        if inactive {
            report.purged_devices += 1;
            report.purged_messages += dropped;
            metrics::counter!("courier_inbox_purged_messages_total").increment(dropped);
            tracing::info!(
                user = %user, device = %device, messages = dropped, idle_s = idle_ms / 1000,
                "purged the pending messages of an inactive device"
            );
        } else {
            report.trimmed_devices += 1;
            report.trimmed_messages += dropped;
            metrics::counter!("courier_inbox_dropped_messages_total").increment(dropped);
            tracing::warn!(
                user = %user, device = %device, messages = dropped, bound = max_inbox,
                "device inbox over its bound: dropped the oldest messages"
            );
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::temp_store;

    const HOUR: u64 = 3_600_000;

    async fn push(s: &Store, user: &str, device: &str, n: u64) {
        let ops = (0..n)
            .map(|i| crate::store::Append::Inbox {
                user: user.into(),
                device: device.into(),
                event: format!("{{\"n\":{i}}}").into_bytes(),
            })
            .collect();
        s.append(ops).await.unwrap();
    }

    #[tokio::test]
    async fn purges_inactive_trims_overfull_spares_the_rest() {
        let (_d, s) = temp_store();
        for d in ["IDLE", "FULL", "FINE", "NEVER"] {
            s.add_device("@a:x", d).await.unwrap();
        }
        let now = now_ms();
        push(&s, "@a:x", "IDLE", 3).await;
        push(&s, "@a:x", "FULL", 7).await;
        push(&s, "@a:x", "FINE", 2).await;
        push(&s, "@a:x", "NEVER", 2).await;
        // Three devices sync now (acknowledging nothing); NEVER never syncs.
        for d in ["FINE", "FULL", "IDLE"] {
            let mut b = Batch::new();
            s.inbox_ack(&mut b, "@a:x", d, 0).unwrap();
            s.commit(b).await.unwrap();
        }
        let in_a_day = now + 24 * HOUR;
        // As seen a day later with a 2-day period: nobody is inactive, FULL is trimmed.
        let r = pass(&s, in_a_day, Duration::from_millis(48 * HOUR), 5).unwrap();
        assert_eq!(
            (
                r.devices,
                r.purged_devices,
                r.trimmed_devices,
                r.trimmed_messages
            ),
            (4, 0, 1, 2)
        );
        let left: Vec<u64> = s
            .inbox_page("@a:x", "FULL", 0, 100)
            .unwrap()
            .iter()
            .map(|p| p.0)
            .collect();
        assert_eq!(left.len(), 5);
        assert!(
            left.windows(2).all(|w| w[0] < w[1]),
            "the newest are kept, in order"
        );
        // With a 1-hour period, a day later: everyone idle, every inbox purged.
        let r = pass(&s, in_a_day, Duration::from_millis(HOUR), 5).unwrap();
        assert_eq!((r.purged_devices, r.purged_messages), (4, 3 + 5 + 2 + 2));
        for d in ["IDLE", "FULL", "FINE", "NEVER"] {
            assert_eq!(s.inbox_len("@a:x", d).unwrap(), 0, "{d}");
        }
        assert!(
            s.inbox_state("@a:x", "NEVER")
                .unwrap()
                .last_sync_ts
                .is_none(),
            "a purge is not a sync"
        );
        // Nothing left to do: a second pass changes nothing.
        let r = pass(&s, in_a_day, Duration::from_millis(HOUR), 5).unwrap();
        assert_eq!(
            r,
            Report {
                devices: 4,
                ..Report::default()
            }
        );
        assert_eq!(
            s.device_ids("@a:x").unwrap().len(),
            4,
            "devices are never deleted"
        );
    }

    #[test]
    fn interval_follows_the_period_within_bounds() {
        assert_eq!(interval(Duration::from_secs(30 * 86400)), MAX_INTERVAL);
        assert_eq!(interval(Duration::from_secs(4)), Duration::from_secs(2));
        assert_eq!(interval(Duration::ZERO), MIN_INTERVAL);
    }
}
