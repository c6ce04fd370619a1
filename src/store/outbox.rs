//! Per-destination outbound queues and their delivery state.
//!
//! Key layout:
//! - `outbox`:       `destination \0 seq(be64)` -> EDU JSON (one `m.direct_to_device` EDU)
//! - `destinations`: `destination` -> JSON [`DestState`] (backoff, in-flight transaction)
//! - `parked`:       `destination \0 seq(be64)` -> JSON `{reason, edu}`
//!
//! A destination's EDUs sort in enqueue order. A transaction is a prefix of the queue:
//! the in-flight record names its txnId and its last `seq`, so a retry rebuilds the
//! very same body, and the destination's 200 deletes exactly those EDUs (point deletes
//! in one batch: range tombstones, one per transaction, made reads slow). Nothing leaves `outbox` but by that acknowledgement or by parking (an EDU a
//! destination refused for good, kept with its reason). A parked EDU returns only by an
//! operator's requeue, as a new row at the end of its queue written in the same commit
//! that deletes it from `parked`. Nothing is trimmed at start.

use serde::{Deserialize, Serialize};

use super::{Batch, Store, StoreError, cf, key, prefix_end, read_u64};

/// The transaction currently being delivered to a destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inflight {
    pub txn_id: String,
    /// The transaction carries the queue's EDUs up to and including this position.
    pub last_seq: u64,
    pub edu_count: usize,
    /// `origin_server_ts` of the transaction, kept so a retry is byte-identical.
    pub origin_server_ts: u64,
}

/// Delivery state of one destination; the default means "healthy, idle".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DestState {
    /// Consecutive failed attempts.
    pub failures: u32,
    /// Do not try before this time (ms); 0 = now.
    pub next_attempt_ts: u64,
    pub last_error: Option<String>,
    pub inflight: Option<Inflight>,
    /// Counter for fresh transaction ids.
    pub txn_counter: u64,
    /// Low-water mark: every EDU at or below this position has left the queue
    /// (acknowledged or parked). Reads seek past it instead of walking the point
    /// deletes the acknowledgements left behind (they stay in RocksDB's memtable until
    /// it flushes, and a scan from the queue's start stepped over every one of them:
    /// most of a busy origin's CPU). Absent in records written before it existed.
    #[serde(default)]
    pub acked_seq: u64,
}

/// One queued EDU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedEdu {
    pub seq: u64,
    pub edu: Vec<u8>,
}

/// One EDU a destination refused for good, as `parked` keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedEdu {
    /// Its position in the queue it left.
    pub seq: u64,
    /// Why: the destination's answer (`HTTP 400: ...`).
    pub reason: String,
    /// The EDU, as it was queued (JSON text).
    pub edu: String,
}

#[derive(Deserialize)]
struct ParkedRecord {
    reason: String,
    edu: String,
}

/// The budget of one read of a queue head ([`Store::outbox_head`], from either
/// source): at most `max_count` rows, none past `upto_seq`, and at most `max_bytes`
/// in all but always at least one row. Both sources take it as it is given, fresh.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeadBudget {
    max_count: usize,
    max_bytes: usize,
    upto_seq: Option<u64>,
    count: usize,
    bytes: usize,
}

impl HeadBudget {
    pub(crate) fn new(max_count: usize, max_bytes: usize, upto_seq: Option<u64>) -> HeadBudget {
        HeadBudget {
            max_count,
            max_bytes,
            upto_seq,
            count: 0,
            bytes: 0,
        }
    }

    /// Whether the next row (`seq`, `len` bytes) is within the budget; counts it if so.
    pub(crate) fn take(&mut self, seq: u64, len: usize) -> bool {
        if self.upto_seq.is_some_and(|u| seq > u) || self.count >= self.max_count {
            return false;
        }
        if self.count > 0 && self.bytes + len > self.max_bytes {
            return false;
        }
        self.count += 1;
        self.bytes += len;
        true
    }
}

fn dest_prefix(dest: &str) -> Vec<u8> {
    key(&[dest.as_bytes(), b""])
}

pub(crate) fn entry_key(dest: &str, seq: u64) -> Vec<u8> {
    let mut k = dest_prefix(dest);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

impl Store {
    /// Queues an EDU for `dest` at position `seq` (in `b`). Test-only: production
    /// rows are numbered by [`Store::append`]'s writer.
    #[cfg(test)]
    pub(crate) fn outbox_push(&self, b: &mut Batch, dest: &str, seq: u64, edu: &[u8]) {
        b.0.put_cf(self.cf(cf::OUTBOX), entry_key(dest, seq), edu);
        self.tails.forget(dest);
    }

    /// The queue head above position `after` (the destination's low-water mark,
    /// [`DestState::acked_seq`]): up to `max_count` EDUs (stopping at `upto_seq` if
    /// given) whose sizes add up to at most `max_bytes`, but always at least one.
    /// From memory when it holds all of them (`store::tail`), else from the store.
    pub fn outbox_head(
        &self,
        dest: &str,
        after: u64,
        max_count: usize,
        max_bytes: usize,
        upto_seq: Option<u64>,
    ) -> Result<Vec<QueuedEdu>, StoreError> {
        let budget = HeadBudget::new(max_count, max_bytes, upto_seq);
        if let Some(rows) = self.tails.head(dest, after, budget) {
            metrics::counter!("courier_outbox_reads_total", "from" => "memory").increment(1);
            return Ok(rows);
        }
        metrics::counter!("courier_outbox_reads_total", "from" => "store").increment(1);
        self.outbox_head_stored(dest, after, budget)
    }

    /// [`Store::outbox_head`] read from the store.
    pub(crate) fn outbox_head_stored(
        &self,
        dest: &str,
        after: u64,
        mut budget: HeadBudget,
    ) -> Result<Vec<QueuedEdu>, StoreError> {
        let prefix = dest_prefix(dest);
        let mut out = Vec::new();
        for item in self.scan_queue(
            cf::OUTBOX,
            &prefix,
            &entry_key(dest, after.saturating_add(1)),
        ) {
            let (k, v) = item?;
            let seq = read_u64(&k[prefix.len()..]).ok_or(StoreError::Corrupt {
                cf: cf::OUTBOX,
                detail: "short key".into(),
            })?;
            if !budget.take(seq, v.len()) {
                break;
            }
            out.push(QueuedEdu {
                seq,
                edu: v.into_vec(),
            });
        }
        Ok(out)
    }

    /// How many EDUs wait for `dest`, and the seq of the oldest (walks the queue from
    /// its low-water mark).
    pub fn outbox_depth(&self, dest: &str) -> Result<(usize, Option<u64>), StoreError> {
        let prefix = dest_prefix(dest);
        let from = entry_key(dest, self.dest_state(dest)?.acked_seq.saturating_add(1));
        let mut n = 0;
        let mut first = None;
        for item in self.scan_queue(cf::OUTBOX, &prefix, &from) {
            let (k, _) = item?;
            if first.is_none() {
                first = read_u64(&k[prefix.len()..]);
            }
            n += 1;
        }
        Ok((n, first))
    }

    /// Every destination with at least one queued EDU (one seek per destination).
    pub fn destinations_with_work(&self) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        let mut from: Vec<u8> = Vec::new();
        loop {
            let mut iter = self.db().iterator_cf(
                self.cf(cf::OUTBOX),
                rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward),
            );
            let Some(item) = iter.next() else { break };
            let (k, _) = item?;
            let Some(i) = k.iter().position(|&b| b == 0) else {
                break;
            };
            let dest = String::from_utf8_lossy(&k[..i]).into_owned();
            from = prefix_end(&k[..=i]);
            out.push(dest);
        }
        Ok(out)
    }

    /// Removes the EDUs a destination acknowledged (the transaction it answered 200):
    /// a prefix of its queue above its low-water mark, which rises past them.
    pub fn outbox_ack(&self, b: &mut Batch, dest: &str, acked: &[QueuedEdu]) {
        // Point deletes: one range tombstone per transaction piles up in the memtable,
        // and RocksDB re-fragments them all on every read.
        for e in acked {
            b.0.delete_cf(self.cf(cf::OUTBOX), entry_key(dest, e.seq));
        }
        if let Some(last) = acked.last() {
            self.tails.acknowledged(dest, last.seq);
        }
    }

    /// Moves one EDU, the head of the queue, into `parked`, with the reason (in `b`).
    pub fn outbox_park(&self, b: &mut Batch, dest: &str, edu: &QueuedEdu, reason: &str) {
        let rec = serde_json::json!({
            "reason": reason,
            "edu": String::from_utf8_lossy(&edu.edu),
        });
        b.0.put_cf(
            self.cf(cf::PARKED),
            entry_key(dest, edu.seq),
            serde_json::to_vec(&rec).expect("serializes"),
        );
        b.0.delete_cf(self.cf(cf::OUTBOX), entry_key(dest, edu.seq));
        self.tails.acknowledged(dest, edu.seq);
    }

    pub fn parked_count(&self, dest: &str) -> Result<usize, StoreError> {
        Ok(self.scan(cf::PARKED, &dest_prefix(dest)).count())
    }

    /// Up to `limit` of `dest`'s parked EDUs above position `after`, oldest first.
    /// A parked EDU goes back to its queue by an [`super::Append::Outbox`] with its
    /// `edu` and an [`super::Append::Unpark`] with its `seq`, in one append.
    pub fn parked(
        &self,
        dest: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<ParkedEdu>, StoreError> {
        let prefix = dest_prefix(dest);
        let from = entry_key(dest, after.saturating_add(1));
        let mut out = Vec::new();
        for item in self.scan_from(cf::PARKED, &prefix, &from).take(limit) {
            let (k, v) = item?;
            let corrupt = |detail: String| StoreError::Corrupt {
                cf: cf::PARKED,
                detail,
            };
            let seq = read_u64(&k[prefix.len()..]).ok_or_else(|| corrupt("short key".into()))?;
            let rec: ParkedRecord =
                serde_json::from_slice(&v).map_err(|e| corrupt(e.to_string()))?;
            out.push(ParkedEdu {
                seq,
                reason: rec.reason,
                edu: rec.edu,
            });
        }
        Ok(out)
    }

    pub fn dest_state(&self, dest: &str) -> Result<DestState, StoreError> {
        match self.db().get_pinned_cf(self.cf(cf::DESTINATIONS), dest)? {
            None => Ok(DestState::default()),
            Some(v) => serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                cf: cf::DESTINATIONS,
                detail: e.to_string(),
            }),
        }
    }

    /// Records `state` for `dest` (in `b`).
    pub fn put_dest_state(&self, b: &mut Batch, dest: &str, state: &DestState) {
        b.0.put_cf(
            self.cf(cf::DESTINATIONS),
            dest,
            serde_json::to_vec(state).expect("serializes"),
        );
    }

    /// Records `state` for `dest` on its own (unsynced: bookkeeping whose loss only
    /// redoes a step, see [`Store::commit_unsynced`]).
    pub fn write_dest_state(&self, dest: &str, state: &DestState) -> Result<(), StoreError> {
        self.write_dest_state_with(Batch::new(), dest, state)
    }

    /// Records `state` for `dest` in one (unsynced) write with what `b` holds.
    pub fn write_dest_state_with(
        &self,
        mut b: Batch,
        dest: &str,
        state: &DestState,
    ) -> Result<(), StoreError> {
        self.put_dest_state(&mut b, dest, state);
        self.commit_unsynced(b)
    }

    /// Every destination with a recorded state (for admin views).
    pub fn all_dest_states(&self) -> Result<Vec<(String, DestState)>, StoreError> {
        let mut out = Vec::new();
        for item in self.scan(cf::DESTINATIONS, b"") {
            let (k, v) = item?;
            let st = serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                cf: cf::DESTINATIONS,
                detail: e.to_string(),
            })?;
            out.push((String::from_utf8_lossy(&k).into_owned(), st));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Batch, temp_store};
    use super::*;

    #[tokio::test]
    async fn queue_head_budget_ack_and_park() {
        let (_d, s) = temp_store();
        let mut b = Batch::new();
        for i in 1..=5u64 {
            s.outbox_push(&mut b, "b.test", i, &[b'x'; 100]);
        }
        s.outbox_push(&mut b, "a.test", 9, b"{}");
        s.outbox_push(&mut b, "b.test2", 9, b"{}");
        s.commit(b).await.unwrap();
        assert_eq!(
            s.destinations_with_work().unwrap(),
            vec!["a.test", "b.test", "b.test2"]
        );
        assert_eq!(
            s.outbox_head("b.test", 0, 3, 10_000, None).unwrap().len(),
            3
        );
        assert_eq!(
            s.outbox_head("b.test", 0, 100, 250, None).unwrap().len(),
            2,
            "byte budget"
        );
        assert_eq!(
            s.outbox_head("b.test", 0, 100, 10, None).unwrap().len(),
            1,
            "always one"
        );
        assert_eq!(
            s.outbox_head("b.test", 0, 100, 10_000, Some(4))
                .unwrap()
                .len(),
            4
        );
        let mut b = Batch::new();
        let first3 = s.outbox_head("b.test", 0, 3, 10_000, None).unwrap();
        s.outbox_ack(&mut b, "b.test", &first3);
        s.commit(b).await.unwrap();
        let head = s.outbox_head("b.test", 0, 100, 10_000, None).unwrap();
        assert_eq!(head.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![4, 5]);
        let mut b = Batch::new();
        s.outbox_park(&mut b, "b.test", &head[0], "413");
        s.commit(b).await.unwrap();
        assert_eq!(s.outbox_depth("b.test").unwrap(), (1, Some(5)));
        assert_eq!(s.parked_count("b.test").unwrap(), 1);
        assert_eq!(
            s.outbox_depth("b.test2").unwrap().0,
            1,
            "prefix-distinct destinations"
        );
    }

    /// A parked EDU is listed with its reason, and one append puts it back at the
    /// end of its queue and out of `parked`, byte for byte.
    #[tokio::test]
    async fn a_parked_edu_goes_back_to_its_queue_in_one_append() {
        let (_d, s) = temp_store();
        s.append(vec![outbox("b.test", 1), outbox("b.test", 2)])
            .await
            .unwrap();
        let head = s.outbox_head("b.test", 0, 1, 10_000, None).unwrap();
        let mut b = Batch::new();
        s.outbox_park(&mut b, "b.test", &head[0], "HTTP 400: no");
        s.commit(b).await.unwrap();
        let parked = s.parked("b.test", 0, 10).unwrap();
        assert_eq!(parked.len(), 1);
        assert_eq!(parked[0].reason, "HTTP 400: no");
        assert_eq!(parked[0].edu.as_bytes(), b"e\x01");
        assert!(s.parked("b.test", parked[0].seq, 10).unwrap().is_empty());
        assert!(s.parked("b.test2", 0, 10).unwrap().is_empty());

        s.append(vec![
            crate::store::Append::Outbox {
                dest: "b.test".into(),
                edu: parked[0].edu.clone().into_bytes(),
            },
            crate::store::Append::Unpark {
                dest: "b.test".into(),
                seq: parked[0].seq,
            },
        ])
        .await
        .unwrap();
        assert_eq!(s.parked_count("b.test").unwrap(), 0);
        let queue = s.outbox_head("b.test", 0, 10, 10_000, None).unwrap();
        let edus: Vec<&[u8]> = queue.iter().map(|e| &e.edu[..]).collect();
        assert_eq!(edus, vec![&b"e\x02"[..], &b"e\x01"[..]], "at the end");
        assert!(queue[1].seq > queue[0].seq);
        let stored = s
            .outbox_head_stored("b.test", 0, HeadBudget::new(10, 10_000, None))
            .unwrap();
        assert_eq!(stored, queue, "memory and store agree");
    }

    fn outbox(dest: &str, n: u8) -> crate::store::Append {
        crate::store::Append::Outbox {
            dest: dest.into(),
            edu: vec![b'e', n],
        }
    }

    /// Every way the sender reads its queue gives the same rows from memory as from
    /// the store, through appends, acknowledgements, a parking and a reopen.
    #[tokio::test]
    async fn queue_head_from_memory_is_the_stored_one() {
        let dir = tempfile::tempdir().unwrap();
        let opts = crate::store::StoreOptions::default();
        let same = |s: &Store, dest: &str, after: u64, count: usize, upto: Option<u64>| {
            let budget = HeadBudget::new(count, 10_000, upto);
            let stored = s.outbox_head_stored(dest, after, budget).unwrap();
            let memory = s.tails.head(dest, after, budget);
            (stored, memory)
        };
        let acked = {
            let s = Store::open(dir.path(), &opts).unwrap();
            for i in 0..10u8 {
                s.append(vec![outbox("a.test", i), outbox("b.test", i)])
                    .await
                    .unwrap();
            }
            let (stored, memory) = same(&s, "a.test", 0, 100, None);
            assert_eq!(stored.len(), 10);
            assert_eq!(memory.as_ref(), Some(&stored), "served from memory");
            let (stored, memory) = same(&s, "a.test", stored[2].seq, 3, Some(stored[7].seq));
            assert_eq!(stored.len(), 3);
            assert_eq!(memory, Some(stored));
            // Acknowledge four, park the fifth.
            let head = s.outbox_head("a.test", 0, 4, 10_000, None).unwrap();
            let mut b = Batch::new();
            s.outbox_ack(&mut b, "a.test", &head);
            s.commit(b).await.unwrap();
            let next = s
                .outbox_head("a.test", head[3].seq, 1, 10_000, None)
                .unwrap();
            let mut b = Batch::new();
            s.outbox_park(&mut b, "a.test", &next[0], "400");
            s.commit(b).await.unwrap();
            assert_eq!(
                same(&s, "a.test", 0, 100, None).1,
                None,
                "below what left the queue: only the store answers"
            );
            let (stored, memory) = same(&s, "a.test", next[0].seq, 100, None);
            assert_eq!(stored.len(), 5);
            assert_eq!(memory, Some(stored));
            let (stored, memory) = same(&s, "b.test", 0, 100, None);
            assert_eq!(stored.len(), 10);
            assert_eq!(memory, Some(stored));
            next[0].seq
        };
        // After a reopen the queued rows are only in the store, then new ones join.
        let s = Store::open(dir.path(), &opts).unwrap();
        assert_eq!(same(&s, "a.test", acked, 100, None).1, None);
        s.append(vec![outbox("a.test", 98)]).await.unwrap();
        s.append(vec![outbox("a.test", 99)]).await.unwrap();
        assert_eq!(same(&s, "a.test", acked, 100, None).1, None);
        let all = s.outbox_head("a.test", acked, 100, 10_000, None).unwrap();
        assert_eq!(all.len(), 7);
        assert_eq!(all[6].edu, vec![b'e', 99]);
        let mut b = Batch::new();
        s.outbox_ack(&mut b, "a.test", &all[..5]);
        s.commit(b).await.unwrap();
        assert_eq!(
            same(&s, "a.test", all[4].seq, 100, None).1,
            None,
            "rows from before the reopen may remain: the store answers"
        );
        let mut b = Batch::new();
        s.outbox_ack(&mut b, "a.test", &all[5..6]);
        s.commit(b).await.unwrap();
        let (stored, memory) = same(&s, "a.test", all[5].seq, 100, None);
        assert_eq!(stored, all[6..]);
        assert_eq!(memory, Some(stored), "served from memory again");
    }

    #[tokio::test]
    async fn dest_state_round_trips() {
        let (_d, s) = temp_store();
        assert_eq!(s.dest_state("x").unwrap(), DestState::default());
        let st = DestState {
            failures: 3,
            next_attempt_ts: 99,
            last_error: Some("boom".into()),
            inflight: Some(Inflight {
                txn_id: "t1".into(),
                last_seq: 7,
                edu_count: 2,
                origin_server_ts: 5,
            }),
            txn_counter: 4,
            acked_seq: 6,
        };
        let mut b = Batch::new();
        s.put_dest_state(&mut b, "x", &st);
        s.commit(b).await.unwrap();
        assert_eq!(s.dest_state("x").unwrap(), st);
        assert_eq!(s.all_dest_states().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn reading_the_queue_leaves_the_block_cache_alone() {
        // Queued rows are read once, then deleted: their blocks must not fill the
        // block cache (see `store::queue_read_options`).
        let (_d, s) = temp_store();
        let mut b = Batch::new();
        for i in 1..=2000u64 {
            s.outbox_push(&mut b, "b.test", i, &[b'x'; 300]);
        }
        s.commit(b).await.unwrap();
        let cf = s.cf(cf::OUTBOX);
        s.db().flush_cf(cf).unwrap();
        let usage = || {
            s.db()
                .property_int_value_cf(cf, "rocksdb.block-cache-usage")
                .unwrap()
                .unwrap()
        };
        let before = usage();
        let rows = s
            .outbox_head_stored("b.test", 0, HeadBudget::new(1000, usize::MAX, None))
            .unwrap();
        assert_eq!(rows.len(), 1000, "read from the flushed table");
        assert_eq!(s.outbox_depth("b.test").unwrap().0, 2000);
        assert_eq!(usage(), before, "queue scans cached no block");
        // The measure itself works: a point lookup caches its block.
        s.db().get_cf(cf, entry_key("b.test", 7)).unwrap().unwrap();
        assert!(usage() > before, "a lookup caches its block");
    }
}
