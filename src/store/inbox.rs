//! Device inboxes: the to-device messages waiting for a local device's `/sync`.
//!
//! Key layout:
//! - `inbox`:       `user_id \0 device_id \0 seq(be64)` -> event JSON `{sender,type,content}`
//! - `inbox_state`: `user_id \0 device_id` -> JSON [`InboxState`]
//!
//! `seq` is numbered by [`Store::append`], so a device's messages sort in arrival
//! order and a sync token is just the last `seq` served. Acknowledging up to `T`
//! deletes the rows in `(acked, T]` (point deletes, found by a scan that starts above
//! the remembered low-water mark `acked`) and raises `acked`, so a later read seeks
//! straight past everything acknowledged instead of walking its tombstones.
//! Housekeeping may also cut an inbox from below ([`Store::inbox_trim`]): the same
//! range delete and low-water mark, without counting as a sync.
//! Reads go through the block cache (see `store::queue_read_options` for why outbox
//! reads do not).
//! Nothing here decides when to acknowledge or trim: `/sync` and housekeeping do.

use serde::{Deserialize, Serialize};

use super::{Batch, Store, StoreError, cf, key, now_ms, prefix_end};

/// Per-device bookkeeping.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxState {
    /// Everything at or below this position has been acknowledged and deleted.
    pub acked: u64,
    /// When the device last synced (ms).
    pub last_sync_ts: Option<u64>,
}

/// Messages of one device, oldest first: `(seq, event JSON)`.
pub type Page = Vec<(u64, Vec<u8>)>;

fn device_prefix(user: &str, device: &str) -> Vec<u8> {
    key(&[user.as_bytes(), device.as_bytes(), b""])
}

pub(crate) fn entry_key(user: &str, device: &str, seq: u64) -> Vec<u8> {
    let mut k = device_prefix(user, device);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The position in an entry key found under `prefix` (the inverse of [`entry_key`]).
fn entry_seq(prefix: &[u8], key: &[u8]) -> Result<u64, StoreError> {
    super::read_u64(&key[prefix.len()..]).ok_or(StoreError::Corrupt {
        cf: cf::INBOX,
        detail: "short key".into(),
    })
}

impl Store {
    /// Test-only: production rows are numbered by [`Store::append`]'s writer.
    #[cfg(test)]
    /// Adds a message to a device inbox at position `seq` (in `b`).
    pub(crate) fn inbox_push(
        &self,
        b: &mut Batch,
        user: &str,
        device: &str,
        seq: u64,
        event: &[u8],
    ) {
        b.0.put_cf(self.cf(cf::INBOX), entry_key(user, device, seq), event);
    }

    /// Up to `limit` messages after position `after`, oldest first.
    pub fn inbox_page(
        &self,
        user: &str,
        device: &str,
        after: u64,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let state = self.inbox_state(user, device)?;
        self.inbox_page_above(user, device, after.max(state.acked), limit)
    }

    /// Up to `limit` messages after position `above`, oldest first, for a caller that
    /// already knows the device's low-water mark (a `/sync` that has just written
    /// it): no state lookup. An `above` below the mark is still correct, only slower
    /// (the scan walks the tombstones in between).
    pub fn inbox_page_above(
        &self,
        user: &str,
        device: &str,
        above: u64,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let prefix = device_prefix(user, device);
        let start = entry_key(user, device, above.saturating_add(1));
        let mut out = Vec::new();
        for item in self.scan_from(cf::INBOX, &prefix, &start).take(limit) {
            let (k, v) = item?;
            let seq = entry_seq(&prefix, &k)?;
            out.push((seq, v.into_vec()));
        }
        Ok(out)
    }

    /// Number of messages pending for a device (walks them: admin and tests only).
    pub fn inbox_len(&self, user: &str, device: &str) -> Result<usize, StoreError> {
        Ok(self.scan(cf::INBOX, &device_prefix(user, device)).count())
    }

    /// Acknowledges everything up to and including `upto` (in `b`).
    pub fn inbox_ack(
        &self,
        b: &mut Batch,
        user: &str,
        device: &str,
        upto: u64,
    ) -> Result<(), StoreError> {
        self.inbox_sync(b, user, device, upto, 0).map(|_| ())
    }

    /// A sync's work in one pass over a device's pending rows: acknowledges
    /// everything up to and including `upto` (in `b`) and returns up to `limit`
    /// messages after it, oldest first, with the device's state as `b` records it.
    ///
    /// The acknowledged rows get point deletes, not a range tombstone: RocksDB
    /// re-fragments every range tombstone in the memtable on each read, and one per
    /// sync made reads quadratic (measured: most of a busy receiver's CPU). Rows at
    /// or below the low-water mark `acked` are gone already and never scanned: the
    /// pass starts above it, so it walks the page being acknowledged (the keys its
    /// deletes need) and then the next page, from one seek.
    pub fn inbox_sync(
        &self,
        b: &mut Batch,
        user: &str,
        device: &str,
        upto: u64,
        limit: usize,
    ) -> Result<(Page, InboxState), StoreError> {
        let mut state = self.inbox_state(user, device)?;
        let prefix = device_prefix(user, device);
        let start = entry_key(user, device, state.acked.saturating_add(1));
        let mut page = Vec::new();
        for item in self.scan_from(cf::INBOX, &prefix, &start) {
            let (k, v) = item?;
            let seq = entry_seq(&prefix, &k)?;
            if seq <= upto {
                b.0.delete_cf(self.cf(cf::INBOX), k);
            } else if page.len() < limit {
                page.push((seq, v.into_vec()));
            } else {
                break;
            }
        }
        state.acked = state.acked.max(upto);
        state.last_sync_ts = Some(now_ms());
        b.0.put_cf(
            self.cf(cf::INBOX_STATE),
            key(&[user.as_bytes(), device.as_bytes()]),
            serde_json::to_vec(&state).expect("serializes"),
        );
        Ok((page, state))
    }

    pub fn inbox_state(&self, user: &str, device: &str) -> Result<InboxState, StoreError> {
        let k = key(&[user.as_bytes(), device.as_bytes()]);
        match self.db().get_pinned_cf(self.cf(cf::INBOX_STATE), k)? {
            None => Ok(InboxState::default()),
            Some(v) => serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                cf: cf::INBOX_STATE,
                detail: e.to_string(),
            }),
        }
    }

    /// Drops the oldest pending messages of a device so that at most `keep` remain (in
    /// `b`); returns how many it drops. The cut is one range delete plus a raised
    /// low-water mark, like an acknowledgement, but it is not one: `last_sync_ts` is
    /// left as it was. Walks the device's pending keys (never their values) from the
    /// newest down: housekeeping only, never on a request path.
    pub fn inbox_trim(
        &self,
        b: &mut Batch,
        user: &str,
        device: &str,
        keep: u64,
    ) -> Result<u64, StoreError> {
        let mut state = self.inbox_state(user, device)?;
        let prefix = device_prefix(user, device);
        let end = prefix_end(&prefix);
        let mut opts = rocksdb::ReadOptions::default();
        opts.set_iterate_lower_bound(entry_key(user, device, state.acked.saturating_add(1)));
        opts.set_iterate_upper_bound(end.clone());
        let mut it = self.db().raw_iterator_cf_opt(self.cf(cf::INBOX), opts);
        it.seek_for_prev(&end);
        let mut pending = 0u64;
        let mut cut = None;
        while let Some(k) = it.key() {
            pending += 1;
            if pending == keep.saturating_add(1) {
                cut = Some(entry_seq(&prefix, k)?);
            }
            it.prev();
        }
        it.status()?;
        let Some(cut) = cut else {
            return Ok(0);
        };
        b.0.delete_range_cf(
            self.cf(cf::INBOX),
            entry_key(user, device, 0),
            entry_key(user, device, cut.saturating_add(1)),
        );
        state.acked = state.acked.max(cut);
        b.0.put_cf(
            self.cf(cf::INBOX_STATE),
            key(&[user.as_bytes(), device.as_bytes()]),
            serde_json::to_vec(&state).expect("serializes"),
        );
        Ok(pending - keep)
    }

    /// Deletes a device's whole inbox and its bookkeeping (in `b`).
    pub fn inbox_delete_all(&self, b: &mut Batch, user: &str, device: &str) {
        let prefix = device_prefix(user, device);
        b.0.delete_range_cf(self.cf(cf::INBOX), prefix.clone(), prefix_end(&prefix));
        b.0.delete_cf(
            self.cf(cf::INBOX_STATE),
            key(&[user.as_bytes(), device.as_bytes()]),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Batch, temp_store};

    #[tokio::test]
    async fn page_ack_and_low_water_mark() {
        let (_d, s) = temp_store();
        let mut b = Batch::new();
        for i in 1..=5u64 {
            s.inbox_push(&mut b, "@a:x", "D", i * 10, format!("m{i}").as_bytes());
        }
        s.inbox_push(&mut b, "@a:x", "D2", 15, b"other device");
        s.commit(b).await.unwrap();
        let page = s.inbox_page("@a:x", "D", 0, 3).unwrap();
        assert_eq!(
            page.iter().map(|p| p.0).collect::<Vec<_>>(),
            vec![10, 20, 30]
        );
        let page = s.inbox_page("@a:x", "D", 30, 100).unwrap();
        assert_eq!(page.iter().map(|p| p.0).collect::<Vec<_>>(), vec![40, 50]);
        let mut b = Batch::new();
        s.inbox_ack(&mut b, "@a:x", "D", 30).unwrap();
        s.commit(b).await.unwrap();
        // Even an older token no longer sees acknowledged messages.
        let page = s.inbox_page("@a:x", "D", 0, 100).unwrap();
        assert_eq!(page.iter().map(|p| p.0).collect::<Vec<_>>(), vec![40, 50]);
        assert_eq!(s.inbox_len("@a:x", "D").unwrap(), 2);
        assert_eq!(
            s.inbox_len("@a:x", "D2").unwrap(),
            1,
            "other devices untouched"
        );
        assert_eq!(s.inbox_state("@a:x", "D").unwrap().acked, 30);
        let mut b = Batch::new();
        s.inbox_delete_all(&mut b, "@a:x", "D");
        s.commit(b).await.unwrap();
        assert_eq!(s.inbox_len("@a:x", "D").unwrap(), 0);
        assert_eq!(s.inbox_len("@a:x", "D2").unwrap(), 1);
    }

    #[tokio::test]
    async fn sync_acknowledges_and_pages_in_one_pass() {
        let (_d, s) = temp_store();
        let mut b = Batch::new();
        for i in 1..=7u64 {
            s.inbox_push(&mut b, "@a:x", "D", i * 10, format!("m{i}").as_bytes());
        }
        s.inbox_push(&mut b, "@a:x", "D2", 25, b"other device");
        s.commit(b).await.unwrap();
        let seqs = |page: &[(u64, Vec<u8>)]| page.iter().map(|p| p.0).collect::<Vec<_>>();

        // First sync: nothing to acknowledge, a page of 3.
        let mut b = Batch::new();
        let (page, st) = s.inbox_sync(&mut b, "@a:x", "D", 0, 3).unwrap();
        s.commit(b).await.unwrap();
        assert_eq!(seqs(&page), vec![10, 20, 30]);
        assert_eq!(st.acked, 0);
        assert!(st.last_sync_ts.is_some(), "a sync is recorded");

        // Next: acknowledges that page (deleted), serves the next one.
        let mut b = Batch::new();
        let (page, st) = s.inbox_sync(&mut b, "@a:x", "D", 30, 3).unwrap();
        s.commit(b).await.unwrap();
        assert_eq!(seqs(&page), vec![40, 50, 60]);
        assert_eq!(st.acked, 30);
        assert_eq!(s.inbox_len("@a:x", "D").unwrap(), 4, "10, 20, 30 deleted");
        assert_eq!(s.inbox_state("@a:x", "D").unwrap(), st, "state as recorded");

        // An older token gets nothing already acknowledged back.
        let mut b = Batch::new();
        let (page, _) = s.inbox_sync(&mut b, "@a:x", "D", 0, 100).unwrap();
        assert_eq!(seqs(&page), vec![40, 50, 60, 70]);
        // Acknowledging in the middle of a page: only up to the token.
        let mut b = Batch::new();
        let (page, st) = s.inbox_sync(&mut b, "@a:x", "D", 50, 100).unwrap();
        s.commit(b).await.unwrap();
        assert_eq!((seqs(&page), st.acked), (vec![60, 70], 50));
        assert_eq!(s.inbox_len("@a:x", "D").unwrap(), 2);
        assert_eq!(
            s.inbox_len("@a:x", "D2").unwrap(),
            1,
            "other devices untouched"
        );
    }

    #[tokio::test]
    async fn trim_keeps_the_newest_and_is_not_a_sync() {
        let (_d, s) = temp_store();
        let mut b = Batch::new();
        for i in 1..=6u64 {
            s.inbox_push(&mut b, "@a:x", "D", i, b"m");
        }
        s.inbox_push(&mut b, "@a:x", "D2", 3, b"other device");
        s.commit(b).await.unwrap();
        let mut b = Batch::new();
        s.inbox_ack(&mut b, "@a:x", "D", 1).unwrap();
        s.commit(b).await.unwrap();
        let synced = s.inbox_state("@a:x", "D").unwrap().last_sync_ts;

        let mut b = Batch::new();
        assert_eq!(
            s.inbox_trim(&mut b, "@a:x", "D", 10).unwrap(),
            0,
            "under the bound"
        );
        assert!(b.is_empty(), "nothing to write when nothing is dropped");
        assert_eq!(
            s.inbox_trim(&mut b, "@a:x", "D", 3).unwrap(),
            2,
            "5 pending, keep 3"
        );
        s.commit(b).await.unwrap();
        let page = s.inbox_page("@a:x", "D", 0, 100).unwrap();
        assert_eq!(page.iter().map(|p| p.0).collect::<Vec<_>>(), vec![4, 5, 6]);
        let st = s.inbox_state("@a:x", "D").unwrap();
        assert_eq!((st.acked, st.last_sync_ts), (3, synced));

        let mut b = Batch::new();
        assert_eq!(s.inbox_trim(&mut b, "@a:x", "D", 0).unwrap(), 3, "purge");
        s.commit(b).await.unwrap();
        assert_eq!(s.inbox_len("@a:x", "D").unwrap(), 0);
        assert_eq!(
            s.inbox_len("@a:x", "D2").unwrap(),
            1,
            "other devices untouched"
        );
        let mut b = Batch::new();
        assert_eq!(
            s.inbox_trim(&mut b, "@a:x", "D", 0).unwrap(),
            0,
            "empty inbox"
        );
    }
}
