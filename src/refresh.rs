//! Refresh policies: the server re-tunes an index by itself when enough of it changed since
//! the last tune (ON_APPEND), or when a periodic probe finds the serving generation's recall
//! under a floor.
//!
//! Decisions are made synchronously where the cause is seen — after an acknowledged write
//! (the catalog's write listener) or after a probe — so a write that crosses the threshold has
//! decided, by the time it is acknowledged, whether it starts a job. The job itself starts in
//! the background (its ground truth may take a while) as an ordinary autotune job with
//! requested_by "refresh-policy", under the one-job-per-index guard: a trigger while a job
//! runs is skipped and re-evaluated at the next write or probe. Any job started on an index
//! (by anyone) counts as its last tune. A probe under the floor starts at most one tune per
//! data version, so a floor the data cannot reach does not loop.
//!
//! State belongs to an index's identity (its uid), not its name: DeleteIndex drops it
//! ([`Refresher::forget`]) and an entry found for another uid is stale and starts afresh.
//! The stored record is never overwritten by a stale copy (set_policy against a job start's
//! tune mark): each writer changes only its own field of the stored record, in one sled
//! transaction (read, change, write), and does so while holding the state lock, so the stored
//! record and the one in memory change in the same order.
//!
//! On a cluster node ([`SharedRefresh`], implemented by `cluster::control` over etcd) the record
//! is the cluster's, one per index, each change one compare-and-swap transaction of only its own
//! fields (so a stale copy never overwrites a newer one across nodes either), and every node
//! follows the records. Every node evaluates the threshold as it applies the index's write log
//! (its applied sequence moving), so writes through any node count: the log is the same on
//! every node, and so is an index's `points_changed` once a node applied it up to the same
//! sequence (the tune mark, `points_changed` at the last tune, is comparable across nodes; the
//! log's sequence would count messages, not the points the threshold is about). A node that
//! decides to tune first claims the tune: one transaction moving the mark from the value its
//! decision read, so of the nodes deciding on the same writes exactly one runs the tune (it
//! then takes the index's job lease like any job). The status (`last_trigger`, `last_job_id`)
//! is in the record, so every node shows it; probes are each node's own (of its serving
//! generation), and a floor-triggered tune is claimed once per data version.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::autotune::adaptive::{self, Plan};
use crate::autotune::jobs::{default_grid, Event, Jobs, TuneRequest, DEFAULT_MIN_RECALL};
use crate::autotune::lab::Lab;
use crate::autotune::select::Objective;
use crate::error::{Error, Result};
use crate::model::{now_millis, Name};

/// Harness queries a probe runs (the first ones of the harness).
pub const PROBE_QUERIES: usize = 32;
pub const REQUESTED_BY: &str = "refresh-policy";
/// Cluster nodes: while a job started on another node holds an index's job lease, how long a
/// node waits before it reads the lease again (instead of claiming a tune at every applied
/// write-log message and having the job start refused).
pub const REMOTE_JOB_RECHECK: Duration = Duration::from_secs(5);

/// An ON_APPEND policy (MANUAL is the absence of a policy).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    pub change_threshold: f64,
    pub harness: Name,
    pub recall_floor: Option<f64>,
    pub activate: bool,
    pub target_recall: Option<f64>,
    pub adaptive: bool,
    pub min_recall: Option<f64>,
}

/// What is stored per index (by uid).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    policy: Option<Policy>,
    /// `points_changed` of the index when its last tune started.
    tuned_at_changes: u64,
    /// The data version a floor-triggered tune last ran for.
    floor_tuned_version: Option<u64>,
}

/// An index's refresh record in the cluster: the record, its index incarnation and the status
/// every node shows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SharedRecord {
    /// The index incarnation (uid) it belongs to: a record of another reads as none.
    pub uid: u64,
    #[serde(flatten)]
    record: Record,
    #[serde(default)]
    last_trigger: String,
    #[serde(default)]
    last_job_id: String,
}

impl SharedRecord {
    /// An empty record of the index with `uid`.
    pub fn new(uid: u64) -> Self {
        SharedRecord {
            uid,
            ..Default::default()
        }
    }
}

/// A change of a shared record: false declines it (nothing is written).
pub type Change<'a> = &'a (dyn for<'r> Fn(&'r mut SharedRecord) -> bool + Send + Sync);

/// A cluster node's refresh records (implemented by `cluster::control` over etcd).
#[async_trait::async_trait]
pub trait SharedRefresh: Send + Sync {
    /// Changes the index's record by `change` in one compare-and-swap transaction (retried from
    /// a fresh read, `change` applied to each), while the index is incarnation `uid`: the
    /// record written, or None when `change` declined. NOT_FOUND when the index is not `uid`.
    async fn update(
        &self,
        index: &Name,
        uid: u64,
        change: Change<'_>,
    ) -> Result<Option<SharedRecord>>;
    /// Every index's record as this node last saw it, by index name, as they change.
    fn records(&self) -> tokio::sync::watch::Receiver<BTreeMap<String, SharedRecord>>;
}

/// What a node's tune claim moves (cluster nodes): the tune mark from `seen` (what the
/// decision read) to `now`, and for a floor-triggered tune its data version.
#[derive(Clone, Copy, Debug)]
struct Claim {
    seen: u64,
    now: u64,
    floor_version: Option<u64>,
}

/// What GetIndex shows.
#[derive(Clone, Debug, Default)]
pub struct Status {
    pub points_changed_since_tune: u64,
    pub last_probe_recall: Option<f64>,
    pub last_probe_time_ms: u64,
    pub last_trigger: String,
    pub last_job_id: String,
}

#[derive(Default)]
struct State {
    /// The uid of the index this state belongs to.
    uid: u64,
    record: Record,
    status: Status,
    /// A job start is in flight.
    pending: bool,
    /// A task follows the index's applied write log (cluster nodes; see `follow`).
    following: bool,
    /// Cluster nodes: a job on another node held the index's job lease when this node last
    /// decided to tune; no tune is decided (nor the lease read again) before this instant.
    remote_job_until: Option<Instant>,
}

pub struct Refresher {
    lab: Arc<Lab>,
    jobs: Arc<Jobs>,
    /// By index name (with the index's uid inside); an entry exists for every index that had
    /// a record or a tune.
    state: Mutex<HashMap<Name, State>>,
    /// Held by each probe: DeleteIndex waits for a probe of the index to finish.
    probing: tokio::sync::Mutex<()>,
    /// The cluster's records (cluster nodes); None on a single node.
    shared: Option<Arc<dyn SharedRefresh>>,
}

/// The index's state, replaced by a fresh one when it belonged to an earlier index of the name.
fn entry<'a>(st: &'a mut HashMap<Name, State>, index: &Name, uid: u64) -> &'a mut State {
    let s = st.entry(index.clone()).or_insert_with(|| State {
        uid,
        ..Default::default()
    });
    if s.uid != uid {
        *s = State {
            uid,
            ..Default::default()
        };
    }
    s
}

/// The index's state, if it belongs to the index with `uid`.
fn current<'a>(st: &'a mut HashMap<Name, State>, index: &Name, uid: u64) -> Option<&'a mut State> {
    st.get_mut(index).filter(|s| s.uid == uid)
}

impl Refresher {
    /// Loads every index's record. The application tells it of writes ([`Refresher::after_write`])
    /// and job starts ([`Refresher::tuned`]): see `app.rs`.
    ///
    /// On a cluster node (`shared`) the records are the cluster's: none is read from the store,
    /// and [`Refresher::follow_shared`] keeps this node's copy.
    pub fn new(
        lab: Arc<Lab>,
        jobs: Arc<Jobs>,
        shared: Option<Arc<dyn SharedRefresh>>,
    ) -> Result<Arc<Self>> {
        let catalog = lab.catalog().clone();
        let mut state = HashMap::new();
        for name in catalog.index_names() {
            if shared.is_some() {
                break;
            }
            let handle = catalog.handle(&name)?;
            if let Some(record) = catalog.store().get_refresh::<Record>(handle.meta.uid)? {
                state.insert(
                    name,
                    State {
                        uid: handle.meta.uid,
                        record,
                        ..Default::default()
                    },
                );
            }
        }
        Ok(Arc::new(Refresher {
            lab,
            jobs,
            state: Mutex::new(state),
            probing: Default::default(),
            shared,
        }))
    }

    /// Cluster nodes: follows the cluster's records until `stop`, keeping this node's copy
    /// (policy, tune mark, status) and a follower of each index with a policy.
    pub fn follow_shared(self: &Arc<Self>, stop: CancellationToken) {
        let Some(shared) = &self.shared else {
            return;
        };
        let mut rx = shared.records();
        let me = Arc::downgrade(self);
        self.lab.catalog().tasks().spawn(async move {
            loop {
                let records = rx.borrow_and_update().clone();
                let Some(r) = me.upgrade() else { return };
                for (name, rec) in &records {
                    if let Ok(index) = Name::parse("index", name) {
                        r.sync(&index, rec);
                    }
                }
                drop(r);
                tokio::select! {
                    () = stop.cancelled() => return,
                    changed = rx.changed() => if changed.is_err() { return },
                }
            }
        });
    }

    /// Takes the cluster's record `rec` of `index` as this node's (if it is of the index this
    /// node has), and starts following the index's writes when it has a policy.
    fn sync(self: &Arc<Self>, index: &Name, rec: &SharedRecord) {
        if let Some(handle) = self.sync_record(index, rec) {
            self.follow(index.clone(), handle);
        }
    }

    /// [`Refresher::sync`]'s copy: the index's handle when a follower should start.
    fn sync_record(
        &self,
        index: &Name,
        rec: &SharedRecord,
    ) -> Option<Arc<crate::catalog::IndexHandle>> {
        let handle = self.lab.catalog().handle(index).ok()?;
        // The record is tagged with the index's cluster uid; the state with the local one.
        if handle.cluster_uid != Some(rec.uid) {
            return None;
        }
        let mut st = self.state.lock();
        let s = entry(&mut st, index, handle.meta.uid);
        s.record = rec.record.clone();
        s.status.last_trigger = rec.last_trigger.clone();
        s.status.last_job_id = rec.last_job_id.clone();
        let start = s.record.policy.is_some() && !s.following;
        s.following |= start;
        drop(st);
        start.then_some(handle)
    }

    /// The cluster uid of the index whose local uid is `uid` (NOT_FOUND when it is gone).
    fn cluster_uid(&self, index: &Name, uid: u64) -> Result<u64> {
        let handle = self.lab.catalog().handle(index)?;
        match handle.cluster_uid {
            Some(c) if handle.meta.uid == uid => Ok(c),
            _ => Err(Error::not_found("index", index.as_str())),
        }
    }

    /// Evaluates the index's threshold each time this node applied more of its write log
    /// (writes through any node), while it has a policy.
    fn follow(self: &Arc<Self>, index: Name, handle: Arc<crate::catalog::IndexHandle>) {
        let uid = handle.meta.uid;
        let mut applied = handle.applied_updates();
        drop(handle);
        let me = Arc::downgrade(self);
        let stop = self.jobs.shutdown_token();
        self.lab.catalog().tasks().spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    changed = applied.changed() => if changed.is_err() { return },
                }
                let Some(r) = me.upgrade() else { return };
                {
                    let mut st = r.state.lock();
                    match current(&mut st, &index, uid) {
                        Some(s) if s.record.policy.is_some() => {}
                        Some(s) => {
                            s.following = false;
                            return;
                        }
                        None => return,
                    }
                }
                r.evaluate(&index);
            }
        });
    }

    /// Sets or clears an index's policy, durably. NOT_FOUND for an unknown index or harness.
    pub async fn set_policy(
        self: &Arc<Self>,
        index: &Name,
        policy: Option<Policy>,
    ) -> Result<Option<Policy>> {
        let handle = self.lab.catalog().handle(index)?;
        if let Some(p) = &policy {
            self.lab.get_harness_synced(index, &p.harness).await?;
        }
        if let Some(shared) = &self.shared {
            let p = policy.clone();
            let set = move |r: &mut SharedRecord| {
                r.record.policy = p.clone();
                true
            };
            let cuid = self.cluster_uid(index, handle.meta.uid)?;
            if let Some(rec) = shared.update(index, cuid, &set).await? {
                self.sync(index, &rec);
            }
            tracing::info!(index = %index, policy = ?policy, "refresh policy set in the cluster");
            self.evaluate(index);
            return Ok(policy);
        }
        let store = self.lab.catalog().store();
        {
            // Written under the lock: see the module's note on the one writer.
            let mut st = self.state.lock();
            let s = entry(&mut st, index, handle.meta.uid);
            store.update_refresh(handle.meta.uid, |r: &mut Record| {
                r.policy = policy.clone();
            })?;
            s.record.policy = policy.clone();
        }
        store.flush().await?;
        tracing::info!(index = %index, policy = ?policy, "refresh policy set");
        // A policy set on an index that already changed enough acts at once.
        self.evaluate(index);
        Ok(policy)
    }

    /// The policy and status of an index (None: no policy).
    pub fn get(&self, index: &Name) -> Option<(Policy, Status)> {
        let handle = self.lab.catalog().handle(index).ok()?;
        let st = self.state.lock();
        let s = st.get(index).filter(|s| s.uid == handle.meta.uid)?;
        let policy = s.record.policy.clone()?;
        let mut status = s.status.clone();
        status.points_changed_since_tune = handle
            .points_changed()
            .saturating_sub(s.record.tuned_at_changes);
        Some((policy, status))
    }

    /// Every index with a policy and the recall of its last probe (for metrics).
    pub fn probe_recalls(&self) -> Vec<(Name, f64)> {
        self.state
            .lock()
            .iter()
            .filter(|(_, s)| s.record.policy.is_some())
            .filter_map(|(n, s)| Some((n.clone(), s.status.last_probe_recall?)))
            .collect()
    }

    /// An acknowledged write changed the index: re-evaluates its ON_APPEND threshold before
    /// the write is answered (so the write has decided whether it starts a tune).
    pub fn after_write(self: &Arc<Self>, index: &Name) {
        self.evaluate(index);
    }

    /// A job started on the index: it is the last tune now.
    pub fn tuned(&self, index: &Name) {
        let Ok(handle) = self.lab.catalog().handle(index) else {
            return;
        };
        let changes = handle.points_changed();
        if let Some(shared) = &self.shared {
            // The cluster's mark (best effort, as below), changed by this one transaction.
            let Some(uid) = handle.cluster_uid else {
                return;
            };
            let (shared, index) = (shared.clone(), index.clone());
            self.lab.catalog().tasks().spawn(async move {
                let mark = move |r: &mut SharedRecord| {
                    r.record.tuned_at_changes = changes;
                    true
                };
                if let Err(e) = shared.update(&index, uid, &mark).await {
                    tracing::warn!(index = %index, error = %e, "could not record the tune mark in the cluster");
                }
            });
            return;
        }
        let mut st = self.state.lock();
        let s = entry(&mut st, index, handle.meta.uid);
        s.record.tuned_at_changes = changes;
        // Bookkeeping, flushed with the next flush: losing it in a crash costs at most one
        // extra tune. Only its own field (see the module's note).
        if let Err(e) =
            self.lab
                .catalog()
                .store()
                .update_refresh(handle.meta.uid, |r: &mut Record| {
                    r.tuned_at_changes = changes;
                })
        {
            tracing::warn!(index = %index, error = %e, "could not record the tune mark");
        }
    }

    /// The ON_APPEND threshold rule.
    fn evaluate(self: &Arc<Self>, index: &Name) {
        let Ok(handle) = self.lab.catalog().handle(index) else {
            return;
        };
        let decision = {
            let mut st = self.state.lock();
            let Some(s) = current(&mut st, index, handle.meta.uid) else {
                return;
            };
            let Some(policy) = s.record.policy.clone() else {
                return;
            };
            let changed = handle
                .points_changed()
                .saturating_sub(s.record.tuned_at_changes);
            let count = handle.point_count();
            if count == 0 || (changed as f64) < policy.change_threshold * count as f64 {
                return;
            }
            let why = format!(
                "{changed} of {count} points changed since the last tune (threshold {})",
                policy.change_threshold
            );
            let claim = Claim {
                seen: s.record.tuned_at_changes,
                now: handle.points_changed(),
                floor_version: None,
            };
            self.decide(s, index, policy, why)
                .map(|(policy, why)| (policy, why, claim))
        };
        if let Some((policy, why, claim)) = decision {
            self.trigger(index.clone(), handle.meta.uid, policy, why, claim);
        }
    }

    /// Under the state lock: start (returns the policy) or record why not.
    fn decide(
        &self,
        s: &mut State,
        index: &Name,
        policy: Policy,
        why: String,
    ) -> Option<(Policy, String)> {
        if s.pending || s.remote_job_until.is_some_and(|t| Instant::now() < t) {
            return None;
        }
        if let Some(job) = self.jobs.running_job(index) {
            // On a cluster node the same words as another node's (`remote_job`).
            s.status.last_trigger = match self.shared {
                Some(_) => format!(
                    "skipped ({why}): job {job} is running on node {}",
                    self.jobs.node_id()
                ),
                None => format!("skipped ({why}): job {job} is running"),
            };
            return None;
        }
        if self.jobs.is_shut_down() {
            return None;
        }
        s.pending = true;
        if self.shared.is_none() {
            s.status.last_trigger = format!("started: {why}");
        }
        Some((policy, why))
    }

    /// Cluster nodes: claims the tune (see the module's note): Ok(true) when this node won it.
    async fn claim(self: &Arc<Self>, index: &Name, uid: u64, why: &str, c: Claim) -> Result<bool> {
        let Some(shared) = &self.shared else {
            return Ok(true);
        };
        let started = format!("started on node {}: {why}", self.jobs.node_id());
        let take = move |r: &mut SharedRecord| {
            if r.record.tuned_at_changes != c.seen
                || (c.floor_version.is_some() && r.record.floor_tuned_version == c.floor_version)
            {
                return false;
            }
            r.record.tuned_at_changes = c.now;
            if c.floor_version.is_some() {
                r.record.floor_tuned_version = c.floor_version;
            }
            r.last_trigger = started.clone();
            true
        };
        let cuid = self.cluster_uid(index, uid)?;
        Ok(match shared.update(index, cuid, &take).await? {
            Some(rec) => {
                self.sync(index, &rec);
                true
            }
            None => false,
        })
    }

    /// Cluster nodes: true when a job (on another node: this node's own are in `decide`) holds
    /// the index's job lease. Then the start is skipped, the status says so on every node (one
    /// write per job, not per decision), and no tune is decided for [`REMOTE_JOB_RECHECK`].
    async fn remote_job(self: &Arc<Self>, index: &Name, uid: u64, why: &str) -> bool {
        let holder = match self.jobs.lease_holder(index).await {
            Ok(Some(h)) => h,
            // Nobody holds it, or it could not be read: the claim and the start find out.
            Ok(None) | Err(_) => return false,
        };
        let skipped = format!(
            "skipped ({why}): job {} is running on node {}",
            holder.job_id, holder.node_id
        );
        if let Some(s) = current(&mut self.state.lock(), index, uid) {
            s.pending = false;
            s.remote_job_until = Some(Instant::now() + REMOTE_JOB_RECHECK);
            s.status.last_trigger = skipped.clone();
        }
        tracing::debug!(index = %index, job = %holder.job_id, node = %holder.node_id, "a job on another node tunes the index: refresh skipped");
        let job = format!(
            "job {} is running on node {}",
            holder.job_id, holder.node_id
        );
        let note = move |r: &mut SharedRecord| {
            // Once per job: the reason's counts change with every write.
            if r.last_trigger.starts_with("skipped") && r.last_trigger.ends_with(&job) {
                return false;
            }
            r.last_trigger = skipped.clone();
            true
        };
        self.note_shared(index, uid, &note).await;
        true
    }

    /// Cluster nodes: changes the index's shared record (best effort: logged).
    async fn note_shared(self: &Arc<Self>, index: &Name, uid: u64, change: Change<'_>) {
        let Some(shared) = &self.shared else { return };
        let updated = match self.cluster_uid(index, uid) {
            Ok(cuid) => shared.update(index, cuid, change).await,
            Err(e) => Err(e),
        };
        match updated {
            Ok(Some(rec)) => self.sync(index, &rec),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(index = %index, error = %e, "could not record the refresh status in the cluster")
            }
        }
    }

    fn trigger(self: &Arc<Self>, index: Name, uid: u64, policy: Policy, why: String, c: Claim) {
        tracing::info!(index = %index, reason = %why, "refresh policy starts a tune");
        let req = tune_request(&index, uid, &policy);
        let me = self.clone();
        self.lab.catalog().tasks().spawn(async move {
            // A cluster node whose index is being tuned by another node's job does not claim
            // (the job start would be refused): it says so, once, and looks again later.
            if me.shared.is_some() && me.remote_job(&index, uid, &why).await {
                return;
            }
            // A cluster node first claims the tune: another node may have it already.
            match me.claim(&index, uid, &why, c).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::debug!(index = %index, "another node claimed the refresh tune");
                    if let Some(s) = current(&mut me.state.lock(), &index, uid) {
                        s.pending = false;
                    }
                    return;
                }
                Err(e) => {
                    tracing::warn!(index = %index, error = %e, "refresh policy could not claim its tune");
                    if let Some(s) = current(&mut me.state.lock(), &index, uid) {
                        s.pending = false;
                        s.status.last_trigger = format!("could not start ({why}): {e}");
                    }
                    return;
                }
            }
            let started = me.jobs.start(req).await;
            if started.is_ok() && me.shared.is_none() {
                me.tuned(&index);
            }
            if let Err(e) = &started {
                // Not started: the claim's mark goes back (unless changed since), so the
                // threshold is evaluated again at the next write, as on a single node.
                let failed = format!("could not start ({why}): {e}");
                let undo = move |r: &mut SharedRecord| {
                    if r.record.tuned_at_changes == c.now {
                        r.record.tuned_at_changes = c.seen;
                    }
                    r.last_trigger = failed.clone();
                    true
                };
                me.note_shared(&index, uid, &undo).await;
            }
            let mut rx = {
                let mut st = me.state.lock();
                let Some(s) = current(&mut st, &index, uid) else {
                    // The index was deleted meanwhile; its job (if any) is cancelled by that.
                    return;
                };
                s.pending = false;
                match started {
                    Ok((rx, _token)) => rx,
                    Err(e) => {
                        s.status.last_trigger = format!("could not start ({why}): {e}");
                        tracing::warn!(index = %index, error = %e, "refresh policy could not start a tune");
                        return;
                    }
                }
            };
            // Follow the job to its end (nobody else listens), so its outcome is logged.
            while let Some(event) = rx.recv().await {
                match event {
                    Event::Started { job_id, .. } => {
                        if let Some(s) = current(&mut me.state.lock(), &index, uid) {
                            s.status.last_job_id = job_id.clone();
                        }
                        let id = move |r: &mut SharedRecord| {
                            r.last_job_id = job_id.clone();
                            true
                        };
                        me.note_shared(&index, uid, &id).await;
                    }
                    Event::Finished(o) => {
                        tracing::info!(index = %index, job = %o.job_id, promoted = o.promotion.is_some(), reason = %o.reason, "refresh tune finished");
                        break;
                    }
                    Event::Ended(why) => {
                        tracing::warn!(index = %index, reason = %why, "refresh tune ended");
                        break;
                    }
                    Event::Trial(_) | Event::Progress { .. } => {}
                }
            }
        });
    }

    /// One probe of every index whose policy has a recall floor.
    pub async fn probe_all(self: &Arc<Self>) {
        let targets: Vec<(Name, u64, Policy)> = self
            .state
            .lock()
            .iter()
            .filter_map(|(n, s)| {
                let p = s.record.policy.clone()?;
                (p.recall_floor.is_some() && !s.pending).then(|| (n.clone(), s.uid, p))
            })
            .collect();
        for (index, uid, policy) in targets {
            if self.jobs.running_job(&index).is_some() {
                continue;
            }
            let _probing = self.probing.lock().await;
            // Deleted (forgotten) while earlier probes ran.
            if current(&mut self.state.lock(), &index, uid).is_none() {
                continue;
            }
            if let Err(e) = self.probe(&index, uid, &policy).await {
                tracing::warn!(index = %index, error = %e, "refresh probe failed");
                if let Some(s) = current(&mut self.state.lock(), &index, uid) {
                    s.status.last_trigger = format!("probe failed: {e}");
                }
            }
        }
    }

    async fn probe(self: &Arc<Self>, index: &Name, uid: u64, policy: &Policy) -> Result<()> {
        let Some(floor) = policy.recall_floor else {
            return Ok(());
        };
        // Ground truth for the probe's queries only, from points read without the writer lock.
        let (handle, h) = self
            .lab
            .probe_harness(index, &policy.harness, PROBE_QUERIES)
            .await?;
        if handle.meta.uid != uid {
            return Ok(());
        }
        let version = h.truth.data_version;
        let generation = handle.active();
        let ef = generation.meta.config.ef_search;
        let halt = self.lab.catalog().stop_token();
        let m = tokio::task::spawn_blocking(move || {
            Lab::measure(&generation, &h, ef, &|| halt.is_cancelled())
        })
        .await??;
        tracing::debug!(index = %index, recall = m.recall, floor, "refresh probe");
        let decision = {
            let mut st = self.state.lock();
            let Some(s) = current(&mut st, index, uid) else {
                return Ok(());
            };
            s.status.last_probe_recall = Some(m.recall);
            s.status.last_probe_time_ms = now_millis();
            if m.recall >= floor || s.record.floor_tuned_version == Some(version) {
                None
            } else {
                let why = format!(
                    "probe recall {:.4} is under the floor {floor} (data version {version})",
                    m.recall
                );
                let claim = Claim {
                    seen: s.record.tuned_at_changes,
                    now: handle.points_changed(),
                    floor_version: Some(version),
                };
                let d = self.decide(s, index, policy.clone(), why);
                if d.is_some() && self.shared.is_none() {
                    s.record.floor_tuned_version = Some(version);
                    // Flushed with the next flush (losing it costs at most one extra tune).
                    let stored =
                        self.lab
                            .catalog()
                            .store()
                            .update_refresh(uid, |r: &mut Record| {
                                r.floor_tuned_version = Some(version);
                            });
                    if let Err(e) = stored {
                        tracing::warn!(index = %index, error = %e, "could not record the floor tune");
                    }
                }
                d.map(|(policy, why)| (policy, why, claim))
            }
        };
        if let Some((policy, why, claim)) = decision {
            self.trigger(index.clone(), uid, policy, why, claim);
        }
        Ok(())
    }

    /// Drops the refresh state of the index with `uid` (DeleteIndex), after any probe running
    /// now has finished. Its stored record goes with the index's data.
    pub async fn forget(&self, index: &Name, uid: u64) {
        let _probing = self.probing.lock().await;
        let mut st = self.state.lock();
        if st.get(index).is_some_and(|s| s.uid == uid) {
            st.remove(index);
        }
    }

    /// Probes every `interval` until `stop`.
    pub fn spawn_prober(self: &Arc<Self>, interval: Duration, stop: CancellationToken) {
        if interval.is_zero() {
            return;
        }
        let me = Arc::downgrade(self);
        self.lab.catalog().tasks().spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let Some(r) = me.upgrade() else { return };
                r.probe_all().await;
            }
        });
    }
}

/// The autotune request a policy makes.
fn tune_request(index: &Name, uid: u64, p: &Policy) -> TuneRequest {
    let objective = match p.target_recall {
        Some(t) => Objective::TargetRecall(t),
        None => Objective::MaxRecall,
    };
    let adaptive = match (p.adaptive, p.target_recall) {
        (true, Some(target)) => Some(Plan {
            target,
            m: adaptive::DEFAULT_M.to_vec(),
            ef_construction: adaptive::DEFAULT_EF_CONSTRUCTION.to_vec(),
            max_trials: adaptive::DEFAULT_MAX_TRIALS,
            max_time: None,
            seed: crate::autotune::harness::DEFAULT_SEED,
            width: 1,
            // Automatic multi-fidelity: on for big indexes.
            sample_points: None,
            confirm: adaptive::DEFAULT_CONFIRM,
        }),
        _ => None,
    };
    TuneRequest {
        index: index.clone(),
        harness: p.harness.clone(),
        min_recall: p.min_recall.unwrap_or(DEFAULT_MIN_RECALL),
        grid: if adaptive.is_some() {
            Vec::new()
        } else {
            default_grid()
        },
        activate: p.activate,
        requested_by: REQUESTED_BY.into(),
        objective,
        adaptive,
        index_uid: Some(uid),
    }
}

/// Checks a policy's values (the harness is checked against the index by `set_policy`).
pub fn validate(p: &Policy) -> Result<()> {
    if !(p.change_threshold > 0.0 && p.change_threshold <= 100.0) {
        return Err(Error::out_of_range(
            "policy.change_threshold",
            "(0, 100]",
            p.change_threshold,
        ));
    }
    for (field, v) in [
        ("policy.recall_floor", p.recall_floor),
        ("policy.target_recall", p.target_recall),
        ("policy.min_recall", p.min_recall),
    ] {
        if let Some(v) = v {
            if !(0.0..=1.0).contains(&v) {
                return Err(Error::out_of_range(field, "[0, 1]", v));
            }
        }
    }
    if p.adaptive && p.target_recall.is_none() {
        return Err(Error::invalid(
            "policy.adaptive needs policy.target_recall: ADAPTIVE looks for the cheapest config reaching it",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autotune::harness::QuerySpec;
    use crate::catalog::Catalog;
    use crate::model::{HnswConfig, Metric, NewIndex, Point};
    use crate::promotion::Registry;
    use crate::store::Store;

    fn policy(threshold: f64) -> Policy {
        Policy {
            change_threshold: threshold,
            harness: Name::parse("harness", "h").unwrap(),
            recall_floor: None,
            activate: false,
            target_recall: None,
            adaptive: false,
            min_recall: None,
        }
    }

    /// A store, a catalog with index "r" (20 points, harness "h") and a refresher over them.
    async fn refresher(
        dir: &std::path::Path,
    ) -> (Arc<Store>, Arc<Catalog>, Arc<Refresher>, Name, u64) {
        let store = Arc::new(Store::open(dir).unwrap());
        let registry = Arc::new(Registry::new(store.clone()));
        let catalog = Arc::new(
            Catalog::recover(
                store.clone(),
                registry,
                crate::tasks::Tasks::new(),
                Default::default(),
            )
            .await
            .unwrap(),
        );
        let index = Name::parse("name", "r").unwrap();
        catalog
            .create_index(NewIndex {
                name: index.clone(),
                dimension: 2,
                metric: Metric::L2,
                default_config: HnswConfig::default(),
                engine: None,
            })
            .await
            .unwrap();
        let point = |id: u64| Point {
            id,
            vector: vec![id as f32, 1.0],
        };
        catalog
            .upsert(&index, (0..20).map(point).collect())
            .await
            .unwrap();
        let lab = Arc::new(Lab::new(catalog.clone(), 100));
        lab.create_harness(
            &index,
            Name::parse("name", "h").unwrap(),
            5,
            QuerySpec::Sampled { count: 5, seed: 1 },
        )
        .await
        .unwrap();
        let jobs = Jobs::recover(lab.clone(), 10, 4, None, None).await.unwrap();
        let r = Refresher::new(lab.clone(), jobs, None).unwrap();
        let uid = catalog.handle(&index).unwrap().meta.uid;
        (store, catalog, r, index, uid)
    }

    /// The race made deterministic: a job start takes the tune mark's copy of the record
    /// before set_policy changes the policy and writes it after set_policy has written (here:
    /// memory still holds the older policy when `tuned` runs, disk already has the new one).
    /// The tune mark's write must not put the older policy back.
    #[tokio::test]
    async fn a_tune_mark_written_after_set_policy_keeps_the_new_policy() {
        let dir = tempfile::tempdir().unwrap();
        let (store, catalog, r, index, uid) = refresher(dir.path()).await;
        r.set_policy(&index, Some(policy(10.0))).await.unwrap();
        // set_policy(20) has reached the store; the tune mark's copy still says 10.
        store
            .update_refresh(uid, |rec: &mut Record| rec.policy = Some(policy(20.0)))
            .unwrap();
        catalog
            .upsert(
                &index,
                vec![Point {
                    id: 99,
                    vector: vec![0.5, 0.5],
                }],
            )
            .await
            .unwrap();
        r.tuned(&index);
        let disk: Record = store.get_refresh(uid).unwrap().unwrap();
        assert_eq!(disk.policy, Some(policy(20.0)), "the newer policy stays");
        let changed = catalog.handle(&index).unwrap().points_changed();
        assert_eq!(disk.tuned_at_changes, changed, "the tune mark is recorded");

        // And the other way round: set_policy never puts back an older tune mark.
        store
            .update_refresh(uid, |rec: &mut Record| rec.tuned_at_changes = 12345)
            .unwrap();
        r.set_policy(&index, Some(policy(30.0))).await.unwrap();
        let disk: Record = store.get_refresh(uid).unwrap().unwrap();
        assert_eq!(disk.policy, Some(policy(30.0)));
        assert_eq!(disk.tuned_at_changes, 12345);
    }

    /// set_policy and tune marks racing on two worker threads round after round: after each,
    /// the stored record is what memory holds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_writers_leave_the_stored_record_as_memory_has_it() {
        let dir = tempfile::tempdir().unwrap();
        let (store, catalog, r, index, uid) = refresher(dir.path()).await;
        let point = |id: u64| Point {
            id,
            vector: vec![id as f32, 1.0],
        };
        for round in 0..300u64 {
            // Moves points_changed, so each round's tune mark differs from the last.
            catalog.upsert(&index, vec![point(round)]).await.unwrap();
            let threshold = 50.0 + (round % 7) as f64;
            let (a, b, i1, i2) = (r.clone(), r.clone(), index.clone(), index.clone());
            let set = tokio::spawn(async move { a.set_policy(&i1, Some(policy(threshold))).await });
            let tune = tokio::task::spawn_blocking(move || b.tuned(&i2));
            set.await.unwrap().unwrap();
            tune.await.unwrap();
            let disk: Record = store.get_refresh(uid).unwrap().unwrap();
            let mem = r.state.lock().get(&index).unwrap().record.clone();
            assert_eq!(disk.policy, mem.policy, "round {round}");
            assert_eq!(disk.policy, Some(policy(threshold)), "round {round}");
            assert_eq!(disk.tuned_at_changes, mem.tuned_at_changes, "round {round}");
        }
    }
}
