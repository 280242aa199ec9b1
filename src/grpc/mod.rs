//! The gRPC edge: one file per service, plus the conversions. Handlers parse and validate the
//! request into domain types, call the core, and convert the answer back.

pub mod autotune;
pub mod cluster;
pub mod convert;
pub mod index;
pub mod names;
pub mod peer;
pub mod promotion;
pub mod status;

use std::sync::{Arc, OnceLock};

use crate::app::App;
use crate::catalog::Catalog;
use crate::error::Error;

/// The per-call size limits checked at the edge, before any work (all RESOURCE_EXHAUSTED).
#[derive(Clone, Copy, Debug)]
pub struct EdgeLimits {
    /// Most points in one UpsertPoints call or ImportPoints message.
    pub max_points_per_upsert: usize,
    /// Most ids in one DeletePoints call.
    pub max_ids_per_delete: usize,
    /// Most queries in one SearchBatch.
    pub max_batch_queries: usize,
    /// Most neighbours one SearchBatch may ask for (queries x k).
    pub max_batch_results: usize,
    /// Largest encoded response.
    pub max_response_bytes: usize,
}

impl EdgeLimits {
    pub fn of(c: &crate::config::Config) -> Self {
        EdgeLimits {
            max_points_per_upsert: c.max_points_per_upsert,
            max_ids_per_delete: c.max_ids_per_delete,
            max_batch_queries: c.max_batch_queries,
            max_batch_results: c.max_batch_results,
            max_response_bytes: c.max_response_bytes,
        }
    }
}

/// The most bytes one Neighbor takes inside a SearchResult: tag + length, then id (tag + a
/// varint of at most 10 bytes) and distance (tag + fixed32).
const NEIGHBOR_MAX_BYTES: usize = 2 + (1 + 10) + (1 + 4);
/// The most bytes of one SearchResult's own framing in the response: tag + a length varint.
const RESULT_MAX_OVERHEAD: usize = 1 + 5;
/// The rest of a SearchBatchResponse: the generation (tag + varint).
const BATCH_RESPONSE_OVERHEAD: usize = 1 + 10;

/// The largest a SearchBatchResponse of `queries` results of `k` neighbours can encode to.
pub fn batch_response_max_bytes(queries: usize, k: usize) -> usize {
    queries
        .saturating_mul(RESULT_MAX_OVERHEAD.saturating_add(k.saturating_mul(NEIGHBOR_MAX_BYTES)))
        .saturating_add(BATCH_RESPONSE_OVERHEAD)
}

/// What the handlers share: the application, set once startup recovery is done (the server
/// listens during recovery, for health). Until then every vectord call is UNAVAILABLE (health
/// says NOT_SERVING).
pub struct Core {
    app: OnceLock<Arc<App>>,
    pub limits: EdgeLimits,
    /// The server's tasks: a handler that keeps work going after it answers (the autotune
    /// event forwarder) spawns it here.
    pub tasks: crate::tasks::Tasks,
}

impl Core {
    pub fn new(limits: EdgeLimits, tasks: crate::tasks::Tasks) -> Self {
        Core {
            app: OnceLock::new(),
            limits,
            tasks,
        }
    }

    /// RESOURCE_EXHAUSTED when `n` points are more than one call may carry.
    pub fn check_points(&self, what: &str, n: usize) -> Result<(), Error> {
        let max = self.limits.max_points_per_upsert;
        if n > max {
            return Err(Error::Limit(format!(
                "{what} has {n} points; at most {max} are allowed per call or message (--max-points-per-upsert): split it"
            )));
        }
        Ok(())
    }

    /// RESOURCE_EXHAUSTED when a DeletePoints call names more ids than one call may.
    pub fn check_delete_ids(&self, n: usize) -> Result<(), Error> {
        let max = self.limits.max_ids_per_delete;
        if n > max {
            return Err(Error::Limit(format!(
                "the request has {n} ids; at most {max} are allowed per DeletePoints call (--max-ids-per-delete): split it"
            )));
        }
        Ok(())
    }

    /// RESOURCE_EXHAUSTED when a SearchBatch of `queries` queries of `k` neighbours is over a
    /// limit: queries per batch, queries x k, or the largest its answer could encode to.
    pub fn check_batch(&self, queries: usize, k: usize) -> Result<(), Error> {
        let l = &self.limits;
        if queries > l.max_batch_queries {
            return Err(Error::Limit(format!(
                "the batch has {queries} queries; at most {} are allowed per SearchBatch (--max-batch-queries): split it",
                l.max_batch_queries
            )));
        }
        let results = queries.saturating_mul(k);
        if results > l.max_batch_results {
            return Err(Error::Limit(format!(
                "the batch asks for {queries} queries x k {k} = {results} neighbours; at most {} are allowed per SearchBatch (--max-batch-results): send fewer queries per call or a smaller k",
                l.max_batch_results
            )));
        }
        let bytes = batch_response_max_bytes(queries, k);
        if bytes > l.max_response_bytes {
            return Err(Error::Limit(format!(
                "the answer to {queries} queries x k {k} could take {bytes} bytes; responses are at most {} bytes (--max-response-bytes): send fewer queries per call or a smaller k",
                l.max_response_bytes
            )));
        }
        Ok(())
    }

    /// Hands the recovered application to the services; INTERNAL if one was handed already.
    pub fn set_app(&self, app: Arc<App>) -> Result<(), Error> {
        self.app
            .set(app)
            .map_err(|_| Error::Internal("the application was set twice".into()))
    }

    pub fn app(&self) -> Result<&Arc<App>, Error> {
        self.app.get().ok_or_else(|| {
            Error::Unavailable(
                "vectord is starting: indexes are being recovered; retry shortly".into(),
            )
        })
    }

    pub fn catalog(&self) -> Result<&Arc<Catalog>, Error> {
        Ok(&self.app()?.catalog)
    }
}
