//! The lab: harness bookkeeping and the trial runner (build a fresh graph, measure it on a
//! harness, journal the result). The serving graph is never touched by a trial.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use rand::SeedableRng;

use super::harness::{
    ground_truth, ground_truth_tracked, sample, GroundTruth, Harness, Query, QuerySpec,
};
use super::shared::{LabRecord, SharedLab};
use super::trial::{Fidelity, Trial};
use crate::catalog::{Catalog, IndexHandle};
use crate::error::{Error, Result};
use crate::index::{Activities, Generation, Phase, Progress};
use crate::model::{now_millis, ConfigSource, GenerationMeta, HnswConfig, Name, Point};
use crate::store::Store;

/// An index's points and a harness whose ground truth matches them.
pub struct Prepared {
    pub handle: Arc<IndexHandle>,
    pub points: Arc<Vec<Point>>,
    pub harness: Arc<Harness>,
}

/// What one measurement of a graph on a harness gives.
#[derive(Clone, Copy, Debug)]
pub struct Measures {
    pub recall: f64,
    pub p50_micros: f64,
    pub p95_micros: f64,
    pub p99_micros: f64,
    pub qps: f64,
    /// Mean distance computations per query (deterministic for a seeded graph).
    pub mean_distance_evals: f64,
}

pub struct Lab {
    catalog: Arc<Catalog>,
    /// Graphs built for trials since start (autotune shares builds; this shows it).
    graphs_built: AtomicU64,
    /// Most queries a harness may have (--max-harness-queries).
    max_queries: usize,
    /// Trials kept per index and harness (--trials-kept).
    trials_kept: usize,
    /// A cluster node's lab log (docs/cluster.md): every change of harnesses and trials goes
    /// through it, and reaches the store through its mirror. None on a single node.
    shared: Option<Arc<dyn SharedLab>>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Lab {
    pub fn new(catalog: Arc<Catalog>, max_queries: usize) -> Self {
        Lab {
            catalog,
            graphs_built: AtomicU64::new(0),
            max_queries,
            trials_kept: crate::config::DEFAULT_TRIALS_KEPT as usize,
            shared: None,
        }
    }

    /// A cluster node's lab: harnesses and trials go through the cluster's lab log.
    pub fn with_shared(mut self, shared: Arc<dyn SharedLab>) -> Self {
        self.shared = Some(shared);
        self
    }

    /// NOT_FOUND: the index a lab record was logged for is gone (deleted meanwhile).
    fn index_gone(index: &Name) -> Error {
        Error::NotFound {
            what: "index",
            name: format!("{index} (the one this work started on was deleted)"),
        }
    }

    /// The index's cluster uid (cluster nodes): UNAVAILABLE while the local index is not
    /// linked to the cluster yet.
    fn cluster_uid(handle: &IndexHandle) -> Result<u64> {
        handle.cluster_uid.ok_or_else(|| {
            Error::Unavailable(format!(
                "index {} is not linked to the cluster on this node yet; retry",
                handle.meta.name
            ))
        })
    }

    /// Keeps the newest `n` trials per index and harness (promoted ones always).
    pub fn with_trials_kept(mut self, n: usize) -> Self {
        self.trials_kept = n.max(1);
        self
    }

    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    fn store(&self) -> &Arc<Store> {
        self.catalog.store()
    }

    pub fn graphs_built(&self) -> u64 {
        self.graphs_built.load(Ordering::Relaxed)
    }

    pub async fn create_harness(
        &self,
        index: &Name,
        name: Name,
        k: u32,
        spec: QuerySpec,
    ) -> Result<Harness> {
        let k = crate::model::in_range(
            "k",
            if k == 0 { super::harness::DEFAULT_K } else { k },
            1..=crate::model::MAX_K,
        )?;
        let (handle, points, version) = self.catalog.snapshot(index).await?;
        if self
            .store()
            .get_harness::<Harness>(index.as_str(), name.as_str())?
            .is_some()
        {
            return Err(Error::AlreadyExists {
                what: "harness",
                name: name.to_string(),
            });
        }
        let (queries, seed) = match spec {
            QuerySpec::Sampled { count, seed } => {
                if points.is_empty() {
                    return Err(Error::Precondition(format!(
                        "index {:?} has no points to sample queries from; upsert points first or give explicit queries",
                        index.as_str()
                    )));
                }
                let max = points.len().min(self.max_queries);
                let count = crate::model::in_range("sampled.query_count", count as usize, 1..=max)?;
                (sample(&points, count, seed), Some(seed))
            }
            QuerySpec::Explicit(vectors) => {
                if vectors.is_empty() {
                    return Err(Error::invalid(
                        "explicit.queries is empty: give at least one query, or use sampled",
                    ));
                }
                if vectors.len() > self.max_queries {
                    return Err(Error::Limit(format!(
                        "explicit.queries has {} queries; at most {} are allowed (--max-harness-queries)",
                        vectors.len(),
                        self.max_queries
                    )));
                }
                let mut qs = Vec::with_capacity(vectors.len());
                for (i, mut v) in vectors.into_iter().enumerate() {
                    handle.prepare_vector(&format!("explicit.queries[{i}]"), &mut v)?;
                    qs.push(Query {
                        vector: v,
                        exclude: None,
                    });
                }
                (qs, None)
            }
        };
        let metric = handle.meta.metric;
        let handle_of = handle.clone();
        let harness = tokio::task::spawn_blocking(move || {
            let neighbors = ground_truth(metric, &points, &queries, k as usize);
            Harness {
                index: handle.meta.name.clone(),
                name,
                k,
                seed,
                create_time_ms: now_millis(),
                queries,
                truth: GroundTruth {
                    data_version: version,
                    neighbors,
                },
            }
        })
        .await?;
        if let Some(shared) = &self.shared {
            let index_uid = Self::cluster_uid(&handle_of)?;
            let created = harness.create_time_ms;
            shared
                .log(&LabRecord::HarnessCreated {
                    index_uid,
                    harness: Box::new(harness.clone()),
                })
                .await?;
            // Two nodes creating the same name: the first record in the log is the harness.
            let stored: Option<Harness> = self
                .store()
                .get_harness(index.as_str(), harness.name.as_str())?;
            match stored {
                // The mirror skipped it: the index was deleted meanwhile.
                None => return Err(Self::index_gone(index)),
                Some(h) if h.create_time_ms != created || h.seed != harness.seed => {
                    return Err(Error::AlreadyExists {
                        what: "harness",
                        name: harness.name.to_string(),
                    })
                }
                Some(_) => {}
            }
            tracing::info!(index = %index, harness = %harness.name, queries = harness.queries.len(), k, "created harness (cluster)");
            return Ok(harness);
        }
        if !self
            .store()
            .create_harness(index.as_str(), harness.name.as_str(), &harness)?
        {
            return Err(Error::AlreadyExists {
                what: "harness",
                name: harness.name.to_string(),
            });
        }
        self.store().flush().await?;
        tracing::info!(index = %index, harness = %harness.name, queries = harness.queries.len(), k, "created harness");
        Ok(harness)
    }

    /// [`Lab::get_harness`]; on a cluster node, when this node does not have it (yet), once
    /// more after mirroring every lab record logged so far (one made through another node a
    /// moment ago is then found).
    pub async fn get_harness_synced(&self, index: &Name, name: &Name) -> Result<Harness> {
        match (self.get_harness(index, name), &self.shared) {
            (Err(Error::NotFound { .. }), Some(shared)) => {
                shared.sync().await?;
                self.get_harness(index, name)
            }
            (r, _) => r,
        }
    }

    /// [`Lab::get_trial`], synced like [`Lab::get_harness_synced`].
    pub async fn get_trial_synced(&self, id: u64) -> Result<Trial> {
        match (self.get_trial(id), &self.shared) {
            (Err(Error::NotFound { .. }), Some(shared)) => {
                shared.sync().await?;
                self.get_trial(id)
            }
            (r, _) => r,
        }
    }

    pub fn get_harness(&self, index: &Name, name: &Name) -> Result<Harness> {
        self.catalog.handle(index)?;
        self.store()
            .get_harness(index.as_str(), name.as_str())?
            .ok_or_else(|| Error::not_found("harness", name.as_str()))
    }

    pub fn list_harnesses(&self, index: &Name) -> Result<Vec<Harness>> {
        self.catalog.handle(index)?;
        self.store().list_harnesses(index.as_str())
    }

    pub async fn delete_harness(&self, index: &Name, name: &Name) -> Result<()> {
        let handle = self.catalog.handle(index)?;
        if let Some(shared) = &self.shared {
            if self
                .store()
                .get_harness::<Harness>(index.as_str(), name.as_str())?
                .is_none()
            {
                return Err(Error::not_found("harness", name.as_str()));
            }
            shared
                .log(&LabRecord::HarnessDeleted {
                    index_uid: Self::cluster_uid(&handle)?,
                    index: index.clone(),
                    name: name.clone(),
                })
                .await?;
            return Ok(());
        }
        if !self.store().delete_harness(index.as_str(), name.as_str())? {
            return Err(Error::not_found("harness", name.as_str()));
        }
        self.store().flush().await
    }

    /// The index's points and the harness, recomputing and storing its ground truth when the
    /// points changed since it was computed. FAILED_PRECONDITION for an index with no points.
    pub async fn prepare(&self, index: &Name, harness: &Name) -> Result<Prepared> {
        self.prepare_tracked(index, harness, &Activities::default())
            .await
    }

    /// FAILED_PRECONDITION: a trial needs points.
    pub fn no_points(index: &Name) -> Error {
        Error::Precondition(format!(
            "index {:?} has no points: a trial needs points to build a graph over",
            index.as_str()
        ))
    }

    /// [`Lab::prepare`], listing a ground truth it recomputes in `acts` while it runs
    /// ([`Phase::GroundTruth`], queries done of the harness's).
    pub async fn prepare_tracked(
        &self,
        index: &Name,
        harness: &Name,
        acts: &Activities,
    ) -> Result<Prepared> {
        let mut h = self.get_harness_synced(index, harness).await?;
        let (handle, points, version) = self.catalog.snapshot(index).await?;
        if points.is_empty() {
            return Err(Self::no_points(index));
        }
        let points = Arc::new(points);
        if h.truth.data_version != version {
            let (pts, metric) = (points.clone(), handle.meta.metric);
            let progress = acts.begin(Phase::GroundTruth, None, h.queries.len() as u64);
            h = tokio::task::spawn_blocking(move || {
                h.truth = GroundTruth {
                    data_version: version,
                    neighbors: ground_truth_tracked(
                        metric,
                        &pts,
                        &h.queries,
                        h.k as usize,
                        Some(&*progress),
                    ),
                };
                h
            })
            .await?;
            self.store()
                .put_harness(index.as_str(), harness.as_str(), &h)?;
            self.store().flush().await?;
            tracing::info!(index = %index, harness = %harness, data_version = version, "recomputed ground truth");
        }
        Ok(Prepared {
            handle,
            points,
            harness: Arc::new(h),
        })
    }

    /// The first `n` queries of a harness with their ground truth for the index's current
    /// points, and the index: the stored truth when it is current, else computed for those `n`
    /// queries only, over points read without the index's writer lock (nothing is stored).
    pub async fn probe_harness(
        &self,
        index: &Name,
        harness: &Name,
        n: usize,
    ) -> Result<(Arc<IndexHandle>, Harness)> {
        let mut h = self.get_harness(index, harness)?;
        h.queries.truncate(n);
        let handle = self.catalog.handle(index)?;
        if h.truth.data_version == handle.data_version() {
            h.truth.neighbors.truncate(n);
            return Ok((handle, h));
        }
        let (handle, points, version) = self.catalog.snapshot_unlocked(index).await?;
        let metric = handle.meta.metric;
        let h = tokio::task::spawn_blocking(move || {
            h.truth = GroundTruth {
                data_version: version,
                neighbors: ground_truth(metric, &points, &h.queries, h.k as usize),
            };
            h
        })
        .await?;
        Ok((handle, h))
    }

    /// The harness with its ground truth current for the index's points, and the index. Unlike
    /// [`Lab::prepare`], the points are copied only when the truth has to be recomputed.
    pub async fn current_harness(
        &self,
        index: &Name,
        harness: &Name,
    ) -> Result<(Arc<IndexHandle>, Harness)> {
        let h = self.get_harness(index, harness)?;
        let handle = self.catalog.handle(index)?;
        if h.truth.data_version == handle.data_version() {
            return Ok((handle, h));
        }
        let p = self.prepare(index, harness).await?;
        Ok((p.handle, (*p.harness).clone()))
    }

    /// Builds a graph over the prepared points (blocking: call off the async runtime).
    pub fn build(
        &self,
        p: &Prepared,
        config: HnswConfig,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Generation> {
        self.build_tracked(p, config, cancelled, None)
    }

    /// [`Lab::build`], reporting the points inserted to `progress`.
    pub fn build_tracked(
        &self,
        p: &Prepared,
        config: HnswConfig,
        cancelled: &dyn Fn() -> bool,
        progress: Option<&Progress>,
    ) -> Result<Generation> {
        let meta = GenerationMeta {
            number: 0,
            config,
            source: ConfigSource::Default,
            point_count: 0,
            build_millis: 0,
            activate_time_ms: 0,
            profile: String::new(),
            trial_id: 0,
        };
        let (kind, metric, dim, points) = (
            p.handle.engine,
            p.handle.meta.metric,
            p.handle.meta.dimension,
            (*p.points).clone(),
        );
        let memory = self.catalog.engine_memory();
        let pauses = self.catalog.test_pauses();
        let cancelled = &pauses.paced(cancelled);
        let g = match progress {
            Some(progress) => Generation::build_tracked(
                kind, memory, metric, dim, meta, points, cancelled, progress,
            )?,
            None => Generation::build(kind, memory, metric, dim, meta, points, cancelled)?,
        };
        self.graphs_built.fetch_add(1, Ordering::Relaxed);
        Ok(g)
    }

    /// A seeded sample of `n` of the prepared points with the harness's queries and their ground
    /// truth over the sample (multi-fidelity autotune's first phase). Blocking: the ground truth
    /// is `queries x n` distance computations, on every core.
    pub fn sample_of(p: &Prepared, n: usize, seed: u64) -> Prepared {
        let mut sorted: Vec<&Point> = p.points.iter().collect();
        sorted.sort_unstable_by_key(|p| p.id);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut picked =
            rand::seq::index::sample(&mut rng, sorted.len(), n.min(sorted.len())).into_vec();
        picked.sort_unstable();
        let points: Vec<Point> = picked.into_iter().map(|i| sorted[i].clone()).collect();
        let mut harness = (*p.harness).clone();
        harness.truth.neighbors = ground_truth(
            p.handle.meta.metric,
            &points,
            &harness.queries,
            harness.k as usize,
        );
        Prepared {
            handle: p.handle.clone(),
            points: Arc::new(points),
            harness: Arc::new(harness),
        }
    }

    /// Runs every harness query one at a time on `g` with `ef_search` (blocking), checking
    /// `cancelled` between queries.
    pub fn measure(
        g: &Generation,
        h: &Harness,
        ef_search: u32,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Measures> {
        Self::measure_tracked(g, h, ef_search, cancelled, None)
    }

    /// [`Lab::measure`], reporting the queries run to `progress` (enters [`Phase::Measure`]).
    pub fn measure_tracked(
        g: &Generation,
        h: &Harness,
        ef_search: u32,
        cancelled: &dyn Fn() -> bool,
        progress: Option<&Progress>,
    ) -> Result<Measures> {
        if let Some(p) = progress {
            p.enter(Phase::Measure, h.queries.len() as u64);
        }
        let k = h.k as usize;
        let mut latencies = Vec::with_capacity(h.queries.len());
        let mut recall_sum = 0.0;
        let mut evals = 0u64;
        let started = Instant::now();
        for (i, (q, truth)) in h.queries.iter().zip(&h.truth.neighbors).enumerate() {
            if cancelled() {
                return Err(Error::Cancelled("the trial was cancelled".into()));
            }
            if let Some(p) = progress {
                p.set_done(i as u64);
            }
            let t = Instant::now();
            let fetch = if q.exclude.is_some() { k + 1 } else { k };
            let e0 = crate::index::evals_on_this_thread();
            let hits = g.search(&q.vector, fetch, ef_search as usize);
            latencies.push(t.elapsed().as_secs_f64() * 1e6);
            evals += crate::index::evals_on_this_thread().wrapping_sub(e0);
            let found: Vec<u64> = hits
                .iter()
                .map(|h| h.id)
                .filter(|id| Some(*id) != q.exclude)
                .take(k)
                .collect();
            if truth.is_empty() {
                recall_sum += 1.0;
            } else {
                recall_sum += found.iter().filter(|id| truth.contains(id)).count() as f64
                    / truth.len() as f64;
            }
        }
        let total = started.elapsed().as_secs_f64();
        latencies.sort_by(|a, b| a.total_cmp(b));
        let n = h.queries.len().max(1) as f64;
        Ok(Measures {
            recall: recall_sum / n,
            p50_micros: percentile(&latencies, 50.0),
            p95_micros: percentile(&latencies, 95.0),
            p99_micros: percentile(&latencies, 99.0),
            qps: if total > 0.0 { n / total } else { 0.0 },
            mean_distance_evals: evals as f64 / n,
        })
    }

    /// Appends a trial to the journal and flushes it; NOT_FOUND when the prepared index was
    /// deleted meanwhile (even if another was created under its name). Then applies the
    /// retention to the trial's index and harness (the newest `--trials-kept` stay, and every
    /// promoted one).
    #[allow(clippy::too_many_arguments)] // one trial's fields, each from a different step
    pub async fn journal(
        &self,
        p: &Prepared,
        config: HnswConfig,
        m: Measures,
        build_millis: u64,
        memory_bytes: u64,
        source: String,
        fidelity: Fidelity,
    ) -> Result<Trial> {
        let (index, harness, k) = (
            p.handle.meta.name.clone(),
            p.harness.name.clone(),
            p.harness.k,
        );
        let point_count = p.points.len() as u64;
        let owner = (index.as_str(), p.handle.meta.uid);
        let make = |id| Trial {
            id,
            index: index.clone(),
            harness: harness.clone(),
            config,
            k,
            recall: m.recall,
            p50_micros: m.p50_micros,
            p95_micros: m.p95_micros,
            p99_micros: m.p99_micros,
            qps: m.qps,
            build_millis,
            point_count,
            memory_bytes,
            create_time_ms: now_millis(),
            source: source.clone(),
            mean_distance_evals: m.mean_distance_evals,
            fidelity,
            node_id: self
                .shared
                .as_ref()
                .map(|s| s.node_id().to_string())
                .unwrap_or_default(),
        };
        if let Some(shared) = &self.shared {
            return self.journal_shared(shared, p, make(0)).await;
        }
        let trial = self.store().append_trial(Some(owner), make)?;
        self.store().flush().await?;
        log_journaled(&trial, "local");
        let (store, keep) = (self.store().clone(), self.trials_kept);
        let (i, h) = (trial.index.clone(), trial.harness.clone());
        match tokio::task::spawn_blocking(move || store.prune_trials(i.as_str(), h.as_str(), keep))
            .await
            .map_err(Error::from)
            .and_then(|r| r)
        {
            // Flushed with the next write: a crash can only bring old trials back.
            Ok(0) => {}
            Ok(removed) => {
                tracing::debug!(index = %trial.index, harness = %trial.harness, removed, "trial retention")
            }
            Err(e) => {
                tracing::warn!(index = %trial.index, error = %e, "trial retention failed; retried at the next trial")
            }
        }
        Ok(trial)
    }

    /// [`Lab::journal`] on a cluster node: the trial is logged (its id the log sequence) and
    /// answered once mirrored here; then this node asks, in one more record, every node to
    /// remove the trials of the index and harness beyond the newest `--trials-kept` that are
    /// neither pinned nor promoted in the cluster now (best effort: retried at the next trial).
    async fn journal_shared(
        &self,
        shared: &Arc<dyn SharedLab>,
        p: &Prepared,
        trial: Trial,
    ) -> Result<Trial> {
        let index_uid = Self::cluster_uid(&p.handle)?;
        let id = shared
            .log(&LabRecord::Trial {
                index_uid,
                trial: Box::new(trial.clone()),
            })
            .await?;
        let trial = Trial { id, ..trial };
        if self.store().get_trial::<Trial>(id)?.is_none() {
            // The mirror skipped it: the index was deleted meanwhile.
            return Err(Self::index_gone(&trial.index));
        }
        log_journaled(&trial, "cluster");
        if let Err(e) = self.retain_shared(shared, index_uid, &trial).await {
            tracing::warn!(index = %trial.index, error = %e, "trial retention failed; retried at the next trial");
        }
        Ok(trial)
    }

    async fn retain_shared(
        &self,
        shared: &Arc<dyn SharedLab>,
        index_uid: u64,
        trial: &Trial,
    ) -> Result<()> {
        let (store, keep) = (self.store().clone(), self.trials_kept);
        let (i, h) = (trial.index.clone(), trial.harness.clone());
        let beyond =
            tokio::task::spawn_blocking(move || store.trials_beyond(i.as_str(), h.as_str(), keep))
                .await??;
        if beyond.is_empty() {
            return Ok(());
        }
        // Promotions pin their trial; those made before pins existed are kept by their record.
        let (current, history) = self.catalog.registry().get(&trial.index).await?;
        let promoted: std::collections::HashSet<u64> = current
            .iter()
            .chain(history.iter())
            .map(|p| p.trial_id)
            .collect();
        let ids: Vec<u64> = beyond
            .into_iter()
            .filter(|id| !promoted.contains(id))
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        let removed = ids.len();
        shared
            .log(&LabRecord::TrialsRemoved {
                index_uid,
                index: trial.index.clone(),
                harness: trial.harness.clone(),
                ids,
            })
            .await?;
        tracing::debug!(index = %trial.index, harness = %trial.harness, removed, "trial retention (cluster)");
        Ok(())
    }

    /// RunTrial: build, measure and journal one config (source "manual").
    pub async fn run_trial(
        self: &Arc<Self>,
        index: &Name,
        harness: &Name,
        config: HnswConfig,
    ) -> Result<Trial> {
        let p = Arc::new(self.prepare(index, harness).await?);
        let (lab, prep) = (self.clone(), p.clone());
        let halt = self.catalog.stop_token();
        let (m, build_millis, memory) = tokio::task::spawn_blocking(move || -> Result<_> {
            let stop = || halt.is_cancelled();
            let g = lab.build(&prep, config, &stop)?;
            let m = Self::measure(&g, &prep.harness, config.ef_search, &stop)?;
            Ok((m, g.meta.build_millis, g.memory_bytes()))
        })
        .await??;
        self.journal(
            &p,
            config,
            m,
            build_millis,
            memory,
            "manual".into(),
            Fidelity::Full,
        )
        .await
    }

    pub fn get_trial(&self, id: u64) -> Result<Trial> {
        self.store()
            .get_trial(id)?
            .ok_or_else(|| Error::not_found("trial", id.to_string()))
    }

    /// Every journaled trial of the index on the harness.
    pub fn all_trials(&self, index: &Name, harness: &Name) -> Result<Vec<Trial>> {
        self.list_trials(Some(index), Some(harness), None, usize::MAX)
    }

    /// Trials newest first, filtered, with ids below `before`.
    pub fn list_trials(
        &self,
        index: Option<&Name>,
        harness: Option<&Name>,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Trial>> {
        self.store().list_trials(before, limit, |t: &Trial| {
            index.is_none_or(|i| &t.index == i) && harness.is_none_or(|h| &t.harness == h)
        })
    }
}

/// The log line of a journaled trial (`journal`: "local", or "cluster" for the lab log's).
fn log_journaled(trial: &Trial, journal: &'static str) {
    tracing::info!(
        trial = trial.id,
        index = %trial.index,
        config = %trial.config,
        recall = format!("{:.4}", trial.recall),
        p50_us = format!("{:.1}", trial.p50_micros),
        source = %trial.source,
        journal,
        "trial journaled"
    );
}
