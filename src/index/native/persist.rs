//! The snapshot layout of a native graph (`index::snapshot` writes and reads the files).
//!
//! # Invariants
//! - A graph's links are copied ([`Native::freeze_links`]) only while nothing inserts; the copy is
//!   written ([`Frozen::write`]) while inserts may go on, past the copied nodes: a node's
//!   vectors never change once it is published, so the file holds the graph as it was copied.
//! - A loaded graph searches exactly like the one saved; anything out of range in the input is
//!   an `InvalidData` error, never a panic or an out-of-bounds node.

use std::sync::atomic::{AtomicU32, Ordering as AtOrd};

use super::encoding::Storage;
use super::memory::Segment;
use super::{Native, EMPTY, MAX_LEVEL};
use crate::index::engine::EngineMemory;
use crate::model::{HnswConfig, Metric};

/// Snapshots (`super::snapshot`): the graph written as the engine keeps it and read back into an
/// engine that searches exactly like the one written.
///
/// Layout (little-endian): storage u8, dimension u32, m u32, ef_construction u32, seed u64,
/// base u64; the center (u8 present, then `dim` f32 bits); the entry point (u8 present, id u32,
/// top level u32); inserted nodes u64; node slots written u64; then per slot: claimed u8 and,
/// if claimed, its level-0 cells (count, slots, then the search vector: the scale and the codes
/// with 8-bit codes), its float vector cells (compact storages) and its upper-level block (u32
/// length + cells). The engine keeps the count and the scale apart from the row
/// (`memory::Segment::meta`); the file keeps the layout it always had.
impl Native {
    /// Writes the graph. Nothing may insert meanwhile (the caller owns the engine exclusively,
    /// as a build does before its generation is published).
    pub fn save_graph(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        self.freeze_links(usize::MAX).write(out)
    }

    /// Copies what inserts change in the graph's first `limit` node slots (every node's
    /// links, the entry point, the count) for [`Frozen::write`], which writes the graph as it
    /// was now while inserts go on. Nothing may insert while this runs, and inserts after it
    /// must take slots from `limit` on (a generation's linker: nodes past its linked ones).
    pub fn freeze_links(&self, limit: usize) -> Frozen<'_> {
        let mut slots = 0usize;
        for (s, seg) in self.segments.iter().enumerate() {
            let Some(seg) = seg.get() else { continue };
            let start = if s == 0 { 0 } else { self.base << (s - 1) };
            if let Some(last) = seg.claimed.iter().rposition(|c| c.load(AtOrd::Acquire)) {
                slots = slots.max(start + last + 1);
            }
        }
        let slots = slots.min(limit);
        let links = 1 + self.m0;
        let mut f = Frozen {
            g: self,
            count: 0,
            entry: *self.entry.read(),
            claimed: Vec::with_capacity(slots),
            level0: Vec::with_capacity(slots * links),
            upper_at: Vec::with_capacity(slots + 1),
            upper: Vec::new(),
        };
        f.upper_at.push(0);
        for id in 0..slots {
            match u32::try_from(id).ok().and_then(|id| self.node(id)) {
                Some((seg, off)) if seg.claimed[off].load(AtOrd::Acquire) => {
                    f.claimed.push(true);
                    f.count += 1;
                    match self.links_in(seg, off, 0) {
                        Some((count, slots)) => f.level0.extend(
                            std::iter::once(count)
                                .chain(slots)
                                .map(|c| c.load(AtOrd::Acquire)),
                        ),
                        None => f.level0.extend(std::iter::repeat_n(0, links)),
                    }
                    if let Some(block) = seg.upper[off].get() {
                        f.upper.extend(block.iter().map(|c| c.load(AtOrd::Acquire)));
                    }
                }
                _ => {
                    f.claimed.push(false);
                    f.level0.extend(std::iter::repeat_n(0, links));
                }
            }
            f.upper_at.push(f.upper.len());
        }
        f
    }

    /// A node's vector cells in the file's order, after its count and links: the 8-bit
    /// scale, the search vector, the float vector (compact storages): the cells of a row laid
    /// out as hnswlib's, then `full`.
    fn file_vector_cells<'a>(
        &self,
        seg: &'a Segment,
        off: usize,
    ) -> impl Iterator<Item = &'a AtomicU32> {
        let full = self.full_dim();
        self.scale_cell(seg, off)
            .into_iter()
            .chain(self.search_cells(seg, off))
            .chain(&seg.full[off * full..(off + 1) * full])
    }

    fn storage_code(storage: Storage) -> u8 {
        match storage {
            Storage::F32 => 0,
            Storage::Half => 1,
            Storage::Int8 => 2,
        }
    }

    /// Reads a graph written by [`Native::save_graph`] for `metric`, `dimension`, `config` and
    /// `storage` (its float vectors kept where `memory` says); any disagreement with them, or a
    /// value out of range, is an error.
    pub fn load_graph(
        metric: Metric,
        dimension: u32,
        config: &HnswConfig,
        storage: Storage,
        memory: &EngineMemory,
        d: &mut crate::index::snapshot::Dec,
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
        let probe = Native::with_storage(metric, dimension, config, base as usize, storage);
        if (dim as usize, m as usize, ef_c as usize, seed, base as usize)
            != (
                probe.dim,
                probe.m,
                probe.ef_construction,
                probe.seed,
                probe.base,
            )
        {
            return Err(bad(format!(
                "(dimension, m, ef_construction, seed, base) ({dim}, {m}, {ef_c}, {seed}, {base}) \
                 disagree with the generation's ({}, {}, {}, {}, {})",
                probe.dim, probe.m, probe.ef_construction, probe.seed, probe.base
            )));
        }
        let center = if d.u8()? == 1 {
            let c: Vec<f32> = (0..probe.dim)
                .map(|_| d.u32().map(f32::from_bits))
                .collect::<crate::error::Result<_>>()?;
            Some(c)
        } else {
            None
        };
        let entry = if d.u8()? == 1 {
            let (id, level) = (d.u32()?, d.u32()? as usize);
            if level > MAX_LEVEL {
                return Err(bad(format!("entry level {level}")));
            }
            Some((id, level))
        } else {
            None
        };
        // Each node takes at least its level-0 cells and float vector; an empty slot (an id
        // whose insert failed) one byte, and there are never more of those than nodes (plus a
        // segment): so a corrupt count cannot ask for memory out of proportion to the file,
        // whose checksum is checked only once it has been read.
        let count = d.u64()?;
        let slots = d.count(1)?;
        let node_bytes = 1 + (probe.stride() + probe.meta + probe.full_dim()) * 4 + 4;
        d.check_room(count, node_bytes)?;
        if slots > EMPTY as usize || slots as u64 > 2 * count + 1024 {
            return Err(bad(format!("{slots} node slots for {count} nodes")));
        }
        // The loaded nodes in one first segment of their number (at least 1,024), whatever
        // segments the saved graph had (a graph grown by inserts doubles its segments from
        // 1,024 nodes, so up to half its last segment is empty, and its cells would be written
        // and resident all the same; and the file's `base` is read before its checksum is
        // checked, so it must not size anything). A node's place in memory changes nothing a
        // search computes: its level and links depend on its id alone.
        let g = Native::with_storage(metric, dimension, config, slots, storage)
            .with_memory(memory.clone());
        if let Some(c) = center {
            let _ = g.center.set(c.into());
        }
        let (stride, full, meta) = (g.stride(), g.full_dim(), g.meta);
        let mut claimed = 0u64;
        for id in 0..slots as u32 {
            if d.u8()? != 1 {
                continue;
            }
            let Some((seg, off)) = g.node_or_create(id) else {
                return Err(bad(format!("node {id} out of range")));
            };
            let Some((count, slots)) = g.links_in(seg, off, 0) else {
                return Err(bad(format!("node {id} has no level-0 block")));
            };
            let cells = std::iter::once(count)
                .chain(slots)
                .chain(g.file_vector_cells(seg, off));
            let raw = d.bytes((stride + meta + full) * 4)?;
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
                let Some((n, ids)) = g.links_in(seg, off, level) else {
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
                    // The level-0 in-link counts are not saved: counted again here.
                    if to != EMPTY && level == 0 {
                        g.gain_link(to);
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

/// A graph's links as [`Native::freeze_links`] copied them, with the engine whose node vectors it
/// writes beside them: those are written once, before their node is published, so reading them
/// while inserts go on reads what they were when frozen.
pub struct Frozen<'a> {
    g: &'a Native,
    /// Nodes in the copied slots.
    count: u64,
    entry: Option<(u32, usize)>,
    /// Per slot: whether a node was there.
    claimed: Vec<bool>,
    /// Per slot, its level-0 count and links (zeros for an empty slot).
    level0: Vec<u32>,
    /// Per slot, where its upper-level cells start in `upper` (and one past the last).
    upper_at: Vec<usize>,
    upper: Vec<u32>,
}

impl Frozen<'_> {
    /// Writes the frozen graph in the layout [`Native::load_graph`] reads.
    pub fn write(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        let g = self.g;
        out.write_all(&[Native::storage_code(g.storage)])?;
        out.write_all(&(g.dim as u32).to_le_bytes())?;
        out.write_all(&(g.m as u32).to_le_bytes())?;
        out.write_all(&(g.ef_construction as u32).to_le_bytes())?;
        out.write_all(&g.seed.to_le_bytes())?;
        out.write_all(&(g.base as u64).to_le_bytes())?;
        match g.center.get() {
            Some(c) => {
                out.write_all(&[1])?;
                for x in c.iter() {
                    out.write_all(&x.to_bits().to_le_bytes())?;
                }
            }
            None => out.write_all(&[0])?,
        }
        match self.entry {
            Some((id, level)) => {
                out.write_all(&[1])?;
                out.write_all(&id.to_le_bytes())?;
                out.write_all(&(level as u32).to_le_bytes())?;
            }
            None => out.write_all(&[0])?,
        }
        out.write_all(&self.count.to_le_bytes())?;
        out.write_all(&(self.claimed.len() as u64).to_le_bytes())?;
        let links = 1 + g.m0;
        let mut buf: Vec<u8> = Vec::new();
        for (id, &claimed) in self.claimed.iter().enumerate() {
            buf.clear();
            let node = u32::try_from(id).ok().and_then(|id| g.node(id));
            match node {
                Some((seg, off)) if claimed => {
                    buf.push(1);
                    let frozen = &self.level0[id * links..(id + 1) * links];
                    let vectors = g
                        .file_vector_cells(seg, off)
                        .map(|c| c.load(AtOrd::Acquire));
                    for c in frozen.iter().copied().chain(vectors) {
                        buf.extend_from_slice(&c.to_le_bytes());
                    }
                    let upper = &self.upper[self.upper_at[id]..self.upper_at[id + 1]];
                    buf.extend_from_slice(&(upper.len() as u32).to_le_bytes());
                    for c in upper {
                        buf.extend_from_slice(&c.to_le_bytes());
                    }
                }
                _ => buf.push(0),
            }
            out.write_all(&buf)?;
        }
        Ok(())
    }
}

impl crate::index::engine::FrozenGraph for Frozen<'_> {
    fn write(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        Frozen::write(self, out)
    }
}
