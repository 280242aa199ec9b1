//! The cluster's lab log in NATS JetStream (docs/cluster.md): harnesses and trials shared by
//! every node (`autotune::shared`).
//!
//! One stream for the cluster, `VECTORD_LAB`, one subject per index incarnation,
//! `vectord.v1.lab.<uid>` (file storage, replicas min(3, servers), a 2-minute duplicate window;
//! DeleteIndex purges its index's subject, and the trim below deletes dead records). One stream, not one
//! per index: a trial's id is its record's stream sequence, and trial ids must be unique across
//! the cluster (GetTrial and Promote take an id alone). Lab records are about a whole index (a
//! harness's ground truth and a trial's graph cover all its points), so an index with several
//! shards keeps one subject.
//!
//! Every node mirrors the stream into its store with an ordered consumer from the sequence
//! after the one its store holds (written in the same transaction as each mirrored record), so
//! a restarted node resumes after what it has, and a new one replays the stream.
//!
//! Trimming (docs/cluster.md "Trimming the lab log"): when the stream holds more dead records
//! (undone by a later one: removed trials, deleted harnesses, the records that removed them)
//! than `--lab-log-max-dead` and than live ones, one node at a time (the etcd key `lab-trim`
//! on its lease) raises the horizon (etcd `lab-horizon`) to the last record it mirrored and
//! read, then deletes the dead records below it. Invariants:
//! - The horizon is raised before any record at or below it is deleted, and the last record
//!   read is never deleted: a reader that meets a gap and then reads the horizon knows whether
//!   records it had not mirrored may be gone (horizon past its position).
//! - Such a reader resyncs: it re-reads the whole stream over its store, then removes what no
//!   record it read made. A resync begins with no trim under way and ends only if no trim ran
//!   meanwhile (horizon unchanged), else it starts over; its mark in the store makes a restart
//!   start it over.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use etcd_client::{PutOptions, TxnOp};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::autotune::shared::{self, LabRecord, SharedLab};
use crate::error::{Error, Result};
use crate::model::Name;
use crate::store::Store;

use super::etcd;
use super::log::{DUPLICATE_WINDOW, PUBLISH_TIMEOUT};
use super::Cluster;

pub const STREAM: &str = "VECTORD_LAB";
const SUBJECTS: &str = "vectord.v1.lab.>";
/// Longest a lab call waits, once its record is logged, for this node to mirror it.
const MIRROR_WAIT: Duration = Duration::from_secs(10);
/// Publishes of one record at most (the same dedupe id each time) when no acknowledgement
/// came: JetStream keeps one.
const PUBLISH_ATTEMPTS: usize = 3;
/// Records mirrored in one batch at most.
const MIRROR_BATCH: usize = 256;
/// How long the mirror waits for a record before it checks whether the log was trimmed past
/// it (a trim at the log's tail leaves no gap to see until the next record).
const IDLE_CHECK: Duration = Duration::from_secs(30);
/// How often a node checks whether the lab log needs trimming.
const TRIM_CHECK: Duration = Duration::from_secs(10);
/// `--lab-log-max-dead`'s default.
pub const DEFAULT_LAB_LOG_MAX_DEAD: u64 = 10_000;

pub fn subject(uid: u64) -> String {
    format!("vectord.v1.lab.{uid}")
}

pub struct LabLog {
    node_id: String,
    urls: Vec<String>,
    client: async_nats::Client,
    js: jetstream::Context,
    store: Arc<Store>,
    /// The last sequence this node mirrored (its store's).
    mirrored: tokio::sync::watch::Sender<u64>,
}

impl LabLog {
    /// A client of the lab log, connecting in the background (its calls are UNAVAILABLE until
    /// it is connected): the lab and the registry are built with it before the node joins.
    pub async fn connect(
        urls: &[String],
        access: &super::EngineAccess,
        node_id: &str,
        store: Arc<Store>,
    ) -> Result<Arc<Self>> {
        let (addrs, options) =
            super::log::connect_options(urls, access, format!("vectord-{node_id}-lab"))?;
        let connecting = options.retry_on_initial_connect().connect(addrs);
        // With retry_on_initial_connect, connect answers at once and connects in the
        // background.
        let client = connecting
            .await
            .map_err(|e| unavailable(urls, "connecting", e))?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(PUBLISH_TIMEOUT);
        let at = store.lab_applied()?;
        Ok(Arc::new(LabLog {
            node_id: node_id.to_string(),
            urls: urls.to_vec(),
            client,
            js,
            store,
            mirrored: tokio::sync::watch::channel(at).0,
        }))
    }

    fn check_connected(&self) -> Result<()> {
        match self.client.connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            state => Err(unavailable(
                &self.urls,
                "",
                format!("not connected ({state:?}): nothing was logged; retry later"),
            )),
        }
    }

    /// The lab stream, created when missing.
    async fn ensure_stream(&self) -> Result<stream::Stream> {
        self.check_connected()?;
        let known = self.client.server_info().connect_urls.len();
        let config = stream::Config {
            name: STREAM.into(),
            subjects: vec![SUBJECTS.into()],
            storage: stream::StorageType::File,
            num_replicas: self.urls.len().max(known).clamp(1, 3),
            duplicate_window: DUPLICATE_WINDOW,
            description: Some("vectord lab log: harnesses and trials (docs/cluster.md)".into()),
            ..Default::default()
        };
        tokio::time::timeout(PUBLISH_TIMEOUT, self.js.get_or_create_stream(config))
            .await
            .map_err(|_| unavailable(&self.urls, "creating the lab log", "timed out"))?
            .map_err(|e| unavailable(&self.urls, "creating the lab log", e))
    }

    /// Removes the records of index incarnation `uid` (DeleteIndex).
    pub async fn purge_index(&self, uid: u64) -> Result<()> {
        let stream = self.ensure_stream().await?;
        tokio::time::timeout(PUBLISH_TIMEOUT, stream.purge().filter(subject(uid)))
            .await
            .map_err(|_| unavailable(&self.urls, "purging the lab log", "timed out"))?
            .map_err(|e| unavailable(&self.urls, "purging the lab log", e))?;
        Ok(())
    }

    /// Publishes `payload` on index `uid`'s subject with dedupe id `msg_id`, up to
    /// [`PUBLISH_ATTEMPTS`] times while no acknowledgement comes; its stream sequence.
    async fn publish(&self, uid: u64, payload: Vec<u8>, msg_id: &str) -> Result<u64> {
        self.check_connected()?;
        let max = self.client.server_info().max_payload;
        if max > 0 && payload.len() > max {
            return Err(Error::Limit(format!(
                "the record is {} bytes in the lab log; the NATS server takes messages of at most {max} bytes (its max_payload): use fewer queries",
                payload.len()
            )));
        }
        let payload = bytes::Bytes::from(payload);
        let mut created = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", msg_id);
            let res = tokio::time::timeout(PUBLISH_TIMEOUT, async {
                let ack = self
                    .js
                    .publish_with_headers(subject(uid), headers, payload.clone())
                    .await?;
                ack.await
            })
            .await;
            use async_nats::jetstream::context::PublishErrorKind as Kind;
            let why = match res {
                Ok(Ok(ack)) => return Ok(ack.sequence),
                Ok(Err(e)) if !created && matches!(e.kind(), Kind::StreamNotFound) => {
                    self.ensure_stream().await?;
                    created = true;
                    attempt -= 1;
                    continue;
                }
                Ok(Err(e)) if matches!(e.kind(), Kind::TimedOut | Kind::BrokenPipe) => {
                    e.to_string()
                }
                Ok(Err(e)) => {
                    return Err(unavailable(
                        &self.urls,
                        "",
                        format!("the lab record was not logged: {e}"),
                    ))
                }
                Err(_) => format!("no acknowledgement within {} s", PUBLISH_TIMEOUT.as_secs()),
            };
            if attempt >= PUBLISH_ATTEMPTS {
                return Err(unavailable(
                    &self.urls,
                    "",
                    format!(
                        "did not acknowledge the lab record after {attempt} attempts ({why}): it may or may not be logged"
                    ),
                ));
            }
        }
    }
}

#[async_trait::async_trait]
impl SharedLab for LabLog {
    fn node_id(&self) -> &str {
        &self.node_id
    }

    async fn log(&self, record: &LabRecord) -> Result<u64> {
        let payload = serde_json::to_vec(record)
            .map_err(|e| Error::Internal(format!("encoding a lab record: {e}")))?;
        let msg_id = format!("lab-{}-{:032x}", self.node_id, rand::random::<u128>());
        let seq = self.publish(record.index().1, payload, &msg_id).await?;
        self.wait_mirrored(seq, tokio::time::Instant::now() + MIRROR_WAIT)
            .await?;
        Ok(seq)
    }

    async fn sync(&self) -> Result<()> {
        // The stream's state as NATS answers it now: every record logged so far is at or below
        // its last sequence.
        let stream = self.ensure_stream().await?;
        let last = stream.cached_info().state.last_sequence;
        let deadline = tokio::time::Instant::now() + MIRROR_WAIT;
        loop {
            let at = *self.mirrored.borrow();
            if at >= last {
                return Ok(());
            }
            // The record at `last` may be gone (trimmed, or purged with its index): wait for
            // the first one after what this node mirrored, while there is one.
            let next = tokio::time::timeout(
                PUBLISH_TIMEOUT,
                stream.get_first_raw_message_by_subject(SUBJECTS, at + 1),
            )
            .await
            .map_err(|_| unavailable(&self.urls, "reading the lab log", "timed out"))?;
            use async_nats::jetstream::stream::LastRawMessageErrorKind as Kind;
            let next = match next {
                Ok(m) => m.sequence,
                Err(e) if matches!(e.kind(), Kind::NoMessageFound) => return Ok(()),
                Err(e) => return Err(unavailable(&self.urls, "reading the lab log", e)),
            };
            if next > last {
                return Ok(());
            }
            self.wait_mirrored(next, deadline).await?;
        }
    }
}

impl LabLog {
    /// Waits until this node mirrored the log up to `seq`, until `deadline`.
    async fn wait_mirrored(&self, seq: u64, deadline: tokio::time::Instant) -> Result<()> {
        let mut mirrored = self.mirrored.subscribe();
        let waited = tokio::time::timeout_at(deadline, mirrored.wait_for(|at| *at >= seq)).await;
        match waited {
            Ok(Ok(_)) => Ok(()),
            _ => Err(Error::Unavailable(format!(
                "this node has not mirrored the cluster's lab log up to sequence {seq} within {} s (its mirror is at {}); it will: retry later",
                MIRROR_WAIT.as_secs(),
                *self.mirrored.borrow()
            ))),
        }
    }
}

fn unavailable(urls: &[String], what: &str, e: impl std::fmt::Display) -> Error {
    Error::Engine {
        engine: "NATS JetStream",
        endpoints: urls.join(","),
        what: if what.is_empty() {
            String::new()
        } else {
            format!(" ({what})")
        },
        detail: e.to_string(),
    }
}

/// Mirrors the lab log into the node's store until `cancel`; failures (NATS or etcd away, a
/// storage error) are logged once and retried every second.
pub(super) async fn mirror_loop(
    cluster: Arc<Cluster>,
    lab: Arc<LabLog>,
    cancel: CancellationToken,
) {
    let mut warned = false;
    loop {
        let res = tokio::select! {
            _ = cancel.cancelled() => return,
            r = mirror_from(&cluster, &lab) => r,
        };
        if let Err(e) = res {
            if !warned {
                tracing::warn!(mirrored = *lab.mirrored.borrow(), error = %e, "mirroring the lab log stopped; retrying every second");
                warned = true;
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

async fn mirror_from(cluster: &Arc<Cluster>, lab: &LabLog) -> Result<()> {
    let store = &lab.store;
    // A resync under way when the node stopped starts over (what it had read is not kept); a
    // store whose lab predates the lab log takes the log's.
    let mut resync =
        if store.lab_resyncing()? || (store.lab_applied()? == 0 && !store.lab_is_empty()?) {
            Some(begin_resync(cluster, lab).await?)
        } else {
            None
        };
    loop {
        mirror_pass(cluster, lab, &mut resync).await?;
        resync = Some(begin_resync(cluster, lab).await?);
    }
}

/// A resync: the whole lab log re-read over what the store has, because the log was trimmed
/// past what this node mirrored (or the store's lab predates the log).
struct Resyncing {
    /// The lab log's horizon when it began, with no trim under way: if a trim ran since, the
    /// re-read may have missed records and starts over.
    horizon: u64,
    /// The log's last sequence when it began: once the re-read is past it (or at the log's
    /// end), what the store has and the re-read did not find goes.
    through: u64,
    read: shared::Resync,
}

/// Starts a resync once no trim is under way: the store's mirrored sequence back to 0, its
/// resync mark set (so a restart resyncs again).
async fn begin_resync(cluster: &Arc<Cluster>, lab: &LabLog) -> Result<Resyncing> {
    let horizon = loop {
        let (horizon, trimming) = horizon_state(cluster).await?;
        if !trimming {
            break horizon;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let through = lab.ensure_stream().await?.cached_info().state.last_sequence;
    let store = lab.store.clone();
    tokio::task::spawn_blocking(move || store.begin_lab_resync()).await??;
    lab.store.flush().await?;
    tracing::warn!(horizon, through, "re-reading the cluster's lab log from its start: it was trimmed past what this node had mirrored (or this node's lab predates the log)");
    Ok(Resyncing {
        horizon,
        through,
        read: Default::default(),
    })
}

/// Ends the resync when no trim ran since it began (the horizon unchanged, none under way):
/// then it read the whole log, and what the store has that it did not find goes. False: a trim
/// ran meanwhile, the resync starts over.
async fn finish_resync(
    cluster: &Arc<Cluster>,
    lab: &LabLog,
    resync: &mut Option<Resyncing>,
) -> Result<bool> {
    let Some(r) = resync.take() else {
        return Ok(true);
    };
    let (horizon, trimming) = horizon_state(cluster).await?;
    if trimming || horizon != r.horizon {
        return Ok(false);
    }
    let store = lab.store.clone();
    let (harnesses, trials) = tokio::task::spawn_blocking(move || {
        store.finish_lab_resync(&r.read.harnesses, &r.read.trials)
    })
    .await??;
    lab.store.flush().await?;
    tracing::info!(
        removed_harnesses = harnesses,
        removed_trials = trials,
        "re-read the cluster's lab log"
    );
    Ok(true)
}

/// The lab log's horizon in etcd, and whether a node is trimming it now.
async fn horizon_state(cluster: &Cluster) -> Result<(u64, bool)> {
    let keys = [etcd::lab_horizon_key(), etcd::lab_trim_key()];
    let read = etcd::read(
        &mut cluster.etcd(),
        &cluster.cfg.etcd,
        "reading the lab log's horizon",
        &keys,
    )
    .await?;
    Ok((horizon_of(&read[0])?, read[1].is_some()))
}

/// The horizon as etcd holds it (absent: 0, nothing trimmed yet).
fn horizon_of(read: &Option<etcd::Read>) -> Result<u64> {
    match read {
        Some(r) => r.decode::<u64>(&etcd::lab_horizon_key()),
        None => Ok(0),
    }
}

/// Mirrors the log from the record after the store's, until an error, or until this node must
/// re-read the log from its start (Ok: a trim removed records it had not mirrored yet, or a
/// resync met a trim).
async fn mirror_pass(
    cluster: &Arc<Cluster>,
    lab: &LabLog,
    resync: &mut Option<Resyncing>,
) -> Result<()> {
    let stream = lab.ensure_stream().await?;
    let mut at = lab.store.lab_applied()?;
    let what = "reading the lab log";
    let batches = super::log::read_from(&stream, at + 1, MIRROR_BATCH, &lab.urls, what).await?;
    tokio::pin!(batches);
    tracing::info!(
        from = at + 1,
        resync = resync.is_some(),
        "mirroring the lab log"
    );
    if resync.is_some()
        && stream.cached_info().state.messages == 0
        && !finish_resync(cluster, lab, resync).await?
    {
        return Ok(());
    }
    loop {
        let batch = match tokio::time::timeout(IDLE_CHECK, batches.next()).await {
            Ok(Some(b)) => b,
            Ok(None) => {
                return Err(unavailable(
                    &lab.urls,
                    "reading the lab log",
                    "the consumer ended",
                ))
            }
            Err(_) => {
                // Nothing new for a while: a trim that ended at the log's tail left no gap to
                // see yet.
                if resync.is_none() && horizon_state(cluster).await?.0 > at {
                    return Ok(());
                }
                continue;
            }
        };
        let super::log::Batch {
            messages,
            mut failed,
            pending,
        } = batch;
        // A gap: records deleted by a trim or purged with their index (DeleteIndex). A trim
        // raises the horizon before it deletes any record, so the horizon read now is at or
        // past every trimmed record this batch misses. (A resync sees gaps of trims before it
        // began, and checks for later ones at its end.)
        if resync.is_none() {
            let mut prev = at;
            let gap = messages.iter().any(|(seq, _)| {
                let gap = *seq > prev + 1;
                prev = *seq;
                gap
            });
            if gap && horizon_state(cluster).await?.0 > at {
                return Ok(());
            }
        }
        let mut records = Vec::with_capacity(messages.len());
        for (seq, payload) in messages {
            let record = match serde_json::from_slice::<LabRecord>(&payload) {
                Ok(r) => Some(r),
                Err(e) => {
                    // Every node reads the same bytes the same way: skipping keeps them equal.
                    tracing::error!(seq, error = %e, "a lab log record is unreadable: skipped");
                    None
                }
            };
            if let Some(r) = &record {
                let (name, uid) = r.index();
                if let Err(e) = cluster.replica_for(name, uid).await {
                    failed = Some(e);
                    break;
                }
            }
            records.push((seq, record));
        }
        if let Some(&(last, _)) = records.last() {
            let store = lab.store.clone();
            let mut read = resync.as_mut().map(|r| std::mem::take(&mut r.read));
            let read = tokio::task::spawn_blocking(move || {
                records
                    .iter()
                    .try_for_each(|(seq, r)| {
                        shared::mirror(&store, *seq, r.as_ref(), read.as_mut())
                    })
                    .map(|()| read)
            })
            .await??;
            if let (Some(r), Some(read)) = (resync.as_mut(), read) {
                r.read = read;
            }
            lab.store.flush().await?;
            lab.mirrored.send_modify(|m| *m = (*m).max(last));
            at = last;
        }
        if let Some(e) = failed {
            return Err(e);
        }
        let done = resync
            .as_ref()
            .is_some_and(|r| at >= r.through || pending == 0);
        if done && !finish_resync(cluster, lab, resync).await? {
            return Ok(());
        }
    }
}

/// Trims the lab log now and then (every [`TRIM_CHECK`]) until `cancel`: when it holds more
/// records that no longer change the lab (trials removed by retention, deleted harnesses, the
/// records that removed them) than `max_dead` and than live ones (`--lab-log-max-dead`).
pub(super) async fn trim_loop(
    cluster: Arc<Cluster>,
    lab: Arc<LabLog>,
    max_dead: u64,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(TRIM_CHECK) => {}
        }
        if let Err(e) = trim_if_due(&cluster, &lab, max_dead).await {
            tracing::warn!(error = %e, "trimming the lab log failed; retried later");
        }
    }
}

async fn trim_if_due(cluster: &Arc<Cluster>, lab: &LabLog, max_dead: u64) -> Result<()> {
    if lab.store.lab_resyncing()? {
        // Its store is not the log's yet.
        return Ok(());
    }
    let stream = lab.ensure_stream().await?;
    let held = stream.cached_info().state.messages;
    let store = lab.store.clone();
    let live = tokio::task::spawn_blocking(move || store.lab_live_count()).await??;
    let dead = held.saturating_sub(live);
    if dead <= max_dead.max(live) {
        return Ok(());
    }
    let lease = cluster.lease.load(std::sync::atomic::Ordering::Acquire);
    if lease == 0 {
        return Ok(());
    }
    // One trim at a time in the cluster, held on this node's lease.
    let key = etcd::lab_trim_key();
    let value = etcd::encode("the lab log's trim", &cluster.cfg.node_id)?;
    let taken = etcd::commit(
        &mut cluster.etcd(),
        &cluster.cfg.etcd,
        "taking the lab log's trim",
        vec![etcd::unchanged(&key, &None)],
        vec![TxnOp::put(
            key.clone(),
            value,
            Some(PutOptions::new().with_lease(lease)),
        )],
    )
    .await?;
    let Some(rev) = taken else {
        return Ok(());
    };
    let res = trim(cluster, lab, &stream, rev).await;
    let released = etcd::commit(
        &mut cluster.etcd(),
        &cluster.cfg.etcd,
        "releasing the lab log's trim",
        vec![etcd::incarnation(&key, rev)],
        vec![TxnOp::delete(key.clone(), None)],
    )
    .await;
    res.and(released.map(|_| ()))
}

/// Deletes the lab log's dead records up to what this node mirrored, after raising the
/// horizon to the last record it read (which stays, so a node behind meets a gap before it).
/// `trim_rev`: the trim key's create revision (this node's hold).
async fn trim(
    cluster: &Arc<Cluster>,
    lab: &LabLog,
    stream: &stream::Stream,
    trim_rev: i64,
) -> Result<()> {
    let upto = lab.store.lab_applied()?;
    let what = "reading the lab log to trim it";
    let batches = super::log::read_from(stream, 1, MIRROR_BATCH, &lab.urls, what).await?;
    tokio::pin!(batches);
    let mut dead = Vec::new();
    let mut last = 0;
    let mut creates: HashMap<(Name, Name), u64> = HashMap::new();
    let mut trials = Vec::new();
    let mut pins = Vec::new();
    'read: loop {
        let batch = tokio::time::timeout(PUBLISH_TIMEOUT, batches.next())
            .await
            .map_err(|_| unavailable(&lab.urls, what, "timed out"))?
            .ok_or_else(|| unavailable(&lab.urls, what, "the consumer ended"))?;
        for (seq, payload) in batch.messages {
            if seq > upto {
                break 'read;
            }
            last = seq;
            match serde_json::from_slice::<LabRecord>(&payload) {
                Err(_) => dead.push(seq),
                Ok(LabRecord::HarnessCreated { harness, .. }) => {
                    let key = (harness.index, harness.name);
                    dead.extend(creates.insert(key, seq));
                }
                Ok(LabRecord::HarnessDeleted { index, name, .. }) => {
                    dead.extend(creates.remove(&(index, name)));
                    dead.push(seq);
                }
                Ok(LabRecord::Trial { .. }) => trials.push(seq),
                Ok(LabRecord::TrialsRemoved { .. }) => dead.push(seq),
                Ok(LabRecord::TrialPinned { trial_id, .. }) => pins.push((seq, trial_id)),
            }
        }
        if let Some(e) = batch.failed {
            return Err(e);
        }
        if batch.pending == 0 || last >= upto {
            break;
        }
    }
    // Live or dead by what this node's store has now (it mirrored `upto` at least): a record
    // dead here was undone by a record at or before what it mirrored, which a node re-reading
    // the log either meets too or, trimmed with it, never needs.
    let store = lab.store.clone();
    let mut dead = tokio::task::spawn_blocking(move || -> Result<Vec<u64>> {
        for ((index, name), seq) in creates {
            if !store.has_harness(index.as_str(), name.as_str())? {
                dead.push(seq);
            }
        }
        for seq in trials {
            if !store.has_trial(seq)? {
                dead.push(seq);
            }
        }
        for (seq, trial) in pins {
            if !store.has_trial(trial)? {
                dead.push(seq);
            }
        }
        Ok(dead)
    })
    .await??;
    dead.retain(|&seq| seq != last);
    dead.sort_unstable();
    if dead.is_empty() {
        return Ok(());
    }
    raise_horizon(cluster, last, trim_rev).await?;
    for (i, seq) in dead.iter().enumerate() {
        if i % 64 == 63 {
            // Still this node's trim (its lease did not expire meanwhile).
            let held = etcd::read(
                &mut cluster.etcd(),
                &cluster.cfg.etcd,
                "checking the lab log's trim",
                &[etcd::lab_trim_key()],
            )
            .await?;
            if held[0].as_ref().map(|r| r.create_revision) != Some(trim_rev) {
                return Err(Error::Unavailable(
                    "this node lost the lab log's trim (its lease expired); another node trims it"
                        .into(),
                ));
            }
        }
        let deleted = tokio::time::timeout(PUBLISH_TIMEOUT, stream.delete_message(*seq))
            .await
            .map_err(|_| unavailable(&lab.urls, "trimming the lab log", "timed out"))?;
        use async_nats::jetstream::stream::DeleteMessageErrorKind as Kind;
        match deleted {
            Ok(_) => {}
            // Gone already (purged with its index, or by an earlier trim).
            Err(e) if matches!(e.kind(), Kind::JetStream(_)) => {}
            Err(e) => return Err(unavailable(&lab.urls, "trimming the lab log", e)),
        }
    }
    tracing::info!(
        removed = dead.len(),
        horizon = last,
        "trimmed the cluster's lab log"
    );
    Ok(())
}

/// Raises the lab log's horizon to `to` (never lowers it) while this node holds the trim.
async fn raise_horizon(cluster: &Cluster, to: u64, trim_rev: i64) -> Result<()> {
    let key = etcd::lab_horizon_key();
    for _ in 0..5 {
        let read = etcd::read(
            &mut cluster.etcd(),
            &cluster.cfg.etcd,
            "reading the lab log's horizon",
            std::slice::from_ref(&key),
        )
        .await?;
        if horizon_of(&read[0])? >= to {
            return Ok(());
        }
        let done = etcd::commit(
            &mut cluster.etcd(),
            &cluster.cfg.etcd,
            "raising the lab log's horizon",
            vec![
                etcd::unchanged(&key, &read[0]),
                etcd::incarnation(&etcd::lab_trim_key(), trim_rev),
            ],
            vec![TxnOp::put(
                key.clone(),
                etcd::encode("the lab log's horizon", &to)?,
                None,
            )],
        )
        .await?;
        if done.is_some() {
            return Ok(());
        }
    }
    Err(Error::Unavailable(
        "the lab log's horizon kept changing, or this node lost its trim: trimmed later".into(),
    ))
}

impl Cluster {
    /// Makes sure a lab record of index `name`, incarnation `uid`, finds its local replica when
    /// the cluster has it (the catalog watch may not have created it yet): else the record is
    /// of an index deleted since, which the mirror skips.
    async fn replica_for(self: &Arc<Self>, name: &Name, uid: u64) -> Result<()> {
        if self.catalog.handle(name).ok().and_then(|h| h.cluster_uid) == Some(uid) {
            return Ok(());
        }
        match super::etcd::get_index(&mut self.etcd(), &self.cfg.etcd, name.as_str()).await? {
            Some((entry, u)) if u == uid => self.ensure_local(&entry, uid).await.map(|_| ()),
            _ => Ok(()),
        }
    }
}
