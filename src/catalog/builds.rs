//! Builds and swaps: activation, adoption of a trial's graph, compaction, and the background
//! snapshotter.

use super::*;

/// A compaction's hold on the index's build lock, and when to stop.
pub(super) struct Compacting<'a> {
    pub(super) building: tokio::sync::MutexGuard<'a, ()>,
    pub(super) cancelled: Cancelled,
}

/// Longest a background snapshot waits for the indexer to link the writes that called for it.
const RESNAPSHOT_LINK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

impl Catalog {
    /// The index's points and the data version they are at, read without the writer lock
    /// (the store's counts are checked around the scan; when writes keep racing it, falls back
    /// to [`Catalog::snapshot`]). For readers that must not hold up writes (the refresh probe).
    pub async fn snapshot_unlocked(
        &self,
        name: &Name,
    ) -> Result<(Arc<IndexHandle>, Vec<Point>, u64)> {
        let handle = self.handle(name)?;
        handle.check_live()?;
        let (store, uid) = (self.store.clone(), handle.meta.uid);
        match tokio::task::spawn_blocking(move || store.load_points_consistent(uid, 3)).await?? {
            Some((points, counts)) => {
                handle
                    .log_pin
                    .fetch_min(counts.data_version, Ordering::AcqRel);
                Ok((handle, points, counts.data_version))
            }
            None => self.snapshot(name).await,
        }
    }
}

impl Catalog {
    /// The index's points and data version, read together (no write can fall between).
    pub async fn snapshot(&self, name: &Name) -> Result<(Arc<IndexHandle>, Vec<Point>, u64)> {
        let handle = self.handle(name)?;
        let _w = handle.writer.lock().await;
        handle.check_live()?;
        let store = self.store.clone();
        let uid = handle.meta.uid;
        let points = tokio::task::spawn_blocking(move || store.load_points(uid)).await??;
        let version = handle.data_version();
        handle.log_pin.fetch_min(version, Ordering::AcqRel);
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
        self.rebuild_owned(name, None, config, source, profile)
            .await
    }

    /// [`rebuild`](Self::rebuild) of the index with `uid` only: NOT_FOUND when the index of
    /// that name is gone or is another one created since (work that outlived its index never
    /// activates onto its successor). The build also stops when `cancel` is cancelled.
    pub async fn rebuild_for(
        &self,
        name: &Name,
        uid: u64,
        cancel: &tokio_util::sync::CancellationToken,
        config: HnswConfig,
        source: ConfigSource,
        profile: &str,
    ) -> Result<GenerationMeta> {
        let owner = Some((uid, cancel.clone()));
        self.rebuild_owned(name, owner, config, source, profile)
            .await
    }

    /// A build of `config` swapped in and recorded, for `owner` (the index's uid and a cancel
    /// token) when there is one.
    async fn rebuild_owned(
        &self,
        name: &Name,
        owner: Option<(u64, tokio_util::sync::CancellationToken)>,
        config: HnswConfig,
        source: ConfigSource,
        profile: &str,
    ) -> Result<GenerationMeta> {
        let graph = Graph::Build(config);
        self.build_and_swap(name, owner, graph, source, profile, true, None)
            .await
            .map(|(meta, _, _)| meta)
    }

    /// [`rebuild_for`](Self::rebuild_for) with `trial`'s graph as the new generation instead
    /// of a build when it can be: it is of the index with `uid`, builds `config`, and the
    /// change log still holds every write since its data version (else, logged, a build).
    pub async fn adopt_for(
        &self,
        name: &Name,
        uid: u64,
        cancel: &tokio_util::sync::CancellationToken,
        config: HnswConfig,
        trial: TrialGraph,
        source: ConfigSource,
    ) -> Result<GenerationMeta> {
        let owner = Some((uid, cancel.clone()));
        let graph = Graph::Adopt(config, Box::new(trial));
        self.build_and_swap(name, owner, graph, source, "", true, None)
            .await
            .map(|(meta, _, _)| meta)
    }

    /// A cluster node's rollout of a desired generation: builds `config` (or, when `trial` is
    /// the graph this node holds for the index, adopts it) and swaps it in, like
    /// [`rebuild_for`](Self::rebuild_for). When `cancel` fires before the swap (the desired
    /// generation changed meanwhile), nothing is swapped in: CANCELLED.
    #[allow(clippy::too_many_arguments)] // what to build, for whom, and how it stops
    pub async fn activate_for(
        &self,
        name: &Name,
        uid: u64,
        cancel: &tokio_util::sync::CancellationToken,
        config: HnswConfig,
        source: ConfigSource,
        profile: &str,
        trial: Option<u64>,
    ) -> Result<GenerationMeta> {
        let held = trial.and_then(|id| self.take_held(name, id));
        let graph = match held {
            Some(t) => Graph::Adopt(config, Box::new(t)),
            None => Graph::Build(config),
        };
        let owner = Some((uid, cancel.clone()));
        self.build_and_swap(name, owner, graph, source, profile, true, None)
            .await
            .map(|(meta, _, _)| meta)
    }

    /// Keeps `trial`'s graph for a later activation of its promotion (see
    /// [`IndexHandle::held`]), replacing the one held before. Ignored when the index is gone
    /// or is another one.
    pub fn hold(&self, name: &Name, trial: TrialGraph) {
        if let Ok(h) = self.handle(name) {
            if h.meta.uid == trial.uid {
                *h.held.lock() = Some(trial);
            }
        }
    }

    /// Drops the graph held for the index (a job starts on it: the graph it holds is stale).
    pub fn drop_held(&self, name: &Name) {
        if let Ok(h) = self.handle(name) {
            h.held.lock().take();
        }
    }

    /// Takes the graph held for the index when it is trial `id`'s.
    pub(super) fn take_held(&self, name: &Name, id: u64) -> Option<TrialGraph> {
        let h = self.handle(name).ok()?;
        let mut held = h.held.lock();
        if held.as_ref().is_some_and(|t| t.trial_id == id) {
            held.take()
        } else {
            None
        }
    }

    /// The trial whose graph is held for the index, if one is.
    pub fn held_trial(&self, name: &Name) -> Option<u64> {
        let h = self.handle(name).ok()?;
        let held = h.held.lock();
        held.as_ref().map(|t| t.trial_id)
    }

    /// Activation builds and trial-graph adoptions since start.
    pub fn activations(&self) -> &ActivationCounts {
        &self.activations
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
        // Deletes that go on while it builds (a large delete in many calls passes the
        // threshold early) make it outdated: once half of the points it started with are gone
        // it stops, and the check after it starts one of what is left.
        let live_at_start = gen.live_count();
        drop(gen);
        let (h, stop) = (handle.clone(), how.stop.clone());
        let compacting = Compacting {
            building,
            cancelled: Arc::new(move || {
                h.compaction.preempted()
                    || stop.is_cancelled()
                    || h.active().live_count() < live_at_start / 2
            }),
        };
        let (meta, _, _) = self
            .build_and_swap(
                name,
                None,
                Graph::Build(m.config),
                m.source,
                &m.profile,
                true,
                Some(compacting),
            )
            .await?;
        Ok(Some(meta))
    }

    /// [`rebuild`](Self::rebuild); with `persist` false the swap is made in memory only and the
    /// index record to persist is returned for the caller to write (with others, atomically).
    /// With `compacting`, it is a compaction holding the build lock, which stops (CANCELLED)
    /// when told; otherwise it is an activation, which preempts compactions of the index until
    /// it returns.
    #[allow(clippy::too_many_arguments)] // one private seam: who owns the build, what it builds, how it stops
    pub(super) async fn build_and_swap(
        &self,
        name: &Name,
        owner: Option<(u64, tokio_util::sync::CancellationToken)>,
        graph: Graph,
        source: ConfigSource,
        profile: &str,
        persist: bool,
        compacting: Option<Compacting<'_>>,
    ) -> Result<(GenerationMeta, IndexRecord, u64)> {
        let config = match &graph {
            Graph::Build(c) | Graph::Adopt(c, _) => *c,
        };
        let handle = self.handle(name)?;
        let (uid, cancel) = owner.unzip();
        let owner_cancel = cancel.clone();
        if uid.is_some_and(|u| u != handle.meta.uid) {
            return Err(Error::not_found("index", name.as_str()));
        }
        let (_activation, _building, cancelled) = match compacting {
            None => {
                let activation = handle.compaction.activation();
                let never: Cancelled = Arc::new(|| false);
                (Some(activation), handle.building.lock().await, never)
            }
            Some(c) => (None, c.building, c.cancelled),
        };
        // Shown by GetIndex until this build ends, however it ends.
        let progress = Arc::new(Progress::new(Phase::Load, Some(config), 0));
        let _shown = ShownBuild::new(&handle, progress.clone());
        // Snapshot the points (or, adopting a trial's graph, what changed since its points) and
        // start recording writes, atomically with respect to writes. `seq`, the write sequence
        // the points are at, is what the snapshot file will hold.
        let (input, seq, mark) = {
            let mut w = handle.writer.lock().await;
            handle.check_live()?;
            let store = self.store.clone();
            let uid = handle.meta.uid;
            let now = handle.data_version();
            let adopt = match graph {
                Graph::Adopt(_, t)
                    if t.uid == uid
                        && t.version <= now
                        && t.builds(&config)
                        && t.gen.kind == handle.engine =>
                {
                    let (st, after) = (store.clone(), t.version);
                    let caught = tokio::task::spawn_blocking(move || {
                        snapshots::catch_up(&st, uid, after, now)
                    })
                    .await?;
                    match caught {
                        Ok((upserts, deletes, writes)) => Some((t, upserts, deletes, writes)),
                        Err(e) => {
                            tracing::warn!(index = %name, trial = t.trial_id, error = %e, "cannot catch the trial's graph up with the writes since it was built: building the generation");
                            None
                        }
                    }
                }
                Graph::Adopt(_, t) => {
                    tracing::warn!(index = %name, trial = t.trial_id, "the trial's graph is not of this index's points or config: building the generation");
                    None
                }
                Graph::Build(_) => None,
            };
            let input = match adopt {
                Some(a) => Err(a),
                None => Ok(tokio::task::spawn_blocking(move || store.load_points(uid)).await??),
            };
            w.recording = Some(Vec::new());
            (input, now, handle.points_changed())
        };
        match &input {
            Ok(_) => tracing::info!(
                "building HNSW index={} m={} ef_construction={} ef_search={} seed={:?}",
                name,
                config.m,
                config.ef_construction,
                config.ef_search,
                config.seed
            ),
            Err((t, upserts, deletes, writes)) => tracing::info!(
                index = %name,
                trial = t.trial_id,
                config = %config,
                writes,
                upserts = upserts.len(),
                deletes = deletes.len(),
                "adopting the trial's graph: no build"
            ),
        }
        let meta = GenerationMeta {
            number: 0, // decided at the swap
            config,
            source,
            point_count: 0,
            build_millis: 0,
            activate_time_ms: 0,
            profile: profile.to_string(),
            trial_id: 0,
        };
        let (kind, metric, dim) = (handle.engine, handle.meta.metric, handle.meta.dimension);
        let memory = self.memory.clone();
        let halt = self.stop.clone();
        let pauses = self.pauses;
        let counts = &self.activations;
        match &input {
            Ok(_) => counts.builds.fetch_add(1, Ordering::Relaxed),
            Err(_) => counts.adopted.fetch_add(1, Ordering::Relaxed),
        };
        let p = progress.clone();
        let built = tokio::task::spawn_blocking(move || match input {
            Ok(points) => {
                let stop = || {
                    halt.is_cancelled()
                        || cancel.as_ref().is_some_and(|c| c.is_cancelled())
                        || cancelled()
                };
                let stop = pauses.paced(&stop);
                let gen =
                    Generation::build_tracked(kind, &memory, metric, dim, meta, points, &stop, &p)?;
                gen.mark(seq);
                Ok(gen)
            }
            Err((t, upserts, deletes, _)) => {
                // The trial's graph, caught up to `seq`, under the new generation's meta (its
                // build time is the trial's build: this activation built nothing).
                p.enter(Phase::Replay, 0);
                let mut gen = t.gen;
                snapshots::apply_catch_up(&gen, &upserts, &deletes);
                gen.mark(seq);
                gen.meta = GenerationMeta {
                    build_millis: gen.meta.build_millis,
                    trial_id: t.trial_id,
                    ..meta
                };
                Ok(gen)
            }
        })
        .await
        .map_err(Error::from)
        .and_then(|r| r)
        .map_err(|e| shutdown_or(&self.stop, e));
        // Saved before it is published (nothing else writes to it yet), off the runtime, under
        // the number it will get: builds of an index are serialised by `building`.
        let (gen, snapshot) = match built {
            Ok(gen) => {
                let store = self.store.clone();
                let (uid, number) = (handle.meta.uid, handle.active().meta.number + 1);
                progress.enter(Phase::Snapshot, 0);
                let pause = self.pauses.snapshot_write;
                let (gen, snapshot) = tokio::task::spawn_blocking(move || {
                    let snapshot = snapshots::save(&store, &gen, uid, number, seq, pause);
                    (gen, snapshot)
                })
                .await?;
                (Ok(gen), snapshot)
            }
            Err(e) => (Err(e), None),
        };
        let mut w = handle.writer.lock().await;
        let ops = w.recording.take().unwrap_or_default();
        let gen = gen?;
        // The owner gave the build up while it ran (its index was deleted, or a cluster
        // node's desired generation changed): nothing is swapped in.
        // (Its snapshot file, under a number no record names, is pruned like any unused one.)
        if handle.check_live().is_ok() && owner_cancel.as_ref().is_some_and(|c| c.is_cancelled()) {
            return Err(Error::Cancelled(format!(
                "the build of index {name:?} was abandoned before its swap"
            )));
        }
        if let Err(e) = handle.check_live() {
            drop(w);
            let store = self.store.clone();
            let uid = handle.meta.uid;
            tokio::task::spawn_blocking(move || snapshots::remove_all(&store, uid)).await?;
            return Err(e);
        }
        let replayed: usize = ops.iter().map(|(g, _)| g.len()).sum();
        progress.enter(Phase::Replay, 0);
        // Staged like the committer's writes: the indexer links them once the generation is
        // active (searches scan them until then), so the swap does not wait for their linking.
        let gen = tokio::task::spawn_blocking(move || {
            for (group, seq) in &ops {
                stage_writes(&gen, group);
                gen.mark(*seq);
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
            snapshot,
        };
        if persist {
            self.store.put_index(&rec)?;
            self.store.flush().await?;
            self.recorded(&rec, seq).await;
        }
        let meta = gen.meta.clone();
        handle.active.store(Arc::new(gen));
        // The indexer moves to the new generation; the committer sees its fresh segment.
        handle.signals.wake.notify_one();
        handle.signals.room.notify_waiters();
        if rec.snapshot.is_some() {
            handle.snapshot_mark.store(mark, Ordering::Release);
        }
        if persist {
            // The record trimmed the change log: older trial graphs are rebuilt, not adopted.
            handle.log_pin.store(u64::MAX, Ordering::Release);
        }
        drop(w);
        tracing::info!(
            index = %name,
            generation = meta.number,
            points = meta.point_count,
            build_millis = meta.build_millis,
            replayed,
            "swapped in generation"
        );
        Ok((meta, rec, seq))
    }

    /// An ImportPoints stream into `name` ended with its last message committed: the index is
    /// snapshotted in the background if anything changed since its snapshot
    /// ([`snapshots::next_snapshot`], rule 3), so a restart after a bulk load loads it.
    pub fn import_ended(&self, name: &Name) {
        if let Ok(handle) = self.handle(name) {
            handle.request_snapshot("an import ended");
        }
    }

    /// After an index record is durable (the caller holds the index's writer lock): removes
    /// the snapshot files it made unused and trims the change log it covers.
    pub(super) async fn recorded(&self, rec: &IndexRecord, seq: u64) {
        let (store, rec) = (self.store.clone(), rec.clone());
        if let Err(e) =
            tokio::task::spawn_blocking(move || snapshots::after_recorded(&store, &rec, seq)).await
        {
            tracing::warn!(error = %e, "cleaning up after a snapshot failed");
        }
    }
}

/// An index's build shown by GetIndex while this guard lives.
struct ShownBuild<'a>(&'a IndexHandle);

impl<'a> ShownBuild<'a> {
    fn new(handle: &'a IndexHandle, progress: Arc<Progress>) -> Self {
        *handle.build_progress.lock() = Some(progress);
        ShownBuild(handle)
    }
}

impl Drop for ShownBuild<'_> {
    fn drop(&mut self) {
        *self.0.build_progress.lock() = None;
    }
}

/// A build stopped by shutdown is UNAVAILABLE (retry elsewhere or later), not CANCELLED.
pub(super) fn shutdown_or(stop: &tokio_util::sync::CancellationToken, e: Error) -> Error {
    match e {
        Error::Cancelled(_) if stop.is_cancelled() => Error::Unavailable(
            "the server is shutting down: the build stopped and nothing was recorded; the index keeps its previous generation".into(),
        ),
        e => e,
    }
}

/// After a background snapshot was skipped (a build runs, or an activation has not yet
/// recorded its generations), the snapshotter waits this long before it decides again.
const SKIPPED_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// An index's background snapshots, until the index is deleted or the server stops: decides
/// with [`snapshots::next_snapshot`] whenever a write, an import's end or a timer wakes it, and
/// runs one snapshot at a time ([`resnapshot`]). At shutdown it writes one more if the next
/// start would otherwise replay many points ([`snapshots::replay_calls_for_snapshot`]), then
/// ends. It holds the handle (so the shutdown snapshot still has it while the catalog is
/// dropped; the handle's committer ends after it) but the store only while it snapshots.
pub(super) async fn snapshotter(
    h: Arc<IndexHandle>,
    poke: Arc<tokio::sync::Notify>,
    store: Weak<Store>,
    stop: tokio_util::sync::CancellationToken,
    idle: Option<std::time::Duration>,
    pause: Option<std::time::Duration>,
) {
    use std::time::{Duration, Instant};
    // The requests counted before the last snapshot that succeeded, and the findability
    // check's series that asked for one.
    let mut served = 0u64;
    let mut saved_series = 0u64;
    // When the last background snapshot ended and how long it took.
    let mut last: Option<(Instant, Duration)> = None;
    let mut not_before: Option<Instant> = None;
    loop {
        let (wait, requests, series) = {
            if h.check_live().is_err() {
                return;
            }
            let requests = h.snap_requests.load(Ordering::Acquire);
            let series = h.check.series_to_save();
            let state = snapshots::SnapshotState {
                changed: h.changed_since_snapshot(),
                points: h.point_count(),
                requested: requests > served,
                since_write: h.last_write.lock().elapsed(),
                last: last.map(|(end, took)| (end.elapsed(), took)),
                idle,
                check_done: series > saved_series,
            };
            let wait = h
                .active()
                .can_save()
                .then(|| snapshots::next_snapshot(state))
                .flatten()
                .map(|w| {
                    let held = not_before.map_or(Duration::ZERO, |t| {
                        t.saturating_duration_since(Instant::now())
                    });
                    w.max(held)
                });
            (wait, requests, series)
        };
        match wait {
            None => tokio::select! {
                _ = stop.cancelled() => break,
                _ = poke.notified() => continue,
            },
            Some(w) if !w.is_zero() => tokio::select! {
                _ = stop.cancelled() => break,
                _ = poke.notified() => continue,
                _ = tokio::time::sleep(w) => continue,
            },
            Some(_) => {}
        }
        let Some(st) = store.upgrade() else {
            return;
        };
        let started = Instant::now();
        let changed = h.changed_since_snapshot();
        let why = if requests > served {
            *h.snap_why.lock()
        } else if snapshots::resnapshot_due(changed, h.point_count()) {
            "a quarter of the index changed"
        } else if changed == 0 {
            "the findability check ended a series of passes"
        } else {
            "writes stopped"
        };
        match resnapshot(&st, &h, &stop, why, pause).await {
            Ok(true) => {
                served = requests;
                saved_series = series;
                not_before = None;
            }
            Ok(false) => not_before = Some(Instant::now() + SKIPPED_RETRY),
            Err(e) => {
                tracing::warn!(index = %h.meta.name, error = %e, "background snapshot failed");
                not_before = Some(Instant::now() + snapshots::MIN_SPACING);
            }
        }
        last = Some((Instant::now(), started.elapsed()));
    }
    // Shutdown: the next start would replay what changed since the snapshot (not after a
    // storage failure: the server stops without writing).
    let Some(st) = store.upgrade() else {
        return;
    };
    let changed = h.changed_since_snapshot();
    // Or the check's links, or that every point is checked, would not be on disk: the next
    // start would check the whole graph again.
    if !st.failed().is_cancelled()
        && h.check_live().is_ok()
        && h.active().can_save()
        && (snapshots::replay_calls_for_snapshot(changed, h.point_count())
            || h.check.series_to_save() > saved_series)
    {
        if let Err(e) = resnapshot(&st, &h, &stop, "the server is stopping", pause).await {
            tracing::warn!(index = %h.meta.name, error = %e, "snapshot at shutdown failed");
        }
    }
}

/// Snapshots the index's active generation as it is now and records it, so a start replays
/// only the writes after this. The generation's linked part is copied into memory while the
/// linker waits (writes wait only for the id map's copy, searches never wait) and written to
/// disk while nothing waits for it. Skipped (false)
/// when a build runs (it writes its own snapshot) or when the active generation is not yet the
/// recorded one (a profile activation records its generations together at its end). `why` is
/// logged.
async fn resnapshot(
    store: &Arc<Store>,
    handle: &Arc<IndexHandle>,
    stop: &tokio_util::sync::CancellationToken,
    why: &str,
    pause: Option<std::time::Duration>,
) -> Result<bool> {
    let Ok(_building) = handle.building.try_lock() else {
        return Ok(false);
    };
    let started = std::time::Instant::now();
    // The file holds only what the graph has linked: first let the indexer link the writes
    // that called for this snapshot (bounded: under a load that keeps the fresh segment full
    // it takes what is linked by then), so a start replays little. At shutdown the indexer
    // has stopped and no write comes any more: link what is left here (at most
    // --max-unindexed-points, within the grace period), so the next start replays nothing.
    let target = handle.data_version();
    let gen = handle.active();
    if stop.is_cancelled() && gen.unlinked() > 0 {
        let g = gen.clone();
        tokio::task::spawn_blocking(move || while g.link_pending(usize::MAX) > 0 {}).await?;
    }
    let deadline = tokio::time::Instant::now() + RESNAPSHOT_LINK_WAIT;
    while !stop.is_cancelled() {
        let room = handle.signals.room.notified();
        tokio::pin!(room);
        room.as_mut().enable();
        if gen.linked_seq() >= target || !Arc::ptr_eq(&gen, &handle.active()) {
            break;
        }
        tokio::select! {
            _ = room => {}
            _ = tokio::time::sleep_until(deadline) => break,
            _ = stop.cancelled() => return Ok(false),
        }
    }
    drop(gen);
    // `mark`: the changes the graph's linked part holds now, taken under the writer lock so
    // that the change count and the fresh segment agree. The encoding starts later and holds
    // at least those (the linker only adds), so the mark never claims more than the file has.
    // Writes do not wait for the encoding: it holds the linker off and copies the id map
    // first, so a write waits at most for that copy ([`Generation::snapshot_live`]).
    let (gen, mark, before) = {
        let _w = handle.writer.lock().await;
        handle.check_live()?;
        let gen = handle.active();
        let mark = handle.points_changed() - (gen.unlinked() as u64).min(handle.points_changed());
        (gen, mark, handle.snapshot_mark.load(Ordering::Acquire))
    };
    // The points the findability check had checked whole before the copy: the file is
    // checked if it holds exactly those (the linker only adds points).
    let checked_through = handle.check.checked_through(&gen);
    // `seq`: the write sequence the graph's linked part holds (points still in the fresh
    // segment are left out of the file and stay in the change log). The linker waits only
    // while the links are copied (`linker_waited`), not while the file is written.
    let uid = handle.meta.uid;
    let (g, dir) = (gen.clone(), crate::index::snapshot::dir(store.dir()));
    // In the background the file is written at nice 19, on a thread that ends with it (a
    // blocking-pool thread would keep the priority): searches then keep the cores while it is
    // written (about 2.5 s of a core at 1M points). The copies before are made at the usual
    // priority, as the linker waits for them; at shutdown all of it is.
    let background = !stop.is_cancelled();
    let (seq, file, linker_waited, held) = tokio::task::spawn_blocking(move || {
        let number = g.meta.number;
        let run = || {
            g.snapshot_live(
                &dir,
                uid,
                |seq| crate::index::snapshot::file_name(uid, number, seq),
                pause,
                || {
                    if background {
                        super::check::low_priority();
                    }
                },
            )
        };
        if !background {
            return run();
        }
        std::thread::scope(|s| {
            std::thread::Builder::new()
                .name("vectord-snapshot".into())
                .spawn_scoped(s, run)
                .map_err(|e| Error::Internal(format!("starting a snapshot's thread: {e}")))?
                .join()
                .map_err(|_| Error::Internal("a snapshot's thread panicked".into()))?
        })
    })
    .await??;
    let _w = handle.writer.lock().await;
    let recorded = store.get_index(handle.meta.name.as_str())?;
    let current = handle.check_live().is_ok()
        && Arc::ptr_eq(&handle.active(), &gen)
        && recorded
            .as_ref()
            .is_some_and(|r| r.meta.uid == uid && r.generation.number == gen.meta.number);
    // A snapshot at the recorded one's sequence (nothing written since: the check's links) has
    // its name and replaced it: a valid file for the record, so it stays.
    let recorded_file = recorded
        .as_ref()
        .and_then(|r| r.snapshot.as_ref())
        .is_some_and(|s| s.file == file);
    let Some(mut rec) = recorded.filter(|_| current) else {
        if !recorded_file {
            let path = crate::index::snapshot::dir(store.dir()).join(&file);
            let _ = std::fs::remove_file(path);
        }
        return Ok(false);
    };
    let checked = checked_through == Some(held);
    rec.snapshot = Some(crate::store::SnapshotRef {
        file: file.clone(),
        seq,
        checked,
    });
    store.put_index(&rec)?;
    store.flush().await?;
    handle.snapshot_mark.store(mark, Ordering::Release);
    let st = store.clone();
    // Not past a version a trial built a graph at: an activation may still adopt it.
    let trim = seq.min(handle.log_pin.load(Ordering::Acquire));
    tokio::task::spawn_blocking(move || {
        snapshots::after_recorded(&st, &rec, trim);
        // What led here (an import, many writes) and the encoding left free memory behind.
        crate::index::native::release_free_memory();
    })
    .await?;
    tracing::info!(
        index = %handle.meta.name,
        file,
        points = mark.saturating_sub(before),
        why,
        millis = started.elapsed().as_millis() as u64,
        linker_waited_millis = linker_waited.as_millis() as u64,
        checked,
        "snapshotted the active generation in the background"
    );
    Ok(true)
}
