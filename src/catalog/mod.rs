//! The catalog: every index with its active generation, the profiles, and activation.
//!
//! Files: `mod.rs` (the catalog, each index's handle, recovery, create/list/delete, profiles),
//! `writes.rs` (the queue, the committer and the indexer), `search.rs`, `builds.rs` (activation,
//! adoption, compaction's build, background snapshots) and `replica.rs` (cluster replicas'
//! copies between peers).
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

use builds::{shutdown_or, snapshotter};
pub use replica::{CopyReader, GraphCopy, PeerGraph, ReplicaCopy};
use writes::{committer, indexer, stage_writes, Pending};

/// A flag a build polls between chunks of points.
type Cancelled = Arc<dyn Fn() -> bool + Send + Sync>;

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
    /// The findability check's counters (see `check.rs`).
    pub check: check::IndexCheck,
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
    /// `--check-findable`: the findability check runs (`check.rs`).
    check_found: bool,
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
            check: Default::default(),
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
            options.check_found,
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

    /// Points upserted and deleted since the active generation's last snapshot.
    fn changed_since_snapshot(&self) -> u64 {
        self.points_changed()
            .saturating_sub(self.snapshot_mark.load(Ordering::Acquire))
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
    /// The findability check's counters.
    pub check: check::CheckStats,
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
    /// `--check-findable`: each index's indexer runs the findability check when it has
    /// nothing to link (`check.rs`).
    pub check_found: bool,
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
            check_found: true,
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
            check_found,
        } = options;
        let writes = WriteOptions {
            snapshot_pause: test_pauses.snapshot_write,
            max_pending,
            max_unindexed,
            hold: indexer_hold,
            snapshot_idle,
            check_found,
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
            check: h.check.stats(),
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

mod builds;
pub(crate) mod check;
mod replica;
mod search;
#[cfg(test)]
mod tests;
mod writes;
