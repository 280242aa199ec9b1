//! Per-thread buffers a search reuses, so a search allocates nothing but its answer.
//!
//! # Invariants
//! - A thread's [`Scratch`] is taken out of its slot for the length of one search
//!   ([`with_scratch`]), so a nested search on the same thread gets a fresh one instead of
//!   sharing; the visited set is empty when a search starts ([`Scratch::start`] clears exactly
//!   the words the last search dirtied).
//! - [`QueryBuf`] gives its buffers back to the thread when dropped; during thread teardown they
//!   are simply freed.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::hnsw::{Cand, Pooled};

/// Per-thread search state, reused across searches (and engines).
#[derive(Default)]
pub(super) struct Scratch {
    /// One bit per node: visited in this search. A bitset rather than a mark per node, because
    /// what a search pays for is cache misses: 30,000 nodes take 3.75 KiB of bits (60 cache
    /// lines) against 58 KiB of 16-bit epoch marks, and between two searches of a server the
    /// rest of the call (and other work on the core) cools the caches.
    pub(super) bits: Vec<u64>,
    /// The words of `bits` this search set, cleared when the next one starts (so starting costs
    /// what the last search touched, not the size of the graph).
    pub(super) dirty: Vec<u32>,
    /// The unfiltered layer search's pool: the `ef` nearest nodes found, sorted by distance then
    /// id, each marked once expanded.
    pub(super) pool: Vec<Pooled>,
    /// The distance of each node of `pool`, at the same place (counted through for an insert's
    /// place; the only copy of them).
    pub(super) pool_d: Vec<f32>,
    /// A filtered search's candidates and results (hnswlib's two heaps).
    pub(super) candidates: BinaryHeap<Reverse<Cand>>,
    pub(super) top: BinaryHeap<Cand>,
    /// A layer search's answer: the nodes it found, nearest first.
    pub(super) found: Vec<Cand>,
    /// The unvisited neighbours of the node being expanded.
    pub(super) batch: Vec<u32>,
    /// When a search asks for it (the findability check): the level-0 nodes it expanded, in
    /// order.
    pub(super) trail: Option<Vec<u32>>,
}

impl Scratch {
    pub(super) fn start(&mut self, nodes: usize) {
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
        self.pool.clear();
        self.pool_d.clear();
        self.candidates.clear();
        self.top.clear();
    }

    /// Whether `id` was visited in this search.
    #[inline]
    pub(super) fn visited(&self, id: u32) -> bool {
        self.bits
            .get((id >> 6) as usize)
            .is_some_and(|w| w & (1u64 << (id & 63)) != 0)
    }

    /// Marks `id` visited; false if it already was in this search.
    #[inline]
    pub(super) fn visit(&mut self, id: u32) -> bool {
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
pub(super) fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|cell| {
        let mut s = cell.take();
        let r = f(&mut s);
        *cell.borrow_mut() = s;
        r
    })
}

/// A thread's buffers for a query's other forms.
#[derive(Default)]
pub(super) struct QueryBufs {
    pub(super) r: Vec<f32>,
    pub(super) fixed: Vec<i16>,
}

thread_local! {
    static QUERY_BUFS: RefCell<QueryBufs> = RefCell::new(QueryBufs::default());
}

/// This thread's query buffers, given back when dropped (so a search allocates nothing for
/// them after its thread's first).
pub(super) struct QueryBuf(pub(super) QueryBufs);

impl QueryBuf {
    pub(super) fn take() -> Self {
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
