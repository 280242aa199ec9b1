//! The application: every long-lived part of the server, built in one order and passed down.
//!
//! Order (each part gets what was built before it, nothing is bound later):
//! store → control plane (only with `--etcd`: the etcd client, connected lazily) → lab log
//! (only with `--nats`: the cluster's harnesses and trials, its NATS client connecting in the
//! background) → registry (the store's, or the control plane's, pinning through the lab log) →
//! catalog (with the engine of indexes that name none) → lab (through the lab log on a cluster
//! node) → jobs (with the control plane's job leases) → refresher → cluster (only with
//! `--etcd`/`--nats`: joins etcd and NATS JetStream, see `cluster/`).
//! The gRPC services get the [`App`] once it is built (`grpc::Core`); until then they answer
//! UNAVAILABLE.
//!
//! Invariants:
//! - There are no globals and no late-bound hooks: where one part must hear of another's work
//!   (the refresher of acknowledged writes and of job starts), the [`App`] method that does
//!   the work tells it, in the same call, before the caller is answered.
//! - Every write and every job start that a client or a policy makes goes through the methods
//!   here, so nothing bypasses the refresher.
//! - On a cluster node the index DDL and every write go through the cluster (etcd's catalog,
//!   the index's write log); without the cluster flags there is no cluster part at all and
//!   the methods here are the single node's.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::autotune::jobs::{Event, Jobs, TuneRequest};
use crate::autotune::lab::Lab;
use crate::catalog::{Catalog, CatalogOptions, IndexView};
use crate::cluster::control::Control;
use crate::cluster::{Activation, Cluster};
use crate::config::Config;
use crate::error::Result;
use crate::model::{Name, NewIndex, Point, Profile};
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
    /// The cluster this node is part of (`--etcd`, `--nats`); None on a single node.
    pub cluster: Option<Arc<Cluster>>,
}

/// What an acknowledged write did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written {
    /// Points upserted, or points that existed and were deleted.
    pub affected: u64,
    /// The index's point count after the write (on a cluster node: on this node, once applied
    /// here).
    pub point_count: u64,
    /// The index's write-log sequence of the write (cluster nodes; 0 on a single node).
    pub sequence: u64,
}

impl App {
    /// Recovers every part from `store`, in order. Every task they start is owned by `tasks`,
    /// and builds (recovery, activations, trials) stop at their next chunk once its stop token
    /// is cancelled (shutdown).
    pub async fn open(config: &Config, store: Arc<Store>, tasks: Tasks) -> Result<Self> {
        let control = match &config.cluster {
            Some(c) => Some(Control::connect(c, tasks.clone()).await?),
            None => None,
        };
        // The cluster's lab log (harnesses and trials), connecting in the background.
        let lab_log = match &config.cluster {
            Some(c) => Some(
                crate::cluster::lab::LabLog::connect(
                    &c.nats,
                    &c.nats_access,
                    &c.node_id,
                    store.clone(),
                )
                .await?,
            ),
            None => None,
        };
        let registry = Arc::new(match (&control, &lab_log) {
            (Some(c), Some(l)) => {
                Registry::shared(store.clone(), c.clone(), c.node_id().to_string(), l.clone())
            }
            _ => Registry::new(store.clone()),
        });

        let catalog = Arc::new(
            Catalog::recover(
                store.clone(),
                registry,
                tasks,
                CatalogOptions {
                    max_pending: config.max_pending_writes,
                    default_engine: config.engine,
                    compact_fraction: config.compact_deleted_fraction,
                    max_unindexed: config.max_unindexed_points,
                    indexer_hold: config.indexer_hold.clone(),
                    test_pauses: config.test_pauses,
                    snapshot_idle: config.snapshot_idle,
                    map_float_vectors: config.map_float_vectors,
                    check_found: config.check_findable,
                },
            )
            .await?,
        );
        let mut lab = Lab::new(catalog.clone(), config.max_harness_queries)
            .with_trials_kept(config.trials_kept);
        if let Some(l) = &lab_log {
            lab = lab.with_shared(l.clone());
        }
        let lab = Arc::new(lab);
        let jobs = Jobs::recover(
            lab.clone(),
            config.jobs_kept,
            config.max_concurrent_jobs,
            config.job_gate.clone(),
            control
                .clone()
                .map(|c| c as Arc<dyn crate::autotune::jobs::ClusterJobs>),
        )
        .await?;
        let refresh = Refresher::new(
            lab.clone(),
            jobs.clone(),
            control
                .clone()
                .map(|c| c as Arc<dyn crate::refresh::SharedRefresh>),
        )?;
        refresh.spawn_prober(config.refresh_probe_interval, jobs.shutdown_token());
        refresh.follow_shared(jobs.shutdown_token());
        let cluster = match (&config.cluster, control, lab_log) {
            (Some(c), Some(control), Some(lab_log)) => {
                // A replica the cluster no longer has is dropped the way DeleteIndex drops an
                // index (its job and refresh state first): the parts it needs exist already.
                let drop_index: crate::cluster::DropIndex = {
                    let (catalog, jobs, refresh) = (catalog.clone(), jobs.clone(), refresh.clone());
                    Arc::new(move |name: Name| {
                        let (catalog, jobs, refresh) =
                            (catalog.clone(), jobs.clone(), refresh.clone());
                        Box::pin(
                            async move { delete_local(&catalog, &jobs, &refresh, &name).await },
                        )
                    })
                };
                Some(Cluster::join(c.clone(), control, lab_log, catalog.clone(), drop_index).await?)
            }
            _ => None,
        };
        Ok(App {
            store,
            catalog,
            lab,
            jobs,
            refresh,
            cluster,
        })
    }

    /// CreateIndex: on a cluster node one compare-and-swap in etcd, answered once this node
    /// has its replica.
    pub async fn create_index(&self, new: NewIndex) -> Result<IndexView> {
        match &self.cluster {
            Some(c) => c.create_index(new).await,
            None => self.catalog.create_index(new).await,
        }
    }

    /// Upserts points; the refresher hears of the write before it is answered. On a cluster
    /// node the write goes through the index's write log (`request_id`: its dedupe id, may be
    /// empty; ignored on a single node).
    pub async fn upsert(
        &self,
        index: &Name,
        points: Vec<Point>,
        request_id: &str,
    ) -> Result<Written> {
        let done = match &self.cluster {
            Some(c) => c.upsert(index, points, request_id).await?.into(),
            None => {
                let (affected, point_count) = self.catalog.upsert(index, points).await?;
                Written {
                    affected,
                    point_count,
                    sequence: 0,
                }
            }
        };
        self.refresh.after_write(index);
        Ok(done)
    }

    /// One message of an ImportPoints stream: [`upsert`](Self::upsert), except that on a
    /// cluster node it is answered once logged, without waiting for this node to apply it;
    /// the import calls [`import_ended`](Self::import_ended) after its last message.
    pub async fn import_message(
        &self,
        index: &Name,
        points: Vec<Point>,
        request_id: &str,
    ) -> Result<Written> {
        match &self.cluster {
            Some(c) => {
                let done = c
                    .upsert_with(index, points, request_id, false)
                    .await?
                    .into();
                self.refresh.after_write(index);
                Ok(done)
            }
            None => self.upsert(index, points, request_id).await,
        }
    }

    /// The end of an import whose last message was logged at `sequence`: on a cluster node,
    /// waits while this node applies the import (see `Cluster::wait_imported`); the index's
    /// point count.
    pub async fn import_ended(&self, index: &Name, sequence: u64) -> Result<u64> {
        match &self.cluster {
            Some(c) if sequence > 0 => c.wait_imported(index, sequence).await,
            _ => Ok(self.catalog.get_index(index)?.point_count),
        }
    }

    /// Deletes points; the refresher hears of a delete that removed something.
    pub async fn delete_points(
        &self,
        index: &Name,
        ids: Vec<u64>,
        request_id: &str,
    ) -> Result<Written> {
        let done = match &self.cluster {
            Some(c) => c.delete_points(index, ids, request_id).await?.into(),
            None => {
                let (affected, point_count) = self.catalog.delete_points(index, ids).await?;
                Written {
                    affected,
                    point_count,
                    sequence: 0,
                }
            }
        };
        if done.affected > 0 {
            self.refresh.after_write(index);
        }
        Ok(done)
    }

    /// Read-your-writes: on a cluster node, waits until the index's write log is applied here
    /// up to `min_sequence` (bounded by `deadline`, the caller's, and
    /// `cluster::MAX_SEQUENCE_WAIT`). Nothing to wait for on a single node or for 0.
    pub async fn wait_applied(
        &self,
        index: &Name,
        min_sequence: u64,
        deadline: Option<Duration>,
    ) -> Result<()> {
        match &self.cluster {
            Some(c) if min_sequence > 0 => c.wait_applied(index, min_sequence, deadline).await,
            _ => Ok(()),
        }
    }

    /// PutProfile: on a cluster node one compare-and-swap in etcd.
    pub async fn put_profile(&self, profile: Profile) -> Result<Profile> {
        match &self.cluster {
            Some(c) => c.control().put_profile(profile).await,
            None => self.catalog.put_profile(profile).await,
        }
    }

    /// GetProfile: on a cluster node, from etcd.
    pub async fn get_profile(&self, name: &Name) -> Result<Profile> {
        match &self.cluster {
            Some(c) => c.control().get_profile(name).await,
            None => self.catalog.get_profile(name),
        }
    }

    /// ListProfiles: on a cluster node, from etcd.
    pub async fn list_profiles(&self, after: Option<&Name>, limit: usize) -> Result<Vec<Profile>> {
        match &self.cluster {
            Some(c) => c.control().list_profiles(after, limit).await,
            None => self.catalog.list_profiles(after, limit),
        }
    }

    /// DeleteProfile: on a cluster node one compare-and-swap in etcd.
    pub async fn delete_profile(&self, name: &Name) -> Result<()> {
        match &self.cluster {
            Some(c) => c.control().delete_profile(name).await,
            None => self.catalog.delete_profile(name).await,
        }
    }

    /// ActivateProfile. On a cluster node: the profile's desired generations are set in etcd
    /// (one transaction) and every live node rolls them out; answered when all serve them, or
    /// at `deadline` (the caller's) with each node's status.
    pub async fn activate_profile(
        &self,
        name: &Name,
        deadline: Option<Duration>,
    ) -> Result<Activation> {
        match &self.cluster {
            Some(c) => c.activate_profile(name, deadline).await,
            None => {
                let profile = self.catalog.get_profile(name)?;
                let gens = self.catalog.activate_profile(name).await?;
                Ok(Activation {
                    generations: profile
                        .indexes
                        .into_iter()
                        .map(|pi| pi.index)
                        .zip(gens)
                        .collect(),
                    nodes: Vec::new(),
                    rolled_out: true,
                })
            }
        }
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
    ///
    /// On a cluster node: one compare-and-swap in etcd, then this node's replica the same way
    /// (the other nodes drop theirs from their watch of the catalog).
    pub async fn delete_index(&self, name: &Name) -> Result<()> {
        match &self.cluster {
            Some(c) => c.delete_index(name).await,
            None => delete_local(&self.catalog, &self.jobs, &self.refresh, name).await,
        }
    }
}

/// Deletes the index on this node: its job (cancelled, its end recorded), its refresh state,
/// then the index (see [`App::delete_index`]).
async fn delete_local(
    catalog: &Catalog,
    jobs: &Jobs,
    refresh: &Refresher,
    name: &Name,
) -> Result<()> {
    let uid = catalog.handle(name)?.meta.uid;
    let why = "its index was deleted; nothing was promoted";
    jobs.cancel_index(name, uid, why).await;
    refresh.forget(name, uid).await;
    catalog.delete_index_uid(name, uid).await?;
    // A job that started while the first cancel ran stops now (its writes are refused).
    jobs.cancel_index(name, uid, why).await;
    refresh.forget(name, uid).await;
    Ok(())
}
