//! The catalog: every index with its active generation, the profiles, and activation.
//!
//! Invariants:
//! - A write to an index (upsert, delete) holds that index's writer lock, is durable in the
//!   store before it touches the active generation, and is visible to searches when it returns.
//! - A search loads the active generation from an atomic pointer and never waits for a build.
//! - A build snapshots the points under the writer lock and records every write made while it
//!   runs; the writes are replayed into the new generation under the lock just before the swap,
//!   so the swap loses nothing.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::RwLock;
use rayon::prelude::*;

use crate::compaction::{deleted_fraction, Compaction, Compactor, IndexCompaction};
use crate::error::{Error, Result};
use crate::index::Generation;
use crate::model::{
    check_vector, normalize, now_millis, ConfigSource, GenerationMeta, Hit, HnswConfig, IndexMeta,
    Metric, Name, NewIndex, Point, Profile, SearchParams,
};
use crate::promotion::Registry;
use crate::store::{Counts, IndexRecord, Store};

/// A flag a build polls between chunks of points.
type Cancelled = Arc<dyn Fn() -> bool + Send + Sync>;

/// A compaction's hold on the index's build lock, and when to stop.
struct Compacting<'a> {
    building: tokio::sync::MutexGuard<'a, ()>,
    cancelled: Cancelled,
}

/// A write made while a build runs, replayed into the new generation before it is swapped in.
enum Op {
    Upsert(Vec<Point>),
    Delete(Vec<u64>),
}

#[derive(Default)]
struct Writer {
    /// Set while a build runs: the writes it must replay.
    recording: Option<Vec<Op>>,
}

pub struct IndexHandle {
    pub meta: IndexMeta,
    active: ArcSwap<Generation>,
    writer: tokio::sync::Mutex<Writer>,
    /// One build (activation) of an index at a time.
    building: tokio::sync::Mutex<()>,
    point_count: AtomicU64,
    data_version: AtomicU64,
    points_changed: AtomicU64,
    deleted: AtomicBool,
    /// Tombstone compaction's state (see `compaction.rs`).
    pub compaction: IndexCompaction,
}

impl IndexHandle {
    pub fn active(&self) -> Arc<Generation> {
        self.active.load_full()
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
}

pub struct Catalog {
    store: Arc<Store>,
    registry: Arc<Registry>,
    indexes: RwLock<BTreeMap<Name, Arc<IndexHandle>>>,
    /// Serialises creating and deleting indexes and changing profiles.
    ddl: tokio::sync::Mutex<()>,
    /// Called after every acknowledged write to an index (refresh policies listen here).
    after_write: std::sync::OnceLock<AfterWrite>,
    /// Starts tombstone compactions after acknowledged writes.
    compactor: Compactor,
}

/// A listener for writes: gets the index's name after each acknowledged upsert or delete.
pub type AfterWrite = Box<dyn Fn(&Name) + Send + Sync>;

impl Catalog {
    /// Opens the catalog over a store: rebuilds every index's active generation with its
    /// recorded config (off the async runtime).
    pub async fn recover(store: Arc<Store>, registry: Arc<Registry>) -> Result<Self> {
        let swept = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.sweep_orphans()).await??
        };
        if swept > 0 {
            tracing::warn!(swept, "removed leftovers of indexes deleted before a crash");
        }
        let records = store.list_indexes()?;
        let mut indexes = BTreeMap::new();
        for rec in records {
            let started = std::time::Instant::now();
            let st = store.clone();
            let uid = rec.meta.uid;
            let (meta, generation) = (rec.meta.clone(), rec.generation.clone());
            let (gen, counts) = tokio::task::spawn_blocking(move || -> Result<_> {
                let points = st.load_points(uid)?;
                let counts = st.counts(uid)?;
                let gen =
                    Generation::build(meta.metric, meta.dimension, generation, points, &|| false)?;
                Ok((gen, counts))
            })
            .await??;
            tracing::info!(
                index = %rec.meta.name,
                points = counts.point_count,
                generation = gen.meta.number,
                config = %gen.meta.config,
                millis = started.elapsed().as_millis() as u64,
                "recovered index"
            );
            let handle = Arc::new(IndexHandle {
                meta: rec.meta.clone(),
                active: ArcSwap::from_pointee(gen),
                writer: Default::default(),
                building: Default::default(),
                point_count: AtomicU64::new(counts.point_count),
                data_version: AtomicU64::new(counts.data_version),
                points_changed: AtomicU64::new(counts.points_changed),
                deleted: AtomicBool::new(false),
                compaction: Default::default(),
            });
            indexes.insert(rec.meta.name, handle);
        }
        Ok(Catalog {
            store,
            registry,
            indexes: RwLock::new(indexes),
            ddl: Default::default(),
            after_write: Default::default(),
            compactor: Default::default(),
        })
    }

    /// Sets the write listener (once; later calls are ignored).
    pub fn set_after_write(&self, f: AfterWrite) {
        let _ = self.after_write.set(f);
    }

    fn wrote(&self, name: &Name) {
        if let Some(f) = self.after_write.get() {
            f(name);
        }
    }

    /// Turns tombstone compaction on with `threshold` (the deleted share past which an index is
    /// rebuilt; 0: off). Off until called.
    pub fn start_compaction(self: &Arc<Self>, threshold: f64) {
        self.compactor.start(self, threshold);
    }

    /// Starts a compaction of the index if its deleted share passed the threshold.
    pub(crate) fn maybe_compact(&self, name: &Name, handle: &Arc<IndexHandle>) {
        self.compactor.maybe_start(name, handle);
    }

    /// Stops running compactions at their next check and starts no more (shutdown).
    pub fn stop_compaction(&self) {
        self.compactor.shutdown();
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
        }
    }

    pub async fn create_index(&self, new: NewIndex) -> Result<IndexView> {
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
            create_time_ms: now_millis(),
        };
        let generation = GenerationMeta {
            number: 1,
            config: new.default_config,
            source: ConfigSource::Default,
            point_count: 0,
            build_millis: 0,
            activate_time_ms: meta.create_time_ms,
            profile: String::new(),
        };
        let rec = IndexRecord {
            meta: meta.clone(),
            generation: generation.clone(),
        };
        if !self.store.create_index(&rec)? {
            return Err(Error::AlreadyExists {
                what: "index",
                name: new.name.to_string(),
            });
        }
        self.store.flush().await?;
        let handle = Arc::new(IndexHandle {
            active: ArcSwap::from_pointee(Generation::empty(
                meta.metric,
                meta.dimension,
                generation,
            )),
            meta,
            writer: Default::default(),
            building: Default::default(),
            point_count: AtomicU64::new(0),
            data_version: AtomicU64::new(0),
            points_changed: AtomicU64::new(0),
            deleted: AtomicBool::new(false),
            compaction: Default::default(),
        });
        self.indexes
            .write()
            .insert(new.name.clone(), handle.clone());
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
        let _ddl = self.ddl.lock().await;
        let handle = self.handle(name)?;
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
        self.store.flush().await?;
        tracing::info!(index = %name, "deleted index");
        Ok(())
    }

    /// Adds or replaces points, all or nothing. Vectors are checked (and normalised for cosine)
    /// before anything changes; within a request the last point of an id wins.
    pub async fn upsert(&self, name: &Name, mut points: Vec<Point>) -> Result<(u64, u64)> {
        if points.is_empty() {
            return Err(Error::invalid("points is empty: send at least one point"));
        }
        let handle = self.handle(name)?;
        for (i, p) in points.iter_mut().enumerate() {
            handle.prepare_vector(&format!("points[{i}] (id {})", p.id), &mut p.vector)?;
        }
        // Last occurrence of an id wins, as if the points were upserted one by one.
        let mut seen = std::collections::HashSet::with_capacity(points.len());
        let mut unique: Vec<Point> = points
            .into_iter()
            .rev()
            .filter(|p| seen.insert(p.id))
            .collect();
        unique.reverse();
        let upserted = unique.len() as u64;

        let mut w = handle.writer.lock().await;
        handle.check_live()?;
        let counts = {
            let store = self.store.clone();
            let uid = handle.meta.uid;
            // The points go to the store and come back for the generation.
            let (counts, unique) = tokio::task::spawn_blocking(move || {
                store.upsert_points(uid, &unique).map(|c| (c, unique))
            })
            .await??;
            self.store.flush().await?;
            let gen = handle.active();
            let unique = Arc::new(unique);
            {
                let (g, pts) = (gen.clone(), unique.clone());
                tokio::task::spawn_blocking(move || g.upsert(&pts)).await?;
            }
            if let Some(rec) = w.recording.as_mut() {
                rec.push(Op::Upsert(
                    Arc::try_unwrap(unique).unwrap_or_else(|a| (*a).clone()),
                ));
            }
            counts
        };
        handle.set_counts(counts);
        drop(w);
        self.wrote(name);
        self.compactor.maybe_start(name, &handle);
        Ok((upserted, counts.point_count))
    }

    /// Removes points; unknown ids are ignored. Returns (deleted, point count).
    pub async fn delete_points(&self, name: &Name, ids: Vec<u64>) -> Result<(u64, u64)> {
        if ids.is_empty() {
            return Err(Error::invalid("ids is empty: send at least one id"));
        }
        let handle = self.handle(name)?;
        let mut w = handle.writer.lock().await;
        handle.check_live()?;
        let store = self.store.clone();
        let uid = handle.meta.uid;
        let (ids, (deleted, counts)) =
            tokio::task::spawn_blocking(move || store.delete_points(uid, &ids).map(|r| (ids, r)))
                .await??;
        self.store.flush().await?;
        handle.active().delete(&ids);
        if let Some(rec) = w.recording.as_mut() {
            rec.push(Op::Delete(ids));
        }
        handle.set_counts(counts);
        drop(w);
        if deleted > 0 {
            self.wrote(name);
            self.compactor.maybe_start(name, &handle);
        }
        Ok((deleted, counts.point_count))
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

    /// The k nearest points to one vector on the active generation, with its number.
    pub fn search(
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
        Ok((gen.search(&vector, params.k, ef), gen.meta.number))
    }

    /// The k nearest points to each query, all on one generation, on every core.
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
        let results = tokio::task::spawn_blocking(move || {
            queries
                .par_iter()
                .map(|q| gen.search(q, k, ef))
                .collect::<Vec<_>>()
        })
        .await?;
        Ok((results, number))
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
        self.build_and_swap(name, config, source, profile, true, None)
            .await
            .map(|(meta, _)| meta)
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
        drop(gen);
        let (h, stop) = (handle.clone(), how.stop.clone());
        let compacting = Compacting {
            building,
            cancelled: Arc::new(move || h.compaction.preempted() || stop.is_cancelled()),
        };
        let (meta, _) = self
            .build_and_swap(name, m.config, m.source, &m.profile, true, Some(compacting))
            .await?;
        Ok(Some(meta))
    }

    /// [`rebuild`](Self::rebuild); with `persist` false the swap is made in memory only and the
    /// index record to persist is returned for the caller to write (with others, atomically).
    /// With `compacting`, it is a compaction holding the build lock, which stops (CANCELLED)
    /// when told; otherwise it is an activation, which preempts compactions of the index until
    /// it returns.
    async fn build_and_swap(
        &self,
        name: &Name,
        config: HnswConfig,
        source: ConfigSource,
        profile: &str,
        persist: bool,
        compacting: Option<Compacting<'_>>,
    ) -> Result<(GenerationMeta, IndexRecord)> {
        let handle = self.handle(name)?;
        let (_activation, _building, cancelled) = match compacting {
            None => {
                let activation = handle.compaction.activation();
                let never: Cancelled = Arc::new(|| false);
                (Some(activation), handle.building.lock().await, never)
            }
            Some(c) => (None, c.building, c.cancelled),
        };
        tracing::info!(
            "building HNSW index={} m={} ef_construction={} ef_search={} seed={:?}",
            name,
            config.m,
            config.ef_construction,
            config.ef_search,
            config.seed
        );
        // Snapshot the points and start recording writes, atomically with respect to writes.
        let points = {
            let mut w = handle.writer.lock().await;
            handle.check_live()?;
            let store = self.store.clone();
            let uid = handle.meta.uid;
            let points = tokio::task::spawn_blocking(move || store.load_points(uid)).await??;
            w.recording = Some(Vec::new());
            points
        };
        let meta = GenerationMeta {
            number: 0, // decided at the swap
            config,
            source,
            point_count: 0,
            build_millis: 0,
            activate_time_ms: 0,
            profile: profile.to_string(),
        };
        let (metric, dim) = (handle.meta.metric, handle.meta.dimension);
        let built = tokio::task::spawn_blocking(move || {
            Generation::build(metric, dim, meta, points, &*cancelled)
        })
        .await
        .map_err(Error::from)
        .and_then(|r| r);
        let mut w = handle.writer.lock().await;
        let ops = w.recording.take().unwrap_or_default();
        let gen = built?;
        handle.check_live()?;
        let replayed = ops.len();
        let gen = tokio::task::spawn_blocking(move || {
            for op in &ops {
                match op {
                    Op::Upsert(p) => gen.upsert(p),
                    Op::Delete(ids) => gen.delete(ids),
                }
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
        };
        if persist {
            self.store.put_index(&rec)?;
            self.store.flush().await?;
        }
        let meta = gen.meta.clone();
        handle.active.store(Arc::new(gen));
        drop(w);
        tracing::info!(
            index = %name,
            generation = meta.number,
            points = meta.point_count,
            build_millis = meta.build_millis,
            replayed,
            "swapped in generation"
        );
        Ok((meta, rec))
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
    /// else the profile entry's default, else the index's default, and swaps it in.
    pub async fn activate_profile(&self, name: &Name) -> Result<Vec<GenerationMeta>> {
        let profile = self.get_profile(name)?;
        // Every index must exist before anything is built.
        let mut plan = Vec::with_capacity(profile.indexes.len());
        let mut handles = Vec::with_capacity(profile.indexes.len());
        for pi in &profile.indexes {
            let handle = self.handle(&pi.index)?;
            handles.push(handle.clone());
            let default = pi.default_config.unwrap_or(handle.meta.default_config);
            let (config, source) = self.registry.config_or(&pi.index, default)?;
            plan.push((pi.index.clone(), config, source));
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
        for (index, config, source) in plan {
            match self
                .build_and_swap(&index, config, source, name.as_str(), false, None)
                .await
            {
                Ok((meta, rec)) => {
                    out.push(meta);
                    records.push(rec);
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        // On failure the generations already swapped in stay (as before) and are recorded too,
        // so what is served and what a restart brings back agree.
        self.persist_generations(records).await?;
        match failed {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Writes the index records of swapped-in generations in one atomic batch, skipping an
    /// index deleted meanwhile or one that has since swapped in a newer generation.
    async fn persist_generations(&self, records: Vec<IndexRecord>) -> Result<()> {
        // Locked in name order, so two activations never wait on each other in a cycle.
        let mut records = records;
        records.sort_by(|a, b| a.meta.name.as_str().cmp(b.meta.name.as_str()));
        let handles: Vec<_> = records
            .into_iter()
            .filter_map(|rec| self.handle(&rec.meta.name).ok().map(|h| (h, rec)))
            .collect();
        let mut guards = Vec::with_capacity(handles.len());
        let mut current = Vec::with_capacity(handles.len());
        for (handle, rec) in &handles {
            guards.push(handle.writer.lock().await);
            if handle.check_live().is_ok() && handle.active().meta.number == rec.generation.number {
                current.push(rec.clone());
            }
        }
        self.store.put_indexes(&current)?;
        self.store.flush().await?;
        drop(guards);
        Ok(())
    }
}
