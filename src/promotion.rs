//! The promotion registry: per index, the current promoted config and its history.
//!
//! Invariants: history is newest first and never longer than [`HISTORY_CAP`]; every change is
//! one atomic store transaction, flushed before it is acknowledged, so concurrent promotes and
//! rollbacks never lose or duplicate an entry.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

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
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Record {
    current: Option<Promotion>,
    /// Newest first, at most HISTORY_CAP.
    history: Vec<Promotion>,
}

pub struct Registry {
    store: Arc<Store>,
}

impl Registry {
    pub fn new(store: Arc<Store>) -> Self {
        Registry { store }
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
        self.promote_for(index, None, trial_id, promoted_by, note)
            .await
    }

    /// [`promote`](Self::promote), refused with NOT_FOUND unless the index is still the one
    /// with `uid` (when given): work that outlived its index never promotes onto a new index
    /// created under the same name.
    pub async fn promote_for(
        &self,
        index: &Name,
        uid: Option<u64>,
        trial_id: u64,
        promoted_by: &str,
        note: &str,
    ) -> Result<(Promotion, u32)> {
        let trial: Trial = self
            .store
            .get_trial(trial_id)?
            .ok_or_else(|| Error::not_found("trial", trial_id.to_string()))?;
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
        };
        let out = self.store.update_promotion(
            index.as_str(),
            uid,
            Some(trial_id),
            |rec: Option<Record>| {
                let mut rec = rec.unwrap_or_default();
                if let Some(prev) = rec.current.take() {
                    rec.history.insert(0, prev);
                    rec.history.truncate(HISTORY_CAP);
                }
                rec.current = Some(promotion.clone());
                let depth = rec.history.len() as u32;
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
        let out =
            self.store
                .update_promotion(index.as_str(), None, None, |rec: Option<Record>| {
                    let mut rec = rec.unwrap_or_default();
                    if rec.current.is_none() && rec.history.is_empty() {
                        return Err(Error::Precondition(format!(
                            "index {:?} has nothing promoted and no history to roll back to",
                            index.as_str()
                        )));
                    }
                    rec.current = if rec.history.is_empty() {
                        None
                    } else {
                        Some(rec.history.remove(0))
                    };
                    let out = (rec.current.clone(), rec.history.len() as u32);
                    Ok((rec, out))
                })?;
        self.store.flush().await?;
        tracing::info!(index = %index, current = ?out.0.as_ref().map(|p| p.trial_id), "rolled back");
        Ok(out)
    }

    /// The current promotion and the history, newest first.
    pub fn get(&self, index: &Name) -> Result<(Option<Promotion>, Vec<Promotion>)> {
        let rec: Record = self
            .store
            .get_promotion(index.as_str())?
            .unwrap_or_default();
        Ok((rec.current, rec.history))
    }

    /// The promoted config of the index, or `default` when nothing is promoted.
    pub fn config_or(
        &self,
        index: &Name,
        default: HnswConfig,
    ) -> Result<(HnswConfig, ConfigSource)> {
        Ok(match self.get(index)?.0 {
            Some(p) => (p.config, ConfigSource::Promoted),
            None => (default, ConfigSource::Default),
        })
    }
}
