//! vectord's own HNSW engine, laid out like hnswlib: one flat array holding, per node, its
//! level-0 links (a count and `2*M` slots) followed by its vector (as given, or as half floats or
//! 8-bit codes with the float vectors kept apart: [`Storage`]), so a candidate's links are read
//! from next to the vector its distance was just computed from; upper-level links only
//! for the nodes that have upper levels, a lock per node for writers, and searches
//! that take no lock and allocate nothing but their answer (a per-thread visited bitset and
//! reused heaps).
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
//!   level by level, and no insert ever waits for another except while one rewrites a list.
//!
//! # Determinism
//! A node's level is a hash of the config's seed and its internal id, so it does not depend on
//! insertion order or threads. With one thread, the same seed, ids and insertion order build the
//! same graph bit for bit. Parallel inserts build a graph of the same quality whose links depend
//! on thread timing, so they are not reproducible.

use std::cell::RefCell;
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering as AtOrd};
use std::sync::OnceLock;

use parking_lot::{Mutex, RwLock};
use rayon::prelude::*;

use super::distance;
use super::engine::Engine;
use crate::model::{HnswConfig, Metric};

/// The marker of an empty link slot.
const EMPTY: u32 = u32::MAX;
/// Levels above this are clamped (a level this high needs ~M^16 points).
const MAX_LEVEL: usize = 16;
/// Segments: the first of `base` nodes, segment k >= 1 of `base << (k - 1)`; 33 of them hold more
/// than `u32::MAX` nodes for any base >= 1.
const SEGMENTS: usize = 34;
/// The seed of the level generator when the config has none.
const DEFAULT_SEED: u64 = 0x0005_eed0_f7ec_70bd;

/// A graph node's distance to the query, ordered by distance then id (so heaps are deterministic).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Cand {
    d: f32,
    id: u32,
}

impl Eq for Cand {}

impl Ord for Cand {
    fn cmp(&self, other: &Self) -> Ordering {
        self.d.total_cmp(&other.d).then(self.id.cmp(&other.id))
    }
}

impl PartialOrd for Cand {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// One segment of nodes.
struct Segment {
    /// Per node, `stride` cells laid out as hnswlib does: its level-0 link count, `m0` link
    /// slots, then the vector searches compare with (f32 bits, two halves per cell with
    /// [`Storage::Half`], or a scale and four codes per cell with [`Storage::Int8`]), so
    /// expanding a candidate reads its links from the same place its vector was just read from.
    /// A node's vector cells are written once, before the node is published (module docs).
    level0: Cells,
    /// With [`Storage::Half`] and [`Storage::Int8`], per node its `dim` float vector (f32 bits),
    /// for exact distances; empty otherwise. Written once, before the node is published.
    full: Cells,
    /// Per node, levels 1..=level of `(1 + m)` slots each; set before the node is published.
    upper: Box<[OnceLock<Box<[AtomicU32]>>]>,
    /// Held by whoever rewrites a node's link lists.
    locks: Box<[Mutex<()>]>,
    /// Set by the insert that owns the node's slot.
    claimed: Box<[AtomicBool]>,
}

impl Segment {
    fn new(len: usize, cells: usize, m0: usize, full_dim: usize) -> Self {
        let stride = 1 + m0 + cells;
        let level0 = huge_cells(len * stride, |i| {
            let k = i % stride;
            if k == 0 || k > m0 {
                0
            } else {
                EMPTY
            }
        });
        Segment {
            level0,
            full: huge_cells(len * full_dim, |_| 0),
            upper: (0..len).map(|_| OnceLock::new()).collect(),
            locks: (0..len).map(|_| Mutex::new(())).collect(),
            claimed: (0..len).map(|_| AtomicBool::new(false)).collect(),
        }
    }
}

/// A huge page (x86-64 Linux transparent huge pages).
const HUGE_PAGE: usize = 2 << 20;

/// A fixed array of cells that owns its memory: [`huge_cells`] lays large ones out on huge-page
/// boundaries, which a `Box<[AtomicU32]>` cannot free.
struct Cells {
    ptr: std::ptr::NonNull<AtomicU32>,
    len: usize,
    layout: std::alloc::Layout,
}

// SAFETY: `Cells` owns its allocation, like a `Box<[AtomicU32]>`, and `AtomicU32` is Send and
// Sync.
unsafe impl Send for Cells {}
unsafe impl Sync for Cells {}

impl std::ops::Deref for Cells {
    type Target = [AtomicU32];

    fn deref(&self) -> &[AtomicU32] {
        // SAFETY: `ptr` points to `len` initialised cells owned by `self` (or dangles, aligned,
        // with `len` 0).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Cells {
    fn drop(&mut self) {
        if self.layout.size() > 0 {
            // SAFETY: allocated in `huge_cells` with this layout; AtomicU32 needs no drop.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr().cast(), self.layout) }
        }
    }
}

/// `n` cells set by `init`. From 2 MiB up they start on a 2 MiB boundary and the kernel is asked
/// to back them with transparent huge pages (Linux): a search reads vectors at random places all
/// over the graph, and with 4 KiB pages nearly every one of those reads also misses the TLB.
/// Aligned, every whole 2 MiB of the array can be one huge page; unaligned, an array under 4 MiB
/// (the segments a graph filled by small upserts grows) usually holds no aligned 2 MiB at all.
fn huge_cells(n: usize, init: impl Fn(usize) -> u32) -> Cells {
    let bytes = n.saturating_mul(std::mem::size_of::<AtomicU32>());
    let huge = cfg!(target_os = "linux") && bytes >= HUGE_PAGE;
    let align = if huge {
        HUGE_PAGE
    } else {
        std::mem::align_of::<AtomicU32>()
    };
    let Ok(layout) = std::alloc::Layout::from_size_align(bytes, align) else {
        panic!("capacity overflow: {n} cells");
    };
    if bytes == 0 {
        return Cells {
            ptr: std::ptr::NonNull::dangling(),
            len: 0,
            layout,
        };
    }
    // SAFETY: the layout has a non-zero size.
    let raw = unsafe { std::alloc::alloc(layout) }.cast::<AtomicU32>();
    let Some(ptr) = std::ptr::NonNull::new(raw) else {
        std::alloc::handle_alloc_error(layout);
    };
    #[cfg(target_os = "linux")]
    if huge {
        // SAFETY: the range is this allocation's own (it starts on a page boundary, being
        // 2 MiB-aligned, and madvise takes whole pages: those wholly inside). MADV_HUGEPAGE is
        // advice about how to back it and changes none of its contents; failure (a kernel
        // without THP, or THP disabled) just leaves 4 KiB pages.
        unsafe {
            libc::madvise(
                ptr.as_ptr().cast(),
                bytes / 4096 * 4096,
                libc::MADV_HUGEPAGE,
            );
        }
    }
    for i in 0..n {
        // SAFETY: `i < n`, within the allocation; each cell is written once before any read.
        unsafe { ptr.as_ptr().add(i).write(AtomicU32::new(init(i))) };
    }
    Cells {
        ptr,
        len: n,
        layout,
    }
}

/// Prefetches every cache line of `cells`.
#[inline(always)]
fn prefetch_cells(cells: &[AtomicU32]) {
    for line in cache_lines(cells) {
        prefetch(line as *const f32);
    }
}

/// The addresses of the cache lines `cells` occupies: from the line holding the first cell to
/// the line holding the last. A slice that does not start on a line boundary spans one line
/// more than its length in lines, and a node's vector starts after its links, so most do not.
#[inline(always)]
fn cache_lines(cells: &[AtomicU32]) -> impl Iterator<Item = usize> {
    let first = cells.as_ptr() as usize & !63;
    let end = cells.last().map(|c| c as *const AtomicU32 as usize);
    (0..)
        .map(move |i| first + 64 * i)
        .take_while(move |&line| end.is_some_and(|end| line <= end))
}

/// How many of a search's candidates (nearest first by the compact vectors) the compact storages
/// rank again by exact distances, for `k` results: `max(2k, k + 10)`. Measured on the 30k
/// 384-d set at ef_search 40 and k 10: re-ranking all 40 or the nearest 20 gave the same
/// recall@10 with 8-bit vectors (0.9704, 0.9705) and half floats (0.9708, 0.9716); the nearest
/// 10 alone lost 0.004 with 8-bit vectors; and 20 instead of 40 cut the p50 by about a fifth.
fn rerank_count(k: usize) -> usize {
    (2 * k).max(k + 10)
}

/// A filtered search (past tombstones) that has expanded this many times `ef` nodes stops as
/// soon as it holds `k` live ones ([`Native::search_layer`]). A search of a graph without
/// tombstones expands about `ef` nodes, so this binds only when fewer than about one point in
/// EXPANSIONS_PER_EF near the query is live; measured with 90% of the points deleted it left
/// recall@10 at ef 64 unchanged (see docs/scale.md).
const EXPANSIONS_PER_EF: usize = 8;

/// How many neighbours ahead a search asks for whole vectors.
const LOOKAHEAD: usize = 2;

/// Per-thread search state, reused across searches (and engines).
#[derive(Default)]
struct Scratch {
    /// One bit per node: visited in this search. A bitset rather than a mark per node, because
    /// what a search pays for is cache misses: 30,000 nodes take 3.75 KiB of bits (60 cache
    /// lines) against 58 KiB of 16-bit epoch marks, and between two searches of a server the
    /// rest of the call (and other work on the core) cools the caches.
    bits: Vec<u64>,
    /// The words of `bits` this search set, cleared when the next one starts (so starting costs
    /// what the last search touched, not the size of the graph).
    dirty: Vec<u32>,
    candidates: BinaryHeap<Reverse<Cand>>,
    top: BinaryHeap<Cand>,
    /// The unvisited neighbours of the node being expanded.
    batch: Vec<u32>,
}

impl Scratch {
    fn start(&mut self, nodes: usize) {
        for &w in &self.dirty {
            if let Some(word) = self.bits.get_mut(w as usize) {
                *word = 0;
            }
        }
        self.dirty.clear();
        let words = nodes.div_ceil(64);
        if self.bits.len() < words {
            self.bits.resize(words, 0);
        }
        self.candidates.clear();
        self.top.clear();
    }

    /// Marks `id` visited; false if it already was in this search.
    #[inline]
    fn visit(&mut self, id: u32) -> bool {
        let w = (id >> 6) as usize;
        if w >= self.bits.len() {
            // A node inserted after this search started, in a segment it did not size for.
            self.bits.resize((w + 1).max(self.bits.len() * 2), 0);
        }
        let bit = 1u64 << (id & 63);
        let word = self.bits[w];
        if word & bit != 0 {
            return false;
        }
        if word == 0 {
            self.dirty.push(w as u32);
        }
        self.bits[w] = word | bit;
        true
    }
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Runs `f` with this thread's scratch (taken out, so a nested call would get a fresh one).
fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|cell| {
        let mut s = cell.take();
        let r = f(&mut s);
        *cell.borrow_mut() = s;
        r
    })
}

/// A query as graph searches compare it. The compact storages keep each vector relative to the
/// engine's center `c` ([`Native::center`]), so for them a query also carries `q - c` (for L2)
/// and `q . c` (added to `q . (x - c)` for cosine and dot); with [`Storage::Int8`] under cosine
/// or dot also `q` as 16-bit fixed point with its scale, for the integer kernel
/// ([`distance::dot_i16_i8`]).
struct Query<'a> {
    v: &'a [f32],
    /// `q - c` for L2 (otherwise just `q`, unused).
    r: &'a [f32],
    /// `q . c` for cosine and dot (otherwise 0, unused).
    qc: f32,
    fixed: Option<(&'a [i16], f32)>,
}

/// A thread's buffers for a query's other forms.
#[derive(Default)]
struct QueryBufs {
    r: Vec<f32>,
    fixed: Vec<i16>,
}

thread_local! {
    static QUERY_BUFS: RefCell<QueryBufs> = RefCell::new(QueryBufs::default());
}

/// This thread's query buffers, given back when dropped (so a search allocates nothing for
/// them after its thread's first).
struct QueryBuf(QueryBufs);

impl QueryBuf {
    fn take() -> Self {
        QueryBuf(QUERY_BUFS.try_with(|c| c.take()).unwrap_or_default())
    }
}

impl Drop for QueryBuf {
    fn drop(&mut self) {
        let bufs = std::mem::take(&mut self.0);
        // During thread teardown the buffers are simply freed.
        let _ = QUERY_BUFS.try_with(|c| *c.borrow_mut() = bufs);
    }
}

#[inline(always)]
fn prefetch(p: *const f32) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: a prefetch is a hint: it never faults, whatever the address, and SSE (which
        // provides it) is part of the x86-64 baseline.
        #[allow(unused_unsafe)]
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// How the engine keeps the vectors that graph searches compare with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    /// 32-bit floats, as given.
    F32,
    /// IEEE half floats (16 bits) next to the links, which halves the bytes a search reads, with
    /// the float vectors kept apart: inserts choose neighbours and searches rank their final
    /// candidates by exact distances. Values beyond +-65504 are clamped in the half copy.
    Half,
    /// 8-bit codes with one scale per vector ([`distance::to_i8`]) next to the links, a quarter
    /// of the float vector's bytes, with the float vectors kept apart as with [`Storage::Half`].
    /// Both compact storages keep each vector relative to the engine's center
    /// ([`Native::center`]).
    Int8,
}

pub struct Native {
    metric: Metric,
    dim: usize,
    storage: Storage,
    /// Cells per node of the vector searches compare with.
    cells: usize,
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
    /// The entry point and the top level, None while empty.
    entry: RwLock<Option<(u32, usize)>>,
    /// Held by an insert whose node may become the new entry point.
    top_lock: Mutex<()>,
    /// Nodes fully inserted.
    count: AtomicUsize,
    /// Node slots in created segments.
    slots: AtomicUsize,
    /// Bytes of upper-level link blocks.
    upper_bytes: AtomicUsize,
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
        Native {
            metric,
            dim,
            storage,
            cells: match storage {
                Storage::F32 => dim,
                Storage::Half => dim.div_ceil(2),
                // The scale, then four codes per cell.
                Storage::Int8 => 1 + dim.div_ceil(4),
            },
            m,
            m0: 2 * m,
            ef_construction: (config.ef_construction as usize).max(m),
            ef_search: (config.ef_search as usize).max(1),
            level_mult: 1.0 / (m as f64).ln(),
            seed: config.seed.unwrap_or(DEFAULT_SEED),
            base: capacity.max(1024),
            center: OnceLock::new(),
            segments: (0..SEGMENTS).map(|_| OnceLock::new()).collect(),
            entry: RwLock::new(None),
            top_lock: Mutex::new(()),
            count: AtomicUsize::new(0),
            slots: AtomicUsize::new(0),
            upper_bytes: AtomicUsize::new(0),
        }
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

    /// The segment of node `id`, created if needed.
    fn node_or_create(&self, id: u32) -> Option<(&Segment, usize)> {
        let (s, off) = self.locate(id);
        let len = if s == 0 {
            self.base
        } else {
            self.base << (s - 1)
        };
        let seg = self.segments.get(s)?.get_or_init(|| {
            self.slots.fetch_add(len, AtOrd::Relaxed);
            Segment::new(len, self.cells, self.m0, self.full_dim())
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

    /// Cells per node in a segment's `level0`.
    #[inline(always)]
    fn stride(&self) -> usize {
        1 + self.m0 + self.cells
    }

    /// A node's cells of the vector searches compare with (next to its level-0 links).
    #[inline(always)]
    fn search_cells<'a>(&self, seg: &'a Segment, off: usize) -> &'a [AtomicU32] {
        let start = off * self.stride() + 1 + self.m0;
        &seg.level0[start..start + self.cells]
    }

    /// A node's float vector cells.
    #[inline(always)]
    fn vector_cells<'a>(&self, seg: &'a Segment, off: usize) -> &'a [AtomicU32] {
        match self.storage {
            Storage::F32 => self.search_cells(seg, off),
            Storage::Half | Storage::Int8 => &seg.full[off * self.dim..(off + 1) * self.dim],
        }
    }

    /// A node's float vector, as inserted.
    #[inline(always)]
    fn vector_in<'a>(&self, seg: &'a Segment, off: usize) -> &'a [f32] {
        let cells = self.vector_cells(seg, off);
        // SAFETY: AtomicU32 has the size and alignment of u32 and f32, so the cells can be read
        // as floats. A node's vector cells are stored once, by the thread that claimed the node
        // and before the node's id is published with a Release store; readers reach the node
        // only through an id loaded with Acquire, so no read of these cells races a write.
        unsafe { std::slice::from_raw_parts(cells.as_ptr() as *const f32, cells.len()) }
    }

    /// A node's half vector ([`Storage::Half`] only).
    #[inline(always)]
    fn half_in<'a>(&self, seg: &'a Segment, off: usize) -> &'a [u16] {
        let cells = self.search_cells(seg, off);
        // SAFETY: as in `vector_in`: two u16 fit one AtomicU32 (alignment 4 >= 2) and the cells
        // are written once before the node is published; `cells` holds dim.div_ceil(2) cells,
        // so `dim` halves are in bounds.
        unsafe {
            std::slice::from_raw_parts(cells.as_ptr() as *const u16, self.dim.min(cells.len() * 2))
        }
    }

    /// A node's 8-bit codes and their scale ([`Storage::Int8`] only).
    #[inline(always)]
    fn i8_in<'a>(&self, seg: &'a Segment, off: usize) -> (&'a [i8], f32) {
        let Some((scale, codes)) = self.search_cells(seg, off).split_first() else {
            return (&[], 0.0);
        };
        // SAFETY: as in `vector_in`: four i8 fit one AtomicU32 and the cells are written once
        // before the node is published; `codes` holds dim.div_ceil(4) cells, so `dim` codes are
        // in bounds.
        let codes = unsafe {
            std::slice::from_raw_parts(codes.as_ptr() as *const i8, self.dim.min(codes.len() * 4))
        };
        (codes, f32::from_bits(scale.load(AtOrd::Relaxed)))
    }

    #[inline(always)]
    fn vector(&self, id: u32) -> Option<&[f32]> {
        self.node(id).map(|(seg, off)| self.vector_in(seg, off))
    }

    /// The exact internal distance of two float vectors.
    #[inline(always)]
    fn dist(&self, a: &[f32], b: &[f32]) -> f32 {
        distance::internal(self.metric, a, b)
    }

    /// `v` as searches of this engine compare it (`bufs` hold its other forms).
    fn query<'a>(&self, v: &'a [f32], bufs: &'a mut QueryBufs) -> Query<'a> {
        let fixed = if self.storage == Storage::Int8 && self.metric != Metric::L2 {
            distance::to_i16(v, &mut bufs.fixed)
        } else {
            None
        };
        // Only what the metric uses: `q - c` for L2, `q . c` for cosine and dot.
        let (r, qc) = match self.center.get() {
            Some(c) if self.storage != Storage::F32 => {
                if self.metric == Metric::L2 {
                    bufs.r.clear();
                    bufs.r.extend(v.iter().zip(c.iter()).map(|(x, m)| x - m));
                    (&bufs.r[..], 0.0)
                } else {
                    (v, distance::dot(v, c))
                }
            }
            _ => (v, 0.0),
        };
        Query {
            v,
            r,
            qc,
            fixed: fixed.map(|scale| (&bufs.fixed[..], scale)),
        }
    }

    /// The distance graph searches use from `q` to a node: exact, or to its half or 8-bit
    /// vector (kept relative to the center). L2 on compact vectors takes the float kernel on
    /// `q - c`, which subtracts before it squares: an integer dot product would need
    /// `|q|^2 + |x|^2 - 2 q.x`, which cancels badly.
    #[inline(always)]
    fn dist_node(&self, q: &Query, seg: &Segment, off: usize) -> f32 {
        let l2 = self.metric == Metric::L2;
        let raw = match self.storage {
            Storage::F32 => return distance::internal(self.metric, q.v, self.vector_in(seg, off)),
            Storage::Half => {
                let halves = self.half_in(seg, off);
                if l2 {
                    distance::l2sq_codes(q.r, halves, 1.0)
                } else {
                    distance::dot_codes(q.v, halves) + q.qc
                }
            }
            Storage::Int8 => {
                let (codes, scale) = self.i8_in(seg, off);
                match q.fixed {
                    _ if l2 => distance::l2sq_codes(q.r, codes, scale),
                    Some((fq, fs)) => fs * scale * distance::dot_i16_i8(fq, codes) as f32 + q.qc,
                    None => scale * distance::dot_codes(q.v, codes) + q.qc,
                }
            }
        };
        distance::internal_from(self.metric, raw)
    }

    #[inline(always)]
    fn dist_to(&self, q: &Query, id: u32) -> Option<f32> {
        self.node(id).map(|(seg, off)| self.dist_node(q, seg, off))
    }

    /// Prefetches every cache line of a node's search vector.
    #[inline(always)]
    fn prefetch_vector(&self, seg: &Segment, off: usize) {
        prefetch_cells(self.search_cells(seg, off));
    }

    /// The link block (count, then slots) of a node at a level; empty if it has none there.
    #[inline(always)]
    fn links(&self, id: u32, level: usize) -> &[AtomicU32] {
        match self.node(id) {
            Some((seg, off)) => self.links_in(seg, off, level),
            None => &[],
        }
    }

    #[inline(always)]
    fn links_in<'a>(&self, seg: &'a Segment, off: usize, level: usize) -> &'a [AtomicU32] {
        if level == 0 {
            let start = off * self.stride();
            &seg.level0[start..start + 1 + self.m0]
        } else {
            let w = 1 + self.m;
            match seg.upper[off].get() {
                Some(block) if block.len() >= level * w => &block[(level - 1) * w..level * w],
                _ => &[],
            }
        }
    }

    /// The level of node `id`: from a hash of the seed and the id, so independent of order.
    fn level_of(&self, id: u32) -> usize {
        let mut z = self.seed ^ (id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        // splitmix64's finaliser
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let u = ((z >> 11) as f64 + 1.0) / (1u64 << 53) as f64; // (0, 1]
        ((-u.ln() * self.level_mult) as usize).min(MAX_LEVEL)
    }

    /// Greedy descent at one level from `cur` (ef = 1).
    fn greedy(&self, q: &Query, mut cur: Cand, level: usize) -> Cand {
        loop {
            let mut changed = false;
            let links = self.links(cur.id, level);
            if let Some((count, slots)) = links.split_first() {
                let n = (count.load(AtOrd::Acquire) as usize).min(slots.len());
                for slot in &slots[..n] {
                    let id = slot.load(AtOrd::Acquire);
                    if id == EMPTY {
                        continue;
                    }
                    if let Some(d) = self.dist_to(q, id) {
                        if d < cur.d {
                            cur = Cand { d, id };
                            changed = true;
                        }
                    }
                }
            }
            if !changed {
                return cur;
            }
        }
    }

    /// The best-first search of one level from `ep` with a beam of `ef`: leaves the `ef` nearest
    /// nodes found that pass `keep` in `s.top` (a max-heap).
    ///
    /// A node that fails `keep` (a tombstone) still guides the search, as hnswlib does with its
    /// deleted marks: it enters the candidates but never takes a result slot, and the search
    /// goes on until it has `ef` nodes that pass. With `keep` always true (every build, and
    /// searches of a graph without tombstones) this is the plain HNSW search, and the check
    /// compiles away.
    ///
    /// With `enough: Some(k)` the work is bounded when the nodes that pass are scarce near the
    /// query (most of the graph tombstoned): past [`EXPANSIONS_PER_EF`]` * ef` expanded nodes
    /// the search stops as soon as it holds `k` that pass, instead of walking on until it has
    /// `ef` of them.
    #[allow(clippy::too_many_arguments)]
    fn search_layer(
        &self,
        q: &Query,
        ep: Cand,
        ef: usize,
        level: usize,
        s: &mut Scratch,
        keep: &impl Fn(u32) -> bool,
        enough: Option<usize>,
    ) {
        s.start(self.slots.load(AtOrd::Relaxed));
        s.visit(ep.id);
        if keep(ep.id) {
            s.top.push(ep);
        }
        s.candidates.push(Reverse(ep));
        let budget = ef.saturating_mul(EXPANSIONS_PER_EF);
        let mut expanded = 0usize;
        while let Some(Reverse(c)) = s.candidates.pop() {
            let worst = s.top.peek().map_or(f32::INFINITY, |t| t.d);
            if c.d > worst && s.top.len() >= ef {
                break;
            }
            if let Some(k) = enough {
                expanded += 1;
                if expanded > budget && s.top.len() >= k {
                    break;
                }
            }
            let links = self.links(c.id, level);
            let Some((count, slots)) = links.split_first() else {
                continue;
            };
            let n = (count.load(AtOrd::Acquire) as usize).min(slots.len());
            let slots = &slots[..n];
            // The neighbours not yet visited, then their distances, with the vectors a few
            // neighbours ahead asked for in whole while one is compared: the search is bound by
            // memory latency (vectors at random places, 12-24 cache lines each), and asking
            // for every line of the next ones overlaps the misses.
            let mut batch = std::mem::take(&mut s.batch);
            batch.clear();
            for slot in slots {
                let id = slot.load(AtOrd::Acquire);
                if id != EMPTY && s.visit(id) {
                    batch.push(id);
                }
            }
            for &id in batch.iter().take(LOOKAHEAD) {
                if let Some((seg, off)) = self.node(id) {
                    self.prefetch_vector(seg, off);
                }
            }
            for (j, &id) in batch.iter().enumerate() {
                if let Some(&next) = batch.get(j + LOOKAHEAD) {
                    if let Some((seg, off)) = self.node(next) {
                        self.prefetch_vector(seg, off);
                    }
                }
                let Some(d) = self.dist_to(q, id) else {
                    continue;
                };
                let worst = s.top.peek().map_or(f32::INFINITY, |t| t.d);
                if s.top.len() < ef || d < worst {
                    let cand = Cand { d, id };
                    s.candidates.push(Reverse(cand));
                    if keep(id) {
                        s.top.push(cand);
                        if s.top.len() > ef {
                            s.top.pop();
                        }
                    }
                }
            }
            s.batch = batch;
        }
    }

    /// hnswlib's neighbour heuristic: from `cands` (nearest first), keep up to `m`, skipping a
    /// candidate that is nearer to one already kept than to the base point.
    fn select(&self, cands: &[Cand], m: usize) -> Vec<Cand> {
        if cands.len() <= m {
            return cands.to_vec();
        }
        let mut kept: Vec<(Cand, &[f32])> = Vec::with_capacity(m);
        for &c in cands {
            if kept.len() >= m {
                break;
            }
            let Some(vc) = self.vector(c.id) else {
                continue;
            };
            if kept.iter().all(|&(_, vr)| self.dist(vc, vr) >= c.d) {
                kept.push((c, vc));
            }
        }
        kept.into_iter().map(|(c, _)| c).collect()
    }

    /// Rewrites a link block (caller holds the node's lock): slots first, then the count.
    fn write_links(links: &[AtomicU32], ids: impl Iterator<Item = u32>) {
        let Some((count, slots)) = links.split_first() else {
            return;
        };
        let mut n = 0;
        for (slot, id) in slots.iter().zip(ids) {
            slot.store(id, AtOrd::Release);
            n += 1;
        }
        count.store(n as u32, AtOrd::Release);
    }

    /// Links node `id`'s neighbours at `level` (the heuristic's selection, already in `id`'s own
    /// list) back to it. Returns whether the nearest of them kept a link to it (did not prune
    /// it from its full list), and whether the node is an outlier: farther from that nearest
    /// neighbour than all the neighbour's links.
    fn link_back(&self, id: u32, v: &[f32], selected: &[Cand], level: usize) -> (bool, bool) {
        let cap = if level == 0 { self.m0 } else { self.m };
        let (mut linked, mut outlier) = (false, false);
        let nearest = selected.iter().find(|c| c.id != id).map(|c| c.id);
        for nb in selected {
            if nb.id == id {
                continue;
            }
            let Some((seg, off)) = self.node(nb.id) else {
                continue;
            };
            let nb_vec = self.vector_in(seg, off);
            let _lock = seg.locks[off].lock();
            let links = self.links_in(seg, off, level);
            let Some((count, slots)) = links.split_first() else {
                continue;
            };
            let n = (count.load(AtOrd::Acquire) as usize).min(slots.len());
            if n < cap.min(slots.len()) {
                if Some(nb.id) == nearest {
                    linked = true;
                    let d = self.dist(nb_vec, v);
                    outlier = slots[..n].iter().all(|slot| {
                        let other = slot.load(AtOrd::Acquire);
                        other == EMPTY
                            || self
                                .vector(other)
                                .is_none_or(|ov| self.dist(nb_vec, ov) < d)
                    });
                }
                slots[n].store(id, AtOrd::Release);
                count.store(n as u32 + 1, AtOrd::Release);
                continue;
            }
            // Full: keep the heuristic's choice among the old links and the new node.
            let mut cands: Vec<Cand> = Vec::with_capacity(n + 1);
            cands.push(Cand {
                d: self.dist(nb_vec, v),
                id,
            });
            for slot in &slots[..n] {
                let other = slot.load(AtOrd::Acquire);
                if other == EMPTY {
                    continue;
                }
                if let Some(ov) = self.vector(other) {
                    cands.push(Cand {
                        d: self.dist(nb_vec, ov),
                        id: other,
                    });
                }
            }
            cands.sort_unstable();
            let mut kept = self.select(&cands, cap);
            // A new point farther from this neighbour than all its links is unlike its
            // surroundings (an outlier), and each of its neighbours prunes it: the pruned
            // heuristic keeps fewer than `cap` links, so it keeps it in a free slot. Points like
            // their surroundings rarely pass this test, so the graph is otherwise the heuristic's.
            if level == 0
                && kept.len() < cap
                && cands.last().is_some_and(|c| c.id == id)
                && !kept.iter().any(|c| c.id == id)
            {
                kept.extend(cands.last().copied());
            }
            if Some(nb.id) == nearest {
                linked = kept.iter().any(|c| c.id == id);
                outlier = cands.last().is_some_and(|c| c.id == id);
            }
            Self::write_links(links, kept.iter().map(|c| c.id));
        }
        (linked, outlier)
    }

    /// Makes sure a search for outlier node `id` (vector `v`) at the config's ef_search finds
    /// it: a search for a point unlike the rest of the data can end among points nearly as far
    /// as its true neighbours but elsewhere (another cluster), so where it ends gets a link to
    /// it (in place of its most redundant one), up to twice. Only outliers pay for this search.
    fn make_findable(&self, id: u32, v: &[f32]) {
        for _ in 0..2 {
            let found = self.search_keeping(v, 1, self.ef_search, &|_| true);
            let Some(&(landed, _)) = found.first() else {
                return;
            };
            let landed = landed as u32;
            if landed == id {
                return;
            }
            let Some(base) = self.vector(landed) else {
                return;
            };
            self.add_link(landed, id, |slots| self.most_redundant(base, slots));
        }
    }

    /// Gives node `id`, which its nearest level-0 neighbour (first of `selected`) did not keep
    /// a link to, a level-0 link from that neighbour: into a free slot, else in place of its
    /// most redundant link ([`Self::most_redundant`]). A point unlike the rest of the data is
    /// pruned from the lists of its neighbours (each keeps a nearer point that lies between
    /// them), and the in-links it may keep from farther ones lead from places a search for it
    /// never goes; a search for it does reach its nearest neighbour.
    fn adopt(&self, id: u32, selected: &[Cand]) {
        let Some(nearest) = selected.iter().find(|c| c.id != id) else {
            return;
        };
        if let Some(base) = self.vector(nearest.id) {
            self.add_link(nearest.id, id, |slots| self.most_redundant(base, slots));
        }
    }

    /// Of a full level-0 list of the node at `base` (caller holds its lock), the slot to give
    /// up: of the two linked points nearest each other, the one farther from `base` (the one
    /// hnswlib's heuristic would prune), which stays one hop from the other. A point adopted
    /// before, far from every other, is never the one dropped.
    fn most_redundant<'a>(&self, base: &[f32], slots: &'a [AtomicU32]) -> Option<&'a AtomicU32> {
        let linked: Vec<(usize, &[f32])> = slots
            .iter()
            .enumerate()
            .filter_map(|(i, slot)| {
                let id = slot.load(AtOrd::Acquire);
                (id != EMPTY).then(|| self.vector(id).map(|v| (i, v)))?
            })
            .collect();
        let mut best: Option<(f32, usize)> = None;
        for (a, &(i, va)) in linked.iter().enumerate() {
            for &(j, vb) in &linked[a + 1..] {
                let d = self.dist(va, vb);
                if best.is_none_or(|(bd, _)| d < bd) {
                    let far = if self.dist(base, va) > self.dist(base, vb) {
                        i
                    } else {
                        j
                    };
                    best = Some((d, far));
                }
            }
        }
        best.and_then(|(_, j)| slots.get(j))
    }

    /// Adds a level-0 link from `from` to `to`: into a free slot, or else into the slot `full`
    /// picks from the full list. False if neither.
    fn add_link<'a>(
        &'a self,
        from: u32,
        to: u32,
        full: impl FnOnce(&'a [AtomicU32]) -> Option<&'a AtomicU32>,
    ) -> bool {
        let Some((seg, off)) = self.node(from) else {
            return false;
        };
        let _lock = seg.locks[off].lock();
        let Some((count, slots)) = self.links_in(seg, off, 0).split_first() else {
            return false;
        };
        let n = (count.load(AtOrd::Acquire) as usize).min(slots.len());
        if let Some(free) = slots.get(n) {
            free.store(to, AtOrd::Release);
            count.store(n as u32 + 1, AtOrd::Release);
            return true;
        }
        match full(slots) {
            Some(slot) => {
                slot.store(to, AtOrd::Release);
                true
            }
            None => false,
        }
    }

    /// The `k` nearest nodes passing `keep`, nearest first.
    fn search_keeping(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        keep: &impl Fn(u32) -> bool,
    ) -> Vec<(usize, f32)> {
        if k == 0 || query.len() != self.dim {
            return Vec::new();
        }
        let Some((ep, top)) = *self.entry.read() else {
            return Vec::new();
        };
        let mut buf = QueryBuf::take();
        let q = self.query(query, &mut buf.0);
        let Some(d) = self.dist_to(&q, ep) else {
            return Vec::new();
        };
        let mut cur = Cand { d, id: ep };
        for l in (1..=top).rev() {
            cur = self.greedy(&q, cur, l);
        }
        with_scratch(|s| {
            self.search_layer(&q, cur, ef.max(k), 0, s, keep, Some(k));
            if self.storage != Storage::F32 {
                // Rank the nearest candidates by their exact distances (float vectors, asked
                // for a few candidates ahead): [`rerank_count`] of them, as reading
                // float vectors from all over memory is a good part of a search's time.
                let mut found = std::mem::take(&mut s.top).into_sorted_vec();
                found.truncate(rerank_count(k));
                let ask = |c: &Cand| {
                    if let Some((seg, off)) = self.node(c.id) {
                        prefetch_cells(self.vector_cells(seg, off));
                    }
                };
                found.iter().take(LOOKAHEAD).for_each(ask);
                for j in 0..found.len() {
                    if let Some(next) = found.get(j + LOOKAHEAD) {
                        ask(next);
                    }
                    let c = &mut found[j];
                    if let Some(v) = self.vector(c.id) {
                        c.d = self.dist(query, v);
                    }
                }
                s.top = BinaryHeap::from(found);
            }
            while s.top.len() > k {
                s.top.pop();
            }
            let mut out: Vec<(usize, f32)> = Vec::with_capacity(s.top.len());
            while let Some(c) = s.top.pop() {
                out.push((c.id as usize, c.d));
            }
            out.reverse();
            out
        })
    }
}

impl Engine for Native {
    /// Inserts one node (module docs, "Concurrency"): its own lists at every level first, then
    /// the links back to it, so no search or insert can reach it before its lists are complete.
    fn insert(&self, vector: &[f32], internal: usize) {
        let Ok(id) = u32::try_from(internal) else {
            return;
        };
        if id == EMPTY || vector.len() != self.dim {
            return;
        }
        let Some((seg, off)) = self.node_or_create(id) else {
            return;
        };
        if seg.claimed[off].swap(true, AtOrd::AcqRel) {
            return; // already inserted: ids are fresh by contract, so this is a caller's bug
        }
        // This thread owns the node (the claim above) and the node is not yet published, so
        // no one else reads or writes its cells.
        for (cell, &x) in self.vector_cells(seg, off).iter().zip(vector) {
            cell.store(x.to_bits(), AtOrd::Relaxed);
        }
        let centered: Vec<f32> = match self.storage {
            Storage::F32 => Vec::new(),
            Storage::Half | Storage::Int8 => {
                let c = self.center.get_or_init(|| vector.into());
                vector.iter().zip(c.iter()).map(|(x, m)| x - m).collect()
            }
        };
        match self.storage {
            Storage::F32 => {}
            Storage::Half => {
                for (cell, pair) in self.search_cells(seg, off).iter().zip(centered.chunks(2)) {
                    let lo = distance::to_half(pair[0]) as u32;
                    let hi = pair.get(1).map_or(0, |&x| distance::to_half(x) as u32);
                    cell.store(lo | hi << 16, AtOrd::Relaxed);
                }
            }
            Storage::Int8 => {
                let mut codes = vec![0i8; self.dim];
                let scale = distance::to_i8(&centered, &mut codes);
                if let Some((first, rest)) = self.search_cells(seg, off).split_first() {
                    first.store(scale.to_bits(), AtOrd::Relaxed);
                    for (cell, four) in rest.iter().zip(codes.chunks(4)) {
                        let mut b = [0u8; 4];
                        for (x, &c) in b.iter_mut().zip(four) {
                            *x = c as u8;
                        }
                        cell.store(u32::from_ne_bytes(b), AtOrd::Relaxed);
                    }
                }
            }
        }
        let level = self.level_of(id);
        if level > 0 {
            let w = 1 + self.m;
            let block: Box<[AtomicU32]> = (0..level * w)
                .map(|i| AtomicU32::new(if i % w == 0 { 0 } else { EMPTY }))
                .collect();
            self.upper_bytes.fetch_add(block.len() * 4, AtOrd::Relaxed);
            let _ = seg.upper[off].set(block);
        }
        let v = self.vector_in(seg, off);

        // An insert that may raise the top level holds the top lock until it is done.
        let mut entry = *self.entry.read();
        let _top = match entry {
            Some((_, top)) if level <= top => None,
            _ => {
                let guard = self.top_lock.lock();
                entry = *self.entry.read();
                Some(guard)
            }
        };
        let Some((ep, top)) = entry else {
            *self.entry.write() = Some((id, level));
            self.count.fetch_add(1, AtOrd::Relaxed);
            return;
        };
        let mut buf = QueryBuf::take();
        let q = self.query(v, &mut buf.0);
        let Some(d) = self.dist_to(&q, ep) else {
            return;
        };
        let mut cur = Cand { d, id: ep };
        for l in (level + 1..=top).rev() {
            cur = self.greedy(&q, cur, l);
        }
        // The selection at each level, from the top down: written into the node's own lists
        // now (unpublished, so without a lock), linked back only once every level is done.
        // Each level's search reads only that level's links, so with one thread this builds
        // the same graph as linking back level by level.
        let mut selections: Vec<(usize, Vec<Cand>)> = Vec::with_capacity(level.min(top) + 1);
        with_scratch(|s| {
            for l in (0..=level.min(top)).rev() {
                self.search_layer(&q, cur, self.ef_construction, l, s, &|_| true, None);
                let mut found: Vec<Cand> = std::mem::take(&mut s.top).into_sorted_vec();
                let selected = self.select(&found, self.m);
                Self::write_links(self.links_in(seg, off, l), selected.iter().map(|c| c.id));
                if let Some(&nearest) = found.first() {
                    cur = nearest;
                }
                selections.push((l, selected));
                found.clear();
                s.top = BinaryHeap::from(found); // keeps the allocation
            }
        });
        for (l, selected) in &selections {
            let (linked, outlier) = self.link_back(id, v, selected, *l);
            if *l == 0 {
                if !linked {
                    self.adopt(id, selected);
                }
                if outlier {
                    self.make_findable(id, v);
                }
            }
        }
        if level > top {
            *self.entry.write() = Some((id, level));
        }
        self.count.fetch_add(1, AtOrd::Relaxed);
    }

    fn insert_many(&self, items: &[(&[f32], usize)], parallel: bool) {
        if self.storage != Storage::F32 {
            // The center: the mean of (up to 10,000 of) this first batch's vectors.
            self.center.get_or_init(|| {
                let mut sum = vec![0.0f64; self.dim];
                let sample: Vec<&[f32]> = items
                    .iter()
                    .map(|&(v, _)| v)
                    .filter(|v| v.len() == self.dim)
                    .take(10_000)
                    .collect();
                for v in &sample {
                    for (s, &x) in sum.iter_mut().zip(v.iter()) {
                        *s += x as f64;
                    }
                }
                let n = sample.len().max(1) as f64;
                sum.iter().map(|&s| (s / n) as f32).collect()
            });
        }
        if parallel && items.len() > 1 {
            items.par_iter().for_each(|&(v, id)| self.insert(v, id));
        } else {
            for &(v, id) in items {
                self.insert(v, id);
            }
        }
    }

    fn search(&self, query: &[f32], k: usize, ef: usize) -> Vec<(usize, f32)> {
        self.search_keeping(query, k, ef, &|_| true)
    }

    fn search_filtered(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        keep: &dyn Fn(usize) -> bool,
    ) -> Option<Vec<(usize, f32)>> {
        Some(self.search_keeping(query, k, ef, &|id| keep(id as usize)))
    }

    fn distances(&self, query: &[f32], ids: &[usize]) -> Option<Vec<(usize, f32)>> {
        if query.len() != self.dim {
            return Some(Vec::new());
        }
        let found = ids
            .iter()
            .filter_map(|&id| {
                let v = self.vector(u32::try_from(id).ok()?)?;
                Some((id, self.dist(query, v)))
            })
            .collect();
        Some(found)
    }

    fn link_orphans(&self) -> usize {
        let Some((entry, _)) = *self.entry.read() else {
            return 0;
        };
        // Every inserted node, by id, with the number of level-0 links that reach it.
        let mut nodes: Vec<u32> = Vec::new();
        let mut indegree: Vec<u8> = Vec::new();
        for (s, seg) in self.segments.iter().enumerate() {
            let Some(seg) = seg.get() else { continue };
            let start = if s == 0 { 0 } else { self.base << (s - 1) };
            for (off, claimed) in seg.claimed.iter().enumerate() {
                if !claimed.load(AtOrd::Acquire) {
                    continue;
                }
                let Ok(id) = u32::try_from(start + off) else {
                    continue;
                };
                nodes.push(id);
                let (count, slots) = match self.links_in(seg, off, 0).split_first() {
                    Some(block) => block,
                    None => continue,
                };
                let n = (count.load(AtOrd::Acquire) as usize).min(slots.len());
                for slot in &slots[..n] {
                    let to = slot.load(AtOrd::Acquire) as usize;
                    if to == EMPTY as usize {
                        continue;
                    }
                    if indegree.len() <= to {
                        indegree.resize(to + 1, 0);
                    }
                    indegree[to] = indegree[to].saturating_add(1);
                }
            }
        }
        let mut linked = 0;
        for &u in &nodes {
            if u == entry || indegree.get(u as usize).is_some_and(|&d| d > 0) {
                continue;
            }
            let Some(v) = self.vector(u) else { continue };
            let ef = self.ef_construction;
            let found = self.search_keeping(v, ef, ef, &|id| id != u);
            // The nearest point with a free slot links to it; if all are full, the nearest
            // gives its link to the point that most other links also reach.
            let done = found
                .iter()
                .any(|&(c, _)| self.add_link(c as u32, u, |_| None))
                || found.first().is_some_and(|&(c, _)| {
                    self.add_link(c as u32, u, |slots| {
                        let most = slots.iter().max_by_key(|s| {
                            indegree.get(s.load(AtOrd::Acquire) as usize).copied()
                        })?;
                        let old = most.load(AtOrd::Acquire) as usize;
                        let d = indegree.get_mut(old).filter(|d| **d > 1)?;
                        *d -= 1;
                        Some(most)
                    })
                });
            if done {
                if indegree.len() <= u as usize {
                    indegree.resize(u as usize + 1, 0);
                }
                indegree[u as usize] = 1;
                linked += 1;
            }
        }
        linked
    }

    fn len(&self) -> usize {
        self.count.load(AtOrd::Relaxed)
    }

    fn save(&self, out: &mut dyn std::io::Write) -> std::io::Result<bool> {
        self.save_graph(out).map(|()| true)
    }

    fn memory_bytes(&self) -> u64 {
        let slots = self.slots.load(AtOrd::Relaxed);
        let per_slot = (self.cells + self.full_dim()) * 4 // vectors
            + (1 + self.m0) * 4 // level-0 links
            + std::mem::size_of::<OnceLock<Box<[AtomicU32]>>>()
            + std::mem::size_of::<Mutex<()>>()
            + std::mem::size_of::<AtomicBool>();
        (slots * per_slot + self.upper_bytes.load(AtOrd::Relaxed)) as u64
    }
}

/// Snapshots (`super::snapshot`): the graph written as the engine keeps it and read back into an
/// engine that searches exactly like the one written.
///
/// Layout (little-endian): storage u8, dimension u32, m u32, ef_construction u32, seed u64,
/// base u64; the center (u8 present, then `dim` f32 bits); the entry point (u8 present, id u32,
/// top level u32); inserted nodes u64; node slots written u64; then per slot: claimed u8 and,
/// if claimed, its level-0 cells (count, slots, search vector), its float vector cells (compact
/// storages) and its upper-level block (u32 length + cells).
impl Native {
    fn storage_code(storage: Storage) -> u8 {
        match storage {
            Storage::F32 => 0,
            Storage::Half => 1,
            Storage::Int8 => 2,
        }
    }

    /// Writes the graph. Nothing may insert meanwhile (the caller owns the engine exclusively,
    /// as a build does before its generation is published).
    pub fn save_graph(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        out.write_all(&[Self::storage_code(self.storage)])?;
        out.write_all(&(self.dim as u32).to_le_bytes())?;
        out.write_all(&(self.m as u32).to_le_bytes())?;
        out.write_all(&(self.ef_construction as u32).to_le_bytes())?;
        out.write_all(&self.seed.to_le_bytes())?;
        out.write_all(&(self.base as u64).to_le_bytes())?;
        match self.center.get() {
            Some(c) => {
                out.write_all(&[1])?;
                for x in c.iter() {
                    out.write_all(&x.to_bits().to_le_bytes())?;
                }
            }
            None => out.write_all(&[0])?,
        }
        match *self.entry.read() {
            Some((id, level)) => {
                out.write_all(&[1])?;
                out.write_all(&id.to_le_bytes())?;
                out.write_all(&(level as u32).to_le_bytes())?;
            }
            None => out.write_all(&[0])?,
        }
        out.write_all(&(self.count.load(AtOrd::Acquire) as u64).to_le_bytes())?;
        // Slots up to the last claimed one.
        let mut slots = 0usize;
        for (s, seg) in self.segments.iter().enumerate() {
            let Some(seg) = seg.get() else { continue };
            let start = if s == 0 { 0 } else { self.base << (s - 1) };
            if let Some(last) = seg.claimed.iter().rposition(|c| c.load(AtOrd::Acquire)) {
                slots = slots.max(start + last + 1);
            }
        }
        out.write_all(&(slots as u64).to_le_bytes())?;
        let mut buf: Vec<u8> = Vec::new();
        for id in 0..slots {
            buf.clear();
            let node = u32::try_from(id).ok().and_then(|id| self.node(id));
            match node {
                Some((seg, off)) if seg.claimed[off].load(AtOrd::Acquire) => {
                    buf.push(1);
                    let stride = self.stride();
                    let cells = seg.level0[off * stride..(off + 1) * stride]
                        .iter()
                        .chain(&seg.full[off * self.full_dim()..(off + 1) * self.full_dim()]);
                    for c in cells {
                        buf.extend_from_slice(&c.load(AtOrd::Acquire).to_le_bytes());
                    }
                    let upper: &[AtomicU32] = seg.upper[off].get().map_or(&[], |b| &b[..]);
                    buf.extend_from_slice(&(upper.len() as u32).to_le_bytes());
                    for c in upper {
                        buf.extend_from_slice(&c.load(AtOrd::Acquire).to_le_bytes());
                    }
                }
                _ => buf.push(0),
            }
            out.write_all(&buf)?;
        }
        Ok(())
    }

    /// Reads a graph written by [`Native::save_graph`] for `metric`, `dimension`, `config` and
    /// `storage`; any disagreement with them, or a value out of range, is an error.
    pub fn load_graph(
        metric: Metric,
        dimension: u32,
        config: &HnswConfig,
        storage: Storage,
        d: &mut super::snapshot::Dec,
    ) -> crate::error::Result<Native> {
        use crate::error::Error;
        let bad = |what: String| Error::Corrupt(format!("snapshot graph: {what}"));
        let code = d.u8()?;
        if code != Self::storage_code(storage) {
            return Err(bad(format!(
                "vector storage {code}, expected {}",
                Self::storage_code(storage)
            )));
        }
        let (dim, m, ef_c, seed) = (d.u32()?, d.u32()?, d.u32()?, d.u64()?);
        let base = d.u64()?;
        if base > u32::MAX as u64 || base == 0 {
            return Err(bad(format!("segment size {base}")));
        }
        let g = Native::with_storage(metric, dimension, config, base as usize, storage);
        if (dim as usize, m as usize, ef_c as usize, seed, base as usize)
            != (g.dim, g.m, g.ef_construction, g.seed, g.base)
        {
            return Err(bad(format!(
                "(dimension, m, ef_construction, seed, base) ({dim}, {m}, {ef_c}, {seed}, {base}) \
                 disagree with the generation's ({}, {}, {}, {}, {})",
                g.dim, g.m, g.ef_construction, g.seed, g.base
            )));
        }
        if d.u8()? == 1 {
            let c: Vec<f32> = (0..g.dim)
                .map(|_| d.u32().map(f32::from_bits))
                .collect::<crate::error::Result<_>>()?;
            let _ = g.center.set(c.into());
        }
        let entry = if d.u8()? == 1 {
            let (id, level) = (d.u32()?, d.u32()? as usize);
            if level > MAX_LEVEL {
                return Err(bad(format!("entry level {level}")));
            }
            Some((id, level))
        } else {
            None
        };
        let count = d.u64()?;
        let slots = d.count(1)?;
        if slots > EMPTY as usize {
            return Err(bad(format!("{slots} nodes")));
        }
        let stride = g.stride();
        let full = g.full_dim();
        let mut claimed = 0u64;
        for id in 0..slots as u32 {
            if d.u8()? != 1 {
                continue;
            }
            let Some((seg, off)) = g.node_or_create(id) else {
                return Err(bad(format!("node {id} out of range")));
            };
            let cells = seg.level0[off * stride..(off + 1) * stride]
                .iter()
                .chain(&seg.full[off * full..(off + 1) * full]);
            let raw = d.bytes((stride + full) * 4)?;
            for (c, b) in cells.zip(raw.chunks_exact(4)) {
                c.store(u32::from_le_bytes([b[0], b[1], b[2], b[3]]), AtOrd::Relaxed);
            }
            let upper = d.u32()? as usize;
            if upper > MAX_LEVEL * (1 + g.m) || !upper.is_multiple_of(1 + g.m) {
                return Err(bad(format!("node {id} has {upper} upper-level cells")));
            }
            if upper > 0 {
                let raw = d.bytes(upper * 4)?;
                let block: Box<[AtomicU32]> = raw
                    .chunks_exact(4)
                    .map(|b| AtomicU32::new(u32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                    .collect();
                g.upper_bytes.fetch_add(block.len() * 4, AtOrd::Relaxed);
                let _ = seg.upper[off].set(block);
            }
            seg.claimed[off].store(true, AtOrd::Relaxed);
            claimed += 1;
        }
        if claimed != count {
            return Err(bad(format!("{claimed} nodes present, {count} recorded")));
        }
        // Every link must name a present node: a search follows them without checks beyond
        // the segment lookup.
        for id in 0..slots as u32 {
            let Some((seg, off)) = g.node(id) else {
                continue;
            };
            if !seg.claimed[off].load(AtOrd::Relaxed) {
                continue;
            }
            for level in 0..=MAX_LEVEL {
                let links = g.links_in(seg, off, level);
                let Some((n, ids)) = links.split_first() else {
                    break;
                };
                let n = n.load(AtOrd::Relaxed) as usize;
                if n > ids.len() {
                    return Err(bad(format!("node {id} has {n} links at level {level}")));
                }
                for l in &ids[..n] {
                    let to = l.load(AtOrd::Relaxed);
                    let present = g
                        .node(to)
                        .is_some_and(|(s, o)| s.claimed[o].load(AtOrd::Relaxed));
                    if to != EMPTY && !present {
                        return Err(bad(format!("node {id} links to missing node {to}")));
                    }
                }
            }
        }
        if let Some((id, _)) = entry {
            if !g
                .node(id)
                .is_some_and(|(s, o)| s.claimed[o].load(AtOrd::Relaxed))
            {
                return Err(bad(format!("entry point {id} is missing")));
            }
        }
        *g.entry.write() = entry;
        g.count.store(count as usize, AtOrd::Release);
        Ok(g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::engine::{new_engine_of, EngineKind};
    use rand::{Rng, SeedableRng};

    #[test]
    fn large_cell_arrays_start_on_a_huge_page_and_hold_what_init_wrote() {
        let check = |n: usize| {
            let cells = huge_cells(n, |i| (i as u32).wrapping_mul(3));
            assert_eq!(cells.len(), n);
            assert!(cells
                .iter()
                .enumerate()
                .all(|(i, c)| c.load(AtOrd::Relaxed) == (i as u32).wrapping_mul(3)));
            cells
        };
        assert!(check(0).is_empty());
        check(1);
        check(1_000);
        let large = check(HUGE_PAGE / 4 + 5);
        if cfg!(target_os = "linux") {
            assert_eq!(large.as_ptr() as usize % HUGE_PAGE, 0);
        }
        // Cells stay writable, and freeing them (the drops here) frees with the same layout.
        large[7].store(1, AtOrd::Relaxed);
        assert_eq!(large[7].load(AtOrd::Relaxed), 1);
    }

    #[test]
    fn a_prefetch_asks_for_every_line_a_vector_spans() {
        let cells: Vec<AtomicU32> = (0..2_000).map(AtomicU32::new).collect();
        let line_of = |c: &AtomicU32| c as *const AtomicU32 as usize / 64;
        for start in 0..16 {
            for len in [1, 16, 17, 97, 384] {
                let v = &cells[start..start + len];
                let lines: Vec<usize> = cache_lines(v).map(|a| a / 64).collect();
                let (first, last) = (line_of(&v[0]), line_of(&v[len - 1]));
                let want: Vec<usize> = (first..=last).collect();
                assert_eq!(lines, want, "{len} cells from cell {start}");
            }
        }
        assert_eq!(cache_lines(&cells[..0]).count(), 0);
    }

    #[test]
    fn the_visited_set_starts_empty_for_every_search_and_grows_past_its_size() {
        let mut s = Scratch::default();
        for _ in 0..3 {
            s.start(100);
            for id in [0, 5, 63, 64, 99] {
                assert!(s.visit(id), "{id} was not visited yet in this search");
                assert!(!s.visit(id), "{id} was just visited");
            }
            // A node past the size the search started with (inserted meanwhile).
            assert!(s.visit(10_000));
            assert!(!s.visit(10_000));
            assert!(s.visit(6), "a neighbour of a visited node in the same word");
        }
        s.start(100);
        assert!(
            (0..20_000).all(|id| s.visit(id)),
            "a new search sees nothing visited"
        );
    }

    fn config(seed: Option<u64>) -> HnswConfig {
        HnswConfig {
            m: 16,
            ef_construction: 100,
            ef_search: 40,
            seed,
        }
    }

    /// Clustered data, so the graph has work to do.
    fn data(n: usize, dim: usize, seed: u64, unit: bool) -> Vec<Vec<f32>> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let centres: Vec<Vec<f32>> = (0..100)
            .map(|_| (0..dim).map(|_| rng.gen_range(-1.0..1.0)).collect())
            .collect();
        (0..n)
            .map(|i| {
                let c = &centres[(i * 7919) % centres.len()];
                let mut v: Vec<f32> = c.iter().map(|x| x + rng.gen_range(-0.2..0.2)).collect();
                if unit {
                    crate::model::normalize("v", &mut v).unwrap();
                }
                v
            })
            .collect()
    }

    fn exact(metric: Metric, base: &[Vec<f32>], q: &[f32], k: usize) -> Vec<usize> {
        let mut all: Vec<(f32, usize)> = base
            .iter()
            .enumerate()
            .map(|(i, v)| (distance::internal(metric, q, v), i))
            .collect();
        all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        all.into_iter().take(k).map(|(_, i)| i).collect()
    }

    fn recall(
        engine: &dyn Engine,
        metric: Metric,
        base: &[Vec<f32>],
        queries: &[Vec<f32>],
        ef: usize,
    ) -> f64 {
        let k = 10;
        let mut hit = 0;
        for q in queries {
            let truth = exact(metric, base, q, k);
            let got: Vec<usize> = engine
                .search(q, k, ef)
                .into_iter()
                .map(|(i, _)| i)
                .collect();
            hit += truth.iter().filter(|t| got.contains(t)).count();
        }
        hit as f64 / (queries.len() * k) as f64
    }

    fn build(
        kind: EngineKind,
        metric: Metric,
        base: &[Vec<f32>],
        seed: Option<u64>,
        parallel: bool,
    ) -> Box<dyn Engine> {
        let e = new_engine_of(
            kind,
            metric,
            base[0].len() as u32,
            &config(seed),
            base.len(),
        );
        let items: Vec<(&[f32], usize)> = base
            .iter()
            .enumerate()
            .map(|(i, v)| (v.as_slice(), i))
            .collect();
        e.insert_many(&items, parallel);
        e
    }

    #[test]
    fn recall_matches_hnsw_rs_on_the_same_data() {
        for metric in [Metric::L2, Metric::Cosine] {
            let base = data(4000, 32, 1, metric == Metric::Cosine);
            let queries = data(100, 32, 2, metric == Metric::Cosine);
            let native = build(EngineKind::Native, metric, &base, Some(3), false);
            let theirs = build(EngineKind::HnswRs, metric, &base, Some(3), false);
            assert_eq!(native.len(), base.len());
            for ef in [10, 20, 40, 80] {
                let (a, b) = (
                    recall(native.as_ref(), metric, &base, &queries, ef),
                    recall(theirs.as_ref(), metric, &base, &queries, ef),
                );
                // Same data and config; hnsw_rs links a new node to 2*M neighbours at level 0
                // where hnswlib (and native) link M, so the curves differ a little either way.
                assert!(
                    a >= b - 0.05,
                    "{metric:?} ef={ef}: native {a} < hnsw_rs {b}"
                );
                if ef == 80 {
                    assert!(a >= 0.95, "{metric:?} ef={ef}: recall {a}");
                }
            }
        }
    }

    #[test]
    fn compact_storages_keep_recall_and_report_exact_distances() {
        for (kind, metric) in [EngineKind::NativeF16, EngineKind::NativeI8]
            .into_iter()
            .flat_map(|k| [Metric::L2, Metric::Cosine, Metric::Dot].map(|m| (k, m)))
        {
            let unit = metric != Metric::L2;
            // 33-d: an odd dimension, so the last cell holds one half (one code).
            let base = data(4000, 33, 1, unit);
            let queries = data(100, 33, 2, unit);
            let full = build(EngineKind::Native, metric, &base, Some(3), false);
            let half = build(kind, metric, &base, Some(3), false);
            assert_eq!(half.len(), base.len());
            for ef in [10, 40, 80] {
                let (a, b) = (
                    recall(full.as_ref(), metric, &base, &queries, ef),
                    recall(half.as_ref(), metric, &base, &queries, ef),
                );
                // Halves change distances by about 1e-4 of their size, 8-bit codes by about
                // 1e-2, which changes ties between near candidates (and so which links a
                // build keeps), not the quality of the graph; the final candidates are ranked
                // exactly. On this data 8-bit recall moved by -0.012..+0.017 at ef 10..80.
                let slack = if kind == EngineKind::NativeI8 {
                    0.02
                } else {
                    0.01
                };
                assert!(
                    b >= a - slack,
                    "{kind:?} {metric:?} ef={ef}: {b} against f32 {a}"
                );
            }
            for q in &queries {
                let hits = half.search(q, 10, 40);
                assert_eq!(hits.len(), 10);
                for w in hits.windows(2) {
                    assert!(w[0].1 <= w[1].1, "{metric:?}: not nearest first: {hits:?}");
                }
                for &(i, d) in &hits {
                    assert_eq!(d, distance::internal(metric, q, &base[i]), "{metric:?}");
                }
            }
            // Every point finds itself, first, at distance zero (dot: its own norm).
            for (i, v) in base.iter().enumerate().step_by(37) {
                let hits = half.search(v, 1, 40);
                assert_eq!(hits.first().map(|h| h.0), Some(i), "{metric:?}");
            }
        }
    }

    #[test]
    fn compact_storages_find_vectors_that_share_a_large_offset() {
        // Every component 1000 +- 1.2: scaled to each vector's largest component, the codes of
        // all these vectors would be nearly the same (8-bit recall was 0.01 before the center).
        let shift = |v: Vec<Vec<f32>>| -> Vec<Vec<f32>> {
            v.into_iter()
                .map(|p| p.into_iter().map(|x| x + 1000.0).collect())
                .collect()
        };
        let base = shift(data(3000, 16, 21, false));
        let queries = shift(data(100, 16, 22, false));
        for metric in [Metric::L2, Metric::Dot] {
            let full = build(EngineKind::Native, metric, &base, Some(3), false);
            let a = recall(full.as_ref(), metric, &base, &queries, 40);
            for kind in [EngineKind::NativeF16, EngineKind::NativeI8] {
                // One batch (center: its mean) and one point at a time (center: the first).
                for parallel in [false, true] {
                    let e = if parallel {
                        build(kind, metric, &base, Some(3), true)
                    } else {
                        let e = new_engine_of(kind, metric, 16, &config(Some(3)), 0);
                        for (i, v) in base.iter().enumerate() {
                            e.insert(v, i);
                        }
                        e
                    };
                    let b = recall(e.as_ref(), metric, &base, &queries, 40);
                    assert!(b >= a - 0.03, "{kind:?} {metric:?}: {b} against f32 {a}");
                }
            }
        }
    }

    #[test]
    fn parallel_build_finds_as_well() {
        let base = data(4000, 32, 5, false);
        let queries = data(100, 32, 6, false);
        let par = build(EngineKind::Native, Metric::L2, &base, None, true);
        assert_eq!(par.len(), base.len());
        assert!(recall(par.as_ref(), Metric::L2, &base, &queries, 40) >= 0.9);
    }

    #[test]
    fn seeded_single_thread_builds_are_identical() {
        let base = data(2000, 16, 7, false);
        for kind in [
            EngineKind::Native,
            EngineKind::NativeF16,
            EngineKind::NativeI8,
        ] {
            let a = build(kind, Metric::L2, &base, Some(11), false);
            let b = build(kind, Metric::L2, &base, Some(11), false);
            for q in data(50, 16, 8, false) {
                assert_eq!(a.search(&q, 10, 20), b.search(&q, 10, 20), "{kind:?}");
            }
        }
    }

    #[test]
    fn every_point_finds_itself_after_concurrent_inserts_and_searches() {
        let base = data(3000, 16, 9, false);
        // Small initial capacity, so inserts grow new segments while searches run.
        let e = Native::new(Metric::L2, 16, &config(None), 100);
        std::thread::scope(|scope| {
            for t in 0..2 {
                let (e, base) = (&e, &base);
                scope.spawn(move || {
                    for (i, v) in base.iter().enumerate().filter(|(i, _)| i % 2 == t) {
                        e.insert(v, i);
                    }
                });
            }
            let (e, base) = (&e, &base);
            scope.spawn(move || {
                for q in base.iter().cycle().take(3000) {
                    let found = e.search(q, 5, 20);
                    assert!(found.len() <= 5);
                    assert!(found.windows(2).all(|w| w[0].1 <= w[1].1));
                }
            });
        });
        assert_eq!(e.len(), base.len());
        let mut missed = 0;
        for (i, v) in base.iter().enumerate() {
            let found = e.search(v, 1, 40);
            if found.first().map(|f| f.1) != Some(0.0) {
                missed += 1;
            }
            let _ = i;
        }
        assert!(
            missed <= base.len() / 200,
            "{missed} of {} points not found",
            base.len()
        );
    }

    /// Parallel builds (4 threads, more than this machine's cores, so inserts interleave),
    /// followed as in a generation's build by `link_orphans`, must leave every point reachable:
    /// each is found first by its own vector, and every node but the entry point has a level-0
    /// link to it. Before inserts waited for the nodes they reach to be complete (module docs),
    /// these builds lost about two points in each round, most of them still linked from some
    /// node (so `link_orphans` alone would not have saved them).
    #[test]
    fn parallel_builds_lose_no_point() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(4)
            .build()
            .expect("thread pool");
        let (n, dim) = (2000, 4);
        let config = HnswConfig {
            m: 8,
            ef_construction: 32,
            ef_search: 40,
            seed: None,
        };
        for (round, storage) in (0..21u64).map(|r| {
            (
                r / 3,
                [Storage::F32, Storage::Half, Storage::Int8][r as usize % 3],
            )
        }) {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(round);
            let base: Vec<Vec<f32>> = (0..n)
                .map(|_| (0..dim).map(|_| rng.gen_range(-1.0f32..1.0)).collect())
                .collect();
            let e = Native::with_storage(Metric::L2, dim as u32, &config, n, storage);
            let items: Vec<(&[f32], usize)> = base
                .iter()
                .enumerate()
                .map(|(i, v)| (v.as_slice(), i))
                .collect();
            pool.install(|| e.insert_many(&items, true));
            assert_eq!(e.len(), n);
            e.link_orphans();
            let mut linked = vec![false; n];
            for i in 0..n as u32 {
                let links = e.links(i, 0);
                let (count, slots) = links.split_first().expect("a level-0 block");
                for slot in &slots[..count.load(AtOrd::Relaxed) as usize] {
                    linked[slot.load(AtOrd::Relaxed) as usize] = true;
                }
            }
            let entry = e.entry.read().map(|(id, _)| id as usize);
            let unlinked: Vec<usize> = (0..n).filter(|&i| !linked[i] && Some(i) != entry).collect();
            let lost: Vec<usize> = (0..n)
                .filter(|&i| e.search(&base[i], 1, 400).first().map(|f| f.0) != Some(i))
                .collect();
            assert!(
                unlinked.is_empty() && lost.is_empty(),
                "round {round} {storage:?}: nodes no link reaches {unlinked:?}, points not found {lost:?}"
            );
        }
    }

    /// A point no level-0 link reaches cannot be found; `link_orphans` links it from a near
    /// point, into a free slot or, when every list is full, in place of a link to a point that
    /// other links also reach.
    #[test]
    fn link_orphans_reconnects_a_point_no_link_reaches() {
        for full_lists in [false, true] {
            let base = data(1000, 16, 12, false);
            let e = Native::new(Metric::L2, 16, &config(Some(1)), base.len());
            for (i, v) in base.iter().enumerate() {
                e.insert(v, i);
            }
            let entry = e.entry.read().map(|(id, _)| id).expect("an entry point");
            let u = (0..base.len() as u32)
                .find(|&i| e.level_of(i) == 0 && i != entry)
                .expect("a level-0 node");
            let (_, upper_top) = e.entry.read().expect("entry");
            assert!(upper_top >= 1);
            for i in 0..base.len() as u32 {
                let links = e.links(i, 0);
                let (count, slots) = links.split_first().expect("a block");
                let n = count.load(AtOrd::Relaxed) as usize;
                let mut kept: Vec<u32> = slots[..n]
                    .iter()
                    .map(|s| s.load(AtOrd::Relaxed))
                    .filter(|&o| o != u)
                    .collect();
                if full_lists {
                    kept.resize(slots.len(), entry);
                }
                Native::write_links(links, kept.into_iter());
            }
            let found = |e: &Native| e.search(&base[u as usize], 1, 400).first().map(|f| f.0);
            assert_ne!(found(&e), Some(u as usize), "an orphan is found");
            assert_eq!(e.link_orphans(), 1, "full lists: {full_lists}");
            assert_eq!(found(&e), Some(u as usize), "full lists: {full_lists}");
            assert_eq!(e.link_orphans(), 0);
        }
    }

    #[test]
    fn unit_vectors_whose_dot_is_one_are_at_distance_zero() {
        for metric in [Metric::Cosine, Metric::Dot] {
            let base = data(500, 384, 12, true);
            let e = build(EngineKind::Native, metric, &base, Some(1), false);
            for (i, v) in base.iter().enumerate().take(50) {
                let found = e.search(v, 1, 40);
                assert_eq!(found[0].0, i, "{metric:?}");
                let d = distance::reported(metric, found[0].1);
                assert!(d.abs() < 1e-5 && d >= -1e-5, "{metric:?}: {d}");
            }
        }
    }

    #[test]
    fn empty_and_oversized_requests() {
        let e = Native::new(Metric::L2, 4, &config(Some(1)), 10);
        assert!(e.search(&[0.0; 4], 10, 10).is_empty());
        e.insert(&[1.0, 0.0, 0.0, 0.0], 0);
        e.insert(&[1.0, 0.0, 0.0, 0.0], 0); // a repeated id is ignored
        e.insert(&[0.0, 1.0, 0.0, 0.0], 5000); // past the first segment
        assert_eq!(e.len(), 2);
        let found = e.search(&[0.0, 1.0, 0.0, 0.0], 10, 1);
        assert_eq!(found.iter().map(|f| f.0).collect::<Vec<_>>(), vec![5000, 0]);
        assert!(e.search(&[0.0; 3], 10, 10).is_empty()); // wrong dimension
        assert!(e.memory_bytes() > 0);
    }
}
