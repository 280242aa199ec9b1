//! Autotune jobs: run a grid of trials, stream each as it is journaled, pick the winner
//! (highest recall, then lowest p50), promote it when it clears the recall gate, and optionally
//! swap in a generation built with it.
//!
//! Invariants: at most one job per index runs at a time (a second gets ABORTED naming the
//! first); every trial is journaled before it is streamed; a cancelled job (CancelJob, the
//! client closing the stream, or shutdown) promotes nothing and keeps the trials it journaled;
//! job records are durable, and one found RUNNING at startup is marked FAILED. On a cluster
//! node the records are also the cluster's ([`ClusterJobs`]): ListJobs and CancelJob answer
//! every node's jobs, and the store's copy is only this node's (its metrics count them).
//!
//! Configs sharing (m, ef_construction, seed) share one build: only ef_search differs between
//! them, and it is a search-time knob. Groups build concurrently, one CPU-bound activity per
//! core (a seeded build runs on one thread, so it stays reproducible); trials are journaled and
//! streamed in grid order.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::adaptive::{self, Evaluator, Plan};
use super::lab::{Lab, Prepared};
use super::select::{pareto_front, pick, Objective};
use super::trial::{Fidelity, Trial};
use crate::catalog::TrialGraph;
use crate::error::{Error, Result};
use crate::index::{Activities, Generation, Phase, ProgressView};
use crate::model::{now_millis, ConfigSource, GenerationMeta, HnswConfig, Name};
use crate::promotion::{Fence, Promotion};

pub const DEFAULT_MIN_RECALL: f64 = 0.9;

/// How often a job reports its builds and measurements in flight (`Event::Progress`): at most
/// two events a second, whatever the number of builds running at once (each event lists them
/// all), and none while nothing is in flight.
pub const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// The default grid, in order: (ef_construction, ef_search), m = server default, seed 42.
pub fn default_grid() -> Vec<HnswConfig> {
    [(20, 30), (40, 30), (80, 30), (80, 60), (160, 30)]
        .into_iter()
        .map(|(ef_construction, ef_search)| HnswConfig {
            m: crate::model::DEFAULT_M,
            ef_construction,
            ef_search,
            seed: Some(42),
        })
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub seq: u64,
    pub index: Name,
    pub harness: Name,
    pub state: JobState,
    pub trials_done: u32,
    pub trials_total: u32,
    pub start_time_ms: u64,
    pub end_time_ms: Option<u64>,
    pub requested_by: String,
    /// Why it failed or was cancelled; the outcome in words when it succeeded.
    pub reason: String,
    pub graphs_built: u32,
    /// The node that runs (ran) the job; empty on a single node.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node_id: String,
}

/// The id of job number `seq`: `job-<seq>`.
pub fn job_id(seq: u64) -> String {
    format!("job-{seq}")
}

/// The number of the job with `id`, if it is a job id.
pub fn job_seq(id: &str) -> Option<u64> {
    id.strip_prefix("job-")?.parse().ok().filter(|s| *s > 0)
}

/// A validated autotune request.
#[derive(Clone, Debug)]
pub struct TuneRequest {
    pub index: Name,
    pub harness: Name,
    pub min_recall: f64,
    pub grid: Vec<HnswConfig>,
    pub activate: bool,
    pub requested_by: String,
    pub objective: Objective,
    /// Set for STRATEGY_ADAPTIVE (then `grid` is empty).
    pub adaptive: Option<Plan>,
    /// The index's identity (its uid) the request was made for, when the caller knows it:
    /// NOT_FOUND if the index of that name is another one by now.
    pub index_uid: Option<u64>,
}

#[derive(Clone, Debug)]
pub struct Outcome {
    pub job_id: String,
    pub winner: Option<Trial>,
    pub promotion: Option<Promotion>,
    pub generation: Option<GenerationMeta>,
    pub reason: String,
    /// This job's trials on the recall x p50 x memory Pareto front, fastest first.
    pub pareto_front: Vec<Trial>,
}

#[derive(Clone, Debug)]
pub enum Event {
    Started {
        job_id: String,
        grid: Vec<HnswConfig>,
        adaptive: bool,
    },
    Trial(Box<Trial>),
    Finished(Box<Outcome>),
    /// The builds and measurements in flight, oldest first: sent every [`PROGRESS_EVERY`]
    /// while at least one is.
    Progress {
        job_id: String,
        activities: Vec<ProgressView>,
    },
    /// The job ended without an outcome (cancelled or failed); the stream ends with this error.
    Ended(Error),
}

/// The graph of the job's best trial so far: the trial [`pick`] chooses among those journaled
/// so far, offered in journal order (so it ends as the winner's, ties going to the earlier
/// trial as in `pick`, but for the case in [`Best::offer`]). Autotune with activate swaps that
/// graph in instead of building the winner's config again; without activate, a promoted
/// winner's graph is handed to the catalog for a later ActivateProfile. Only one is held: a
/// better trial's replaces it, so a job keeps at most one graph beyond the ones it is building
/// or measuring.
struct Best {
    objective: Objective,
    held: Mutex<Option<(Trial, Arc<Generation>)>>,
    /// Every trial offered: [`pick`]'s p50 tie is relative to the lowest p50, so whether a
    /// trial beats the held one depends on all of them, not on the pair.
    offered: Mutex<Vec<Trial>>,
}

impl Best {
    fn new(objective: Objective) -> Self {
        Best {
            objective,
            held: Mutex::new(None),
            offered: Mutex::new(Vec::new()),
        }
    }

    /// Keeps `graph` when `trial` (measured on it) is now the pick among every trial offered.
    /// (When a new trial lowers the lowest p50 so far, the pick may become an earlier trial
    /// on a graph no longer held; the held one stays, and activation then builds the winner.)
    fn offer(&self, trial: &Trial, graph: &Arc<Generation>) {
        let mut offered = self.offered.lock();
        offered.push(trial.clone());
        let wins = pick(&offered, self.objective).is_some_and(|(w, _)| w.id == trial.id);
        let mut held = self.held.lock();
        if wins || held.is_none() {
            *held = Some((trial.clone(), graph.clone()));
        }
    }

    /// The graph of trial `id`, if it is the one held and nothing else uses it any more.
    fn take(&self, id: u64) -> Option<Generation> {
        let (t, g) = self.held.lock().take()?;
        if t.id != id {
            return None;
        }
        Arc::try_unwrap(g).ok()
    }
}

/// One measured grid entry, waiting for its turn to be journaled.
struct Measured {
    /// Its place in the grid (grid jobs journal in grid order; unused by ADAPTIVE).
    at: usize,
    config: HnswConfig,
    measures: super::lab::Measures,
    build_millis: u64,
    memory_bytes: u64,
    /// The graph it was measured on (for [`Best`]).
    graph: Arc<Generation>,
    fidelity: Fidelity,
}

struct Running {
    job_id: String,
    token: CancellationToken,
    /// The uid of the index the job runs on: everything it does belongs to that index.
    uid: u64,
    /// Cancelled once the job's end is recorded and its place released.
    done: CancellationToken,
    /// Cancelled just before the job's end is recorded: from then on a client may see it
    /// finished, so a job started on its index waits the moment until `done` instead of being
    /// refused for it.
    ending: CancellationToken,
    /// Why it was cancelled, when not by CancelJob or the client (e.g. its index was deleted).
    why: Arc<Mutex<Option<String>>>,
    /// Cancelled when the job's index is deleted: stops even its activation build (CancelJob
    /// does not: past the promotion, a job activates what it promoted).
    abandon: CancellationToken,
    /// The job's lease on a cluster node.
    lease: Option<Arc<dyn JobLease>>,
}

/// A cluster node's job leases and job records (implemented by `cluster::control` over etcd):
/// one autotune job per index across the cluster, and every job's record seen from every node.
#[async_trait::async_trait]
pub trait ClusterJobs: Send + Sync {
    /// This node's id (a job record's `node_id`).
    fn node_id(&self) -> &str;
    /// Takes the index's job lease for a new job: the lease and the job's number, unique in
    /// the cluster (its id is [`job_id`]). ABORTED (`Error::Conflict`) naming the holder when
    /// another job (on any node) has the lease.
    async fn acquire(self: Arc<Self>, index: &Name) -> Result<(Arc<dyn JobLease>, u64)>;
    /// Writes the job's record (created, or changed by the node running it). A finished record
    /// is final: a change to one is not written, and the stored record is returned.
    async fn save(&self, job: &JobRecord) -> Result<JobRecord>;
    /// Every job record of the cluster, newest first. A RUNNING record whose job no longer
    /// runs (its node died or lost the job lease; or it is this node's and `here` does not
    /// know it: a previous process of this node ran it) is made FAILED first.
    async fn list(
        &self,
        here: &(dyn for<'s> Fn(&'s str) -> bool + Send + Sync),
    ) -> Result<Vec<JobRecord>>;
    /// CancelJob of a job this node does not run: asks the node running it to cancel it and
    /// waits (bounded) for its end. NOT_FOUND for an unknown job, FAILED_PRECONDITION for a
    /// finished one (or one whose node died: then made FAILED).
    async fn cancel(
        &self,
        id: &str,
        here: &(dyn for<'s> Fn(&'s str) -> bool + Send + Sync),
    ) -> Result<JobRecord>;
    /// Deletes the finished records beyond the newest `kept` (running ones stay).
    async fn trim(&self, kept: usize) -> Result<()>;
    /// The job holding the index's job lease (any node's), or None: one read.
    async fn holder(&self, index: &Name) -> Result<Option<LeaseHolder>>;
}

/// The job holding an index's job lease ([`ClusterJobs::holder`]).
#[derive(Clone, Debug, PartialEq)]
pub struct LeaseHolder {
    pub job_id: String,
    pub node_id: String,
}

/// A job's hold on its index's job lease. Its fence goes into the job's promotion, and its
/// activation is made through it, so a job that lost the lease can do neither.
#[async_trait::async_trait]
pub trait JobLease: Send + Sync {
    fn fence(&self) -> Fence;
    /// Cancelled when the lease is lost (it expired, e.g. its node was paused or cut off from
    /// etcd past its TTL, or it was revoked): the job stops at once and ends FAILED.
    fn lost(&self) -> CancellationToken;
    /// Cancelled when CancelJob through another node asks to cancel the job.
    fn cancel_requested(&self) -> CancellationToken;
    /// Sets the index's desired generation to `config` (the promoted trial's, whose graph this
    /// node holds), fenced, and waits until this node serves it (or `cancel`): its number.
    async fn activate(
        &self,
        config: HnswConfig,
        trial_id: u64,
        cancel: &CancellationToken,
    ) -> Result<u64>;
    /// Gives the lease up (best effort: it expires by itself otherwise).
    async fn release(&self);
}

/// A test hook (`Config::job_gate`; no flag sets it): jobs on the gated indexes wait RUNNING,
/// with no trial done, until the gate opens or the job is cancelled. Tests use it to hold a job
/// running for exactly as long as they need, instead of a grid slow enough to be caught running.
/// A gate [`JobGate::closed_at_end`] holds them instead once their end is recorded, before they
/// free their place: the moment a job is listed ended but has not freed it yet, made long.
#[derive(Clone, Debug)]
pub struct JobGate {
    indexes: Vec<String>,
    open: Arc<tokio::sync::watch::Sender<bool>>,
    at_end: bool,
}

impl JobGate {
    /// A closed gate for jobs on `indexes`.
    pub fn closed<S: Into<String>>(indexes: impl IntoIterator<Item = S>) -> Self {
        JobGate {
            indexes: indexes.into_iter().map(Into::into).collect(),
            open: Arc::new(tokio::sync::watch::channel(false).0),
            at_end: false,
        }
    }

    /// A closed gate that holds jobs on `indexes` after their end is recorded.
    pub fn closed_at_end<S: Into<String>>(indexes: impl IntoIterator<Item = S>) -> Self {
        JobGate {
            at_end: true,
            ..Self::closed(indexes)
        }
    }

    /// Lets every waiting and later job through.
    pub fn open(&self) {
        self.open.send_replace(true);
    }

    /// Returns once the gate is open, at once for an index it does not hold.
    pub(crate) async fn pass(&self, index: &Name) {
        if self.indexes.iter().any(|i| i == index.as_str()) {
            let _ = self.open.subscribe().wait_for(|open| *open).await;
        }
    }
}

pub struct Jobs {
    lab: Arc<Lab>,
    /// index -> its running job
    running: Mutex<HashMap<Name, Running>>,
    /// Cancelled at shutdown; every job token is its child.
    root: CancellationToken,
    kept: usize,
    /// Most jobs running at once server-wide (--max-concurrent-jobs).
    max_running: usize,
    /// Tests only: see `JobGate`.
    gate: Option<JobGate>,
    /// A cluster node's job leases; None on a single node.
    cluster: Option<Arc<dyn ClusterJobs>>,
}

impl Jobs {
    /// Marks jobs left RUNNING by a previous process as FAILED.
    pub async fn recover(
        lab: Arc<Lab>,
        kept: usize,
        max_running: usize,
        gate: Option<JobGate>,
        cluster: Option<Arc<dyn ClusterJobs>>,
    ) -> Result<Arc<Self>> {
        let store = lab.catalog().store().clone();
        for (seq, mut job) in store.list_jobs::<JobRecord>()? {
            if job.state == JobState::Running {
                job.state = JobState::Failed;
                job.end_time_ms = Some(now_millis());
                job.reason = "the server stopped while the job was running".into();
                store.put_job(seq, &job)?;
                tracing::warn!(job = %job.id, index = %job.index, "job was running when the server stopped: marked FAILED");
            }
        }
        store.trim_jobs(kept, |j: &JobRecord| j.state == JobState::Running)?;
        store.flush().await?;
        // A child of the server's shutdown token: shutdown cancels every job.
        let root = lab.catalog().stop_token().child_token();
        Ok(Arc::new(Jobs {
            lab,
            running: Mutex::new(HashMap::new()),
            root,
            kept,
            max_running: max_running.max(1),
            gate,
            cluster,
        }))
    }

    /// Whether a new job can take `index`'s place: `None` when it is free, the token to wait
    /// for when its job is ending (its end recorded or being recorded), CONFLICT when a job
    /// runs on it.
    fn place_on(&self, index: &Name) -> Result<Option<CancellationToken>> {
        match self.running.lock().get(index) {
            None => Ok(None),
            Some(r) => Self::holder(index, r).map(Some),
        }
    }

    /// The token to wait for when `r` (holding `index`) is ending, CONFLICT when it runs.
    fn holder(index: &Name, r: &Running) -> Result<CancellationToken> {
        if r.ending.is_cancelled() {
            return Ok(r.done.clone());
        }
        Err(Error::Conflict(format!(
            "index {:?} is already being tuned by job {}; wait for it or cancel it",
            index.as_str(),
            r.job_id
        )))
    }

    /// The id of the job running on an index, if one is (one whose end is being recorded is
    /// not: a job started now waits for it, see [`Jobs::place_on`]).
    pub fn running_job(&self, index: &Name) -> Option<String> {
        self.running
            .lock()
            .get(index)
            .filter(|r| !r.ending.is_cancelled())
            .map(|r| r.job_id.clone())
    }

    /// On a cluster node, the job (any node's) holding the index's job lease: one etcd read.
    /// None on a single node (see [`Jobs::running_job`]).
    pub async fn lease_holder(&self, index: &Name) -> Result<Option<LeaseHolder>> {
        match &self.cluster {
            Some(c) => c.holder(index).await,
            None => Ok(None),
        }
    }

    /// This node's id on a cluster node; empty on a single node.
    pub fn node_id(&self) -> &str {
        self.cluster.as_ref().map_or("", |c| c.node_id())
    }

    /// Whether the server is shutting down.
    pub fn is_shut_down(&self) -> bool {
        self.root.is_cancelled()
    }

    /// A token cancelled at shutdown.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.root.child_token()
    }

    /// Cancels every running job (server shutdown).
    pub fn shutdown(&self) {
        self.root.cancel();
    }

    /// Saves the job's record: in the store and, on a cluster node, in the cluster.
    async fn save(&self, job: &JobRecord) -> Result<()> {
        let store = self.lab.catalog().store();
        store.put_job(job.seq, job)?;
        store.flush().await?;
        if let Some(c) = &self.cluster {
            c.save(job).await?;
        }
        Ok(())
    }

    /// Saves the job's progress: in the store, and best effort in the cluster (a control plane
    /// that does not answer does not fail the job; its end is written again).
    async fn save_progress(&self, job: &JobRecord) -> Result<()> {
        let store = self.lab.catalog().store();
        store.put_job(job.seq, job)?;
        store.flush().await?;
        if let Some(c) = &self.cluster {
            if let Err(e) = c.save(job).await {
                tracing::warn!(job = %job.id, error = %e, "could not write the job's progress to the cluster");
            }
        }
        Ok(())
    }

    /// Whether job `id` runs on this node (in this process).
    fn runs_here(&self, id: &str) -> bool {
        self.running.lock().values().any(|r| r.job_id == id)
    }

    /// Jobs, running first, then finished ones newest first (at most `kept` of those): on a
    /// cluster node every node's, from the cluster.
    pub async fn list(&self, index: Option<&Name>) -> Result<Vec<JobRecord>> {
        let all = match &self.cluster {
            Some(c) => c.list(&|id| self.runs_here(id)).await?,
            None => self.local_records()?,
        };
        Ok(self.running_then_kept(all, index))
    }

    /// This node's own job records (from its store), as [`Jobs::list`] orders them: what its
    /// metrics count.
    pub fn list_local(&self, index: Option<&Name>) -> Result<Vec<JobRecord>> {
        Ok(self.running_then_kept(self.local_records()?, index))
    }

    fn local_records(&self) -> Result<Vec<JobRecord>> {
        Ok(self
            .lab
            .catalog()
            .store()
            .list_jobs::<JobRecord>()?
            .into_iter()
            .map(|(_, j)| j)
            .collect())
    }

    fn running_then_kept(&self, all: Vec<JobRecord>, index: Option<&Name>) -> Vec<JobRecord> {
        let (running, finished): (Vec<_>, Vec<_>) = all
            .into_iter()
            .filter(|j| index.is_none_or(|i| &j.index == i))
            .partition(|j| j.state == JobState::Running);
        running
            .into_iter()
            .chain(finished.into_iter().take(self.kept))
            .collect()
    }

    /// A job's record (on a cluster node, any node's job).
    pub async fn get(&self, id: &str) -> Result<JobRecord> {
        self.list(None)
            .await?
            .into_iter()
            .find(|j| j.id == id)
            .ok_or_else(|| Error::not_found("job", id))
    }

    fn get_local(&self, id: &str) -> Result<JobRecord> {
        self.list_local(None)?
            .into_iter()
            .find(|j| j.id == id)
            .ok_or_else(|| Error::not_found("job", id))
    }

    /// Deletes old records beyond `kept` in the cluster (best effort: the next job's end
    /// trims again).
    async fn trim_cluster(&self) {
        if let Some(c) = &self.cluster {
            if let Err(e) = c.trim(self.kept).await {
                tracing::warn!(error = %e, "could not trim old job records in the cluster");
            }
        }
    }

    /// Cancels the job running on the index with `uid` (if any) and waits until its end is
    /// recorded: it promotes and activates nothing. For DeleteIndex.
    pub async fn cancel_index(&self, index: &Name, uid: u64, why: &str) {
        let found = self
            .running
            .lock()
            .get(index)
            .filter(|r| r.uid == uid)
            .map(|r| {
                (
                    r.token.clone(),
                    r.done.clone(),
                    r.why.clone(),
                    r.abandon.clone(),
                )
            });
        if let Some((token, done, reason, abandon)) = found {
            *reason.lock() = Some(why.to_string());
            abandon.cancel();
            token.cancel();
            done.cancelled().await;
        }
    }

    /// Cancels a running job; FAILED_PRECONDITION for one already finished. On a cluster node a
    /// job another node runs is cancelled there (see [`ClusterJobs::cancel`]).
    pub async fn cancel(&self, id: &str) -> Result<JobRecord> {
        if let Some(c) = &self.cluster {
            if !self.runs_here(id) {
                return c.cancel(id, &|id| self.runs_here(id)).await;
            }
        }
        let job = self.get_local(id)?;
        if job.state != JobState::Running {
            return Err(Error::Precondition(format!(
                "job {id} already finished ({:?}); only a running job can be cancelled",
                job.state
            )));
        }
        let token = self
            .running
            .lock()
            .values()
            .find(|r| r.job_id == id)
            .map(|r| r.token.clone());
        if let Some(t) = token {
            t.cancel();
        }
        // The job records CANCELLED itself as it stops, then frees its place under
        // --max-concurrent-jobs; wait for both, so the answer is true and a job started right
        // after it is not refused for this one.
        for _ in 0..600 {
            let j = self.get_local(id)?;
            let holds_place = self.running.lock().values().any(|r| r.job_id == id);
            if j.state != JobState::Running && !holds_place {
                return Ok(j);
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        self.get_local(id)
    }

    /// Starts a job. Returns the events receiver and the job's token (cancel it to stop the
    /// job). The first event is `Started`.
    pub async fn start(
        self: &Arc<Self>,
        req: TuneRequest,
    ) -> Result<(mpsc::UnboundedReceiver<Event>, CancellationToken)> {
        // Unknown index or harness: NOT_FOUND before anything else.
        self.lab
            .get_harness_synced(&req.index, &req.harness)
            .await?;
        let handle = self.lab.catalog().handle(&req.index)?;
        let uid = handle.meta.uid;
        if req.index_uid.is_some_and(|u| u != uid) {
            return Err(Error::not_found("index", req.index.as_str()));
        }
        // Checked again when the job reads the points (`Lab::prepare`); here so that a call
        // that cannot run fails as a call, not in its stream.
        if handle.point_count() == 0 {
            return Err(Lab::no_points(&req.index));
        }
        drop(handle);
        let store = self.lab.catalog().store().clone();
        let token = self.root.child_token();
        let done = CancellationToken::new();
        let ending = CancellationToken::new();
        let abandon = CancellationToken::new();
        let why = Arc::new(Mutex::new(None::<String>));
        // A job whose end is recorded no longer holds the index: wait out the moment until it
        // has freed its place (its last writes) rather than refuse a client that saw it end.
        while let Some(wait) = self.place_on(&req.index)? {
            wait.cancelled().await;
        }
        // A cluster node first takes the index's job lease (one job per index across the
        // cluster), under the id the job will get.
        let lease = match &self.cluster {
            Some(c) => Some(c.clone().acquire(&req.index).await?),
            None => None,
        };
        let (lease, leased_seq) = lease.unzip();
        let place = || {
            let mut running = self.running.lock();
            if let Some(r) = running.get(&req.index) {
                return Self::holder(&req.index, r).map(Err);
            }
            // Jobs whose end is recorded do no more work and no longer count.
            let busy = running
                .values()
                .filter(|r| !r.ending.is_cancelled())
                .count();
            if busy >= self.max_running {
                return Err(Error::Limit(format!(
                    "{busy} autotune jobs are running, the server's limit (--max-concurrent-jobs); wait for one to finish"
                )));
            }
            let seq = leased_seq.map_or_else(|| store.next_job_seq(), Ok)?;
            running.insert(
                req.index.clone(),
                Running {
                    job_id: job_id(seq),
                    token: token.clone(),
                    uid,
                    done: done.clone(),
                    why: why.clone(),
                    abandon: abandon.clone(),
                    lease: lease.clone(),
                    ending: ending.clone(),
                },
            );
            Ok(Ok(seq))
        };
        let placed = loop {
            match place() {
                Ok(Err(wait)) => wait.cancelled().await,
                Ok(Ok(seq)) => break Ok(seq),
                Err(e) => break Err(e),
            }
        };
        let seq = match placed {
            Ok(seq) => seq,
            Err(e) => {
                if let Some(l) = lease {
                    l.release().await;
                }
                return Err(e);
            }
        };
        let job_id = job_id(seq);
        let release = |jobs: &Jobs| {
            jobs.running.lock().remove(&req.index);
            done.cancel();
        };
        let release_lease = |lease: Option<Arc<dyn JobLease>>| async move {
            if let Some(l) = lease {
                l.release().await;
            }
        };
        let job = JobRecord {
            id: job_id.clone(),
            seq,
            index: req.index.clone(),
            harness: req.harness.clone(),
            state: JobState::Running,
            trials_done: 0,
            trials_total: match &req.adaptive {
                Some(plan) => plan.max_trials,
                None => req.grid.len() as u32,
            },
            start_time_ms: now_millis(),
            end_time_ms: None,
            requested_by: req.requested_by.clone(),
            reason: String::new(),
            graphs_built: 0,
            node_id: self
                .cluster
                .as_ref()
                .map(|c| c.node_id().to_string())
                .unwrap_or_default(),
        };
        if let Err(e) = self.save(&job).await {
            release(self);
            release_lease(lease).await;
            return Err(e);
        }
        if let Err(e) = store.trim_jobs(self.kept, |j: &JobRecord| j.state == JobState::Running) {
            tracing::warn!(error = %e, "could not trim old job records");
        }
        self.trim_cluster().await;
        tracing::info!(job = %job_id, index = %req.index, harness = %req.harness, trials = req.grid.len(), "autotune started");

        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(Event::Started {
            job_id: job_id.clone(),
            grid: req.grid.clone(),
            adaptive: req.adaptive.is_some(),
        });
        // A lost job lease stops the job at once: its trials and builds are cancelled and it
        // ends FAILED naming the lease (its promotion and activation are fenced anyway).
        let lost = Arc::new(Mutex::new(None::<String>));
        if let Some(l) = &lease {
            let (gone, tok, ended, lost) = (l.lost(), token.clone(), done.clone(), lost.clone());
            let (id, index) = (job_id.clone(), req.index.clone());
            self.lab.catalog().tasks().spawn(async move {
                tokio::select! {
                    _ = gone.cancelled() => {
                        tracing::warn!(job = %id, index = %index, "the job lost its index's job lease: stopping it");
                        *lost.lock() = Some(format!(
                            "job {id} lost index {:?}'s job lease (it expired or was revoked: its node was paused or cut off from the cluster's control plane past the lease's TTL, or the lease was revoked) and was stopped; nothing was promoted or activated",
                            index.as_str(),
                        ));
                        tok.cancel();
                    }
                    _ = ended.cancelled() => {}
                }
            });
            // CancelJob through another node: the job stops as if cancelled here.
            let (asked, tok, done) = (l.cancel_requested(), token.clone(), done.clone());
            let id = job_id.clone();
            self.lab.catalog().tasks().spawn(async move {
                tokio::select! {
                    _ = asked.cancelled() => {
                        tracing::info!(job = %id, "CancelJob through another node: cancelling the job");
                        tok.cancel();
                    }
                    _ = done.cancelled() => {}
                }
            });
        }
        let jobs = self.clone();
        let tok = token.clone();
        let stop_why = why;
        self.lab.catalog().tasks().spawn(async move {
            let mut job = job;
            let acts = Activities::default();
            let ticking = CancellationToken::new();
            let ticker = tokio::spawn(report_progress(
                job.id.clone(),
                acts.clone(),
                tx.clone(),
                ticking.clone(),
            ));
            // The points and the harness's ground truth (recomputed, with progress, when the
            // points changed since it was computed), then the job.
            let result = match jobs
                .lab
                .prepare_tracked(&req.index, &req.harness, &acts)
                .await
            {
                Ok(p) if p.handle.meta.uid == uid => {
                    jobs.run(
                        &mut job,
                        &req,
                        (uid, &abandon),
                        Arc::new(p),
                        &tok,
                        &tx,
                        &acts,
                    )
                    .await
                }
                Ok(_) => Err(Error::not_found("index", req.index.as_str())),
                Err(e) => Err(e),
            };
            // No progress after the job's last event.
            ticking.cancel();
            let _ = ticker.await;
            job.end_time_ms = Some(now_millis());
            let event = match result {
                Ok(outcome) => {
                    job.state = JobState::Succeeded;
                    job.reason = outcome.reason.clone();
                    Event::Finished(Box::new(outcome))
                }
                // Stopped by the loss of its job lease (not by a client, DeleteIndex or
                // shutdown): FAILED, naming the lease.
                Err(Error::Cancelled(_))
                    if !jobs.root.is_cancelled()
                        && stop_why.lock().is_none()
                        && lost.lock().is_some() =>
                {
                    let why = lost.lock().clone().unwrap_or_default();
                    job.state = JobState::Failed;
                    job.reason = why.clone();
                    tracing::error!(job = %job.id, reason = %why, "autotune failed");
                    Event::Ended(Error::JobFailed {
                        job: job.id.clone(),
                        cause: Box::new(Error::Conflict(why)),
                    })
                }
                Err(Error::Cancelled(why)) => {
                    job.state = JobState::Cancelled;
                    tracing::info!(job = %job.id, "autotune cancelled");
                    if jobs.root.is_cancelled() {
                        // Shutdown, not the client's choice: UNAVAILABLE tells it to retry.
                        job.reason = "the server shut down while the job was running".into();
                        Event::Ended(Error::Unavailable(format!(
                            "job {} was cancelled: the server is shutting down",
                            job.id
                        )))
                    } else {
                        let why = stop_why.lock().clone().unwrap_or(why);
                        job.reason = why.clone();
                        Event::Ended(Error::Cancelled(format!(
                            "job {} was cancelled: {why}",
                            job.id
                        )))
                    }
                }
                Err(e) => {
                    job.state = JobState::Failed;
                    job.reason = e.to_string();
                    tracing::error!(job = %job.id, error = %e, "autotune failed");
                    Event::Ended(Error::JobFailed {
                        job: job.id.clone(),
                        cause: Box::new(e),
                    })
                }
            };
            ending.cancel();
            if let Err(e) = jobs.save(&job).await {
                tracing::error!(job = %job.id, error = %e, "could not record the job's end");
            }
            if let Some(gate) = jobs.gate.as_ref().filter(|g| g.at_end) {
                gate.pass(&req.index).await;
            }
            // Flushed with the next write: a crash can only bring old records back.
            let store = jobs.lab.catalog().store();
            if let Err(e) = store.trim_jobs(jobs.kept, |j: &JobRecord| j.state == JobState::Running)
            {
                tracing::warn!(error = %e, "could not trim old job records");
            }
            jobs.trim_cluster().await;
            // The cluster's job lease goes before the place here: a job started right after
            // this one ended (on any node) finds the lease free.
            release_lease(lease).await;
            jobs.running.lock().remove(&req.index);
            done.cancel();
            let _ = tx.send(event);
        });
        Ok((rx, token))
    }

    #[allow(clippy::too_many_arguments)] // one private seam: the job, its request, and its outputs (events, progress)
    async fn run(
        &self,
        job: &mut JobRecord,
        req: &TuneRequest,
        owner: (u64, &CancellationToken),
        prepared: Arc<Prepared>,
        token: &CancellationToken,
        tx: &mpsc::UnboundedSender<Event>,
        acts: &Activities,
    ) -> Result<Outcome> {
        if let Some(gate) = self.gate.as_ref().filter(|g| !g.at_end) {
            tokio::select! {
                _ = gate.pass(&req.index) => {}
                _ = token.cancelled() => {}
            }
            cancelled(token)?;
        }
        // The graph an earlier job left for ActivateProfile is stale once this one runs (it
        // promotes its own winner), and holding both would double the memory.
        self.lab.catalog().drop_held(&req.index);
        let best = Best::new(req.objective);
        let version = prepared.harness.truth.data_version;
        let trials = match &req.adaptive {
            Some(plan) => {
                self.run_adaptive(job, plan, prepared, token, tx, (acts, &best))
                    .await?
            }
            None => {
                self.run_grid(job, req, prepared, token, tx, (acts, &best))
                    .await?
            }
        };
        cancelled(token)?;
        self.finish(job, req, owner, token, trials, (&best, version))
            .await
    }

    /// ADAPTIVE: successive halving over construction effort (see `adaptive.rs`); on a big
    /// index (or when asked), multi-fidelity: the search runs on a seeded sample of the points,
    /// then the best few graphs are built and measured on all of them.
    async fn run_adaptive(
        &self,
        job: &mut JobRecord,
        plan: &Plan,
        prepared: Arc<Prepared>,
        token: &CancellationToken,
        tx: &mpsc::UnboundedSender<Event>,
        // Where the job reports its work in flight, and where full trials offer their graph.
        (acts, best): (&Activities, &Best),
    ) -> Result<Vec<Trial>> {
        let cores = cores();
        let started = std::time::Instant::now();
        let mut plan = plan.clone();
        plan.width = cores;
        let permits = Arc::new(tokio::sync::Semaphore::new(cores));
        let built = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let source = format!("autotune:{}", job.id);
        let eval = |prepared: Arc<Prepared>, job: &JobRecord, fidelity, best| JobEval {
            jobs: self,
            prepared,
            token: token.clone(),
            permits: permits.clone(),
            built: built.clone(),
            job: tokio::sync::Mutex::new(job.clone()),
            trials: Mutex::new(Vec::new()),
            source: source.clone(),
            tx: tx.clone(),
            acts: acts.clone(),
            best,
            fidelity,
        };
        let full_points = prepared.points.len();
        let Some(n) = plan.sample_size(full_points) else {
            let e = eval(prepared, job, Fidelity::Full, Some(best));
            let result = adaptive::run_from(&plan, &e, started).await;
            return self.phase_end(job, e, result.map(drop), token).await;
        };
        // Phase 1: the search on a sample, with ground truth over the sample.
        let (p, seed) = (prepared.clone(), plan.seed);
        let sample =
            Arc::new(tokio::task::spawn_blocking(move || Lab::sample_of(&p, n, seed)).await?);
        cancelled(token)?;
        let reserve = (plan.confirm * adaptive::TRIALS_PER_CONFIRM).min(plan.max_trials / 2);
        let mut first = plan.clone();
        first.max_trials = plan.max_trials - reserve;
        // Sample builds are cheap: every m that keeps improving climbs, not only the best
        // `cores` (on the 30k words, m 8 is the worst at ef_construction 40 and the cheapest at
        // 100: halving to two m values missed it by 15%).
        first.width = plan.m.len().max(plan.width);
        // Half the time for the sample's search, the rest for the full builds.
        first.max_time = plan.max_time.map(|t| t / 2);
        tracing::info!(job = %job.id, sample = n, points = full_points, confirm = plan.confirm, "multi-fidelity ADAPTIVE: ranking on a sample");
        let e = eval(sample, job, Fidelity::Sample, None);
        let ranked = adaptive::run_from(&first, &e, started).await;
        let ranked = match ranked {
            Ok(r) => r,
            Err(e2) => return self.phase_end(job, e, Err(e2), token).await,
        };
        let mut trials = self.phase_end(job, e, Ok(()), token).await?;
        // Phase 2: the best graphs of the sample, on all the points.
        let mut second = plan.clone();
        second.max_trials = plan.max_trials.saturating_sub(trials.len() as u32);
        let scale = full_points as f64 / n as f64;
        let e = eval(prepared, job, Fidelity::Full, Some(best));
        let result =
            adaptive::confirm(&second, &e, &ranked, plan.confirm as usize, scale, started).await;
        trials.extend(self.phase_end(job, e, result, token).await?);
        Ok(trials)
    }

    /// The end of an ADAPTIVE phase: the job record and trials back from its evaluator.
    async fn phase_end(
        &self,
        job: &mut JobRecord,
        eval: JobEval<'_>,
        result: Result<()>,
        token: &CancellationToken,
    ) -> Result<Vec<Trial>> {
        *job = eval.job.lock().await.clone();
        job.graphs_built = eval.built.load(std::sync::atomic::Ordering::Relaxed);
        if result.is_err() {
            token.cancel();
        }
        result?;
        let trials = std::mem::take(&mut *eval.trials.lock());
        Ok(trials)
    }

    /// GRID: every config of the grid, in order; configs sharing a build share one graph.
    async fn run_grid(
        &self,
        job: &mut JobRecord,
        req: &TuneRequest,
        prepared: Arc<Prepared>,
        token: &CancellationToken,
        tx: &mpsc::UnboundedSender<Event>,
        // Where the job reports its work in flight, and where full trials offer their graph.
        (acts, best): (&Activities, &Best),
    ) -> Result<Vec<Trial>> {
        let cancelled = || cancelled(token);
        // Group grid entries that can share one build, in order of first appearance.
        type BuildKey = (u32, u32, Option<u64>);
        let mut groups: Vec<(BuildKey, Vec<(usize, HnswConfig)>)> = Vec::new();
        for (i, c) in req.grid.iter().enumerate() {
            let key = (c.m, c.ef_construction, c.seed);
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, v)) => v.push((i, *c)),
                None => groups.push((key, vec![(i, *c)])),
            }
        }
        // Groups build concurrently, at most one CPU-bound activity per core: a seeded build is
        // single-threaded (deterministic) and takes one permit, an unseeded one inserts on every
        // core and takes them all; measuring a group takes one. Results are journaled and
        // streamed in grid order, so trial ids follow the grid.
        let cores = cores() as u32;
        let permits = Arc::new(tokio::sync::Semaphore::new(cores as usize));
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Result<Measured>>();
        let mut tasks = tokio::task::JoinSet::new();
        let built = Arc::new(std::sync::atomic::AtomicU32::new(0));
        for (_, configs) in groups {
            let (built, acts) = (built.clone(), acts.clone());
            let (lab, prep, tok, permits, done) = (
                self.lab.clone(),
                prepared.clone(),
                token.clone(),
                permits.clone(),
                done_tx.clone(),
            );
            tasks.spawn(async move {
                let result = async {
                    let build_config = configs[0].1;
                    let need = if build_config.seed.is_some() {
                        1
                    } else {
                        cores
                    };
                    let graph = {
                        let _p = permits
                            .acquire_many(need)
                            .await
                            .map_err(|_| Error::Internal("permits closed".into()))?;
                        let (lab, prep, tok) = (lab.clone(), prep.clone(), tok.clone());
                        let acts = acts.clone();
                        Arc::new(
                            tokio::task::spawn_blocking(move || {
                                let p = acts.begin(Phase::Build, Some(build_config), 0);
                                lab.build_tracked(
                                    &prep,
                                    build_config,
                                    &|| tok.is_cancelled(),
                                    Some(&*p),
                                )
                            })
                            .await??,
                        )
                    };
                    built.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let _p = permits
                        .acquire()
                        .await
                        .map_err(|_| Error::Internal("permits closed".into()))?;
                    for (at, config) in configs {
                        let (g, p, t) = (graph.clone(), prep.clone(), tok.clone());
                        let acts = acts.clone();
                        let m = tokio::task::spawn_blocking(move || {
                            let progress = acts.begin(Phase::Measure, Some(config), 0);
                            Lab::measure_tracked(
                                &g,
                                &p.harness,
                                config.ef_search,
                                &|| t.is_cancelled(),
                                Some(&*progress),
                            )
                        })
                        .await??;
                        let _ = done.send(Ok(Measured {
                            at,
                            config,
                            measures: m,
                            build_millis: graph.meta.build_millis,
                            memory_bytes: graph.memory_bytes(),
                            graph: graph.clone(),
                            fidelity: Fidelity::Full,
                        }));
                    }
                    Ok::<_, Error>(())
                }
                .await;
                if let Err(e) = result {
                    let _ = done.send(Err(e));
                }
            });
        }
        drop(done_tx);
        let source = format!("autotune:{}", job.id);
        let mut pending: std::collections::BTreeMap<usize, Measured> = Default::default();
        let mut trials: Vec<Trial> = Vec::with_capacity(req.grid.len());
        let outcome: Result<()> = async {
            while let Some(msg) = done_rx.recv().await {
                let measured = msg?;
                pending.insert(measured.at, measured);
                while let Some(m) = pending.remove(&trials.len()) {
                    let graphs_built = built.load(std::sync::atomic::Ordering::Relaxed);
                    let graph = m.graph.clone();
                    let trial = self
                        .record_trial(job, graphs_built, &prepared, m, &source, tx)
                        .await?;
                    best.offer(&trial, &graph);
                    trials.push(trial);
                }
            }
            cancelled()
        }
        .await;
        if outcome.is_err() {
            // Stop the other groups (an error in one, or a cancel) before answering.
            token.cancel();
        }
        while tasks.join_next().await.is_some() {}
        job.graphs_built = built.load(std::sync::atomic::Ordering::Relaxed);
        outcome?;
        cancelled()?;
        Ok(trials)
    }

    /// Journals one measured config as a trial of `job`, saves the job's progress and streams
    /// the trial (nobody listening is fine: it is journaled).
    async fn record_trial(
        &self,
        job: &mut JobRecord,
        graphs_built: u32,
        prepared: &Prepared,
        m: Measured,
        source: &str,
        tx: &mpsc::UnboundedSender<Event>,
    ) -> Result<Trial> {
        let trial = self
            .lab
            .journal(
                prepared,
                m.config,
                m.measures,
                m.build_millis,
                m.memory_bytes,
                source.to_string(),
                m.fidelity,
            )
            .await?;
        job.trials_done += 1;
        job.graphs_built = graphs_built;
        self.save_progress(job).await?;
        let _ = tx.send(Event::Trial(Box::new(trial.clone())));
        Ok(trial)
    }

    /// Picks the winner of a job's trials, promotes it when it clears the gate, activates.
    async fn finish(
        &self,
        job: &mut JobRecord,
        req: &TuneRequest,
        (uid, abandon): (u64, &CancellationToken),
        token: &CancellationToken,
        trials: Vec<Trial>,
        (best, version): (&Best, u64),
    ) -> Result<Outcome> {
        // Only trials on all the points are candidates (multi-fidelity's sample trials ranked
        // configs; they are never the answer).
        let trials: Vec<Trial> = trials.into_iter().filter(Trial::is_full).collect();
        let front = pareto_front(&trials);
        let outcome = |winner: Option<Trial>, promotion, generation, reason: String| Outcome {
            job_id: job.id.clone(),
            winner,
            promotion,
            generation,
            reason,
            pareto_front: front.clone(),
        };
        let Some((w, met)) = pick(&trials, req.objective) else {
            return Ok(outcome(
                None,
                None,
                None,
                "no trial finished; nothing was promoted".into(),
            ));
        };
        let w = w.clone();
        let refusal = if !met {
            let target = match req.objective {
                Objective::TargetRecall(t) => t,
                Objective::MaxRecall => 0.0,
            };
            Some(format!(
                "no trial reached target_recall {target}; the best, trial {}, has recall {:.4} (p50 {:.1}us); nothing was promoted",
                w.id, w.recall, w.p50_micros
            ))
        } else if w.recall < req.min_recall {
            Some(format!(
                "the winner, trial {}, has recall {:.4} (p50 {:.1}us), below min_recall {}; nothing was promoted",
                w.id, w.recall, w.p50_micros, req.min_recall
            ))
        } else {
            None
        };
        if let Some(reason) = refusal {
            tracing::info!(job = %job.id, %reason, "autotune finished");
            return Ok(outcome(Some(w), None, None, reason));
        }
        let note = format!(
            "autotune winner: recall={:.2} p50={:.1}us",
            w.recall, w.p50_micros
        );
        // The last point a cancel (DeleteIndex, CancelJob) stops the job at; past it, the
        // promotion and the activation are refused (NOT_FOUND) unless the index is still the
        // one with `uid`.
        cancelled(token)?;
        let lease = self
            .running
            .lock()
            .get(&req.index)
            .filter(|r| r.uid == uid)
            .and_then(|r| r.lease.clone());
        let fence = lease.as_ref().map(|l| l.fence());
        let (promotion, _) = self
            .lab
            .catalog()
            .registry()
            .promote_for(
                &req.index,
                Some(uid),
                w.id,
                &req.requested_by,
                &note,
                fence.as_ref(),
            )
            .await?;
        tracing::info!(job = %job.id, trial = w.id, config = %w.config, recall = w.recall, p50_us = w.p50_micros, "autotune promoted its winner");
        // The winner's graph: the generation to swap in (activate) or to hold for a later
        // ActivateProfile. Missing only if something still used it; then activation builds.
        let graph = best.take(w.id).map(|gen| TrialGraph {
            uid,
            trial_id: w.id,
            version,
            gen,
        });
        let catalog = self.lab.catalog();
        if let Some(lease) = &lease {
            // A cluster node: the activation is the index's next desired generation (fenced
            // by the lease), which every node rolls out; this node adopts the held graph.
            if let Some(t) = graph {
                catalog.hold(&req.index, t);
            }
            let generation = if req.activate {
                lease.activate(w.config, w.id, abandon).await?;
                Some(catalog.get_index(&req.index)?.generation)
            } else {
                None
            };
            return Ok(outcome(Some(w), Some(promotion), generation, String::new()));
        }
        let generation = match (req.activate, graph) {
            (true, Some(t)) => Some(
                catalog
                    .adopt_for(
                        &req.index,
                        uid,
                        abandon,
                        w.config,
                        t,
                        ConfigSource::Promoted,
                    )
                    .await?,
            ),
            (true, None) => {
                tracing::warn!(job = %job.id, trial = w.id, "the winner's graph is not held: activation builds it");
                Some(
                    catalog
                        .rebuild_for(
                            &req.index,
                            uid,
                            abandon,
                            w.config,
                            ConfigSource::Promoted,
                            "",
                        )
                        .await?,
                )
            }
            (false, Some(t)) => {
                catalog.hold(&req.index, t);
                None
            }
            (false, None) => None,
        };
        Ok(outcome(Some(w), Some(promotion), generation, String::new()))
    }
}

/// Sends the job's work in flight every [`PROGRESS_EVERY`] while there is some, until `stop`
/// (or until nobody listens). Owned by the job's task, which stops and awaits it before its
/// last event.
async fn report_progress(
    job_id: String,
    acts: Activities,
    tx: mpsc::UnboundedSender<Event>,
    stop: CancellationToken,
) {
    let mut every = tokio::time::interval(PROGRESS_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate: wait one period before the first report.
    every.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let activities = acts.views();
        if activities.is_empty() {
            continue;
        }
        let event = Event::Progress {
            job_id: job_id.clone(),
            activities,
        };
        if tx.send(event).is_err() {
            return;
        }
    }
}

/// CPU-bound activities a job runs at once: one per core.
fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn cancelled(token: &CancellationToken) -> Result<()> {
    if token.is_cancelled() {
        Err(Error::Cancelled(
            "cancelled before it finished; nothing was promoted".into(),
        ))
    } else {
        Ok(())
    }
}

/// A job as ADAPTIVE's evaluator: builds take one permit each (seeded builds are
/// single-threaded), measuring takes one; each trial is journaled, recorded and streamed.
struct JobEval<'a> {
    jobs: &'a Jobs,
    prepared: Arc<Prepared>,
    token: CancellationToken,
    permits: Arc<tokio::sync::Semaphore>,
    built: Arc<std::sync::atomic::AtomicU32>,
    /// Held across the journal write and the record's save, so trials are counted in order.
    job: tokio::sync::Mutex<JobRecord>,
    trials: Mutex<Vec<Trial>>,
    source: String,
    tx: mpsc::UnboundedSender<Event>,
    /// The job's builds and measurements in flight (for its progress events).
    acts: Activities,
    /// Where full trials offer their graph (None for sample trials: never activated).
    best: Option<&'a Best>,
    fidelity: Fidelity,
}

impl Evaluator for JobEval<'_> {
    type Graph = crate::index::Generation;

    fn spawn_build(
        &self,
        config: HnswConfig,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<Result<(Arc<Self::Graph>, std::time::Duration)>> {
        let (lab, prep, tok, permits, built, acts) = (
            self.jobs.lab.clone(),
            self.prepared.clone(),
            self.token.clone(),
            self.permits.clone(),
            self.built.clone(),
            self.acts.clone(),
        );
        self.jobs.lab.catalog().tasks().spawn(async move {
            let _p = permits
                .acquire_owned()
                .await
                .map_err(|_| Error::Internal("permits closed".into()))?;
            cancelled(&tok)?;
            if stop.is_cancelled() {
                return Err(Error::Cancelled("not needed any more".into()));
            }
            let g = tokio::task::spawn_blocking(move || {
                let p = acts.begin(Phase::Build, Some(config), 0);
                lab.build_tracked(
                    &prep,
                    config,
                    &|| tok.is_cancelled() || stop.is_cancelled(),
                    Some(&*p),
                )
            })
            .await??;
            built.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let took = std::time::Duration::from_millis(g.meta.build_millis);
            Ok((Arc::new(g), took))
        })
    }

    async fn trial(&self, graph: &Arc<Self::Graph>, config: HnswConfig) -> Result<Trial> {
        cancelled(&self.token)?;
        let measures = {
            let _p = self
                .permits
                .acquire()
                .await
                .map_err(|_| Error::Internal("permits closed".into()))?;
            let (g, p, t) = (graph.clone(), self.prepared.clone(), self.token.clone());
            let acts = self.acts.clone();
            tokio::task::spawn_blocking(move || {
                let progress = acts.begin(Phase::Measure, Some(config), 0);
                Lab::measure_tracked(
                    &g,
                    &p.harness,
                    config.ef_search,
                    &|| t.is_cancelled(),
                    Some(&*progress),
                )
            })
            .await??
        };
        let measured = Measured {
            at: 0,
            config,
            measures,
            build_millis: graph.meta.build_millis,
            memory_bytes: graph.memory_bytes(),
            graph: graph.clone(),
            fidelity: self.fidelity,
        };
        let graphs_built = self.built.load(std::sync::atomic::Ordering::Relaxed);
        let trial = self
            .jobs
            .record_trial(
                &mut *self.job.lock().await,
                graphs_built,
                &self.prepared,
                measured,
                &self.source,
                &self.tx,
            )
            .await?;
        if let Some(best) = self.best {
            best.offer(&trial, graph);
        }
        self.trials.lock().push(trial.clone());
        Ok(trial)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_grid_is_the_contract_one() {
        let g: Vec<_> = default_grid()
            .iter()
            .map(|c| (c.ef_construction, c.ef_search, c.m, c.seed))
            .collect();
        assert_eq!(
            g,
            [
                (20, 30, 16, Some(42)),
                (40, 30, 16, Some(42)),
                (80, 30, 16, Some(42)),
                (80, 60, 16, Some(42)),
                (160, 30, 16, Some(42))
            ]
        );
    }
}
