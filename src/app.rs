//! The application: every long-lived part of the server, built in one order and passed down.
//!
//! Order (each part gets what was built before it, nothing is bound later):
//! store → catalog (with the engine of indexes that name none) → lab → jobs → refresher.
//! The gRPC services get the [`App`] once it is built (`grpc::Core`); until then they answer
//! UNAVAILABLE.
//!
//! Invariants:
//! - There are no globals and no late-bound hooks: where one part must hear of another's work
//!   (the refresher of acknowledged writes and of job starts), the [`App`] method that does
//!   the work tells it, in the same call, before the caller is answered.
//! - Every write and every job start that a client or a policy makes goes through the methods
//!   here, so nothing bypasses the refresher.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::autotune::jobs::{Event, Jobs, TuneRequest};
use crate::autotune::lab::Lab;
use crate::catalog::{Catalog, CatalogOptions};
use crate::config::Config;
use crate::error::Result;
use crate::model::{Name, Point};
use crate::promotion::Registry;
use crate::refresh::Refresher;
use crate::store::Store;
use crate::tasks::Tasks;

/// The server's parts, built in order by [`App::open`].
pub struct App {
    pub store: Arc<Store>,
    pub catalog: Arc<Catalog>,
    pub lab: Arc<Lab>,
    pub jobs: Arc<Jobs>,
    pub refresh: Arc<Refresher>,
}

impl App {
    /// Recovers every part from `store`, in order. Every task they start is owned by `tasks`,
    /// and builds (recovery, activations, trials) stop at their next chunk once its stop token
    /// is cancelled (shutdown).
    pub async fn open(config: &Config, store: Arc<Store>, tasks: Tasks) -> Result<Self> {
        let registry = Arc::new(Registry::new(store.clone()));
        let catalog = Arc::new(
            Catalog::recover(
                store.clone(),
                registry,
                tasks,
                CatalogOptions {
                    max_pending: config.max_pending_writes,
                    default_engine: config.engine,
                    compact_fraction: config.compact_deleted_fraction,
                    snapshot_idle: config.snapshot_idle,
                },
            )
            .await?,
        );
        let lab = Arc::new(
            Lab::new(catalog.clone(), config.max_harness_queries)
                .with_trials_kept(config.trials_kept),
        );
        let jobs = Jobs::recover(
            lab.clone(),
            config.jobs_kept,
            config.max_concurrent_jobs,
            config.job_gate.clone(),
        )
        .await?;
        let refresh = Refresher::new(lab.clone(), jobs.clone())?;
        refresh.spawn_prober(config.refresh_probe_interval, jobs.shutdown_token());
        Ok(App {
            store,
            catalog,
            lab,
            jobs,
            refresh,
        })
    }

    /// Upserts points; the refresher hears of the write before it is answered.
    pub async fn upsert(&self, index: &Name, points: Vec<Point>) -> Result<(u64, u64)> {
        let done = self.catalog.upsert(index, points).await?;
        self.refresh.after_write(index);
        Ok(done)
    }

    /// Deletes points; the refresher hears of a delete that removed something.
    pub async fn delete_points(&self, index: &Name, ids: Vec<u64>) -> Result<(u64, u64)> {
        let done = self.catalog.delete_points(index, ids).await?;
        if done.0 > 0 {
            self.refresh.after_write(index);
        }
        Ok(done)
    }

    /// Starts an autotune job; the refresher counts it as the index's last tune.
    pub async fn start_tune(
        &self,
        req: TuneRequest,
    ) -> Result<(mpsc::UnboundedReceiver<Event>, CancellationToken)> {
        let index = req.index.clone();
        let started = self.jobs.start(req).await?;
        self.refresh.tuned(&index);
        Ok(started)
    }

    /// DeleteIndex: first cancels the index's autotune job and waits until its end is recorded
    /// (it promotes and activates nothing), waits for a refresh probe of it and drops its
    /// refresh state, then deletes the index. Everything the job might still try afterwards
    /// (a job started in between) is refused by the index's uid.
    pub async fn delete_index(&self, name: &Name) -> Result<()> {
        let uid = self.catalog.handle(name)?.meta.uid;
        let why = "its index was deleted; nothing was promoted";
        self.jobs.cancel_index(name, uid, why).await;
        self.refresh.forget(name, uid).await;
        self.catalog.delete_index_uid(name, uid).await?;
        // A job that started while the first cancel ran stops now (its writes are refused).
        self.jobs.cancel_index(name, uid, why).await;
        self.refresh.forget(name, uid).await;
        Ok(())
    }
}
