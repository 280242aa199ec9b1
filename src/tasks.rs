//! Every task the server spawns has an owner: [`Tasks`], one per server, a tokio-util
//! `TaskTracker` with the server's `CancellationToken`.
//!
//! Invariants:
//! - Outside tests, nothing is spawned with a bare `tokio::spawn`: every task goes through
//!   [`Tasks::spawn`]
//!   (blocking work still goes to `spawn_blocking`, awaited by a task that is tracked).
//! - Every long-lived task (a job, the refresh prober, a compaction, an index's write
//!   committer, a metrics connection, a pending connection) ends at [`Tasks::stop_token`]'s
//!   cancellation or when what feeds it is dropped, so [`Tasks::drain`] ends.
//! - Shutdown is: cancel ([`Tasks::cancel`]) → let in-flight calls finish → drain (bounded by
//!   the grace period) → flush the store → wait (within the same deadline) until the store is
//!   closed → exit. A task that ends by cancellation records how it ended (a job: CANCELLED)
//!   before it returns, so the drain covers that write. Blocking calls are not tracked here:
//!   one whose caller went away still holds the store, and the last step waits for it
//!   ([`crate::store::Store::closed`]), so the data dir is free when the server returns.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The server's tasks and its stop signal (cheap to clone: every clone is the same owner).
#[derive(Clone, Debug, Default)]
pub struct Tasks {
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl Tasks {
    pub fn new() -> Self {
        Self::default()
    }

    /// Spawns `task` on the runtime, owned by this tracker.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(task)
    }

    /// The stop signal: cancelled when shutdown starts.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Whether shutdown has started.
    pub fn is_stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Starts shutdown: every task watching the stop signal winds down.
    pub fn cancel(&self) {
        self.stop.cancel();
    }

    /// Tasks still running.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }

    /// Waits, at most `within`, until every task has ended (new spawns are still tracked:
    /// a task may spawn another while it winds down). True if all ended in time.
    pub async fn drain(&self, within: Duration) -> bool {
        self.tracker.close();
        tokio::time::timeout(within, self.tracker.wait())
            .await
            .is_ok()
    }
}
