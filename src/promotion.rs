//! The promotion registry: per index, the current promoted config and its history.
//!
//! Invariants: history is newest first and never longer than [`HISTORY_CAP`]; every change is
//! one atomic store transaction, flushed before it is acknowledged, so concurrent promotes and
//! rollbacks never lose or duplicate an entry.
//!
//! On a cluster node the registry lives in etcd instead ([`Shared`], implemented by
//! `cluster::control`, given at construction): every change is one compare-and-swap
//! transaction there, and every read answers from etcd. The record's rules ([`Record::promote`],
//! [`Record::rollback`]) are the same for both.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::autotune::shared::{LabRecord, SharedLab};
use crate::autotune::trial::Trial;
use crate::error::{Error, Result};
use crate::model::{now_millis, ConfigSource, HnswConfig, Name};
use crate::store::Store;

pub const HISTORY_CAP: usize = 50;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Promotion {
    pub index: Name,
    pub trial_id: u64,
    pub config: HnswConfig,
    pub promoted_by: String,
    pub note: String,
    pub promote_time_ms: u64,
    pub recall: f64,
    pub p50_micros: f64,
    /// Cluster only: the node that ran trial `trial_id` (trial ids are the cluster's: every
    /// node's journal has the trial under that id).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub trial_node: String,
}

/// An index's registry: the current promotion and the history.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub current: Option<Promotion>,
    /// Newest first, at most HISTORY_CAP.
    pub history: Vec<Promotion>,
}

impl Record {
    /// Makes `p` current; the previous current goes on top of the history (kept to
    /// [`HISTORY_CAP`]). The new history depth.
    pub fn promote(&mut self, p: Promotion) -> u32 {
        if let Some(prev) = self.current.take() {
            self.history.insert(0, prev);
            self.history.truncate(HISTORY_CAP);
        }
        self.current = Some(p);
        self.history.len() as u32
    }

    /// Puts the newest history entry back as current, or clears current when the history is
    /// empty; FAILED_PRECONDITION when there is neither. The new current and history depth.
    pub fn rollback(&mut self, index: &Name) -> Result<(Option<Promotion>, u32)> {
        if self.current.is_none() && self.history.is_empty() {
            return Err(Error::Precondition(format!(
                "index {:?} has nothing promoted and no history to roll back to",
                index.as_str()
            )));
        }
        self.current = if self.history.is_empty() {
            None
        } else {
            Some(self.history.remove(0))
        };
        Ok((self.current.clone(), self.history.len() as u32))
    }
}

/// The proof that an autotune job still holds its index's job lease (cluster nodes): the
/// promotion it guards is made only if the lease key still has this create revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    pub index: Name,
    pub token: i64,
}

/// A registry kept outside this node (a cluster node's, in etcd): each change one
/// compare-and-swap of the index's record, conditioned on the index's incarnation and, when
/// given, on the job lease's fencing token.
#[async_trait::async_trait]
pub trait Shared: Send + Sync {
    async fn promote(&self, p: Promotion, fence: Option<&Fence>) -> Result<(Promotion, u32)>;
    async fn rollback(&self, index: &Name) -> Result<(Option<Promotion>, u32)>;
    async fn get(&self, index: &Name) -> Result<Record>;
    /// The index's current promotion as this node last saw it, without waiting (it follows
    /// the registry's changes; for reports such as the metrics, not for decisions).
    fn known_current(&self, index: &Name) -> Option<Promotion>;
}

pub struct Registry {
    store: Arc<Store>,
    /// A cluster node's registry (etcd), with the node's id: then the store is not used.
    shared: Option<(Arc<dyn Shared>, String)>,
    /// A cluster node's lab log: a promotion pins its trial there first.
    lab: Option<Arc<dyn SharedLab>>,
}

impl Registry {
    pub fn new(store: Arc<Store>) -> Self {
        Registry {
            store,
            shared: None,
            lab: None,
        }
    }

    /// A cluster node's registry: kept in `shared`; `node` names this node (the trial's node
    /// when the trial names none). A promotion pins its trial in `lab` before it is made.
    pub fn shared(
        store: Arc<Store>,
        shared: Arc<dyn Shared>,
        node: String,
        lab: Arc<dyn SharedLab>,
    ) -> Self {
        Registry {
            store,
            shared: Some((shared, node)),
            lab: Some(lab),
        }
    }

    /// Whether the registry is a cluster's (etcd).
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// Makes the trial's config the index's current promotion; the previous current goes on
    /// top of the history. Returns the new current and the history depth.
    pub async fn promote(
        &self,
        index: &Name,
        trial_id: u64,
        promoted_by: &str,
        note: &str,
    ) -> Result<(Promotion, u32)> {
        self.promote_for(index, None, trial_id, promoted_by, note, None)
            .await
    }

    /// [`promote`](Self::promote), refused with NOT_FOUND unless the index is still the one
    /// with `uid` (when given): work that outlived its index never promotes onto a new index
    /// created under the same name. On a cluster node, with `fence`, refused (ABORTED) unless
    /// the job lease it names is still held.
    pub async fn promote_for(
        &self,
        index: &Name,
        uid: Option<u64>,
        trial_id: u64,
        promoted_by: &str,
        note: &str,
        fence: Option<&Fence>,
    ) -> Result<(Promotion, u32)> {
        let mut trial: Option<Trial> = self.store.get_trial(trial_id)?;
        if let (None, Some(lab)) = (&trial, &self.lab) {
            // Journaled through another node a moment ago: mirrored here once synced.
            lab.sync().await?;
            trial = self.store.get_trial(trial_id)?;
        }
        let trial = trial.ok_or_else(|| Error::not_found("trial", trial_id.to_string()))?;
        if &trial.index != index {
            return Err(Error::invalid(format!(
                "trial {trial_id} belongs to index {:?}, not {:?}; promote it on its own index",
                trial.index.as_str(),
                index.as_str()
            )));
        }
        if !trial.is_full() {
            return Err(Error::Precondition(format!(
                "trial {trial_id} was measured on a sample of {} points (multi-fidelity autotune's \
                 first phase), not on the index's points: promote a FIDELITY_FULL trial",
                trial.point_count
            )));
        }
        let promotion = Promotion {
            index: index.clone(),
            trial_id,
            config: trial.config,
            promoted_by: promoted_by.to_string(),
            note: note.to_string(),
            promote_time_ms: now_millis(),
            recall: trial.recall,
            p50_micros: trial.p50_micros,
            trial_node: String::new(),
        };
        if let Some((shared, node)) = &self.shared {
            // Pinned first, in the lab log: retention, whichever node decides it, then never
            // removes the trial; a trial removed before its pin was logged is gone on every
            // node, and not promoted.
            if let Some(lab) = &self.lab {
                let uid = self.store.cluster_uid_of(index.as_str())?.ok_or_else(|| {
                    Error::Unavailable(format!(
                        "index {index} is not linked to the cluster on this node yet; retry"
                    ))
                })?;
                if !self.store.is_pinned(trial_id)? {
                    lab.log(&LabRecord::TrialPinned {
                        index_uid: uid,
                        index: index.clone(),
                        trial_id,
                    })
                    .await?;
                    if !self.store.is_pinned(trial_id)? {
                        return Err(Error::not_found(
                            "trial",
                            format!("{trial_id} (removed by the journal's retention)"),
                        ));
                    }
                }
            }
            let promotion = Promotion {
                trial_node: if trial.node_id.is_empty() {
                    node.clone()
                } else {
                    trial.node_id.clone()
                },
                ..promotion
            };
            let out = shared.promote(promotion, fence).await?;
            tracing::info!(index = %index, trial_id, config = %out.0.config, by = promoted_by, "promoted (cluster)");
            return Ok(out);
        }
        let out = self.store.update_promotion(
            index.as_str(),
            uid,
            Some(trial_id),
            |rec: Option<Record>| {
                let mut rec = rec.unwrap_or_default();
                let depth = rec.promote(promotion.clone());
                Ok((rec, (promotion.clone(), depth)))
            },
        )?;
        self.store.flush().await?;
        tracing::info!(index = %index, trial_id, config = %out.0.config, by = promoted_by, "promoted");
        Ok(out)
    }

    /// Puts the newest history entry back as current, or clears current when the history is
    /// empty; FAILED_PRECONDITION when there is neither.
    pub async fn rollback(&self, index: &Name) -> Result<(Option<Promotion>, u32)> {
        if let Some((shared, _)) = &self.shared {
            let out = shared.rollback(index).await?;
            tracing::info!(index = %index, current = ?out.0.as_ref().map(|p| p.trial_id), "rolled back (cluster)");
            return Ok(out);
        }
        let out =
            self.store
                .update_promotion(index.as_str(), None, None, |rec: Option<Record>| {
                    let mut rec = rec.unwrap_or_default();
                    let out = rec.rollback(index)?;
                    Ok((rec, out))
                })?;
        self.store.flush().await?;
        tracing::info!(index = %index, current = ?out.0.as_ref().map(|p| p.trial_id), "rolled back");
        Ok(out)
    }

    /// The current promotion and the history, newest first (on a cluster node, from etcd).
    pub async fn get(&self, index: &Name) -> Result<(Option<Promotion>, Vec<Promotion>)> {
        if let Some((shared, _)) = &self.shared {
            let rec = shared.get(index).await?;
            return Ok((rec.current, rec.history));
        }
        self.get_local(index)
    }

    /// [`get`](Self::get) of this node's store, without waiting: what a single node has (a
    /// cluster node keeps nothing there: None and no history).
    pub fn get_local(&self, index: &Name) -> Result<(Option<Promotion>, Vec<Promotion>)> {
        let rec: Record = self
            .store
            .get_promotion(index.as_str())?
            .unwrap_or_default();
        Ok((rec.current, rec.history))
    }

    /// The index's current promotion without waiting: a single node's from its store, a
    /// cluster node's as it last saw it in etcd (it follows every change, whichever node made
    /// it). For reports (the metrics).
    pub fn current_known(&self, index: &Name) -> Result<Option<Promotion>> {
        if let Some((shared, _)) = &self.shared {
            return Ok(shared.known_current(index));
        }
        Ok(self.get_local(index)?.0)
    }

    /// The promoted config of the index, or `default` when nothing is promoted.
    pub async fn config_or(
        &self,
        index: &Name,
        default: HnswConfig,
    ) -> Result<(HnswConfig, ConfigSource)> {
        Ok(match self.get(index).await?.0 {
            Some(p) => (p.config, ConfigSource::Promoted),
            None => (default, ConfigSource::Default),
        })
    }
}
