//! The catalog: every index with its active generation, the profiles, and activation.
//!
//! Invariants:
//! - Writes to an index (upsert, delete) go through its committer (group commit): callers queue
//!   their write in a bounded queue (full: RESOURCE_EXHAUSTED at once); the committer takes
//!   everything queued, applies it in arrival order in one store transaction under the index's
//!   writer lock, flushes once, applies the same ops in the same order to the active
//!   generation's id map and fresh segment ([`Generation::stage`]: deletes and replaced points
//!   are tombstoned at once, new vectors wait in the segment, which searches scan exactly), marks
//!   the group's write sequence, and only then answers each caller with what its write alone
//!   did. So a write is durable before it touches the generation, and visible to searches when
//!   it returns; linking it into the graph is not on the write's path.
//! - Each index's indexer (a task owned by `Tasks`, its work on the blocking pool) links the
//!   active generation's fresh points into the graph in batches, oldest first, in parallel;
//!   a point leaves the segment only once linked. The segment is bounded
//!   (`--max-unindexed-points`): while it is full the committer takes no group, so the queue
//!   fills and further writes get RESOURCE_EXHAUSTED at once. The indexer stops at shutdown;
//!   what it had not linked is in the change log after the generation's linked sequence
//!   ([`Generation::linked_seq`], what a snapshot records), and is replayed at start.
//! - A storage failure is fatal ([`Store::failed`]): the committer stops and the server exits,
//!   so a write the disk refused is never half-served.
//! - Search, SearchBatch and the graph side of writes run on the blocking pool, searches under
//!   a semaphore of one permit per core: no O(N) work on the async runtime's workers.
//! - A search loads the active generation from an atomic pointer and never waits for a build.
//! - A build snapshots the points under the writer lock and records every write made while it
//!   runs; the writes are replayed (staged, each group with its write sequence) into the new
//!   generation under the lock just before the swap, so the swap loses nothing; the indexer
//!   then links them in the new generation.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use tokio::sync::{mpsc, oneshot, Semaphore};

use arc_swap::ArcSwap;
use parking_lot::RwLock;
use rayon::prelude::*;

use crate::compaction::{deleted_fraction, Compaction, Compactor, IndexCompaction};
use crate::error::{Error, Result};
use crate::index::engine::{EngineKind, EngineMemory};
use crate::index::generation::LINK_BATCH;
use crate::index::{Generation, Phase, Progress, ProgressView};
use crate::model::{
    check_vector, normalize, now_millis, ConfigSource, GenerationMeta, Hit, HnswConfig, IndexMeta,
    Metric, Name, NewIndex, Point, Profile, SearchParams,
};
use crate::promotion::Registry;
use crate::snapshots::{self, Restored};
use crate::store::{Counts, IndexRecord, OpOutcome, Store, WriteOp as Op};
use crate::tasks::Tasks;

/// A flag a build polls between chunks of points.
type Cancelled = Arc<dyn Fn() -> bool + Send + Sync>;

/// A compaction's hold on the index's build lock, and when to stop.
struct Compacting<'a> {
    building: tokio::sync::MutexGuard<'a, ()>,
    cancelled: Cancelled,
}

/// Default of `--max-pending-writes`: writes (calls) one index may have queued for its
/// committer before more are refused.
pub const DEFAULT_MAX_PENDING_WRITES: usize = 1024;

/// Default of `--max-unindexed-points`: points an index may hold committed but not yet linked
/// into its graph (its fresh segment, which every search scans) before the committer waits.
pub const DEFAULT_MAX_UNINDEXED_POINTS: usize = 10_000;

/// Tests only (the binary reads them from `VECTORD_TEST_BUILD_CHUNK_DELAY_MS` and
/// `VECTORD_TEST_SNAPSHOT_DELAY_MS` into its `Config`; none in production): pauses that let a
/// test of the binary catch long work in the act without burning CPU on a big index.
#[derive(Clone, Copy, Debug, Default)]
pub struct TestPauses {
    /// Before each chunk of a build, and of a recovery's load and replay (e.g. to send SIGTERM
    /// into a build, or to read a build's progress).
    pub build_chunk: Option<std::time::Duration>,
    /// Between writing a snapshot's bytes and renaming the file into place (so a crash test can
    /// kill the server while a snapshot is half written).
    pub snapshot_write: Option<std::time::Duration>,
}

impl TestPauses {
    /// `cancelled`, with the build pause before each check (a check comes once per chunk).
    pub fn paced<'a>(&self, cancelled: &'a dyn Fn() -> bool) -> impl Fn() -> bool + 'a {
        let pause = self.build_chunk;
        move || {
            if let Some(d) = pause {
                std::thread::sleep(d);
            }
            cancelled()
        }
    }
}

/// Tests only: holds or slows every index's background indexer (linking of fresh points).
#[derive(Clone, Debug, Default)]
pub struct IndexerHold {
    paused: Arc<AtomicBool>,
    delay: Option<std::time::Duration>,
}

impl IndexerHold {
    /// The indexer sleeps `delay` before each batch it links.
    pub fn delayed(delay: std::time::Duration) -> Self {
        IndexerHold {
            delay: Some(delay),
            ..Default::default()
        }
    }
    /// No batch is linked until [`IndexerHold::resume`].
    pub fn pause(&self) {
        self.paused.store(true, Ordering::Release);
    }
    pub fn resume(&self) {
        self.paused.store(false, Ordering::Release);
    }
    async fn wait(&self, stop: &tokio_util::sync::CancellationToken) {
        if let Some(d) = self.delay {
            tokio::select! {
                _ = tokio::time::sleep(d) => {}
                _ = stop.cancelled() => {}
            }
        }
        while self.paused.load(Ordering::Acquire) && !stop.is_cancelled() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
}

/// How an index's committer and indexer signal each other.
#[derive(Default)]
struct Signals {
    /// Points were staged (or the generation changed): the indexer has work.
    wake: tokio::sync::Notify,
    /// Points were linked (or the generation changed): the fresh segment may have room.
    room: tokio::sync::Notify,
}

/// Longest a background snapshot waits for the indexer to link the writes that called for it.
const RESNAPSHOT_LINK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The committer stops adding queued writes to a group once it holds this many points + ids
/// (a group is never smaller than one write).
const MAX_GROUP_ITEMS: usize = 100_000;

/// Queries of a SearchBatch between two checks of its cancellation flag.
const BATCH_CHUNK: usize = 64;

/// A write waiting for its index's committer.
struct Pending {
    op: Op,
    /// The write log's sequence of the write (cluster replicas; None on a single node).
    logged: Option<u64>,
    reply: oneshot::Sender<Result<OpOutcome>>,
}

impl Op {
    fn items(&self) -> usize {
        match self {
            Op::Upsert(p) => p.len(),
            Op::Delete(ids) => ids.len(),
        }
    }
}

#[derive(Default)]
struct Writer {
    /// Set while a build runs: the groups of writes it must replay, each with the write
    /// sequence the index was at after it.
    recording: Option<Vec<(Vec<Op>, u64)>>,
}

pub struct IndexHandle {
    pub meta: IndexMeta,
    /// The engine its graphs are built with: `meta.engine`, or the server's `--engine` for an
    /// index created before the engine was stored.
    pub engine: EngineKind,
    active: ArcSwap<Generation>,
    writer: tokio::sync::Mutex<Writer>,
    /// One build (activation) of an index at a time.
    building: tokio::sync::Mutex<()>,
    point_count: AtomicU64,
    data_version: AtomicU64,
    points_changed: AtomicU64,
    deleted: AtomicBool,
    /// `points_changed` as of the active generation's last snapshot.
    snapshot_mark: AtomicU64,
    /// Background snapshots ([`snapshotter`]): woken by writes, an import's end and the
    /// index's deletion.
    snap_poke: Arc<tokio::sync::Notify>,
    /// Requests for a snapshot without waiting for writes to stop (an import's end, a start's
    /// replay), counted: the snapshotter has served those it counted before its last snapshot.
    snap_requests: AtomicU64,
    /// Why the last request was made (logged with the snapshot).
    snap_why: parking_lot::Mutex<&'static str>,
    /// When the index's last write was acknowledged.
    last_write: parking_lot::Mutex<std::time::Instant>,
    /// The oldest data version a trial may have built a graph at since the last activation
    /// (u64::MAX: none): background snapshots keep the change log after it, so that the
    /// graph can still be adopted (caught up from the log) instead of rebuilt.
    log_pin: AtomicU64,
    /// The committer's queue (bounded by `--max-pending-writes`).
    queue: mpsc::Sender<Pending>,
    max_pending: usize,
    /// `--max-unindexed-points`: the active generation's fresh segment's bound.
    max_unindexed: usize,
    signals: Arc<Signals>,
    /// Tombstone compaction's state (see `compaction.rs`).
    pub compaction: IndexCompaction,
    /// The cluster index this one replicates (its uid in the cluster); None on a single node.
    pub cluster_uid: Option<u64>,
    /// The last write-log sequence applied (durable and searchable); 0 on a single node.
    applied: tokio::sync::watch::Sender<u64>,
    /// The build of the index's next generation, while one runs (GetIndex shows it).
    build_progress: parking_lot::Mutex<Option<Arc<Progress>>>,
    /// The graph of the promoted winner of the index's last autotune job that did not activate,
    /// kept for an activation of that promotion (ActivateProfile) to adopt: at most one per
    /// index, dropped when adopted, replaced by the next job's and dropped with the index.
    held: parking_lot::Mutex<Option<TrialGraph>>,
}

/// A graph a trial built over an index's points at a data version, offered to an activation
/// in place of a build: the activation replays the writes made since `version` into it (from
/// the store's change log) and swaps it in. Autotune's winner's graph, so that activating the
/// winner costs a catch-up, not a second build.
pub struct TrialGraph {
    /// The index (incarnation) whose points it was built over.
    pub uid: u64,
    pub trial_id: u64,
    /// The index's data version the points were at.
    pub version: u64,
    pub gen: Generation,
}

impl TrialGraph {
    /// Whether this graph is what a build of `config` over the same points would give: the
    /// same m, ef_construction and seed (ef_search is a search-time knob).
    pub fn builds(&self, config: &HnswConfig) -> bool {
        let c = &self.gen.meta.config;
        c.m == config.m && c.ef_construction == config.ef_construction && c.seed == config.seed
    }
}

/// What an activation swaps in: a graph built for it, or a trial's graph.
enum Graph {
    Build(HnswConfig),
    Adopt(HnswConfig, Box<TrialGraph>),
}

/// Activation builds and adoptions since start (the `vectord_activation_*` metrics).
#[derive(Default)]
pub struct ActivationCounts {
    /// Graphs built by activations and compactions.
    pub builds: AtomicU64,
    /// Trial graphs swapped in without a build.
    pub adopted: AtomicU64,
}

impl Drop for IndexHandle {
    fn drop(&mut self) {
        // The indexer waiting for work sees the handle gone and ends.
        self.signals.wake.notify_one();
    }
}

/// What an index's committer, indexer and snapshotter are started with (the catalog's
/// options).
#[derive(Clone)]
struct WriteOptions {
    max_pending: usize,
    max_unindexed: usize,
    hold: Option<IndexerHold>,
    /// `--snapshot-idle-secs`.
    snapshot_idle: Option<std::time::Duration>,
    /// Tests only: `TestPauses::snapshot_write`.
    snapshot_pause: Option<std::time::Duration>,
}

/// How an index's handle starts (the catalog's settings and what its start found).
struct HandleStart<'a> {
    /// `points_changed` as of the generation's snapshot.
    snapshot_mark: u64,
    store: Arc<Store>,
    options: &'a WriteOptions,
    /// The write-log sequence applied (cluster replicas).
    applied: Option<crate::store::Applied>,
    tasks: &'a Tasks,
}

impl IndexHandle {
    /// A handle over `gen` with its committer, indexer and snapshotter started.
    /// The index's engine is its first generation's (`gen.kind`).
    fn start(meta: IndexMeta, gen: Generation, counts: Counts, how: HandleStart) -> Arc<Self> {
        let HandleStart {
            snapshot_mark,
            store,
            options,
            applied,
            tasks,
        } = how;
        let max_pending = options.max_pending.max(1);
        let (queue, rx) = mpsc::channel(max_pending);
        let signals = Arc::new(Signals::default());
        let handle = Arc::new(IndexHandle {
            meta,
            engine: gen.kind,
            active: ArcSwap::from_pointee(gen),
            writer: Default::default(),
            building: Default::default(),
            point_count: AtomicU64::new(counts.point_count),
            data_version: AtomicU64::new(counts.data_version),
            points_changed: AtomicU64::new(counts.points_changed),
            deleted: AtomicBool::new(false),
            snapshot_mark: AtomicU64::new(snapshot_mark),
            snap_poke: Default::default(),
            snap_requests: AtomicU64::new(0),
            snap_why: parking_lot::Mutex::new(""),
            last_write: parking_lot::Mutex::new(std::time::Instant::now()),
            log_pin: AtomicU64::new(u64::MAX),
            compaction: Default::default(),
            build_progress: Default::default(),
            held: Default::default(),
            queue,
            max_pending,
            max_unindexed: options.max_unindexed.max(1),
            signals: signals.clone(),
            cluster_uid: applied.map(|a| a.cluster_uid),
            applied: tokio::sync::watch::Sender::new(applied.map_or(0, |a| a.sequence)),
        });
        // Fed by the handle: the task ends when the handle (and so the queue's sender) is
        // dropped, after answering every write still queued, or at a storage failure. Tracked,
        // so shutdown waits for the last queued writes.
        let stop = tasks.stop_token();
        tasks.spawn(snapshotter(
            handle.clone(),
            handle.snap_poke.clone(),
            Arc::downgrade(&store),
            stop.clone(),
            options.snapshot_idle,
            options.snapshot_pause,
        ));
        tasks.spawn(committer(
            Arc::downgrade(&handle),
            store.clone(),
            rx,
            signals.clone(),
            stop.clone(),
        ));
        // Ends at shutdown (what it had not linked is replayed at the next start), when the
        // handle is gone, or at a storage failure.
        tasks.spawn(indexer(
            Arc::downgrade(&handle),
            Arc::downgrade(&store),
            signals,
            stop,
            options.hold.clone(),
        ));
        handle
    }

    /// Points of the active generation committed but not yet linked into its graph.
    pub fn unindexed(&self) -> usize {
        self.active().unlinked()
    }

    /// Asks the snapshotter for a snapshot without waiting for writes to stop (if anything
    /// changed since the last one).
    fn request_snapshot(&self, why: &'static str) {
        *self.snap_why.lock() = why;
        self.snap_requests.fetch_add(1, Ordering::AcqRel);
        self.snap_poke.notify_one();
    }

    /// An acknowledged write changed the index: its snapshotter decides again.
    fn wrote(&self) {
        *self.last_write.lock() = std::time::Instant::now();
        self.snap_poke.notify_one();
    }

    pub fn active(&self) -> Arc<Generation> {
        self.active.load_full()
    }
    /// The last write-log sequence applied (cluster replicas; 0 on a single node).
    pub fn applied(&self) -> u64 {
        *self.applied.borrow()
    }
    /// Publishes that the write log is applied up to `seq` (never backwards): called by the
    /// apply loop once the writes up to `seq` are durable, searchable AND their outcomes are
    /// recorded, so a writer or a search woken by it sees everything of its write (the
    /// committer does not publish it: a writer woken between the commit and the outcome's
    /// record answered without its outcome).
    pub fn mark_applied(&self, seq: u64) {
        self.applied.send_if_modified(|a| {
            let newer = seq > *a;
            if newer {
                *a = seq;
            }
            newer
        });
    }
    /// The applied write-log sequence, as it moves.
    pub fn applied_updates(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied.subscribe()
    }
    /// Waits until the write-log sequence `seq` is applied; false if `timeout` passed first or
    /// the index was deleted.
    pub async fn wait_applied(&self, seq: u64, timeout: std::time::Duration) -> bool {
        let mut rx = self.applied.subscribe();
        let reached = tokio::time::timeout(timeout, rx.wait_for(|a| *a >= seq))
            .await
            .is_ok_and(|r| r.is_ok());
        reached
    }

    /// Where the build of the index's next generation is, while one runs.
    pub fn build_progress(&self) -> Option<ProgressView> {
        self.build_progress.lock().as_ref().map(|p| p.view())
    }
    pub fn point_count(&self) -> u64 {
        self.point_count.load(Ordering::Acquire)
    }
    /// Bumped by every upsert and every delete that removed something.
    pub fn data_version(&self) -> u64 {
        self.data_version.load(Ordering::Acquire)
    }
    /// Points upserted plus points deleted since the index was created.
    pub fn points_changed(&self) -> u64 {
        self.points_changed.load(Ordering::Acquire)
    }

    /// Checks and prepares a vector for this index: dimension, finiteness, and unit length for
    /// cosine.
    pub fn prepare_vector(&self, what: &str, v: &mut [f32]) -> Result<()> {
        check_vector(what, v, self.meta.dimension)?;
        if self.meta.metric == Metric::Cosine {
            normalize(what, v)?;
        }
        Ok(())
    }

    fn set_counts(&self, counts: Counts) {
        self.point_count
            .store(counts.point_count, Ordering::Release);
        self.data_version
            .store(counts.data_version, Ordering::Release);
        self.points_changed
            .store(counts.points_changed, Ordering::Release);
    }

    fn check_live(&self) -> Result<()> {
        if self.deleted.load(Ordering::Acquire) {
            Err(Error::not_found("index", self.meta.name.as_str()))
        } else {
            Ok(())
        }
    }
}

/// An index as the API shows it.
#[derive(Clone, Debug)]
pub struct IndexView {
    pub meta: IndexMeta,
    pub point_count: u64,
    pub generation: GenerationMeta,
    /// Tombstones in the active generation's graph (replaced or deleted points).
    pub tombstones: u64,
    /// Tombstones over every point in the active generation's graph.
    pub deleted_fraction: f64,
    pub compaction: crate::compaction::CompactionStats,
    /// The engine its graphs are built with.
    pub engine: EngineKind,
    /// The build of the next generation, while one runs.
    pub build: Option<ProgressView>,
    /// Points committed (searchable) but not yet linked into the active generation's graph.
    pub unindexed: u64,
}

pub struct Catalog {
    store: Arc<Store>,
    registry: Arc<Registry>,
    indexes: RwLock<BTreeMap<Name, Arc<IndexHandle>>>,
    /// Woken whenever an index is added or replaced ([`Catalog::wait_handle`]).
    added: tokio::sync::Notify,
    /// Serialises creating and deleting indexes and changing profiles.
    ddl: tokio::sync::Mutex<()>,
    /// `--engine`: the engine of an index whose record names none.
    default_engine: EngineKind,
    /// `--map-float-vectors`: where every graph the catalog builds or loads keeps its float
    /// vectors.
    memory: EngineMemory,
    /// Tests only: pauses in builds and snapshot writes (none in production).
    pauses: TestPauses,
    /// Cancelled when the server shuts down: builds stop at their next chunk.
    stop: tokio_util::sync::CancellationToken,
    /// The server's tasks: committers, background snapshots and compactions are spawned here.
    tasks: Tasks,
    /// Each index's write queue, fresh segment bound and snapshot rule.
    writes: WriteOptions,
    /// Searches (single and batch) running on the blocking pool at once: one per core.
    search_permits: Arc<Semaphore>,
    /// Starts tombstone compactions after acknowledged writes.
    compactor: Compactor,
    /// Activation builds and trial-graph adoptions since start.
    activations: ActivationCounts,
}

/// How a catalog is set up (from the server's flags).
#[derive(Clone, Debug)]
pub struct CatalogOptions {
    /// `--max-pending-writes`: each index's write queue.
    pub max_pending: usize,
    /// `--engine`: the engine of new indexes that name none, and of indexes whose record
    /// names none (created before the engine was stored).
    pub default_engine: EngineKind,
    /// `--compact-deleted-fraction`: the deleted share past which an index is compacted
    /// (0: never).
    pub compact_fraction: f64,
    /// `--max-unindexed-points`: each index's fresh segment (committed, not yet linked).
    pub max_unindexed: usize,
    /// Tests only: holds or slows the indexers.
    pub indexer_hold: Option<IndexerHold>,
    /// Tests only: pauses in builds and snapshot writes.
    pub test_pauses: TestPauses,
    /// `--snapshot-idle-secs`: an index with changes since its snapshot and no write for this
    /// long is snapshotted in the background (None: never for that reason).
    pub snapshot_idle: Option<std::time::Duration>,
    /// `--map-float-vectors`: graphs keep the float vectors they hold apart from their search
    /// codes in mapped temp files under the store's dir (`EngineMemory::in_data_dir`), or in
    /// RAM.
    pub map_float_vectors: bool,
}

impl Default for CatalogOptions {
    fn default() -> Self {
        CatalogOptions {
            max_pending: DEFAULT_MAX_PENDING_WRITES,
            default_engine: EngineKind::DEFAULT,
            compact_fraction: 0.0,
            max_unindexed: DEFAULT_MAX_UNINDEXED_POINTS,
            indexer_hold: None,
            test_pauses: TestPauses::default(),
            snapshot_idle: Some(snapshots::DEFAULT_IDLE),
            map_float_vectors: true,
        }
    }
}

impl Catalog {
    /// Opens the catalog over a store: rebuilds every index's active generation with its
    /// recorded config (off the async runtime). Every build of the catalog (these and
    /// activations) stops at its next chunk once `tasks`' stop token is cancelled (server
    /// shutdown); every task the catalog starts is owned by `tasks`.
    pub async fn recover(
        store: Arc<Store>,
        registry: Arc<Registry>,
        tasks: Tasks,
        options: CatalogOptions,
    ) -> Result<Self> {
        let stop = tasks.stop_token();
        let CatalogOptions {
            max_pending,
            default_engine,
            compact_fraction,
            max_unindexed,
            indexer_hold,
            snapshot_idle,
            map_float_vectors,
            test_pauses,
        } = options;
        let writes = WriteOptions {
            snapshot_pause: test_pauses.snapshot_write,
            max_pending,
            max_unindexed,
            hold: indexer_hold,
            snapshot_idle,
        };
        let swept = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.sweep_orphans()).await??
        };
        if swept > 0 {
            tracing::warn!(swept, "removed leftovers of indexes deleted before a crash");
        }
        // The mapped float vectors' directory is cleaned of what an earlier process left only
        // now, while the store's lock says the data dir is this process's.
        let memory = if map_float_vectors {
            let dir = store.dir().to_path_buf();
            tokio::task::spawn_blocking(move || EngineMemory::in_data_dir(&dir)).await??
        } else {
            EngineMemory::IN_RAM
        };
        let records = store.list_indexes()?;
        {
            let (store, records) = (store.clone(), records.clone());
            let swept =
                tokio::task::spawn_blocking(move || snapshots::sweep(&store, &records)).await?;
            if swept > 0 {
                tracing::info!(swept, "removed snapshot files no index uses");
            }
        }
        let mut indexes = BTreeMap::new();
        let mut replayed_many = Vec::new();
        for mut rec in records {
            let started = std::time::Instant::now();
            let st = store.clone();
            let halt = stop.clone();
            let engine = rec.meta.engine.unwrap_or(default_engine);
            let mem = memory.clone();
            let (gen, counts, restored, rec) = tokio::task::spawn_blocking(move || -> Result<_> {
                let (gen, counts, restored) = snapshots::restore(
                    &st,
                    &mut rec,
                    engine,
                    &mem,
                    &test_pauses.paced(&|| halt.is_cancelled()),
                    test_pauses.snapshot_write,
                )
                .map_err(|e| shutdown_or(&halt, e))?;
                Ok((gen, counts, restored, rec))
            })
            .await??;
            let (from, replayed, mark, soon) = match restored {
                Restored::Snapshot { replayed, points } => (
                    "snapshot",
                    replayed,
                    counts.points_changed.saturating_sub(points),
                    snapshots::replay_calls_for_snapshot(points, counts.point_count),
                ),
                Restored::Rebuilt => ("rebuild", 0, counts.points_changed, false),
            };
            tracing::info!(
                index = %rec.meta.name,
                points = counts.point_count,
                generation = gen.meta.number,
                config = %gen.meta.config,
                from,
                replayed,
                millis = started.elapsed().as_millis() as u64,
                "recovered index"
            );
            // Everything the store holds is linked (a build, or a snapshot with the log replayed).
            gen.mark(counts.data_version);
            let applied = store.applied(rec.meta.uid)?;
            let handle = IndexHandle::start(
                rec.meta.clone(),
                gen,
                counts,
                HandleStart {
                    snapshot_mark: mark,
                    store: store.clone(),
                    options: &writes,
                    applied,
                    tasks: &tasks,
                },
            );
            if soon {
                replayed_many.push(handle.clone());
            }
            indexes.insert(rec.meta.name, handle);
        }
        // A start that replayed many points snapshots the index in the background once every
        // index is up (not while others still load), so the next start does not replay them.
        for handle in replayed_many {
            handle.request_snapshot("the start replayed many writes");
        }
        // Rebuilds and replays read points from the store that are garbage now.
        tokio::task::spawn_blocking(crate::index::native::release_free_memory).await?;
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Ok(Catalog {
            store,
            registry,
            indexes: RwLock::new(indexes),
            added: tokio::sync::Notify::new(),
            ddl: Default::default(),
            default_engine,
            memory,
            pauses: test_pauses,
            compactor: Compactor::new(compact_fraction, stop.clone()),
            stop,
            tasks,
            writes,
            search_permits: Arc::new(Semaphore::new(cores)),
            activations: Default::default(),
        })
    }

    /// The engine of indexes created without one (`--engine`).
    pub fn default_engine(&self) -> EngineKind {
        self.default_engine
    }

    /// Where the catalog's graphs (and the lab's) keep their float vectors.
    pub fn engine_memory(&self) -> &EngineMemory {
        &self.memory
    }

    /// Tests only: the pauses every build (the lab's too) and snapshot write take.
    pub fn test_pauses(&self) -> TestPauses {
        self.pauses
    }

    /// Whether the server is shutting down (builds stop).
    pub fn is_stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// A token cancelled when the server shuts down.
    pub fn stop_token(&self) -> tokio_util::sync::CancellationToken {
        self.stop.clone()
    }

    /// Starts a compaction of the index if its deleted share passed the threshold.
    pub(crate) fn maybe_compact(self: &Arc<Self>, name: &Name, handle: &Arc<IndexHandle>) {
        self.compactor.maybe_start(self, name, handle);
    }

    /// The server's tasks (every task the catalog, the jobs and the refresher start).
    pub fn tasks(&self) -> &Tasks {
        &self.tasks
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The index, or NOT_FOUND.
    pub fn handle(&self, name: &Name) -> Result<Arc<IndexHandle>> {
        self.indexes
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| Error::not_found("index", name.as_str()))
    }

    /// [`Catalog::handle`], waiting up to `wait` for an index this node does not have yet (a
    /// cluster node whose catalog is behind the node that took a write: read-your-writes).
    pub async fn wait_handle(
        &self,
        name: &Name,
        wait: std::time::Duration,
    ) -> Result<Arc<IndexHandle>> {
        let until = tokio::time::Instant::now() + wait;
        loop {
            let added = self.added.notified();
            tokio::pin!(added);
            added.as_mut().enable();
            match self.handle(name) {
                Ok(h) => return Ok(h),
                Err(e) => {
                    if tokio::time::timeout_at(until, added).await.is_err() {
                        return Err(e);
                    }
                }
            }
        }
    }

    fn view(h: &IndexHandle) -> IndexView {
        let gen = h.active();
        let (tombstones, live) = (gen.tombstones(), gen.live_count());
        IndexView {
            meta: h.meta.clone(),
            point_count: h.point_count(),
            generation: gen.meta.clone(),
            tombstones: tombstones as u64,
            deleted_fraction: deleted_fraction(tombstones, live),
            compaction: h.compaction.stats(),
            engine: h.engine,
            build: h.build_progress(),
            unindexed: gen.unlinked() as u64,
        }
    }

    pub async fn create_index(&self, new: NewIndex) -> Result<IndexView> {
        self.create_index_linked(new, None).await
    }

    /// [`create_index`](Self::create_index) of a cluster node's replica of the cluster index
    /// `cluster_uid` created at `create_time_ms`: linked to it in the store (nothing of its
    /// write log applied yet) before it is acknowledged.
    pub async fn create_replica(
        &self,
        new: NewIndex,
        cluster_uid: u64,
        create_time_ms: u64,
    ) -> Result<IndexView> {
        self.create_index_linked(new, Some((cluster_uid, create_time_ms)))
            .await
    }

    async fn create_index_linked(
        &self,
        new: NewIndex,
        link: Option<(u64, u64)>,
    ) -> Result<IndexView> {
        let _ddl = self.ddl.lock().await;
        if self.indexes.read().contains_key(&new.name) {
            return Err(Error::AlreadyExists {
                what: "index",
                name: new.name.to_string(),
            });
        }
        let meta = IndexMeta {
            name: new.name.clone(),
            uid: self.store.new_uid()?,
            dimension: new.dimension,
            metric: new.metric,
            default_config: new.default_config,
            create_time_ms: link.map_or_else(now_millis, |(_, ms)| ms),
            engine: Some(new.engine.unwrap_or(self.default_engine)),
        };
        let engine = meta.engine.unwrap_or(self.default_engine);
        let generation = GenerationMeta {
            number: 1,
            config: new.default_config,
            source: ConfigSource::Default,
            point_count: 0,
            build_millis: 0,
            activate_time_ms: meta.create_time_ms,
            profile: String::new(),
            trial_id: 0,
        };
        let rec = IndexRecord {
            meta: meta.clone(),
            generation: generation.clone(),
            snapshot: None,
        };
        if !self.store.create_index(&rec)? {
            return Err(Error::AlreadyExists {
                what: "index",
                name: new.name.to_string(),
            });
        }
        let applied = match link {
            Some((cluster_uid, _)) => {
                self.store.link_replica(meta.uid, cluster_uid)?;
                self.store.applied(meta.uid)?
            }
            None => None,
        };
        self.store.flush().await?;
        let gen = Generation::empty(
            engine,
            &self.memory,
            meta.metric,
            meta.dimension,
            generation,
        );
        let handle = IndexHandle::start(
            meta,
            gen,
            Counts::default(),
            HandleStart {
                snapshot_mark: 0,
                store: self.store.clone(),
                options: &self.writes,
                applied,
                tasks: &self.tasks,
            },
        );
        self.indexes
            .write()
            .insert(new.name.clone(), handle.clone());
        self.added.notify_waiters();
        tracing::info!(index = %new.name, dimension = new.dimension, metric = %new.metric, "created index");
        Ok(Self::view(&handle))
    }

    /// Installs a cluster replica's copy from a peer (`cluster/catchup.rs`) in place of
    /// `old`: the points the catch-up staged under `staged_uid` ([`Store::stage_points`],
    /// `point_count` of them) holding the index's write log up to `applied.sequence`. Builds
    /// their graph (off the async runtime, with `old`'s generation settings), then under the
    /// old replica's writer lock switches the store's record to the staged uid in one
    /// transaction ([`Store::switch_replica`], flushed: the commit point), swaps the new handle
    /// in and retires the old one (its tasks end, its data is removed). Until the switch,
    /// nothing of the copy is visible; a crash before it leaves an orphan uid swept at start.
    pub async fn replace_replica(
        &self,
        old: &Arc<IndexHandle>,
        staged_uid: u64,
        point_count: u64,
        points_changed: u64,
        applied: crate::store::Applied,
        graph: Option<PeerGraph>,
    ) -> Result<(Arc<IndexHandle>, bool)> {
        let name = old.meta.name.clone();
        let mut meta = old.meta.clone();
        meta.uid = staged_uid;
        let mut generation = old.active().meta.clone();
        generation.point_count = point_count;
        let counts = Counts {
            // Past the old replica's: versions (harnesses' ground truth) never repeat.
            data_version: old.data_version() + 1,
            point_count,
            // The peer's (the same on every node at the same sequence: refresh policies'
            // ON_APPEND counts compare it across nodes); a peer that sends none, the copy's.
            points_changed: points_changed.max(point_count),
        };
        let (store, memory, halt) = (self.store.clone(), self.memory.clone(), self.stop.clone());
        let (kind, m, gm) = (old.engine, meta.clone(), generation.clone());
        let (gen, from_peer) = tokio::task::spawn_blocking(move || -> Result<(Generation, bool)> {
            let points = store.load_points(staged_uid)?;
            if points.len() as u64 != point_count {
                return Err(Error::Unavailable(format!(
                    "the copy of index {} holds {} points, {point_count} expected",
                    m.name,
                    points.len()
                )));
            }
            if let Some(g) = graph {
                let loaded = g.load(kind, &memory, (m.metric, m.dimension), &gm, &points);
                if let Err(e) = std::fs::remove_file(&g.path) {
                    tracing::debug!(file = %g.path.display(), error = %e, "removing the peer's graph file (swept at the next start)");
                }
                match loaded {
                    Ok(gen) => return Ok((gen, true)),
                    Err(e) => {
                        tracing::warn!(index = %m.name, error = %e, "cannot use the peer's graph: building one from the copy")
                    }
                }
            }
            let gen = Generation::build(kind, &memory, m.metric, m.dimension, gm, points, &|| {
                halt.is_cancelled()
            })?;
            Ok((gen, false))
        })
        .await??;
        gen.mark(counts.data_version);
        let rec = IndexRecord {
            meta: meta.clone(),
            generation,
            snapshot: None,
        };
        let _ddl = self.ddl.lock().await;
        if !self
            .indexes
            .read()
            .get(&name)
            .is_some_and(|h| Arc::ptr_eq(h, old))
        {
            return Err(Error::Unavailable(format!(
                "index {name} changed while its copy was fetched: not installed"
            )));
        }
        let w = old.writer.lock().await;
        old.check_live()?;
        {
            let store = self.store.clone();
            let (rec, old_uid) = (rec.clone(), old.meta.uid);
            tokio::task::spawn_blocking(move || {
                store.switch_replica(&rec, old_uid, counts, applied)
            })
            .await??;
        }
        self.store.flush().await?;
        old.deleted.store(true, Ordering::Release);
        drop(w);
        let handle = IndexHandle::start(
            meta,
            gen,
            counts,
            HandleStart {
                snapshot_mark: 0,
                store: self.store.clone(),
                options: &self.writes,
                applied: Some(applied),
                tasks: &self.tasks,
            },
        );
        self.indexes.write().insert(name.clone(), handle.clone());
        self.added.notify_waiters();
        old.snap_poke.notify_one();
        handle.request_snapshot("the replica was copied from a peer");
        let (store, old_uid) = (self.store.clone(), old.meta.uid);
        tokio::task::spawn_blocking(move || -> Result<()> {
            store.remove_uid_data(old_uid)?;
            snapshots::remove_all(&store, old_uid);
            Ok(())
        })
        .await??;
        let graph = if from_peer {
            "the peer's, loaded"
        } else {
            "built here"
        };
        tracing::info!(index = %name, points = point_count, sequence = applied.sequence, graph, "installed the replica copied from a peer");
        Ok((handle, from_peer))
    }

    pub fn get_index(&self, name: &Name) -> Result<IndexView> {
        let h = self.handle(name)?;
        Ok(Self::view(&h))
    }

    /// Indexes in name order after `after`, at most `limit`.
    pub fn list_indexes(&self, after: Option<&Name>, limit: usize) -> Vec<IndexView> {
        let map = self.indexes.read();
        let iter: Box<dyn Iterator<Item = &Arc<IndexHandle>>> = match after {
            Some(a) => Box::new(
                map.range::<Name, _>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))
                    .map(|(_, h)| h),
            ),
            None => Box::new(map.values()),
        };
        iter.take(limit).map(|h| Self::view(h)).collect()
    }

    pub fn index_names(&self) -> Vec<Name> {
        self.indexes.read().keys().cloned().collect()
    }

    /// Deletes the index with its points, harnesses, trials and promotions.
    pub async fn delete_index(&self, name: &Name) -> Result<()> {
        self.delete_index_uid(name, None).await
    }

    /// [`delete_index`](Self::delete_index) of the index with `uid` only (NOT_FOUND when the
    /// name is another index's by now).
    pub async fn delete_index_uid(&self, name: &Name, uid: impl Into<Option<u64>>) -> Result<()> {
        let _ddl = self.ddl.lock().await;
        let handle = self.handle(name)?;
        if uid.into().is_some_and(|u| u != handle.meta.uid) {
            return Err(Error::not_found("index", name.as_str()));
        }
        let _w = handle.writer.lock().await;
        handle.deleted.store(true, Ordering::Release);
        let store = self.store.clone();
        let (n, uid) = (name.to_string(), handle.meta.uid);
        let res = tokio::task::spawn_blocking(move || store.delete_index(&n, uid)).await?;
        if let Err(e) = res {
            handle.deleted.store(false, Ordering::Release);
            return Err(e);
        }
        self.indexes.write().remove(name);
        // Its snapshotter sees the index is gone and ends.
        handle.snap_poke.notify_one();
        self.store.flush().await?;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || snapshots::remove_all(&store, uid)).await?;
        tracing::info!(index = %name, "deleted index");
        Ok(())
    }

    /// Adds or replaces points, all or nothing. Vectors are checked (and normalised for cosine)
    /// before anything changes; within a request the last point of an id wins.
    pub async fn upsert(self: &Arc<Self>, name: &Name, points: Vec<Point>) -> Result<(u64, u64)> {
        let (handle, unique) = self.prepare_upsert(name, points)?;
        let upserted = unique.len() as u64;
        let outcome = Self::submit(&handle, Op::Upsert(unique)).await?;
        debug_assert_eq!(outcome.affected, upserted);
        handle.wrote();
        self.maybe_compact(name, &handle);
        Ok((upserted, outcome.point_count))
    }

    /// Checks an upsert's points (and normalises them for cosine) without writing anything:
    /// the index's handle and the points unique by id (the last of an id wins, as if they
    /// were upserted one by one).
    pub fn prepare_upsert(
        &self,
        name: &Name,
        mut points: Vec<Point>,
    ) -> Result<(Arc<IndexHandle>, Vec<Point>)> {
        if points.is_empty() {
            return Err(Error::invalid("points is empty: send at least one point"));
        }
        let handle = self.handle(name)?;
        for (i, p) in points.iter_mut().enumerate() {
            handle.prepare_vector(&format!("points[{i}] (id {})", p.id), &mut p.vector)?;
        }
        let mut seen = std::collections::HashSet::with_capacity(points.len());
        let mut unique: Vec<Point> = points
            .into_iter()
            .rev()
            .filter(|p| seen.insert(p.id))
            .collect();
        unique.reverse();
        Ok((handle, unique))
    }

    /// Queues a write taken from the cluster's write log at `seq` for the replica's committer,
    /// waiting for room in the queue (the log is the backlog, nothing is refused); the answer
    /// comes once the write and the applied sequence are durable and searchable. Writes must
    /// be queued in log order.
    pub async fn queue_logged(
        &self,
        handle: &Arc<IndexHandle>,
        op: Op,
        seq: u64,
    ) -> Result<oneshot::Receiver<Result<OpOutcome>>> {
        handle.check_live()?;
        let (reply, answer) = oneshot::channel();
        handle
            .queue
            .send(Pending {
                op,
                logged: Some(seq),
                reply,
            })
            .await
            .map_err(|_| {
                Error::Unavailable(
                    "the index's writes have stopped: the server is stopping after a storage \
                     failure"
                        .into(),
                )
            })?;
        Ok(answer)
    }

    /// What follows an acknowledged write to an index (a background snapshot, compaction),
    /// for writes applied from the cluster's log.
    pub fn after_logged_write(self: &Arc<Self>, handle: &Arc<IndexHandle>) {
        handle.wrote();
        self.maybe_compact(&handle.meta.name, handle);
    }

    /// Removes points; unknown ids are ignored. Returns (deleted, point count).
    pub async fn delete_points(self: &Arc<Self>, name: &Name, ids: Vec<u64>) -> Result<(u64, u64)> {
        if ids.is_empty() {
            return Err(Error::invalid("ids is empty: send at least one id"));
        }
        let handle = self.handle(name)?;
        let outcome = Self::submit(&handle, Op::Delete(ids)).await?;
        if outcome.affected > 0 {
            handle.wrote();
            self.maybe_compact(name, &handle);
        }
        Ok((outcome.affected, outcome.point_count))
    }

    /// Queues a write for the index's committer and waits until a flush covers it.
    /// RESOURCE_EXHAUSTED at once when the queue is full.
    async fn submit(handle: &IndexHandle, op: Op) -> Result<OpOutcome> {
        handle.check_live()?;
        let (reply, answer) = oneshot::channel();
        match handle.queue.try_send(Pending {
            op,
            logged: None,
            reply,
        }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                return Err(Error::Limit(format!(
                    "index {:?} already has {} writes waiting to be committed \
                     (--max-pending-writes): retry with backoff",
                    handle.meta.name.as_str(),
                    handle.max_pending
                )))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                return Err(Error::Unavailable(
                    "the index's writes have stopped: the server is stopping after a storage \
                     failure; the write was not applied"
                        .into(),
                ))
            }
        }
        // Dropped unanswered only when the committer stopped at a storage failure before
        // taking this write.
        answer.await.map_err(|_| {
            Error::Unavailable(
                "the server is stopping after a storage failure; the write was not applied".into(),
            )
        })?
    }

    /// One stored point's vector, or NOT_FOUND.
    pub async fn get_point(&self, name: &Name, id: u64) -> Result<Vec<f32>> {
        let handle = self.handle(name)?;
        let store = self.store.clone();
        let uid = handle.meta.uid;
        tokio::task::spawn_blocking(move || store.get_point(uid, id))
            .await??
            .ok_or_else(|| Error::not_found("point", format!("{id} in index {name}")))
    }

    /// The k nearest points to one vector on the active generation, with its number (on the
    /// blocking pool, one search per core at a time).
    pub async fn search(
        &self,
        name: &Name,
        mut vector: Vec<f32>,
        params: &SearchParams,
    ) -> Result<(Vec<Hit>, u64)> {
        let handle = self.handle(name)?;
        handle.prepare_vector("vector", &mut vector)?;
        let gen = handle.active();
        let ef = params
            .ef_search
            .unwrap_or(gen.meta.config.ef_search as usize);
        let k = params.k;
        let number = gen.meta.number;
        let permit = self.search_permit().await?;
        let hits = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            gen.search(&vector, k, ef)
        })
        .await?;
        Ok((hits, number))
    }

    async fn search_permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit> {
        self.search_permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Internal("the search semaphore is closed".into()))
    }

    /// The k nearest points to each query, all on one generation, on the blocking pool (and
    /// every core). The work stops between chunks of queries once this future is dropped
    /// (the caller went away or its deadline passed: tonic drops the handler's future).
    pub async fn search_batch(
        &self,
        name: &Name,
        mut queries: Vec<Vec<f32>>,
        params: &SearchParams,
    ) -> Result<(Vec<Vec<Hit>>, u64)> {
        if queries.is_empty() {
            return Err(Error::invalid("queries is empty: send at least one query"));
        }
        let handle = self.handle(name)?;
        for (i, q) in queries.iter_mut().enumerate() {
            handle.prepare_vector(&format!("queries[{i}]"), q)?;
        }
        let gen = handle.active();
        let ef = params
            .ef_search
            .unwrap_or(gen.meta.config.ef_search as usize);
        let k = params.k;
        let number = gen.meta.number;
        let cancel = CancelOnDrop::default();
        let flag = cancel.0.clone();
        let permit = self.search_permit().await?;
        let results = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let mut out = Vec::with_capacity(queries.len());
            for chunk in queries.chunks(BATCH_CHUNK) {
                if flag.load(Ordering::Acquire) {
                    return None;
                }
                out.extend(
                    chunk
                        .par_iter()
                        .map(|q| gen.search(q, k, ef))
                        .collect::<Vec<_>>(),
                );
            }
            Some(out)
        })
        .await?;
        drop(cancel);
        let results = results.ok_or_else(|| Error::Cancelled("the batch was cancelled".into()))?;
        Ok((results, number))
    }

    /// The index's points and the data version they are at, read without the writer lock
    /// (the store's counts are checked around the scan; when writes keep racing it, falls back
    /// to [`Catalog::snapshot`]). For readers that must not hold up writes (the refresh probe).
    pub async fn snapshot_unlocked(
        &self,
        name: &Name,
    ) -> Result<(Arc<IndexHandle>, Vec<Point>, u64)> {
        let handle = self.handle(name)?;
        handle.check_live()?;
        let (store, uid) = (self.store.clone(), handle.meta.uid);
        match tokio::task::spawn_blocking(move || store.load_points_consistent(uid, 3)).await?? {
            Some((points, counts)) => {
                handle
                    .log_pin
                    .fetch_min(counts.data_version, Ordering::AcqRel);
                Ok((handle, points, counts.data_version))
            }
            None => self.snapshot(name).await,
        }
    }

    /// A cluster replica's points at one applied write-log sequence, for a peer's catch-up
    /// (`FetchIndexState`), copied into an unnamed temp file in the data dir (so a copy of a
    /// big index is not held in memory while it is sent, and the store is not read for as long
    /// as the transfer takes): read without the writer lock, the store's applied record checked
    /// around the scan; when logged writes keep racing it, read under the writer lock (the
    /// index's apply waits for the scan, not for the transfer). UNAVAILABLE when the replica
    /// has applied nothing yet, or the copy cannot be written (the data dir's disk is full).
    ///
    /// `with_graph`: also the graph (see [`GraphCopy`]) when the index's active generation has a
    /// snapshot whose change log since reaches the copy (else none, logged).
    pub async fn replica_state(
        &self,
        name: &Name,
        cluster_uid: u64,
        with_graph: bool,
    ) -> Result<ReplicaCopy> {
        let handle = self.handle(name)?;
        handle.check_live()?;
        if handle.cluster_uid != Some(cluster_uid) {
            return Err(Error::not_found(
                "index incarnation",
                format!("{name} (cluster uid {cluster_uid})"),
            ));
        }
        let (store, uid) = (self.store.clone(), handle.meta.uid);
        let dimension = handle.meta.dimension as usize;
        // The snapshot file is opened first: a later snapshot may replace (delete) it, and an
        // open file stays readable. Whether it still fits is checked after the copy.
        let snapshot = if with_graph {
            let (store, n) = (store.clone(), name.to_string());
            tokio::task::spawn_blocking(move || open_snapshot(&store, &n, uid)).await?
        } else {
            None
        };
        let file = CopyFile::create(store.dir())?;
        // One scan into `file`, checked against the applied record, up to `tries` times.
        // Under the writer lock no logged write can move the record: one try is enough.
        let copy = |mut file: CopyFile, tries: usize| {
            let store = store.clone();
            tokio::task::spawn_blocking(move || -> Result<_> {
                let cell = std::cell::RefCell::new(&mut file);
                let read = store.visit_points_at_applied(
                    uid,
                    dimension,
                    tries,
                    || cell.borrow_mut().restart(),
                    |id, v| cell.borrow_mut().push(id, v),
                )?;
                Ok((file, read))
            })
        };
        let (file, read) = copy(file, 3).await??;
        let (file, (count, applied, counts)) = match read {
            Some(read) => (file, read),
            None => {
                let _w = handle.writer.lock().await;
                handle.check_live()?;
                let (file, read) = copy(file, 1).await??;
                let read = read.ok_or_else(|| {
                    Error::Internal(format!("replica {name} has no applied record"))
                })?;
                (file, read)
            }
        };
        if applied.cluster_uid != cluster_uid {
            return Err(Error::not_found(
                "index incarnation",
                format!("{name} (cluster uid {cluster_uid})"),
            ));
        }
        if applied.sequence == 0 {
            return Err(Error::Unavailable(format!(
                "index {name} has applied nothing of its write log on this node yet"
            )));
        }
        let graph = match snapshot {
            Some(snap) => {
                let (store, upto, n) = (store.clone(), counts.data_version, name.to_string());
                tokio::task::spawn_blocking(move || graph_for_copy(&store, &n, uid, snap, upto))
                    .await?
            }
            None => None,
        };
        Ok(ReplicaCopy {
            points: file.finish(dimension)?,
            point_count: count,
            applied,
            points_changed: counts.points_changed,
            graph,
        })
    }

    /// The index's points and data version, read together (no write can fall between).
    pub async fn snapshot(&self, name: &Name) -> Result<(Arc<IndexHandle>, Vec<Point>, u64)> {
        let handle = self.handle(name)?;
        let _w = handle.writer.lock().await;
        handle.check_live()?;
        let store = self.store.clone();
        let uid = handle.meta.uid;
        let points = tokio::task::spawn_blocking(move || store.load_points(uid)).await??;
        let version = handle.data_version();
        handle.log_pin.fetch_min(version, Ordering::AcqRel);
        Ok((handle.clone(), points, version))
    }

    /// Builds a new generation of the index with `config` and swaps it in. Searches keep being
    /// served by the previous generation until the swap; writes made during the build are
    /// replayed into the new one.
    pub async fn rebuild(
        &self,
        name: &Name,
        config: HnswConfig,
        source: ConfigSource,
        profile: &str,
    ) -> Result<GenerationMeta> {
        self.build_and_swap(
            name,
            None,
            Graph::Build(config),
            source,
            profile,
            true,
            None,
        )
        .await
        .map(|(meta, _, _)| meta)
    }

    /// [`rebuild`](Self::rebuild) of the index with `uid` only: NOT_FOUND when the index of
    /// that name is gone or is another one created since (work that outlived its index never
    /// activates onto its successor). The build also stops when `cancel` is cancelled.
    pub async fn rebuild_for(
        &self,
        name: &Name,
        uid: u64,
        cancel: &tokio_util::sync::CancellationToken,
        config: HnswConfig,
        source: ConfigSource,
        profile: &str,
    ) -> Result<GenerationMeta> {
        let owner = Some((uid, cancel.clone()));
        self.build_and_swap(
            name,
            owner,
            Graph::Build(config),
            source,
            profile,
            true,
            None,
        )
        .await
        .map(|(meta, _, _)| meta)
    }

    /// [`rebuild_for`](Self::rebuild_for) with `trial`'s graph as the new generation instead
    /// of a build when it can be: it is of the index with `uid`, builds `config`, and the
    /// change log still holds every write since its data version (else, logged, a build).
    pub async fn adopt_for(
        &self,
        name: &Name,
        uid: u64,
        cancel: &tokio_util::sync::CancellationToken,
        config: HnswConfig,
        trial: TrialGraph,
        source: ConfigSource,
    ) -> Result<GenerationMeta> {
        let owner = Some((uid, cancel.clone()));
        let graph = Graph::Adopt(config, Box::new(trial));
        self.build_and_swap(name, owner, graph, source, "", true, None)
            .await
            .map(|(meta, _, _)| meta)
    }

    /// A cluster node's rollout of a desired generation: builds `config` (or, when `trial` is
    /// the graph this node holds for the index, adopts it) and swaps it in, like
    /// [`rebuild_for`](Self::rebuild_for). When `cancel` fires before the swap (the desired
    /// generation changed meanwhile), nothing is swapped in: CANCELLED.
    #[allow(clippy::too_many_arguments)] // what to build, for whom, and how it stops
    pub async fn activate_for(
        &self,
        name: &Name,
        uid: u64,
        cancel: &tokio_util::sync::CancellationToken,
        config: HnswConfig,
        source: ConfigSource,
        profile: &str,
        trial: Option<u64>,
    ) -> Result<GenerationMeta> {
        let held = trial.and_then(|id| self.take_held(name, id));
        let graph = match held {
            Some(t) => Graph::Adopt(config, Box::new(t)),
            None => Graph::Build(config),
        };
        let owner = Some((uid, cancel.clone()));
        self.build_and_swap(name, owner, graph, source, profile, true, None)
            .await
            .map(|(meta, _, _)| meta)
    }

    /// Keeps `trial`'s graph for a later activation of its promotion (see
    /// [`IndexHandle::held`]), replacing the one held before. Ignored when the index is gone
    /// or is another one.
    pub fn hold(&self, name: &Name, trial: TrialGraph) {
        if let Ok(h) = self.handle(name) {
            if h.meta.uid == trial.uid {
                *h.held.lock() = Some(trial);
            }
        }
    }

    /// Drops the graph held for the index (a job starts on it: the graph it holds is stale).
    pub fn drop_held(&self, name: &Name) {
        if let Ok(h) = self.handle(name) {
            h.held.lock().take();
        }
    }

    /// Takes the graph held for the index when it is trial `id`'s.
    fn take_held(&self, name: &Name, id: u64) -> Option<TrialGraph> {
        let h = self.handle(name).ok()?;
        let mut held = h.held.lock();
        if held.as_ref().is_some_and(|t| t.trial_id == id) {
            held.take()
        } else {
            None
        }
    }

    /// The trial whose graph is held for the index, if one is.
    pub fn held_trial(&self, name: &Name) -> Option<u64> {
        let h = self.handle(name).ok()?;
        let held = h.held.lock();
        held.as_ref().map(|t| t.trial_id)
    }

    /// Activation builds and trial-graph adoptions since start.
    pub fn activations(&self) -> &ActivationCounts {
        &self.activations
    }

    /// Rebuilds the index's active generation with its own config, source and profile, to drop
    /// its tombstones (see `compaction.rs`). None: skipped, as an activation holds the build
    /// lock or the deleted share is no longer past the threshold. CANCELLED when an activation
    /// arrived (or the server stops) while it built.
    pub(crate) async fn compact(
        &self,
        name: &Name,
        how: &Compaction,
    ) -> Result<Option<GenerationMeta>> {
        let handle = self.handle(name)?;
        let Ok(building) = handle.building.try_lock() else {
            return Ok(None);
        };
        let gen = handle.active();
        if handle.compaction.preempted()
            || deleted_fraction(gen.tombstones(), gen.live_count()) <= how.threshold
        {
            return Ok(None);
        }
        let m = gen.meta.clone();
        // Deletes that go on while it builds (a large delete in many calls passes the
        // threshold early) make it outdated: once half of the points it started with are gone
        // it stops, and the check after it starts one of what is left.
        let live_at_start = gen.live_count();
        drop(gen);
        let (h, stop) = (handle.clone(), how.stop.clone());
        let compacting = Compacting {
            building,
            cancelled: Arc::new(move || {
                h.compaction.preempted()
                    || stop.is_cancelled()
                    || h.active().live_count() < live_at_start / 2
            }),
        };
        let (meta, _, _) = self
            .build_and_swap(
                name,
                None,
                Graph::Build(m.config),
                m.source,
                &m.profile,
                true,
                Some(compacting),
            )
            .await?;
        Ok(Some(meta))
    }

    /// [`rebuild`](Self::rebuild); with `persist` false the swap is made in memory only and the
    /// index record to persist is returned for the caller to write (with others, atomically).
    /// With `compacting`, it is a compaction holding the build lock, which stops (CANCELLED)
    /// when told; otherwise it is an activation, which preempts compactions of the index until
    /// it returns.
    #[allow(clippy::too_many_arguments)] // one private seam: who owns the build, what it builds, how it stops
    async fn build_and_swap(
        &self,
        name: &Name,
        owner: Option<(u64, tokio_util::sync::CancellationToken)>,
        graph: Graph,
        source: ConfigSource,
        profile: &str,
        persist: bool,
        compacting: Option<Compacting<'_>>,
    ) -> Result<(GenerationMeta, IndexRecord, u64)> {
        let config = match &graph {
            Graph::Build(c) | Graph::Adopt(c, _) => *c,
        };
        let handle = self.handle(name)?;
        let (uid, cancel) = owner.unzip();
        let owner_cancel = cancel.clone();
        if uid.is_some_and(|u| u != handle.meta.uid) {
            return Err(Error::not_found("index", name.as_str()));
        }
        let (_activation, _building, cancelled) = match compacting {
            None => {
                let activation = handle.compaction.activation();
                let never: Cancelled = Arc::new(|| false);
                (Some(activation), handle.building.lock().await, never)
            }
            Some(c) => (None, c.building, c.cancelled),
        };
        // Shown by GetIndex until this build ends, however it ends.
        let progress = Arc::new(Progress::new(Phase::Load, Some(config), 0));
        let _shown = ShownBuild::new(&handle, progress.clone());
        // Snapshot the points (or, adopting a trial's graph, what changed since its points) and
        // start recording writes, atomically with respect to writes. `seq`, the write sequence
        // the points are at, is what the snapshot file will hold.
        let (input, seq, mark) = {
            let mut w = handle.writer.lock().await;
            handle.check_live()?;
            let store = self.store.clone();
            let uid = handle.meta.uid;
            let now = handle.data_version();
            let adopt = match graph {
                Graph::Adopt(_, t)
                    if t.uid == uid
                        && t.version <= now
                        && t.builds(&config)
                        && t.gen.kind == handle.engine =>
                {
                    let (st, after) = (store.clone(), t.version);
                    let caught = tokio::task::spawn_blocking(move || {
                        snapshots::catch_up(&st, uid, after, now)
                    })
                    .await?;
                    match caught {
                        Ok((upserts, deletes, writes)) => Some((t, upserts, deletes, writes)),
                        Err(e) => {
                            tracing::warn!(index = %name, trial = t.trial_id, error = %e, "cannot catch the trial's graph up with the writes since it was built: building the generation");
                            None
                        }
                    }
                }
                Graph::Adopt(_, t) => {
                    tracing::warn!(index = %name, trial = t.trial_id, "the trial's graph is not of this index's points or config: building the generation");
                    None
                }
                Graph::Build(_) => None,
            };
            let input = match adopt {
                Some(a) => Err(a),
                None => Ok(tokio::task::spawn_blocking(move || store.load_points(uid)).await??),
            };
            w.recording = Some(Vec::new());
            (input, now, handle.points_changed())
        };
        match &input {
            Ok(_) => tracing::info!(
                "building HNSW index={} m={} ef_construction={} ef_search={} seed={:?}",
                name,
                config.m,
                config.ef_construction,
                config.ef_search,
                config.seed
            ),
            Err((t, upserts, deletes, writes)) => tracing::info!(
                index = %name,
                trial = t.trial_id,
                config = %config,
                writes,
                upserts = upserts.len(),
                deletes = deletes.len(),
                "adopting the trial's graph: no build"
            ),
        }
        let meta = GenerationMeta {
            number: 0, // decided at the swap
            config,
            source,
            point_count: 0,
            build_millis: 0,
            activate_time_ms: 0,
            profile: profile.to_string(),
            trial_id: 0,
        };
        let (kind, metric, dim) = (handle.engine, handle.meta.metric, handle.meta.dimension);
        let memory = self.memory.clone();
        let halt = self.stop.clone();
        let pauses = self.pauses;
        let counts = &self.activations;
        match &input {
            Ok(_) => counts.builds.fetch_add(1, Ordering::Relaxed),
            Err(_) => counts.adopted.fetch_add(1, Ordering::Relaxed),
        };
        let p = progress.clone();
        let built = tokio::task::spawn_blocking(move || match input {
            Ok(points) => {
                let stop = || {
                    halt.is_cancelled()
                        || cancel.as_ref().is_some_and(|c| c.is_cancelled())
                        || cancelled()
                };
                let stop = pauses.paced(&stop);
                let gen =
                    Generation::build_tracked(kind, &memory, metric, dim, meta, points, &stop, &p)?;
                gen.mark(seq);
                Ok(gen)
            }
            Err((t, upserts, deletes, _)) => {
                // The trial's graph, caught up to `seq`, under the new generation's meta (its
                // build time is the trial's build: this activation built nothing).
                p.enter(Phase::Replay, 0);
                let mut gen = t.gen;
                snapshots::apply_catch_up(&gen, &upserts, &deletes);
                gen.mark(seq);
                gen.meta = GenerationMeta {
                    build_millis: gen.meta.build_millis,
                    trial_id: t.trial_id,
                    ..meta
                };
                Ok(gen)
            }
        })
        .await
        .map_err(Error::from)
        .and_then(|r| r)
        .map_err(|e| shutdown_or(&self.stop, e));
        // Saved before it is published (nothing else writes to it yet), off the runtime, under
        // the number it will get: builds of an index are serialised by `building`.
        let (gen, snapshot) = match built {
            Ok(gen) => {
                let store = self.store.clone();
                let (uid, number) = (handle.meta.uid, handle.active().meta.number + 1);
                progress.enter(Phase::Snapshot, 0);
                let pause = self.pauses.snapshot_write;
                let (gen, snapshot) = tokio::task::spawn_blocking(move || {
                    let snapshot = snapshots::save(&store, &gen, uid, number, seq, pause);
                    (gen, snapshot)
                })
                .await?;
                (Ok(gen), snapshot)
            }
            Err(e) => (Err(e), None),
        };
        let mut w = handle.writer.lock().await;
        let ops = w.recording.take().unwrap_or_default();
        let gen = gen?;
        // The owner gave the build up while it ran (its index was deleted, or a cluster
        // node's desired generation changed): nothing is swapped in.
        // (Its snapshot file, under a number no record names, is pruned like any unused one.)
        if handle.check_live().is_ok() && owner_cancel.as_ref().is_some_and(|c| c.is_cancelled()) {
            return Err(Error::Cancelled(format!(
                "the build of index {name:?} was abandoned before its swap"
            )));
        }
        if let Err(e) = handle.check_live() {
            drop(w);
            let store = self.store.clone();
            let uid = handle.meta.uid;
            tokio::task::spawn_blocking(move || snapshots::remove_all(&store, uid)).await?;
            return Err(e);
        }
        let replayed: usize = ops.iter().map(|(g, _)| g.len()).sum();
        progress.enter(Phase::Replay, 0);
        // Staged like the committer's writes: the indexer links them once the generation is
        // active (searches scan them until then), so the swap does not wait for their linking.
        let gen = tokio::task::spawn_blocking(move || {
            for (group, seq) in &ops {
                stage_writes(&gen, group);
                gen.mark(*seq);
            }
            gen
        })
        .await?;
        let mut gen = gen;
        gen.meta.number = handle.active().meta.number + 1;
        gen.meta.point_count = gen.live_count() as u64;
        gen.meta.activate_time_ms = now_millis();
        let rec = IndexRecord {
            meta: handle.meta.clone(),
            generation: gen.meta.clone(),
            snapshot,
        };
        if persist {
            self.store.put_index(&rec)?;
            self.store.flush().await?;
            self.recorded(&rec, seq).await;
        }
        let meta = gen.meta.clone();
        handle.active.store(Arc::new(gen));
        // The indexer moves to the new generation; the committer sees its fresh segment.
        handle.signals.wake.notify_one();
        handle.signals.room.notify_waiters();
        if rec.snapshot.is_some() {
            handle.snapshot_mark.store(mark, Ordering::Release);
        }
        if persist {
            // The record trimmed the change log: older trial graphs are rebuilt, not adopted.
            handle.log_pin.store(u64::MAX, Ordering::Release);
        }
        drop(w);
        tracing::info!(
            index = %name,
            generation = meta.number,
            points = meta.point_count,
            build_millis = meta.build_millis,
            replayed,
            "swapped in generation"
        );
        Ok((meta, rec, seq))
    }

    /// An ImportPoints stream into `name` ended with its last message committed: the index is
    /// snapshotted in the background if anything changed since its snapshot
    /// ([`snapshots::next_snapshot`], rule 3), so a restart after a bulk load loads it.
    pub fn import_ended(&self, name: &Name) {
        if let Ok(handle) = self.handle(name) {
            handle.request_snapshot("an import ended");
        }
    }

    /// After an index record is durable (the caller holds the index's writer lock): removes
    /// the snapshot files it made unused and trims the change log it covers.
    async fn recorded(&self, rec: &IndexRecord, seq: u64) {
        let (store, rec) = (self.store.clone(), rec.clone());
        if let Err(e) =
            tokio::task::spawn_blocking(move || snapshots::after_recorded(&store, &rec, seq)).await
        {
            tracing::warn!(error = %e, "cleaning up after a snapshot failed");
        }
    }

    // ---- profiles ----

    /// Creates or replaces a profile; every index it names must exist.
    pub async fn put_profile(&self, profile: Profile) -> Result<Profile> {
        let _ddl = self.ddl.lock().await;
        for pi in &profile.indexes {
            self.handle(&pi.index)?;
        }
        self.store.put_profile(profile.name.as_str(), &profile)?;
        self.store.flush().await?;
        Ok(profile)
    }

    pub fn get_profile(&self, name: &Name) -> Result<Profile> {
        self.store
            .get_profile(name.as_str())?
            .ok_or_else(|| Error::not_found("profile", name.as_str()))
    }

    pub fn list_profiles(&self, after: Option<&Name>, limit: usize) -> Result<Vec<Profile>> {
        self.store.list_profiles(after.map(|n| n.as_str()), limit)
    }

    pub async fn delete_profile(&self, name: &Name) -> Result<()> {
        let _ddl = self.ddl.lock().await;
        if !self.store.delete_profile(name.as_str())? {
            return Err(Error::not_found("profile", name.as_str()));
        }
        self.store.flush().await?;
        Ok(())
    }

    /// For every index of the profile, in order: builds a generation with the promoted config,
    /// else the profile entry's default, else the index's default, and swaps it in. A promoted
    /// config whose trial's graph is held (autotune without activate kept its winner's) is not
    /// built: that graph is adopted, caught up with the writes made since.
    pub async fn activate_profile(&self, name: &Name) -> Result<Vec<GenerationMeta>> {
        let profile = self.get_profile(name)?;
        // Every index must exist before anything is built.
        let mut plan = Vec::with_capacity(profile.indexes.len());
        let mut handles = Vec::with_capacity(profile.indexes.len());
        for pi in &profile.indexes {
            let handle = self.handle(&pi.index)?;
            handles.push(handle.clone());
            let default = pi.default_config.unwrap_or(handle.meta.default_config);
            let (config, source, trial) = match self.registry.get(&pi.index).await?.0 {
                Some(p) => (p.config, ConfigSource::Promoted, Some(p.trial_id)),
                None => (default, ConfigSource::Default, None),
            };
            plan.push((pi.index.clone(), config, source, trial));
        }
        // No compaction of these indexes runs until the profile is recorded: one would persist
        // an index's new generation before the rest of the profile's.
        let _activations: Vec<_> = handles.iter().map(|h| h.compaction.activation()).collect();
        // The new generations are swapped in one by one as they are built, but recorded all
        // at once at the end: a crash midway leaves every index on its previous generation
        // after restart, never a profile half-activated.
        let mut out = Vec::with_capacity(plan.len());
        let mut records = Vec::with_capacity(plan.len());
        let mut failed = None;
        for (index, config, source, trial) in plan {
            let held = trial.and_then(|id| self.take_held(&index, id));
            let graph = match held {
                Some(t) => Graph::Adopt(config, Box::new(t)),
                None => Graph::Build(config),
            };
            match self
                .build_and_swap(&index, None, graph, source, name.as_str(), false, None)
                .await
            {
                Ok((meta, rec, seq)) => {
                    out.push(meta);
                    records.push((rec, seq));
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        // On failure the generations already swapped in stay (as before) and are recorded too,
        // so what is served and what a restart brings back agree. Not at shutdown: nothing is
        // served any more, and recording none keeps the profile all-or-nothing after restart.
        if !(failed.is_some() && self.stop.is_cancelled()) {
            self.persist_generations(records).await?;
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Writes the index records of swapped-in generations in one atomic batch, skipping an
    /// index deleted meanwhile or one that has since swapped in a newer generation.
    async fn persist_generations(&self, records: Vec<(IndexRecord, u64)>) -> Result<()> {
        // Locked in name order, so two activations never wait on each other in a cycle.
        let mut records = records;
        records.sort_by(|a, b| a.0.meta.name.as_str().cmp(b.0.meta.name.as_str()));
        let handles: Vec<_> = records
            .into_iter()
            .filter_map(|rec| self.handle(&rec.0.meta.name).ok().map(|h| (h, rec)))
            .collect();
        let mut guards = Vec::with_capacity(handles.len());
        let mut current = Vec::with_capacity(handles.len());
        for (handle, (rec, seq)) in &handles {
            guards.push(handle.writer.lock().await);
            if handle.check_live().is_ok() && handle.active().meta.number == rec.generation.number {
                current.push((rec.clone(), *seq));
            }
        }
        let recs: Vec<IndexRecord> = current.iter().map(|(r, _)| r.clone()).collect();
        self.store.put_indexes(&recs)?;
        self.store.flush().await?;
        for (rec, seq) in &current {
            self.recorded(rec, *seq).await;
            if let Some((h, _)) = handles.iter().find(|(h, _)| h.meta.uid == rec.meta.uid) {
                h.log_pin.store(u64::MAX, Ordering::Release);
            }
        }
        drop(guards);
        Ok(())
    }
}

/// An index's build shown by GetIndex while this guard lives.
struct ShownBuild<'a>(&'a IndexHandle);

impl<'a> ShownBuild<'a> {
    fn new(handle: &'a IndexHandle, progress: Arc<Progress>) -> Self {
        *handle.build_progress.lock() = Some(progress);
        ShownBuild(handle)
    }
}

impl Drop for ShownBuild<'_> {
    fn drop(&mut self) {
        *self.0.build_progress.lock() = None;
    }
}

/// A build stopped by shutdown is UNAVAILABLE (retry elsewhere or later), not CANCELLED.
fn shutdown_or(stop: &tokio_util::sync::CancellationToken, e: Error) -> Error {
    match e {
        Error::Cancelled(_) if stop.is_cancelled() => Error::Unavailable(
            "the server is shutting down: the build stopped and nothing was recorded; the index keeps its previous generation".into(),
        ),
        e => e,
    }
}

/// After a background snapshot was skipped (a build runs, or an activation has not yet
/// recorded its generations), the snapshotter waits this long before it decides again.
const SKIPPED_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// An index's background snapshots, until the index is deleted or the server stops: decides
/// with [`snapshots::next_snapshot`] whenever a write, an import's end or a timer wakes it, and
/// runs one snapshot at a time ([`resnapshot`]). At shutdown it writes one more if the next
/// start would otherwise replay many points ([`snapshots::replay_calls_for_snapshot`]), then
/// ends. It holds the handle (so the shutdown snapshot still has it while the catalog is
/// dropped; the handle's committer ends after it) but the store only while it snapshots.
async fn snapshotter(
    h: Arc<IndexHandle>,
    poke: Arc<tokio::sync::Notify>,
    store: Weak<Store>,
    stop: tokio_util::sync::CancellationToken,
    idle: Option<std::time::Duration>,
    pause: Option<std::time::Duration>,
) {
    use std::time::{Duration, Instant};
    // The requests counted before the last snapshot that succeeded.
    let mut served = 0u64;
    // When the last background snapshot ended and how long it took.
    let mut last: Option<(Instant, Duration)> = None;
    let mut not_before: Option<Instant> = None;
    loop {
        let (wait, requests) = {
            if h.check_live().is_err() {
                return;
            }
            let requests = h.snap_requests.load(Ordering::Acquire);
            let state = snapshots::SnapshotState {
                changed: h
                    .points_changed()
                    .saturating_sub(h.snapshot_mark.load(Ordering::Acquire)),
                points: h.point_count(),
                requested: requests > served,
                since_write: h.last_write.lock().elapsed(),
                last: last.map(|(end, took)| (end.elapsed(), took)),
                idle,
            };
            let wait = h
                .active()
                .can_save()
                .then(|| snapshots::next_snapshot(state))
                .flatten()
                .map(|w| {
                    let held = not_before.map_or(Duration::ZERO, |t| {
                        t.saturating_duration_since(Instant::now())
                    });
                    w.max(held)
                });
            (wait, requests)
        };
        match wait {
            None => tokio::select! {
                _ = stop.cancelled() => break,
                _ = poke.notified() => continue,
            },
            Some(w) if !w.is_zero() => tokio::select! {
                _ = stop.cancelled() => break,
                _ = poke.notified() => continue,
                _ = tokio::time::sleep(w) => continue,
            },
            Some(_) => {}
        }
        let Some(st) = store.upgrade() else {
            return;
        };
        let started = Instant::now();
        let why = if requests > served {
            *h.snap_why.lock()
        } else if snapshots::resnapshot_due(
            h.points_changed()
                .saturating_sub(h.snapshot_mark.load(Ordering::Acquire)),
            h.point_count(),
        ) {
            "a quarter of the index changed"
        } else {
            "writes stopped"
        };
        match resnapshot(&st, &h, &stop, why, pause).await {
            Ok(true) => {
                served = requests;
                not_before = None;
            }
            Ok(false) => not_before = Some(Instant::now() + SKIPPED_RETRY),
            Err(e) => {
                tracing::warn!(index = %h.meta.name, error = %e, "background snapshot failed");
                not_before = Some(Instant::now() + snapshots::MIN_SPACING);
            }
        }
        last = Some((Instant::now(), started.elapsed()));
    }
    // Shutdown: the next start would replay what changed since the snapshot (not after a
    // storage failure: the server stops without writing).
    let Some(st) = store.upgrade() else {
        return;
    };
    let changed = h
        .points_changed()
        .saturating_sub(h.snapshot_mark.load(Ordering::Acquire));
    if !st.failed().is_cancelled()
        && h.check_live().is_ok()
        && h.active().can_save()
        && snapshots::replay_calls_for_snapshot(changed, h.point_count())
    {
        if let Err(e) = resnapshot(&st, &h, &stop, "the server is stopping", pause).await {
            tracing::warn!(index = %h.meta.name, error = %e, "snapshot at shutdown failed");
        }
    }
}

/// Snapshots the index's active generation as it is now and records it, so a start replays
/// only the writes after this. The generation's linked part is copied into memory while the
/// linker waits (writes wait only for the id map's copy, searches never wait) and written to
/// disk while nothing waits for it. Skipped (false)
/// when a build runs (it writes its own snapshot) or when the active generation is not yet the
/// recorded one (a profile activation records its generations together at its end). `why` is
/// logged.
async fn resnapshot(
    store: &Arc<Store>,
    handle: &Arc<IndexHandle>,
    stop: &tokio_util::sync::CancellationToken,
    why: &str,
    pause: Option<std::time::Duration>,
) -> Result<bool> {
    let Ok(_building) = handle.building.try_lock() else {
        return Ok(false);
    };
    let started = std::time::Instant::now();
    // The file holds only what the graph has linked: first let the indexer link the writes
    // that called for this snapshot (bounded: under a load that keeps the fresh segment full
    // it takes what is linked by then), so a start replays little. At shutdown the indexer
    // has stopped and no write comes any more: link what is left here (at most
    // --max-unindexed-points, within the grace period), so the next start replays nothing.
    let target = handle.data_version();
    let gen = handle.active();
    if stop.is_cancelled() && gen.unlinked() > 0 {
        let g = gen.clone();
        tokio::task::spawn_blocking(move || while g.link_pending(usize::MAX) > 0 {}).await?;
    }
    let deadline = tokio::time::Instant::now() + RESNAPSHOT_LINK_WAIT;
    while !stop.is_cancelled() {
        let room = handle.signals.room.notified();
        tokio::pin!(room);
        room.as_mut().enable();
        if gen.linked_seq() >= target || !Arc::ptr_eq(&gen, &handle.active()) {
            break;
        }
        tokio::select! {
            _ = room => {}
            _ = tokio::time::sleep_until(deadline) => break,
            _ = stop.cancelled() => return Ok(false),
        }
    }
    drop(gen);
    // `mark`: the changes the graph's linked part holds now, taken under the writer lock so
    // that the change count and the fresh segment agree. The encoding starts later and holds
    // at least those (the linker only adds), so the mark never claims more than the file has.
    // Writes do not wait for the encoding: it holds the linker off and copies the id map
    // first, so a write waits at most for that copy ([`Generation::snapshot_live`]).
    let (gen, mark, before) = {
        let _w = handle.writer.lock().await;
        handle.check_live()?;
        let gen = handle.active();
        let mark = handle.points_changed() - (gen.unlinked() as u64).min(handle.points_changed());
        (gen, mark, handle.snapshot_mark.load(Ordering::Acquire))
    };
    // `seq`: the write sequence the graph's linked part holds (points still in the fresh
    // segment are left out of the file and stay in the change log). The linker waits only
    // while the links are copied (`linker_waited`), not while the file is written.
    let uid = handle.meta.uid;
    let (g, dir) = (gen.clone(), crate::index::snapshot::dir(store.dir()));
    let (seq, file, linker_waited) = tokio::task::spawn_blocking(move || {
        let number = g.meta.number;
        g.snapshot_live(
            &dir,
            uid,
            |seq| crate::index::snapshot::file_name(uid, number, seq),
            pause,
        )
    })
    .await??;
    let _w = handle.writer.lock().await;
    let recorded = store.get_index(handle.meta.name.as_str())?;
    let current = handle.check_live().is_ok()
        && Arc::ptr_eq(&handle.active(), &gen)
        && recorded
            .as_ref()
            .is_some_and(|r| r.meta.uid == uid && r.generation.number == gen.meta.number);
    let Some(mut rec) = recorded.filter(|_| current) else {
        let path = crate::index::snapshot::dir(store.dir()).join(&file);
        let _ = std::fs::remove_file(path);
        return Ok(false);
    };
    rec.snapshot = Some(crate::store::SnapshotRef {
        file: file.clone(),
        seq,
    });
    store.put_index(&rec)?;
    store.flush().await?;
    handle.snapshot_mark.store(mark, Ordering::Release);
    let st = store.clone();
    // Not past a version a trial built a graph at: an activation may still adopt it.
    let trim = seq.min(handle.log_pin.load(Ordering::Acquire));
    tokio::task::spawn_blocking(move || {
        snapshots::after_recorded(&st, &rec, trim);
        // What led here (an import, many writes) and the encoding left free memory behind.
        crate::index::native::release_free_memory();
    })
    .await?;
    tracing::info!(
        index = %handle.meta.name,
        file,
        points = mark.saturating_sub(before),
        why,
        millis = started.elapsed().as_millis() as u64,
        linker_waited_millis = linker_waited.as_millis() as u64,
        "snapshotted the active generation in the background"
    );
    Ok(true)
}

/// Sets its flag when dropped: the blocking half of a call sees that the call was abandoned.
#[derive(Default)]
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Applies writes to a generation in order (blocking): deletes and replaced points are
/// tombstoned at once, new points go to its fresh segment (the indexer links them).
fn stage_writes(gen: &Generation, ops: &[Op]) {
    for op in ops {
        match op {
            Op::Delete(ids) => gen.delete(ids),
            Op::Upsert(points) => gen.stage(points),
        }
    }
}

/// The same error for every caller of a failed group.
fn for_each_caller(e: &Error) -> Error {
    match e {
        Error::NotFound { what, name } => Error::NotFound {
            what,
            name: name.clone(),
        },
        Error::Unavailable(m) => Error::Unavailable(m.clone()),
        other => Error::Internal(format!("the write failed: {other}")),
    }
}

/// Waits until the index's active generation has room in its fresh segment (or the server
/// stops: then the queued writes are committed anyway, and replayed at the next start). False
/// when the handle is gone or the store has failed.
async fn wait_for_room(
    handle: &Weak<IndexHandle>,
    signals: &Signals,
    stop: &tokio_util::sync::CancellationToken,
    failed: &tokio_util::sync::CancellationToken,
) -> bool {
    loop {
        let room = signals.room.notified();
        tokio::pin!(room);
        room.as_mut().enable();
        let full = match handle.upgrade() {
            Some(h) => h.active().unlinked() >= h.max_unindexed,
            None => return false,
        };
        if !full || stop.is_cancelled() {
            return true;
        }
        tokio::select! {
            biased;
            _ = failed.cancelled() => return false,
            _ = stop.cancelled() => return true,
            _ = room => {}
        }
    }
}

/// An index's committer: takes every write queued (up to [`MAX_GROUP_ITEMS`]) once its fresh
/// segment has room, commits them as one group, answers, repeats. Ends when the handle is
/// gone or the store has failed.
async fn committer(
    handle: Weak<IndexHandle>,
    store: Arc<Store>,
    mut rx: mpsc::Receiver<Pending>,
    signals: Arc<Signals>,
    stop: tokio_util::sync::CancellationToken,
) {
    // The store is held only while a group commits: once the catalog is gone (shutdown), an idle
    // committer must not keep the data dir locked after the server has returned.
    let failed = store.failed().clone();
    let store = Arc::downgrade(&store);
    loop {
        let first = tokio::select! {
            biased;
            _ = failed.cancelled() => return,
            p = rx.recv() => match p {
                Some(p) => p,
                None => return,
            },
        };
        // While the fresh segment is full, nothing more is taken: the queue fills up and
        // further writes are refused at once.
        if !wait_for_room(&handle, &signals, &stop, &failed).await {
            let _ = first.reply.send(Err(Error::Unavailable(
                "the index is gone or the server is stopping; the write was not applied".into(),
            )));
            return;
        }
        let mut items = first.op.items();
        let mut group = vec![first];
        while items < MAX_GROUP_ITEMS {
            match rx.try_recv() {
                Ok(p) => {
                    items += p.op.items();
                    group.push(p);
                }
                Err(_) => break,
            }
        }
        let Some(h) = handle.upgrade() else { return };
        let Some(store) = store.upgrade() else { return };
        commit_group(&h, &store, group).await;
        signals.wake.notify_one();
    }
}

/// An index's indexer: links the active generation's fresh points into its graph, a batch at
/// a time on the blocking pool, and tells the committer there is room. Ends at shutdown, when
/// the handle is gone, or at a storage failure.
async fn indexer(
    handle: Weak<IndexHandle>,
    store: Weak<Store>,
    signals: Arc<Signals>,
    stop: tokio_util::sync::CancellationToken,
    hold: Option<IndexerHold>,
) {
    let failed = match store.upgrade() {
        Some(s) => s.failed().clone(),
        None => return,
    };
    loop {
        let wake = signals.wake.notified();
        tokio::pin!(wake);
        wake.as_mut().enable();
        let Some(gen) = handle.upgrade().map(|h| h.active()) else {
            return;
        };
        if stop.is_cancelled() || failed.is_cancelled() {
            return;
        }
        if gen.unlinked() == 0 {
            drop(gen);
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = failed.cancelled() => return,
                _ = wake => continue,
            }
        }
        if let Some(hold) = &hold {
            hold.wait(&stop).await;
            if stop.is_cancelled() {
                return;
            }
        }
        let linked = tokio::task::spawn_blocking(move || gen.link_pending(LINK_BATCH)).await;
        signals.room.notify_waiters();
        if let Err(e) = linked {
            // The store has the writes and the graph may not: crash rather than diverge.
            if let Some(store) = store.upgrade() {
                store.fail_with(format!("linking points into the graph failed: {e}"));
            }
            return;
        }
    }
}

/// One group commit (see the module's invariants).
async fn commit_group(h: &IndexHandle, store: &Arc<Store>, group: Vec<Pending>) {
    let logged = group.iter().filter_map(|p| p.logged).max();
    let (ops, replies): (Vec<Op>, Vec<_>) = group.into_iter().map(|p| (p.op, p.reply)).unzip();
    let fail_all = |replies: Vec<oneshot::Sender<Result<OpOutcome>>>, e: &Error| {
        for r in replies {
            let _ = r.send(Err(for_each_caller(e)));
        }
    };
    let mut w = h.writer.lock().await;
    if let Err(e) = h.check_live() {
        return fail_all(replies, &e);
    }
    let ops = Arc::new(ops);
    let applied = {
        let (st, ops, uid) = (store.clone(), ops.clone(), h.meta.uid);
        let applied =
            logged
                .zip(h.cluster_uid)
                .map(|(sequence, cluster_uid)| crate::store::Applied {
                    cluster_uid,
                    sequence,
                });
        tokio::task::spawn_blocking(move || st.apply_writes_logged(uid, &ops, applied))
            .await
            .map_err(Error::from)
            .and_then(|r| r)
    };
    let (outcomes, counts) = match applied {
        Ok(x) => x,
        Err(e) => return fail_all(replies, &e),
    };
    // One flush for the whole group. A failure here is fatal (the store fires `failed`).
    if let Err(e) = store.flush().await {
        return fail_all(replies, &e);
    }
    // Searchable from here on (the fresh segment); linked into the graph by the indexer.
    let graph = {
        let (gen, ops, seq) = (h.active(), ops.clone(), counts.data_version);
        tokio::task::spawn_blocking(move || {
            stage_writes(&gen, &ops);
            gen.mark(seq);
        })
        .await
    };
    if let Err(e) = graph {
        // The store has the writes and the graph may not: crash rather than diverge.
        let e = store.fail_with(format!("applying writes to the graph failed: {e}"));
        return fail_all(replies, &e);
    }
    if let Some(rec) = w.recording.as_mut() {
        rec.push((
            Arc::try_unwrap(ops).unwrap_or_else(|a| (*a).clone()),
            counts.data_version,
        ));
    }
    h.set_counts(counts);
    drop(w);
    for (r, o) in replies.into_iter().zip(outcomes) {
        let _ = r.send(Ok(o));
    }
}

/// A replica's points at one applied write-log sequence ([`Catalog::replica_state`]).
pub struct ReplicaCopy {
    /// The points, read back in chunks.
    pub points: CopyReader,
    pub point_count: u64,
    pub applied: crate::store::Applied,
    /// The index's `points_changed` at `applied`.
    pub points_changed: u64,
    /// With `with_graph`, when there is one that fits.
    pub graph: Option<GraphCopy>,
}

/// A replica's graph for a peer: its active generation's snapshot file (written at write
/// number `seq`) and the ids written between it and the copy. That graph with those ids
/// upserted from the copy (deleted when the copy lacks them) is the copy's graph.
pub struct GraphCopy {
    pub file: std::fs::File,
    pub size: u64,
    pub seq: u64,
    /// The sender's local uid (the file's header names it).
    pub source_uid: u64,
    pub config: HnswConfig,
    pub touched: Vec<u64>,
}

/// A peer's graph received for a replica's copy ([`GraphCopy`] on the peer), in a temp file of
/// the snapshot directory (named for the staged uid: swept at start if a crash leaves it).
pub struct PeerGraph {
    pub path: std::path::PathBuf,
    pub seq: u64,
    pub source_uid: u64,
    pub config: HnswConfig,
    pub touched: Vec<u64>,
}

impl PeerGraph {
    /// The copy's graph: the peer's snapshot with the touched ids upserted from the copy's
    /// `points` (in id order), or deleted when the copy lacks them. Errors when the file is
    /// not a snapshot this node can load (another engine, config, format, a checksum) or the
    /// result's live points are not the copy's. Blocking.
    fn load(
        &self,
        kind: EngineKind,
        memory: &EngineMemory,
        (metric, dimension): (Metric, u32),
        generation: &GenerationMeta,
        points: &[Point],
    ) -> Result<Generation> {
        if self.config != generation.config {
            return Err(Error::Precondition(format!(
                "the peer's graph has config {}, this node serves {}",
                self.config, generation.config
            )));
        }
        let mut gen = Generation::load(
            &self.path,
            self.source_uid,
            self.seq,
            metric,
            dimension,
            kind,
            memory,
        )?;
        if gen.meta.config != generation.config {
            return Err(Error::Corrupt(format!(
                "the peer's snapshot holds config {}, it announced {}",
                gen.meta.config, self.config
            )));
        }
        gen.meta = generation.clone();
        let mut upserts = Vec::new();
        let mut deletes = Vec::new();
        for id in &self.touched {
            match points.binary_search_by_key(id, |p| p.id) {
                Ok(i) => upserts.push(points[i].clone()),
                Err(_) => deletes.push(*id),
            }
        }
        snapshots::apply_catch_up(&gen, &upserts, &deletes);
        let live = gen.live_count() as u64;
        if live != points.len() as u64 {
            return Err(Error::Corrupt(format!(
                "the peer's graph holds {live} live points after its {} writes since, the copy {}",
                self.touched.len(),
                points.len()
            )));
        }
        Ok(gen)
    }
}

/// The graph of a copy at write number `upto`: `snap` (opened before the copy) with the ids
/// its change log says were written since. A snapshot recorded meanwhile trims that log: then
/// the newer snapshot is used if it is not past the copy (a few tries), else none (logged).
/// Blocking.
fn graph_for_copy(
    store: &Store,
    name: &str,
    uid: u64,
    mut snap: GraphCopy,
    upto: u64,
) -> Option<GraphCopy> {
    for _ in 0..3 {
        if snap.seq > upto {
            break;
        }
        match snapshots::touched(store, uid, snap.seq, upto) {
            Ok(touched) => return Some(GraphCopy { touched, ..snap }),
            Err(_) => snap = open_snapshot(store, name, uid)?,
        }
    }
    tracing::info!(index = name, "the index's snapshot does not fit the copy (a newer one was written meanwhile): sending the points only");
    None
}

/// The index's recorded snapshot, opened (its `touched` empty): None (logged) when it has
/// none, or it cannot be opened. Blocking.
fn open_snapshot(store: &Store, name: &str, uid: u64) -> Option<GraphCopy> {
    let rec = match store.get_index(name) {
        Ok(Some(rec)) if rec.meta.uid == uid => rec,
        _ => return None,
    };
    let Some(snap) = rec.snapshot else {
        tracing::info!(
            index = name,
            "the index has no snapshot: sending the points only"
        );
        return None;
    };
    let path = crate::index::snapshot::dir(store.dir()).join(&snap.file);
    let opened = std::fs::File::open(&path).and_then(|f| Ok((f.metadata()?.len(), f)));
    match opened {
        Ok((size, file)) => Some(GraphCopy {
            file,
            size,
            seq: snap.seq,
            source_uid: uid,
            config: rec.generation.config,
            touched: Vec::new(),
        }),
        Err(e) => {
            tracing::info!(index = name, file = %path.display(), error = %e, "cannot open the index's snapshot: sending the points only");
            None
        }
    }
}

/// The file a replica's copy is written to: each point as its id (u64, little-endian) then
/// its vector's stored bytes (f32, little-endian). Unnamed (`tempfile::tempfile_in`: the
/// kernel frees it when it is closed, a crash leaves nothing to sweep).
struct CopyFile(std::io::BufWriter<std::fs::File>);

fn copy_failed(e: std::io::Error) -> Error {
    Error::Unavailable(format!(
        "writing a copy of the index for a peer failed: {e}"
    ))
}

impl CopyFile {
    fn create(dir: &std::path::Path) -> Result<Self> {
        let file = tempfile::tempfile_in(dir).map_err(copy_failed)?;
        Ok(Self(std::io::BufWriter::with_capacity(1 << 20, file)))
    }

    /// Empties the file (a read that raced a write starts again).
    fn restart(&mut self) -> Result<()> {
        use std::io::{Seek, Write};
        self.0.flush().map_err(copy_failed)?;
        let f = self.0.get_mut();
        f.set_len(0).map_err(copy_failed)?;
        f.rewind().map_err(copy_failed)?;
        Ok(())
    }

    fn push(&mut self, id: u64, vector: &[u8]) -> Result<()> {
        use std::io::Write;
        self.0.write_all(&id.to_le_bytes()).map_err(copy_failed)?;
        self.0.write_all(vector).map_err(copy_failed)
    }

    fn finish(self, dimension: usize) -> Result<CopyReader> {
        use std::io::Seek;
        let mut f = self
            .0
            .into_inner()
            .map_err(|e| copy_failed(e.into_error()))?;
        f.rewind().map_err(copy_failed)?;
        Ok(CopyReader {
            file: std::io::BufReader::with_capacity(1 << 20, f),
            dimension,
        })
    }
}

/// Reads a [`ReplicaCopy`]'s points back, a chunk at a time (blocking: call it off the async
/// runtime).
pub struct CopyReader {
    file: std::io::BufReader<std::fs::File>,
    dimension: usize,
}

impl CopyReader {
    /// The next at most `max` points (fewer only at the end of the copy).
    pub fn next_chunk(&mut self, max: usize) -> Result<Vec<Point>> {
        use std::io::Read;
        let mut out: Vec<Point> = Vec::with_capacity(max.min(1 << 16));
        let mut id = [0u8; 8];
        let mut bytes = vec![0u8; 4 * self.dimension];
        while out.len() < max {
            match self.file.read_exact(&mut id) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(copy_failed(e)),
            }
            self.file.read_exact(&mut bytes).map_err(copy_failed)?;
            out.push(Point {
                id: u64::from_le_bytes(id),
                vector: crate::store::decode_vector(&bytes)?,
            });
        }
        Ok(out)
    }

    /// The dimension of the copy's vectors.
    pub fn dimension(&self) -> usize {
        self.dimension
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(id: u64, x: f32) -> Point {
        Point {
            id,
            vector: vec![x, 0.0],
        }
    }

    /// Generation 1 of the default config.
    fn first_meta() -> GenerationMeta {
        GenerationMeta {
            number: 1,
            config: HnswConfig::default(),
            source: ConfigSource::Default,
            point_count: 0,
            build_millis: 0,
            activate_time_ms: 0,
            profile: String::new(),
            trial_id: 0,
        }
    }

    /// A peer's snapshot with the writes since applied from the copy holds the copy's points
    /// (each found by its own vector, a deleted one nowhere); one of another config, or whose
    /// count disagrees with the copy, is refused.
    #[test]
    fn a_peer_graph_with_the_writes_since_is_the_copy_graph() {
        let dir = tempfile::tempdir().unwrap();
        let meta = first_meta();
        let mem = &EngineMemory::IN_RAM;
        for kind in [EngineKind::DEFAULT, EngineKind::HnswRs] {
            let before: Vec<Point> = (0..50).map(|i| p(i, i as f32)).collect();
            let gen = Generation::build(kind, mem, Metric::L2, 2, meta.clone(), before, &|| false)
                .unwrap();
            if !gen.can_save() {
                continue;
            }
            let path = dir.path().join(format!("5-1-9-{kind}.snap"));
            gen.save(dir.path(), &format!("5-1-9-{kind}.snap"), 5, 9, None)
                .unwrap();
            // Since the snapshot: 3 deleted, 7 moved, 60 added; 3 and 60 never existed for
            // the other ids.
            let mut copy: Vec<Point> = (0..50)
                .filter(|i| *i != 3)
                .map(|i| p(i, if i == 7 { 700.0 } else { i as f32 }))
                .collect();
            copy.push(p(60, 600.0));
            let graph = PeerGraph {
                path,
                seq: 9,
                source_uid: 5,
                config: meta.config,
                touched: vec![3, 7, 60],
            };
            let got = graph
                .load(kind, mem, (Metric::L2, 2), &meta, &copy)
                .unwrap();
            assert_eq!(got.live_count(), copy.len(), "{kind}");
            for q in &copy {
                let hits = got.search(&q.vector, 1, 32);
                assert_eq!(
                    hits.first().map(|h| (h.id, h.distance)),
                    Some((q.id, 0.0)),
                    "{kind}"
                );
            }
            assert!(got.search(&[3.0, 0.0], 50, 64).iter().all(|h| h.id != 3));
            let other = PeerGraph {
                config: HnswConfig {
                    m: 8,
                    ..meta.config
                },
                ..graph
            };
            assert!(other
                .load(kind, mem, (Metric::L2, 2), &meta, &copy)
                .is_err());
            let short = PeerGraph {
                touched: vec![7, 60],
                config: meta.config,
                ..other
            };
            let mut fewer = copy.clone();
            fewer.retain(|q| q.id != 10);
            assert!(
                short
                    .load(kind, mem, (Metric::L2, 2), &meta, &fewer)
                    .is_err(),
                "{kind}: the graph holds a point the copy lacks"
            );
        }
    }

    /// A replica's copy file reads back what the last attempt wrote (an attempt that raced a
    /// write is void), in chunks of at most the size asked, and ends empty.
    #[test]
    fn a_copy_file_reads_back_the_last_attempt_in_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = |x: f32| [x.to_le_bytes(), 0f32.to_le_bytes()].concat();
        let mut f = CopyFile::create(dir.path()).unwrap();
        for id in 0..5 {
            f.push(id, &bytes(9.0)).unwrap();
        }
        f.restart().unwrap();
        for id in 10..15 {
            f.push(id, &bytes(id as f32)).unwrap();
        }
        let mut r = f.finish(2).unwrap();
        let a = r.next_chunk(3).unwrap();
        let b = r.next_chunk(3).unwrap();
        assert_eq!(a, vec![p(10, 10.0), p(11, 11.0), p(12, 12.0)]);
        assert_eq!(b, vec![p(13, 13.0), p(14, 14.0)]);
        assert!(r.next_chunk(3).unwrap().is_empty());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "the file has no name"
        );
    }

    /// A group's writes are searchable in arrival order as soon as they are staged (from the
    /// fresh segment) and answer the same once the indexer has linked them.
    #[test]
    fn a_group_reaches_the_graph_in_arrival_order() {
        let meta = first_meta();
        for kind in [EngineKind::DEFAULT, EngineKind::HnswRs] {
            let gen = Generation::empty(kind, &EngineMemory::IN_RAM, Metric::L2, 2, meta.clone());
            gen.upsert(&[p(7, 70.0), p(1, 5.0)]);
            let ops = vec![
                Op::Upsert(vec![p(1, 10.0)]),
                Op::Delete(vec![1]),
                Op::Upsert(vec![p(1, 20.0), p(2, 30.0)]),
                Op::Upsert(vec![p(2, 40.0)]),
                Op::Upsert(vec![p(3, 50.0)]),
                Op::Delete(vec![3, 9]),
            ];
            stage_writes(&gen, &ops);
            gen.mark(6);
            assert_eq!(gen.unlinked(), 5, "{kind}");
            assert_eq!(gen.linked_seq(), 0, "{kind}");
            let check = |linked: bool| {
                assert_eq!(gen.live_count(), 3, "{kind} linked {linked}");
                let first = |x: f32| {
                    gen.search(&[x, 0.0], 1, 16)
                        .first()
                        .map(|h| (h.id, h.distance))
                };
                // 1 holds its last vector (20), 2 its last (40); 3 was deleted after its upsert.
                assert_eq!(first(20.0), Some((1, 0.0)), "{kind} linked {linked}");
                assert_eq!(first(40.0), Some((2, 0.0)), "{kind} linked {linked}");
                assert_eq!(first(70.0), Some((7, 0.0)), "{kind} linked {linked}");
                let all = gen.search(&[50.0, 0.0], 10, 16);
                let mut ids: Vec<u64> = all.iter().map(|h| h.id).collect();
                ids.sort_unstable();
                assert_eq!(
                    ids,
                    vec![1, 2, 7],
                    "{kind} linked {linked}: each live id once"
                );
                // Nearest first, with the exact distances.
                assert!(all.windows(2).all(|w| w[0].distance <= w[1].distance));
                assert_eq!(all[0].distance, 10.0, "{kind} linked {linked}");
                assert!(gen
                    .search(&[5.0, 0.0], 3, 16)
                    .iter()
                    .all(|h| h.distance > 0.0));
            };
            check(false);
            while gen.link_pending(2) > 0 {}
            assert_eq!((gen.unlinked(), gen.linked_seq()), (0, 6), "{kind}");
            check(true);
        }
    }
}
