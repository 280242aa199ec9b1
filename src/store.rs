//! The store: the only module that names sled.
//!
//! Format version 1. Trees and key layout:
//! - `meta`: `format_version` -> u32 BE; `next_trial_id`, `next_job_seq` -> u64 BE counters
//!   (bumped in the same transaction as the record they number, so ids are never reused).
//! - `indexes`: index name -> JSON `IndexRecord` (what the index is + its active generation +
//!   the snapshot file holding that generation and the write sequence it covers, if any; the
//!   snapshot field is absent in records written before it, which reads as "none").
//! - `points`: uid (u64 BE) ++ point id (u64 BE) -> the vector as little-endian f32s. Keyed by
//!   the index's uid, unique per incarnation, so a re-created index never sees old points.
//! - `counts`: uid (u64 BE) -> data version (u64 BE) ++ point count (u64 BE) ++ points changed
//!   (u64 BE, upserted + deleted ever; absent in records written before it: 0), changed in the
//!   same transaction as the points.
//! - `changes`: uid (u64 BE) ++ write sequence (u64 BE, the data version the write made) -> the
//!   write's ids: a kind byte (0 upsert, 1 delete) then the ids (u64 BE each; for a delete only
//!   those that existed); or, under the last write's sequence, the writes of one group commit
//!   (kind 2: the number of writes, then each write's kind, id count and ids, all u64 BE; the
//!   writes' sequences are consecutive, ending at the key's). The change log: appended in the
//!   same transaction as the points and counts, read at start to replay the writes a
//!   generation's snapshot does not hold, trimmed up to the sequence of the snapshot the index
//!   record names (a group entry is removed once its last write is). Absent in stores written
//!   before it (an index whose record names no snapshot is rebuilt at start, and its log starts
//!   then). A server older than group entries finds the log unreadable and rebuilds the index
//!   at start instead of replaying, so the format stays 1.
//! - `refresh`: uid (u64 BE) -> JSON refresh record (the index's refresh policy and the
//!   points-changed mark of its last tune).
//! - `profiles`: profile name -> JSON profile.
//! - `harnesses`: index name ++ 0x00 ++ harness name -> JSON harness (with its ground truth).
//! - `trials`: trial id (u64 BE) -> JSON trial (the journal; ids increase, never reused;
//!   per index and harness the newest `--trials-kept` and every promoted one are kept).
//! - `promotions`: index name -> JSON `{current, history}`.
//! - `jobs`: job seq (u64 BE) -> JSON job (the newest `--jobs-kept` finished ones and every
//!   running one are kept).
//! - `applied` (cluster nodes only, docs/cluster.md): uid (u64 BE) -> the cluster's uid of the
//!   index (u64 BE) ++ the last write-log sequence applied (u64 BE). Written when the node
//!   creates its replica of a cluster index, then in the same transaction as the points, counts
//!   and change log of every logged write, so a restart resumes the log right after what the
//!   points hold. Absent for an index of a single node (and in stores written before it, which
//!   a single node reads the same: the tree is only added to, so the format stays 1).
//! - `lab` (cluster nodes only, docs/cluster.md): `applied` -> the last sequence of the
//!   cluster's lab log (harnesses, trials, retention, pins) mirrored here (u64 BE), written in
//!   the same transaction as the mirrored record; `pin` ++ trial id (u64 BE) -> empty: a trial
//!   promoted in the cluster, which retention never removes; `resync` -> empty: the node
//!   is re-reading the whole log (it was trimmed past what the node had), removed with what
//!   the re-read did not find.
//!   A node that copies a replica from a peer (`cluster/catchup.rs`) writes the points under
//!   a fresh uid first, then switches the index record, counts and applied record to it in one
//!   transaction (an interrupted copy is an orphan uid, swept at the next start).
//! - `meta` `cluster_node`: the node id of the cluster node that uses this data dir, set at its
//!   first start in a cluster (a data dir with indexes but without it was a single node's).
//!
//! Every change that must survive a crash is followed by [`Store::flush`] before it is
//! acknowledged. Names are `[A-Za-z0-9_.-]`, so the 0x00 separator never occurs inside one.

use std::path::Path;
use std::sync::Arc;

use serde::{de::DeserializeOwned, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

use crate::error::{Error, Result};
use crate::model::{GenerationMeta, IndexMeta, Point};

pub const FORMAT_VERSION: u32 = 1;

/// An index as stored.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct IndexRecord {
    pub meta: IndexMeta,
    pub generation: GenerationMeta,
    /// The snapshot file holding the active generation, if one was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotRef>,
}

/// Where an active generation is saved: its file (in the data dir's `snapshots/`) and the
/// index's write sequence (data version) the file holds; later writes are in the change log.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotRef {
    pub file: String,
    pub seq: u64,
    /// The findability check had checked every point of the file's graph when it was written
    /// (`catalog/check.rs`): a start that loads it checks only the points linked after.
    /// Absent (false) in records written before the check and in those of a graph not
    /// checked; a server that does not know the field ignores it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub checked: bool,
}

/// One write in the change log: the ids it touched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Upsert(Vec<u64>),
    Delete(Vec<u64>),
}

/// A change log entry's first byte: one write's upsert or delete ([`Change::encode`]), or the
/// writes of one group commit ([`GroupLog`]).
const CHANGE_UPSERT: u8 = 0;
const CHANGE_DELETE: u8 = 1;
const CHANGE_GROUP: u8 = 2;

impl Change {
    fn encode(&self) -> Vec<u8> {
        let (kind, ids) = match self {
            Change::Upsert(ids) => (CHANGE_UPSERT, ids),
            Change::Delete(ids) => (CHANGE_DELETE, ids),
        };
        let mut out = Vec::with_capacity(1 + ids.len() * 8);
        out.push(kind);
        for id in ids {
            out.extend_from_slice(&id.to_be_bytes());
        }
        out
    }

    fn from_parts(kind: u8, ids: &[u8]) -> Result<Self> {
        if !ids.len().is_multiple_of(8) {
            return Err(Error::Corrupt("a change log entry of a partial id".into()));
        }
        let ids = ids
            .chunks_exact(8)
            .map(|c| u64_at(c, 0))
            .collect::<Result<Vec<_>>>()?;
        match kind {
            CHANGE_UPSERT => Ok(Change::Upsert(ids)),
            CHANGE_DELETE => Ok(Change::Delete(ids)),
            k => Err(Error::Corrupt(format!("a change log entry of kind {k}"))),
        }
    }

    /// The writes of the entry stored under write sequence `seq`, each with its sequence: one
    /// write's entry is that write; a group's ([`GroupLog`]) holds consecutive writes ending
    /// at `seq`.
    fn decode_entry(seq: u64, b: &[u8]) -> Result<Vec<(u64, Change)>> {
        let (kind, rest) = b
            .split_first()
            .ok_or_else(|| Error::Corrupt("an empty change log entry".into()))?;
        if *kind != CHANGE_GROUP {
            return Ok(vec![(seq, Change::from_parts(*kind, rest)?)]);
        }
        let short = || Error::Corrupt("a change log group entry is cut short".into());
        let count = u64_at(rest, 0).map_err(|_| short())?;
        // Writes first..=seq, where sequences start at 1.
        if count == 0 || count > seq {
            return Err(Error::Corrupt(format!(
                "a change log group entry of {count} writes at write {seq}"
            )));
        }
        let first = seq - count + 1;
        let mut out = Vec::new();
        let mut at = 8;
        for i in 0..count {
            let kind = *rest.get(at).ok_or_else(short)?;
            let n = u64_at(rest, at + 1).map_err(|_| short())?;
            let start = at + 9;
            let ids = usize::try_from(n)
                .ok()
                .and_then(|n| n.checked_mul(8))
                .and_then(|len| rest.get(start..start.checked_add(len)?))
                .ok_or_else(short)?;
            out.push((first + i, Change::from_parts(kind, ids)?));
            at = start + ids.len();
        }
        if at != rest.len() {
            return Err(Error::Corrupt(
                "a change log group entry has bytes past its writes".into(),
            ));
        }
        Ok(out)
    }
}

/// The change log entry of a group commit's writes that bumped the data version, in order
/// ([`Store::apply_writes_logged`]): one entry, stored under the last one's sequence, instead
/// of one per write (a sled insert saved per write). Layout, big-endian: [`CHANGE_GROUP`], the
/// number of writes (u64), then per write its kind, its id count (u64) and its ids (u64 each).
/// A group of one write is stored as that write's own entry ([`Change::encode`]).
struct GroupLog {
    writes: u64,
    bytes: Vec<u8>,
}

/// Bytes before a [`GroupLog`]'s first write, and before a write's ids.
const GROUP_HEAD: usize = 1 + 8;
const WRITE_HEAD: usize = 1 + 8;

impl GroupLog {
    fn new() -> Self {
        let mut bytes = vec![0; GROUP_HEAD];
        bytes[0] = CHANGE_GROUP;
        GroupLog { writes: 0, bytes }
    }

    fn push(&mut self, kind: u8, ids: impl ExactSizeIterator<Item = u64>) {
        self.bytes.push(kind);
        self.bytes
            .extend_from_slice(&(ids.len() as u64).to_be_bytes());
        for id in ids {
            self.bytes.extend_from_slice(&id.to_be_bytes());
        }
        self.writes += 1;
    }

    /// The entry to store, if any write was pushed.
    fn entry(mut self) -> Option<Vec<u8>> {
        match self.writes {
            0 => None,
            // That write's own entry: its kind, then its ids.
            1 => {
                self.bytes.drain(..GROUP_HEAD);
                self.bytes.drain(1..WRITE_HEAD);
                Some(self.bytes)
            }
            n => {
                self.bytes[1..GROUP_HEAD].copy_from_slice(&n.to_be_bytes());
                Some(self.bytes)
            }
        }
    }
}

pub struct Store {
    dir: std::path::PathBuf,
    db: sled::Db,
    /// Set (with the reason) by the first storage failure: see [`Store::failed`].
    failed: tokio_util::sync::CancellationToken,
    failure: std::sync::Mutex<Option<String>>,
    /// Records in `trials`, kept here because `Tree::len` scans the whole tree.
    trial_count: std::sync::atomic::AtomicU64,
    meta: sled::Tree,
    indexes: sled::Tree,
    points: sled::Tree,
    counts: sled::Tree,
    profiles: sled::Tree,
    harnesses: sled::Tree,
    trials: sled::Tree,
    promotions: sled::Tree,
    jobs: sled::Tree,
    refresh: sled::Tree,
    changes: sled::Tree,
    applied: sled::Tree,
    lab: sled::Tree,
    /// Dropped after every sled handle: the last clone of `open` going (the store and every
    /// blocking store call still running, see [`Store::flush`]) closes the channel, which is how
    /// [`Store::closed`]'s receiver learns that the data dir is free. Declared last so that it
    /// drops after `db` and the trees.
    open: Arc<tokio::sync::oneshot::Sender<()>>,
    closed: std::sync::Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
}

fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| Error::Internal(format!("encoding a record: {e}")))
}

fn from_json<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::Corrupt(format!("{what}: {e}")))
}

fn point_key(uid: u64, id: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&uid.to_be_bytes());
    k[8..].copy_from_slice(&id.to_be_bytes());
    k
}

fn encode_vector(v: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * 4);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// A stored vector's bytes (f32, little-endian) as floats (also a replica copy's file, which
/// holds the stored bytes: `catalog::CopyReader`).
pub(crate) fn decode_vector(bytes: &[u8]) -> Result<Vec<f32>> {
    if !bytes.len().is_multiple_of(4) {
        return Err(Error::Corrupt(format!(
            "a stored vector has {} bytes, not a multiple of 4",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

fn u64_at(bytes: &[u8], at: usize) -> Result<u64> {
    bytes
        .get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| Error::Corrupt("a stored counter is too short".into()))
}

/// The uids (a key's first 8 bytes) of `tree`'s keys that `live` lacks, reading one key per uid
/// present (a seek past each uid's keys), not every key: a start sweeps the points tree, and a
/// scan of all its keys pulled every page of the points into sled's cache, where they stayed
/// resident (at 100k x 128, 52 MB of the server's 105 MB of anonymous memory after a restart).
fn orphan_uids(tree: &sled::Tree, live: &std::collections::HashSet<u64>) -> Result<Vec<u64>> {
    let mut orphans = Vec::new();
    let mut from = [0u8; 8];
    while let Some(kv) = tree.range(from..).next() {
        let (k, _) = kv?;
        let uid = u64_at(&k, 0)?;
        if !live.contains(&uid) {
            orphans.push(uid);
        }
        match uid.checked_add(1) {
            Some(next) => from = next.to_be_bytes(),
            None => break,
        }
    }
    Ok(orphans)
}

pub(crate) fn harness_key(index: &str, name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(index.len() + name.len() + 1);
    k.extend_from_slice(index.as_bytes());
    k.push(0);
    k.extend_from_slice(name.as_bytes());
    k
}

fn harness_prefix(index: &str) -> Vec<u8> {
    let mut k = index.as_bytes().to_vec();
    k.push(0);
    k
}

/// Turns a transaction's abort into our error.
fn tx_err(e: TransactionError<Error>) -> Error {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => Error::Store(e),
    }
}

/// Appends a change log entry inside the transaction that makes its writes: `seq` is the data
/// version the (last) write bumped the index to. Every bump is in exactly one entry (a write's
/// own, or its group's: [`GroupLog`]), so the log has no gaps.
fn log_change(
    ch: &sled::transaction::TransactionalTree,
    uid: u64,
    seq: u64,
    encoded: &[u8],
) -> std::result::Result<(), sled::transaction::UnabortableTransactionError> {
    ch.insert(&point_key(uid, seq)[..], encoded)?;
    Ok(())
}

/// Removes `ids` of index `uid` inside a transaction: the points that existed go and `counts`
/// follows (a delete that removed something is one new data version). Returns the ids removed,
/// for the change log entry the caller writes. Shared by [`Store::delete_points`] and a
/// group's deletes in [`Store::apply_writes_logged`].
fn delete_in_tx(
    pt: &sled::transaction::TransactionalTree,
    counts: &mut Counts,
    uid: u64,
    ids: &[u64],
) -> std::result::Result<Vec<u64>, sled::transaction::UnabortableTransactionError> {
    let mut removed = Vec::new();
    for id in ids {
        if pt.remove(&point_key(uid, *id)[..])?.is_some() {
            removed.push(*id);
        }
    }
    let deleted = removed.len() as u64;
    counts.point_count -= deleted.min(counts.point_count);
    counts.points_changed += deleted;
    if deleted > 0 {
        counts.data_version += 1;
    }
    Ok(removed)
}

type TxResult<T> = std::result::Result<T, ConflictableTransactionError<Error>>;

fn abort<T>(e: Error) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(e))
}

/// One write of a group commit ([`Store::apply_writes`]). Points are validated, normalised
/// and unique by id within one upsert.
#[derive(Clone, Debug)]
pub enum WriteOp {
    Upsert(Vec<Point>),
    Delete(Vec<u64>),
}

/// Where a cluster replica is in its index's write log (the `applied` tree).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Applied {
    /// The index's uid in the cluster (its catalog key's create revision in etcd).
    pub cluster_uid: u64,
    /// The last log sequence whose write is in the points (0: none).
    pub sequence: u64,
}

impl Applied {
    fn encode(&self) -> [u8; 16] {
        point_key(self.cluster_uid, self.sequence)
    }

    fn decode(b: &[u8]) -> Result<Self> {
        if b.len() != 16 {
            return Err(Error::Corrupt(format!(
                "an applied-sequence record of {} bytes (16 expected)",
                b.len()
            )));
        }
        Ok(Applied {
            cluster_uid: u64_at(b, 0)?,
            sequence: u64_at(b, 8)?,
        })
    }
}

/// What one op of [`Store::apply_writes`] did, as it would have alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpOutcome {
    /// Points upserted, or points that existed and were deleted.
    pub affected: u64,
    /// The index's point count right after this op.
    pub point_count: u64,
}

/// Counts (data version, point count) of an index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub data_version: u64,
    pub point_count: u64,
    /// Points upserted plus points deleted, ever: refresh policies measure change with it.
    pub points_changed: u64,
}

impl Counts {
    fn decode(bytes: Option<&[u8]>) -> Result<Self> {
        match bytes {
            None => Ok(Counts::default()),
            Some(b) => Ok(Counts {
                data_version: u64_at(b, 0)?,
                point_count: u64_at(b, 8)?,
                points_changed: if b.len() >= 24 { u64_at(b, 16)? } else { 0 },
            }),
        }
    }
    fn encode(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[..8].copy_from_slice(&self.data_version.to_be_bytes());
        b[8..16].copy_from_slice(&self.point_count.to_be_bytes());
        b[16..].copy_from_slice(&self.points_changed.to_be_bytes());
        b
    }
}

/// The store's page cache when `--store-cache-mb` is not given: 64 MiB. sled's own default is
/// 1 GiB, which after a big import holds the points a second time (the serving graphs already
/// keep every vector in memory); the store is read in bulk only at start (a rebuild or the
/// replay after a snapshot) and otherwise by GetPoint and the small record trees, which fit.
pub const DEFAULT_CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// How the store is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreOptions {
    /// Most bytes of pages sled keeps in memory (its `cache_capacity`).
    pub cache_bytes: u64,
    /// How long to keep trying when another holder has the data dir's lock (zero: fail at
    /// once). A process that has just closed the store can still hold the lock for a moment
    /// (sled's own write threads end after its last handle), so a restart on the same dir
    /// waits for it instead of failing.
    pub lock_wait: std::time::Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            cache_bytes: DEFAULT_CACHE_BYTES,
            lock_wait: std::time::Duration::ZERO,
        }
    }
}

/// sled's config for the store in `dir`.
fn sled_config(dir: &Path, options: &StoreOptions) -> sled::Config {
    // No background flusher: every acknowledged write is flushed by its own call, and
    // sled 0.34's flusher also spends its idle time relocating pages, without end: after
    // loading 30k 384-d points an idle server rewrote about 2 MB/s for as long as it ran
    // (2.4 GB in 20 minutes on a 73 MB store). Without it the store is written only when
    // data changes, and a half-overwrite workload ended 7 % larger (115 vs 107 MB).
    sled::Config::new()
        .path(dir)
        .flush_every_ms(None)
        .cache_capacity(options.cache_bytes)
}

impl Store {
    /// Opens (or creates) the store in `dir` with the default [`StoreOptions`]. Refuses a
    /// directory of a newer format, one that is not a vectord store, and one that another
    /// process has open.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with(dir, &StoreOptions::default())
    }

    /// [`Store::open`] with `options`.
    pub fn open_with(dir: &Path, options: &StoreOptions) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| {
            Error::Unavailable(format!("cannot create data dir {}: {e}", dir.display()))
        })?;
        let started = std::time::Instant::now();
        let first_pause = std::time::Duration::from_millis(5);
        let mut pause = first_pause;
        let db = loop {
            match sled_config(dir, options).open() {
                Ok(db) => break db,
                // No notification exists for a released flock, so this polls, bounded by
                // `lock_wait`, with a growing pause.
                Err(sled::Error::Io(io)) if io.to_string().contains("could not acquire lock") => {
                    if started.elapsed() + pause > options.lock_wait {
                        return Err(Error::Unavailable(format!(
                            "data dir {} is in use by another process (sled's lock is held)",
                            dir.display()
                        )));
                    }
                    if pause == first_pause {
                        tracing::info!(dir = %dir.display(), wait = ?options.lock_wait, "the data dir's lock is held; waiting for it");
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(std::time::Duration::from_millis(100));
                }
                Err(other) => {
                    return Err(Error::Unavailable(format!(
                        "cannot open data dir {}: {other}",
                        dir.display()
                    )))
                }
            }
        };
        let (open, closed) = tokio::sync::oneshot::channel();
        let store = Store {
            meta: db.open_tree("meta")?,
            indexes: db.open_tree("indexes")?,
            points: db.open_tree("points")?,
            counts: db.open_tree("counts")?,
            profiles: db.open_tree("profiles")?,
            harnesses: db.open_tree("harnesses")?,
            trials: db.open_tree("trials")?,
            promotions: db.open_tree("promotions")?,
            jobs: db.open_tree("jobs")?,
            refresh: db.open_tree("refresh")?,
            changes: db.open_tree("changes")?,
            applied: db.open_tree("applied")?,
            lab: db.open_tree("lab")?,
            dir: dir.to_path_buf(),
            db,
            failed: Default::default(),
            failure: Default::default(),
            trial_count: Default::default(),
            open: Arc::new(open),
            closed: std::sync::Mutex::new(Some(closed)),
        };
        // Counted once here (a scan), then kept up to date by every change of the tree.
        store.trial_count.store(
            store.trials.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        match store.meta.get("format_version")? {
            None => {
                if !store.indexes.is_empty() || !store.points.is_empty() {
                    return Err(Error::Corrupt(format!(
                        "data dir {} has data but no format version",
                        dir.display()
                    )));
                }
                store
                    .meta
                    .insert("format_version", &FORMAT_VERSION.to_be_bytes())?;
                store.db.flush()?;
            }
            Some(v) => {
                let v = <[u8; 4]>::try_from(v.as_ref())
                    .map(u32::from_be_bytes)
                    .map_err(|_| Error::Corrupt("the format version is unreadable".into()))?;
                if v != FORMAT_VERSION {
                    return Err(Error::Unavailable(format!(
                        "data dir {} has format version {v}; this vectord reads version {FORMAT_VERSION}",
                        dir.display()
                    )));
                }
            }
        }
        Ok(store)
    }

    /// Makes every earlier write durable.
    ///
    /// sled 0.34's `flush_async` can miss its wake-up when several flushes are in flight at
    /// once and then never completes (spacejam/sled#1308, #1241; fixed only on sled's unreleased
    /// main), which hung our concurrent tests. So the blocking `flush` runs on the blocking pool
    /// instead: the same durability, and the async runtime is never blocked.
    ///
    /// A failed flush is fatal (see [`Store::failed`]).
    pub async fn flush(&self) -> Result<()> {
        self.injected_fault()?;
        // The closure outlives this future if the caller goes away: it holds the store open
        // (the handle first, then the `open` token, dropped in that order) until it ends.
        let held = (self.db.clone(), self.open.clone());
        match tokio::task::spawn_blocking(move || held.0.flush()).await? {
            Ok(_) => Ok(()),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Resolves once the store is closed: every `Arc<Store>` and every blocking store call
    /// that outlived its caller have gone, so the data dir's lock is released. Only the first
    /// call gets the signal (None after that). The receiver resolves with an error (the sender
    /// is never used: the channel closes when its last holder drops).
    pub fn closed(&self) -> Option<tokio::sync::oneshot::Receiver<()>> {
        self.closed.lock().ok()?.take()
    }

    pub fn flush_blocking(&self) -> Result<()> {
        self.injected_fault()?;
        match self.db.flush() {
            Ok(_) => Ok(()),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Cancelled at the first storage failure (a failed flush or a transaction the disk
    /// refused). Storage failures are crash-only: after one, the store's memory may hold
    /// writes that were answered with an error and that a later flush would still make
    /// durable, while the graph never saw them. So the server stops serving and exits
    /// non-zero as soon as this fires, without flushing again; a restart rebuilds from what
    /// is on disk, where store and graph agree again.
    pub fn failed(&self) -> &tokio_util::sync::CancellationToken {
        &self.failed
    }

    /// Why the store failed, once [`Store::failed`] has fired.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }

    /// Records a storage failure (the first one wins) and fires [`Store::failed`].
    fn fail(&self, e: sled::Error) -> Error {
        self.record_failure(e.to_string());
        Error::Store(e)
    }

    /// Declares the store and what is served from it out of step (for example a graph that
    /// could not apply writes the store committed): fatal like a storage failure.
    pub fn fail_with(&self, reason: String) -> Error {
        self.record_failure(reason.clone());
        Error::Internal(reason)
    }

    fn record_failure(&self, reason: String) {
        tracing::error!(error = %reason, dir = %self.dir.display(), "storage failure: the server stops");
        if let Ok(mut f) = self.failure.lock() {
            f.get_or_insert(reason);
        }
        self.failed.cancel();
    }

    /// Test-only fault injection: flushes of a store whose directory was passed to
    /// [`faults::fail_flushes_in`] fail with EIO (as a full or broken disk would). Compiled in
    /// tests only, so no production build carries a way to fake a disk failure; a directory
    /// key (not a global switch) keeps parallel tests apart.
    #[cfg(test)]
    fn injected_fault(&self) -> Result<()> {
        if faults::failing(&self.dir) {
            let e = sled::Error::Io(std::io::Error::from_raw_os_error(5));
            return Err(self.fail(e));
        }
        Ok(())
    }

    #[cfg(not(test))]
    fn injected_fault(&self) -> Result<()> {
        Ok(())
    }

    /// The data directory (snapshot files live beside the store, in its `snapshots/`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A fresh id, unique across restarts.
    pub fn new_uid(&self) -> Result<u64> {
        Ok(self.db.generate_id()?)
    }

    // ---- indexes ----

    /// Stores a new index record; false if the name is taken.
    pub fn create_index(&self, rec: &IndexRecord) -> Result<bool> {
        let value = to_json(rec)?;
        let swapped = self.indexes.compare_and_swap(
            rec.meta.name.as_str(),
            None as Option<&[u8]>,
            Some(value),
        )?;
        if swapped.is_ok() {
            self.counts
                .insert(rec.meta.uid.to_be_bytes(), &Counts::default().encode())?;
        }
        Ok(swapped.is_ok())
    }

    pub fn put_index(&self, rec: &IndexRecord) -> Result<()> {
        self.indexes.insert(rec.meta.name.as_str(), to_json(rec)?)?;
        Ok(())
    }

    /// Writes several index records, all or nothing.
    pub fn put_indexes(&self, recs: &[IndexRecord]) -> Result<()> {
        let mut batch = sled::Batch::default();
        for rec in recs {
            batch.insert(rec.meta.name.as_str(), to_json(rec)?);
        }
        self.indexes.apply_batch(batch)?;
        Ok(())
    }

    pub fn get_index(&self, name: &str) -> Result<Option<IndexRecord>> {
        self.indexes
            .get(name)?
            .map(|v| from_json("index record", &v))
            .transpose()
    }

    pub fn list_indexes(&self) -> Result<Vec<IndexRecord>> {
        self.indexes
            .iter()
            .values()
            .map(|v| from_json("index record", &v?))
            .collect()
    }

    /// Removes an index with its points, harnesses, trials and promotions. The record goes first
    /// (that is the commit point); leftovers of a crash after it are swept by
    /// [`Store::sweep_orphans`] at the next start.
    pub fn delete_index(&self, name: &str, uid: u64) -> Result<()> {
        (&self.indexes, &self.promotions)
            .transaction(|(i, p)| {
                i.remove(name)?;
                p.remove(name)?;
                Ok::<_, ConflictableTransactionError<Error>>(())
            })
            .map_err(tx_err)?;
        self.remove_index_data(name, uid)
    }

    fn remove_index_data(&self, name: &str, uid: u64) -> Result<()> {
        self.remove_uid_data(uid)?;
        let mut batch = sled::Batch::default();
        for k in self.harnesses.scan_prefix(harness_prefix(name)).keys() {
            batch.remove(k?);
        }
        self.harnesses.apply_batch(batch)?;
        let mut batch = sled::Batch::default();
        let mut removed = 0;
        for kv in self.trials.iter() {
            let (k, v) = kv?;
            if trial_index_is(&v, name) {
                self.lab.remove(pin_key(u64_at(&k, 0)?))?;
                batch.remove(k);
                removed += 1;
            }
        }
        self.trials.apply_batch(batch)?;
        self.trials_removed(removed);
        Ok(())
    }

    /// Removes points, counts, harnesses, trials and promotions of indexes that no longer exist
    /// (left by a crash in the middle of a delete).
    pub fn sweep_orphans(&self) -> Result<usize> {
        let recs = self.list_indexes()?;
        let uids: std::collections::HashSet<u64> = recs.iter().map(|r| r.meta.uid).collect();
        let names: std::collections::HashSet<&str> =
            recs.iter().map(|r| r.meta.name.as_str()).collect();
        let mut swept = 0;
        let mut batch = sled::Batch::default();
        for uid in orphan_uids(&self.points, &uids)? {
            for k in self.points.scan_prefix(uid.to_be_bytes()).keys() {
                batch.remove(k?);
                swept += 1;
            }
        }
        self.points.apply_batch(batch)?;
        for tree in [&self.counts, &self.refresh, &self.changes, &self.applied] {
            for uid in orphan_uids(tree, &uids)? {
                for k in tree.scan_prefix(uid.to_be_bytes()).keys() {
                    tree.remove(k?)?;
                }
            }
        }
        for k in self.harnesses.iter().keys() {
            let k = k?;
            let index = k.split(|b| *b == 0).next().unwrap_or_default();
            if !names.contains(std::str::from_utf8(index).unwrap_or_default()) {
                self.harnesses.remove(k)?;
                swept += 1;
            }
        }
        for kv in self.trials.iter() {
            let (k, v) = kv?;
            if !names.iter().any(|n| trial_index_is(&v, n)) && self.trials.remove(k)?.is_some() {
                self.trials_removed(1);
                swept += 1;
            }
        }
        for k in self.promotions.iter().keys() {
            let k = k?;
            if !names.contains(std::str::from_utf8(&k).unwrap_or_default()) {
                self.promotions.remove(k)?;
            }
        }
        Ok(swept)
    }

    // ---- points ----

    pub fn counts(&self, uid: u64) -> Result<Counts> {
        Counts::decode(self.counts.get(uid.to_be_bytes())?.as_deref())
    }

    /// Adds or replaces points, all or nothing, and bumps the data version. Returns the counts
    /// after.
    pub fn upsert_points(&self, uid: u64, points: &[Point]) -> Result<Counts> {
        let encoded: Vec<([u8; 16], Vec<u8>)> = points
            .iter()
            .map(|p| (point_key(uid, p.id), encode_vector(&p.vector)))
            .collect();
        let change = Change::Upsert(points.iter().map(|p| p.id).collect()).encode();
        (&self.points, &self.counts, &self.changes)
            .transaction(|(pt, ct, ch)| {
                let mut counts = match Counts::decode(ct.get(uid.to_be_bytes())?.as_deref()) {
                    Ok(c) => c,
                    Err(e) => return abort(e),
                };
                for (k, v) in &encoded {
                    if pt.insert(&k[..], v.as_slice())?.is_none() {
                        counts.point_count += 1;
                    }
                }
                counts.data_version += 1;
                counts.points_changed += encoded.len() as u64;
                ct.insert(&uid.to_be_bytes(), &counts.encode())?;
                log_change(ch, uid, counts.data_version, &change)?;
                Ok(counts)
            })
            .map_err(tx_err)
    }

    /// Removes points, all or nothing; returns how many existed and the counts after.
    pub fn delete_points(&self, uid: u64, ids: &[u64]) -> Result<(u64, Counts)> {
        (&self.points, &self.counts, &self.changes)
            .transaction(|(pt, ct, ch)| {
                let mut counts = match Counts::decode(ct.get(uid.to_be_bytes())?.as_deref()) {
                    Ok(c) => c,
                    Err(e) => return abort(e),
                };
                let removed = delete_in_tx(pt, &mut counts, uid, ids)?;
                let deleted = removed.len() as u64;
                if deleted > 0 {
                    let change = Change::Delete(removed).encode();
                    log_change(ch, uid, counts.data_version, &change)?;
                }
                ct.insert(&uid.to_be_bytes(), &counts.encode())?;
                Ok((deleted, counts))
            })
            .map_err(tx_err)
    }

    /// The change log of an index after write sequence `after`, oldest first.
    pub fn changes_since(&self, uid: u64, after: u64) -> Result<Vec<(u64, Change)>> {
        let start = point_key(uid, after.saturating_add(1));
        let end = point_key(uid, u64::MAX);
        let mut out = Vec::new();
        if after == u64::MAX {
            return Ok(out);
        }
        // A group's entry is stored under its last write: one under a later key may hold
        // writes at or before `after` too.
        for kv in self.changes.range(start..=end) {
            let (k, v) = kv?;
            let writes = Change::decode_entry(u64_at(&k, 8)?, &v)?;
            out.extend(writes.into_iter().filter(|(seq, _)| *seq > after));
        }
        Ok(out)
    }

    /// Removes an index's change log entries up to write sequence `upto` (all with u64::MAX).
    pub fn trim_changes(&self, uid: u64, upto: u64) -> Result<usize> {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for k in self
            .changes
            .range(point_key(uid, 0)..=point_key(uid, upto))
            .keys()
        {
            batch.remove(k?);
            n += 1;
        }
        self.changes.apply_batch(batch)?;
        Ok(n)
    }

    /// Applies an ordered list of writes to one index in one transaction (group commit):
    /// all or nothing, in order, so the last write to an id wins and an upsert and a delete of
    /// one id keep their order. Each op changes the counts exactly as it would alone (an
    /// upsert bumps the data version; a delete bumps it only if it removed something), and
    /// its [`OpOutcome`] is what that op alone would have returned. Returns the outcomes in op
    /// order and the counts after the last. A storage error is fatal ([`Store::failed`]).
    pub fn apply_writes(&self, uid: u64, ops: &[WriteOp]) -> Result<(Vec<OpOutcome>, Counts)> {
        self.apply_writes_logged(uid, ops, None)
    }

    /// [`apply_writes`](Self::apply_writes) of writes taken from a cluster's write log:
    /// `applied` (the index's cluster uid, the log sequence of the last op) is recorded in the
    /// same transaction, so what the points hold and where the log resumes never disagree.
    pub fn apply_writes_logged(
        &self,
        uid: u64,
        ops: &[WriteOp],
        applied: Option<Applied>,
    ) -> Result<(Vec<OpOutcome>, Counts)> {
        // Encoded once, outside the closure, which sled may run more than once.
        let encoded: Vec<Vec<([u8; 16], Vec<u8>)>> = ops
            .iter()
            .map(|op| match op {
                WriteOp::Upsert(points) => points
                    .iter()
                    .map(|p| (point_key(uid, p.id), encode_vector(&p.vector)))
                    .collect(),
                WriteOp::Delete(_) => Vec::new(),
            })
            .collect();
        let res = (&self.points, &self.counts, &self.changes, &self.applied).transaction(
            |(pt, ct, ch, ap)| {
                let mut counts = match Counts::decode(ct.get(uid.to_be_bytes())?.as_deref()) {
                    Ok(c) => c,
                    Err(e) => return abort(e),
                };
                let mut outcomes = Vec::with_capacity(ops.len());
                // Each op that bumps the data version, for the change log (snapshots replay it).
                let mut log = GroupLog::new();
                for (op, enc) in ops.iter().zip(&encoded) {
                    let affected = match op {
                        WriteOp::Upsert(points) => {
                            for (k, v) in enc {
                                if pt.insert(&k[..], v.as_slice())?.is_none() {
                                    counts.point_count += 1;
                                }
                            }
                            counts.data_version += 1;
                            counts.points_changed += enc.len() as u64;
                            log.push(CHANGE_UPSERT, points.iter().map(|p| p.id));
                            enc.len() as u64
                        }
                        WriteOp::Delete(ids) => {
                            let removed = delete_in_tx(pt, &mut counts, uid, ids)?;
                            if !removed.is_empty() {
                                log.push(CHANGE_DELETE, removed.iter().copied());
                            }
                            removed.len() as u64
                        }
                    };
                    outcomes.push(OpOutcome {
                        affected,
                        point_count: counts.point_count,
                    });
                }
                if let Some(entry) = log.entry() {
                    log_change(ch, uid, counts.data_version, &entry)?;
                }
                ct.insert(&uid.to_be_bytes(), &counts.encode())?;
                if let Some(a) = applied {
                    ap.insert(&uid.to_be_bytes(), &a.encode()[..])?;
                }
                Ok((outcomes, counts))
            },
        );
        match res {
            Ok(r) => Ok(r),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(self.fail(e)),
        }
    }

    // ---- cluster replicas ----

    /// Links a (new, empty) index to the cluster index it replicates: nothing of the log applied.
    pub fn link_replica(&self, uid: u64, cluster_uid: u64) -> Result<()> {
        let a = Applied {
            cluster_uid,
            sequence: 0,
        };
        self.applied.insert(uid.to_be_bytes(), &a.encode()[..])?;
        Ok(())
    }

    /// Writes points of a replica being copied from a peer (`cluster/catchup.rs`) under
    /// `staged_uid`, a fresh uid no index record names yet: invisible (nothing reads a uid
    /// without a record) until [`Store::switch_replica`] names it, and swept at the next start
    /// ([`Store::sweep_orphans`]) if the node stops before that. Not flushed (the switch is).
    pub fn stage_points(&self, staged_uid: u64, points: &[Point]) -> Result<()> {
        let mut batch = sled::Batch::default();
        for p in points {
            batch.insert(&point_key(staged_uid, p.id)[..], encode_vector(&p.vector));
        }
        self.points.apply_batch(batch)?;
        Ok(())
    }

    /// The commit point of a catch-up from a peer: in one transaction, the index record `rec`
    /// (its `meta.uid` the staged uid whose points [`Store::stage_points`] wrote) replaces the
    /// record of the index's name, with the staged uid's counts and applied record and the
    /// refresh record moved over from `old_uid`. The old uid's data is then an orphan:
    /// remove it with [`Store::remove_uid_data`] (or the next start's sweep does).
    pub fn switch_replica(
        &self,
        rec: &IndexRecord,
        old_uid: u64,
        counts: Counts,
        applied: Applied,
    ) -> Result<()> {
        let value = to_json(rec)?;
        let new_uid = rec.meta.uid;
        (&self.indexes, &self.counts, &self.applied, &self.refresh)
            .transaction(|(i, c, a, r)| {
                i.insert(rec.meta.name.as_str(), value.as_slice())?;
                c.insert(&new_uid.to_be_bytes(), &counts.encode())?;
                a.insert(&new_uid.to_be_bytes(), &applied.encode()[..])?;
                if let Some(v) = r.remove(&old_uid.to_be_bytes())? {
                    r.insert(&new_uid.to_be_bytes(), v)?;
                }
                Ok::<_, ConflictableTransactionError<Error>>(())
            })
            .map_err(tx_err)
    }

    /// Removes everything stored under an index uid (points, counts, refresh record, change
    /// log, applied record): a staged copy that failed, or the data a switch left behind.
    pub fn remove_uid_data(&self, uid: u64) -> Result<()> {
        let mut batch = sled::Batch::default();
        for k in self.points.scan_prefix(uid.to_be_bytes()).keys() {
            batch.remove(k?);
        }
        self.points.apply_batch(batch)?;
        self.counts.remove(uid.to_be_bytes())?;
        self.refresh.remove(uid.to_be_bytes())?;
        self.trim_changes(uid, u64::MAX)?;
        self.applied.remove(uid.to_be_bytes())?;
        Ok(())
    }

    /// Visits every point of the index in id order, without collecting them: its id and its
    /// vector's stored bytes (f32, little-endian; their length is checked against
    /// `dimension`). The number of points visited.
    pub fn visit_points(
        &self,
        uid: u64,
        dimension: usize,
        mut visit: impl FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<u64> {
        let mut n = 0;
        for kv in self.points.scan_prefix(uid.to_be_bytes()) {
            let (k, v) = kv?;
            let id = u64_at(&k, 8)?;
            if v.len() != 4 * dimension {
                return Err(Error::Corrupt(format!(
                    "stored point {id} has {} bytes, not the {} of dimension {dimension}",
                    v.len(),
                    4 * dimension
                )));
            }
            visit(id, &v)?;
            n += 1;
        }
        Ok(n)
    }

    /// [`Store::visit_points`] of a replica at the write-log sequence the points hold, read
    /// without any lock: the applied record (written in the same transaction as the points by
    /// every logged write) is read before and after the scan, and the scan is retried when a
    /// write fell between (`restart` is called before each attempt: what the visitor made of
    /// an earlier one is void). The points visited, the applied record and the counts; None
    /// after `tries` attempts that all raced a write.
    pub fn visit_points_at_applied(
        &self,
        uid: u64,
        dimension: usize,
        tries: usize,
        mut restart: impl FnMut() -> Result<()>,
        mut visit: impl FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<Option<(u64, Applied, Counts)>> {
        for _ in 0..tries {
            restart()?;
            let before = self.applied(uid)?;
            let n = self.visit_points(uid, dimension, &mut visit)?;
            let counts = self.counts(uid)?;
            let after = self.applied(uid)?;
            if let (Some(b), Some(a)) = (before, after) {
                if a == b {
                    return Ok(Some((n, a, counts)));
                }
            }
        }
        Ok(None)
    }

    /// The cluster index an index replicates and the log sequence it has applied; None for a
    /// single node's index.
    pub fn applied(&self, uid: u64) -> Result<Option<Applied>> {
        self.applied
            .get(uid.to_be_bytes())?
            .map(|v| Applied::decode(&v))
            .transpose()
    }

    /// The cluster uid of the index named `name`, when it is a cluster replica.
    pub fn cluster_uid_of(&self, name: &str) -> Result<Option<u64>> {
        let Some(rec) = self.get_index(name)? else {
            return Ok(None);
        };
        Ok(self.applied(rec.meta.uid)?.map(|a| a.cluster_uid))
    }

    /// The node id of the cluster node using this data dir, if it ever was one.
    pub fn cluster_node(&self) -> Result<Option<String>> {
        Ok(self
            .meta
            .get("cluster_node")?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Marks the data dir as cluster node `node_id`'s (not flushed: the caller flushes).
    pub fn set_cluster_node(&self, node_id: &str) -> Result<()> {
        self.meta.insert("cluster_node", node_id.as_bytes())?;
        Ok(())
    }

    /// Every point of an index with the counts they go with, read without any lock: the
    /// counts (changed in the same transaction as the points) are read before and after the
    /// scan, and the scan is retried when a write fell between. None after `tries` attempts
    /// that all raced a write (the caller then reads under the index's writer lock).
    pub fn load_points_consistent(
        &self,
        uid: u64,
        tries: usize,
    ) -> Result<Option<(Vec<Point>, Counts)>> {
        for _ in 0..tries {
            let before = self.counts(uid)?;
            let points = self.load_points(uid)?;
            let after = self.counts(uid)?;
            // Every write that changes points bumps the data version in its transaction.
            if before.data_version == after.data_version {
                return Ok(Some((points, after)));
            }
        }
        Ok(None)
    }

    /// Every point of an index, in id order.
    pub fn load_points(&self, uid: u64) -> Result<Vec<Point>> {
        self.points
            .scan_prefix(uid.to_be_bytes())
            .map(|kv| {
                let (k, v) = kv?;
                Ok(Point {
                    id: u64_at(&k, 8)?,
                    vector: decode_vector(&v)?,
                })
            })
            .collect()
    }

    /// One stored point's vector.
    pub fn get_point(&self, uid: u64, id: u64) -> Result<Option<Vec<f32>>> {
        self.points
            .get(point_key(uid, id))?
            .map(|v| decode_vector(&v))
            .transpose()
    }

    // ---- profiles ----

    pub fn put_profile<T: Serialize>(&self, name: &str, profile: &T) -> Result<()> {
        self.profiles.insert(name, to_json(profile)?)?;
        Ok(())
    }

    pub fn get_profile<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>> {
        self.profiles
            .get(name)?
            .map(|v| from_json("profile", &v))
            .transpose()
    }

    /// Profiles in name order, starting after `after`, at most `limit`.
    pub fn list_profiles<T: DeserializeOwned>(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<T>> {
        let iter = match after {
            Some(a) => self.profiles.range::<&[u8], _>((
                std::ops::Bound::Excluded(a.as_bytes()),
                std::ops::Bound::Unbounded,
            )),
            None => self.profiles.iter(),
        };
        iter.values()
            .take(limit)
            .map(|v| from_json("profile", &v?))
            .collect()
    }

    pub fn delete_profile(&self, name: &str) -> Result<bool> {
        Ok(self.profiles.remove(name)?.is_some())
    }

    // ---- harnesses ----

    /// Stores a new harness; false if the name is taken in the index.
    pub fn create_harness<T: Serialize>(&self, index: &str, name: &str, h: &T) -> Result<bool> {
        let swapped = self.harnesses.compare_and_swap(
            harness_key(index, name),
            None as Option<&[u8]>,
            Some(to_json(h)?),
        )?;
        Ok(swapped.is_ok())
    }

    /// Replaces a harness (its ground truth recomputed) if it still exists: a harness deleted
    /// meanwhile is not brought back.
    pub fn put_harness<T: Serialize>(&self, index: &str, name: &str, h: &T) -> Result<()> {
        let value = to_json(h)?;
        self.harnesses
            .fetch_and_update(harness_key(index, name), |old| old.map(|_| value.clone()))?;
        Ok(())
    }

    pub fn get_harness<T: DeserializeOwned>(&self, index: &str, name: &str) -> Result<Option<T>> {
        self.harnesses
            .get(harness_key(index, name))?
            .map(|v| from_json("harness", &v))
            .transpose()
    }

    pub fn list_harnesses<T: DeserializeOwned>(&self, index: &str) -> Result<Vec<T>> {
        self.harnesses
            .scan_prefix(harness_prefix(index))
            .values()
            .map(|v| from_json("harness", &v?))
            .collect()
    }

    pub fn delete_harness(&self, index: &str, name: &str) -> Result<bool> {
        Ok(self.harnesses.remove(harness_key(index, name))?.is_some())
    }

    // ---- trials ----

    /// Appends a trial to the journal under the next id, which `make` receives. Ids increase
    /// and are never reused: the counter moves in the same transaction as the record.
    ///
    /// With `owner` (index name, uid), the append is refused with NOT_FOUND unless that very
    /// index (not another created since under the same name) exists, in the same transaction:
    /// a trial of a deleted index is never journaled under its successor.
    pub fn append_trial<T: Serialize>(
        &self,
        owner: Option<(&str, u64)>,
        make: impl Fn(u64) -> T,
    ) -> Result<T> {
        (&self.meta, &self.trials, &self.indexes)
            .transaction(|(m, t, i)| {
                if let Some((name, uid)) = owner {
                    if let Err(e) = check_owner(i.get(name)?.as_deref(), name, uid) {
                        return abort(e);
                    }
                }
                let next = match m.get("next_trial_id")? {
                    Some(v) => match u64_at(&v, 0) {
                        Ok(n) => n,
                        Err(e) => return abort(e),
                    },
                    None => 1,
                };
                let trial = make(next);
                let bytes = match to_json(&trial) {
                    Ok(b) => b,
                    Err(e) => return abort(e),
                };
                t.insert(&next.to_be_bytes(), bytes)?;
                m.insert("next_trial_id", &(next + 1).to_be_bytes())?;
                Ok(trial)
            })
            .map_err(tx_err)
            .inspect(|_| {
                self.trial_count
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            })
    }

    /// Trials in the journal (a counter: no scan).
    pub fn trial_count(&self) -> usize {
        self.trial_count.load(std::sync::atomic::Ordering::Relaxed) as usize
    }

    /// Keeps [`Store::trial_count`] right: every removal from `trials` calls this.
    fn trials_removed(&self, n: u64) {
        use std::sync::atomic::Ordering;
        let _ = self
            .trial_count
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                Some(c.saturating_sub(n))
            });
    }

    pub fn get_trial<T: DeserializeOwned>(&self, id: u64) -> Result<Option<T>> {
        self.trials
            .get(id.to_be_bytes())?
            .map(|v| from_json("trial", &v))
            .transpose()
    }

    /// Trials newest first, with ids below `before` (all when None), that `keep` accepts, at
    /// most `limit`.
    pub fn list_trials<T: DeserializeOwned>(
        &self,
        before: Option<u64>,
        limit: usize,
        keep: impl Fn(&T) -> bool,
    ) -> Result<Vec<T>> {
        let iter = match before {
            Some(b) => self.trials.range(..b.to_be_bytes()),
            None => self.trials.iter(),
        };
        let mut out = Vec::new();
        for v in iter.values().rev() {
            let t: T = from_json("trial", &v?)?;
            if keep(&t) {
                out.push(t);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    // ---- promotions ----

    /// Reads, changes and writes an index's promotion record in one atomic transaction; `f`
    /// may run more than once on conflict, so it must be pure.
    ///
    /// In the same transaction: with `uid`, NOT_FOUND unless the index of that uid (not one
    /// re-created under the name) exists; with `trial`, NOT_FOUND unless that trial is still in
    /// the journal (so retention never removes a trial as it is being promoted).
    pub fn update_promotion<T, R>(
        &self,
        index: &str,
        uid: Option<u64>,
        trial: Option<u64>,
        f: impl Fn(Option<T>) -> Result<(T, R)>,
    ) -> Result<R>
    where
        T: Serialize + DeserializeOwned,
    {
        (&self.promotions, &self.indexes, &self.trials)
            .transaction(|(p, i, t)| {
                if let Some(uid) = uid {
                    if let Err(e) = check_owner(i.get(index)?.as_deref(), index, uid) {
                        return abort(e);
                    }
                }
                if let Some(id) = trial {
                    if t.get(id.to_be_bytes())?.is_none() {
                        return abort(Error::not_found("trial", id.to_string()));
                    }
                }
                let cur: Option<T> = match p.get(index)? {
                    Some(v) => match from_json("promotion record", &v) {
                        Ok(t) => Some(t),
                        Err(e) => return abort(e),
                    },
                    None => None,
                };
                let (next, out) = match f(cur) {
                    Ok(x) => x,
                    Err(e) => return abort(e),
                };
                let bytes = match to_json(&next) {
                    Ok(b) => b,
                    Err(e) => return abort(e),
                };
                p.insert(index, bytes)?;
                Ok(out)
            })
            .map_err(tx_err)
    }

    pub fn get_promotion<T: DeserializeOwned>(&self, index: &str) -> Result<Option<T>> {
        self.promotions
            .get(index)?
            .map(|v| from_json("promotion record", &v))
            .transpose()
    }

    // ---- jobs ----

    /// The next job sequence number, durable once flushed.
    pub fn next_job_seq(&self) -> Result<u64> {
        let v = self.meta.update_and_fetch("next_job_seq", |old| {
            let n = old
                .and_then(|o| <[u8; 8]>::try_from(o).ok())
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            Some((n + 1).to_be_bytes().to_vec())
        })?;
        v.as_deref().map(|b| u64_at(b, 0)).unwrap_or(Ok(1))
    }

    /// An index's refresh record (by uid), if it has one.
    pub fn get_refresh<T: DeserializeOwned>(&self, uid: u64) -> Result<Option<T>> {
        self.refresh
            .get(uid.to_be_bytes())?
            .map(|v| from_json("refresh record", &v))
            .transpose()
    }

    pub fn put_refresh<T: Serialize>(&self, uid: u64, record: &T) -> Result<()> {
        self.refresh.insert(uid.to_be_bytes(), to_json(record)?)?;
        Ok(())
    }

    /// Reads, changes and writes an index's refresh record in one atomic transaction (a
    /// missing record starts as the default). `change` may run more than once on conflict, so
    /// it must only set what it owns: a writer changes its own fields on the stored record,
    /// never writes back a copy of the others'.
    pub fn update_refresh<T>(&self, uid: u64, change: impl Fn(&mut T)) -> Result<T>
    where
        T: Serialize + DeserializeOwned + Default,
    {
        self.refresh
            .transaction(|t| {
                let mut rec: T = match t.get(uid.to_be_bytes())? {
                    Some(v) => match from_json("refresh record", &v) {
                        Ok(r) => r,
                        Err(e) => return abort(e),
                    },
                    None => T::default(),
                };
                change(&mut rec);
                let bytes = match to_json(&rec) {
                    Ok(b) => b,
                    Err(e) => return abort(e),
                };
                t.insert(&uid.to_be_bytes(), bytes)?;
                Ok(rec)
            })
            .map_err(tx_err)
    }

    pub fn put_job<T: Serialize>(&self, seq: u64, job: &T) -> Result<()> {
        self.jobs.insert(seq.to_be_bytes(), to_json(job)?)?;
        Ok(())
    }

    /// Jobs newest first.
    pub fn list_jobs<T: DeserializeOwned>(&self) -> Result<Vec<(u64, T)>> {
        self.jobs
            .iter()
            .rev()
            .map(|kv| {
                let (k, v) = kv?;
                Ok((u64_at(&k, 0)?, from_json("job", &v)?))
            })
            .collect()
    }

    /// Keeps the newest `keep` jobs that `pinned` does not accept, and every job it accepts
    /// (running ones); returns how many were removed.
    pub fn trim_jobs<T: DeserializeOwned>(
        &self,
        keep: usize,
        pinned: impl Fn(&T) -> bool,
    ) -> Result<usize> {
        let mut kept = 0;
        let mut batch = sled::Batch::default();
        let mut removed = 0;
        for kv in self.jobs.iter().rev() {
            let (k, v) = kv?;
            // An unreadable record is not pinned: it goes with the old ones.
            if from_json::<T>("job", &v).is_ok_and(|j| pinned(&j)) {
                continue;
            }
            if kept < keep {
                kept += 1;
            } else {
                batch.remove(k);
                removed += 1;
            }
        }
        self.jobs.apply_batch(batch)?;
        Ok(removed)
    }

    /// Trial retention: removes the trials of `index` on `harness` beyond the newest `keep`,
    /// except those its promotion record names (current or history), which are never removed.
    /// One transaction with the promotion record, so a promotion racing it either sees its
    /// trial gone (NOT_FOUND) or protects it. Returns how many were removed.
    pub fn prune_trials(&self, index: &str, harness: &str, keep: usize) -> Result<usize> {
        let mut seen = 0;
        let mut beyond = Vec::new();
        for kv in self.trials.iter().rev() {
            let (k, v) = kv?;
            if trial_of(&v, index, harness) {
                seen += 1;
                if seen > keep {
                    beyond.push(u64_at(&k, 0)?);
                }
            }
        }
        if beyond.is_empty() {
            return Ok(0);
        }
        (&self.trials, &self.promotions)
            .transaction(|(t, p)| {
                let protected = match p.get(index)? {
                    Some(v) => match promoted_trials(&v) {
                        Some(ids) => ids,
                        // Unreadable: what it protects is unknown, so nothing is removed.
                        None => return Ok(0),
                    },
                    None => Default::default(),
                };
                let mut removed = 0;
                for id in &beyond {
                    if !protected.contains(id) && t.remove(&id.to_be_bytes())?.is_some() {
                        removed += 1;
                    }
                }
                Ok(removed)
            })
            .map_err(tx_err)
            .inspect(|&removed| self.trials_removed(removed as u64))
    }

    // ---- the cluster's lab log (cluster nodes) ----

    /// The last sequence of the cluster's lab log mirrored into this store (0: none).
    pub fn lab_applied(&self) -> Result<u64> {
        self.lab
            .get(LAB_APPLIED)?
            .map(|v| u64_at(&v, 0))
            .transpose()
            .map(|s| s.unwrap_or(0))
    }

    /// Whether this store is re-reading the whole lab log ([`Store::begin_lab_resync`]).
    pub fn lab_resyncing(&self) -> Result<bool> {
        Ok(self.lab.contains_key(LAB_RESYNC)?)
    }

    /// Starts re-reading the lab log from its start (the log was trimmed past what this store
    /// mirrored, or the store's lab predates the log): the mirrored sequence goes back to 0 and
    /// the resync mark is set, in one transaction.
    /// What the store has stays (so nothing a node served disappears meanwhile) until
    /// [`Store::finish_lab_resync`]. Not flushed.
    pub fn begin_lab_resync(&self) -> Result<()> {
        self.lab
            .transaction(|l| {
                l.insert(LAB_APPLIED, &0u64.to_be_bytes())?;
                l.insert(LAB_RESYNC, &[][..])?;
                Ok(())
            })
            .map_err(tx_err)
    }

    /// Ends a resync once it has read every record of the log up to its mark: removes the
    /// harnesses (by key) and trials (by id) not in `harnesses` and `trials`, the records the
    /// re-read found, with their pins, and the mark, in one transaction. The counts removed.
    /// Not flushed.
    pub fn finish_lab_resync(
        &self,
        harnesses: &std::collections::HashSet<Vec<u8>>,
        trials: &std::collections::HashSet<u64>,
    ) -> Result<(usize, usize)> {
        let mut stale_harnesses = Vec::new();
        for k in self.harnesses.iter().keys() {
            let k = k?;
            if !harnesses.contains(k.as_ref()) {
                stale_harnesses.push(k);
            }
        }
        let mut stale_trials = Vec::new();
        for k in self.trials.iter().keys() {
            let id = u64_at(&k?, 0)?;
            if !trials.contains(&id) {
                stale_trials.push(id);
            }
        }
        let removed = (&self.lab, &self.harnesses, &self.trials)
            .transaction(|(l, h, t)| {
                for k in &stale_harnesses {
                    h.remove(k)?;
                }
                let mut removed = 0u64;
                for id in &stale_trials {
                    l.remove(&pin_key(*id))?;
                    if t.remove(&id.to_be_bytes())?.is_some() {
                        removed += 1;
                    }
                }
                l.remove(LAB_RESYNC)?;
                Ok(removed)
            })
            .map_err(tx_err)?;
        self.trials_removed(removed);
        Ok((stale_harnesses.len(), stale_trials.len()))
    }

    /// Whether the store has no harness and no trial.
    pub fn lab_is_empty(&self) -> Result<bool> {
        Ok(self.harnesses.is_empty() && self.trials.is_empty())
    }

    /// Harnesses, trials and pins in the store: the lab log's live records (each of them
    /// is one record of the log).
    pub fn lab_live_count(&self) -> Result<u64> {
        let pins = self.lab.scan_prefix(b"pin").count() as u64;
        Ok(self.harnesses.len() as u64 + self.trial_count() as u64 + pins)
    }

    /// Whether `index` has a harness `name`.
    pub fn has_harness(&self, index: &str, name: &str) -> Result<bool> {
        Ok(self.harnesses.contains_key(harness_key(index, name))?)
    }

    /// Whether the journal has trial `id`.
    pub fn has_trial(&self, id: u64) -> Result<bool> {
        Ok(self.trials.contains_key(id.to_be_bytes())?)
    }

    /// Whether trial `id` is pinned (promoted in the cluster): retention never removes it.
    pub fn is_pinned(&self, id: u64) -> Result<bool> {
        Ok(self.lab.contains_key(pin_key(id))?)
    }

    /// Mirrors one record of the cluster's lab log, at sequence `seq`, in one transaction with
    /// the applied sequence: a record at or below the applied one is skipped (a replay), and a
    /// record of an index this store does not replicate under `cluster_uid` (deleted, or
    /// another incarnation) changes nothing but the applied sequence. Not flushed.
    pub fn apply_lab(&self, seq: u64, op: &LabOp<'_>) -> Result<()> {
        let (inserted, removed) = (
            &self.lab,
            &self.harnesses,
            &self.trials,
            &self.indexes,
            &self.applied,
        )
            .transaction(|(l, h, t, i, a)| {
                let at = match l.get(LAB_APPLIED)? {
                    Some(v) => match u64_at(&v, 0) {
                        Ok(n) => n,
                        Err(e) => return abort(e),
                    },
                    None => 0,
                };
                if seq <= at {
                    return Ok((0u64, 0u64));
                }
                l.insert(LAB_APPLIED, &seq.to_be_bytes())?;
                let replica = |name: &str, cluster_uid: u64| -> TxResult<bool> {
                    let Some(rec) = i.get(name)? else {
                        return Ok(false);
                    };
                    let local = match record_uid(&rec, name) {
                        Ok(uid) => uid,
                        Err(e) => return abort(e),
                    };
                    match a.get(local.to_be_bytes())? {
                        Some(v) => match Applied::decode(&v) {
                            Ok(ap) => Ok(ap.cluster_uid == cluster_uid),
                            Err(e) => abort(e),
                        },
                        None => Ok(false),
                    }
                };
                match op {
                    LabOp::Skip => Ok((0, 0)),
                    LabOp::CreateHarness {
                        index,
                        cluster_uid,
                        name,
                        json,
                        replace,
                    } => {
                        let key = harness_key(index, name);
                        if replica(index, *cluster_uid)? && (*replace || h.get(&key)?.is_none()) {
                            h.insert(key, json.as_slice())?;
                        }
                        Ok((0, 0))
                    }
                    LabOp::DeleteHarness {
                        index,
                        cluster_uid,
                        name,
                    } => {
                        if replica(index, *cluster_uid)? {
                            h.remove(harness_key(index, name))?;
                        }
                        Ok((0, 0))
                    }
                    LabOp::Trial {
                        index,
                        cluster_uid,
                        json,
                    } => {
                        if replica(index, *cluster_uid)?
                            && t.insert(&seq.to_be_bytes(), json.as_slice())?.is_none()
                        {
                            return Ok((1, 0));
                        }
                        Ok((0, 0))
                    }
                    LabOp::RemoveTrials { ids } => {
                        let mut removed = 0;
                        for id in ids.iter() {
                            if l.get(pin_key(*id))?.is_none()
                                && t.remove(&id.to_be_bytes())?.is_some()
                            {
                                removed += 1;
                            }
                        }
                        Ok((0, removed))
                    }
                    LabOp::Pin { index, id } => {
                        let of_index = t
                            .get(id.to_be_bytes())?
                            .is_some_and(|v| trial_index_is(&v, index));
                        if of_index {
                            l.insert(&pin_key(*id), &[][..])?;
                        }
                        Ok((0, 0))
                    }
                }
            })
            .map_err(tx_err)?;
        use std::sync::atomic::Ordering;
        self.trial_count.fetch_add(inserted, Ordering::Relaxed);
        self.trials_removed(removed);
        Ok(())
    }

    /// The trials of `index` on `harness` beyond the newest `keep`, except pinned ones: what
    /// cluster retention asks every node to remove.
    pub fn trials_beyond(&self, index: &str, harness: &str, keep: usize) -> Result<Vec<u64>> {
        let mut seen = 0;
        let mut beyond = Vec::new();
        for kv in self.trials.iter().rev() {
            let (k, v) = kv?;
            if trial_of(&v, index, harness) {
                seen += 1;
                let id = u64_at(&k, 0)?;
                if seen > keep && !self.is_pinned(id)? {
                    beyond.push(id);
                }
            }
        }
        Ok(beyond)
    }
}

/// The `lab` tree's key of the mirrored sequence.
const LAB_APPLIED: &[u8] = b"applied";
/// The `lab` tree's key of a resync's mark.
const LAB_RESYNC: &[u8] = b"resync";

fn pin_key(id: u64) -> [u8; 11] {
    let mut k = [0u8; 11];
    k[..3].copy_from_slice(b"pin");
    k[3..].copy_from_slice(&id.to_be_bytes());
    k
}

/// One record of the cluster's lab log, as the store mirrors it ([`Store::apply_lab`]).
#[derive(Debug)]
pub enum LabOp<'a> {
    /// Nothing to store (an unreadable record, or one of an index this node does not have).
    Skip,
    /// A new harness (JSON), unless the index already has one of that name (with `replace`:
    /// in its place, a resync's when the stored one is another harness of the name).
    CreateHarness {
        index: &'a str,
        cluster_uid: u64,
        name: &'a str,
        json: Vec<u8>,
        replace: bool,
    },
    DeleteHarness {
        index: &'a str,
        cluster_uid: u64,
        name: &'a str,
    },
    /// A trial (JSON), journaled under the record's sequence as its id.
    Trial {
        index: &'a str,
        cluster_uid: u64,
        json: Vec<u8>,
    },
    /// Retention: these trials go, except pinned ones.
    RemoveTrials { ids: &'a [u64] },
    /// Pins trial `id` when the journal has it, of `index`.
    Pin { index: &'a str, id: u64 },
}

/// The uid of a stored index record (`name`'s), read without decoding the rest of it.
fn record_uid(record: &[u8], name: &str) -> Result<u64> {
    #[derive(serde::Deserialize)]
    struct Meta {
        uid: u64,
    }
    #[derive(serde::Deserialize)]
    struct Only {
        meta: Meta,
    }
    serde_json::from_slice::<Only>(record)
        .map(|o| o.meta.uid)
        .map_err(|e| Error::Corrupt(format!("index record of {name:?}: {e}")))
}

/// NOT_FOUND unless `record` is the index `name` with `uid`.
fn check_owner(record: Option<&[u8]>, name: &str, uid: u64) -> Result<()> {
    match record.map(|r| record_uid(r, name)).transpose()? {
        Some(stored) if stored == uid => Ok(()),
        _ => Err(Error::NotFound {
            what: "index",
            name: format!("{name} (the one this work started on was deleted)"),
        }),
    }
}

/// The trial ids a stored promotion record names (current and history).
fn promoted_trials(v: &[u8]) -> Option<std::collections::HashSet<u64>> {
    #[derive(serde::Deserialize)]
    struct P {
        trial_id: u64,
    }
    #[derive(serde::Deserialize)]
    struct R {
        current: Option<P>,
        #[serde(default)]
        history: Vec<P>,
    }
    serde_json::from_slice::<R>(v).ok().map(|r| {
        r.current
            .into_iter()
            .chain(r.history)
            .map(|p| p.trial_id)
            .collect()
    })
}

/// Whether a stored trial (JSON) belongs to `index` and `harness`.
fn trial_of(v: &[u8], index: &str, harness: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct Only {
        index: String,
        harness: String,
    }
    serde_json::from_slice::<Only>(v)
        .map(|o| o.index == index && o.harness == harness)
        .unwrap_or(false)
}

/// Test-only storage faults, by data directory (see `Store::injected_fault`).
#[cfg(test)]
pub(crate) mod faults {
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    static FAILING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

    /// From now on every flush of a store opened in `dir` fails with EIO.
    pub fn fail_flushes_in(dir: &Path) {
        if let Ok(mut f) = FAILING.lock() {
            f.push(dir.to_path_buf());
        }
    }

    pub fn clear(dir: &Path) {
        if let Ok(mut f) = FAILING.lock() {
            f.retain(|d| d != dir);
        }
    }

    pub(super) fn failing(dir: &Path) -> bool {
        FAILING
            .lock()
            .map(|f| f.iter().any(|d| d == dir))
            .unwrap_or(false)
    }
}

/// Whether a stored trial (JSON) belongs to `index`, without decoding the whole record.
fn trial_index_is(v: &[u8], index: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct Only {
        index: String,
    }
    serde_json::from_slice::<Only>(v)
        .map(|o| o.index == index)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ConfigSource, HnswConfig, Metric, Name};

    /// Opens the store of `dir` again after this process closed it: sled's threads may hold
    /// its lock a moment after the close, so the open waits for it (as the server's does).
    fn reopen(dir: &Path, options: &StoreOptions) -> Result<Store> {
        Store::open_with(
            dir,
            &StoreOptions {
                lock_wait: std::time::Duration::from_secs(10),
                ..*options
            },
        )
    }

    fn record(name: &str, uid: u64) -> IndexRecord {
        IndexRecord {
            meta: IndexMeta {
                name: Name::parse("name", name).unwrap(),
                uid,
                dimension: 2,
                metric: Metric::L2,
                default_config: HnswConfig::default(),
                create_time_ms: 0,
                engine: None,
            },
            generation: GenerationMeta {
                number: 1,
                config: HnswConfig::default(),
                source: ConfigSource::Default,
                point_count: 0,
                build_millis: 0,
                activate_time_ms: 0,
                profile: String::new(),
                trial_id: 0,
            },
            snapshot: None,
        }
    }

    fn pts(ids: std::ops::Range<u64>) -> Vec<Point> {
        ids.map(|id| Point {
            id,
            vector: vec![id as f32, 1.0],
        })
        .collect()
    }

    #[tokio::test]
    async fn closed_fires_when_the_last_holder_and_every_flush_have_gone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let mut closed = store.closed().unwrap();
        assert!(
            store.closed().is_none(),
            "only the first caller gets the signal"
        );
        let other = store.clone();
        // A flush whose caller gives up at once: its blocking call may still run.
        let flush = tokio::spawn({
            let s = store.clone();
            async move { s.flush().await }
        });
        flush.abort();
        drop(store);
        assert!(matches!(
            closed.try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Empty)
        ));
        assert!(
            Store::open(dir.path()).is_err(),
            "still open: another holder"
        );
        drop(other);
        let _ = closed.await;
        // The signal means the data dir is free.
        Store::open(dir.path()).unwrap();
    }

    #[test]
    fn the_cache_option_reaches_sled() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            sled_config(dir.path(), &StoreOptions::default()).cache_capacity,
            DEFAULT_CACHE_BYTES
        );
        let tiny = StoreOptions {
            cache_bytes: 1024 * 1024,
            ..Default::default()
        };
        assert_eq!(sled_config(dir.path(), &tiny).cache_capacity, 1024 * 1024);
    }

    #[test]
    fn an_open_with_lock_wait_gets_the_store_once_its_holder_closes_it() {
        let dir = tempfile::tempdir().unwrap();
        let holder = Store::open(dir.path()).unwrap();
        let (opened_tx, opened) = std::sync::mpsc::channel();
        let d = dir.path().to_path_buf();
        let waiter = std::thread::spawn(move || {
            let options = StoreOptions {
                lock_wait: std::time::Duration::from_secs(30),
                ..Default::default()
            };
            let r = Store::open_with(&d, &options).map(|_| ());
            let _ = opened_tx.send(());
            r
        });
        // While the holder has it, the waiter is still waiting (it has not answered).
        assert!(opened
            .recv_timeout(std::time::Duration::from_millis(200))
            .is_err());
        drop(holder);
        waiter.join().unwrap().unwrap();
        // Without a wait, a held store is refused at once.
        let _again = Store::open(dir.path()).unwrap();
        assert!(Store::open(dir.path()).is_err());
    }

    #[test]
    fn a_store_larger_than_its_cache_reads_back_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let tiny = StoreOptions {
            cache_bytes: 1024 * 1024,
            ..Default::default()
        };
        // 5,000 points of 128 floats: 2.5 MB of vectors through a 1 MiB cache.
        let points: Vec<Point> = (0..5_000u64)
            .map(|id| Point {
                id,
                vector: (0..128).map(|i| (id * 128 + i) as f32).collect(),
            })
            .collect();
        {
            let s = Store::open_with(dir.path(), &tiny).unwrap();
            assert!(s.create_index(&record("a", 7)).unwrap());
            for chunk in points.chunks(500) {
                s.upsert_points(7, chunk).unwrap();
            }
            s.flush_blocking().unwrap();
        }
        let s = reopen(dir.path(), &tiny).unwrap();
        let mut back = s.load_points(7).unwrap();
        back.sort_by_key(|p| p.id);
        assert_eq!(back.len(), points.len());
        assert!(back
            .iter()
            .zip(&points)
            .all(|(a, b)| a.id == b.id && a.vector == b.vector));
        assert_eq!(
            s.get_point(7, 4_321).unwrap(),
            Some(points[4_321].vector.clone())
        );
    }

    #[test]
    fn a_newer_format_is_refused_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            s.meta
                .insert("format_version", &2u32.to_be_bytes())
                .unwrap();
            s.flush_blocking().unwrap();
        }
        let e = reopen(dir.path(), &StoreOptions::default())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("format version 2"), "{e}");
        assert!(e.contains(&dir.path().display().to_string()), "{e}");
    }

    #[test]
    fn points_and_counts_change_together_and_deletes_sweep() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        assert!(s.create_index(&record("a", 7)).unwrap());
        assert!(
            !s.create_index(&record("a", 8)).unwrap(),
            "the name is taken"
        );
        let c = s.upsert_points(7, &pts(0..10)).unwrap();
        assert_eq!((c.point_count, c.data_version), (10, 1));
        let c = s.upsert_points(7, &pts(5..15)).unwrap();
        assert_eq!((c.point_count, c.data_version), (15, 2));
        let (deleted, c) = s.delete_points(7, &[0, 1, 99]).unwrap();
        assert_eq!((deleted, c.point_count, c.data_version), (2, 13, 3));
        let (deleted, c) = s.delete_points(7, &[99]).unwrap();
        assert_eq!(
            (deleted, c.data_version),
            (0, 3),
            "nothing removed, no new version"
        );
        assert_eq!(s.load_points(7).unwrap().len(), 13);
        assert_eq!(s.get_point(7, 5).unwrap(), Some(vec![5.0, 1.0]));

        // Points of an index whose record is gone (a crash mid-delete) are swept.
        // Orphans on both sides of the live index's keys (the sweep seeks from uid to uid).
        s.upsert_points(9, &pts(0..4)).unwrap();
        s.upsert_points(2, &pts(0..3)).unwrap();
        assert_eq!(s.sweep_orphans().unwrap(), 7);
        assert_eq!(s.load_points(7).unwrap().len(), 13);
        assert!(s.load_points(2).unwrap().is_empty());
        assert!(s.load_points(9).unwrap().is_empty());
        assert!(s.changes_since(2, 0).unwrap().is_empty());
        assert_eq!(s.sweep_orphans().unwrap(), 0);
        s.delete_index("a", 7).unwrap();
        assert!(s.load_points(7).unwrap().is_empty());
        assert!(s.list_indexes().unwrap().is_empty());
    }

    #[test]
    fn trim_jobs_keeps_every_running_job_and_the_newest_finished() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        for seq in 1..=6u64 {
            s.put_job(seq, &serde_json::json!({"seq": seq, "running": seq == 1}))
                .unwrap();
        }
        let removed = s
            .trim_jobs(2, |j: &serde_json::Value| j["running"] == true)
            .unwrap();
        assert_eq!(removed, 3);
        let seqs: Vec<u64> = s
            .list_jobs::<serde_json::Value>()
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(seqs, vec![6, 5, 1], "the oldest, running, stays");
    }

    #[test]
    fn work_of_a_deleted_index_never_lands_on_a_new_index_of_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let trial = |id| serde_json::json!({"id": id, "index": "a", "harness": "h"});
        assert!(s.create_index(&record("a", 7)).unwrap());
        let t = s.append_trial(Some(("a", 7)), trial).unwrap();
        s.delete_index("a", 7).unwrap();
        assert!(s.create_index(&record("a", 8)).unwrap());
        let e = s.append_trial(Some(("a", 7)), trial).unwrap_err();
        assert!(matches!(e, Error::NotFound { .. }), "{e}");
        assert_eq!(s.trial_count(), 0, "the old trial went with its index");
        let e = s
            .update_promotion("a", Some(7), None, |_: Option<serde_json::Value>| {
                Ok((serde_json::json!({}), ()))
            })
            .unwrap_err();
        assert!(matches!(e, Error::NotFound { .. }), "{e}");
        assert!(s.get_promotion::<serde_json::Value>("a").unwrap().is_none());
        // The new index's own work goes through; a promotion of a trial that is gone does not.
        s.append_trial(Some(("a", 8)), trial).unwrap();
        let e = s
            .update_promotion(
                "a",
                Some(8),
                Some(t["id"].as_u64().unwrap()),
                |_: Option<serde_json::Value>| Ok((serde_json::json!({}), ())),
            )
            .unwrap_err();
        assert!(matches!(e, Error::NotFound { what: "trial", .. }), "{e}");
    }

    #[test]
    fn prune_trials_keeps_the_newest_and_every_promoted_trial() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let mut ids = Vec::new();
        for _ in 0..6 {
            let t = s
                .append_trial(
                    None,
                    |id| serde_json::json!({"id": id, "index": "a", "harness": "h"}),
                )
                .unwrap();
            ids.push(t["id"].as_u64().unwrap());
        }
        let other = s
            .append_trial(
                None,
                |id| serde_json::json!({"id": id, "index": "a", "harness": "g"}),
            )
            .unwrap()["id"]
            .as_u64()
            .unwrap();
        let (cur, hist) = (ids[0], ids[1]);
        s.update_promotion("a", None, None, |_: Option<serde_json::Value>| {
            Ok((
                serde_json::json!({"current": {"trial_id": cur}, "history": [{"trial_id": hist}]}),
                (),
            ))
        })
        .unwrap();
        assert_eq!(s.prune_trials("a", "h", 2).unwrap(), 2);
        assert_eq!(journal_ids(&s), vec![other, ids[5], ids[4], ids[1], ids[0]]);
        assert_eq!(
            s.prune_trials("a", "h", 2).unwrap(),
            0,
            "nothing more to do"
        );
    }

    /// A store with index "a" (uid 7) as the replica of cluster index uid 100.
    fn replica_store(dir: &Path) -> Store {
        let s = Store::open(dir).unwrap();
        assert!(s.create_index(&record("a", 7)).unwrap());
        s.link_replica(7, 100).unwrap();
        s
    }

    /// The lab record of trial `id` of index "a" (cluster uid 100), harness "h".
    fn lab_trial(id: u64) -> LabOp<'static> {
        LabOp::Trial {
            index: "a",
            cluster_uid: 100,
            json: serde_json::to_vec(&serde_json::json!({"id": id, "index": "a", "harness": "h"}))
                .unwrap(),
        }
    }

    /// The journal's trial ids, newest first.
    fn journal_ids(s: &Store) -> Vec<u64> {
        s.list_trials(None, 100, |_: &serde_json::Value| true)
            .unwrap()
            .iter()
            .map(|t| t["id"].as_u64().unwrap())
            .collect()
    }

    #[test]
    fn the_lab_mirror_applies_each_record_once_for_its_replica_and_keeps_pinned_trials() {
        let dir = tempfile::tempdir().unwrap();
        let s = replica_store(dir.path());
        let trial = lab_trial;
        let ids = journal_ids;
        for seq in 1..=4 {
            s.apply_lab(seq, &trial(seq)).unwrap();
        }
        // A replay (at or below the mirrored sequence) changes nothing.
        s.apply_lab(2, &LabOp::RemoveTrials { ids: &[1, 2, 3] })
            .unwrap();
        assert_eq!(ids(&s), [4, 3, 2, 1]);
        assert_eq!(s.lab_applied().unwrap(), 4);
        // Another incarnation's record (uid 101) or an unknown index's: only the sequence moves.
        let other = LabOp::Trial {
            index: "a",
            cluster_uid: 101,
            json: b"{}".to_vec(),
        };
        s.apply_lab(5, &other).unwrap();
        let missing = LabOp::CreateHarness {
            index: "b",
            cluster_uid: 100,
            name: "h",
            json: b"{}".to_vec(),
            replace: false,
        };
        s.apply_lab(6, &missing).unwrap();
        assert_eq!(ids(&s), [4, 3, 2, 1]);
        assert_eq!(s.lab_applied().unwrap(), 6);
        // A pin of a trial the journal has (of its index) protects it; the others go.
        s.apply_lab(7, &LabOp::Pin { index: "b", id: 1 }).unwrap();
        s.apply_lab(8, &LabOp::Pin { index: "a", id: 2 }).unwrap();
        assert!(!s.is_pinned(1).unwrap());
        assert!(s.is_pinned(2).unwrap());
        assert_eq!(s.trials_beyond("a", "h", 1).unwrap(), [3, 1]);
        s.apply_lab(9, &LabOp::RemoveTrials { ids: &[3, 2, 1] })
            .unwrap();
        assert_eq!(ids(&s), [4, 2]);
        assert_eq!(s.trial_count(), 2);
        // The harness: created once (a second record of the name is ignored), then deleted.
        let harness = |json: &str| LabOp::CreateHarness {
            index: "a",
            cluster_uid: 100,
            name: "h",
            json: json.as_bytes().to_vec(),
            replace: false,
        };
        s.apply_lab(10, &harness("{\"n\":1}")).unwrap();
        s.apply_lab(11, &harness("{\"n\":2}")).unwrap();
        let h: serde_json::Value = s.get_harness("a", "h").unwrap().unwrap();
        assert_eq!(h["n"], 1);
        let delete = LabOp::DeleteHarness {
            index: "a",
            cluster_uid: 100,
            name: "h",
        };
        s.apply_lab(12, &delete).unwrap();
        assert!(s
            .get_harness::<serde_json::Value>("a", "h")
            .unwrap()
            .is_none());
        // Survives a reopen: the mirror resumes after 12.
        s.flush_blocking().unwrap();
        drop(s);
        let s = reopen(dir.path(), &StoreOptions::default()).unwrap();
        assert_eq!(s.lab_applied().unwrap(), 12);
        assert!(s.is_pinned(2).unwrap());
    }

    #[test]
    fn a_lab_resync_keeps_what_the_reread_found_and_removes_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let s = replica_store(dir.path());
        let trial = lab_trial;
        let harness = |name: &'static str, n: u32, replace: bool| LabOp::CreateHarness {
            index: "a",
            cluster_uid: 100,
            name,
            json: serde_json::to_vec(&serde_json::json!({ "n": n })).unwrap(),
            replace,
        };
        for seq in 1..=4 {
            s.apply_lab(seq, &trial(seq)).unwrap();
        }
        s.apply_lab(5, &LabOp::Pin { index: "a", id: 2 }).unwrap();
        s.apply_lab(6, &harness("h", 1, false)).unwrap();
        s.apply_lab(7, &harness("g", 1, false)).unwrap();
        assert!(!s.lab_resyncing().unwrap());
        assert!(!s.lab_is_empty().unwrap());
        assert_eq!(s.lab_live_count().unwrap(), 4 + 1 + 2);

        // The log was trimmed: it still has trials 2 and 3, the pin, and harness h as
        // created again since (another harness of the name: it takes the old one's place).
        s.begin_lab_resync().unwrap();
        assert_eq!(s.lab_applied().unwrap(), 0);
        assert!(s.lab_resyncing().unwrap());
        s.apply_lab(2, &trial(2)).unwrap();
        s.apply_lab(3, &trial(3)).unwrap();
        s.apply_lab(5, &LabOp::Pin { index: "a", id: 2 }).unwrap();
        s.apply_lab(9, &harness("h", 2, true)).unwrap();
        // Until its end, the store still has everything it had.
        assert_eq!(s.trial_count(), 4);
        let found: std::collections::HashSet<Vec<u8>> = [harness_key("a", "h")].into();
        assert_eq!(s.finish_lab_resync(&found, &[2, 3].into()).unwrap(), (1, 2));
        assert_eq!(journal_ids(&s), [3, 2]);
        assert_eq!(s.trial_count(), 2);
        assert!(s.is_pinned(2).unwrap());
        let h: serde_json::Value = s.get_harness("a", "h").unwrap().unwrap();
        assert_eq!(h["n"], 2);
        assert!(!s.has_harness("a", "g").unwrap());
        assert!(!s.lab_resyncing().unwrap());
        assert_eq!(s.lab_applied().unwrap(), 9);
        assert_eq!(s.lab_live_count().unwrap(), 2 + 1 + 1);
    }

    #[test]
    fn the_change_log_follows_the_data_version_and_is_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        assert!(s.create_index(&record("a", 7)).unwrap());
        s.upsert_points(7, &pts(0..3)).unwrap();
        s.delete_points(7, &[1, 99]).unwrap();
        s.delete_points(7, &[99]).unwrap(); // removes nothing: no new version, no entry
        let c = s.upsert_points(7, &pts(2..4)).unwrap();
        assert_eq!(c.data_version, 3);
        assert_eq!(
            s.changes_since(7, 0).unwrap(),
            vec![
                (1, Change::Upsert(vec![0, 1, 2])),
                (2, Change::Delete(vec![1])),
                (3, Change::Upsert(vec![2, 3])),
            ]
        );
        assert_eq!(s.changes_since(7, 2).unwrap().len(), 1);
        assert_eq!(s.trim_changes(7, 2).unwrap(), 2);
        assert_eq!(s.changes_since(7, 0).unwrap()[0].0, 3);
        // Another index's log is its own; a deleted index's log goes with it.
        s.upsert_points(9, &pts(0..1)).unwrap();
        s.delete_index("a", 7).unwrap();
        assert!(s.changes_since(7, 0).unwrap().is_empty());
        assert_eq!(s.sweep_orphans().unwrap(), 1);
        assert!(
            s.changes_since(9, 0).unwrap().is_empty(),
            "swept with the orphan points"
        );
    }

    #[test]
    fn the_applied_sequence_moves_with_the_data_and_goes_with_the_index() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            assert!(s.create_index(&record("a", 7)).unwrap());
            assert_eq!(s.applied(7).unwrap(), None, "a single node's index");
            s.link_replica(7, 4242).unwrap();
            let at = |sequence| Applied {
                cluster_uid: 4242,
                sequence,
            };
            assert_eq!(s.applied(7).unwrap(), Some(at(0)));
            s.apply_writes_logged(7, &[WriteOp::Upsert(pts(0..3))], Some(at(5)))
                .unwrap();
            assert_eq!(s.applied(7).unwrap(), Some(at(5)));
            // A failed transaction (an unreadable count) leaves data and sequence as they were.
            s.counts.insert(7u64.to_be_bytes(), &[1u8][..]).unwrap();
            assert!(s
                .apply_writes_logged(7, &[WriteOp::Delete(vec![0])], Some(at(6)))
                .is_err());
            assert_eq!(s.applied(7).unwrap(), Some(at(5)));
            s.counts
                .insert(7u64.to_be_bytes(), &Counts::default().encode())
                .unwrap();
            s.flush_blocking().unwrap();
        }
        // Durable across a reopen; removed with the index, and swept when orphaned.
        let s = reopen(dir.path(), &StoreOptions::default()).unwrap();
        assert_eq!(s.applied(7).unwrap().map(|a| a.sequence), Some(5));
        assert_eq!(s.load_points(7).unwrap().len(), 3);
        s.set_cluster_node("n1").unwrap();
        assert_eq!(s.cluster_node().unwrap().as_deref(), Some("n1"));
        s.delete_index("a", 7).unwrap();
        assert_eq!(s.applied(7).unwrap(), None);
        s.link_replica(8, 1).unwrap();
        s.sweep_orphans().unwrap();
        assert_eq!(s.applied(8).unwrap(), None);
    }

    #[test]
    fn a_copied_replica_is_invisible_until_its_switch_and_swept_if_cut_short() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        assert!(s.create_index(&record("a", 7)).unwrap());
        s.link_replica(7, 4242).unwrap();
        let at = |sequence| Applied {
            cluster_uid: 4242,
            sequence,
        };
        s.apply_writes_logged(7, &[WriteOp::Upsert(pts(0..3))], Some(at(5)))
            .unwrap();
        s.put_refresh(7, &"policy").unwrap();
        // A copy cut short: its staged points are an orphan uid, nothing names them.
        s.stage_points(8, &pts(0..10)).unwrap();
        assert_eq!(s.get_index("a").unwrap().unwrap().meta.uid, 7);
        s.sweep_orphans().unwrap();
        assert!(s.load_points(8).unwrap().is_empty(), "swept at start");
        assert_eq!(s.load_points(7).unwrap().len(), 3, "the replica as it was");
        // A whole copy: one switch names it, with its counts, applied sequence and the
        // replica's refresh record; the old uid's data is then an orphan.
        s.stage_points(9, &pts(0..10)).unwrap();
        let counts = Counts {
            data_version: 2,
            point_count: 10,
            points_changed: 10,
        };
        s.switch_replica(&record("a", 9), 7, counts, at(40))
            .unwrap();
        assert_eq!(s.get_index("a").unwrap().unwrap().meta.uid, 9);
        assert_eq!(s.counts(9).unwrap(), counts);
        assert_eq!(s.applied(9).unwrap(), Some(at(40)));
        assert_eq!(
            s.get_refresh::<String>(9).unwrap().as_deref(),
            Some("policy")
        );
        let mut ids = Vec::new();
        let read = s.visit_points_at_applied(
            9,
            2,
            1,
            || Ok(()),
            |id, v| {
                assert_eq!(v.len(), 8);
                ids.push(id);
                Ok(())
            },
        );
        assert_eq!(read.unwrap(), Some((10, at(40), counts)));
        assert_eq!(ids, (0..10).collect::<Vec<_>>());
        assert!(
            matches!(s.visit_points(9, 3, |_, _| Ok(())), Err(Error::Corrupt(_))),
            "a stored vector of another dimension is refused"
        );
        s.remove_uid_data(7).unwrap();
        assert!(s.load_points(7).unwrap().is_empty());
        assert_eq!(s.applied(7).unwrap(), None);
        assert_eq!(s.get_refresh::<String>(7).unwrap(), None);
    }

    #[test]
    fn a_group_of_writes_answers_each_as_if_alone() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let alone = tempfile::tempdir().unwrap();
        let a = Store::open(alone.path()).unwrap();
        let ops = vec![
            WriteOp::Upsert(pts(0..10)),
            WriteOp::Delete(vec![3, 4, 99]),
            WriteOp::Upsert(pts(3..4)),
            WriteOp::Delete(vec![99]),
            WriteOp::Upsert(pts(8..12)),
            WriteOp::Delete(vec![0]),
        ];
        let (outcomes, counts) = s.apply_writes(7, &ops).unwrap();
        let mut expect = Vec::new();
        let mut last = Counts::default();
        for op in &ops {
            let (affected, c) = match op {
                WriteOp::Upsert(p) => (p.len() as u64, a.upsert_points(7, p).unwrap()),
                WriteOp::Delete(ids) => a.delete_points(7, ids).unwrap(),
            };
            expect.push(OpOutcome {
                affected,
                point_count: c.point_count,
            });
            last = c;
        }
        assert_eq!(outcomes, expect);
        assert_eq!(counts, last);
        assert_eq!(s.load_points(7).unwrap(), a.load_points(7).unwrap());
        let (points, c) = s.load_points_consistent(7, 1).unwrap().unwrap();
        assert_eq!((points.len() as u64, c), (counts.point_count, counts));
        // The change log says what the writes alone would have logged, from one entry.
        for after in 0..=counts.data_version {
            assert_eq!(
                s.changes_since(7, after).unwrap(),
                a.changes_since(7, after).unwrap(),
                "after write {after}"
            );
        }
        assert_eq!(s.changes.len(), 1, "one entry for the group");
        assert_eq!(a.changes.len(), counts.data_version as usize);
        // Trimming inside the group keeps it (the writes after the trim are still read).
        assert_eq!(s.trim_changes(7, 2).unwrap(), 0);
        assert_eq!(
            s.changes_since(7, 2).unwrap(),
            a.changes_since(7, 2).unwrap()
        );
        assert_eq!(s.trim_changes(7, counts.data_version).unwrap(), 1);
        assert!(s.changes_since(7, 0).unwrap().is_empty());
    }

    #[test]
    fn a_damaged_group_entry_is_corrupt_not_a_panic() {
        let mut log = GroupLog::new();
        log.push(CHANGE_UPSERT, [1u64, 2].into_iter());
        log.push(CHANGE_DELETE, [2u64].into_iter());
        let entry = log.entry().unwrap();
        assert_eq!(
            Change::decode_entry(9, &entry).unwrap(),
            vec![
                (8, Change::Upsert(vec![1, 2])),
                (9, Change::Delete(vec![2]))
            ]
        );
        let corrupt =
            |seq: u64, b: &[u8]| matches!(Change::decode_entry(seq, b), Err(Error::Corrupt(_)));
        for cut in 0..entry.len() {
            assert!(corrupt(9, &entry[..cut]), "cut at {cut}");
        }
        let mut longer = entry.clone();
        longer.push(0);
        assert!(corrupt(9, &longer), "bytes past the writes");
        assert!(corrupt(1, &entry), "more writes than sequences before it");
        let mut none = entry.clone();
        none[1..9].copy_from_slice(&0u64.to_be_bytes());
        assert!(corrupt(9, &none), "a group of no writes");
        let mut huge = entry.clone();
        huge[10..18].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(corrupt(9, &huge), "an id count past the entry");
        let mut kind = entry;
        kind[9] = 7;
        assert!(corrupt(9, &kind), "an unknown kind");
        // A group of one write is that write's own entry, as before groups.
        let mut one = GroupLog::new();
        one.push(CHANGE_DELETE, [5u64].into_iter());
        assert_eq!(one.entry().unwrap(), Change::Delete(vec![5]).encode());
        assert_eq!(GroupLog::new().entry(), None);
    }

    #[test]
    fn trial_ids_increase_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let first = {
            let s = Store::open(dir.path()).unwrap();
            let a = s
                .append_trial(None, |id| serde_json::json!({"id": id, "index": "x"}))
                .unwrap();
            s.flush_blocking().unwrap();
            a["id"].as_u64().unwrap()
        };
        let s = reopen(dir.path(), &StoreOptions::default()).unwrap();
        let b = s
            .append_trial(None, |id| serde_json::json!({"id": id, "index": "x"}))
            .unwrap();
        assert!(b["id"].as_u64().unwrap() > first);
    }
}
