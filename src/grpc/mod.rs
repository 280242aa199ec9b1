//! The gRPC edge: one file per service, plus the conversions. Handlers parse and validate the
//! request into domain types, call the core, and convert the answer back.

pub mod autotune;
pub mod convert;
pub mod index;
pub mod promotion;

use std::sync::{Arc, OnceLock};

use crate::autotune::jobs::Jobs;
use crate::autotune::lab::Lab;
use crate::catalog::Catalog;
use crate::error::Error;

/// The core once startup recovery is done.
pub struct Ready {
    pub catalog: Arc<Catalog>,
    pub lab: Arc<Lab>,
    pub jobs: Arc<Jobs>,
    pub refresh: Arc<crate::refresh::Refresher>,
}

/// What the handlers share: the core, set once startup recovery is done. Until then every
/// vectord call is UNAVAILABLE (health says NOT_SERVING).
pub struct Core {
    ready: OnceLock<Ready>,
    /// Most points in one UpsertPoints call or ImportPoints message.
    pub max_points_per_upsert: usize,
}

impl Core {
    pub fn new(max_points_per_upsert: usize) -> Self {
        Core {
            ready: OnceLock::new(),
            max_points_per_upsert,
        }
    }

    /// RESOURCE_EXHAUSTED when `n` points are more than one call may carry.
    pub fn check_points(&self, what: &str, n: usize) -> Result<(), Error> {
        let max = self.max_points_per_upsert;
        if n > max {
            return Err(Error::Limit(format!(
                "{what} has {n} points; at most {max} are allowed per call or message (--max-points-per-upsert): split it"
            )));
        }
        Ok(())
    }

    pub fn set_ready(&self, ready: Ready) {
        let _ = self.ready.set(ready);
    }

    pub fn ready(&self) -> Result<&Ready, Error> {
        self.ready.get().ok_or_else(|| {
            Error::Unavailable(
                "vectord is starting: indexes are being recovered; retry shortly".into(),
            )
        })
    }

    pub fn catalog(&self) -> Result<&Arc<Catalog>, Error> {
        Ok(&self.ready()?.catalog)
    }

    /// Cancels running jobs (shutdown).
    pub fn shutdown(&self) {
        if let Some(r) = self.ready.get() {
            r.jobs.shutdown();
            r.catalog.stop_compaction();
        }
    }
}
