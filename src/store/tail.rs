//! The newest part of each destination's queue, in memory.
//!
//! A busy sender reads its queue head once per transaction. From RocksDB that is a
//! seek through every memtable and level-0 table of the outbox (13.5 % of the
//! origin's CPU with 1000 busy destinations), although the rows were in the writer's
//! hands a moment before. The writer thread hands each group's outbox rows here once
//! they are durable, in the order it numbered them, so the rows of one destination
//! arrive in increasing order and never below one a reader has seen (the invariant
//! `Store::append` keeps for the store holds here too). The sender's
//! acknowledgements and parkings prune them.
//!
//! Owns: those copies and, per destination, how far down they are complete
//! (`complete_after`: every committed row of the destination numbered above it is
//! here). Must never answer a read it cannot answer completely: a read from below
//! `complete_after` goes to the store. Memory is bounded per destination and in
//! all; a queue that grows past the bound is dropped from memory and read from the
//! store until its reader has caught up. Never the source of truth: nothing here
//! survives a restart, and nothing is lost if it is dropped.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use super::outbox::{HeadBudget, QueuedEdu};

/// Bounds of what is kept in memory.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Rows per destination (the sender reads up to 1000 per transaction, and as
    /// many again to prepare the next).
    pub rows_per_dest: usize,
    pub bytes_per_dest: usize,
    pub bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            rows_per_dest: 4096,
            bytes_per_dest: 4 << 20,
            bytes: 64 << 20,
        }
    }
}

pub(crate) struct Tails {
    limits: Limits,
    inner: Mutex<Inner>,
}

struct Inner {
    /// Rows numbered up to here were committed before the store was opened: never in
    /// memory. A destination without an entry has had no row committed since.
    opened: u64,
    dests: HashMap<String, Tail>,
    bytes: usize,
}

#[derive(Default)]
struct Tail {
    /// Every committed row of this destination numbered above this is in `rows`.
    complete_after: u64,
    rows: VecDeque<QueuedEdu>,
    bytes: usize,
}

impl Tails {
    /// For a store whose rows so far are numbered at most `opened`.
    pub(crate) fn new(opened: u64, limits: Limits) -> Tails {
        Tails {
            limits,
            inner: Mutex::new(Inner {
                opened,
                dests: HashMap::new(),
                bytes: 0,
            }),
        }
    }

    /// One group's outbox rows, durable, in numbering order (the writer thread).
    pub(crate) fn committed(&self, rows: impl IntoIterator<Item = (String, QueuedEdu)>) {
        let mut inner = self.inner.lock().expect("tails");
        let opened = inner.opened;
        for (dest, row) in rows {
            let Inner { dests, bytes, .. } = &mut *inner;
            let tail = dests.entry(dest).or_insert_with(|| Tail {
                complete_after: opened,
                ..Tail::default()
            });
            if row.seq <= tail.complete_after {
                continue;
            }
            let seq = row.seq;
            tail.bytes += row.edu.len();
            *bytes += row.edu.len();
            tail.rows.push_back(row);
            if tail.rows.len() > self.limits.rows_per_dest
                || tail.bytes > self.limits.bytes_per_dest
                || *bytes > self.limits.bytes
            {
                // Too much to keep: this queue is read from the store until its
                // reader is past what was dropped.
                *bytes -= tail.bytes;
                *tail = Tail {
                    complete_after: seq,
                    ..Tail::default()
                };
            }
        }
    }

    /// The queue head above `after`, within `budget` (see `Store::outbox_head`);
    /// `None` when memory does not hold all of it.
    pub(crate) fn head(
        &self,
        dest: &str,
        after: u64,
        mut budget: HeadBudget,
    ) -> Option<Vec<QueuedEdu>> {
        let inner = self.inner.lock().expect("tails");
        let Some(tail) = inner.dests.get(dest) else {
            return (after >= inner.opened).then(Vec::new);
        };
        if after < tail.complete_after {
            return None;
        }
        let start = tail.rows.partition_point(|r| r.seq <= after);
        Some(
            tail.rows
                .range(start..)
                .take_while(|r| budget.take(r.seq, r.edu.len()))
                .cloned()
                .collect(),
        )
    }

    /// Every row of `dest` up to `upto` left the queue (acknowledged or parked; the
    /// write that removes them may still be on its way, or fail: a read from below
    /// `upto` goes to the store from now on).
    pub(crate) fn acknowledged(&self, dest: &str, upto: u64) {
        let mut inner = self.inner.lock().expect("tails");
        let Inner { dests, bytes, .. } = &mut *inner;
        let Some(tail) = dests.get_mut(dest) else {
            return;
        };
        while tail.rows.front().is_some_and(|r| r.seq <= upto) {
            let row = tail.rows.pop_front().expect("checked");
            tail.bytes -= row.edu.len();
            *bytes -= row.edu.len();
        }
        tail.complete_after = tail.complete_after.max(upto);
        if tail.rows.is_empty() && tail.rows.capacity() > 64 {
            tail.rows = VecDeque::new();
        }
    }

    /// `dest`'s queue changed behind the writer's back (tests): never serve it again.
    #[cfg(test)]
    pub(crate) fn forget(&self, dest: &str) {
        let mut inner = self.inner.lock().expect("tails");
        let Inner { dests, bytes, .. } = &mut *inner;
        let tail = dests.entry(dest.to_owned()).or_default();
        *bytes -= tail.bytes;
        *tail = Tail {
            complete_after: u64::MAX,
            ..Tail::default()
        };
    }

    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.inner.lock().expect("tails").bytes
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// The store as the model: committed rows, and each destination's acknowledged
    /// mark as the store has it.
    #[derive(Default)]
    struct Model {
        rows: BTreeMap<(String, u64), Vec<u8>>,
        acked: HashMap<String, u64>,
    }

    impl Model {
        fn head(
            &self,
            dest: &str,
            after: u64,
            max_count: usize,
            max_bytes: usize,
            upto: Option<u64>,
        ) -> Vec<QueuedEdu> {
            let mut out = Vec::new();
            let mut bytes = 0;
            for ((_, seq), edu) in self
                .rows
                .range((dest.to_owned(), after + 1)..(dest.to_owned(), u64::MAX))
            {
                if upto.is_some_and(|u| *seq > u) || out.len() >= max_count {
                    break;
                }
                if !out.is_empty() && bytes + edu.len() > max_bytes {
                    break;
                }
                bytes += edu.len();
                out.push(QueuedEdu {
                    seq: *seq,
                    edu: edu.clone(),
                });
            }
            out
        }
    }

    /// xorshift: deterministic, no dependency.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// Random appends, acknowledgements (some whose write is lost; parking one row
    /// is the same call) and reads: every read memory answers equals the store's answer, and with room
    /// enough memory answers every read from the acknowledged mark.
    fn run(seed: u64, limits: Limits, lose_writes: bool) -> (usize, usize) {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let dests = ["a.test", "b.test", "c.test"];
        let opened = 100;
        let tails = Tails::new(opened, limits);
        let mut model = Model::default();
        // Rows from before the store was opened.
        for seq in [3, 50, 99] {
            model.rows.insert(("a.test".into(), seq), vec![b'o'; 10]);
        }
        let mut seq = opened;
        let (mut served, mut reads) = (0, 0);
        for _ in 0..2000 {
            match rng.below(10) {
                0..=3 => {
                    let n = 1 + rng.below(20);
                    let mut group = Vec::new();
                    for _ in 0..n {
                        seq += 1;
                        let d = dests[rng.below(3) as usize];
                        let edu = vec![b'x'; 1 + rng.below(300) as usize];
                        model.rows.insert((d.into(), seq), edu.clone());
                        group.push((d.to_owned(), QueuedEdu { seq, edu }));
                    }
                    tails.committed(group);
                }
                4..=5 => {
                    let d = dests[rng.below(3) as usize];
                    let after = model.acked.get(d).copied().unwrap_or(0);
                    let head = model.head(d, after, 1 + rng.below(40) as usize, usize::MAX, None);
                    let Some(last) = head.last() else { continue };
                    tails.acknowledged(d, last.seq);
                    if lose_writes && rng.below(4) == 0 {
                        // The acknowledgement's write failed: the store still has
                        // the rows and the old mark.
                        continue;
                    }
                    for r in &head {
                        model.rows.remove(&(d.to_owned(), r.seq));
                    }
                    model.acked.insert(d.into(), last.seq);
                }
                _ => {
                    let d = dests[rng.below(3) as usize];
                    let acked = model.acked.get(d).copied().unwrap_or(0);
                    // From the mark, or from the end of a transaction in flight.
                    let after = match rng.below(3) {
                        0 => model
                            .head(d, acked, 1 + rng.below(30) as usize, usize::MAX, None)
                            .last()
                            .map_or(acked, |r| r.seq),
                        _ => acked,
                    };
                    let count = 1 + rng.below(60) as usize;
                    let budget = 1 + rng.below(5000) as usize;
                    let upto = (rng.below(4) == 0).then(|| after + rng.below(40));
                    let want = model.head(d, after, count, budget, upto);
                    reads += 1;
                    if let Some(got) = tails.head(d, after, HeadBudget::new(count, budget, upto)) {
                        served += 1;
                        assert_eq!(got, want, "seed {seed}: {d} after {after}");
                    }
                }
            }
        }
        (served, reads)
    }

    #[test]
    fn memory_answers_exactly_what_the_store_would() {
        for seed in 0..50 {
            let (served, reads) = run(seed, Limits::default(), false);
            assert!(
                served * 10 >= reads * 9,
                "seed {seed}: memory served {served} of {reads} reads"
            );
        }
    }

    #[test]
    fn lost_acknowledgements_and_small_limits_fall_back_to_the_store() {
        let small = Limits {
            rows_per_dest: 16,
            bytes_per_dest: 2000,
            bytes: 3000,
        };
        let mut served = 0;
        for seed in 0..50 {
            served += run(seed, small, true).0;
            served += run(seed, Limits::default(), true).0;
        }
        assert!(served > 0, "memory served nothing");
    }

    #[test]
    fn bounded_and_pruned() {
        let limits = Limits {
            rows_per_dest: 4,
            bytes_per_dest: 1 << 20,
            bytes: 1 << 20,
        };
        let tails = Tails::new(0, limits);
        let row = |seq| {
            (
                "d".to_owned(),
                QueuedEdu {
                    seq,
                    edu: vec![0; 10],
                },
            )
        };
        tails.committed((1..=4).map(row));
        assert_eq!(
            tails
                .head("d", 0, HeadBudget::new(10, 1000, None))
                .unwrap()
                .len(),
            4
        );
        assert_eq!(tails.bytes(), 40);
        tails.committed([row(5)]);
        assert_eq!(tails.bytes(), 0, "over the bound: dropped");
        assert!(
            tails
                .head("d", 0, HeadBudget::new(10, 1000, None))
                .is_none()
        );
        assert!(
            tails
                .head("d", 4, HeadBudget::new(10, 1000, None))
                .is_none()
        );
        tails.committed([row(6)]);
        assert_eq!(
            tails.head("d", 5, HeadBudget::new(10, 1000, None)).unwrap()[0].seq,
            6,
            "complete again above what was dropped"
        );
        tails.acknowledged("d", 6);
        assert_eq!(tails.bytes(), 0);
        assert!(
            tails
                .head("d", 5, HeadBudget::new(10, 1000, None))
                .is_none()
        );
        assert_eq!(
            tails.head("d", 6, HeadBudget::new(10, 1000, None)).unwrap(),
            vec![]
        );
        assert_eq!(
            tails
                .head("other", 0, HeadBudget::new(10, 1000, None))
                .unwrap(),
            vec![],
            "nothing committed for it since the start"
        );
        tails.forget("d");
        assert!(
            tails
                .head("d", 6, HeadBudget::new(10, 1000, None))
                .is_none()
        );
    }
}
