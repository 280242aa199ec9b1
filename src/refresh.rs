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

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

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
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Record {
    policy: Option<Policy>,
    /// `points_changed` of the index when its last tune started.
    tuned_at_changes: u64,
    /// The data version a floor-triggered tune last ran for.
    floor_tuned_version: Option<u64>,
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
    record: Record,
    status: Status,
    /// A job start is in flight.
    pending: bool,
}

pub struct Refresher {
    lab: Arc<Lab>,
    jobs: Arc<Jobs>,
    /// By index name; an entry exists for every index that had a record or a tune.
    state: Mutex<HashMap<Name, State>>,
}

impl Refresher {
    /// Loads every index's record and hooks into writes and job starts.
    pub fn start(lab: Arc<Lab>, jobs: Arc<Jobs>) -> Result<Arc<Self>> {
        let catalog = lab.catalog().clone();
        let mut state = HashMap::new();
        for name in catalog.index_names() {
            let handle = catalog.handle(&name)?;
            if let Some(record) = catalog.store().get_refresh::<Record>(handle.meta.uid)? {
                state.insert(
                    name,
                    State {
                        record,
                        ..Default::default()
                    },
                );
            }
        }
        let r = Arc::new(Refresher {
            lab,
            jobs: jobs.clone(),
            state: Mutex::new(state),
        });
        let weak = Arc::downgrade(&r);
        catalog.set_after_write(Box::new(move |name| {
            if let Some(r) = weak.upgrade() {
                r.after_write(name);
            }
        }));
        let weak = Arc::downgrade(&r);
        jobs.set_on_start(Box::new(move |name| {
            if let Some(r) = weak.upgrade() {
                r.tuned(name);
            }
        }));
        Ok(r)
    }

    /// Sets or clears an index's policy, durably. NOT_FOUND for an unknown index or harness.
    pub async fn set_policy(
        self: &Arc<Self>,
        index: &Name,
        policy: Option<Policy>,
    ) -> Result<Option<Policy>> {
        let handle = self.lab.catalog().handle(index)?;
        if let Some(p) = &policy {
            self.lab.get_harness(index, &p.harness)?;
        }
        let record = {
            let mut st = self.state.lock();
            let s = st.entry(index.clone()).or_default();
            s.record.policy = policy.clone();
            s.record.clone()
        };
        let store = self.lab.catalog().store();
        store.put_refresh(handle.meta.uid, &record)?;
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
        let s = st.get(index)?;
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

    fn after_write(self: &Arc<Self>, index: &Name) {
        self.evaluate(index);
    }

    /// A job started on the index: it is the last tune now.
    fn tuned(&self, index: &Name) {
        let Ok(handle) = self.lab.catalog().handle(index) else {
            return;
        };
        let record = {
            let mut st = self.state.lock();
            let s = st.entry(index.clone()).or_default();
            s.record.tuned_at_changes = handle.points_changed();
            s.record.clone()
        };
        // Bookkeeping, flushed with the next flush: losing it in a crash costs at most one
        // extra tune.
        if let Err(e) = self
            .lab
            .catalog()
            .store()
            .put_refresh(handle.meta.uid, &record)
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
            let Some(s) = st.get_mut(index) else { return };
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
            self.decide(s, index, policy, why)
        };
        if let Some((policy, why)) = decision {
            self.trigger(index.clone(), policy, why);
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
        if s.pending {
            return None;
        }
        if let Some(job) = self.jobs.running_job(index) {
            s.status.last_trigger = format!("skipped ({why}): job {job} is running");
            return None;
        }
        if self.jobs.is_shut_down() {
            return None;
        }
        s.pending = true;
        s.status.last_trigger = format!("started: {why}");
        Some((policy, why))
    }

    fn trigger(self: &Arc<Self>, index: Name, policy: Policy, why: String) {
        tracing::info!(index = %index, reason = %why, "refresh policy starts a tune");
        let req = tune_request(&index, &policy);
        let me = self.clone();
        tokio::spawn(async move {
            let started = me.jobs.start(req).await;
            let mut rx = {
                let mut st = me.state.lock();
                let s = st.entry(index.clone()).or_default();
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
                        if let Some(s) = me.state.lock().get_mut(&index) {
                            s.status.last_job_id = job_id;
                        }
                    }
                    Event::Finished(o) => {
                        tracing::info!(index = %index, job = %o.job_id, promoted = o.promotion.is_some(), reason = %o.reason, "refresh tune finished");
                        break;
                    }
                    Event::Ended(why, _) => {
                        tracing::warn!(index = %index, reason = %why, "refresh tune ended");
                        break;
                    }
                    Event::Trial(_) => {}
                }
            }
        });
    }

    /// One probe of every index whose policy has a recall floor.
    pub async fn probe_all(self: &Arc<Self>) {
        let targets: Vec<(Name, Policy)> = self
            .state
            .lock()
            .iter()
            .filter_map(|(n, s)| {
                let p = s.record.policy.clone()?;
                (p.recall_floor.is_some() && !s.pending).then(|| (n.clone(), p))
            })
            .collect();
        for (index, policy) in targets {
            if self.jobs.running_job(&index).is_some() {
                continue;
            }
            if let Err(e) = self.probe(&index, &policy).await {
                tracing::warn!(index = %index, error = %e, "refresh probe failed");
                if let Some(s) = self.state.lock().get_mut(&index) {
                    s.status.last_trigger = format!("probe failed: {e}");
                }
            }
        }
    }

    async fn probe(self: &Arc<Self>, index: &Name, policy: &Policy) -> Result<()> {
        let Some(floor) = policy.recall_floor else {
            return Ok(());
        };
        // Ground truth for the probe's queries only, from points read without the writer lock.
        let (handle, h) = self
            .lab
            .probe_harness(index, &policy.harness, PROBE_QUERIES)
            .await?;
        let version = h.truth.data_version;
        let generation = handle.active();
        let ef = generation.meta.config.ef_search;
        let m = tokio::task::spawn_blocking(move || Lab::measure(&generation, &h, ef, &|| false))
            .await??;
        tracing::debug!(index = %index, recall = m.recall, floor, "refresh probe");
        let decision = {
            let mut st = self.state.lock();
            let Some(s) = st.get_mut(index) else {
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
                let d = self.decide(s, index, policy.clone(), why);
                if d.is_some() {
                    s.record.floor_tuned_version = Some(version);
                }
                d
            }
        };
        if let Some((policy, why)) = decision {
            self.trigger(index.clone(), policy, why);
        }
        Ok(())
    }

    /// Probes every `interval` until `stop`.
    pub fn spawn_prober(self: &Arc<Self>, interval: Duration, stop: CancellationToken) {
        if interval.is_zero() {
            return;
        }
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
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
fn tune_request(index: &Name, p: &Policy) -> TuneRequest {
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
