//! vectord's own HNSW engine, laid out like hnswlib: one flat array holding, per node, its
//! `2*M` level-0 link slots followed by its vector (as given, or as half floats or 8-bit codes
//! with the float vectors kept apart: [`Storage`]), so a candidate's links are read from next to
//! the vector its distance was just computed from. Unlike hnswlib's, the row holds no link count
//! and no 8-bit scale: those two are in a small array of their own (`memory::Segment::meta`), so
//! a row of a usual shape (128-d 8-bit codes and M 16: 256 bytes) is a whole number of cache
//! lines and a distance reads two lines of it instead of three. Upper-level links only for the
//! nodes that have upper levels, a lock per node for writers, and searches that take no lock
//! and allocate nothing but their answer (a per-thread visited bitset and reused heaps).
//!
//! # Growth
//! Storage comes in segments: the first holds the capacity the engine was created with, each
//! later one as much as all before it, so a node never moves and an id maps to its slot with one
//! comparison (first segment) or a division (later ones). Segments are created on first use
//! through a `OnceLock`, so inserts can grow the engine while searches run.
//!
//! # Concurrency
//! Inserts take `&self` and may run on many threads and alongside searches:
//! - a node's vector is written once, by the thread that claims its id (a second insert of the
//!   same id is ignored), before the id is stored into any link list or the entry point;
//! - link slots are atomics, stored with `Release` and loaded with `Acquire` (plain moves on
//!   x86-64), so a reader that sees an id in a link list also sees that node's vector and its
//!   upper-level link block. Writers of a node's list hold that node's lock; searches take none
//!   and at worst see a list mid-update (every slot they can see holds a fully inserted id or the
//!   empty marker), as in hnswlib;
//! - an insert writes its own lists at every level before it links any other node to it, so
//!   no search or insert ever reaches a node with unfinished lists. (hnswlib links level by
//!   level and makes inserts wait, under node locks, for a node still being inserted; linking
//!   level by level without waiting let a node published at level 1 but not yet linked at level
//!   0 become another insert's only level-0 neighbour, which its own linking could then drop:
//!   parallel builds of 2,500 16-d points lost about one point in 10,000 that way.) Each level's
//!   search reads only that level's links, so with one thread the graph is the same as linking
//!   level by level, and no insert ever waits for another except while one rewrites a list;
//! - a node's lock holds how many of its first level-0 links are *known*: chosen together by
//!   its last prune's neighbour heuristic (`hnsw::Native::link_back`). The next prune of the
//!   full list compares only pairs with at least one link that is not known, and keeps exactly
//!   what the full heuristic would (the distance between two known links was checked when they
//!   were chosen, and the links it kept are a fixpoint of it). Every writer of a level-0 list
//!   holds the lock and keeps the count true: appends go after the known links, a replaced
//!   slot lowers the count to its position, a new or loaded node starts at 0.
//!
//! # Determinism
//! A node's level is a hash of the config's seed and its internal id, so it does not depend on
//! insertion order or threads. With one thread, the same seed, ids and insertion order build the
//! same graph bit for bit. Parallel inserts build a graph of the same quality whose links depend
//! on thread timing, so they are not reproducible.
//!
//! # Memory
//! With [`Storage::Half`] and [`Storage::Int8`] a node's float vector is kept apart from its
//! links, read only to rank a search's last candidates exactly and while inserting. With an
//! [`EngineMemory`] that maps them ([`Native::with_memory`]), each segment keeps them in a
//! shared mapping of its own unlinked temp file (`memory::mapped_cells`), which the kernel may
//! write back and evict; the links and the vectors searches compare with stay in the process's
//! own memory.
//!
//! # Files
//! - [`memory`]: the raw memory (cell arrays on huge pages, segments, prefetch) and every
//!   `unsafe` block of the engine, with the invariants that make them sound;
//! - [`scratch`]: the per-thread buffers a search reuses (visited set, heaps, query forms);
//! - [`encoding`]: how a vector is kept next to its links (float, half float, 8-bit codes) and
//!   the distance a search computes to it;
//! - [`hnsw`]: the algorithm: levels, greedy descent, the layer search, neighbour selection,
//!   linking, and the [`Engine`] implementation;
//! - [`persist`]: the snapshot layout (save and load).
//!
//! This file holds the engine's layout: the node addressing (segments, strides) and the link
//! blocks every other file reads through.

mod encoding;
mod hnsw;
mod memory;
mod persist;
mod scratch;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU16, AtomicU32, AtomicUsize, Ordering as AtOrd};
use std::sync::OnceLock;

use parking_lot::{Mutex, RwLock};

#[cfg(doc)]
use super::engine::Engine;
use crate::index::engine::EngineMemory;
use crate::model::{HnswConfig, Metric};
pub use encoding::Storage;
pub use memory::release_free_memory;
use memory::Segment;

/// A node's link list at one level: its count (loaded with `Acquire`, stored after the slots
/// it counts with `Release`) and its slots.
type Block<'a> = Option<(&'a AtomicU32, &'a [AtomicU32])>;

/// The marker of an empty link slot.
const EMPTY: u32 = u32::MAX;
/// Levels above this are clamped (a level this high needs ~M^16 points).
const MAX_LEVEL: usize = 16;
/// Segments: the first of `base` nodes, segment k >= 1 of `base << (k - 1)`; 33 of them hold more
/// than `u32::MAX` nodes for any base >= 1.
const SEGMENTS: usize = 34;
/// The seed of the level generator when the config has none.
const DEFAULT_SEED: u64 = 0x0005_eed0_f7ec_70bd;

pub struct Native {
    metric: Metric,
    dim: usize,
    storage: Storage,
    /// Cells per node of the vector searches compare with (in its row of `Segment::level0`).
    cells: usize,
    /// Cells per node in `Segment::meta`: the level-0 link count, and the 8-bit codes' scale.
    meta: usize,
    /// How many neighbours ahead a beam search asks for their search vectors
    /// ([`hnsw::beam_lookahead`]).
    beam_lookahead: usize,
    /// Links per node above level 0, and the number of neighbours each insert selects.
    m: usize,
    /// Links per node at level 0.
    m0: usize,
    ef_construction: usize,
    /// The config's ef_search: the beam an insert checks an outlier is found with.
    ef_search: usize,
    /// 1 / ln(M): the level distribution's scale.
    level_mult: f64,
    seed: u64,
    /// Nodes in segment 0.
    base: usize,
    /// With the compact storages, the point their vectors are kept relative to: the mean of
    /// the first batch inserted (or the first vector, inserted alone). Codes scaled to each
    /// vector's largest component cannot tell apart vectors that share a large offset (every
    /// component 1000 +- 1, say); relative to a center inside the data they can.
    center: OnceLock<Box<[f32]>>,
    segments: Box<[OnceLock<Segment>]>,
    /// Where segments keep their float vectors (module docs, "Memory").
    memory: EngineMemory,
    /// Per segment, per node: how many level-0 lists link to it (saturating: a count that
    /// reaches `u16::MAX` stays there). Kept by every writer of a level-0 list (`hnsw`), so a
    /// prune can refuse to drop one of a node's last links (`hnsw::MIN_IN_LINKS`). Created
    /// with its segment, before any node of it is published.
    in_links: Box<[OnceLock<Box<[AtomicU16]>>]>,
    /// The entry point and the top level, None while empty.
    entry: RwLock<Option<(u32, usize)>>,
    /// Held by an insert whose node may become the new entry point.
    top_lock: Mutex<()>,
    /// Nodes fully inserted.
    count: AtomicUsize,
    /// Whether inserts keep every node findable (`hnsw`'s in-link floor and checks); false
    /// only in the measurement of what that costs.
    findable: bool,
    /// Whether a prune keeps a node's link from the first node of its own list
    /// (`hnsw::Native::pinned`); false only in the measurement of what that gives and costs.
    pins: bool,
    /// Whether a prune of a full level-0 list skips the distances between links already known
    /// to pass the neighbour heuristic together (`hnsw::Native::link_back`); false only in the
    /// test that it builds the same graph.
    known_links: bool,
    /// Whether 8-bit searches also rank exactly the candidates past the re-rank window that
    /// their codes cannot rule out (`hnsw::Native::rerank_uncertain`); false only in the
    /// measurement of what that costs.
    bounded_rerank: bool,
    /// Node slots in created segments.
    slots: AtomicUsize,
    /// Bytes of upper-level link blocks.
    upper_bytes: AtomicUsize,
    /// The nodes the findability checks covered last (`hnsw::Native::join_region`), oldest
    /// first. Not saved with a snapshot: a loaded graph starts with none.
    recent_checked: Mutex<std::collections::VecDeque<u32>>,
}

impl Native {
    pub fn new(metric: Metric, dimension: u32, config: &HnswConfig, capacity: usize) -> Self {
        Self::with_storage(metric, dimension, config, capacity, Storage::F32)
    }

    pub fn with_storage(
        metric: Metric,
        dimension: u32,
        config: &HnswConfig,
        capacity: usize,
        storage: Storage,
    ) -> Self {
        let m = (config.m as usize).max(2);
        let dim = dimension as usize;
        let cells = match storage {
            Storage::F32 => dim,
            Storage::Half => dim.div_ceil(2),
            // Four codes per cell (the scale is in the node's meta cells).
            Storage::Int8 => dim.div_ceil(4),
        };
        let meta = if storage == Storage::Int8 { 2 } else { 1 };
        Native {
            metric,
            dim,
            storage,
            cells,
            meta,
            beam_lookahead: hnsw::beam_lookahead(cells),
            m,
            m0: 2 * m,
            ef_construction: (config.ef_construction as usize).max(m),
            ef_search: (config.ef_search as usize).max(1),
            level_mult: 1.0 / (m as f64).ln(),
            seed: config.seed.unwrap_or(DEFAULT_SEED),
            base: capacity.max(1024),
            center: OnceLock::new(),
            segments: (0..SEGMENTS).map(|_| OnceLock::new()).collect(),
            memory: EngineMemory::IN_RAM,
            in_links: (0..SEGMENTS).map(|_| OnceLock::new()).collect(),
            entry: RwLock::new(None),
            top_lock: Mutex::new(()),
            count: AtomicUsize::new(0),
            findable: true,
            pins: true,
            known_links: true,
            bounded_rerank: true,
            slots: AtomicUsize::new(0),
            upper_bytes: AtomicUsize::new(0),
            recent_checked: Mutex::new(std::collections::VecDeque::new()),
        }
    }

    /// The engine keeping its float vectors where `memory` says (module docs, "Memory"); only
    /// before anything is inserted, as segments already created keep theirs where they are.
    pub fn with_memory(mut self, memory: EngineMemory) -> Self {
        self.memory = memory;
        self
    }

    /// The segment number and offset of node `id`.
    #[inline(always)]
    fn locate(&self, id: u32) -> (usize, usize) {
        let i = id as usize;
        if i < self.base {
            return (0, i);
        }
        let q = i / self.base; // >= 1
        let k = (usize::BITS - 1 - q.leading_zeros()) as usize; // floor(log2 q)
        (k + 1, i - (self.base << k))
    }

    /// The segment of a published node (always created before the node was published).
    #[inline(always)]
    fn node(&self, id: u32) -> Option<(&Segment, usize)> {
        let (s, off) = self.locate(id);
        self.segments.get(s)?.get().map(|seg| (seg, off))
    }

    /// The level-0 in-link counter of node `id` (created with its segment).
    #[inline(always)]
    fn in_links_of(&self, id: u32) -> Option<&AtomicU16> {
        let (s, off) = self.locate(id);
        self.in_links.get(s)?.get()?.get(off)
    }

    /// The segment of node `id`, created if needed.
    fn node_or_create(&self, id: u32) -> Option<(&Segment, usize)> {
        let (s, off) = self.locate(id);
        let len = if s == 0 {
            self.base
        } else {
            self.base << (s - 1)
        };
        self.in_links
            .get(s)?
            .get_or_init(|| (0..len).map(|_| AtomicU16::new(0)).collect());
        let seg = self.segments.get(s)?.get_or_init(|| {
            self.slots.fetch_add(len, AtOrd::Relaxed);
            Segment::new(
                len,
                self.cells,
                self.m0,
                self.meta,
                self.full_dim(),
                self.memory.map_dir(),
            )
        });
        Some((seg, off))
    }

    /// Cells per node in a segment's `full` (float vectors kept apart from the search vectors).
    #[inline(always)]
    fn full_dim(&self) -> usize {
        match self.storage {
            Storage::F32 => 0,
            Storage::Half | Storage::Int8 => self.dim,
        }
    }

    /// Cells per node in a segment's `level0`: the level-0 link slots, then the search vector.
    #[inline(always)]
    fn stride(&self) -> usize {
        self.m0 + self.cells
    }

    /// The link block (the count, and the slots) of a node at a level; None if it has none
    /// there.
    #[inline(always)]
    fn links(&self, id: u32, level: usize) -> Block<'_> {
        self.node(id)
            .and_then(|(seg, off)| self.links_in(seg, off, level))
    }

    /// Prefetches node `id`'s link block at `level` (its count and its slots).
    #[inline(always)]
    fn prefetch_links(&self, id: u32, level: usize) {
        if let Some((count, slots)) = self.links(id, level) {
            memory::prefetch(std::ptr::from_ref(count).cast());
            memory::prefetch_cells(slots);
        }
    }

    #[inline(always)]
    fn links_in<'a>(&self, seg: &'a Segment, off: usize, level: usize) -> Block<'a> {
        if level == 0 {
            let start = off * self.stride();
            Some((
                seg.meta.get(off * self.meta)?,
                seg.level0.get(start..start + self.m0)?,
            ))
        } else {
            let w = 1 + self.m;
            match seg.upper[off].get() {
                Some(block) if block.len() >= level * w => {
                    block[(level - 1) * w..level * w].split_first()
                }
                _ => None,
            }
        }
    }
}
