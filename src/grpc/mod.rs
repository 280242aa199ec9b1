//! The gRPC edge: one file per service, plus the conversions. Handlers parse and validate the
//! request into domain types, call the core, and convert the answer back.

pub mod convert;
pub mod index;
pub mod promotion;

use std::sync::{Arc, OnceLock};

use crate::catalog::Catalog;
use crate::error::Error;

/// What the handlers share: the core, set once startup recovery is done. Until then every
/// vectord call is UNAVAILABLE (health says NOT_SERVING).
#[derive(Default)]
pub struct Core {
    catalog: OnceLock<Arc<Catalog>>,
}

impl Core {
    pub fn set_ready(&self, catalog: Arc<Catalog>) {
        let _ = self.catalog.set(catalog);
    }

    pub fn catalog(&self) -> Result<&Arc<Catalog>, Error> {
        self.catalog.get().ok_or_else(|| {
            Error::Unavailable(
                "vectord is starting: indexes are being recovered; retry shortly".into(),
            )
        })
    }
}
