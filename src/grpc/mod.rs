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
#[derive(Default)]
pub struct Core {
    ready: OnceLock<Ready>,
}

impl Core {
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
        }
    }
}
