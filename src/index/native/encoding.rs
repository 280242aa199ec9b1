//! Vector encodings: how a node's vector is kept next to its links and the distance a search
//! computes to it.
//!
//! # Invariants
//! - [`Storage::F32`] keeps the float vector next to the links; [`Storage::Half`] and
//!   [`Storage::Int8`] keep a compact copy there, relative to the engine's center (set once, by
//!   the first insert or batch, before any compact vector is written), and the float vector
//!   apart for exact distances: searches rank their final candidates by exact distances, and
//!   inserts choose neighbours by them too, except with [`Storage::Int8`] under L2 or cosine,
//!   whose neighbour heuristic compares the codes ([`Kept`]).
//! - A node's cells are written once ([`Native::write_vector`]), by the thread that claimed it,
//!   before it is published (see `memory`); this file reads them only through `memory`'s views.

use std::sync::atomic::{AtomicU32, Ordering as AtOrd};

use super::memory::{self, prefetch_cells, Segment};
use super::scratch::QueryBufs;
use super::Native;
use crate::index::distance;
use crate::model::Metric;

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
    /// of the float vector's bytes, with the float vectors kept apart as with [`Storage::Half`]
    /// (but under L2 or cosine inserts choose neighbours by the codes: [`Kept`]). Both compact
    /// storages keep each vector relative to the engine's center ([`Native::center`]).
    Int8,
}

/// A node's vector as the neighbour heuristic (inserts' choice of links and prunes of full
/// lists) compares it: with [`Storage::Int8`] under L2 or cosine its 8-bit codes and scale,
/// else (dot, and the other storages) its float vector. The codes are 2 cache lines at 128-d
/// where the float vector is 8, and a prune of a full list reads the vectors of all its 32
/// links; a search has just read most of the codes. The candidates' distances to the new point
/// are the search's (to the codes) as well. Measured in docs/engines.md ("The heuristic on
/// codes").
#[derive(Clone, Copy)]
pub(super) enum Kept<'a> {
    Float(&'a [f32]),
    Codes(&'a [i8], f32),
}

/// A query as graph searches compare it. The compact storages keep each vector relative to the
/// engine's center `c` ([`Native::center`]), so for them a query also carries `q - c` (for L2)
/// and `q . c` (added to `q . (x - c)` for cosine and dot); with [`Storage::Int8`] under cosine
/// or dot also `q` as 16-bit fixed point with its scale, for the integer kernel
/// ([`distance::dot_i16_i8`]).
pub(super) struct Query<'a> {
    pub(super) v: &'a [f32],
    /// `q - c` for L2 (otherwise just `q`, unused).
    pub(super) r: &'a [f32],
    /// `q . c` for cosine and dot (otherwise 0, unused).
    pub(super) qc: f32,
    pub(super) fixed: Option<(&'a [i16], f32)>,
}

impl Native {
    /// A node's cells of the vector searches compare with (after its level-0 links).
    #[inline(always)]
    pub(super) fn search_cells<'a>(&self, seg: &'a Segment, off: usize) -> &'a [AtomicU32] {
        let start = off * self.stride() + self.m0;
        &seg.level0[start..start + self.cells]
    }

    /// The cell of a node's 8-bit codes' scale (in its meta cells, after the level-0 link
    /// count); None with the other storages, which keep no scale.
    #[inline(always)]
    pub(super) fn scale_cell<'a>(&self, seg: &'a Segment, off: usize) -> Option<&'a AtomicU32> {
        if self.storage != Storage::Int8 {
            return None;
        }
        seg.meta.get(off * self.meta + 1)
    }

    /// A node's float vector cells.
    #[inline(always)]
    pub(super) fn vector_cells<'a>(&self, seg: &'a Segment, off: usize) -> &'a [AtomicU32] {
        match self.storage {
            Storage::F32 => self.search_cells(seg, off),
            Storage::Half | Storage::Int8 => &seg.full[off * self.dim..(off + 1) * self.dim],
        }
    }

    /// A node's float vector, as inserted.
    #[inline(always)]
    pub(super) fn vector_in<'a>(&self, seg: &'a Segment, off: usize) -> &'a [f32] {
        memory::as_f32(self.vector_cells(seg, off))
    }

    /// A node's half vector ([`Storage::Half`] only).
    #[inline(always)]
    pub(super) fn half_in<'a>(&self, seg: &'a Segment, off: usize) -> &'a [u16] {
        memory::as_u16(self.search_cells(seg, off), self.dim)
    }

    /// A node's 8-bit codes and their scale ([`Storage::Int8`] only).
    #[inline(always)]
    pub(super) fn i8_in<'a>(&self, seg: &'a Segment, off: usize) -> (&'a [i8], f32) {
        let Some(scale) = self.scale_cell(seg, off) else {
            return (&[], 0.0);
        };
        (
            memory::as_i8(self.search_cells(seg, off), self.dim),
            f32::from_bits(scale.load(AtOrd::Relaxed)),
        )
    }

    #[inline(always)]
    pub(super) fn vector(&self, id: u32) -> Option<&[f32]> {
        self.node(id).map(|(seg, off)| self.vector_in(seg, off))
    }

    /// The exact internal distance of two float vectors.
    #[inline(always)]
    pub(super) fn dist(&self, a: &[f32], b: &[f32]) -> f32 {
        distance::internal(self.metric, a, b)
    }

    /// A node's vector as the neighbour heuristic compares it ([`Kept`]).
    #[inline(always)]
    pub(super) fn kept_in<'a>(&self, seg: &'a Segment, off: usize) -> Kept<'a> {
        if self.heuristic_codes() {
            let (codes, scale) = self.i8_in(seg, off);
            Kept::Codes(codes, scale)
        } else {
            Kept::Float(self.vector_in(seg, off))
        }
    }

    /// Node `id`'s vector as the neighbour heuristic compares it ([`Kept`]).
    #[inline(always)]
    pub(super) fn kept_vector(&self, id: u32) -> Option<Kept<'_>> {
        self.node(id).map(|(seg, off)| self.kept_in(seg, off))
    }

    /// Whether the neighbour heuristic compares 8-bit codes ([`Kept`]).
    #[inline(always)]
    fn heuristic_codes(&self) -> bool {
        self.storage == Storage::Int8 && self.metric != Metric::Dot
    }

    /// The neighbour heuristic's distance of two nodes' vectors ([`Self::kept_vector`]).
    #[inline(always)]
    pub(super) fn kept_dist(&self, a: Kept<'_>, b: Kept<'_>) -> f32 {
        match (a, b) {
            (Kept::Float(a), Kept::Float(b)) => self.dist(a, b),
            // Cosine's vectors are unit length, so 1 - a.b is half their squared distance
            // (the center cancels out of a difference).
            (Kept::Codes(a, sa), Kept::Codes(b, sb)) => {
                let l2 = distance::l2sq_code_pair(a, sa, b, sb);
                match self.metric {
                    Metric::L2 => distance::internal_from(Metric::L2, l2),
                    _ => distance::internal_from(Metric::Cosine, 1.0 - 0.5 * l2),
                }
            }
            // Never: both come from one engine's `kept_vector`. As far as can be (the
            // heuristic keeps a link that is farther from all kept ones).
            (Kept::Codes(..), Kept::Float(_)) | (Kept::Float(_), Kept::Codes(..)) => f32::INFINITY,
        }
    }

    /// Prefetches what [`Self::kept_vector`] of node `id` reads.
    #[inline(always)]
    pub(super) fn prefetch_kept(&self, id: u32) {
        if self.heuristic_codes() {
            self.prefetch_vector(id);
        } else {
            self.prefetch_float(id);
        }
    }

    /// `v` as searches of this engine compare it (`bufs` hold its other forms).
    pub(super) fn query<'a>(&self, v: &'a [f32], bufs: &'a mut QueryBufs) -> Query<'a> {
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
    pub(super) fn dist_node(&self, q: &Query, seg: &Segment, off: usize) -> f32 {
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

    /// A lower bound of the exact internal distance from `q` to node `id` whose 8-bit code
    /// distance is `coded` ([`Storage::Int8`]; the other storages return `coded`). A code is
    /// within half its scale of each component, so the vector it stands for is within
    /// `scale * sqrt(dim) / 2` of the node's: for L2 the exact distance is at least the coded
    /// one less that (in distance units); for cosine and dot the dot product moves by at most
    /// `|q|` times that, plus the query's own fixed-point rounding (`q_norm`: `|q|`).
    pub(super) fn coded_lower_bound(&self, q: &Query, q_norm: f32, id: u32, coded: f32) -> f32 {
        if self.storage != Storage::Int8 {
            return coded;
        }
        let Some((seg, off)) = self.node(id) else {
            return coded;
        };
        let (_, scale) = self.i8_in(seg, off);
        let root = (self.dim as f32).sqrt();
        let off_by = scale * root * 0.5;
        match self.metric {
            Metric::L2 => {
                let below = (coded.sqrt() - off_by).max(0.0);
                below * below
            }
            Metric::Cosine | Metric::Dot => {
                // |x^| <= 127 * scale * sqrt(dim); the fixed-point query is within fs / 2 of q
                // in each component.
                let fixed = q
                    .fixed
                    .map_or(0.0, |(_, fs)| fs * root * 0.5 * 127.0 * scale * root);
                let slack = q_norm * off_by + fixed;
                if self.metric == Metric::Cosine {
                    (coded - slack).max(0.0)
                } else {
                    // Internal dot distances: 1 - q.x, shifted to stay positive and ordered.
                    let d = distance::reported(Metric::Dot, coded) - slack;
                    if d >= 0.0 {
                        d + 1.0
                    } else {
                        d.exp()
                    }
                }
            }
        }
    }

    #[inline(always)]
    pub(super) fn dist_to(&self, q: &Query, id: u32) -> Option<f32> {
        self.node(id).map(|(seg, off)| self.dist_node(q, seg, off))
    }

    /// Prefetches every cache line of node `id`'s search vector, and its scale's with
    /// [`Storage::Int8`] (nothing for an unknown id).
    #[inline(always)]
    pub(super) fn prefetch_vector(&self, id: u32) {
        if let Some((seg, off)) = self.node(id) {
            prefetch_cells(self.search_cells(seg, off));
            if let Some(scale) = self.scale_cell(seg, off) {
                memory::prefetch(std::ptr::from_ref(scale).cast());
            }
        }
    }

    /// Prefetches every cache line of node `id`'s float vector (nothing for an unknown id).
    #[inline(always)]
    pub(super) fn prefetch_float(&self, id: u32) {
        if let Some((seg, off)) = self.node(id) {
            prefetch_cells(self.vector_cells(seg, off));
        }
    }

    /// Writes a claimed, unpublished node's vector: its float cells and, with the compact
    /// storages, its compact copy relative to the center (set here by the first insert if no
    /// batch set it). Only the thread that claimed the node calls this, before publishing it.
    pub(super) fn write_vector(&self, seg: &Segment, off: usize, vector: &[f32]) {
        // The calling thread owns the node (its claim) and the node is not yet published, so
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
                if let Some(cell) = self.scale_cell(seg, off) {
                    cell.store(scale.to_bits(), AtOrd::Relaxed);
                }
                for (cell, four) in self.search_cells(seg, off).iter().zip(codes.chunks(4)) {
                    let mut b = [0u8; 4];
                    for (x, &c) in b.iter_mut().zip(four) {
                        *x = c as u8;
                    }
                    cell.store(u32::from_ne_bytes(b), AtOrd::Relaxed);
                }
            }
        }
    }
}
