//! The durable state of courier: one RocksDB database, one column family per concept.
//!
//! Owns every byte on disk. It is the only module that imports `rocksdb`; the rest of
//! courier sees typed operations (`store::inbox`, `store::outbox`, ...), never keys.
//! Each mutating operation is one `WriteBatch`; those that accept work from a peer
//! (a client's send, a federation transaction) are written with `sync = true` before
//! they return, so an `Ok` means "on disk". Concurrent synced writes from the blocking
//! pool are grouped by RocksDB into one WAL write and one fsync (its write-group
//! leader), which is courier's group commit.
//!
//! It must never call back into HTTP, federation or notification code: callers pass in
//! everything (times, ids) and wake whoever needs waking after a commit.
//!
//! The key layout of every column family is documented in ARCHITECTURE.md and next to
//! each module's encoder.

pub mod accounts;
pub mod custody;
pub mod dedupe;
pub mod inbox;
pub mod keys;
pub mod outbox;
mod tail;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, DB, Options, WriteBatch, WriteOptions};

/// Column families, named for what they hold.
pub mod cf {
    /// Small counters (`seq_reserved`).
    pub const META: &str = "meta";
    /// Remote servers' verify keys: `server \0 key_id` -> JSON.
    pub const SERVER_KEYS: &str = "server_keys";
    /// Local users: `user_id` -> JSON.
    pub const USERS: &str = "users";
    /// Local devices: `user_id \0 device_id` -> JSON.
    pub const DEVICES: &str = "devices";
    /// Access tokens: `sha256(token)` -> `user_id \0 device_id`.
    pub const TOKENS: &str = "tokens";
    /// Device inboxes: `user_id \0 device_id \0 seq(be64)` -> to-device event JSON.
    pub const INBOX: &str = "inbox";
    /// Per-device inbox bookkeeping: `user_id \0 device_id` -> JSON.
    pub const INBOX_STATE: &str = "inbox_state";
    /// Outbound EDUs: `destination \0 seq(be64)` -> EDU JSON.
    pub const OUTBOX: &str = "outbox";
    /// Per-destination delivery state (backoff, in-flight txn): `destination` -> JSON.
    pub const DESTINATIONS: &str = "destinations";
    /// EDUs a destination refused for good: `destination \0 seq(be64)` -> JSON.
    pub const PARKED: &str = "parked";
    /// Inbound `(origin, txnId)` seen: `origin \0 txn_id` -> ts(be64).
    pub const INBOUND_TXNS: &str = "inbound_txns";
    /// Inbound `(origin, message_id)` seen: `origin \0 message_id` -> ts(be64).
    pub const MESSAGE_IDS: &str = "message_ids";
    /// Client `sendToDevice` transactions: `user \0 device \0 type \0 txn` -> ts(be64).
    pub const CLIENT_TXNS: &str = "client_txns";
    /// Offload mode's held transactions: `dir \0 queue \0 seq(be64)` -> envelope + body.
    pub const CUSTODY: &str = "custody";
    /// Per-queue delivery state of held transactions: `dir \0 queue` -> JSON.
    pub const CUSTODY_STATE: &str = "custody_state";
    /// Held transactions refused for good: `dir \0 queue \0 seq(be64)` -> reason + body.
    pub const CUSTODY_PARKED: &str = "custody_parked";
    /// Held `(dir, queue, txnId)` seen: `dir \0 queue \0 txn_id` -> ts(be64).
    pub const CUSTODY_TXNS: &str = "custody_txns";

    pub const ALL: &[&str] = &[
        META,
        SERVER_KEYS,
        USERS,
        DEVICES,
        TOKENS,
        INBOX,
        INBOX_STATE,
        OUTBOX,
        DESTINATIONS,
        PARKED,
        INBOUND_TXNS,
        MESSAGE_IDS,
        CLIENT_TXNS,
        CUSTODY,
        CUSTODY_STATE,
        CUSTODY_PARKED,
        CUSTODY_TXNS,
    ];

    /// Column families whose values start with a big-endian millisecond timestamp and
    /// expire after the dedupe TTL (dropped by a compaction filter).
    pub const EXPIRING: &[&str] = &[INBOUND_TXNS, MESSAGE_IDS, CLIENT_TXNS, CUSTODY_TXNS];
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("RocksDB: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("corrupt record in {cf}: {detail}")]
    Corrupt { cf: &'static str, detail: String },
    #[error("store task failed: {0}")]
    Task(String),
}

/// A set of writes applied atomically by [`Store::commit`]; built by the typed
/// operations of the submodules, so callers never see keys.
#[derive(Default)]
pub struct Batch(pub(crate) WriteBatch);

impl Batch {
    pub fn new() -> Batch {
        Batch::default()
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One raw row of a column family, as scans yield it.
pub(crate) type KeyValue = (Box<[u8]>, Box<[u8]>);

/// Options fixed at open.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Age after which dedupe markers may be dropped by compaction.
    pub dedupe_ttl: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            dedupe_ttl: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// A cheap, cloneable handle to the database.
#[derive(Clone)]
pub struct Store {
    db: Arc<DB>,
    writer: Arc<WriterHandle>,
    /// The highest sequence number whose write is on disk.
    last_seq: Arc<AtomicU64>,
    /// The newest outbox rows of each destination, in memory (see `store::tail`).
    tails: Arc<tail::Tails>,
    /// Owners of access tokens in use (see `store::accounts`).
    tokens: Arc<accounts::TokenCache>,
    /// Held for reading from the moment a request looks up which devices exist until
    /// its inbox rows are written, and for writing by a device's deletion (see
    /// [`Store::devices_stable`]).
    devices: Arc<tokio::sync::RwLock<()>>,
}

/// While held, no device is deleted (see [`Store::devices_stable`]).
pub type DevicesStable = tokio::sync::OwnedRwLockReadGuard<()>;

/// One write that consumes a sequence number (or rides along with those that do),
/// for [`Store::append`].
#[derive(Debug, Clone)]
pub enum Append {
    /// A to-device event for a local device's inbox.
    Inbox {
        user: String,
        device: String,
        event: Vec<u8>,
    },
    /// An EDU for a destination's queue.
    Outbox { dest: String, edu: Vec<u8> },
    /// A transaction held in offload mode (see `store::custody`), replayed verbatim.
    Held {
        dir: custody::Dir,
        queue: String,
        record: Vec<u8>,
    },
    /// An idempotency marker guarding the other writes of the same request.
    Mark {
        marker: dedupe::Marker,
        parts: Vec<String>,
    },
    /// Removes one of `dest`'s parked EDUs: put back in its queue by an `Outbox` op
    /// of the same request (see `Store::parked`; one commit, so it is never in both
    /// places, nor in neither), or alone, discarded by an operator.
    Unpark { dest: String, seq: u64 },
    /// Removes a parked held transaction: put back in its queue by a `Held` op of the
    /// same request (see `Store::custody_parked`), or alone, discarded by an operator.
    UnparkHeld {
        dir: custody::Dir,
        queue: String,
        seq: u64,
    },
}

struct AppendRequest {
    ops: Vec<Append>,
    done: tokio::sync::oneshot::Sender<Result<(), StoreError>>,
}

/// Sequence numbers are reserved on disk in blocks, so they grow across restarts
/// without a write per number.
const SEQ_BLOCK: u64 = 1 << 20;
const SEQ_KEY: &[u8] = b"seq_reserved";
/// Requests merged into one synced write at most.
const MAX_GROUP: usize = 1024;
/// Memtable size per column family (RocksDB's default is 64 MiB).
const WRITE_BUFFER_BYTES: usize = 8 * 1024 * 1024;
/// Write-ahead log files kept for reuse (see `Store::open`).
const RECYCLED_LOGS: usize = 4;

impl Store {
    /// Opens (creating if needed) the database in `path`.
    pub fn open(path: &Path, options: &StoreOptions) -> Result<Store, StoreError> {
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        db_opts.increase_parallelism(2);
        db_opts.set_keep_log_file_num(4);
        db_opts.set_max_total_wal_size(32 * 1024 * 1024);
        // Every accepted request waits for an fsync of the log. Appending to a fresh
        // log file makes each `fdatasync` also write the inode (the file grew) and
        // convert preallocated extents; overwriting a recycled log whose blocks are
        // already written does neither. Measured on this machine class: ~300 -> ~150
        // µs per synced 4 KiB write. Recycling works with the default recovery mode
        // (point in time), which RocksDB checks: it disables recycling otherwise.
        db_opts.set_recycle_log_file_num(RECYCLED_LOGS);
        let ttl_ms = options.dedupe_ttl.as_millis() as u64;
        let descriptors = cf::ALL.iter().map(|name| {
            let mut o = Options::default();
            o.set_compression_type(rocksdb::DBCompressionType::Lz4);
            o.set_write_buffer_size(WRITE_BUFFER_BYTES);
            if cf::EXPIRING.contains(name) {
                o.set_compaction_filter(
                    "expired_markers",
                    move |_level, _key, value| match read_ts(value) {
                        Some(ts) if ts.saturating_add(ttl_ms) < now_ms() => {
                            rocksdb::compaction_filter::Decision::Remove
                        }
                        _ => rocksdb::compaction_filter::Decision::Keep,
                    },
                );
                o.set_periodic_compaction_seconds(24 * 3600);
                // Markers are looked up on every request and transaction, and the key
                // is almost always absent: bloom filters in the memtable and in the
                // tables answer "absent" without searching the skip list (the
                // memtable search was ~18 % of a busy receiver's CPU) or the tables.
                let mut table = rocksdb::BlockBasedOptions::default();
                table.set_bloom_filter(10.0, false);
                o.set_block_based_table_factory(&table);
                o.set_memtable_prefix_bloom_ratio(0.05);
                o.set_memtable_whole_key_filtering(true);
            }
            ColumnFamilyDescriptor::new(*name, o)
        });
        let db = Arc::new(DB::open_cf_descriptors(&db_opts, path, descriptors)?);
        let reserved = match db.get_cf(db.cf_handle(cf::META).expect("meta cf"), SEQ_KEY)? {
            Some(v) => read_u64(&v).ok_or_else(|| StoreError::Corrupt {
                cf: cf::META,
                detail: "seq_reserved".into(),
            })?,
            None => 0,
        };
        // Everything below the old reservation may have been used: start above it.
        // Position 0 means "nothing yet" in sync tokens and is never handed out.
        let last_seq = Arc::new(AtomicU64::new(reserved));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let tails = Arc::new(tail::Tails::new(reserved, tail::Limits::default()));
        let writer = Writer {
            db: db.clone(),
            next: reserved + 1,
            reserved,
            last_seq: last_seq.clone(),
            tails: tails.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("courier-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Task(e.to_string()))?;
        Ok(Store {
            db,
            writer: Arc::new(WriterHandle {
                tx: Some(tx),
                thread: Some(thread),
            }),
            last_seq,
            tails,
            tokens: Arc::default(),
            devices: Arc::default(),
        })
    }

    /// Keeps the set of devices from shrinking while held. A request takes it before
    /// it looks up its recipients' devices and drops it once their rows are written,
    /// so a deletion never lands in between: rows written after it would be left in
    /// an inbox no sync serves and no purge visits, and served to a device created
    /// again under the same ID.
    pub async fn devices_stable(&self) -> DevicesStable {
        self.devices.clone().read_owned().await
    }

    /// Writes `ops` durably, giving the inbox and outbox rows fresh sequence numbers
    /// in order. One writer thread takes every waiting request, numbers their rows,
    /// and writes them in one synced batch (group commit: one fsync for all).
    ///
    /// Because numbering and writing happen in one place, a row is never committed
    /// below a row already visible: a reader that served up to `T` can delete `[0, T]`
    /// without ever deleting a row it has not seen.
    pub async fn append(&self, ops: Vec<Append>) -> Result<(), StoreError> {
        let (done, rx) = tokio::sync::oneshot::channel();
        self.writer
            .tx
            .as_ref()
            .expect("set until drop")
            .send(AppendRequest { ops, done })
            .map_err(|_| StoreError::Task("writer thread stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Task("writer thread stopped".into()))?
    }

    /// The highest sequence number handed out and durable.
    pub fn last_seq(&self) -> u64 {
        self.last_seq.load(Ordering::Acquire)
    }

    pub(crate) fn cf(&self, name: &'static str) -> &ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("every column family in cf::ALL is opened")
    }

    pub(crate) fn db(&self) -> &DB {
        &self.db
    }

    /// Writes `batch` durably (fsync) on the blocking pool; concurrent callers share
    /// one fsync.
    pub async fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        let db = self.db.clone();
        let batch = batch.0;
        tokio::task::spawn_blocking(move || {
            let mut opts = WriteOptions::default();
            opts.set_sync(true);
            db.write_opt(batch, &opts)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))??;
        Ok(())
    }

    /// Writes `batch` to the WAL without waiting for fsync: survives a process crash,
    /// not a power cut. For bookkeeping whose loss only causes a harmless redo
    /// (acknowledgements, in-flight markers).
    pub fn commit_unsynced(&self, batch: Batch) -> Result<(), StoreError> {
        self.db.write(batch.0)?;
        Ok(())
    }

    /// Number of keys in a column family (RocksDB's estimate for big ones; exact
    /// count when small): for admin views and tests.
    pub fn count(&self, cf_name: &'static str) -> usize {
        self.db
            .iterator_cf(self.cf(cf_name), rocksdb::IteratorMode::Start)
            .take_while(Result::is_ok)
            .count()
    }

    /// Compacts every column family completely: drops deleted rows and their
    /// tombstones (for benchmarks, which report the size of what is really left).
    pub fn compact_all(&self) {
        for name in cf::ALL {
            self.db
                .compact_range_cf(self.cf(name), None::<&[u8]>, None::<&[u8]>);
        }
    }

    /// Bytes of all SST and WAL files under `path` (for benchmarks).
    pub fn disk_usage(path: &Path) -> u64 {
        fn walk(p: &Path) -> u64 {
            let Ok(rd) = std::fs::read_dir(p) else {
                return 0;
            };
            rd.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => walk(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        }
        walk(path)
    }
}

/// Owns the writer thread: when the last `Store` clone goes, the channel closes and
/// the thread is joined, so the database is really closed (and can be reopened)
/// once every handle is dropped.
struct WriterHandle {
    tx: Option<tokio::sync::mpsc::UnboundedSender<AppendRequest>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for WriterHandle {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The single thread that numbers and writes appended rows.
struct Writer {
    db: Arc<DB>,
    next: u64,
    reserved: u64,
    last_seq: Arc<AtomicU64>,
    tails: Arc<tail::Tails>,
}

impl Writer {
    fn run(mut self, mut rx: tokio::sync::mpsc::UnboundedReceiver<AppendRequest>) {
        while let Some(first) = rx.blocking_recv() {
            let mut group = vec![first];
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(r) => group.push(r),
                    Err(_) => break,
                }
            }
            let result = self.write_group(&mut group);
            for req in group {
                let _ = req.done.send(match &result {
                    Ok(()) => Ok(()),
                    Err(e) => Err(StoreError::Task(format!("write failed: {e}"))),
                });
            }
        }
    }

    fn write_group(&mut self, group: &mut [AppendRequest]) -> Result<(), rocksdb::Error> {
        let cf = |name| self.db.cf_handle(name).expect("every cf is opened");
        let mut seq = self.next;
        let now = now_ms().to_be_bytes();
        // (column family, key, value), numbered in arrival order...
        let mut rows: Vec<(&'static str, Vec<u8>, &[u8])> = Vec::new();
        let mut deletes: Vec<(&'static str, Vec<u8>)> = Vec::new();
        // The numbers of the outbox rows, in the order their ops come (for memory).
        let mut outbox_seqs: Vec<u64> = Vec::new();
        for req in group.iter() {
            for op in &req.ops {
                match op {
                    Append::Inbox {
                        user,
                        device,
                        event,
                    } => {
                        rows.push((cf::INBOX, inbox::entry_key(user, device, seq), event));
                        seq += 1;
                    }
                    Append::Outbox { dest, edu } => {
                        rows.push((cf::OUTBOX, outbox::entry_key(dest, seq), edu));
                        outbox_seqs.push(seq);
                        seq += 1;
                    }
                    Append::Held { dir, queue, record } => {
                        rows.push((cf::CUSTODY, custody::entry_key(*dir, queue, seq), record));
                        seq += 1;
                    }
                    Append::Mark { marker, parts } => {
                        let parts: Vec<&[u8]> = parts.iter().map(|p| p.as_bytes()).collect();
                        rows.push((marker.cf(), key(&parts), &now));
                    }
                    Append::Unpark { dest, seq } => {
                        deletes.push((cf::PARKED, outbox::entry_key(dest, *seq)));
                    }
                    Append::UnparkHeld { dir, queue, seq } => {
                        deletes.push((cf::CUSTODY_PARKED, custody::entry_key(*dir, queue, *seq)));
                    }
                }
            }
        }
        // ...then put in key order. The memtable is a skip list that reuses the
        // previous insert's position when the next key is close to it; a
        // transaction's messages alternate between devices, so in arrival order
        // nearly every insert searched from the top (`FindSpliceForLevel`, half of
        // the receiver's write time in a backlog drain). Keys in one group are
        // distinct but for markers, whose equal keys keep their order (stable sort).
        rows.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        let mut b = WriteBatch::default();
        for (name, k, v) in &rows {
            b.put_cf(cf(name), k, v);
        }
        for (name, k) in &deletes {
            b.delete_cf(cf(name), k);
        }
        let reserved = if seq > self.reserved {
            let r = seq + SEQ_BLOCK;
            b.put_cf(cf(cf::META), SEQ_KEY, r.to_be_bytes());
            r
        } else {
            self.reserved
        };
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(b, &opts)?;
        drop(rows);
        // Durable: the outbox rows go to memory, numbered as above, before anyone
        // hears of the commit (the sender is woken only after `append` returns).
        if !outbox_seqs.is_empty() {
            let outbox_ops = group.iter_mut().flat_map(|r| r.ops.iter_mut());
            let queued = outbox_ops
                .filter_map(|op| match op {
                    Append::Outbox { dest, edu } => {
                        Some((std::mem::take(dest), std::mem::take(edu)))
                    }
                    _ => None,
                })
                .zip(outbox_seqs)
                .map(|((dest, edu), seq)| (dest, outbox::QueuedEdu { seq, edu }));
            self.tails.committed(queued);
        }
        self.reserved = reserved;
        self.next = seq;
        self.last_seq.store(seq - 1, Ordering::Release);
        Ok(())
    }
}

/// Current wall-clock time in milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) fn read_u64(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(..8)?.try_into().ok()?))
}

fn read_ts(value: &[u8]) -> Option<u64> {
    read_u64(value)
}

/// `a \0 b \0 ...`: the separator sorts below every printable byte, so a prefix scan
/// over `a \0` never meets `ab`.
pub(crate) fn key(parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(0);
        }
        k.extend_from_slice(p);
    }
    k
}

/// Read options for an outbox's rows under `prefix`: bounded to
/// the prefix, and not kept in the block cache. Queued rows are read once and then
/// deleted, so caching their blocks only filled the cache with rows about to go:
/// draining a 100k backlog from tables took a page fault per 4 KiB block the cache
/// grew by (three quarters of the origin's page faults in that drain) and pushed
/// out the blocks that lookups reuse. Inbox reads do cache: a `/sync` seeks the same
/// device's region again and again, and without the cache every seek re-read and
/// decompressed the table blocks holding its acknowledged rows' tombstones (~9 % of
/// a busy receiver's CPU).
pub(crate) fn queue_read_options(prefix: &[u8]) -> rocksdb::ReadOptions {
    let mut opts = rocksdb::ReadOptions::default();
    opts.set_iterate_upper_bound(prefix_end(prefix));
    opts.fill_cache(false);
    opts
}

/// The smallest key greater than every key starting with `prefix`.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0xff; prefix.len() + 1]
}

#[cfg(test)]
pub(crate) fn temp_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    (dir, store)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inbox(n: u64) -> Append {
        Append::Inbox {
            user: "@a:x".into(),
            device: "D".into(),
            event: n.to_string().into_bytes(),
        }
    }

    #[tokio::test]
    async fn appended_rows_are_numbered_in_order_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let before = {
            let s = Store::open(dir.path(), &StoreOptions::default()).unwrap();
            s.append(vec![inbox(1), inbox(2)]).await.unwrap();
            let page = s.inbox_page("@a:x", "D", 0, 10).unwrap();
            assert_eq!(page.len(), 2);
            assert_eq!(page[1].0, page[0].0 + 1);
            assert_eq!(s.last_seq(), page[1].0);
            s.last_seq()
        };
        let s = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        s.append(vec![inbox(3)]).await.unwrap();
        assert!(s.last_seq() > before);
    }

    #[tokio::test]
    async fn concurrent_appends_commit_in_number_order() {
        let (_d, s) = temp_store();
        let tasks: Vec<_> = (0..200u64)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move { s.append(vec![inbox(i)]).await.unwrap() })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let page = s.inbox_page("@a:x", "D", 0, 1000).unwrap();
        assert_eq!(page.len(), 200);
        assert!(page.windows(2).all(|w| w[0].0 < w[1].0));
    }

    /// Log recycling is in force (RocksDB silently turns it off with some recovery
    /// modes), and a log written over a recycled one reads back exactly what was
    /// written: the old file's stale tail is not replayed.
    #[tokio::test]
    async fn recycled_logs_are_used_and_replay_only_new_rows() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), &StoreOptions::default()).unwrap();
            for round in 0..3u64 {
                for i in 0..50u64 {
                    s.append(vec![inbox(round * 100 + i)]).await.unwrap();
                }
                // Flushing every family makes the current log obsolete: it goes to
                // the recycle list, and a later log is written over it.
                for name in cf::ALL {
                    s.db.flush_cf(s.cf(name)).unwrap();
                }
            }
            s.append(vec![inbox(999)]).await.unwrap();
        }
        let options = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("OPTIONS-"))
            .max_by_key(|e| e.file_name())
            .map(|e| std::fs::read_to_string(e.path()).unwrap())
            .unwrap();
        assert!(
            options.contains(&format!("recycle_log_file_num={RECYCLED_LOGS}")),
            "log recycling was turned off"
        );
        let s = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let page = s.inbox_page("@a:x", "D", 0, 1000).unwrap();
        let events: Vec<String> = page
            .iter()
            .map(|(_, e)| String::from_utf8(e.to_vec()).unwrap())
            .collect();
        let mut expected: Vec<String> = (0..3u64)
            .flat_map(|r| (0..50u64).map(move |i| (r * 100 + i).to_string()))
            .collect();
        expected.push("999".into());
        assert_eq!(events, expected);
    }

    #[test]
    fn prefix_end_bounds_prefix() {
        assert_eq!(prefix_end(b"ab\0"), b"ab\x01".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert!(key(&[b"a", b"b"]).as_slice() < prefix_end(b"a\0").as_slice());
    }
}
