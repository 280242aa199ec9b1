//! Tombstone compaction: when the share of tombstones in an index's active generation passes
//! `--compact-deleted-fraction`, the server rebuilds the generation in the background with the
//! same config, source and profile (the catalog's build + replay + atomic swap, so searches and
//! writes go on meanwhile and the generation number goes up by one).
//!
//! Invariants:
//! - At most one compaction per index at a time (`IndexCompaction::running`), and a compaction
//!   never waits for the index's build lock: if a build (activation) holds it, the compaction
//!   is skipped.
//! - An activation (profile activation, autotune with activate) wins: while one is in progress
//!   on the index no compaction starts, and a running compaction stops at its next check
//!   (between chunks of points) and gives the build lock up. The activation builds a generation
//!   without tombstones anyway, so nothing is lost by dropping the compaction.
//! - A compaction outdated by deletes made while it builds (half of the points it started
//!   with deleted since) stops at its next check, and the check after it starts one of the
//!   points left: a delete of most of an index in many calls costs one rebuild of what stays,
//!   not one of what was there when the threshold was passed.
//! - The check that starts one runs after a write has been acknowledged and costs two loads
//!   under the generation's id-map read lock; the rebuild runs on a spawned task.
//! - A failed compaction (not a skipped or cancelled one) is not retried on the index for
//!   [`RETRY_AFTER`], so a failing store does not turn every write into a rebuild.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::catalog::{Catalog, IndexHandle};
use crate::error::Error;
use crate::model::{now_millis, Name};

/// `--compact-deleted-fraction`'s default.
pub const DEFAULT_DELETED_FRACTION: f64 = 0.2;
/// How long an index waits after a failed compaction before the next one may start.
pub const RETRY_AFTER: Duration = Duration::from_secs(30);

/// Checks a `--compact-deleted-fraction` value: 0 turns compaction off, otherwise it must be in
/// (0, 1).
pub fn check_fraction(f: f64) -> Result<f64, String> {
    if f == 0.0 || (f > 0.0 && f < 1.0) {
        Ok(f)
    } else {
        Err(format!(
            "--compact-deleted-fraction must be 0 (no compaction) or in (0, 1), got {f}"
        ))
    }
}

/// The deleted share of a generation: tombstones over every point in its graph (0 when empty).
pub fn deleted_fraction(tombstones: usize, live: usize) -> f64 {
    let total = tombstones + live;
    if total == 0 {
        0.0
    } else {
        tombstones as f64 / total as f64
    }
}

/// One index's compaction state (lives in its [`IndexHandle`]).
#[derive(Default)]
pub struct IndexCompaction {
    /// A compaction of the index is scheduled or running.
    running: AtomicBool,
    /// Activations of the index in progress (they preempt compaction).
    activations: AtomicUsize,
    /// Compactions swapped in since the server started.
    count: AtomicU64,
    /// When the last one was swapped in (ms since the epoch; 0: none since start).
    last_ms: AtomicU64,
    /// No compaction starts before this time (ms since the epoch), after a failure.
    retry_after_ms: AtomicU64,
}

/// What GetIndex and the metrics show of an index's compaction.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CompactionStats {
    pub running: bool,
    pub count: u64,
    pub last_ms: u64,
}

/// Marks an activation in progress on an index while it lives.
pub struct Activation<'a>(&'a IndexCompaction);

impl Drop for Activation<'_> {
    fn drop(&mut self) {
        self.0.activations.fetch_sub(1, Ordering::AcqRel);
    }
}

impl IndexCompaction {
    /// Marks an activation in progress until the guard drops: no compaction starts, and a
    /// running one stops at its next check.
    pub fn activation(&self) -> Activation<'_> {
        self.activations.fetch_add(1, Ordering::AcqRel);
        Activation(self)
    }

    /// True while an activation is in progress.
    pub fn preempted(&self) -> bool {
        self.activations.load(Ordering::Acquire) > 0
    }

    pub fn stats(&self) -> CompactionStats {
        CompactionStats {
            running: self.running.load(Ordering::Acquire),
            count: self.count.load(Ordering::Acquire),
            last_ms: self.last_ms.load(Ordering::Acquire),
        }
    }
}

/// What a compaction build needs to know: the threshold to re-check under the build lock, and
/// the server's stop signal.
#[derive(Clone)]
pub struct Compaction {
    pub threshold: f64,
    pub stop: CancellationToken,
}

/// Starts compactions (one per catalog, which passes itself to [`Compactor::maybe_start`]).
#[derive(Default)]
pub struct Compactor {
    /// The threshold as f64 bits; 0: off.
    threshold: AtomicU64,
    stop: CancellationToken,
}

impl Compactor {
    /// Compaction past `threshold` (0: off), until `stop` (server shutdown) is cancelled.
    pub fn new(threshold: f64, stop: CancellationToken) -> Self {
        Compactor {
            threshold: AtomicU64::new(threshold.to_bits()),
            stop,
        }
    }

    fn threshold(&self) -> f64 {
        f64::from_bits(self.threshold.load(Ordering::Acquire))
    }

    /// The cheap check after an acknowledged write: starts a background compaction of the index
    /// when its deleted share passed the threshold and none is running or preempted.
    pub fn maybe_start(&self, catalog: &Arc<Catalog>, name: &Name, handle: &Arc<IndexHandle>) {
        let threshold = self.threshold();
        if threshold <= 0.0 || self.stop.is_cancelled() {
            return;
        }
        let gen = handle.active();
        if deleted_fraction(gen.tombstones(), gen.live_count()) <= threshold {
            return;
        }
        let state = &handle.compaction;
        if state.preempted() || now_millis() < state.retry_after_ms.load(Ordering::Acquire) {
            return;
        }
        if state.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let (owner, name, handle) = (catalog.clone(), name.clone(), handle.clone());
        let catalog = owner.clone();
        let how = Compaction {
            threshold,
            stop: self.stop.clone(),
        };
        owner.tasks().spawn(async move {
            let state = &handle.compaction;
            match catalog.compact(&name, &how).await {
                Ok(Some(meta)) => {
                    state.count.fetch_add(1, Ordering::AcqRel);
                    state.last_ms.store(now_millis(), Ordering::Release);
                    tracing::info!(index = %name, generation = meta.number, points = meta.point_count,
                        build_millis = meta.build_millis, "compacted tombstones");
                }
                Ok(None) => {
                    tracing::debug!(index = %name, "compaction skipped: an activation runs or the share fell");
                }
                Err(Error::Cancelled(why)) => {
                    tracing::info!(index = %name, %why, "compaction stopped");
                }
                Err(Error::NotFound { .. }) => {}
                Err(e) => {
                    let retry = now_millis() + RETRY_AFTER.as_millis() as u64;
                    state.retry_after_ms.store(retry, Ordering::Release);
                    tracing::warn!(index = %name, error = %e, retry_secs = RETRY_AFTER.as_secs(),
                        "compaction failed");
                }
            }
            state.running.store(false, Ordering::Release);
            // Writes made while it ran were replayed as tombstones and may have passed the
            // threshold again with no write left to notice: check once more.
            catalog.maybe_compact(&name, &handle);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fraction_bounds() {
        assert_eq!(check_fraction(0.0), Ok(0.0));
        assert_eq!(check_fraction(0.2), Ok(0.2));
        for bad in [-0.1, 1.0, 1.5, f64::NAN] {
            assert!(check_fraction(bad).is_err(), "{bad}");
        }
        assert_eq!(deleted_fraction(0, 0), 0.0);
        assert_eq!(deleted_fraction(1, 3), 0.25);
    }

    #[test]
    fn activations_preempt_until_dropped() {
        let c = IndexCompaction::default();
        assert!(!c.preempted());
        {
            let _a = c.activation();
            let _b = c.activation();
            assert!(c.preempted());
        }
        assert!(!c.preempted());
    }
}
