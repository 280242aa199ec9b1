//! The control plane a cluster node shares through etcd: profiles, the promotion registry,
//! each index's desired active generation and the autotune job leases.
//!
//! Invariants:
//! - Every change is ONE etcd transaction: the keys it depends on are read at one revision
//!   ([`etcd::read`]), the change is computed from them, and it is committed only if each of
//!   them is still as read ([`etcd::unchanged`], [`etcd::incarnation`]). A commit that loses
//!   to another node's change is retried from a fresh read, at most [`CAS_ATTEMPTS`] times
//!   (then ABORTED), so two racing promotes on two nodes leave one history with both.
//! - A change made for an autotune job carries its fence (the job lease key's create
//!   revision) as one more compare of the same transaction: a job whose lease expired or was
//!   revoked (its key is gone, or is another job's) can never promote or activate.
//! - Reads answer from etcd; every call is bounded (`etcd::TIMEOUT`) and UNAVAILABLE naming
//!   etcd when it does not answer (`Error::Engine`).
//! - The etcd client connects lazily: the control plane exists before the node has joined
//!   (the registry and the jobs are built with it), and its calls fail fast until etcd
//!   answers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, PutOptions, TxnOp};
use tokio_util::sync::CancellationToken;

use super::etcd::{self, Desired, JobLeaseEntry, PromotionEntry, Read, TrialRef};
use super::ClusterConfig;
use crate::autotune::jobs::{
    job_id, job_seq, ClusterJobs, JobLease, JobRecord, JobState, LeaseHolder,
};
use crate::error::{Error, Result};
use crate::model::{now_millis, ConfigSource, HnswConfig, Name, Profile};
use crate::promotion::{Fence, Promotion, Record, Shared};
use crate::refresh::{Change, SharedRecord, SharedRefresh};
use crate::tasks::Tasks;

/// Commits lost to concurrent changes before a change is ABORTED.
pub const CAS_ATTEMPTS: u32 = 16;
/// A job lease outlives a node that died holding it by at most this.
pub const JOB_LEASE_TTL_SECS: i64 = 10;
/// How often a job's node renews its lease.
const JOB_LEASE_RENEW: Duration = Duration::from_secs(2);
/// How long CancelJob of another node's job waits for the job's end before it answers with
/// the record as it is (as a single node's CancelJob does).
pub const REMOTE_CANCEL_WAIT: Duration = Duration::from_secs(30);

/// An index's rollout on this node: the desired generation number (0: none set) and the one
/// it serves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rollout {
    pub desired: u64,
    pub served: u64,
    /// The desired generation number whose last build attempt on this node failed (0: none).
    pub failed: u64,
    /// Whether the node is behind on the index's write log (see `cluster::BEHIND_MESSAGES`).
    pub log_behind: bool,
}

impl Rollout {
    /// Whether the node serves the generation the cluster wants for the index.
    pub fn current(&self) -> bool {
        self.served >= self.desired
    }

    /// Whether the node is fit to serve the index: it serves the desired generation and is
    /// not behind on the write log (the index's health name is SERVING).
    pub fn serving(&self) -> bool {
        self.current() && !self.log_behind
    }
}

pub struct Control {
    cfg: ClusterConfig,
    etcd: Client,
    tasks: Tasks,
    /// Per index name, this node's rollout (set by the node's watch of the desired
    /// generations, `rollout.rs`): what jobs wait on, and what per-index health reports.
    rollouts: tokio::sync::watch::Sender<BTreeMap<String, Rollout>>,
    /// Per index name, its current promotion as this node last saw it in etcd, with the
    /// record's mod revision (`follow_promotions`, and this node's own changes): what the node
    /// reports without asking etcd (its metrics).
    promoted: parking_lot::Mutex<BTreeMap<String, (i64, Option<Promotion>)>>,
    /// Per index name, its refresh record as this node last saw it in etcd
    /// (`follow_refresh`, and this node's own changes), and the record's mod revision.
    refresh: tokio::sync::watch::Sender<BTreeMap<String, SharedRecord>>,
    refresh_revs: parking_lot::Mutex<BTreeMap<String, i64>>,
}

fn conflict(what: &str) -> Error {
    Error::Conflict(format!(
        "{what}: lost {CAS_ATTEMPTS} times to concurrent changes by other nodes; retry"
    ))
}

/// A short random pause before the next attempt, growing with `attempt`.
async fn backoff(attempt: u32) {
    tracing::debug!(
        attempt,
        "a compare-and-swap in etcd lost to another node's change; retrying from a fresh read"
    );
    let ms = 5 + rand::random::<u64>() % (10 * u64::from(attempt.min(10)) + 10);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

impl Control {
    /// The control plane of node `cfg.node_id`; etcd is connected at the first call.
    pub async fn connect(cfg: &ClusterConfig, tasks: Tasks) -> Result<Arc<Self>> {
        let mut opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(etcd::TIMEOUT)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3));
        let access = &cfg.etcd_access;
        if let (Some(user), Some(password)) = (&access.user, &access.password) {
            opts = opts.with_user(user.clone(), password.clone());
        }
        if super::EngineAccess::tls(&cfg.etcd, "https://") {
            let read = |f: &std::path::Path| {
                std::fs::read(f).map_err(|e| {
                    Error::invalid(format!("--etcd: cannot read {}: {e}", f.display()))
                })
            };
            let mut tls = etcd_client::TlsOptions::new();
            tls = match &access.ca {
                Some(ca) => tls.ca_certificate(etcd_client::Certificate::from_pem(read(ca)?)),
                None => tls.with_native_roots(),
            };
            if let Some((cert, key)) = &access.cert {
                tls = tls.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
            }
            opts = opts.with_tls(tls);
        }
        let etcd = etcd::bounded!(
            &cfg.etcd,
            "connecting",
            Client::connect(&cfg.etcd, Some(opts.clone())),
        )
        .await?;
        Ok(Arc::new(Control {
            cfg: cfg.clone(),
            etcd,
            tasks,
            rollouts: tokio::sync::watch::channel(BTreeMap::new()).0,
            promoted: Default::default(),
            refresh: tokio::sync::watch::channel(BTreeMap::new()).0,
            refresh_revs: Default::default(),
        }))
    }

    pub fn etcd(&self) -> Client {
        self.etcd.clone()
    }

    pub fn urls(&self) -> &[String] {
        &self.cfg.etcd
    }

    pub fn node_id(&self) -> &str {
        &self.cfg.node_id
    }

    /// This node's rollout of every index, as it changes.
    pub fn rollouts(&self) -> tokio::sync::watch::Receiver<BTreeMap<String, Rollout>> {
        self.rollouts.subscribe()
    }

    pub fn rollout(&self, index: &str) -> Rollout {
        self.rollouts
            .borrow()
            .get(index)
            .copied()
            .unwrap_or_default()
    }

    /// Changes this node's rollout of `index` (None: the index is gone).
    pub(super) fn set_rollout(&self, index: &str, f: impl FnOnce(&mut Rollout) -> bool) {
        self.rollouts.send_if_modified(|m| {
            let new = !m.contains_key(index);
            let r = m.entry(index.to_string()).or_default();
            f(r) || new
        });
    }

    /// Changes this node's rollout of `index` only if the node has it.
    pub(super) fn set_rollout_if_known(&self, index: &str, f: impl FnOnce(&mut Rollout) -> bool) {
        self.rollouts
            .send_if_modified(|m| m.get_mut(index).is_some_and(f));
    }

    pub(super) fn forget_rollout(&self, index: &str) {
        self.rollouts
            .send_if_modified(|m| m.remove(index).is_some());
    }

    /// Notes index `name`'s current promotion as of revision `rev` (an older one is ignored;
    /// None with `gone`: the record was deleted).
    fn note_promoted(&self, name: &str, rev: i64, current: Option<Promotion>, gone: bool) {
        let mut promoted = self.promoted.lock();
        if promoted.get(name).is_some_and(|(r, _)| *r > rev) {
            return;
        }
        if gone {
            promoted.remove(name);
        } else {
            promoted.insert(name.to_string(), (rev, current));
        }
    }

    /// Follows the promotion records in etcd (a list, then a watch from its revision; after
    /// any break, again every second) until `stop`, keeping what [`Shared::known_current`]
    /// answers.
    pub(super) async fn follow_promotions(self: Arc<Self>, stop: CancellationToken) {
        let what = "following the promotion records";
        follow_loop(what, &stop, || {
            self.follow_records::<PromotionEntry>(
                what,
                etcd::promotions_prefix(),
                |all| {
                    *self.promoted.lock() = all
                        .into_iter()
                        .map(|(name, (rev, e))| (name, (rev, e.record.current)))
                        .collect();
                },
                |name, rev, e| match e {
                    Some(e) => self.note_promoted(name, rev, e.record.current, false),
                    None => self.note_promoted(name, rev, None, true),
                },
            )
        })
        .await
    }

    /// Follows the refresh records in etcd (as [`Control::follow_promotions`]) until `stop`,
    /// keeping what [`SharedRefresh::records`] shows.
    pub(super) async fn follow_refresh(self: Arc<Self>, stop: CancellationToken) {
        let what = "following the refresh records";
        follow_loop(what, &stop, || {
            self.follow_records::<SharedRecord>(
                what,
                etcd::refresh_prefix(),
                |all| {
                    *self.refresh_revs.lock() =
                        all.iter().map(|(n, (rev, _))| (n.clone(), *rev)).collect();
                    self.refresh
                        .send_replace(all.into_iter().map(|(n, (_, r))| (n, r)).collect());
                },
                |name, rev, rec| self.note_refresh(name, rev, rec),
            )
        })
        .await
    }

    /// Notes index `name`'s refresh record as of revision `rev` (an older one is ignored; None:
    /// deleted).
    fn note_refresh(&self, name: &str, rev: i64, rec: Option<SharedRecord>) {
        let mut revs = self.refresh_revs.lock();
        if revs.get(name).is_some_and(|r| *r > rev) {
            return;
        }
        revs.insert(name.to_string(), rev);
        self.refresh.send_modify(|m| match rec {
            Some(rec) => {
                m.insert(name.to_string(), rec);
            }
            None => {
                m.remove(name);
            }
        });
    }

    /// Lists the records under `prefix` (to `listed`: by name after the prefix, each with its
    /// mod revision), then watches them from the list's revision, each change to `changed`
    /// (name, mod revision, the record or None when deleted), until the watch breaks (an
    /// error). A record that does not decode is logged and skipped.
    async fn follow_records<T: serde::de::DeserializeOwned>(
        &self,
        what: &str,
        prefix: String,
        listed: impl FnOnce(BTreeMap<String, (i64, T)>),
        changed: impl Fn(&str, i64, Option<T>),
    ) -> Result<()> {
        let unreadable = |key: &str, e: Error| {
            tracing::error!(%key, error = %e, "unreadable record in etcd ({what}): ignored");
        };
        let (kvs, rev) = etcd::list(&mut self.etcd(), self.urls(), what, prefix.clone()).await?;
        let mut all = BTreeMap::new();
        for (key, r) in kvs {
            let Some(name) = key.strip_prefix(&prefix) else {
                continue;
            };
            match r.decode::<T>(&key) {
                Ok(v) => {
                    all.insert(name.to_string(), (r.mod_revision, v));
                }
                Err(e) => unreadable(&key, e),
            }
        }
        listed(all);
        let mut watch = etcd::Watch::open(
            &mut self.etcd(),
            self.urls(),
            what,
            prefix.clone(),
            true,
            rev + 1,
        )
        .await?;
        loop {
            for c in watch.changes(&prefix).await?.0 {
                match c.decode::<T>() {
                    Some(Ok(v)) => changed(&c.name, c.mod_revision, Some(v)),
                    Some(Err(e)) => unreadable(&c.key, e),
                    None => changed(&c.name, c.mod_revision, None),
                }
            }
        }
    }

    async fn read(&self, what: &str, keys: &[String]) -> Result<Vec<Option<Read>>> {
        etcd::read(&mut self.etcd(), self.urls(), what, keys).await
    }

    async fn commit(
        &self,
        what: &str,
        when: Vec<etcd_client::Compare>,
        ops: Vec<TxnOp>,
    ) -> Result<Option<i64>> {
        etcd::commit(&mut self.etcd(), self.urls(), what, when, ops).await
    }

    // ---- profiles ----

    /// PutProfile: one transaction, "every index it names exists (the incarnation read) → put".
    pub async fn put_profile(&self, profile: Profile) -> Result<Profile> {
        let key = etcd::profile_key(profile.name.as_str());
        let value = etcd::encode("a profile", &profile)?;
        let keys: Vec<String> = profile
            .indexes
            .iter()
            .map(|pi| etcd::index_key(pi.index.as_str()))
            .collect();
        for attempt in 0..CAS_ATTEMPTS {
            let read = self.read("reading the profile's indexes", &keys).await?;
            let mut when = Vec::with_capacity(keys.len());
            for ((k, r), pi) in keys.iter().zip(&read).zip(&profile.indexes) {
                let r = r
                    .as_ref()
                    .ok_or_else(|| Error::not_found("index", pi.index.as_str()))?;
                when.push(etcd::incarnation(k, r.create_revision));
            }
            let ops = vec![TxnOp::put(key.clone(), value.clone(), None)];
            if self
                .commit("putting the profile", when, ops)
                .await?
                .is_some()
            {
                return Ok(profile);
            }
            backoff(attempt).await;
        }
        Err(conflict("PutProfile"))
    }

    pub async fn get_profile(&self, name: &Name) -> Result<Profile> {
        let key = etcd::profile_key(name.as_str());
        let read = self
            .read("reading the profile", std::slice::from_ref(&key))
            .await?;
        match read.into_iter().next().flatten() {
            Some(r) => r.decode(&key),
            None => Err(Error::not_found("profile", name.as_str())),
        }
    }

    /// Profiles in name order after `after`, at most `limit`.
    pub async fn list_profiles(&self, after: Option<&Name>, limit: usize) -> Result<Vec<Profile>> {
        let (kvs, _) = etcd::list(
            &mut self.etcd(),
            self.urls(),
            "listing the profiles",
            etcd::profiles_prefix(),
        )
        .await?;
        let mut out = Vec::new();
        for (key, r) in kvs {
            match r.decode::<Profile>(&key) {
                Ok(p) if after.is_none_or(|a| p.name.as_str() > a.as_str()) => out.push(p),
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(%key, error = %e, "unreadable profile in etcd: not listed")
                }
            }
        }
        out.sort_by(|a, b| a.name.as_str().cmp(b.name.as_str()));
        out.truncate(limit);
        Ok(out)
    }

    /// DeleteProfile: one transaction, "the profile exists → delete"; NOT_FOUND otherwise.
    pub async fn delete_profile(&self, name: &Name) -> Result<()> {
        let key = etcd::profile_key(name.as_str());
        let when = vec![etcd_client::Compare::version(
            key.clone(),
            etcd_client::CompareOp::Greater,
            0,
        )];
        match self
            .commit("deleting the profile", when, vec![TxnOp::delete(key, None)])
            .await?
        {
            Some(_) => Ok(()),
            None => Err(Error::not_found("profile", name.as_str())),
        }
    }

    // ---- the promotion registry ----

    /// The fence's compare, after checking that the lease key read is still the job's.
    fn fenced(fence: &Fence, read: &Option<Read>) -> Result<etcd_client::Compare> {
        let key = etcd::job_key(fence.index.as_str());
        if read.as_ref().map(|r| r.create_revision) != Some(fence.token) {
            return Err(lost_lease(&fence.index));
        }
        Ok(etcd::incarnation(&key, fence.token))
    }

    /// Reads the index (its uid), its promotion record and, with a fence, its job lease.
    async fn read_registry(
        &self,
        index: &Name,
        fence: Option<&Fence>,
    ) -> Result<(u64, Option<Read>, PromotionEntry, Option<Read>)> {
        let mut keys = vec![
            etcd::index_key(index.as_str()),
            etcd::promotion_key(index.as_str()),
        ];
        if fence.is_some() {
            keys.push(etcd::job_key(index.as_str()));
        }
        let mut read = self.read("reading the promotion registry", &keys).await?;
        let job = if fence.is_some() {
            read.pop().flatten()
        } else {
            None
        };
        let promo = read.pop().flatten();
        let uid = read
            .pop()
            .flatten()
            .map(|r| r.create_revision as u64)
            .ok_or_else(|| Error::not_found("index", index.as_str()))?;
        let entry = match &promo {
            Some(r) => {
                let e: PromotionEntry = r.decode(&keys[1])?;
                if e.uid == uid {
                    e
                } else {
                    PromotionEntry::default()
                }
            }
            None => PromotionEntry::default(),
        };
        Ok((uid, promo, PromotionEntry { uid, ..entry }, job))
    }

    /// Changes the index's record with `f`, in one compare-and-swap (retried).
    async fn update_registry<T>(
        &self,
        index: &Name,
        fence: Option<&Fence>,
        what: &str,
        f: impl Fn(&mut Record) -> Result<T>,
    ) -> Result<T> {
        for attempt in 0..CAS_ATTEMPTS {
            let (uid, promo, mut entry, job) = self.read_registry(index, fence).await?;
            let out = f(&mut entry.record)?;
            let key = etcd::promotion_key(index.as_str());
            let mut when = vec![
                etcd::incarnation(&etcd::index_key(index.as_str()), uid as i64),
                etcd::unchanged(&key, &promo),
            ];
            if let Some(fence) = fence {
                when.push(Self::fenced(fence, &job)?);
            }
            let ops = vec![TxnOp::put(
                key,
                etcd::encode("a promotion record", &entry)?,
                None,
            )];
            if let Some(rev) = self.commit(what, when, ops).await? {
                self.note_promoted(index.as_str(), rev, entry.record.current.clone(), false);
                return Ok(out);
            }
            backoff(attempt).await;
        }
        Err(conflict(what))
    }

    // ---- desired generations ----

    /// ActivateProfile: sets the desired generation of every index of the profile (the
    /// promoted config, else the profile entry's default, else the index's default), one
    /// transaction for the whole profile, conditioned on the profile, each index, its
    /// promotions and its desired generation being as read.
    pub async fn activate_profile(&self, name: &Name) -> Result<Vec<(Name, Desired)>> {
        let pkey = etcd::profile_key(name.as_str());
        for attempt in 0..CAS_ATTEMPTS {
            let first = self
                .read("reading the profile", std::slice::from_ref(&pkey))
                .await?;
            let Some(Some(pread)) = first.into_iter().next() else {
                return Err(Error::not_found("profile", name.as_str()));
            };
            let profile: Profile = pread.decode(&pkey)?;
            let mut keys = vec![pkey.clone()];
            for pi in &profile.indexes {
                let i = pi.index.as_str();
                keys.extend([
                    etcd::index_key(i),
                    etcd::promotion_key(i),
                    etcd::active_key(i),
                ]);
            }
            let read = self.read("reading the profile's indexes", &keys).await?;
            let mut when = vec![etcd::unchanged(&pkey, &read[0])];
            let mut ops = Vec::new();
            let mut out = Vec::new();
            for (n, pi) in profile.indexes.iter().enumerate() {
                let i = pi.index.as_str();
                let (ir, pr, ar) = (&read[1 + 3 * n], &read[2 + 3 * n], &read[3 + 3 * n]);
                let ir = ir.as_ref().ok_or_else(|| Error::not_found("index", i))?;
                let uid = ir.create_revision as u64;
                let entry: etcd::IndexEntry = ir.decode(&keys[1 + 3 * n])?;
                let current = match pr {
                    Some(r) => {
                        let e: PromotionEntry = r.decode(&keys[2 + 3 * n])?;
                        (e.uid == uid).then_some(e.record.current).flatten()
                    }
                    None => None,
                };
                let prev = match ar {
                    Some(r) => {
                        let d: Desired = r.decode(&keys[3 + 3 * n])?;
                        if d.uid == uid {
                            d.number
                        } else {
                            0
                        }
                    }
                    None => 0,
                };
                let (config, source, trial) = match current {
                    Some(p) => (
                        p.config,
                        ConfigSource::Promoted,
                        (!p.trial_node.is_empty()).then(|| TrialRef {
                            node: p.trial_node.clone(),
                            id: p.trial_id,
                        }),
                    ),
                    None => (
                        pi.default_config.unwrap_or(entry.default_config),
                        ConfigSource::Default,
                        None,
                    ),
                };
                let desired = Desired {
                    uid,
                    number: prev + 1,
                    config,
                    source,
                    profile: name.to_string(),
                    trial,
                    set_by: self.cfg.node_id.clone(),
                    set_time_ms: now_millis(),
                };
                when.push(etcd::incarnation(&keys[1 + 3 * n], uid as i64));
                when.push(etcd::unchanged(&keys[2 + 3 * n], pr));
                when.push(etcd::unchanged(&keys[3 + 3 * n], ar));
                ops.push(TxnOp::put(
                    keys[3 + 3 * n].clone(),
                    etcd::encode("a desired generation", &desired)?,
                    None,
                ));
                out.push((pi.index.clone(), desired));
            }
            if self
                .commit("setting the desired generations", when, ops)
                .await?
                .is_some()
            {
                return Ok(out);
            }
            backoff(attempt).await;
        }
        Err(conflict("ActivateProfile"))
    }

    /// An autotune job's activation of its promoted winner: the index's next desired
    /// generation, fenced by the job's lease.
    async fn activate_job(
        &self,
        fence: &Fence,
        config: HnswConfig,
        trial: TrialRef,
    ) -> Result<Desired> {
        let index = &fence.index;
        let keys = vec![
            etcd::index_key(index.as_str()),
            etcd::active_key(index.as_str()),
            etcd::job_key(index.as_str()),
        ];
        for attempt in 0..CAS_ATTEMPTS {
            let read = self.read("reading the desired generation", &keys).await?;
            let uid = read[0]
                .as_ref()
                .map(|r| r.create_revision as u64)
                .ok_or_else(|| Error::not_found("index", index.as_str()))?;
            let prev = match &read[1] {
                Some(r) => {
                    let d: Desired = r.decode(&keys[1])?;
                    if d.uid == uid {
                        d.number
                    } else {
                        0
                    }
                }
                None => 0,
            };
            let when = vec![
                etcd::incarnation(&keys[0], uid as i64),
                etcd::unchanged(&keys[1], &read[1]),
                Self::fenced(fence, &read[2])?,
            ];
            let desired = Desired {
                uid,
                number: prev + 1,
                config,
                source: ConfigSource::Promoted,
                profile: String::new(),
                trial: Some(trial.clone()),
                set_by: self.cfg.node_id.clone(),
                set_time_ms: now_millis(),
            };
            let ops = vec![TxnOp::put(
                keys[1].clone(),
                etcd::encode("a desired generation", &desired)?,
                None,
            )];
            if self
                .commit("setting the desired generation", when, ops)
                .await?
                .is_some()
            {
                return Ok(desired);
            }
            backoff(attempt).await;
        }
        Err(conflict("the autotune job's activation"))
    }

    /// Waits until this node serves desired generation `number` of `index` (or a later one);
    /// UNAVAILABLE when its build of it failed (the node goes on retrying it).
    async fn wait_served(
        &self,
        index: &str,
        number: u64,
        cancel: &CancellationToken,
    ) -> Result<()> {
        let mut rx = self.rollouts();
        let seen = tokio::select! {
            r = rx.wait_for(|m| m.get(index).is_some_and(|r| r.served >= number || r.failed == number)) => {
                r.map(|m| m.get(index).copied().unwrap_or_default())
                    .map_err(|_| Error::Unavailable("the node is shutting down".into()))?
            }
            _ = cancel.cancelled() => return Err(Error::Cancelled(format!("the activation of index {index:?} was abandoned"))),
        };
        if seen.served >= number {
            return Ok(());
        }
        Err(Error::Unavailable(format!(
            "node {} could not build desired generation {number} of index {index:?} (it retries every 5 s; GetIndex.nodes shows its error); the promotion stands",
            self.cfg.node_id
        )))
    }
}

/// Runs `once` (a follower: a list then a watch) again after each break, a second apart, until
/// `stop`.
async fn follow_loop<F, Fut>(what: &str, stop: &CancellationToken, once: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = once() => if let Err(e) = r {
                tracing::debug!(error = %e, "{what} stopped; resyncing");
            },
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

fn lost_lease(index: &Name) -> Error {
    Error::Conflict(format!(
        "the autotune job no longer holds index {:?}'s job lease in etcd (it expired or was revoked): nothing was promoted or activated",
        index.as_str()
    ))
}

#[async_trait::async_trait]
impl Shared for Control {
    async fn promote(&self, p: Promotion, fence: Option<&Fence>) -> Result<(Promotion, u32)> {
        let index = p.index.clone();
        let depth = self
            .update_registry(&index, fence, "promoting", |rec| Ok(rec.promote(p.clone())))
            .await?;
        Ok((p, depth))
    }

    async fn rollback(&self, index: &Name) -> Result<(Option<Promotion>, u32)> {
        self.update_registry(index, None, "rolling back", |rec| rec.rollback(index))
            .await
    }

    async fn get(&self, index: &Name) -> Result<Record> {
        Ok(self.read_registry(index, None).await?.2.record)
    }

    fn known_current(&self, index: &Name) -> Option<Promotion> {
        self.promoted
            .lock()
            .get(index.as_str())
            .and_then(|(_, p)| p.clone())
    }
}

#[async_trait::async_trait]
impl SharedRefresh for Control {
    /// One transaction: "the index is incarnation `uid` and its record is as read → put".
    async fn update(
        &self,
        index: &Name,
        uid: u64,
        change: Change<'_>,
    ) -> Result<Option<SharedRecord>> {
        let ikey = etcd::index_key(index.as_str());
        let key = etcd::refresh_key(index.as_str());
        let keys = [ikey.clone(), key.clone()];
        for attempt in 0..CAS_ATTEMPTS {
            let read = self.read("reading the refresh record", &keys).await?;
            if read[0].as_ref().map(|r| r.create_revision as u64) != Some(uid) {
                return Err(Error::not_found("index", index.as_str()));
            }
            let mut rec = match &read[1] {
                Some(r) => r.decode::<SharedRecord>(&key)?,
                None => SharedRecord::new(uid),
            };
            if rec.uid != uid {
                rec = SharedRecord::new(uid);
            }
            if !change(&mut rec) {
                return Ok(None);
            }
            let when = vec![
                etcd::incarnation(&ikey, uid as i64),
                etcd::unchanged(&key, &read[1]),
            ];
            let ops = vec![TxnOp::put(
                key.clone(),
                etcd::encode("a refresh record", &rec)?,
                None,
            )];
            if let Some(rev) = self.commit("writing the refresh record", when, ops).await? {
                self.note_refresh(index.as_str(), rev, Some(rec.clone()));
                return Ok(Some(rec));
            }
            backoff(attempt).await;
        }
        Err(conflict("the refresh record's change"))
    }

    fn records(&self) -> tokio::sync::watch::Receiver<BTreeMap<String, SharedRecord>> {
        self.refresh.subscribe()
    }
}

/// An autotune job's hold on its index's job lease.
pub struct EtcdJobLease {
    control: Arc<Control>,
    fence: Fence,
    lease: i64,
    /// Stops the renewals (and the watch for a cancel).
    renew: CancellationToken,
    /// Cancelled by the renewals when the lease is lost (expired or revoked).
    lost: CancellationToken,
    /// Cancelled when CancelJob through another node asks for it (the lease key's `cancel_by`).
    cancel: CancellationToken,
}

/// Why a RUNNING record whose job no longer runs is FAILED.
fn stale_reason(job: &JobRecord) -> String {
    format!(
        "node {} stopped running the job (it died or restarted, or lost index {:?}'s job lease) before it recorded an end",
        job.node_id,
        job.index.as_str()
    )
}

/// Job records (see `etcd.rs`: `job-records/`). Records live in etcd rather than in the
/// cluster's lab log: a record changes (progress, its end, a sweep of a dead node's job) and
/// the old ones are deleted to keep `--jobs-kept`, each change one compare-and-swap
/// transaction against its own key and the job's lease key, which an append-only stream
/// replayed by every node would only express as ever more records. The count is bounded (the
/// running jobs, at most one per index, and the newest `--jobs-kept` finished), and each
/// record is a few hundred bytes.
impl Control {
    /// Whether the RUNNING record `job` belongs to a job that no longer runs: the index's job
    /// lease (as `lease` read) is not its, or it is this node's and `here` does not run it.
    fn stale(
        &self,
        job: &JobRecord,
        lease: Option<&JobLeaseEntry>,
        here: &(dyn for<'s> Fn(&'s str) -> bool + Send + Sync),
    ) -> bool {
        job.state == JobState::Running
            && (lease.is_none_or(|l| l.job_id != job.id)
                || (job.node_id == self.cfg.node_id && !here(&job.id)))
    }

    /// Makes the stale RUNNING record `job` (its key `rkey` as `rr` read) FAILED, if the
    /// record and the job's lease key (as `lr` read) are unchanged: the record as it now is
    /// (re-read when the commit lost to a change).
    async fn sweep(
        &self,
        rkey: &str,
        mut job: JobRecord,
        rr: &Read,
        lr: &Option<Read>,
    ) -> Result<JobRecord> {
        let lkey = etcd::job_key(job.index.as_str());
        let reason = stale_reason(&job);
        job.state = JobState::Failed;
        job.end_time_ms = Some(now_millis());
        job.reason = reason;
        let when = vec![
            etcd::unchanged(rkey, &Some(rr.clone())),
            etcd::unchanged(&lkey, lr),
        ];
        let ops = vec![TxnOp::put(rkey, etcd::encode("a job record", &job)?, None)];
        if self
            .commit("recording a dead job's end", when, ops)
            .await?
            .is_some()
        {
            tracing::warn!(job = %job.id, node = %job.node_id, "a job whose node no longer runs it: recorded FAILED");
            return Ok(job);
        }
        self.job_record(rkey)
            .await?
            .ok_or_else(|| Error::not_found("job", &job.id))
    }

    /// The job record at `rkey`, if there is one.
    async fn job_record(&self, rkey: &str) -> Result<Option<JobRecord>> {
        let read = self
            .read("reading the job record", &[rkey.to_string()])
            .await?;
        read.into_iter()
            .next()
            .flatten()
            .map(|r| r.decode(rkey))
            .transpose()
    }

    /// Whether job `id`'s record says it ended (false when it has none).
    async fn job_ended(&self, id: &str) -> Result<bool> {
        let Some(seq) = job_seq(id) else {
            return Ok(false);
        };
        let job = self.job_record(&etcd::job_record_key(seq)).await?;
        Ok(job.is_some_and(|j| j.state != JobState::Running))
    }

    /// Reads job `id`'s record and its index's job lease at one revision.
    async fn read_job(&self, id: &str) -> Result<(String, Read, JobRecord, Option<Read>)> {
        let seq = job_seq(id).ok_or_else(|| Error::not_found("job", id))?;
        let rkey = etcd::job_record_key(seq);
        let Some(job) = self.job_record(&rkey).await? else {
            return Err(Error::not_found("job", id));
        };
        let lkey = etcd::job_key(job.index.as_str());
        let mut read = self
            .read("reading the job record", &[rkey.clone(), lkey])
            .await?;
        let lr = read.pop().flatten();
        let Some(rr) = read.pop().flatten() else {
            return Err(Error::not_found("job", id));
        };
        let job = rr.decode(&rkey)?;
        Ok((rkey, rr, job, lr))
    }
}

fn lease_entry(key: &str, r: &Option<Read>) -> Option<JobLeaseEntry> {
    r.as_ref().and_then(|r| r.decode::<JobLeaseEntry>(key).ok())
}

fn already_finished(job: &JobRecord) -> Error {
    Error::Precondition(format!(
        "job {} already finished ({:?}); only a running job can be cancelled",
        job.id, job.state
    ))
}

#[async_trait::async_trait]
impl ClusterJobs for Control {
    fn node_id(&self) -> &str {
        &self.cfg.node_id
    }

    async fn holder(&self, index: &Name) -> Result<Option<LeaseHolder>> {
        let key = etcd::job_key(index.as_str());
        let read = self
            .read("reading the job lease", std::slice::from_ref(&key))
            .await?;
        Ok(match read.first().and_then(Option::as_ref) {
            Some(r) => {
                let e: JobLeaseEntry = r.decode(&key)?;
                Some(LeaseHolder {
                    job_id: e.job_id,
                    node_id: e.node_id,
                })
            }
            None => None,
        })
    }

    async fn acquire(self: Arc<Self>, index: &Name) -> Result<(Arc<dyn JobLease>, u64)> {
        let urls = self.urls().to_vec();
        let mut etcd = self.etcd();
        let lease = etcd::bounded!(
            &urls,
            "granting the job's lease",
            etcd.lease_grant(JOB_LEASE_TTL_SECS, None),
        )
        .await?
        .id();
        let key = etcd::job_key(index.as_str());
        let ikey = etcd::index_key(index.as_str());
        let skey = etcd::job_seq_key();
        let keys = [ikey.clone(), key.clone(), skey.clone()];
        // One transaction: the index is the one read, nobody holds its lease, and the job
        // counter is as read → the lease key (under the job's lease) and the counter + 1.
        let taken = async {
            for attempt in 0..CAS_ATTEMPTS {
                let read = self.read("reading the job lease", &keys).await?;
                let uid = read[0]
                    .as_ref()
                    .map(|r| r.create_revision)
                    .ok_or_else(|| Error::not_found("index", index.as_str()))?;
                if let Some(r) = &read[1] {
                    let holder: JobLeaseEntry = r.decode(&key)?;
                    // A job whose end is recorded (ListJobs shows it ended) releases its
                    // lease moments later: a client that saw it end waits for that.
                    if self.job_ended(&holder.job_id).await? {
                        if attempt + 1 < CAS_ATTEMPTS {
                            backoff(attempt).await;
                            continue;
                        }
                        return Err(Error::Conflict(format!(
                            "index {:?} is held by job {} on node {}, which has ended, but its job lease in etcd was not released yet (when its node died right after the job, the lease expires within {JOB_LEASE_TTL_SECS} s); retry shortly",
                            index.as_str(),
                            holder.job_id,
                            holder.node_id
                        )));
                    }
                    return Err(Error::Conflict(format!(
                        "index {:?} is already being tuned by job {} on node {} (its job lease in etcd); wait for it or cancel it",
                        index.as_str(),
                        holder.job_id,
                        holder.node_id
                    )));
                }
                let seq = match &read[2] {
                    Some(r) => r.decode::<u64>(&skey)? + 1,
                    None => 1,
                };
                let entry = JobLeaseEntry {
                    node_id: self.cfg.node_id.clone(),
                    job_id: job_id(seq),
                    lease,
                    start_time_ms: now_millis(),
                    cancel_by: String::new(),
                };
                let when = vec![
                    etcd::incarnation(&ikey, uid),
                    etcd::unchanged(&key, &None),
                    etcd::unchanged(&skey, &read[2]),
                ];
                let ops = vec![
                    TxnOp::put(
                        key.clone(),
                        etcd::encode("a job lease", &entry)?,
                        Some(PutOptions::new().with_lease(lease)),
                    ),
                    TxnOp::put(skey.clone(), etcd::encode("the job counter", &seq)?, None),
                ];
                if let Some(rev) = self.commit("taking the job lease", when, ops).await? {
                    return Ok((rev, seq));
                }
                backoff(attempt).await;
            }
            Err(conflict("taking the job lease"))
        }
        .await;
        let (token, seq) = match taken {
            Ok(t) => t,
            Err(e) => {
                let _ = tokio::time::timeout(JOB_LEASE_RENEW, etcd.lease_revoke(lease)).await;
                return Err(e);
            }
        };
        let renew = CancellationToken::new();
        let lost = CancellationToken::new();
        let cancel = CancellationToken::new();
        self.tasks.spawn(renew_job_lease(
            self.clone(),
            lease,
            renew.clone(),
            lost.clone(),
        ));
        self.tasks.spawn(watch_job_cancel(
            self.clone(),
            key,
            token,
            renew.clone(),
            cancel.clone(),
        ));
        let id = job_id(seq);
        tracing::info!(index = %index, job = %id, token, "took the index's job lease");
        let held: Arc<dyn JobLease> = Arc::new(EtcdJobLease {
            control: self,
            fence: Fence {
                index: index.clone(),
                token,
            },
            lease,
            renew,
            lost,
            cancel,
        });
        Ok((held, seq))
    }

    async fn save(&self, job: &JobRecord) -> Result<JobRecord> {
        let key = etcd::job_record_key(job.seq);
        let value = etcd::encode("a job record", job)?;
        for attempt in 0..CAS_ATTEMPTS {
            let read = self
                .read("reading the job record", std::slice::from_ref(&key))
                .await?;
            let current = read.into_iter().next().flatten();
            if let Some(r) = &current {
                let stored: JobRecord = r.decode(&key)?;
                if stored.state != JobState::Running {
                    tracing::debug!(job = %job.id, state = ?stored.state, "the job's record is final already: not changed");
                    return Ok(stored);
                }
            }
            let when = vec![etcd::unchanged(&key, &current)];
            let ops = vec![TxnOp::put(key.clone(), value.clone(), None)];
            if self
                .commit("writing the job record", when, ops)
                .await?
                .is_some()
            {
                return Ok(job.clone());
            }
            backoff(attempt).await;
        }
        Err(conflict("writing the job record"))
    }

    async fn list(
        &self,
        here: &(dyn for<'s> Fn(&'s str) -> bool + Send + Sync),
    ) -> Result<Vec<JobRecord>> {
        // The records first, then the leases: a record created after its lease is never
        // read without it (and a sweep commits only if both are still as read).
        let (records, _) = etcd::list(
            &mut self.etcd(),
            self.urls(),
            "listing the job records",
            etcd::job_records_prefix(),
        )
        .await?;
        let (leases, _) = etcd::list(
            &mut self.etcd(),
            self.urls(),
            "listing the job leases",
            etcd::jobs_prefix(),
        )
        .await?;
        let leases: BTreeMap<String, Read> = leases.into_iter().collect();
        let mut out = Vec::with_capacity(records.len());
        for (key, r) in records.into_iter().rev() {
            let job: JobRecord = match r.decode(&key) {
                Ok(j) => j,
                Err(e) => {
                    tracing::error!(%key, error = %e, "unreadable job record in etcd: not listed");
                    continue;
                }
            };
            let lkey = etcd::job_key(job.index.as_str());
            let lr = leases.get(&lkey).cloned();
            if self.stale(&job, lease_entry(&lkey, &lr).as_ref(), here) {
                out.push(self.sweep(&key, job, &r, &lr).await?);
            } else {
                out.push(job);
            }
        }
        Ok(out)
    }

    async fn cancel(
        &self,
        id: &str,
        here: &(dyn for<'s> Fn(&'s str) -> bool + Send + Sync),
    ) -> Result<JobRecord> {
        // Ask: the job's lease key gets `cancel_by` (the node running the job watches it).
        let mut asked = false;
        for attempt in 0..CAS_ATTEMPTS {
            let (rkey, rr, job, lr) = self.read_job(id).await?;
            if job.state != JobState::Running {
                return Err(already_finished(&job));
            }
            let lkey = etcd::job_key(job.index.as_str());
            let holder = lease_entry(&lkey, &lr);
            if self.stale(&job, holder.as_ref(), here) {
                let job = self.sweep(&rkey, job, &rr, &lr).await?;
                return Err(already_finished(&job));
            }
            let Some(mut entry) = holder else {
                continue;
            };
            if !entry.cancel_by.is_empty() {
                asked = true;
                break;
            }
            entry.cancel_by = self.cfg.node_id.clone();
            let when = vec![etcd::unchanged(&lkey, &lr)];
            let ops = vec![TxnOp::put(
                lkey.clone(),
                etcd::encode("a job lease", &entry)?,
                Some(PutOptions::new().with_lease(entry.lease)),
            )];
            if self
                .commit("asking for the job's cancel", when, ops)
                .await?
                .is_some()
            {
                tracing::info!(job = id, node = %entry.node_id, "CancelJob: asked the job's node to cancel it");
                asked = true;
                break;
            }
            backoff(attempt).await;
        }
        if !asked {
            return Err(conflict("CancelJob"));
        }
        // Wait for its end (its node records it before it gives the lease up), or for its
        // node to be gone (then the record is made FAILED).
        let deadline = tokio::time::Instant::now() + REMOTE_CANCEL_WAIT;
        loop {
            let (rkey, rr, job, lr) = self.read_job(id).await?;
            if job.state != JobState::Running {
                return Ok(job);
            }
            let lkey = etcd::job_key(job.index.as_str());
            if self.stale(&job, lease_entry(&lkey, &lr).as_ref(), here) {
                return self.sweep(&rkey, job, &rr, &lr).await;
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(job);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn trim(&self, kept: usize) -> Result<()> {
        let (records, _) = etcd::list(
            &mut self.etcd(),
            self.urls(),
            "listing the job records",
            etcd::job_records_prefix(),
        )
        .await?;
        // Newest first; running ones stay (a record that does not read goes with the old).
        let old: Vec<String> = records
            .into_iter()
            .rev()
            .filter(|(k, r)| {
                r.decode::<JobRecord>(k)
                    .map_or(true, |j| j.state != JobState::Running)
            })
            .skip(kept)
            .map(|(k, _)| k)
            .collect();
        for chunk in old.chunks(64) {
            let ops = chunk
                .iter()
                .map(|k| TxnOp::delete(k.clone(), None))
                .collect();
            self.commit("deleting old job records", Vec::new(), ops)
                .await?;
        }
        Ok(())
    }
}

/// Watches a job's lease key (`key`, created at `token`) until `stop` for a cancel asked
/// through another node (its `cancel_by`), and then cancels `cancel`. After a break of the
/// watch it reads the key again (every second until it answers).
async fn watch_job_cancel(
    control: Arc<Control>,
    key: String,
    token: i64,
    stop: CancellationToken,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = control.watch_job_cancel_once(&key, token) => match r {
                Ok(true) => {
                    cancel.cancel();
                    return;
                }
                // The key is gone or another job's: no cancel can come through it.
                Ok(false) => return,
                Err(e) => tracing::debug!(error = %e, "watching the job lease for a cancel stopped; again"),
            },
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

impl Control {
    /// Ok(true) once the job lease key (created at `token`) asks for a cancel; Ok(false) when
    /// it is gone or another job's.
    async fn watch_job_cancel_once(&self, key: &str, token: i64) -> Result<bool> {
        let what = "watching the job lease for a cancel";
        let read = self.read(what, &[key.to_string()]).await?;
        let Some(Some(r)) = read.into_iter().next() else {
            return Ok(false);
        };
        if r.create_revision != token {
            return Ok(false);
        }
        if !r.decode::<JobLeaseEntry>(key)?.cancel_by.is_empty() {
            return Ok(true);
        }
        let from = r.mod_revision + 1;
        let mut watch = etcd::Watch::open(
            &mut self.etcd(),
            self.urls(),
            what,
            key.to_string(),
            false,
            from,
        )
        .await?;
        loop {
            for c in watch.changes(key).await?.0 {
                match c.decode::<JobLeaseEntry>() {
                    None => return Ok(false),
                    Some(_) if c.create_revision != token => return Ok(false),
                    Some(Ok(e)) if !e.cancel_by.is_empty() => return Ok(true),
                    Some(_) => {}
                }
            }
        }
    }
}

/// Renews a job lease every [`JOB_LEASE_RENEW`] until `stop`. When the lease is lost it
/// cancels `lost` and ends (a lease etcd no longer has is not taken again; the job's fence
/// fails from then on): lost when etcd answers a renewal with TTL 0 (the lease expired or was
/// revoked), or when no renewal succeeded for [`JOB_LEASE_TTL_SECS`] (the node was paused or
/// cut off from etcd that long: etcd has let the lease expire, or will before it hears again).
async fn renew_job_lease(
    control: Arc<Control>,
    lease: i64,
    stop: CancellationToken,
    lost: CancellationToken,
) {
    let ttl = Duration::from_secs(JOB_LEASE_TTL_SECS as u64);
    let mut renewed = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(JOB_LEASE_RENEW) => {}
        }
        if renewed.elapsed() >= ttl {
            tracing::warn!(
                lease,
                secs = renewed.elapsed().as_secs(),
                "the autotune job's lease was not renewed for longer than its TTL: it is lost; stopping the job"
            );
            lost.cancel();
            return;
        }
        let asked = tokio::time::Instant::now();
        let kept = etcd::keep_alive(
            &mut control.etcd(),
            control.urls(),
            "renewing the job lease",
            lease,
        )
        .await;
        if stop.is_cancelled() {
            return;
        }
        match kept {
            Ok(ttl) if ttl > 0 => renewed = asked,
            Ok(_) => {
                tracing::warn!(
                    lease,
                    "the autotune job's lease expired or was revoked: stopping the job; it can no longer promote or activate"
                );
                lost.cancel();
                return;
            }
            Err(e) => {
                tracing::warn!(lease, error = %e, "renewing the autotune job's lease failed; retrying")
            }
        }
    }
}

#[async_trait::async_trait]
impl JobLease for EtcdJobLease {
    fn fence(&self) -> Fence {
        self.fence.clone()
    }

    fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    fn cancel_requested(&self) -> CancellationToken {
        self.cancel.clone()
    }

    async fn activate(
        &self,
        config: HnswConfig,
        trial_id: u64,
        cancel: &CancellationToken,
    ) -> Result<u64> {
        let trial = TrialRef {
            node: self.control.cfg.node_id.clone(),
            id: trial_id,
        };
        let desired = self
            .control
            .activate_job(&self.fence, config, trial)
            .await?;
        tracing::info!(index = %self.fence.index, desired = desired.number, config = %config, "autotune set the index's desired generation");
        self.control
            .wait_served(self.fence.index.as_str(), desired.number, cancel)
            .await?;
        Ok(desired.number)
    }

    async fn release(&self) {
        self.renew.cancel();
        let mut etcd = self.control.etcd();
        match tokio::time::timeout(JOB_LEASE_RENEW, etcd.lease_revoke(self.lease)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(index = %self.fence.index, error = %e, "releasing the job lease failed: it expires by itself")
            }
            Err(_) => {
                tracing::warn!(index = %self.fence.index, "etcd did not answer the job lease's release: it expires by itself")
            }
        }
    }
}
