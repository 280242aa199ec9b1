//! The write path: queueing writes for an index's committer, the committer's group commit,
//! and the indexer that links fresh points into the graph.

use super::check::{self, Checker};
use super::*;

/// The committer stops adding queued writes to a group once it holds this many points + ids
/// (a group is never smaller than one write).
const MAX_GROUP_ITEMS: usize = 100_000;

/// A write waiting for its index's committer.
pub(super) struct Pending {
    op: Op,
    /// The write log's sequence of the write (cluster replicas; None on a single node).
    logged: Option<u64>,
    reply: oneshot::Sender<Result<OpOutcome>>,
}

impl Op {
    fn items(&self) -> usize {
        match self {
            Op::Upsert(p) => p.len(),
            Op::Delete(ids) => ids.len(),
        }
    }
}

impl Catalog {
    /// Adds or replaces points, all or nothing. Vectors are checked (and normalised for cosine)
    /// before anything changes; within a request the last point of an id wins.
    pub async fn upsert(self: &Arc<Self>, name: &Name, points: Vec<Point>) -> Result<(u64, u64)> {
        let (handle, unique) = self.prepare_upsert(name, points)?;
        let upserted = unique.len() as u64;
        let outcome = Self::submit(&handle, Op::Upsert(unique)).await?;
        debug_assert_eq!(outcome.affected, upserted);
        handle.wrote();
        self.maybe_compact(name, &handle);
        Ok((upserted, outcome.point_count))
    }

    /// Checks an upsert's points (and normalises them for cosine) without writing anything:
    /// the index's handle and the points unique by id (the last of an id wins, as if they
    /// were upserted one by one).
    pub fn prepare_upsert(
        &self,
        name: &Name,
        mut points: Vec<Point>,
    ) -> Result<(Arc<IndexHandle>, Vec<Point>)> {
        if points.is_empty() {
            return Err(Error::invalid("points is empty: send at least one point"));
        }
        let handle = self.handle(name)?;
        for (i, p) in points.iter_mut().enumerate() {
            handle.prepare_vector(&format!("points[{i}] (id {})", p.id), &mut p.vector)?;
        }
        let mut seen = std::collections::HashSet::with_capacity(points.len());
        let mut unique: Vec<Point> = points
            .into_iter()
            .rev()
            .filter(|p| seen.insert(p.id))
            .collect();
        unique.reverse();
        Ok((handle, unique))
    }

    /// Queues a write taken from the cluster's write log at `seq` for the replica's committer,
    /// waiting for room in the queue (the log is the backlog, nothing is refused); the answer
    /// comes once the write and the applied sequence are durable and searchable. Writes must
    /// be queued in log order.
    pub async fn queue_logged(
        &self,
        handle: &Arc<IndexHandle>,
        op: Op,
        seq: u64,
    ) -> Result<oneshot::Receiver<Result<OpOutcome>>> {
        handle.check_live()?;
        let (reply, answer) = oneshot::channel();
        handle
            .queue
            .send(Pending {
                op,
                logged: Some(seq),
                reply,
            })
            .await
            .map_err(|_| {
                Error::Unavailable(
                    "the index's writes have stopped: the server is stopping after a storage \
                     failure"
                        .into(),
                )
            })?;
        Ok(answer)
    }

    /// What follows an acknowledged write to an index (a background snapshot, compaction),
    /// for writes applied from the cluster's log.
    pub fn after_logged_write(self: &Arc<Self>, handle: &Arc<IndexHandle>) {
        handle.wrote();
        self.maybe_compact(&handle.meta.name, handle);
    }

    /// Removes points; unknown ids are ignored. Returns (deleted, point count).
    pub async fn delete_points(self: &Arc<Self>, name: &Name, ids: Vec<u64>) -> Result<(u64, u64)> {
        if ids.is_empty() {
            return Err(Error::invalid("ids is empty: send at least one id"));
        }
        let handle = self.handle(name)?;
        let outcome = Self::submit(&handle, Op::Delete(ids)).await?;
        if outcome.affected > 0 {
            handle.wrote();
            self.maybe_compact(name, &handle);
        }
        Ok((outcome.affected, outcome.point_count))
    }

    /// Queues a write for the index's committer and waits until a flush covers it.
    /// RESOURCE_EXHAUSTED at once when the queue is full.
    async fn submit(handle: &IndexHandle, op: Op) -> Result<OpOutcome> {
        handle.check_live()?;
        let (reply, answer) = oneshot::channel();
        match handle.queue.try_send(Pending {
            op,
            logged: None,
            reply,
        }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                return Err(Error::Limit(format!(
                    "index {:?} already has {} writes waiting to be committed \
                     (--max-pending-writes): retry with backoff",
                    handle.meta.name.as_str(),
                    handle.max_pending
                )))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                return Err(Error::Unavailable(
                    "the index's writes have stopped: the server is stopping after a storage \
                     failure; the write was not applied"
                        .into(),
                ))
            }
        }
        // Dropped unanswered only when the committer stopped at a storage failure before
        // taking this write.
        answer.await.map_err(|_| {
            Error::Unavailable(
                "the server is stopping after a storage failure; the write was not applied".into(),
            )
        })?
    }
}

/// Applies writes to a generation in order (blocking): deletes and replaced points are
/// tombstoned at once, new points go to its fresh segment (the indexer links them).
pub(super) fn stage_writes(gen: &Generation, ops: &[Op]) {
    for op in ops {
        match op {
            Op::Delete(ids) => gen.delete(ids),
            Op::Upsert(points) => gen.stage(points),
        }
    }
}

/// The same error for every caller of a failed group.
fn for_each_caller(e: &Error) -> Error {
    match e {
        Error::NotFound { what, name } => Error::NotFound {
            what,
            name: name.clone(),
        },
        Error::Unavailable(m) => Error::Unavailable(m.clone()),
        other => Error::Internal(format!("the write failed: {other}")),
    }
}

/// Waits until the index's active generation has room in its fresh segment (or the server
/// stops: then the queued writes are committed anyway, and replayed at the next start). False
/// when the handle is gone or the store has failed.
async fn wait_for_room(
    handle: &Weak<IndexHandle>,
    signals: &Signals,
    stop: &tokio_util::sync::CancellationToken,
    failed: &tokio_util::sync::CancellationToken,
) -> bool {
    loop {
        let room = signals.room.notified();
        tokio::pin!(room);
        room.as_mut().enable();
        let full = match handle.upgrade() {
            Some(h) => h.active().unlinked() >= h.max_unindexed,
            None => return false,
        };
        if !full || stop.is_cancelled() {
            return true;
        }
        tokio::select! {
            biased;
            _ = failed.cancelled() => return false,
            _ = stop.cancelled() => return true,
            _ = room => {}
        }
    }
}

/// An index's committer: takes every write queued (up to [`MAX_GROUP_ITEMS`]) once its fresh
/// segment has room, commits them as one group, answers, repeats. Ends when the handle is
/// gone or the store has failed.
pub(super) async fn committer(
    handle: Weak<IndexHandle>,
    store: Arc<Store>,
    mut rx: mpsc::Receiver<Pending>,
    signals: Arc<Signals>,
    stop: tokio_util::sync::CancellationToken,
) {
    // The store is held only while a group commits: once the catalog is gone (shutdown), an idle
    // committer must not keep the data dir locked after the server has returned.
    let failed = store.failed().clone();
    let store = Arc::downgrade(&store);
    loop {
        let first = tokio::select! {
            biased;
            _ = failed.cancelled() => return,
            p = rx.recv() => match p {
                Some(p) => p,
                None => return,
            },
        };
        // While the fresh segment is full, nothing more is taken: the queue fills up and
        // further writes are refused at once.
        if !wait_for_room(&handle, &signals, &stop, &failed).await {
            let _ = first.reply.send(Err(Error::Unavailable(
                "the index is gone or the server is stopping; the write was not applied".into(),
            )));
            return;
        }
        let mut items = first.op.items();
        let mut group = vec![first];
        while items < MAX_GROUP_ITEMS {
            match rx.try_recv() {
                Ok(p) => {
                    items += p.op.items();
                    group.push(p);
                }
                Err(_) => break,
            }
        }
        let Some(h) = handle.upgrade() else { return };
        let Some(store) = store.upgrade() else { return };
        commit_group(&h, &store, group).await;
        signals.wake.notify_one();
    }
}

/// An index's indexer: links the active generation's fresh points into its graph, a batch at
/// a time on the blocking pool, and tells the committer there is room. Ends at shutdown, when
/// the handle is gone, or at a storage failure.
pub(super) async fn indexer(
    handle: Weak<IndexHandle>,
    store: Weak<Store>,
    signals: Arc<Signals>,
    stop: tokio_util::sync::CancellationToken,
    hold: Option<IndexerHold>,
    check_found: bool,
) {
    let failed = match store.upgrade() {
        Some(s) => s.failed().clone(),
        None => return,
    };
    let mut checker = Checker::new();
    loop {
        let wake = signals.wake.notified();
        tokio::pin!(wake);
        wake.as_mut().enable();
        let Some(h) = handle.upgrade() else {
            return;
        };
        let gen = h.active();
        if stop.is_cancelled() || failed.is_cancelled() {
            return;
        }
        if check_found {
            checker.follow(&gen, &h.check);
        }
        if gen.unlinked() == 0 {
            // Nothing to link: the findability check's turn (module docs of `check.rs`).
            let due = if check_found { checker.due(&gen) } else { None };
            if due == Some(None) {
                let from = checker.begin(&h.check);
                let halt = Arc::new(AtomicBool::new(false));
                let running = check::step(gen.clone(), from, halt.clone());
                tokio::pin!(running);
                let step = tokio::select! {
                    biased;
                    step = &mut running => step,
                    _ = stop.cancelled() => {
                        halt.store(true, Ordering::Release);
                        return;
                    }
                    _ = failed.cancelled() => {
                        halt.store(true, Ordering::Release);
                        return;
                    }
                    _ = &mut wake => {
                        // New points: they are linked first; the step stops at its next point.
                        halt.store(true, Ordering::Release);
                        running.await
                    }
                };
                match step {
                    Some(step) => {
                        if checker.stepped(step, &gen, &h.check) {
                            // A snapshot saves its links, or that every point is checked.
                            h.snap_poke.notify_one();
                        }
                    }
                    None => {
                        tracing::warn!(index = %h.meta.name, "findability check: no thread could be started; skipped until more points are linked");
                        checker.abandon(&h.check);
                    }
                }
                continue;
            }
            drop((gen, h));
            let later = due.flatten().map(tokio::time::Instant::from_std);
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = failed.cancelled() => return,
                _ = wake => continue,
                _ = sleep_until(later) => continue,
            }
        }
        drop(h);
        if let Some(hold) = &hold {
            hold.wait(&stop).await;
            if stop.is_cancelled() {
                return;
            }
        }
        let (linking, room) = (gen.clone(), signals.clone());
        // Room is announced as the linked prefix grows, not only when the call returns.
        let linked = tokio::task::spawn_blocking(move || {
            linking.link_pending_then(LINK_BATCH, &|| room.room.notify_waiters())
        })
        .await;
        signals.room.notify_waiters();
        match linked {
            Ok(n) => {
                if let Some(h) = handle.upgrade() {
                    checker.linked(&gen, n, &h.check);
                }
            }
            Err(e) => {
                // The store has the writes and the graph may not: crash rather than diverge.
                if let Some(store) = store.upgrade() {
                    store.fail_with(format!("linking points into the graph failed: {e}"));
                }
                return;
            }
        }
    }
}

/// Sleeps until `at`, or forever.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One group commit (see the module's invariants).
async fn commit_group(h: &IndexHandle, store: &Arc<Store>, group: Vec<Pending>) {
    let logged = group.iter().filter_map(|p| p.logged).max();
    let (ops, replies): (Vec<Op>, Vec<_>) = group.into_iter().map(|p| (p.op, p.reply)).unzip();
    let fail_all = |replies: Vec<oneshot::Sender<Result<OpOutcome>>>, e: &Error| {
        for r in replies {
            let _ = r.send(Err(for_each_caller(e)));
        }
    };
    let mut w = h.writer.lock().await;
    if let Err(e) = h.check_live() {
        return fail_all(replies, &e);
    }
    let ops = Arc::new(ops);
    let applied = {
        let (st, ops, uid) = (store.clone(), ops.clone(), h.meta.uid);
        let applied =
            logged
                .zip(h.cluster_uid)
                .map(|(sequence, cluster_uid)| crate::store::Applied {
                    cluster_uid,
                    sequence,
                });
        tokio::task::spawn_blocking(move || st.apply_writes_logged(uid, &ops, applied))
            .await
            .map_err(Error::from)
            .and_then(|r| r)
    };
    let (outcomes, counts) = match applied {
        Ok(x) => x,
        Err(e) => return fail_all(replies, &e),
    };
    // One flush for the whole group. A failure here is fatal (the store fires `failed`).
    if let Err(e) = store.flush().await {
        return fail_all(replies, &e);
    }
    // Searchable from here on (the fresh segment); linked into the graph by the indexer.
    let graph = {
        let (gen, ops, seq) = (h.active(), ops.clone(), counts.data_version);
        tokio::task::spawn_blocking(move || {
            stage_writes(&gen, &ops);
            gen.mark(seq);
        })
        .await
    };
    if let Err(e) = graph {
        // The store has the writes and the graph may not: crash rather than diverge.
        let e = store.fail_with(format!("applying writes to the graph failed: {e}"));
        return fail_all(replies, &e);
    }
    if let Some(rec) = w.recording.as_mut() {
        rec.push((
            Arc::try_unwrap(ops).unwrap_or_else(|a| (*a).clone()),
            counts.data_version,
        ));
    }
    h.set_counts(counts);
    drop(w);
    for (r, o) in replies.into_iter().zip(outcomes) {
        let _ = r.send(Ok(o));
    }
}
