//! Progress of long work (a graph build, a ground truth, a measurement): shared between the
//! thread that does the work and whoever reports it (the autotune job's ticker, GetIndex).
//!
//! The worker pays one relaxed atomic store per chunk of work (a build stores once per chunk
//! of 256 points, the same place it polls its cancellation flag): nothing is allocated,
//! locked or sent from the hot loop. Readers take a [`ProgressView`] whenever they like; the
//! estimate of the time left is computed there, from the phase's elapsed time and rate.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::model::{now_millis, HnswConfig};

/// What a piece of long work is doing now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Phase {
    /// Reading the index's points from the store (done/total: none).
    Load = 1,
    /// Inserting points into a graph (done/total: points).
    Build = 2,
    /// Computing a harness's exact ground truth (done/total: queries).
    GroundTruth = 3,
    /// Running a harness's queries on a graph (done/total: queries).
    Measure = 4,
    /// Writing the new generation's snapshot file (done/total: none).
    Snapshot = 5,
    /// Applying the writes made during the build to the new graph (done/total: writes).
    Replay = 6,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            1 => Phase::Load,
            3 => Phase::GroundTruth,
            4 => Phase::Measure,
            5 => Phase::Snapshot,
            6 => Phase::Replay,
            _ => Phase::Build,
        }
    }
}

/// One piece of long work. Cheap to advance (`set_done`: one relaxed store), cheap to read.
#[derive(Debug)]
pub struct Progress {
    config: Option<HnswConfig>,
    phase: AtomicU8,
    done: AtomicU64,
    total: AtomicU64,
    /// When the current phase started, for the rate (monotonic) ...
    phase_started: Mutex<Instant>,
    /// ... and when the work started, for readers (milliseconds since the epoch).
    started_ms: u64,
}

/// A reader's copy of a [`Progress`].
#[derive(Clone, Debug, PartialEq)]
pub struct ProgressView {
    pub phase: Phase,
    /// The config of the graph being built or measured (unset for a ground truth).
    pub config: Option<HnswConfig>,
    pub done: u64,
    pub total: u64,
    /// When the work started (milliseconds since the epoch).
    pub started_ms: u64,
    /// Estimated time left in this phase at the rate so far; None until something is done or
    /// when the phase has no count.
    pub remaining: Option<Duration>,
}

impl Progress {
    pub fn new(phase: Phase, config: Option<HnswConfig>, total: u64) -> Self {
        Progress {
            config,
            phase: AtomicU8::new(phase as u8),
            done: AtomicU64::new(0),
            total: AtomicU64::new(total),
            phase_started: Mutex::new(Instant::now()),
            started_ms: now_millis(),
        }
    }

    /// Starts another phase of the same work, with nothing done of `total`.
    pub fn enter(&self, phase: Phase, total: u64) {
        *self.phase_started.lock() = Instant::now();
        self.done.store(0, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
        self.phase.store(phase as u8, Ordering::Release);
    }

    /// Units of the current phase done so far (the hot path: one relaxed store).
    #[inline]
    pub fn set_done(&self, done: u64) {
        self.done.store(done, Ordering::Relaxed);
    }

    /// Adds to the units done (for work shared by several threads).
    #[inline]
    pub fn add_done(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }

    pub fn view(&self) -> ProgressView {
        let phase = Phase::from_u8(self.phase.load(Ordering::Acquire));
        let elapsed = self.phase_started.lock().elapsed();
        let total = self.total.load(Ordering::Relaxed);
        let done = self.done.load(Ordering::Relaxed).min(total);
        ProgressView {
            phase,
            config: self.config,
            done,
            total,
            started_ms: self.started_ms,
            remaining: remaining(elapsed, done, total),
        }
    }
}

/// Time left at the rate so far: `elapsed × (total − done) / done`. A graph's insertions slow
/// down slowly as it grows (about log n per point), so this errs a little on the short side.
fn remaining(elapsed: Duration, done: u64, total: u64) -> Option<Duration> {
    if done == 0 || total == 0 {
        return None;
    }
    let left = (total - done) as f64;
    Some(Duration::from_secs_f64(
        elapsed.as_secs_f64() * left / done as f64,
    ))
}

/// The long work in flight for one owner (an autotune job, an index's activation), oldest
/// first. A piece of work is listed while its [`Tracked`] guard lives.
#[derive(Clone, Debug, Default)]
pub struct Activities {
    list: Arc<Mutex<Vec<Arc<Progress>>>>,
}

impl Activities {
    /// Lists a new piece of work until the returned guard is dropped.
    pub fn begin(&self, phase: Phase, config: Option<HnswConfig>, total: u64) -> Tracked {
        let p = Arc::new(Progress::new(phase, config, total));
        self.list.lock().push(p.clone());
        Tracked {
            progress: p,
            owner: self.list.clone(),
        }
    }

    /// What is in flight now, oldest first.
    pub fn views(&self) -> Vec<ProgressView> {
        self.list.lock().iter().map(|p| p.view()).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.list.lock().is_empty()
    }
}

/// A listed piece of work: unlisted when dropped.
#[derive(Debug)]
pub struct Tracked {
    progress: Arc<Progress>,
    owner: Arc<Mutex<Vec<Arc<Progress>>>>,
}

impl std::ops::Deref for Tracked {
    type Target = Progress;
    fn deref(&self) -> &Progress {
        &self.progress
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.owner
            .lock()
            .retain(|p| !Arc::ptr_eq(p, &self.progress));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_is_linear_in_what_is_left() {
        assert_eq!(remaining(Duration::from_secs(2), 0, 100), None);
        assert_eq!(
            remaining(Duration::from_secs(2), 50, 100),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            remaining(Duration::from_secs(3), 100, 100),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn work_is_listed_while_its_guard_lives() {
        let a = Activities::default();
        let t = a.begin(Phase::Build, None, 10);
        let u = a.begin(Phase::Measure, None, 5);
        t.set_done(4);
        u.add_done(7);
        let v = a.views();
        assert_eq!((v[0].phase, v[0].done, v[0].total), (Phase::Build, 4, 10));
        // Never more done than the total.
        assert_eq!((v[1].phase, v[1].done), (Phase::Measure, 5));
        drop(t);
        assert_eq!(a.views().len(), 1);
        u.enter(Phase::Snapshot, 0);
        assert_eq!(a.views()[0].phase, Phase::Snapshot);
        drop(u);
        assert!(a.is_empty());
    }
}
