//! The lab of a cluster node (docs/cluster.md): harnesses and trials shared by every node.
//!
//! On a cluster node every change of the lab (a harness created or deleted, a trial journaled,
//! trials removed by retention, a trial pinned by a promotion) is a [`LabRecord`] in the
//! cluster's lab log ([`SharedLab`], implemented by `cluster::lab` over NATS JetStream). Every
//! node, this one included, mirrors the log into its own store in log order ([`mirror`]), so
//! ListHarnesses, ListTrials, GetTrial, GetParetoFront, RunTrial, Autotune and Promote read the
//! local store as on a single node, and see the same records on every node.
//!
//! Invariants:
//! - A trial's id is the log sequence of its record: the same on every node, never reused.
//! - Nothing changes the local lab directly on a cluster node (but a harness's recomputed
//!   ground truth, which each node keeps for its own points): a call logs its record and
//!   answers once this node has mirrored it.
//! - Retention is decided by the node that journaled a trial, from its mirror (which holds
//!   every record up to that trial's), as one record listing the ids to remove; every node
//!   removes those ids except the ones pinned by a record earlier in the log. A promotion pins
//!   its trial first (a record), then checks the trial is still in the journal: so in log
//!   order a trial is either removed before its pin (the promotion is refused NOT_FOUND on
//!   every node) or pinned before any removal (kept on every node).
//! - The log is trimmed of records that no longer change anything (`cluster::lab`); a node
//!   that may have missed one re-reads the whole log ([`Resync`]): its store then ends as the
//!   log's records make it, like every other node's.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::harness::Harness;
use super::trial::Trial;
use crate::error::{Error, Result};
use crate::model::Name;
use crate::store::{LabOp, Store};

/// One change of the cluster's lab. `index_uid` is the index's cluster uid (its incarnation):
/// a record of an index deleted since, or of another index of the same name, changes nothing.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LabRecord {
    HarnessCreated {
        index_uid: u64,
        harness: Box<Harness>,
    },
    HarnessDeleted {
        index_uid: u64,
        index: Name,
        name: Name,
    },
    /// Journaled under the record's sequence (its `id` is ignored).
    Trial { index_uid: u64, trial: Box<Trial> },
    /// Retention: these trials of the index and harness go (pinned ones stay).
    TrialsRemoved {
        index_uid: u64,
        index: Name,
        harness: Name,
        ids: Vec<u64>,
    },
    /// A promotion's: the trial is never removed by retention.
    TrialPinned {
        index_uid: u64,
        index: Name,
        trial_id: u64,
    },
}

impl LabRecord {
    /// The index's name and cluster uid.
    pub fn index(&self) -> (&Name, u64) {
        match self {
            LabRecord::HarnessCreated { index_uid, harness } => (&harness.index, *index_uid),
            LabRecord::HarnessDeleted {
                index_uid, index, ..
            }
            | LabRecord::TrialsRemoved {
                index_uid, index, ..
            }
            | LabRecord::TrialPinned {
                index_uid, index, ..
            } => (index, *index_uid),
            LabRecord::Trial { index_uid, trial } => (&trial.index, *index_uid),
        }
    }
}

/// A cluster's lab log (implemented by `cluster::lab`).
#[async_trait::async_trait]
pub trait SharedLab: Send + Sync {
    /// This node's id (the trials it runs carry it).
    fn node_id(&self) -> &str;
    /// Logs `record` for every node and answers once this node has mirrored it, with its log
    /// sequence. A retried publish is logged once. UNAVAILABLE naming the engine when the log
    /// does not acknowledge it; RESOURCE_EXHAUSTED when the record is larger than the log takes.
    async fn log(&self, record: &LabRecord) -> Result<u64>;
    /// Waits (a few seconds at most) until this node has mirrored every record logged so far,
    /// so a harness or trial just made through another node is found here. UNAVAILABLE when
    /// the log does not answer or the wait ends first.
    async fn sync(&self) -> Result<()>;
}

/// What a resync has read of the lab log so far: it re-reads the whole log over what the store
/// has (the log was trimmed past what this node mirrored, or the store's lab predates the log),
/// and at its end removes the harnesses and trials that no record it read created
/// ([`Store::finish_lab_resync`]).
#[derive(Debug, Default)]
pub struct Resync {
    /// Keys (`store::harness_key`) of the harnesses created by a record read.
    pub harnesses: HashSet<Vec<u8>>,
    /// Trials journaled by a record read.
    pub trials: HashSet<u64>,
}

/// Mirrors the record at log sequence `seq` into `store` (None: an unreadable record, only the
/// sequence moves), in one store transaction with the sequence; during a resync, noting what
/// it created in `resync` (and putting a harness in the place of another one of its name the
/// store has). Blocking; not flushed.
pub fn mirror(
    store: &Store,
    seq: u64,
    record: Option<&LabRecord>,
    resync: Option<&mut Resync>,
) -> Result<()> {
    let op = match record {
        None => LabOp::Skip,
        Some(LabRecord::HarnessCreated { index_uid, harness }) => LabOp::CreateHarness {
            index: harness.index.as_str(),
            cluster_uid: *index_uid,
            name: harness.name.as_str(),
            json: json(harness)?,
            replace: resync.is_some()
                && store
                    .get_harness::<Harness>(harness.index.as_str(), harness.name.as_str())?
                    .is_some_and(|had| !same_harness(&had, harness)),
        },
        Some(LabRecord::HarnessDeleted {
            index_uid,
            index,
            name,
        }) => LabOp::DeleteHarness {
            index: index.as_str(),
            cluster_uid: *index_uid,
            name: name.as_str(),
        },
        Some(LabRecord::Trial { index_uid, trial }) => LabOp::Trial {
            index: trial.index.as_str(),
            cluster_uid: *index_uid,
            json: json(&Trial {
                id: seq,
                ..(**trial).clone()
            })?,
        },
        Some(LabRecord::TrialsRemoved { ids, .. }) => LabOp::RemoveTrials { ids },
        Some(LabRecord::TrialPinned {
            index, trial_id, ..
        }) => LabOp::Pin {
            index: index.as_str(),
            id: *trial_id,
        },
    };
    store.apply_lab(seq, &op)?;
    if let (Some(r), Some(record)) = (resync, record) {
        match record {
            LabRecord::HarnessCreated { harness, .. } => {
                r.harnesses.insert(crate::store::harness_key(
                    harness.index.as_str(),
                    harness.name.as_str(),
                ));
            }
            LabRecord::Trial { .. } => {
                r.trials.insert(seq);
            }
            _ => {}
        }
    }
    Ok(())
}

/// Whether two harnesses of one name are the same one (made by the same record): a harness's
/// ground truth may have been recomputed on this node since, the rest never changes.
fn same_harness(a: &Harness, b: &Harness) -> bool {
    (a.create_time_ms, a.seed, a.k, a.queries.len())
        == (b.create_time_ms, b.seed, b.k, b.queries.len())
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| Error::Internal(format!("encoding a lab record: {e}")))
}
