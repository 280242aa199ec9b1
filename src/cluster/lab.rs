//! The cluster's lab log in NATS JetStream (docs/cluster.md): harnesses and trials shared by
//! every node (`autotune::shared`).
//!
//! One stream for the cluster, `VECTORD_LAB`, one subject per index incarnation,
//! `vectord.v1.lab.<uid>` (file storage, replicas min(3, servers), a 2-minute duplicate window,
//! nothing discarded but by DeleteIndex, which purges its index's subject). One stream, not one
//! per index: a trial's id is its record's stream sequence, and trial ids must be unique across
//! the cluster (GetTrial and Promote take an id alone). Lab records are about a whole index (a
//! harness's ground truth and a trial's graph cover all its points), so an index with several
//! shards keeps one subject.
//!
//! Every node mirrors the stream into its store with an ordered consumer from the sequence
//! after the one its store holds (written in the same transaction as each mirrored record), so
//! a restarted node resumes after what it has, and a new one replays the stream.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::autotune::shared::{self, LabRecord, SharedLab};
use crate::error::{Error, Result};
use crate::model::Name;
use crate::store::Store;

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
    pub async fn connect(urls: &[String], node_id: &str, store: Arc<Store>) -> Result<Arc<Self>> {
        let (addrs, options) = super::log::connect_options(urls, format!("vectord-{node_id}-lab"))?;
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
        self.wait_mirrored(seq).await?;
        Ok(seq)
    }

    async fn sync(&self) -> Result<()> {
        // The stream's state as NATS answers it now: every record logged so far is at or below
        // its last sequence.
        let last = self
            .ensure_stream()
            .await?
            .cached_info()
            .state
            .last_sequence;
        self.wait_mirrored(last).await
    }
}

impl LabLog {
    /// Waits until this node mirrored the log up to `seq`, at most [`MIRROR_WAIT`].
    async fn wait_mirrored(&self, seq: u64) -> Result<()> {
        let mut mirrored = self.mirrored.subscribe();
        let waited = tokio::time::timeout(MIRROR_WAIT, mirrored.wait_for(|at| *at >= seq)).await;
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
    let stream = lab.ensure_stream().await?;
    let start = lab.store.lab_applied()? + 1;
    let what = "reading the lab log";
    let batches = super::log::read_from(&stream, start, MIRROR_BATCH, &lab.urls, what).await?;
    tokio::pin!(batches);
    tracing::info!(from = start, "mirroring the lab log");
    while let Some(super::log::Batch {
        messages,
        mut failed,
    }) = batches.next().await
    {
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
            tokio::task::spawn_blocking(move || {
                records
                    .iter()
                    .try_for_each(|(seq, r)| shared::mirror(&store, *seq, r.as_ref()))
            })
            .await??;
            lab.store.flush().await?;
            lab.mirrored.send_modify(|at| *at = (*at).max(last));
        }
        if let Some(e) = failed {
            return Err(e);
        }
    }
    Err(unavailable(
        &lab.urls,
        "reading the lab log",
        "the consumer ended",
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
