//! Transactions held for someone else: offload mode's durable custody.
//!
//! A held transaction is a federation request courier accepted on another server's
//! behalf and must replay byte for byte: Synapse's outbound `/send` for a destination
//! (`Dir::Out`, queued per destination) or a remote server's inbound `/send` for our
//! homeserver (`Dir::In`, queued per origin). Key layout:
//! - `custody`:        `dir \0 queue \0 seq(be64)` -> envelope JSON `\n` body bytes
//! - `custody_state`:  `dir \0 queue` -> JSON [`QueueState`] (backoff)
//! - `custody_parked`: `dir \0 queue \0 seq(be64)` -> JSON `{reason, txn_id, path,
//!   received_ts, headers}` `\n` body (`headers` since requeue exists: older rows
//!   lack it and cannot be replayed)
//! - `custody_txns`:   `dir \0 queue \0 txn_id` -> ts (expiring replay marker)
//!
//! Rows are numbered by the store's writer in commit order, so a queue replays in the
//! order its transactions were accepted. A row leaves `custody` only when the far side
//! answered 2xx (deleted) or refused it for good (moved to `custody_parked` with the
//! reason). A parked one returns only by an operator's requeue: a new row at the end of
//! its queue, written in the commit that deletes it from `custody_parked`. The body is
//! never parsed or rewritten here: the signature covers it.

use serde::{Deserialize, Serialize};

use super::{Batch, Store, StoreError, cf, key, prefix_end, read_u64};

/// Which way a held transaction travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dir {
    /// From our homeserver to a destination server (queue = destination).
    Out,
    /// From an origin server to our homeserver (queue = origin).
    In,
}

impl Dir {
    pub fn tag(self) -> &'static str {
        match self {
            Dir::Out => "out",
            Dir::In => "in",
        }
    }
}

/// What is kept besides the body: enough to replay the request unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub txn_id: String,
    /// Request target: path and query, as received.
    pub path: String,
    /// Headers replayed verbatim (`Authorization`, `Content-Type`, `User-Agent`).
    pub headers: Vec<(String, String)>,
    /// When courier accepted it (ms since the epoch).
    pub received_ts: u64,
}

/// One held transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub seq: u64,
    pub envelope: Envelope,
    pub body: Vec<u8>,
}

/// One held transaction the far side refused for good, as `custody_parked` keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedHeld {
    /// Its position in the queue it left.
    pub seq: u64,
    /// Why: the far side's answer (`HTTP 400: ...`).
    pub reason: String,
    /// What replays it, with the body.
    pub envelope: Envelope,
    /// False for a row parked before headers were kept (its `envelope.headers` is
    /// empty): it cannot be replayed, its `Authorization` is gone.
    pub replayable: bool,
    pub body: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct ParkedHead {
    reason: String,
    txn_id: String,
    path: String,
    received_ts: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    headers: Option<Vec<(String, String)>>,
}

/// Delivery state of one queue; the default means "healthy".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QueueState {
    pub failures: u32,
    /// Do not try before this time (ms); 0 = now.
    pub next_attempt_ts: u64,
    pub last_error: Option<String>,
}

/// The stored form of a held transaction: envelope JSON, a newline (compact JSON never
/// contains one), then the body bytes untouched.
pub fn encode(envelope: &Envelope, body: &[u8]) -> Vec<u8> {
    let mut v = serde_json::to_vec(envelope).expect("an envelope serializes");
    v.push(b'\n');
    v.extend_from_slice(body);
    v
}

fn decode(seq: u64, raw: &[u8]) -> Result<Held, StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt {
        cf: cf::CUSTODY,
        detail,
    };
    let nl = raw
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| corrupt("no envelope separator".into()))?;
    let envelope = serde_json::from_slice(&raw[..nl]).map_err(|e| corrupt(e.to_string()))?;
    Ok(Held {
        seq,
        envelope,
        body: raw[nl + 1..].to_vec(),
    })
}

fn queue_prefix(dir: Dir, queue: &str) -> Vec<u8> {
    key(&[dir.tag().as_bytes(), queue.as_bytes(), b""])
}

pub(crate) fn entry_key(dir: Dir, queue: &str, seq: u64) -> Vec<u8> {
    let mut k = queue_prefix(dir, queue);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn state_key(dir: Dir, queue: &str) -> Vec<u8> {
    key(&[dir.tag().as_bytes(), queue.as_bytes()])
}

impl Store {
    /// The oldest held transaction of a queue.
    pub fn custody_head(&self, dir: Dir, queue: &str) -> Result<Option<Held>, StoreError> {
        let prefix = queue_prefix(dir, queue);
        let Some(item) = self.scan(cf::CUSTODY, &prefix).next() else {
            return Ok(None);
        };
        let (k, v) = item?;
        let seq = read_u64(&k[prefix.len()..]).ok_or(StoreError::Corrupt {
            cf: cf::CUSTODY,
            detail: "short key".into(),
        })?;
        decode(seq, &v).map(Some)
    }

    /// How many transactions a queue holds, and when the oldest was accepted.
    pub fn custody_depth(&self, dir: Dir, queue: &str) -> Result<(usize, Option<u64>), StoreError> {
        let prefix = queue_prefix(dir, queue);
        let mut n = 0;
        let mut oldest = None;
        for item in self.scan(cf::CUSTODY, &prefix) {
            let (k, v) = item?;
            if oldest.is_none() {
                let seq = read_u64(&k[prefix.len()..]).unwrap_or(0);
                oldest = Some(decode(seq, &v)?.envelope.received_ts);
            }
            n += 1;
        }
        Ok((n, oldest))
    }

    /// Every queue of `dir` holding at least one transaction (one seek per queue).
    pub fn custody_queues(&self, dir: Dir) -> Result<Vec<String>, StoreError> {
        self.queues_in(cf::CUSTODY, dir)
    }

    /// Every queue of `dir` with at least one parked transaction.
    pub fn custody_parked_queues(&self, dir: Dir) -> Result<Vec<String>, StoreError> {
        self.queues_in(cf::CUSTODY_PARKED, dir)
    }

    fn queues_in(&self, cf_name: &'static str, dir: Dir) -> Result<Vec<String>, StoreError> {
        let dir_prefix = key(&[dir.tag().as_bytes(), b""]);
        let mut out = Vec::new();
        let mut from = dir_prefix.clone();
        loop {
            let mut opts = rocksdb::ReadOptions::default();
            opts.set_iterate_upper_bound(prefix_end(&dir_prefix));
            let mut iter = self.db().iterator_cf_opt(
                self.cf(cf_name),
                opts,
                rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward),
            );
            let Some(item) = iter.next() else { break };
            let (k, _) = item?;
            let rest = &k[dir_prefix.len()..];
            let Some(i) = rest.iter().position(|&b| b == 0) else {
                break;
            };
            out.push(String::from_utf8_lossy(&rest[..i]).into_owned());
            from = prefix_end(&k[..dir_prefix.len() + i + 1]);
        }
        Ok(out)
    }

    /// Removes a transaction the far side accepted (in `b`).
    pub fn custody_ack(&self, b: &mut Batch, dir: Dir, queue: &str, seq: u64) {
        b.0.delete_cf(self.cf(cf::CUSTODY), entry_key(dir, queue, seq));
    }

    /// Moves a transaction the far side refused for good to `custody_parked` (in `b`).
    pub fn custody_park(&self, b: &mut Batch, dir: Dir, queue: &str, held: &Held, reason: &str) {
        let head = ParkedHead {
            reason: reason.to_owned(),
            txn_id: held.envelope.txn_id.clone(),
            path: held.envelope.path.clone(),
            received_ts: held.envelope.received_ts,
            headers: Some(held.envelope.headers.clone()),
        };
        let mut v = serde_json::to_vec(&head).expect("serializes");
        v.push(b'\n');
        v.extend_from_slice(&held.body);
        b.0.put_cf(
            self.cf(cf::CUSTODY_PARKED),
            entry_key(dir, queue, held.seq),
            v,
        );
        b.0.delete_cf(self.cf(cf::CUSTODY), entry_key(dir, queue, held.seq));
    }

    /// Up to `limit` of a queue's parked transactions above position `after`, oldest
    /// first. One goes back to its queue by an [`super::Append::Held`] with its
    /// envelope and body and an [`super::Append::UnparkHeld`] with its `seq`, in one
    /// append.
    pub fn custody_parked(
        &self,
        dir: Dir,
        queue: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<ParkedHeld>, StoreError> {
        let prefix = queue_prefix(dir, queue);
        let from = entry_key(dir, queue, after.saturating_add(1));
        let corrupt = |detail: String| StoreError::Corrupt {
            cf: cf::CUSTODY_PARKED,
            detail,
        };
        let mut out = Vec::new();
        for item in self
            .scan_from(cf::CUSTODY_PARKED, &prefix, &from)
            .take(limit)
        {
            let (k, v) = item?;
            let seq = read_u64(&k[prefix.len()..]).ok_or_else(|| corrupt("short key".into()))?;
            let nl = v
                .iter()
                .position(|&b| b == b'\n')
                .ok_or_else(|| corrupt("no separator".into()))?;
            let head: ParkedHead =
                serde_json::from_slice(&v[..nl]).map_err(|e| corrupt(e.to_string()))?;
            out.push(ParkedHeld {
                seq,
                reason: head.reason,
                replayable: head.headers.is_some(),
                envelope: Envelope {
                    txn_id: head.txn_id,
                    path: head.path,
                    headers: head.headers.unwrap_or_default(),
                    received_ts: head.received_ts,
                },
                body: v[nl + 1..].to_vec(),
            });
        }
        Ok(out)
    }

    pub fn custody_parked_count(&self, dir: Dir, queue: &str) -> usize {
        self.scan(cf::CUSTODY_PARKED, &queue_prefix(dir, queue))
            .count()
    }

    pub fn custody_state(&self, dir: Dir, queue: &str) -> Result<QueueState, StoreError> {
        match self
            .db()
            .get_pinned_cf(self.cf(cf::CUSTODY_STATE), state_key(dir, queue))?
        {
            None => Ok(QueueState::default()),
            Some(v) => serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                cf: cf::CUSTODY_STATE,
                detail: e.to_string(),
            }),
        }
    }

    /// Records `state` (in `b`); the default state deletes the record.
    pub fn put_custody_state(&self, b: &mut Batch, dir: Dir, queue: &str, state: &QueueState) {
        let k = state_key(dir, queue);
        if *state == QueueState::default() {
            b.0.delete_cf(self.cf(cf::CUSTODY_STATE), k);
        } else {
            b.0.put_cf(
                self.cf(cf::CUSTODY_STATE),
                k,
                serde_json::to_vec(state).expect("serializes"),
            );
        }
    }

    /// Queues of `dir` with a recorded (non-default) state.
    pub fn custody_states(&self, dir: Dir) -> Result<Vec<(String, QueueState)>, StoreError> {
        let prefix = key(&[dir.tag().as_bytes(), b""]);
        let mut out = Vec::new();
        for item in self.scan(cf::CUSTODY_STATE, &prefix) {
            let (k, v) = item?;
            let st = serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                cf: cf::CUSTODY_STATE,
                detail: e.to_string(),
            })?;
            out.push((String::from_utf8_lossy(&k[prefix.len()..]).into_owned(), st));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Append, Batch, temp_store};
    use super::*;

    fn held(txn: &str, body: &[u8]) -> Append {
        Append::Held {
            dir: Dir::Out,
            queue: "b.test".into(),
            record: encode(
                &Envelope {
                    txn_id: txn.into(),
                    path: format!("/_matrix/federation/v1/send/{txn}"),
                    headers: vec![("authorization".into(), "X-Matrix origin=a".into())],
                    received_ts: 7,
                },
                body,
            ),
        }
    }

    #[tokio::test]
    async fn queues_keep_order_bytes_and_directions_apart() {
        let (_d, s) = temp_store();
        // A body with a newline and non-UTF-8 bytes comes back unchanged.
        s.append(vec![held("t1", b"{\n\"a\":1}\xff")])
            .await
            .unwrap();
        s.append(vec![held("t2", b"{}")]).await.unwrap();
        s.append(vec![Append::Held {
            dir: Dir::In,
            queue: "origin.test".into(),
            record: encode(
                &Envelope {
                    txn_id: "x".into(),
                    path: "/p".into(),
                    headers: vec![],
                    received_ts: 1,
                },
                b"",
            ),
        }])
        .await
        .unwrap();
        assert_eq!(s.custody_queues(Dir::Out).unwrap(), vec!["b.test"]);
        assert_eq!(s.custody_queues(Dir::In).unwrap(), vec!["origin.test"]);
        let head = s.custody_head(Dir::Out, "b.test").unwrap().unwrap();
        assert_eq!(head.envelope.txn_id, "t1");
        assert_eq!(head.body, b"{\n\"a\":1}\xff");
        assert_eq!(s.custody_depth(Dir::Out, "b.test").unwrap(), (2, Some(7)));
        assert!(s.custody_head(Dir::Out, "b.tes").unwrap().is_none());

        let mut b = Batch::new();
        s.custody_ack(&mut b, Dir::Out, "b.test", head.seq);
        s.commit(b).await.unwrap();
        let next = s.custody_head(Dir::Out, "b.test").unwrap().unwrap();
        assert_eq!(next.envelope.txn_id, "t2");
        let mut b = Batch::new();
        s.custody_park(&mut b, Dir::Out, "b.test", &next, "HTTP 400");
        s.commit(b).await.unwrap();
        assert!(s.custody_queues(Dir::Out).unwrap().is_empty());
        assert_eq!(s.custody_parked_count(Dir::Out, "b.test"), 1);
        assert_eq!(s.custody_parked_queues(Dir::Out).unwrap(), vec!["b.test"]);
        assert_eq!(s.custody_depth(Dir::In, "origin.test").unwrap().0, 1);
    }

    /// A parked transaction is listed with its reason and everything that replays it,
    /// and one append puts it back at the end of its queue, byte for byte; a row
    /// parked before headers were kept is listed as not replayable.
    #[tokio::test]
    async fn a_parked_transaction_goes_back_to_its_queue_in_one_append() {
        let (_d, s) = temp_store();
        s.append(vec![held("t1", b"{\n}\xff"), held("t2", b"{}")])
            .await
            .unwrap();
        let head = s.custody_head(Dir::Out, "b.test").unwrap().unwrap();
        let mut b = Batch::new();
        s.custody_park(&mut b, Dir::Out, "b.test", &head, "HTTP 400: no");
        // As an earlier version parked it: no headers.
        b.0.put_cf(
            s.cf(cf::CUSTODY_PARKED),
            entry_key(Dir::Out, "b.test", head.seq + 1000),
            b"{\"reason\":\"HTTP 403\",\"txn_id\":\"old\",\"path\":\"/p\",\"received_ts\":3}\n{}",
        );
        s.commit(b).await.unwrap();
        let parked = s.custody_parked(Dir::Out, "b.test", 0, 10).unwrap();
        assert_eq!(parked.len(), 2);
        assert_eq!(parked[0].reason, "HTTP 400: no");
        assert_eq!(
            (&parked[0].envelope, parked[0].replayable),
            (&head.envelope, true)
        );
        assert_eq!(parked[0].body, b"{\n}\xff");
        assert_eq!(
            (parked[1].replayable, &parked[1].envelope.txn_id[..]),
            (false, "old")
        );
        let page = s
            .custody_parked(Dir::Out, "b.test", parked[0].seq, 10)
            .unwrap();
        assert_eq!(page.len(), 1, "after a position");
        assert!(
            s.custody_parked(Dir::In, "b.test", 0, 10)
                .unwrap()
                .is_empty()
        );

        s.append(vec![
            Append::Held {
                dir: Dir::Out,
                queue: "b.test".into(),
                record: encode(&parked[0].envelope, &parked[0].body),
            },
            Append::UnparkHeld {
                dir: Dir::Out,
                queue: "b.test".into(),
                seq: parked[0].seq,
            },
        ])
        .await
        .unwrap();
        assert_eq!(
            s.custody_parked_count(Dir::Out, "b.test"),
            1,
            "the old row stays"
        );
        let next = s.custody_head(Dir::Out, "b.test").unwrap().unwrap();
        assert_eq!(next.envelope.txn_id, "t2", "requeued at the end");
        let mut b = Batch::new();
        s.custody_ack(&mut b, Dir::Out, "b.test", next.seq);
        s.commit(b).await.unwrap();
        let again = s.custody_head(Dir::Out, "b.test").unwrap().unwrap();
        assert_eq!((again.envelope, again.body), (head.envelope, head.body));
    }

    #[tokio::test]
    async fn state_round_trips_and_default_clears() {
        let (_d, s) = temp_store();
        let st = QueueState {
            failures: 2,
            next_attempt_ts: 9,
            last_error: Some("down".into()),
        };
        let mut b = Batch::new();
        s.put_custody_state(&mut b, Dir::In, "o.test", &st);
        s.commit(b).await.unwrap();
        assert_eq!(s.custody_state(Dir::In, "o.test").unwrap(), st);
        assert_eq!(s.custody_states(Dir::In).unwrap().len(), 1);
        assert!(s.custody_states(Dir::Out).unwrap().is_empty());
        let mut b = Batch::new();
        s.put_custody_state(&mut b, Dir::In, "o.test", &QueueState::default());
        s.commit(b).await.unwrap();
        assert!(s.custody_states(Dir::In).unwrap().is_empty());
    }
}
