//! Rollout: every node follows each index's desired active generation in etcd
//! (`/vectord/v1/active/<index>`, set by ActivateProfile and by autotune's activation).
//!
//! Invariants:
//! - A node builds (or, holding the promoted trial's graph, adopts) the desired generation off
//!   the serving path with the catalog's activation machinery (`Catalog::activate_for`):
//!   searches keep being served by the generation it has. A newer desired generation cancels
//!   the build of an older one, and a cancelled build swaps nothing in (the catalog checks the
//!   stop token under the index's writer lock, right before the swap), so a node never swaps
//!   in a generation the cluster no longer wants.
//! - What a node serves is in memory (`Control`'s rollouts) and reported in its membership
//!   record (`NodeRecord::generations`, written at once after each swap). After a restart a
//!   node serves the desired generation when its recovered generation has the desired config
//!   and source (the swap was recorded); otherwise it builds it again.
//! - While a node does not serve an index's desired generation, that index's health name
//!   (`vectord.v1.IndexService/<index>`) is NOT_SERVING (`server.rs` follows the rollouts).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::etcd::{self, Desired};
use super::Cluster;
use crate::error::{Error, Result};
use crate::model::{GenerationMeta, Name};

/// Longest ActivateProfile waits for every live node to serve the new generations (and never
/// past the caller's deadline, of which a tenth is kept to answer in).
pub const MAX_ROLLOUT_WAIT: Duration = Duration::from_secs(240);
/// After a failed rollout attempt, the node tries again after this.
const RETRY_AFTER: Duration = Duration::from_secs(5);
/// How often ActivateProfile reads the nodes' reports while it waits.
const ROLLOUT_POLL: Duration = Duration::from_millis(200);
/// GetIndex's read of the nodes' reports is bounded by this (the field is empty past it).
const NODES_READ_TIMEOUT: Duration = Duration::from_secs(1);

/// One node's rollout of one index, as the node reported it.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeStatus {
    pub node_id: String,
    pub index: String,
    /// The node's own active generation number.
    pub generation: u64,
    /// The desired generation number the node serves.
    pub served: u64,
    /// The cluster's desired generation number of the index.
    pub desired: u64,
    /// The last write-log sequence the node applied.
    pub applied: u64,
    /// Why its last attempt failed; empty otherwise.
    pub error: String,
}

impl NodeStatus {
    pub fn current(&self) -> bool {
        self.served >= self.desired
    }
}

/// What a cluster node's ActivateProfile did.
#[derive(Clone, Debug)]
pub struct Activation {
    /// This node's active generation of each index of the profile, in the profile's order.
    pub generations: Vec<(Name, GenerationMeta)>,
    /// Every live node's rollout of each index of the profile.
    pub nodes: Vec<NodeStatus>,
    /// Whether every live node serves the new generations.
    pub rolled_out: bool,
}

impl Cluster {
    /// Reads every desired generation and starts what this node must build; the revision read.
    pub(super) async fn load_desired(self: &Arc<Self>) -> Result<i64> {
        let (kvs, rev) = etcd::list(
            &mut self.etcd(),
            &self.cfg.etcd,
            "reading the desired generations",
            etcd::active_prefix(),
        )
        .await?;
        let mut all = std::collections::HashMap::new();
        for (key, r) in kvs {
            let Some(name) = key.strip_prefix(&etcd::active_prefix()) else {
                continue;
            };
            match r.decode::<Desired>(&key) {
                Ok(d) => {
                    all.insert(name.to_string(), d);
                }
                Err(e) => {
                    tracing::error!(%key, error = %e, "unreadable desired generation in etcd: ignored")
                }
            }
        }
        *self.desired.lock() = all;
        for name in self.catalog.index_names() {
            self.check_rollout(name.as_str(), true);
        }
        Ok(rev)
    }

    /// Follows the desired generations from revision `rev`; after any break, reads them again.
    pub(super) async fn watch_desired(self: Arc<Self>, mut rev: i64) {
        loop {
            if let Err(e) = self.watch_desired_from(&mut rev).await {
                tracing::warn!(error = %e, "watching the desired generations in etcd stopped; resyncing");
            }
            loop {
                tokio::select! {
                    _ = self.stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                match self.load_desired().await {
                    Ok(r) => {
                        rev = r;
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "resync of the desired generations failed")
                    }
                }
            }
        }
    }

    async fn watch_desired_from(self: &Arc<Self>, rev: &mut i64) -> Result<()> {
        let what = "watching the desired generations";
        let prefix = etcd::active_prefix();
        let mut watch = etcd::Watch::open(
            &mut self.etcd(),
            &self.cfg.etcd,
            what,
            prefix.clone(),
            true,
            *rev + 1,
        )
        .await?;
        loop {
            let (changes, revision) = tokio::select! {
                _ = self.stop.cancelled() => return Ok(()),
                r = watch.changes(&prefix) => r?,
            };
            for c in changes {
                match c.decode::<Desired>() {
                    Some(Ok(d)) => self.on_desired(&c.name, Some(d)),
                    Some(Err(e)) => {
                        tracing::error!(key = c.key, error = %e, "unreadable desired generation in etcd: ignored")
                    }
                    None => self.on_desired(&c.name, None),
                }
            }
            *rev = (*rev).max(revision);
        }
    }

    /// A desired generation as read (None: its key is gone, with its index).
    fn on_desired(self: &Arc<Self>, name: &str, d: Option<Desired>) {
        {
            let mut desired = self.desired.lock();
            match d {
                Some(d) => {
                    // A watch event older than what this node set itself is not a change.
                    let newer = desired
                        .get(name)
                        .is_none_or(|old| old.uid != d.uid || old.number < d.number);
                    if !newer {
                        return;
                    }
                    desired.insert(name.to_string(), d);
                }
                None => {
                    desired.remove(name);
                }
            }
        }
        self.check_rollout(name, false);
    }

    /// Starts what this node must do for the index's desired generation. `initial`: the
    /// node's generation was recovered or just created, so it may already be the desired one.
    pub(super) fn check_rollout(self: &Arc<Self>, name: &str, initial: bool) {
        let Ok(n) = Name::parse("name", name) else {
            return;
        };
        let Ok(handle) = self.catalog.handle(&n) else {
            return;
        };
        let d = self.desired.lock().get(name).cloned();
        let Some(d) = d.filter(|d| handle.cluster_uid == Some(d.uid)) else {
            // Nothing activated yet in the cluster: the generation made at creation is it.
            self.control.set_rollout(name, |r| {
                let changed = r.desired != 0;
                r.desired = 0;
                changed
            });
            return;
        };
        self.control.set_rollout(name, |r| {
            let changed = r.desired != d.number;
            r.desired = d.number;
            changed
        });
        if self.control.rollout(name).served >= d.number {
            return;
        }
        let active = handle.active().meta.clone();
        if initial && active.config == d.config && active.source == d.source {
            tracing::info!(
                index = name,
                desired = d.number,
                generation = active.number,
                "serving the index's desired generation (recovered)"
            );
            self.control.set_rollout(name, |r| {
                r.served = r.served.max(d.number);
                true
            });
            return;
        }
        let uid = handle.meta.uid;
        drop(handle);
        let cancel = self.stop.child_token();
        {
            let mut rolling = self.rolling.lock();
            if rolling.get(name).is_some_and(|(num, _)| *num == d.number) {
                return;
            }
            if let Some((_, old)) = rolling.insert(name.to_string(), (d.number, cancel.clone())) {
                old.cancel();
            }
        }
        self.tasks.spawn(self.clone().roll(n, uid, d, cancel));
    }

    /// Builds (or adopts) desired generation `d` of the index and swaps it in, retrying after a
    /// failure until it is done, superseded (`cancel`) or the index is gone.
    async fn roll(self: Arc<Self>, name: Name, uid: u64, d: Desired, cancel: CancellationToken) {
        tracing::info!(index = %name, desired = d.number, config = %d.config, "rolling out the index's desired generation");
        let trial = d
            .trial
            .as_ref()
            .filter(|t| t.node == self.cfg.node_id)
            .map(|t| t.id);
        if let Some(gate) = &self.cfg.rollout_gate {
            tokio::select! {
                _ = gate.pass(&name) => {}
                _ = cancel.cancelled() => return,
            }
        }
        loop {
            let res = self
                .catalog
                .activate_for(&name, uid, &cancel, d.config, d.source, &d.profile, trial)
                .await;
            match res {
                Ok(meta) => {
                    tracing::info!(index = %name, desired = d.number, generation = meta.number, "serving the index's desired generation");
                    self.rollout_errors.lock().remove(name.as_str());
                    self.control.set_rollout(name.as_str(), |r| {
                        r.served = r.served.max(d.number);
                        r.failed = 0;
                        true
                    });
                    break;
                }
                Err(_) if cancel.is_cancelled() => return,
                Err(Error::NotFound { .. }) => break,
                Err(e) => {
                    tracing::warn!(index = %name, desired = d.number, error = %e, "rolling out the desired generation failed; retrying in 5 s");
                    self.rollout_errors
                        .lock()
                        .insert(name.to_string(), e.to_string());
                    self.control.set_rollout(name.as_str(), |r| {
                        let changed = r.failed != d.number;
                        r.failed = d.number;
                        changed
                    });
                    self.report_now().await;
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(RETRY_AFTER) => {}
                    }
                }
            }
        }
        {
            let mut rolling = self.rolling.lock();
            if rolling
                .get(name.as_str())
                .is_some_and(|(num, _)| *num == d.number)
            {
                rolling.remove(name.as_str());
            }
        }
        self.report_now().await;
    }

    /// The index is gone on this node: its rollout stops and is forgotten.
    pub(super) fn forget_rollout(&self, name: &str) {
        if let Some((_, c)) = self.rolling.lock().remove(name) {
            c.cancel();
        }
        self.rollout_errors.lock().remove(name);
        self.control.forget_rollout(name);
    }

    /// Writes the node's record now (after a swap), not at the next heartbeat.
    pub(super) async fn report_now(&self) {
        let lease = self.lease.load(std::sync::atomic::Ordering::Acquire);
        if lease == 0 {
            return;
        }
        let rec = self.node_record();
        if let Err(e) = etcd::put_node(&mut self.etcd(), &self.cfg.etcd, &rec, lease).await {
            tracing::debug!(error = %e, "reporting the node's generations failed; the heartbeat retries");
        }
    }

    /// Every live node's rollout of `indexes`, with the desired number of each.
    async fn statuses(&self, indexes: &[(String, u64)]) -> Result<Vec<NodeStatus>> {
        let nodes = etcd::list_nodes(&mut self.etcd(), &self.cfg.etcd).await?;
        let mut out = Vec::new();
        for n in nodes {
            for (index, desired) in indexes {
                let g = n.generations.get(index).cloned().unwrap_or_default();
                out.push(NodeStatus {
                    node_id: n.node_id.clone(),
                    index: index.clone(),
                    generation: g.local,
                    served: g.served,
                    desired: *desired,
                    applied: n.applied.get(index).copied().unwrap_or(0),
                    error: g.error,
                });
            }
        }
        Ok(out)
    }

    /// ActivateProfile on a cluster node: sets every index's desired generation in one
    /// transaction, then waits until every live node serves them (or `deadline`, the caller's,
    /// and at most [`MAX_ROLLOUT_WAIT`]) and answers with each node's status.
    pub async fn activate_profile(
        self: &Arc<Self>,
        name: &Name,
        deadline: Option<Duration>,
    ) -> Result<Activation> {
        let set = self.control.activate_profile(name).await?;
        tracing::info!(profile = %name, indexes = set.len(), "set the profile's desired generations");
        for (index, d) in &set {
            self.on_desired(index.as_str(), Some(d.clone()));
        }
        let wanted: Vec<(String, u64)> =
            set.iter().map(|(i, d)| (i.to_string(), d.number)).collect();
        let budget = deadline.map(|d| d.saturating_sub(d / 10));
        let wait = budget.map_or(MAX_ROLLOUT_WAIT, |d| d.min(MAX_ROLLOUT_WAIT));
        let until = tokio::time::Instant::now() + wait;
        let (nodes, rolled_out) = loop {
            let nodes = match self.statuses(&wanted).await {
                Ok(n) => n,
                Err(e) if tokio::time::Instant::now() >= until => return Err(e),
                Err(_) => Vec::new(),
            };
            let done = !nodes.is_empty() && nodes.iter().all(NodeStatus::current);
            if done || tokio::time::Instant::now() >= until {
                break (nodes, done);
            }
            tokio::select! {
                _ = self.stop.cancelled() => return Err(Error::Unavailable("the server is shutting down; the activation goes on on the other nodes".into())),
                _ = tokio::time::sleep(ROLLOUT_POLL) => {}
            }
        };
        let mut generations = Vec::with_capacity(set.len());
        for (index, _) in &set {
            generations.push((index.clone(), self.catalog.get_index(index)?.generation));
        }
        if !rolled_out {
            tracing::warn!(profile = %name, "not every live node serves the profile's new generations by the deadline: answering with each node's status");
        }
        Ok(Activation {
            generations,
            nodes,
            rolled_out,
        })
    }

    /// GetIndex on a cluster node: the index's desired generation number and every live
    /// node's rollout of it (empty when etcd does not answer within a second).
    pub async fn index_nodes(&self, index: &Name) -> (u64, Vec<NodeStatus>) {
        let desired = self.control.rollout(index.as_str()).desired;
        let wanted = [(index.to_string(), desired)];
        match tokio::time::timeout(NODES_READ_TIMEOUT, self.statuses(&wanted)).await {
            Ok(Ok(n)) => (desired, n),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "GetIndex without the nodes' generations");
                (desired, Vec::new())
            }
            Err(_) => (desired, Vec::new()),
        }
    }
}
