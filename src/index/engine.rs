//! The engine seam: the few operations vectord needs from an HNSW graph, with two engines behind
//! them: vectord's own ([`super::native`], the default) and hnsw_rs. Nothing outside `src/index/`
//! names hnsw_rs. The engine is a property of each index (`IndexMeta::engine`, chosen at
//! CreateIndex, default `--engine`); an index created before it was stored follows `--engine`.
//! There is no process-wide engine: every build names the kind it builds.
//!
//! Engines speak internal ids (dense `usize`s assigned by the generation) and internal distances
//! (see `distance.rs`); mapping to users' ids and distances is the generation's job.

use std::path::Path;
use std::sync::Arc;

use hnsw_rs::hnsw::Hnsw;

use super::distance::{CosineInternal, DotInternal, L2Internal};
use crate::model::{HnswConfig, Metric};

/// hnsw_rs caps the number of layers at 16.
const MAX_LAYERS: usize = 16;

/// A graph's links as [`Engine::freeze`] copied them, to be written (with the points' vectors,
/// which never change) while inserts go on.
pub trait FrozenGraph {
    /// Writes the graph as it was when frozen.
    fn write(&self, out: &mut dyn std::io::Write) -> std::io::Result<()>;
}

pub trait Engine: Send + Sync {
    /// Inserts one vector under a fresh internal id (never one already in the graph).
    fn insert(&self, vector: &[f32], internal: usize);
    /// Inserts many vectors; `parallel` uses every core (faster, not deterministic).
    fn insert_many(&self, items: &[(&[f32], usize)], parallel: bool);
    /// What [`Engine::insert_many`] does before its first insert, for a caller about to insert
    /// `items` one by one with [`Engine::insert`] (the native engines' center, from the first
    /// batch an empty graph gets).
    fn prepare_inserts(&self, _items: &[(&[f32], usize)]) {}
    /// The `k` nearest internal ids with their internal distances, nearest first.
    fn search(&self, query: &[f32], k: usize, ef: usize) -> Vec<(usize, f32)>;
    /// The `k` nearest internal ids that pass `keep`, searching with at least `ef` of them,
    /// when the engine can filter as it searches (points that fail still guide the search but
    /// take no result slot). None: it cannot, and the caller over-fetches instead.
    fn search_filtered(
        &self,
        _query: &[f32],
        _k: usize,
        _ef: usize,
        _keep: &dyn Fn(usize) -> bool,
    ) -> Option<Vec<(usize, f32)>> {
        None
    }
    /// The exact internal distances from `query` to the points `ids`, for a search that scans
    /// a few live points instead of walking a graph of tombstones. None: the engine cannot.
    fn distances(&self, _query: &[f32], _ids: &[usize]) -> Option<Vec<(usize, f32)>> {
        None
    }
    /// Gives every point that no walk over level-0 links from the entry point reaches one link
    /// from a near point that is reached, so a search can find it; returns how many it linked.
    /// HNSW's neighbour heuristic may prune a point from every list that held it, or leave a
    /// few points linking only each other (rarely, and more often when inserts run in parallel
    /// and near points do not see each other); the graph's owner calls this after a build and
    /// after a large batch, with no insert running. Engines that cannot do this link none.
    fn link_orphans(&self) -> usize {
        0
    }
    /// Whether [`Engine::check_found`] can link points (else it checks none).
    fn checks_found(&self) -> bool {
        false
    }
    /// Makes a search for point `internal` by its own vector at `ef` find it first, where it
    /// can (`keep`: the points a search may answer, None for all): searches for it, and if
    /// another point comes first (not one at the same place), links it at level 0 from the
    /// nearest node that search expanded with a free slot (so no link goes), else from the
    /// nearest expanded node that can give up its most redundant link; then searches again,
    /// and once more links and searches if that still misses it. Safe beside searches and
    /// inserts; the caller keeps snapshot encoding out while it links. Engines that cannot:
    /// [`Checked::Skipped`].
    fn check_found(
        &self,
        _internal: usize,
        _ef: usize,
        _keep: Option<&dyn Fn(usize) -> bool>,
        _link: &dyn Fn(&dyn Fn()),
    ) -> Checked {
        Checked::Skipped
    }
    /// Copies what inserts change in the graph's first `limit` internal ids (links, entry
    /// point) for a snapshot (`super::snapshot`), with no insert running; the copy writes the
    /// graph as it was then while inserts of ids from `limit` on go on. None: this engine
    /// cannot (its generations are rebuilt at start instead).
    fn freeze(&self, _limit: usize) -> Option<Box<dyn FrozenGraph + '_>> {
        None
    }
    /// Writes the graph for a snapshot, with no insert running; false if this engine cannot.
    fn save(&self, out: &mut dyn std::io::Write) -> std::io::Result<bool> {
        match self.freeze(usize::MAX) {
            Some(frozen) => frozen.write(out).map(|()| true),
            None => Ok(false),
        }
    }
    /// Points in the graph, tombstoned or not.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Estimated bytes of the vectors and links.
    fn memory_bytes(&self) -> u64;
}

/// What [`Engine::check_found`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checked {
    /// The search for the point found it first.
    Found,
    /// It did not; after a link it does.
    Linked,
    /// It did not, even after a link.
    Missed,
    /// Not checked: the engine cannot ([`Engine::checks_found`]), or the point is not in its
    /// graph.
    Skipped,
}

/// The HNSW implementations vectord can build graphs with (stored in an index's record by
/// [`EngineKind::name`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineKind {
    /// vectord's own engine (`src/index/native/`), laid out like hnswlib.
    Native,
    /// The hnsw_rs crate.
    HnswRs,
    /// vectord's own engine with half-float vectors next to the links for searches to compare
    /// with, and the float vectors for exact distances (`native::Storage::Half`).
    NativeF16,
    /// vectord's own engine with 8-bit vectors (one scale each) next to the links for searches to
    /// compare with, and the float vectors for exact distances (`native::Storage::Int8`).
    NativeI8,
}

impl EngineKind {
    /// The engine when none is chosen (`--engine`'s default): the 8-bit one, with the fastest
    /// searches and builds, for about 1.2x native's memory.
    pub const DEFAULT: EngineKind = EngineKind::NativeI8;

    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Native => "native",
            EngineKind::HnswRs => "hnsw_rs",
            EngineKind::NativeF16 => "native_f16",
            EngineKind::NativeI8 => "native_i8",
        }
    }
}

impl Default for EngineKind {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for EngineKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "native" => Ok(EngineKind::Native),
            "hnsw_rs" | "hnsw-rs" => Ok(EngineKind::HnswRs),
            "native_f16" | "native-f16" => Ok(EngineKind::NativeF16),
            "native_i8" | "native-i8" => Ok(EngineKind::NativeI8),
            other => Err(format!(
                "engine must be native, native_f16, native_i8 or hnsw_rs, got {other:?}"
            )),
        }
    }
}

/// The data dir's directory of mapped float vectors ([`EngineMemory::in_data_dir`]).
pub const MAPPED_DIR: &str = "float-vectors";

/// Where an engine keeps the float vectors it holds apart from what its searches compare with
/// (`--map-float-vectors`): native_f16 and native_i8 read them only to rank a search's last
/// candidates exactly and while inserting, so they can live in file-backed memory the kernel
/// may evict (and read back) instead of in the process's anonymous memory. The other engines
/// search their float vectors themselves and keep them in RAM either way.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineMemory {
    map_dir: Option<Arc<Path>>,
}

impl EngineMemory {
    /// Every vector in the process's own (anonymous) memory.
    pub const IN_RAM: EngineMemory = EngineMemory { map_dir: None };

    /// The float vectors of each segment in a shared mapping of its own unlinked temp file
    /// created in `dir` (which must exist): no file name is ever left behind, and the file's
    /// blocks are freed when the engine is dropped or the process ends.
    pub fn mapped_in(dir: impl Into<std::path::PathBuf>) -> Self {
        EngineMemory {
            map_dir: Some(Arc::from(dir.into())),
        }
    }

    /// Float vectors mapped in files of `data_dir`'s `float-vectors` directory, created if
    /// missing and emptied of anything a process before this one left there (a file system
    /// without `O_TMPFILE` gives each file a name for a moment after it is created). Only while
    /// this process holds the data dir (the store's lock).
    pub fn in_data_dir(data_dir: &Path) -> crate::error::Result<Self> {
        let dir = data_dir.join(MAPPED_DIR);
        let failed = |what: &str, e: std::io::Error| {
            crate::error::Error::Unavailable(format!("cannot {what} {}: {e}", dir.display()))
        };
        std::fs::create_dir_all(&dir).map_err(|e| failed("create", e))?;
        for entry in std::fs::read_dir(&dir).map_err(|e| failed("read", e))? {
            let path = entry.map_err(|e| failed("read", e))?.path();
            if path.is_file() {
                std::fs::remove_file(&path).map_err(|e| failed("clean", e))?;
            }
        }
        Ok(Self::mapped_in(dir))
    }

    /// The directory of the mapped files, if the float vectors are mapped.
    pub fn map_dir(&self) -> Option<&Path> {
        self.map_dir.as_deref()
    }
}

/// Builds an empty engine of a given kind.
pub fn new_engine_of(
    kind: EngineKind,
    metric: Metric,
    dimension: u32,
    config: &HnswConfig,
    capacity: usize,
) -> Box<dyn Engine> {
    new_engine_in(
        kind,
        metric,
        dimension,
        config,
        capacity,
        &EngineMemory::IN_RAM,
    )
}

/// [`new_engine_of`] keeping its float vectors where `memory` says.
pub fn new_engine_in(
    kind: EngineKind,
    metric: Metric,
    dimension: u32,
    config: &HnswConfig,
    capacity: usize,
    memory: &EngineMemory,
) -> Box<dyn Engine> {
    use super::native::{Native, Storage};
    let storage = match kind {
        EngineKind::Native => Storage::F32,
        EngineKind::NativeF16 => Storage::Half,
        EngineKind::NativeI8 => Storage::Int8,
        EngineKind::HnswRs => return new_hnsw_rs(metric, dimension, config, capacity),
    };
    Box::new(
        Native::with_storage(metric, dimension, config, capacity, storage)
            .with_memory(memory.clone()),
    )
}

/// Reads a graph that [`Engine::save`] wrote. hnsw_rs graphs are never saved: hnsw_rs can dump
/// and reload a graph, but only as two files of its own format whose reloaded graph borrows
/// from a loader that must outlive it, which fits neither one checksummed file nor a generation
/// that owns its engine; its generations are rebuilt at start.
pub fn load_engine(
    kind: EngineKind,
    metric: Metric,
    dimension: u32,
    config: &HnswConfig,
    memory: &EngineMemory,
    d: &mut super::snapshot::Dec,
) -> crate::error::Result<Box<dyn Engine>> {
    use super::native::{Native, Storage};
    let storage = match kind {
        EngineKind::Native => Storage::F32,
        EngineKind::NativeF16 => Storage::Half,
        EngineKind::NativeI8 => Storage::Int8,
        EngineKind::HnswRs => {
            return Err(crate::error::Error::Corrupt(
                "hnsw_rs graphs are not snapshotted".into(),
            ))
        }
    };
    Ok(Box::new(Native::load_graph(
        metric, dimension, config, storage, memory, d,
    )?))
}

impl EngineKind {
    /// The engine's code in snapshot files.
    pub fn code(self) -> u8 {
        self as u8
    }
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(EngineKind::Native),
            1 => Some(EngineKind::HnswRs),
            2 => Some(EngineKind::NativeF16),
            3 => Some(EngineKind::NativeI8),
            _ => None,
        }
    }
}

/// An empty hnsw_rs graph.
fn new_hnsw_rs(
    metric: Metric,
    dimension: u32,
    config: &HnswConfig,
    capacity: usize,
) -> Box<dyn Engine> {
    let m = config.m as usize;
    let ef_c = config.ef_construction as usize;
    let cap = capacity.max(1);
    match metric {
        Metric::L2 => Box::new(HnswRs::new(
            Hnsw::new(m, cap, MAX_LAYERS, ef_c, L2Internal),
            dimension,
            m,
        )),
        Metric::Cosine => Box::new(HnswRs::new(
            Hnsw::new(m, cap, MAX_LAYERS, ef_c, CosineInternal),
            dimension,
            m,
        )),
        Metric::Dot => Box::new(HnswRs::new(
            Hnsw::new(m, cap, MAX_LAYERS, ef_c, DotInternal),
            dimension,
            m,
        )),
    }
}

struct HnswRs<D: anndists::dist::Distance<f32> + Send + Sync + 'static> {
    graph: Hnsw<'static, f32, D>,
    dimension: usize,
    m: usize,
}

impl<D: anndists::dist::Distance<f32> + Send + Sync + 'static> HnswRs<D> {
    fn new(mut graph: Hnsw<'static, f32, D>, dimension: u32, m: usize) -> Self {
        // Searching mode only changes how hnsw_rs logs; inserts stay allowed.
        graph.set_searching_mode(false);
        HnswRs {
            graph,
            dimension: dimension as usize,
            m,
        }
    }
}

impl<D: anndists::dist::Distance<f32> + Send + Sync + 'static> Engine for HnswRs<D> {
    fn insert(&self, vector: &[f32], internal: usize) {
        self.graph.insert_slice((vector, internal));
    }

    fn insert_many(&self, items: &[(&[f32], usize)], parallel: bool) {
        if parallel && items.len() > 1 {
            self.graph.parallel_insert_slice(&items.to_vec());
        } else {
            for &(v, id) in items {
                self.graph.insert_slice((v, id));
            }
        }
    }

    fn search(&self, query: &[f32], k: usize, ef: usize) -> Vec<(usize, f32)> {
        self.graph
            .search(query, k, ef.max(k))
            .into_iter()
            .map(|n| (n.d_id, n.distance))
            .collect()
    }

    fn len(&self) -> usize {
        self.graph.get_nb_point()
    }

    fn memory_bytes(&self) -> u64 {
        // Vectors, plus layer 0's 2*M links per point (hnsw_rs keeps each link as an Arc to a
        // ~40-byte record), plus per-point bookkeeping; upper layers add about 1/M of that.
        let n = self.len() as u64;
        let vectors = n * self.dimension as u64 * 4;
        let links = n * (2 * self.m as u64) * 48 * (self.m as u64 + 1) / self.m as u64;
        vectors + links + n * 128
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_names_parse_and_round_trip() {
        for kind in [
            EngineKind::Native,
            EngineKind::HnswRs,
            EngineKind::NativeF16,
            EngineKind::NativeI8,
        ] {
            assert_eq!(kind.name().parse::<EngineKind>(), Ok(kind));
            assert_eq!(kind.to_string(), kind.name());
        }
        assert_eq!(EngineKind::default(), EngineKind::NativeI8);
        let err = "faiss".parse::<EngineKind>().unwrap_err();
        assert!(
            err.contains("native, native_f16, native_i8 or hnsw_rs"),
            "{err}"
        );
    }
}
