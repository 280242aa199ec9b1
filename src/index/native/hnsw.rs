//! The HNSW algorithm on the engine's layout: node levels, greedy descent, the layer search,
//! neighbour selection, linking (the in-link floor, findability checks, re-linking orphans),
//! and the [`Engine`] implementation.
//!
//! # Invariants
//! - An insert writes its own lists at every level before it links any other node to it, and
//!   publishes ids only with `Release` stores (module docs of `native`, "Concurrency").
//! - Writers of a node's list hold that node's lock; searches take none and see every slot
//!   either empty or holding a fully inserted id.
//! - A node's level depends only on the seed and its id ("Determinism").
//! - Every level-0 list change is counted in its targets' in-link counters (`Native::in_links`):
//!   a new list, a link added, a prune's rewrite (each dropped link released once); a loaded
//!   snapshot counts its links again, to the same counts (test `in_link_counts_match_the_links`).
//! - A prune never takes a node below [`MIN_IN_LINKS`] level-0 in-links (the count is the
//!   permission: [`Native::release_link`]), so a node once reachable stays reachable whatever
//!   is inserted later; only a list whose every link is so protected gives one up (counted).
//! - Findability: an insert that leaves the new node with at most [`MIN_IN_LINKS`] in-links
//!   (or makes it an outlier of its nearest neighbour) links it from the nearest point of each
//!   region about as near as that neighbour ([`Native::homes`]), joins the region of a recently
//!   checked node much nearer to it than anything its beam found ([`Native::join_region`]),
//!   then searches for it with k = 1 at ef_search / 4 and at ef_search and links it from where
//!   a search that missed it ended ([`Native::make_findable`]). Those links are protected by
//!   the floor above. Measured, not proven: on 48,000 online outliers (40 seeds, 3 storages, 1
//!   and 8 writers) every one was found first at ef 200, and all but one or two at ef 64;
//!   of 36,000 points upserted online that form new clusters (6 seeds, 2 storages), 11 were
//!   missed at ef 200 and 65 at ef 64 (941 and 1,013 before the join; docs/scale.md).
//!   That holds for small indexes only: at 100,000 clustered 128-d points and 60,000 online
//!   outliers, later outliers that become an earlier one's nearest neighbour (hubs, near to
//!   hundreds of points nearer than it) do not link it: 8.6 % of them were missed at ef 200.
//!   What finds those is the server's findability check after the writes (`Engine::check_found`,
//!   driven by `catalog/check.rs`): a search for each point, and where it missed, a link from
//!   a node that search expanded (it records them: [`Native::search_traced`]; not merely a
//!   node of its answer, as a beam that spends its budget of expansions leaves some of those
//!   unexpanded), into a free slot or else in place of a redundant link; a search that
//!   expands a node sees all its links, so the next search for the point finds it.
//! - A prune keeps the link from a node's nearest neighbour (the first of its own list) while
//!   the node has at most M in-links ([`Native::pinned`]); that halved those misses, to 4 %
//!   (test `online_outliers_at_scale`).
//! - A layer search that keeps every node, with ef up to [`POOL_MAX_EF`], runs on one sorted pool
//!   ([`Native::beam`]) and expands the same nodes in the same order as hnswlib's two heaps
//!   ([`Native::beam_filtered`], which filtered searches and bigger beams use), so either finds
//!   the same nodes (test `the_pool_beam_finds_what_the_two_heaps_find`).
//! - 8-bit searches rank exactly every candidate of the beam whose code distance cannot rule it
//!   out of the `k` nearest ([`Native::coded_lower_bound`]), not only the [`rerank_count`]
//!   nearest by code, so points that the codes tie (close together, far from the center) are
//!   still ranked in their true order.

use std::cmp::{Ordering, Reverse};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering as AtOrd};
use std::sync::OnceLock;

use parking_lot::Mutex;
use rayon::prelude::*;

use super::encoding::{Kept, Query, Storage};
use super::scratch::{with_scratch, QueryBuf, Scratch};
use super::{Block, Native, EMPTY, MAX_LEVEL};
use crate::index::distance;
use crate::index::engine::{Checked, Engine, FrozenGraph};
use crate::model::Metric;

/// A graph node's distance to the query, ordered by distance then id (so heaps are deterministic).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Cand {
    pub(super) d: f32,
    pub(super) id: u32,
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

/// Which nodes a layer search may return ([`Native::search_layer`]).
#[derive(Clone, Copy)]
pub(super) enum Keep<'a> {
    /// Every node: builds, inserts, searches of a graph without tombstones.
    All,
    /// Only the nodes passing the test; the others still guide the search.
    Only(&'a dyn Fn(u32) -> bool),
}

/// How a layer search runs ([`Native::search_layer`]).
#[derive(Clone, Copy, Debug)]
pub(super) struct Layer {
    /// The beam: how many nearest nodes it keeps.
    pub(super) ef: usize,
    pub(super) level: usize,
    /// `Some(k)` bounds the work when the nodes that pass are scarce near the query (most of
    /// the graph tombstoned): past [`EXPANSIONS_PER_EF`]` * ef` expanded nodes the search stops
    /// as soon as it holds `k` that pass, instead of walking on until it has `ef` of them.
    pub(super) enough: Option<usize>,
    /// Inserts: also ask for the next candidate's first neighbours' vectors at the end of each
    /// expansion.
    pub(super) ahead: bool,
}

impl Layer {
    /// An insert's search of `level` with a beam of `ef`.
    pub(super) fn insert(ef: usize, level: usize) -> Self {
        Layer {
            ef,
            level,
            enough: None,
            ahead: true,
        }
    }
}

/// A node of [`Native::beam`]'s pool: its id, and whether it was expanded (its distance stands
/// at the same place in the pool's distances, `Scratch::pool_d`).
#[derive(Clone, Copy, Debug)]
pub(super) struct Pooled {
    pub(super) id: u32,
    pub(super) done: bool,
}

/// How many of a search's candidates (nearest first by the compact vectors) the compact storages
/// rank again by exact distances, for `k` results: `max(2k, k + 10)`. Measured on the 30k
/// 384-d set at ef_search 40 and k 10: re-ranking all 40 or the nearest 20 gave the same
/// recall@10 with 8-bit vectors (0.9704, 0.9705) and half floats (0.9708, 0.9716); the nearest
/// 10 alone lost 0.004 with 8-bit vectors; and 20 instead of 40 cut the p50 by about a fifth.
pub(super) fn rerank_count(k: usize) -> usize {
    (2 * k).max(k + 10)
}

/// A filtered search (past tombstones) that has expanded this many times `ef` nodes stops as
/// soon as it holds `k` live ones ([`Native::search_layer`]). A search of a graph without
/// tombstones expands about `ef` nodes, so this binds only when fewer than about one point in
/// EXPANSIONS_PER_EF near the query is live; measured with 90% of the points deleted it left
/// recall@10 at ef 64 unchanged (see docs/scale.md).
pub(super) const EXPANSIONS_PER_EF: usize = 8;

/// How many candidates ahead selection and re-ranking ask for float vectors, and how many of
/// the next candidate's neighbours an insert's beam asks for at the end of an expansion.
pub(super) const LOOKAHEAD: usize = 2;

/// About how many cache lines of neighbours' search vectors a beam search keeps asked for
/// ahead of the one it compares ([`beam_lookahead`]). 18 when a node's 8-bit scale was in its
/// row (128-d codes 3 lines, 6 ahead; 384-d 7 lines, 2 ahead); 16 since it is not, which asks
/// for 128-d codes (2 lines) 8 ahead and keeps 384-d codes (6 lines) at 2.
pub(super) const LINES_IN_FLIGHT: usize = 16;

/// How many neighbours ahead a beam search asks for search vectors of `cells` cells each:
/// enough to keep about [`LINES_IN_FLIGHT`] cache lines coming, at least 2 and at most 8. A
/// graph bigger than the caches waits on memory for each neighbour, and 2 ahead (what all
/// sizes used before) did not cover that wait for small vectors. Measured with 128-d 8-bit
/// vectors (`beam_lookahead_cost` in the engine's tests, 3 rounds, medians) when a node's row
/// held its scale too (3 lines, so 6 ahead): 200k points built 1.09x as fast, 20k more inserted
/// online 1.10x, searched (ef 64) at 0.84x the p50; 100k points (most of the graph in the
/// 32 MiB L3) 1.05x, 1.01x and 0.89x. Since the scale moved to the node's meta cells the
/// codes are 2 lines, so 8 ahead (the scale's line, in a small array that is mostly cached, is
/// asked for too but not counted): 200k + 20k online linking, 64 a call, measured 1.08x the
/// layout before in each of two runs (`online_linking_rate`, 3 rounds alternating, medians),
/// where counting that line (6 ahead) gave 1.07x and 1.02x. Big vectors (384-d 8-bit, 128-d
/// floats) keep 2: 3, 4 and 6 measured no faster on the 30k words.
pub(super) fn beam_lookahead(cells: usize) -> usize {
    let lines = (cells * 4).div_ceil(64).max(1);
    (LINES_IN_FLIGHT / lines).clamp(2, 8)
}

/// The largest `ef` a search that keeps every node runs on one sorted pool ([`Native::beam`]);
/// past it, hnswlib's two heaps ([`Native::beam_filtered`]), as each neighbour the pool takes
/// moves about half of it. Measured (`pool_beam_cost`, 100k 128-d, level-0 beams, p50 of the
/// pool against the heaps): 0.91x at ef 200 to 1000, 0.97x at 2000, 1.01x at 3000, 1.13x at
/// 5000, 1.44x at 10,000 (the largest ef_search a query may ask for).
pub(super) const POOL_MAX_EF: usize = 2048;

/// A prune never takes a node's level-0 in-links below this many (the heuristic keeps another
/// link in its place): see [`Native::release_link`]. Points like their surroundings have many
/// more (about M), so the floor binds for points unlike the data, whose findability links
/// ([`Native::homes`], [`Native::make_findable`]) it keeps: 3 is as many as those add. (Its
/// share of the measured findability was not measured apart from theirs.)
pub(super) const MIN_IN_LINKS: u16 = 3;
/// [`Native::join_region`]: how many of a region's points link to a node that joins it (and
/// it to them); 8 measured no better.
pub(super) const JOIN_LINKS: usize = 3;
/// [`Native::join_region`]: a recently checked node is in a region the insert's beam missed
/// when its (internal) distance is below this share of the nearest candidate's. Points of a
/// new cluster are about 1/80 of it; an outlier's other recent outliers, nearly as far as its
/// nearest candidate (0.9 of it), are not (joining those cost outliers' inserts 12 %).
pub(super) const JOIN_NEARER: f32 = 0.25;
/// [`Native::join_region`]: how many recently checked nodes are remembered (a node checks
/// their distances, 2 cache lines each with 128-d 8-bit codes).
pub(super) const RECENT_CHECKED: usize = 256;

/// [`Native::homes`]: candidates within this share of the nearest neighbour's (internal)
/// distance are as near as it.
pub(super) const HOME_SLACK: f32 = 0.1;
/// [`Native::homes`]: a candidate nearer than this share of its distance to the new node to
/// a point already chosen is in that point's region.
pub(super) const HOME_COVER: f32 = 0.25;

impl Native {
    /// The level of node `id`: from a hash of the seed and the id, so independent of order.
    pub(super) fn level_of(&self, id: u32) -> usize {
        let mut z = self.seed ^ (id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        // splitmix64's finaliser
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let u = ((z >> 11) as f64 + 1.0) / (1u64 << 53) as f64; // (0, 1]
        ((-u.ln() * self.level_mult) as usize).min(MAX_LEVEL)
    }

    /// Greedy descent at one level from `cur` (ef = 1).
    pub(super) fn greedy(&self, q: &Query, mut cur: Cand, level: usize) -> Cand {
        loop {
            let mut changed = false;
            if let Some((count, slots)) = self.links(cur.id, level) {
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

    /// The best-first search of one level (`l`, [`Layer`]) from `ep`: leaves the `ef` nearest
    /// nodes found that `keep` allows in `s.found`, nearest first.
    ///
    /// A node that `keep` refuses (a tombstone) still guides the search, as hnswlib does with its
    /// deleted marks: it enters the candidates but never takes a result slot, and the search
    /// goes on until it has `ef` nodes that pass. With [`Keep::All`] (every build and insert,
    /// and searches of a graph without tombstones) this is the plain HNSW search, run on one
    /// sorted pool ([`Self::beam`]) up to ef [`POOL_MAX_EF`].
    pub(super) fn search_layer(&self, q: &Query, ep: Cand, l: Layer, s: &mut Scratch, keep: Keep) {
        match keep {
            Keep::All if l.ef <= POOL_MAX_EF => self.beam(q, ep, l, s),
            Keep::All => self.beam_filtered(q, ep, l, s, &|_| true),
            Keep::Only(keep) => self.beam_filtered(q, ep, l, s, keep),
        }
    }

    /// The unvisited neighbours of `c` at `level` in `batch` (marked visited), their search
    /// vectors asked for [`beam_lookahead`] ahead; calls `each` with each one's distance, in
    /// list order, while the next ones' vectors come in. The search is bound by memory latency
    /// (vectors at random places, 3-24 cache lines each), and asking for every line of the next
    /// ones overlaps the misses.
    #[inline(always)]
    fn expand(
        &self,
        q: &Query,
        c: u32,
        level: usize,
        s: &mut Scratch,
        mut each: impl FnMut(&mut Scratch, Cand),
    ) {
        let Some((count, slots)) = self.links(c, level) else {
            return;
        };
        if level == 0 {
            if let Some(trail) = s.trail.as_mut() {
                trail.push(c);
            }
        }
        let n = (count.load(AtOrd::Acquire) as usize).min(slots.len());
        let mut batch = std::mem::take(&mut s.batch);
        batch.clear();
        for slot in &slots[..n] {
            let id = slot.load(AtOrd::Acquire);
            if id != EMPTY && s.visit(id) {
                batch.push(id);
            }
        }
        for &id in batch.iter().take(self.beam_lookahead) {
            self.prefetch_vector(id);
        }
        for (j, &id) in batch.iter().enumerate() {
            if let Some(&next) = batch.get(j + self.beam_lookahead) {
                self.prefetch_vector(next);
            }
            if let Some(d) = self.dist_to(q, id) {
                each(s, Cand { d, id });
            }
        }
        s.batch = batch;
    }

    /// An insert's beam (ef_construction) is long and its graph often bigger than the caches:
    /// the candidate expanded next is the nearest one now, so ask for the vectors of its first
    /// unvisited neighbours too (its list was asked for when this expansion began). Measured on
    /// 100k 128-d: online linking 1.11x, a build 1.06x; queries on the 30k words (short beams, a
    /// graph in cache) were no faster, so they skip it.
    #[inline(always)]
    fn look_ahead(&self, s: &Scratch, next: u32, level: usize) {
        self.linked(next, level)
            .filter(|&id| !s.visited(id))
            .take(LOOKAHEAD)
            .for_each(|id| self.prefetch_vector(id));
    }

    /// [`Self::search_layer`] keeping every node: one pool of the `ef` nearest nodes found,
    /// sorted, each marked once expanded; the nearest not yet expanded is expanded next, and
    /// the search ends when every node of the pool is. It expands the same nodes in the same
    /// order as hnswlib's two heaps (a node that heap order would expand after the beam is full
    /// and farther than its farthest is one the pool has dropped, and that is where hnswlib
    /// stops), for a place and a short move per accepted neighbour instead of two heap pushes
    /// and a pop (the heaps were 12 % of online linking's time). The place is counted through
    /// the pool's distances, kept apart from its ids in `pool_d` ([`distance::count_below`]):
    /// a binary search over the pool was a chain of dependent loads, 7 % of a server's CPU
    /// under 64 writers; counting made online linking, builds and searches about 1.08x as fast
    /// in process. The move grows with `ef`: past [`POOL_MAX_EF`] the heaps run instead.
    pub(super) fn beam(&self, q: &Query, ep: Cand, l: Layer, s: &mut Scratch) {
        let Layer {
            ef,
            level,
            enough,
            ahead,
        } = l;
        s.start(self.slots.load(AtOrd::Relaxed));
        s.visit(ep.id);
        let ef = ef.max(1);
        // Empty: `Scratch::start` cleared them.
        let mut pool = std::mem::take(&mut s.pool);
        let mut pool_d = std::mem::take(&mut s.pool_d);
        pool.push(Pooled {
            id: ep.id,
            done: false,
        });
        pool_d.push(ep.d);
        let budget = ef.saturating_mul(EXPANSIONS_PER_EF);
        let mut expanded = 0usize;
        // Every node of the pool before `first` is expanded.
        let mut first = 0usize;
        loop {
            while pool.get(first).is_some_and(|p| p.done) {
                first += 1;
            }
            let Some(p) = pool.get_mut(first) else {
                break;
            };
            p.done = true;
            let id = p.id;
            if let Some(k) = enough {
                expanded += 1;
                if expanded > budget && pool.len() >= k {
                    break;
                }
            }
            // The next candidate's list is read once this one is expanded: ask for it now (it
            // is apart from the vector its distance was measured with).
            let next = pool[first..].iter().find(|p| !p.done).map(|p| p.id);
            if let Some(next) = next {
                self.prefetch_links(next, level);
            }
            self.expand(q, id, level, s, |_, cand| {
                if pool.len() >= ef && pool_d.last().is_some_and(|&w| cand.d >= w) {
                    return;
                }
                // Its place in (d, id) order: after the nearer ones, then after those as near
                // with a smaller id.
                let mut at = distance::count_below(&pool_d, cand.d);
                while pool_d.get(at) == Some(&cand.d)
                    && pool.get(at).is_some_and(|p| p.id < cand.id)
                {
                    at += 1;
                }
                pool.insert(
                    at,
                    Pooled {
                        id: cand.id,
                        done: false,
                    },
                );
                pool_d.insert(at, cand.d);
                if pool.len() > ef {
                    pool.pop();
                    pool_d.pop();
                }
                first = first.min(at);
            });
            if ahead {
                if let Some(next) = pool[first..].iter().find(|p| !p.done) {
                    self.look_ahead(s, next.id, level);
                }
            }
        }
        s.found.clear();
        s.found
            .extend(pool.iter().zip(&pool_d).map(|(p, &d)| Cand { d, id: p.id }));
        s.pool = pool;
        s.pool_d = pool_d;
    }

    /// [`Self::search_layer`] with a filter: hnswlib's two heaps, the candidates (every node
    /// found nearer than the farthest result) and the results (the `ef` nearest that pass).
    pub(super) fn beam_filtered(
        &self,
        q: &Query,
        ep: Cand,
        l: Layer,
        s: &mut Scratch,
        keep: &dyn Fn(u32) -> bool,
    ) {
        let Layer {
            ef,
            level,
            enough,
            ahead,
        } = l;
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
            if let Some(Reverse(next)) = s.candidates.peek() {
                self.prefetch_links(next.id, level);
            }
            self.expand(q, c.id, level, s, |s, cand| {
                let worst = s.top.peek().map_or(f32::INFINITY, |t| t.d);
                if s.top.len() < ef || cand.d < worst {
                    s.candidates.push(Reverse(cand));
                    if keep(cand.id) {
                        s.top.push(cand);
                        if s.top.len() > ef {
                            s.top.pop();
                        }
                    }
                }
            });
            if let Some(&Reverse(next)) = s.candidates.peek().filter(|_| ahead) {
                self.look_ahead(s, next.id, level);
            }
        }
        // Nearest first, both heaps' allocations kept.
        s.found.clear();
        while let Some(c) = s.top.pop() {
            s.found.push(c);
        }
        s.found.reverse();
    }

    /// Counts a new level-0 link to `id` (its list's writer holds the list's lock).
    #[inline]
    pub(super) fn gain_link(&self, id: u32) {
        if let Some(c) = self.in_links_of(id) {
            let _ = c.fetch_update(AtOrd::AcqRel, AtOrd::Acquire, |n| n.checked_add(1));
        }
    }

    /// Asks to drop one level-0 link to `id`: granted (and counted) unless `id` has at most
    /// [`MIN_IN_LINKS`] of them. The count is the permission, so two lists pruning the same
    /// node at once cannot both take it below the floor. A saturated count stays saturated.
    #[inline]
    pub(super) fn release_link(&self, id: u32) -> bool {
        let Some(c) = self.in_links_of(id) else {
            return true;
        };
        let floor = if self.findable { MIN_IN_LINKS } else { 0 };
        c.fetch_update(AtOrd::AcqRel, AtOrd::Acquire, |n| match n {
            u16::MAX => Some(n),
            n if n > floor => Some(n - 1),
            _ => None,
        })
        .is_ok()
    }

    /// Drops one level-0 link to `id` whatever its count (a list full of protected links).
    #[inline]
    pub(super) fn force_release_link(&self, id: u32) {
        if let Some(c) = self.in_links_of(id) {
            let _ = c.fetch_update(AtOrd::AcqRel, AtOrd::Acquire, |n| match n {
                u16::MAX | 0 => None,
                n => Some(n - 1),
            });
        }
    }

    /// Whether `base`'s level-0 link to node `of` is pinned: `of` has at most M in-links and
    /// its nearest neighbour as its own list knows it (the first link: lists are written
    /// nearest first) is `base`. A search for `of` ends at or near `base`, so a prune of
    /// `base`'s list keeps that link ([`Self::protect`], [`Self::most_redundant`]). In data
    /// without clusters (points unlike the data, many dimensions) a point's nearest neighbour
    /// is often a hub, near to hundreds of points nearer than this one, whose prunes would
    /// drop it. Nodes with more in-links are found from many places, and pinning theirs too
    /// cost recall@10 at ef 16 about 0.01 on clustered data.
    #[inline]
    pub(super) fn pinned(&self, base: u32, of: u32) -> bool {
        if !self.findable || !self.pins {
            return false;
        }
        let many = u16::try_from(self.m).unwrap_or(u16::MAX);
        if self
            .in_links_of(of)
            .is_some_and(|c| c.load(AtOrd::Acquire) > many)
        {
            return false;
        }
        self.links(of, 0).is_some_and(|(count, slots)| {
            count.load(AtOrd::Acquire) > 0
                && slots
                    .first()
                    .is_some_and(|s| s.load(AtOrd::Acquire) == base)
        })
    }

    /// Whether a prune may drop a link to `id` now (a hint; [`Self::release_link`] decides).
    #[inline]
    pub(super) fn droppable(&self, id: u32) -> bool {
        let floor = if self.findable { MIN_IN_LINKS } else { 0 };
        self.in_links_of(id)
            .is_none_or(|c| c.load(AtOrd::Acquire) > floor)
    }

    /// hnswlib's neighbour heuristic: from `cands` (nearest first), keep up to `m`, skipping a
    /// candidate that is nearer to one already kept than to the base point.
    pub(super) fn select(&self, cands: &[Cand], m: usize) -> Vec<Cand> {
        if cands.len() <= m {
            return cands.to_vec();
        }
        let mut kept: Vec<(Cand, Kept<'_>)> = Vec::with_capacity(m);
        for c in cands.iter().take(LOOKAHEAD) {
            self.prefetch_kept(c.id);
        }
        for (j, &c) in cands.iter().enumerate() {
            if kept.len() >= m {
                break;
            }
            // The vectors the heuristic compares are at random places (float vectors apart
            // from the links; codes a search mostly just read): ask for the next ones while
            // this one is compared.
            if let Some(next) = cands.get(j + LOOKAHEAD) {
                self.prefetch_kept(next.id);
            }
            let Some(vc) = self.kept_vector(c.id) else {
                continue;
            };
            if kept.iter().all(|&(_, vr)| self.kept_dist(vc, vr) >= c.d) {
                kept.push((c, vc));
            }
        }
        kept.into_iter().map(|(c, _)| c).collect()
    }

    /// [`Self::select`] over a full list and a new link (`cands`, nearest first), each marked
    /// whether it is *known*: known links passed the heuristic together, so the distance
    /// between two of them is not needed again (hnswlib computes them on every prune of a full
    /// list). Keeps the same links as [`Self::select`]; all of them are known together after.
    /// None when fewer than `m + 1` candidates have vectors (then nothing is pruned). Apart
    /// from [`Self::select`] because a prune's vectors were all just read (no prefetching):
    /// one function for both measured 0.85-0.98x online linking (4 rounds at 200k).
    pub(super) fn select_known(&self, cands: &[(Cand, bool)], m: usize) -> Option<Vec<Cand>> {
        if cands.len() <= m {
            return None;
        }
        let mut kept: Vec<(Cand, Kept<'_>, bool)> = Vec::with_capacity(m);
        for &(c, known) in cands {
            if kept.len() >= m {
                break;
            }
            let Some(vc) = self.kept_vector(c.id) else {
                continue;
            };
            if kept
                .iter()
                .all(|&(_, vr, kr)| (known && kr) || self.kept_dist(vc, vr) >= c.d)
            {
                kept.push((c, vc, known));
            }
        }
        Some(kept.into_iter().map(|(c, _, _)| c).collect())
    }

    /// Rewrites a link block (caller holds the node's lock): slots first, then the count.
    pub(super) fn write_links(links: Block<'_>, ids: impl Iterator<Item = u32>) {
        let Some((count, slots)) = links else {
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
    pub(super) fn link_back(&self, id: u32, selected: &[Cand], level: usize) -> (bool, bool) {
        let cap = if level == 0 { self.m0 } else { self.m };
        let (mut linked, mut outlier) = (false, false);
        let nearest = selected.iter().find(|c| c.id != id).map(|c| c.id);
        for nb in selected {
            self.prefetch_kept(nb.id);
        }
        let Some(v) = self.kept_vector(id) else {
            return (linked, outlier);
        };
        for nb in selected {
            if nb.id == id {
                continue;
            }
            let Some((seg, off)) = self.node(nb.id) else {
                continue;
            };
            let nb_vec = self.kept_in(seg, off);
            let mut known = seg.locks[off].lock();
            let Some((count, slots)) = self.links_in(seg, off, level) else {
                continue;
            };
            let n = (count.load(AtOrd::Acquire) as usize).min(slots.len());
            if n < cap.min(slots.len()) {
                if Some(nb.id) == nearest {
                    linked = true;
                    let d = self.kept_dist(nb_vec, v);
                    outlier = slots[..n].iter().all(|slot| {
                        let other = slot.load(AtOrd::Acquire);
                        other == EMPTY
                            || self
                                .kept_vector(other)
                                .is_none_or(|ov| self.kept_dist(nb_vec, ov) < d)
                    });
                }
                slots[n].store(id, AtOrd::Release);
                count.store(n as u32 + 1, AtOrd::Release);
                if level == 0 {
                    self.gain_link(id);
                }
                continue;
            }
            // Full: keep the heuristic's choice among the old links and the new node, whose
            // vectors (as the heuristic compares them) are asked for all at once first (they
            // are at random places).
            for slot in &slots[..n] {
                self.prefetch_kept(slot.load(AtOrd::Acquire));
            }
            // The first `*known` level-0 links passed the heuristic together (the lock's
            // value, kept by every writer of the list): of their pairs, none is compared again.
            let known_n = match level {
                0 if self.known_links => usize::from(*known).min(n),
                _ => 0,
            };
            let mut marked: Vec<(Cand, bool)> = Vec::with_capacity(n + 1);
            marked.push((
                Cand {
                    d: self.kept_dist(nb_vec, v),
                    id,
                },
                false,
            ));
            for (i, slot) in slots[..n].iter().enumerate() {
                let other = slot.load(AtOrd::Acquire);
                if other == EMPTY {
                    continue;
                }
                if let Some(ov) = self.kept_vector(other) {
                    let d = self.kept_dist(nb_vec, ov);
                    marked.push((Cand { d, id: other }, i < known_n));
                }
            }
            marked.sort_unstable_by_key(|a| a.0);
            let cands: Vec<Cand> = marked.iter().map(|&(c, _)| c).collect();
            let chosen = self.select_known(&marked, cap);
            // How many of the links written are known together after: what the heuristic
            // chose, up to any put in its place.
            let mut known_after = chosen.as_ref().map_or(0, Vec::len);
            let mut kept = chosen.unwrap_or_else(|| cands.clone());
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
            if level == 0 {
                if let Some(p) = self.protect(nb.id, id, &cands, &mut kept, cap) {
                    known_after = known_after.min(p);
                }
            }
            if Some(nb.id) == nearest {
                linked = kept.iter().any(|c| c.id == id);
                outlier = cands.last().is_some_and(|c| c.id == id);
            }
            Self::write_links(Some((count, slots)), kept.iter().map(|c| c.id));
            if level == 0 {
                *known = u8::try_from(known_after).unwrap_or(0);
            }
        }
        (linked, outlier)
    }

    /// Keeps the level-0 in-link floor through a prune (caller holds the list's lock): of the
    /// list's old links (`cands` but `new`, nearest first) that the heuristic's `kept` drops,
    /// each is released ([`Self::release_link`]) or, if it is one of its node's last
    /// [`MIN_IN_LINKS`] or pinned to `base` ([`Self::pinned`]), kept: in a free slot, else in
    /// place of the farthest kept link that may go (the new node's, or one not pinned whose
    /// release is granted). Counts the new node's link if it stays. Returns the first position
    /// of `kept` it replaced, if any.
    fn protect(
        &self,
        base: u32,
        new: u32,
        cands: &[Cand],
        kept: &mut Vec<Cand>,
        cap: usize,
    ) -> Option<usize> {
        let mut first_replaced: Option<usize> = None;
        // The old links the heuristic dropped, decided on once each: one that a later one
        // replaces below was released then, and is not taken back.
        let dropped: Vec<Cand> = cands
            .iter()
            .filter(|c| c.id != new && !kept.iter().any(|k| k.id == c.id))
            .copied()
            .collect();
        for c in dropped {
            if !self.pinned(base, c.id) && self.release_link(c.id) {
                continue;
            }
            if kept.len() < cap {
                kept.push(c);
                continue;
            }
            let mut gone = None;
            for p in (0..kept.len()).rev() {
                let k = kept[p].id;
                if self.pinned(base, k) {
                    continue;
                }
                if k == new || self.release_link(k) {
                    gone = Some(p);
                    break;
                }
            }
            match gone {
                Some(p) => {
                    kept[p] = c;
                    first_replaced = Some(first_replaced.map_or(p, |f| f.min(p)));
                }
                None => self.force_release_link(c.id),
            }
        }
        if kept.iter().any(|k| k.id == new) {
            self.gain_link(new);
        }
        first_replaced
    }

    /// Makes sure a search for node `id` (vector `v`), one with few in-links or an outlier,
    /// finds it: a search for a point unlike the rest of the data can end among points nearly
    /// as far as its true neighbours but elsewhere (another cluster), so where it ends gets a
    /// link to it (in place of its most redundant one), up to twice per beam. Two beams:
    /// ef_search / 4, then ef_search (a wider beam does not always end where a narrower one
    /// does; checking the narrow one too leaves links that survive later inserts changing the
    /// paths). Those links count toward the node's in-link floor, so no prune removes them.
    pub(super) fn make_findable(&self, id: u32, v: &[f32]) {
        let efs: &[usize] = if self.findable {
            &[(self.ef_search / 4).max(1), self.ef_search]
        } else {
            &[self.ef_search]
        };
        for &ef in efs {
            for _ in 0..2 {
                let found = self.search_keeping(v, 1, ef, Keep::All);
                let Some(&(landed, _)) = found.first() else {
                    return;
                };
                let landed = landed as u32;
                if landed == id {
                    break;
                }
                let Some(base) = self.vector(landed) else {
                    return;
                };
                self.add_link(landed, id, |slots| self.most_redundant(landed, base, slots));
            }
        }
    }

    /// Links node `id` from the nearest point of each region about as near to it as its
    /// nearest neighbour (`near`: the insert's candidates within [`HOME_SLACK`] of the
    /// nearest), up to [`MIN_IN_LINKS`] of them: a point between regions is found from
    /// whichever a later search for it ends in.
    pub(super) fn homes(&self, id: u32, v: &[f32], near: &[Cand]) {
        let mut chosen: Vec<&[f32]> = Vec::new();
        for c in near {
            if chosen.len() >= MIN_IN_LINKS as usize {
                break;
            }
            let Some(vc) = self.vector(c.id) else {
                continue;
            };
            let d = self.dist(v, vc);
            if chosen.iter().any(|r| self.dist(vc, r) < d * HOME_COVER) {
                continue;
            }
            chosen.push(vc);
            self.add_link(c.id, id, |slots| self.most_redundant(c.id, vc, slots));
        }
    }

    /// Links node `id` (vector `v`, query `q`; one the findability checks cover) into the
    /// region of the nearest recently checked node that is much nearer to it than the
    /// insert's nearest candidate (`nearest`, in the beam's distance; [`JOIN_NEARER`]): its
    /// beam reached the region's surroundings but not the region. Points upserted online that
    /// form a new cluster far from the data enter it by whichever point's link a beam meets
    /// first, and without this a cluster can grow as groups that no link joins, of which
    /// searches reach one (the first point of each group is such a checked node). A beam from
    /// that node at ef_construction finds the region's nearest [`JOIN_LINKS`] points, and each
    /// links to the node and the node to each (in a free slot, else in place of the list's
    /// most redundant link). Then the node is remembered as recently checked, the newest
    /// [`RECENT_CHECKED`] kept.
    pub(super) fn join_region(&self, id: u32, v: &[f32], q: &Query, nearest: f32) {
        let recent: Vec<u32> = self.recent_checked.lock().iter().copied().collect();
        for &r in recent.iter().take(LOOKAHEAD) {
            self.prefetch_vector(r);
        }
        let mut best: Option<Cand> = None;
        for (j, &r) in recent.iter().enumerate() {
            if let Some(&next) = recent.get(j + LOOKAHEAD) {
                self.prefetch_vector(next);
            }
            let Some(d) = self.dist_to(q, r) else {
                continue;
            };
            if d < nearest * JOIN_NEARER && best.is_none_or(|b| d < b.d) {
                best = Some(Cand { d, id: r });
            }
        }
        if let Some(from) = best {
            let region: Vec<Cand> = with_scratch(|s| {
                let keep = |x: u32| x != id;
                let ef = self.ef_construction;
                self.search_layer(q, from, Layer::insert(ef, 0), s, Keep::Only(&keep));
                s.found.iter().take(JOIN_LINKS).copied().collect()
            });
            for c in &region {
                if let Some(vc) = self.vector(c.id) {
                    self.add_link(c.id, id, |slots| self.most_redundant(c.id, vc, slots));
                    self.add_link(id, c.id, |slots| self.most_redundant(id, v, slots));
                }
            }
        }
        let mut recent = self.recent_checked.lock();
        if recent.len() >= RECENT_CHECKED {
            recent.pop_front();
        }
        recent.push_back(id);
    }

    /// Gives node `id`, which its nearest level-0 neighbour (first of `selected`) did not keep
    /// a link to, a level-0 link from that neighbour: into a free slot, else in place of its
    /// most redundant link ([`Self::most_redundant`]). A point unlike the rest of the data is
    /// pruned from the lists of its neighbours (each keeps a nearer point that lies between
    /// them), and the in-links it may keep from farther ones lead from places a search for it
    /// never goes; a search for it does reach its nearest neighbour.
    pub(super) fn adopt(&self, id: u32, selected: &[Cand]) {
        let Some(nearest) = selected.iter().find(|c| c.id != id) else {
            return;
        };
        if let Some(base) = self.vector(nearest.id) {
            self.add_link(nearest.id, id, |slots| {
                self.most_redundant(nearest.id, base, slots)
            });
        }
    }

    /// Of a full level-0 list of the node at `base` (caller holds its lock), the slot to give
    /// up: of the two linked points nearest each other, the one farther from `base` (the one
    /// hnswlib's heuristic would prune), which stays one hop from the other. A point adopted
    /// before, far from every other, is never the one dropped.
    pub(super) fn most_redundant<'a>(
        &self,
        base_id: u32,
        base: &[f32],
        slots: &'a [AtomicU32],
    ) -> Option<&'a AtomicU32> {
        let linked: Vec<(usize, &[f32])> = slots
            .iter()
            .enumerate()
            .filter_map(|(i, slot)| {
                let id = slot.load(AtOrd::Acquire);
                (id != EMPTY).then(|| self.vector(id).map(|v| (i, v)))?
            })
            .collect();
        // Never one of a node's last in-links ([`MIN_IN_LINKS`]), nor a pinned one.
        let may = |x: usize| {
            let id = slots[x].load(AtOrd::Acquire);
            self.droppable(id) && !self.pinned(base_id, id)
        };
        let mut best: Option<(f32, usize)> = None;
        for (a, &(i, va)) in linked.iter().enumerate() {
            for &(j, vb) in &linked[a + 1..] {
                let d = self.dist(va, vb);
                if best.is_none_or(|(bd, _)| d < bd) {
                    let (far, near) = if self.dist(base, va) > self.dist(base, vb) {
                        (i, j)
                    } else {
                        (j, i)
                    };
                    if may(far) {
                        best = Some((d, far));
                    } else if may(near) {
                        best = Some((d, near));
                    }
                }
            }
        }
        best.and_then(|(_, j)| slots.get(j))
    }

    /// One pass of [`Engine::link_orphans`]: every inserted node that no walk over level-0
    /// links from `entry` reaches (no in-link at all, or only links from an island of nodes
    /// that link each other) is linked from the nearest point a search finds, which is reached
    /// by construction. Returns how many it linked and whether any took the slot of an
    /// existing link.
    fn link_unreached(&self, entry: u32) -> (usize, bool) {
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
                for to in self.level0(id) {
                    if indegree.len() <= to as usize {
                        indegree.resize(to as usize + 1, 0);
                    }
                    indegree[to as usize] = indegree[to as usize].saturating_add(1);
                }
            }
        }
        let top = nodes.iter().copied().max().map_or(0, |m| m as usize + 1);
        let mut reached = self.reached_from(entry, top);
        let (mut linked, mut replaced) = (0, false);
        for &u in &nodes {
            if reached.get(u as usize).copied().unwrap_or(true) {
                continue;
            }
            let Some(v) = self.vector(u) else { continue };
            let ef = self.ef_construction;
            let found = self.search_keeping(v, ef, ef, Keep::Only(&|id| id != u));
            // The nearest point with a free slot links to it; if all are full, the nearest
            // gives its link to the point that most other links also reach.
            let mut took_slot = false;
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
                        took_slot = true;
                        Some(most)
                    })
                });
            if done {
                if indegree.len() <= u as usize {
                    indegree.resize(u as usize + 1, 0);
                }
                indegree[u as usize] = indegree[u as usize].saturating_add(1);
                // Only `u`: the rest of its island gets links of its own, each from near its
                // own point (a walk through `u` alone may not lead a search to them).
                reached[u as usize] = true;
                linked += 1;
                replaced |= took_slot;
            }
        }
        (linked, replaced)
    }

    /// The ids in node `id`'s level-0 list.
    fn level0(&self, id: u32) -> impl Iterator<Item = u32> + '_ {
        self.linked(id, 0)
    }

    /// The ids in node `id`'s list at `level`.
    #[inline(always)]
    pub(super) fn linked(&self, id: u32, level: usize) -> impl Iterator<Item = u32> + '_ {
        let (n, slots) = match self.links(id, level) {
            Some((count, slots)) => (
                (count.load(AtOrd::Acquire) as usize).min(slots.len()),
                slots,
            ),
            None => (0, &[][..]),
        };
        slots[..n]
            .iter()
            .map(|s| s.load(AtOrd::Acquire))
            .filter(|&to| to != EMPTY)
    }

    /// By id, whether a walk over level-0 links from `from` reaches the node (at least
    /// `size` entries).
    fn reached_from(&self, from: u32, size: usize) -> Vec<bool> {
        let mut reached = vec![false; size.max(from as usize + 1)];
        reached[from as usize] = true;
        let mut stack = vec![from];
        while let Some(id) = stack.pop() {
            for to in self.level0(id) {
                let to = to as usize;
                if reached.len() <= to {
                    reached.resize(to + 1, false);
                }
                if !reached[to] {
                    reached[to] = true;
                    stack.push(to as u32);
                }
            }
        }
        reached
    }

    /// Adds a level-0 link from `from` to `to`: into a free slot, or else into the slot `full`
    /// picks from the full list. False if neither.
    pub(super) fn add_link<'a>(
        &'a self,
        from: u32,
        to: u32,
        full: impl FnOnce(&'a [AtomicU32]) -> Option<&'a AtomicU32>,
    ) -> bool {
        let Some((seg, off)) = self.node(from) else {
            return false;
        };
        let mut known = seg.locks[off].lock();
        let Some((count, slots)) = self.links_in(seg, off, 0) else {
            return false;
        };
        let n = (count.load(AtOrd::Acquire) as usize).min(slots.len());
        if slots[..n].iter().any(|s| s.load(AtOrd::Acquire) == to) {
            return true;
        }
        if let Some(free) = slots.get(n) {
            free.store(to, AtOrd::Release);
            count.store(n as u32 + 1, AtOrd::Release);
            self.gain_link(to);
            return true;
        }
        match full(slots) {
            Some(slot) => {
                let old = slot.load(AtOrd::Acquire);
                if old != EMPTY && !self.release_link(old) {
                    return false;
                }
                slot.store(to, AtOrd::Release);
                self.gain_link(to);
                // The new link is not known to pass the heuristic with the others.
                if let Some(i) = slots.iter().position(|s| std::ptr::eq(s, slot)) {
                    *known = (*known).min(u8::try_from(i).unwrap_or(u8::MAX));
                }
                true
            }
            None => false,
        }
    }

    /// The `k` nearest nodes passing `keep`, nearest first.
    pub(super) fn search_keeping(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        keep: Keep,
    ) -> Vec<(usize, f32)> {
        self.search_traced(query, k, ef, keep, None)
    }

    /// [`Self::search_keeping`], putting in `trail` (when given) the level-0 nodes the search
    /// expanded, in order: a link from any of them is met by the same search again.
    pub(super) fn search_traced(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        keep: Keep,
        mut trail: Option<&mut Vec<u32>>,
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
            let l = Layer {
                ef: ef.max(k),
                level: 0,
                enough: Some(k),
                ahead: false,
            };
            if let Some(t) = trail.as_deref_mut() {
                t.clear();
                s.trail = Some(std::mem::take(t));
            }
            self.search_layer(&q, cur, l, s, keep);
            if let Some(t) = trail {
                *t = s.trail.take().unwrap_or_default();
            }
            if self.storage != Storage::F32 {
                // Rank the nearest candidates by their exact distances (float vectors, asked
                // for a few candidates ahead): [`rerank_count`] of them, as reading
                // float vectors from all over memory is a good part of a search's time.
                let mut found = std::mem::take(&mut s.found);
                let rest = found.split_off(rerank_count(k).min(found.len()));
                for c in found.iter().take(LOOKAHEAD) {
                    self.prefetch_float(c.id);
                }
                for j in 0..found.len() {
                    if let Some(next) = found.get(j + LOOKAHEAD) {
                        self.prefetch_float(next.id);
                    }
                    let c = &mut found[j];
                    if let Some(v) = self.vector(c.id) {
                        c.d = self.dist(query, v);
                    }
                }
                self.rerank_uncertain(&q, query, k, &mut found, &rest);
                found.sort_unstable();
                s.found = found;
            }
            s.found
                .iter()
                .take(k)
                .map(|c| (c.id as usize, c.d))
                .collect()
        })
    }
}

impl Native {
    /// After the first [`rerank_count`] candidates are ranked exactly (`ranked`), ranks also
    /// each of the `rest` (nearest first by code distance) whose code distance cannot rule it
    /// out of the `k` nearest: its lower bound ([`Native::coded_lower_bound`]) is below the
    /// k-th exact distance so far. 8-bit codes of points close to each other and far from the
    /// center (where a code step is large) can order them wrongly by more than the window; a
    /// point that a search reached is then still ranked where it belongs.
    fn rerank_uncertain(
        &self,
        q: &Query,
        query: &[f32],
        k: usize,
        ranked: &mut Vec<Cand>,
        rest: &[Cand],
    ) {
        if self.storage != Storage::Int8 || !self.bounded_rerank || rest.is_empty() || k == 0 {
            return;
        }
        ranked.sort_unstable();
        let mut kth = ranked.get(k - 1).map_or(f32::INFINITY, |c| c.d);
        let q_norm = match self.metric {
            Metric::L2 => 0.0,
            Metric::Cosine | Metric::Dot => distance::dot(query, query).sqrt(),
        };
        for c in rest {
            if self.coded_lower_bound(q, q_norm, c.id, c.d) >= kth {
                continue;
            }
            let Some(v) = self.vector(c.id) else { continue };
            let d = self.dist(query, v);
            ranked.push(Cand { d, id: c.id });
            if d < kth {
                ranked.sort_unstable();
                kth = ranked.get(k - 1).map_or(f32::INFINITY, |c| c.d);
            }
        }
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
        self.write_vector(seg, off, vector);
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
        let mut near: Vec<Cand> = Vec::new();
        with_scratch(|s| {
            for l in (0..=level.min(top)).rev() {
                let ef = self.ef_construction;
                self.search_layer(&q, cur, Layer::insert(ef, l), s, Keep::All);
                let found = std::mem::take(&mut s.found);
                let selected = self.select(&found, self.m);
                Self::write_links(self.links_in(seg, off, l), selected.iter().map(|c| c.id));
                if l == 0 {
                    selected.iter().for_each(|c| self.gain_link(c.id));
                    let limit = found.first().map_or(0.0, |c| c.d * (1.0 + HOME_SLACK));
                    near.extend(found.iter().take_while(|c| c.d <= limit).take(64));
                }
                if let Some(&nearest) = found.first() {
                    cur = nearest;
                }
                selections.push((l, selected));
                s.found = found; // keeps the allocation
            }
        });
        for (l, selected) in &selections {
            let (linked, outlier) = self.link_back(id, selected, *l);
            if *l == 0 {
                if !linked {
                    self.adopt(id, selected);
                }
                let few = self.findable
                    && self
                        .in_links_of(id)
                        .is_some_and(|c| c.load(AtOrd::Acquire) <= MIN_IN_LINKS);
                if outlier || few {
                    if self.findable {
                        self.homes(id, v, &near);
                        let nearest = near.first().map_or(f32::INFINITY, |c| c.d);
                        self.join_region(id, v, &q, nearest);
                    }
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
        self.prepare_inserts(items);
        if parallel && items.len() > 1 {
            items.par_iter().for_each(|&(v, id)| self.insert(v, id));
        } else {
            for &(v, id) in items {
                self.insert(v, id);
            }
        }
    }

    fn prepare_inserts(&self, items: &[(&[f32], usize)]) {
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
    }

    fn search(&self, query: &[f32], k: usize, ef: usize) -> Vec<(usize, f32)> {
        self.search_keeping(query, k, ef, Keep::All)
    }

    fn search_filtered(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        keep: &dyn Fn(usize) -> bool,
    ) -> Option<Vec<(usize, f32)>> {
        Some(self.search_keeping(query, k, ef, Keep::Only(&|id| keep(id as usize))))
    }

    fn checks_found(&self) -> bool {
        true
    }

    fn check_found(
        &self,
        internal: usize,
        ef: usize,
        keep: Option<&dyn Fn(usize) -> bool>,
        link: &dyn Fn(&dyn Fn()),
    ) -> Checked {
        let Ok(id) = u32::try_from(internal) else {
            return Checked::Skipped;
        };
        let Some(v) = self.vector(id) else {
            return Checked::Skipped;
        };
        let only = |x: u32| keep.is_none_or(|k| k(x as usize));
        let filter = || match keep {
            Some(_) => Keep::Only(&only),
            None => Keep::All,
        };
        let mut trail = Vec::new();
        let first = |trail: &mut Vec<u32>| {
            self.search_traced(v, 1, ef, filter(), Some(trail))
                .first()
                .copied()
        };
        let Some((landed, d)) = first(&mut trail) else {
            return Checked::Missed;
        };
        if landed == internal {
            return Checked::Found;
        }
        if d <= self.dist(v, v) {
            // A point as near as the point itself (at the same place) ranks before it: no
            // link helps.
            return Checked::Missed;
        }
        // The search expanded the nodes of its trail (a beam that ran out of its budget of
        // expansions did not expand every node of its answer), so a link from any of them is
        // met by the same search again, and the point ranks first. The nearest with a free
        // slot takes it; failing that (or when the search still misses it, as a link made
        // since changed its path), the nearest that can, in place of its most redundant link.
        for attempt in 0..2 {
            let mut near: Vec<Cand> = trail
                .iter()
                .filter(|&&x| x != id)
                .filter_map(|&x| {
                    Some(Cand {
                        d: self.dist(v, self.vector(x)?),
                        id: x,
                    })
                })
                .collect();
            near.sort_unstable();
            link(&|| {
                if attempt == 0 && near.iter().any(|c| self.add_link(c.id, id, |_| None)) {
                    return;
                }
                // A list may have no link to give up (each one a point's last ways in).
                near.iter().any(|c| {
                    self.vector(c.id).is_some_and(|base| {
                        self.add_link(c.id, id, |slots| self.most_redundant(c.id, base, slots))
                    })
                });
            });
            if first(&mut trail).is_some_and(|f| f.0 == internal) {
                return Checked::Linked;
            }
        }
        Checked::Missed
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
        // A pass links every node that a level-0 walk from the entry point does not reach. A
        // link given up for one (every list near it full) is one whose target other links also
        // reach, but those may all come from inside what it reached: a second pass finds that.
        let mut linked = 0;
        for _ in 0..4 {
            let (n, replaced) = self.link_unreached(entry);
            linked += n;
            if !replaced {
                break;
            }
        }
        linked
    }

    fn len(&self) -> usize {
        self.count.load(AtOrd::Relaxed)
    }

    fn freeze(&self, limit: usize) -> Option<Box<dyn FrozenGraph + '_>> {
        Some(Box::new(self.freeze_links(limit)))
    }

    fn memory_bytes(&self) -> u64 {
        let slots = self.slots.load(AtOrd::Relaxed);
        let per_slot = (self.cells + self.full_dim()) * 4 // vectors
            + (self.m0 + self.meta) * 4 // level-0 links, their count (and the 8-bit scale)
            + std::mem::size_of::<OnceLock<Box<[AtomicU32]>>>()
            + std::mem::size_of::<Mutex<u8>>()
            + std::mem::size_of::<AtomicBool>()
            + std::mem::size_of::<std::sync::atomic::AtomicU16>(); // level-0 in-links
        (slots * per_slot + self.upper_bytes.load(AtOrd::Relaxed)) as u64
    }
}
