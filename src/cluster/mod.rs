//! A cluster node (docs/cluster.md): the index catalog and node membership in etcd, every
//! write in the index's NATS JetStream stream, and each node applying the streams to its own
//! store and graphs.
//!
//! Invariants:
//! - etcd's catalog is the truth of which indexes exist: every node creates and drops its
//!   local replicas to match it (at start, then from a watch), so every node takes every call.
//!   A replica is linked to its index's cluster uid (the catalog key's create revision), so an
//!   index deleted and re-created under the same name is never mistaken for the old one.
//! - A write is answered only after JetStream acknowledged it; it reaches the node's store and
//!   graph only through the log, in stream order, with the applied sequence in the same store
//!   transaction as the data (`store::Applied`). So every node applies the same writes in the
//!   same order, and a restarted node resumes right after what its store holds.
//! - A replica that must start from nothing (new, wiped, or behind a trim of its stream) is
//!   copied from a live peer and switched in by one store transaction, then follows the stream
//!   from the copy's sequence + 1; the streams are trimmed below what every live node still
//!   needs (`catchup.rs`).
//! - An engine that does not answer makes the call UNAVAILABLE within a few seconds, with a
//!   message naming the engine (`Error::Engine`); searches never need either engine.
//! - The node is joined by `App::open` (after the refresher; the server reports SERVING only
//!   once it has joined), and every task it starts (the apply loops, the catalog watch, the
//!   membership heartbeat) is spawned on the server's `Tasks` and ends at its cancellation:
//!   the heartbeat revokes the node's lease as it ends, so a node that shuts down leaves
//!   `ListNodes` at once (a node that dies leaves it when its lease expires).
//! - Only this module names etcd or NATS (`etcd.rs`, `log.rs`, `lab.rs`); it names no tonic type but
//!   the etcd client's own (a peer is reached through `catchup::StateSource`, which the edge
//!   implements).

pub mod catchup;
pub mod codec;
pub mod control;
pub mod etcd;
pub mod lab;
pub mod log;
pub mod publish;
mod rollout;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use crate::catalog::{Catalog, IndexView};
use crate::error::{Error, Result};
use crate::model::{now_millis, Name, NewIndex, Point};
use crate::store::WriteOp;
use crate::tasks::Tasks;

use self::control::Control;
use self::etcd::{Desired, IndexEntry, NodeGeneration, NodeRecord};
use self::log::WriteLog;
use self::publish::Publishers;

pub use self::rollout::{Activation, NodeStatus, MAX_ROLLOUT_WAIT};

/// Longest a Search with min_sequence waits for the node to apply it.
pub const MAX_SEQUENCE_WAIT: Duration = Duration::from_secs(30);
/// Longest a write waits, after JetStream acknowledged it, for this node to apply it (its
/// answer then carries the point count after it).
const WRITE_APPLY_WAIT: Duration = Duration::from_secs(10);
/// Outcomes of recent writes kept per index, for the answers of the writes this node logged.
const RECENT_OUTCOMES: usize = 4096;
/// How often a node renews its lease and reports its applied sequences.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// A node more than this many write-log messages (write batches) behind the last sequence of an
/// index's stream is *behind* on the index: its health name for the index is NOT_SERVING until
/// it has applied every message the stream held when it last looked (see [`LAG_CHECK`]).
pub const BEHIND_MESSAGES: u64 = 1000;
/// How often a node reads the last sequence of each index's stream, to know how far behind it is.
const LAG_CHECK: Duration = Duration::from_secs(1);
/// Longest the lease revoke at shutdown may take (it is within the shutdown grace).
const LEAVE_TIMEOUT: Duration = Duration::from_secs(1);

/// The cluster flags.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub etcd: Vec<String>,
    pub nats: Vec<String>,
    /// TLS and credentials towards etcd (`--etcd-ca`, `--etcd-cert`/`--etcd-key`,
    /// `--etcd-user`/`VECTORD_ETCD_PASSWORD`).
    pub etcd_access: EngineAccess,
    /// The same towards NATS (`--nats-…`).
    pub nats_access: EngineAccess,
    pub node_id: String,
    pub advertise_addr: String,
    /// A test hook (no flag sets it): this node's rollouts of the gated indexes wait, before
    /// building, until the gate opens, so a test can hold a node behind the desired generation.
    pub rollout_gate: Option<crate::autotune::jobs::JobGate>,
    /// A test hook (no flag sets it): this node's apply loops of the gated indexes wait, before
    /// applying anything, until the gate opens, so a test can hold a node behind on the log.
    pub apply_gate: Option<crate::autotune::jobs::JobGate>,
    /// Write-log messages behind past which the node is behind on an index:
    /// [`BEHIND_MESSAGES`] (no flag sets it; tests lower it).
    pub behind_messages: u64,
    /// `--log-keep-messages`: applied write-log messages every index's stream keeps below the
    /// smallest sequence a live node still needs ([`catchup::DEFAULT_LOG_KEEP_MESSAGES`]).
    pub log_keep_messages: u64,
    /// `--lab-log-max-dead`: records of the lab log that no longer change the lab (removed
    /// trials, deleted harnesses, the records that removed them) past which, and past the
    /// live ones' number, the log is trimmed ([`lab::DEFAULT_LAB_LOG_MAX_DEAD`]).
    pub lab_log_max_dead: u64,
    /// How this node fetches an index's copy from a peer (set by the server: the gRPC client
    /// is the edge's); None: it never copies, it replays the stream.
    pub peers: Option<catchup::Peers>,
    /// A test hook (no flag sets it): fail or hold this node's copies from peers.
    pub catchup_hook: Option<Arc<catchup::CatchUpHook>>,
}

/// How a node reaches one engine (etcd or NATS) beyond its URLs: TLS (on with https:// or
/// tls:// URLs) with the CA the engine's certificate must chain to and this node's client
/// certificate, and a user and password (docs/cluster.md "TLS and passwords").
#[derive(Clone, Default)]
pub struct EngineAccess {
    /// The CA (PEM file) the engine's certificate must chain to (None with TLS: the system's
    /// roots).
    pub ca: Option<PathBuf>,
    /// This node's certificate and key (PEM files), for an engine that asks for one.
    pub cert: Option<(PathBuf, PathBuf)>,
    pub user: Option<String>,
    pub password: Option<String>,
}

impl std::fmt::Debug for EngineAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineAccess")
            .field("ca", &self.ca)
            .field("cert", &self.cert)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "…"))
            .finish()
    }
}

impl EngineAccess {
    /// Checks the access to the engine of `flag` (`--etcd` or `--nats`) whose URLs are
    /// `urls`, TLS ones starting with `tls_scheme`: every URL with TLS or none, certificate
    /// files that can be read, a certificate with its key, a user with a password.
    pub fn check(&self, flag: &str, urls: &[String], tls_scheme: &str) -> Result<()> {
        let tls = urls.iter().filter(|u| u.starts_with(tls_scheme)).count();
        if tls != 0 && tls != urls.len() {
            return Err(Error::invalid(format!(
                "{flag}: every URL with {tls_scheme} or none"
            )));
        }
        if tls == 0 && (self.ca.is_some() || self.cert.is_some()) {
            return Err(Error::invalid(format!(
                "{flag}-ca and {flag}-cert need {tls_scheme} URLs in {flag}"
            )));
        }
        let files = self
            .ca
            .iter()
            .chain(self.cert.iter().flat_map(|(c, k)| [c, k]));
        for f in files {
            std::fs::metadata(f)
                .map_err(|e| Error::invalid(format!("{flag}: cannot read {}: {e}", f.display())))?;
        }
        if self.user.is_some() != self.password.is_some() {
            return Err(Error::invalid(format!(
                "{flag}-user and its password (VECTORD_{}_PASSWORD) go together",
                flag.trim_start_matches("--").to_uppercase()
            )));
        }
        Ok(())
    }

    /// Whether the URLs ask for TLS.
    pub fn tls(urls: &[String], tls_scheme: &str) -> bool {
        urls.iter().any(|u| u.starts_with(tls_scheme))
    }
}

impl ClusterConfig {
    /// The flags, checked: URLs (comma-separated) with their scheme, a node id like a name, an
    /// advertise address of HOST:PORT.
    pub fn parse(etcd: &str, nats: &str, node_id: &str, advertise_addr: &str) -> Result<Self> {
        let list = |flag: &str, v: &str, schemes: &[&str]| -> Result<Vec<String>> {
            let urls: Vec<String> = v
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(String::from)
                .collect();
            if urls.is_empty() {
                return Err(Error::invalid(format!("{flag} needs at least one URL")));
            }
            for u in &urls {
                if !schemes.iter().any(|s| u.starts_with(s)) {
                    return Err(Error::invalid(format!(
                        "{flag} {u:?}: URLs start with {}",
                        schemes.join(" or ")
                    )));
                }
            }
            Ok(urls)
        };
        let node = Name::parse("--node-id", node_id)?;
        if advertise_addr
            .rsplit_once(':')
            .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            return Err(Error::invalid(format!(
                "--advertise-addr {advertise_addr:?}: give HOST:PORT"
            )));
        }
        Ok(ClusterConfig {
            etcd: list("--etcd", etcd, &["http://", "https://"])?,
            nats: list("--nats", nats, &["nats://", "tls://"])?,
            etcd_access: EngineAccess::default(),
            nats_access: EngineAccess::default(),
            node_id: node.to_string(),
            advertise_addr: advertise_addr.to_string(),
            rollout_gate: None,
            apply_gate: None,
            behind_messages: BEHIND_MESSAGES,
            log_keep_messages: catchup::DEFAULT_LOG_KEEP_MESSAGES,
            lab_log_max_dead: lab::DEFAULT_LAB_LOG_MAX_DEAD,
            peers: None,
            catchup_hook: None,
        })
    }
}

/// Drops a local index (with its job and refresh state): DeleteIndex's steps on this node,
/// given by `App::open` over the parts built before the cluster.
pub type DropIndex = Arc<dyn Fn(Name) -> BoxFuture<'static, Result<()>> + Send + Sync>;

/// What a logged write did.
#[derive(Clone, Copy, Debug)]
pub struct WriteAck {
    /// Points upserted, or points that existed and were deleted (as applied on this node).
    pub affected: u64,
    pub point_count: u64,
    pub sequence: u64,
}

impl From<WriteAck> for crate::app::Written {
    fn from(w: WriteAck) -> Self {
        crate::app::Written {
            affected: w.affected,
            point_count: w.point_count,
            sequence: w.sequence,
        }
    }
}

/// Per cluster uid, (sequence, affected) of the newest applied writes, oldest first.
type RecentOutcomes = HashMap<u64, VecDeque<(u64, u64)>>;

struct Applier {
    uid: u64,
    cancel: CancellationToken,
}

pub struct Cluster {
    cfg: ClusterConfig,
    /// The control plane (profiles, promotions, desired generations, job leases), shared with
    /// the registry and the jobs.
    control: Arc<Control>,
    etcd: etcd_client::Client,
    /// The node's current membership lease (0 before it registered).
    lease: AtomicI64,
    /// Per index name, its desired generation as last read from etcd.
    desired: Mutex<HashMap<String, Desired>>,
    /// Per index name, the rollout running on this node: (desired number, its stop token).
    rolling: Mutex<HashMap<String, (u64, CancellationToken)>>,
    /// Per index name, why this node's last rollout attempt failed.
    rollout_errors: Mutex<HashMap<String, String>>,
    log: Arc<WriteLog>,
    /// Upserts without a request_id, grouped into one write-log message per index.
    publishers: Publishers,
    /// The cluster's lab log (harnesses and trials), mirrored into the store.
    lab: Arc<lab::LabLog>,
    catalog: Arc<Catalog>,
    drop_index: DropIndex,
    /// The running apply loop of each index.
    appliers: Mutex<HashMap<Name, Applier>>,
    /// Serialises changes of the local replicas (the watch and the DDL calls of this node).
    reconciling: tokio::sync::Mutex<()>,
    /// Recent outcomes per cluster uid: (sequence, affected), oldest first.
    recent: Arc<Mutex<RecentOutcomes>>,
    /// The server's tasks: every task of the node is spawned here.
    tasks: Tasks,
    /// A child of the server's stop token (cancelled alone when a join attempt fails).
    stop: CancellationToken,
    start_time_ms: u64,
}

impl Cluster {
    /// Joins the cluster: connects to both engines, matches the local replicas to the catalog,
    /// starts applying every index's log, watching the catalog and holding the node's
    /// registration. While an engine does not answer it waits (logging why, every few
    /// seconds) until it does or the server stops. Its tasks are the catalog's `Tasks`.
    pub async fn join(
        cfg: ClusterConfig,
        control: Arc<Control>,
        lab: Arc<lab::LabLog>,
        catalog: Arc<Catalog>,
        drop_index: DropIndex,
    ) -> Result<Arc<Self>> {
        let tasks = catalog.tasks().clone();
        let stop = tasks.stop_token();
        let store = catalog.store().clone();
        match store.cluster_node()? {
            Some(id) if id != cfg.node_id => {
                return Err(Error::invalid(format!(
                    "data dir {} belongs to cluster node {id:?}, not --node-id {:?}: give each node its own data dir",
                    store.dir().display(),
                    cfg.node_id
                )))
            }
            Some(_) => {}
            None if !catalog.index_names().is_empty() => {
                return Err(Error::invalid(format!(
                    "data dir {} holds a single node's indexes: a cluster node starts on an empty data dir (its indexes come from the cluster)",
                    store.dir().display()
                )))
            }
            None => {
                store.set_cluster_node(&cfg.node_id)?;
                store.flush().await?;
            }
        }
        let mut attempt = 0u64;
        loop {
            let res = Self::connect(&cfg, &control, &lab, &catalog, &drop_index, &tasks).await;
            match res {
                Ok(c) => return Ok(c),
                Err(e) if refused(&e) => {
                    // Wrong credentials or certificates: waiting does not mend them.
                    return Err(e);
                }
                Err(e) => {
                    if attempt.is_multiple_of(5) {
                        tracing::warn!(error = %e, "cluster node waiting for its engines (etcd, NATS): NOT_SERVING until they answer");
                    }
                    attempt += 1;
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return Err(Error::Unavailable("shutting down before the cluster's engines (etcd, NATS) answered".into())),
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    async fn connect(
        cfg: &ClusterConfig,
        control: &Arc<Control>,
        lab: &Arc<lab::LabLog>,
        catalog: &Arc<Catalog>,
        drop_index: &DropIndex,
        tasks: &Tasks,
    ) -> Result<Arc<Self>> {
        let etcd = control.etcd();
        let log = Arc::new(WriteLog::connect(&cfg.nats, &cfg.nats_access, &cfg.node_id).await?);
        let stop = tasks.stop_token().child_token();
        let publishers = Publishers::new(
            log.clone(),
            cfg.node_id.clone(),
            tasks.clone(),
            stop.clone(),
        );
        let cluster = Arc::new(Cluster {
            cfg: cfg.clone(),
            control: control.clone(),
            etcd,
            lease: AtomicI64::new(0),
            desired: Default::default(),
            rolling: Default::default(),
            rollout_errors: Default::default(),
            log,
            publishers,
            lab: lab.clone(),
            catalog: catalog.clone(),
            drop_index: drop_index.clone(),
            appliers: Default::default(),
            reconciling: Default::default(),
            recent: Default::default(),
            tasks: tasks.clone(),
            stop,
            start_time_ms: now_millis(),
        });
        let joined = async {
            let rev = cluster.reconcile().await?;
            let desired_rev = cluster.load_desired().await?;
            let lease = cluster.register().await?;
            Ok::<_, Error>((rev, desired_rev, lease))
        };
        let (rev, desired_rev, lease) = match joined.await {
            Ok(x) => x,
            Err(e) => {
                // The apply loops this attempt started stop: the next attempt starts its own.
                cluster.stop.cancel();
                return Err(e);
            }
        };
        tasks.spawn(cluster.clone().watch(rev));
        tasks.spawn(cluster.clone().watch_desired(desired_rev));
        tasks.spawn(cluster.clone().heartbeat(lease));
        tasks.spawn(cluster.clone().trim_loop());
        tasks.spawn(control.clone().follow_promotions(cluster.stop.clone()));
        tasks.spawn(control.clone().follow_refresh(cluster.stop.clone()));
        tasks.spawn(lab::mirror_loop(
            cluster.clone(),
            cluster.lab.clone(),
            cluster.stop.clone(),
        ));
        tasks.spawn(lab::trim_loop(
            cluster.clone(),
            cluster.lab.clone(),
            cfg.lab_log_max_dead,
            cluster.stop.clone(),
        ));
        tracing::info!(node = %cfg.node_id, advertise = %cfg.advertise_addr, indexes = cluster.appliers.lock().len(), "joined the cluster");
        Ok(cluster)
    }

    fn etcd(&self) -> etcd_client::Client {
        self.etcd.clone()
    }

    /// The control plane this node shares through etcd.
    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }

    /// Matches the local replicas to the catalog; the revision it was read at.
    async fn reconcile(self: &Arc<Self>) -> Result<i64> {
        let (entries, rev) = etcd::list_indexes(&mut self.etcd(), &self.cfg.etcd).await?;
        let wanted: HashMap<String, u64> = entries
            .iter()
            .map(|(e, uid)| (e.name.clone(), *uid))
            .collect();
        for name in self.catalog.index_names() {
            let keep = self
                .catalog
                .handle(&name)
                .ok()
                .and_then(|h| h.cluster_uid)
                .is_some_and(|uid| wanted.get(name.as_str()) == Some(&uid));
            if !keep {
                self.drop_local(&name).await?;
            }
        }
        for (entry, uid) in entries {
            self.ensure_local(&entry, uid).await?;
        }
        Ok(rev)
    }

    /// The local replica of the catalog entry, created if missing (or replacing one of an
    /// older incarnation), with its apply loop running.
    async fn ensure_local(self: &Arc<Self>, entry: &IndexEntry, uid: u64) -> Result<IndexView> {
        let name = Name::parse("name", &entry.name)?;
        let _r = self.reconciling.lock().await;
        if let Ok(h) = self.catalog.handle(&name) {
            if h.cluster_uid != Some(uid) {
                self.drop_local_locked(&name).await?;
            }
        }
        if self.catalog.handle(&name).is_err() {
            let new = NewIndex {
                name: name.clone(),
                dimension: entry.dimension,
                metric: entry.metric,
                default_config: entry.default_config,
                engine: entry.engine,
            };
            self.catalog
                .create_replica(new, uid, entry.create_time_ms)
                .await?;
            tracing::info!(index = %name, uid, "created the local replica of a cluster index");
        }
        let handle = self.catalog.handle(&name)?;
        let mut appliers = self.appliers.lock();
        let running = appliers.get(&name).is_some_and(|a| a.uid == uid);
        if !running {
            let cancel = self.stop.child_token();
            if let Some(old) = appliers.insert(
                name.clone(),
                Applier {
                    uid,
                    cancel: cancel.clone(),
                },
            ) {
                old.cancel.cancel();
            }
            let recent = self.recent.clone();
            let on_applied: log::OnApplied = Arc::new(move |uid, outcomes| {
                let mut recent = recent.lock();
                let q = recent.entry(uid).or_default();
                q.extend(outcomes.iter().copied());
                while q.len() > RECENT_OUTCOMES {
                    q.pop_front();
                }
            });
            self.tasks.spawn(self.clone().follow_log(
                name.clone(),
                uid,
                cancel.clone(),
                on_applied,
            ));
            self.tasks
                .spawn(self.clone().follow_lag(handle, uid, cancel));
        }
        drop(appliers);
        self.check_rollout(name.as_str(), true);
        self.catalog.get_index(&name)
    }

    /// Follows how far behind this node is on the index's write log (the stream's first and
    /// last sequence, read every [`LAG_CHECK`], against what the node applied) until `cancel`,
    /// and says so in the index's rollout (its health): behind past `behind_messages`, or when
    /// the stream no longer holds the next message the replica needs (it must be copied from a
    /// peer); caught up once it applied everything up to the last sequence read.
    async fn follow_lag(
        self: Arc<Self>,
        handle: Arc<crate::catalog::IndexHandle>,
        uid: u64,
        cancel: CancellationToken,
    ) {
        let index = handle.meta.name.clone();
        let name = index.to_string();
        let mut applied = handle.applied_updates();
        let mut current = Arc::downgrade(&handle);
        drop(handle);
        let mut every = tokio::time::interval(LAG_CHECK);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut first, mut end) = (0u64, 0u64);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = every.tick() => match self.log.bounds(uid, 0).await {
                    Ok((f, last)) => {
                        first = first.max(f);
                        end = end.max(last);
                    }
                    Err(e) => tracing::debug!(index = %name, error = %e, "reading the write log's last sequence failed"),
                },
                changed = applied.changed(), if current.strong_count() > 0 => {
                    if changed.is_err() {
                        current = std::sync::Weak::new();
                    }
                },
            }
            // The replica's handle is replaced by a copy from a peer: follow the new one; none
            // of this incarnation any more: the index is gone.
            match self.catalog.handle(&index) {
                Ok(h) if h.cluster_uid == Some(uid) => {
                    if !std::ptr::eq(current.as_ptr(), Arc::as_ptr(&h)) {
                        applied = h.applied_updates();
                        current = Arc::downgrade(&h);
                    }
                }
                _ => return,
            }
            let done = *applied.borrow_and_update();
            let lag = end.saturating_sub(done);
            // What the rollout says (not a copy of it here): until the index's rollout exists
            // (the replica just created), a change is tried again at the next look.
            let behind = self.control.rollout(&name).log_behind;
            // A replica whose next message was trimmed is behind until a copy from a peer
            // replaces it (catchup.rs).
            let now = done + 1 < first
                || if behind {
                    lag > 0
                } else {
                    lag > self.cfg.behind_messages
                };
            if now != behind {
                if now {
                    tracing::warn!(index = %name, applied = done, last = end, "behind on the index's write log: NOT_SERVING for the index until caught up");
                } else {
                    tracing::info!(index = %name, applied = done, "caught up on the index's write log");
                }
                self.control.set_rollout_if_known(&name, |r| {
                    let changed = r.log_behind != now;
                    r.log_behind = now;
                    changed
                });
            }
        }
    }

    async fn drop_local(&self, name: &Name) -> Result<()> {
        let _r = self.reconciling.lock().await;
        self.drop_local_locked(name).await
    }

    async fn drop_local_locked(&self, name: &Name) -> Result<()> {
        let uid = self.catalog.handle(name).ok().and_then(|h| h.cluster_uid);
        if let Some(a) = self.appliers.lock().remove(name) {
            a.cancel.cancel();
        }
        if let Some(uid) = uid {
            self.recent.lock().remove(&uid);
            self.publishers.forget(uid);
        }
        self.forget_rollout(name.as_str());
        match (self.drop_index)(name.clone()).await {
            Ok(()) | Err(Error::NotFound { .. }) => {
                tracing::info!(index = %name, "dropped the local replica of an index the cluster no longer has");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Follows the catalog from revision `rev`; after any break (etcd away, a compacted
    /// revision), reconciles again from a fresh list.
    async fn watch(self: Arc<Self>, mut rev: i64) {
        loop {
            if let Err(e) = self.watch_from(&mut rev).await {
                tracing::warn!(error = %e, "watching the catalog in etcd stopped; resyncing");
            }
            loop {
                tokio::select! {
                    _ = self.stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                match self.reconcile().await {
                    Ok(r) => {
                        rev = r;
                        break;
                    }
                    Err(e) => tracing::debug!(error = %e, "resync of the catalog failed"),
                }
            }
        }
    }

    async fn watch_from(self: &Arc<Self>, rev: &mut i64) -> Result<()> {
        let what = "watching the catalog";
        let mut watch = etcd::Watch::open(
            &mut self.etcd(),
            &self.cfg.etcd,
            what,
            etcd::indexes_prefix(),
            true,
            *rev + 1,
        )
        .await?;
        let prefix = etcd::indexes_prefix();
        loop {
            let (changes, revision) = tokio::select! {
                _ = self.stop.cancelled() => return Ok(()),
                r = watch.changes(&prefix) => r?,
            };
            for c in changes {
                let name = c.name.as_str();
                match c.decode::<IndexEntry>() {
                    Some(Ok(entry)) => {
                        if let Err(e) = self.ensure_local(&entry, c.create_revision as u64).await {
                            tracing::error!(index = name, error = %e, "creating the local replica failed");
                        }
                    }
                    Some(Err(e)) => {
                        tracing::error!(key = c.key, error = %e, "unreadable catalog entry in etcd: ignored")
                    }
                    None => {
                        if let Ok(n) = Name::parse("name", name) {
                            if let Err(e) = self.drop_local(&n).await {
                                tracing::error!(index = name, error = %e, "dropping the local replica failed");
                            }
                        }
                    }
                }
            }
            *rev = (*rev).max(revision);
        }
    }

    fn node_record(&self) -> NodeRecord {
        let mut applied = BTreeMap::new();
        let mut generations = BTreeMap::new();
        let errors = self.rollout_errors.lock().clone();
        for name in self.catalog.index_names() {
            if let Ok(h) = self.catalog.handle(&name) {
                applied.insert(name.to_string(), h.applied());
                generations.insert(
                    name.to_string(),
                    NodeGeneration {
                        served: self.control.rollout(name.as_str()).served,
                        local: h.active().meta.number,
                        error: errors.get(name.as_str()).cloned().unwrap_or_default(),
                    },
                );
            }
        }
        NodeRecord {
            node_id: self.cfg.node_id.clone(),
            advertise_addr: self.cfg.advertise_addr.clone(),
            start_time_ms: self.start_time_ms,
            applied,
            generations,
        }
    }

    /// Registers the node under a fresh lease; the lease id.
    async fn register(&self) -> Result<i64> {
        let mut etcd = self.etcd();
        let urls = &self.cfg.etcd;
        let lease = etcd::bounded!(
            urls,
            "granting the node's lease",
            etcd.lease_grant(etcd::LEASE_TTL_SECS, None),
        )
        .await?
        .id();
        etcd::put_node(&mut etcd, urls, &self.node_record(), lease).await?;
        self.lease.store(lease, Ordering::Release);
        Ok(lease)
    }

    /// Renews the node's lease and reports its applied sequences when they changed; registers
    /// again (a new lease) after losing it. At the server's stop, revokes the lease (the node
    /// leaves the membership at once; best effort, bounded by [`LEAVE_TIMEOUT`]) and ends.
    async fn heartbeat(self: Arc<Self>, mut lease: i64) {
        let mut reported = self.node_record();
        let mut failing = false;
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => {
                    self.leave(lease).await;
                    return;
                }
                _ = tokio::time::sleep(HEARTBEAT) => {}
            }
            let mut etcd = self.etcd();
            let urls = &self.cfg.etcd;
            let kept = etcd::keep_alive(&mut etcd, urls, "renewing the node's lease", lease).await;
            let now = self.node_record();
            let res = match kept {
                Ok(ttl) if ttl > 0 => {
                    if now != reported {
                        etcd::put_node(&mut etcd, urls, &now, lease).await
                    } else {
                        Ok(())
                    }
                }
                Ok(_) => {
                    tracing::warn!("the node's etcd lease expired: registering again");
                    match self.register().await {
                        Ok(l) => {
                            lease = l;
                            Ok(())
                        }
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(e),
            };
            match res {
                Ok(()) => {
                    if failing {
                        tracing::info!("the node's registration in etcd is kept again");
                    }
                    failing = false;
                    reported = now;
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "keeping the node's registration failed; retrying every 2 s");
                    }
                    failing = true;
                }
            }
        }
    }

    /// Gives up the node's registration: revokes its lease, which deletes its record.
    async fn leave(&self, lease: i64) {
        let mut etcd = self.etcd();
        match tokio::time::timeout(LEAVE_TIMEOUT, etcd.lease_revoke(lease)).await {
            Ok(Ok(_)) => tracing::info!(node = %self.cfg.node_id, "left the cluster (lease revoked)"),
            Ok(Err(e)) => tracing::warn!(error = %e, "revoking the node's lease failed: its record expires with the lease"),
            Err(_) => tracing::warn!("etcd did not answer the lease revoke in time: the node's record expires with the lease"),
        }
    }

    // ---- the calls ----

    /// CreateIndex: one compare-and-swap in etcd; answered once this node's replica exists.
    pub async fn create_index(self: &Arc<Self>, new: NewIndex) -> Result<IndexView> {
        // The write log is needed for every write: refuse now rather than create an index
        // nothing can be written to.
        if self.log.client.connection_state() != async_nats::connection::State::Connected {
            return Err(Error::Unavailable(format!(
                "NATS JetStream ({}) is not connected: the index was not created; retry later",
                self.cfg.nats.join(",")
            )));
        }
        let entry = IndexEntry {
            name: new.name.to_string(),
            dimension: new.dimension,
            metric: new.metric,
            default_config: new.default_config,
            create_time_ms: now_millis(),
            engine: Some(new.engine.unwrap_or(self.catalog.default_engine())),
            shards: 1,
        };
        let uid = etcd::create_index(&mut self.etcd(), &self.cfg.etcd, &entry)
            .await?
            .ok_or_else(|| Error::AlreadyExists {
                what: "index",
                name: new.name.to_string(),
            })?;
        if let Err(e) = self.log.ensure_stream(uid, 0).await {
            // Created again by the first write or apply loop that finds it missing.
            tracing::warn!(index = %new.name, error = %e, "creating the write log failed; it is created when first used");
        }
        tracing::info!(index = %new.name, uid, "created index in the cluster");
        self.ensure_local(&entry, uid).await
    }

    /// DeleteIndex: one compare-and-swap in etcd (of the incarnation it read), then this node's
    /// replica and the write log; the other nodes drop theirs from their watch.
    pub async fn delete_index(self: &Arc<Self>, name: &Name) -> Result<()> {
        let urls = &self.cfg.etcd;
        let (_, uid) = etcd::get_index(&mut self.etcd(), urls, name.as_str())
            .await?
            .ok_or_else(|| Error::not_found("index", name.as_str()))?;
        if !etcd::delete_index(&mut self.etcd(), urls, name.as_str(), uid).await? {
            return Err(Error::not_found("index", name.as_str()));
        }
        self.drop_local(name).await?;
        if let Err(e) = self.log.delete_stream(uid, 0).await {
            tracing::warn!(index = %name, uid, error = %e, "deleting the write log failed: remove stream {} by hand", log::stream_name(uid, 0));
        }
        if let Err(e) = self.lab.purge_index(uid).await {
            // Its records stay in the lab log; every node skips them (the index is gone).
            tracing::warn!(index = %name, uid, error = %e, "purging the index's lab records failed: purge subject {} of stream {} by hand", lab::subject(uid), lab::STREAM);
        }
        tracing::info!(index = %name, uid, "deleted index from the cluster");
        Ok(())
    }

    fn msg_id(&self, request_id: &str) -> String {
        if request_id.is_empty() {
            format!("{}-{:032x}", self.cfg.node_id, rand::random::<u128>())
        } else {
            format!("req-{request_id}")
        }
    }

    /// UpsertPoints and ImportPoints messages: checked here, logged, answered once JetStream
    /// has the write (and, within a bound, once this node applied it).
    pub async fn upsert(
        &self,
        name: &Name,
        points: Vec<Point>,
        request_id: &str,
    ) -> Result<WriteAck> {
        self.upsert_with(name, points, request_id, true).await
    }

    /// [`upsert`](Self::upsert); with `wait_applied` false, answered once JetStream has it,
    /// without waiting for this node to apply it (an import's messages: the import waits
    /// once, for its last). The answer's point count is then the count before it.
    pub async fn upsert_with(
        &self,
        name: &Name,
        points: Vec<Point>,
        request_id: &str,
        wait_applied: bool,
    ) -> Result<WriteAck> {
        let (handle, unique) = self.catalog.prepare_upsert(name, points)?;
        let upserted = unique.len() as u64;
        self.logged(
            &handle,
            WriteOp::Upsert(unique),
            request_id,
            Some(upserted),
            wait_applied,
        )
        .await
    }

    /// DeletePoints, like [`upsert`](Self::upsert).
    pub async fn delete_points(
        &self,
        name: &Name,
        ids: Vec<u64>,
        request_id: &str,
    ) -> Result<WriteAck> {
        if ids.is_empty() {
            return Err(Error::invalid("ids is empty: send at least one id"));
        }
        let handle = self.catalog.handle(name)?;
        self.logged(&handle, WriteOp::Delete(ids), request_id, None, true)
            .await
    }

    async fn logged(
        &self,
        handle: &Arc<crate::catalog::IndexHandle>,
        op: WriteOp,
        request_id: &str,
        affected: Option<u64>,
        wait_applied: bool,
    ) -> Result<WriteAck> {
        let uid = handle.cluster_uid.ok_or_else(|| {
            Error::Unavailable(format!(
                "index {} is not linked to the cluster on this node yet; retry",
                handle.meta.name
            ))
        })?;
        let (sequence, retried) = match op {
            // Upserts without a request_id share messages (publish.rs).
            WriteOp::Upsert(points) if request_id.is_empty() => {
                (self.publishers.upsert(uid, points).await?, false)
            }
            op => self.log.publish(uid, &op, &self.msg_id(request_id)).await?,
        };
        // A retry's answer is the first write's outcome, known once applied: it waits.
        if !wait_applied && !retried {
            return Ok(WriteAck {
                affected: affected.unwrap_or(0),
                point_count: handle.point_count(),
                sequence,
            });
        }
        if !handle.wait_applied(sequence, WRITE_APPLY_WAIT).await {
            tracing::warn!(index = %handle.meta.name, sequence, applied = handle.applied(), "a logged write is not applied on this node yet: answering without its outcome");
        }
        let outcome = self.recent.lock().get(&uid).and_then(|q| {
            q.iter()
                .rev()
                .find(|(s, _)| *s == sequence)
                .map(|(_, a)| *a)
        });
        // A retry (same request_id) answers with what the first write did, when still known.
        let affected = if retried {
            outcome
        } else {
            affected.or(outcome)
        };
        Ok(WriteAck {
            affected: affected.unwrap_or(0),
            point_count: handle.point_count(),
            sequence,
        })
    }

    /// Read-your-writes: waits until this node has applied the index's log up to `seq`, at
    /// most `deadline` (the caller's) and [`MAX_SEQUENCE_WAIT`].
    pub async fn wait_applied(
        &self,
        name: &Name,
        seq: u64,
        deadline: Option<Duration>,
    ) -> Result<()> {
        // A tenth of the caller's deadline is left to answer in, so the caller gets this
        // answer rather than its own timeout.
        let budget = deadline.map(|d| d.saturating_sub(d / 10));
        let wait = budget.map_or(MAX_SEQUENCE_WAIT, |d| d.min(MAX_SEQUENCE_WAIT));
        let started = tokio::time::Instant::now();
        // A write at `seq` proves the index exists: this node's catalog may be behind.
        let handle = self.catalog.wait_handle(name, wait).await?;
        if handle.applied() >= seq {
            return Ok(());
        }
        let wait = wait.saturating_sub(started.elapsed());
        if handle.wait_applied(seq, wait).await {
            return Ok(());
        }
        let msg = format!(
            "node {} has applied index {}'s write log up to sequence {}, not yet min_sequence {seq}, after waiting {} ms",
            self.cfg.node_id,
            name,
            handle.applied(),
            wait.as_millis()
        );
        if budget.is_some_and(|d| d <= MAX_SEQUENCE_WAIT) {
            Err(Error::DeadlineExceeded(msg))
        } else {
            Err(Error::Unavailable(format!(
                "{msg} (the most a search waits): retry, or ask another node"
            )))
        }
    }

    /// The end of an import whose messages were logged without waiting (`upsert_with`):
    /// waits until this node has applied the log up to `seq` for as long as it keeps applying
    /// (each [`WRITE_APPLY_WAIT`] must see progress), so the import answers with its points
    /// searchable here; the index's point count then.
    pub async fn wait_imported(&self, name: &Name, seq: u64) -> Result<u64> {
        let handle = self.catalog.handle(name)?;
        loop {
            let before = handle.applied();
            if handle.wait_applied(seq, WRITE_APPLY_WAIT).await {
                break;
            }
            if handle.applied() == before {
                tracing::warn!(index = %name, sequence = seq, applied = before, "an import is logged but not applied on this node yet: answering without waiting more");
                break;
            }
        }
        Ok(handle.point_count())
    }

    /// ListNodes.
    pub async fn list_nodes(&self) -> Result<Vec<NodeRecord>> {
        etcd::list_nodes(&mut self.etcd(), &self.cfg.etcd).await
    }
}

/// Whether an engine refused this node (a password, a permission or a certificate): a
/// configuration error that no retry mends. The engines' clients tell it in their messages
/// only (etcd's gRPC status text, NATS's error kind as text).
pub fn refused(e: &Error) -> bool {
    let Error::Engine { detail, .. } = e else {
        return false;
    };
    let d = detail.to_ascii_lowercase();
    [
        "authentication failed",
        "authentication is not enabled",
        "permission denied",
        "authorization violation",
        "certificate",
    ]
    .iter()
    .any(|m| d.contains(m))
}
