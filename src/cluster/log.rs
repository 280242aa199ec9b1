//! The write log in NATS JetStream: one stream per index shard, publishing with dedupe ids,
//! and each node's apply loop.
//!
//! Stream `VECTORD_<uid>_S<shard>` holds subject `vectord.v1.idx.<uid>.s<shard>` (file storage,
//! replicas min(3, servers), a 2-minute duplicate window; trimmed below what every live node
//! still needs by `catchup.rs`, nothing discarded otherwise). A write is
//! acknowledged to the client only after JetStream acknowledged it with its stream sequence.
//!
//! The apply loop reads the stream with an ordered consumer from the sequence after the one
//! the node's store holds (the `applied` record, written in the same transaction as the data),
//! so the store, not the consumer, is the truth of where a node is: no durable consumer state
//! can disagree with the data after a crash, and a restart resumes exactly after what is on
//! disk.

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;

use crate::catalog::{Catalog, IndexHandle};
use crate::error::{Error, Result};
use crate::store::WriteOp;

use super::codec;

/// Longest a publish may wait for JetStream's acknowledgement.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(3);
/// How long JetStream drops a second message with the same id.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// Messages applied in one group commit at most.
const APPLY_BATCH: usize = 256;

pub fn stream_name(uid: u64, shard: u32) -> String {
    format!("VECTORD_{uid}_S{shard}")
}
pub fn subject(uid: u64, shard: u32) -> String {
    format!("vectord.v1.idx.{uid}.s{shard}")
}

pub struct WriteLog {
    pub client: async_nats::Client,
    js: jetstream::Context,
    urls: Vec<String>,
    replicas: usize,
}

/// The NATS servers of `--nats` and the options every connection of a node uses (named
/// `name`, reconnecting forever, calls bounded by [`PUBLISH_TIMEOUT`]).
pub fn connect_options(
    urls: &[String],
    access: &super::EngineAccess,
    name: String,
) -> Result<(Vec<async_nats::ServerAddr>, async_nats::ConnectOptions)> {
    let addrs = urls
        .iter()
        .map(|u| {
            u.parse::<async_nats::ServerAddr>()
                .map_err(|e| Error::invalid(format!("--nats {u:?}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(2))
        .request_timeout(Some(PUBLISH_TIMEOUT))
        .max_reconnects(None);
    if super::EngineAccess::tls(urls, "tls://") {
        options = options.require_tls(true);
        if let Some(ca) = &access.ca {
            options = options.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &access.cert {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
    }
    if let (Some(user), Some(password)) = (&access.user, &access.password) {
        options = options.user_and_password(user.clone(), password.clone());
    }
    Ok((addrs, options))
}

impl WriteLog {
    /// Connects (failing within a few seconds when no server answers); reconnects by itself
    /// afterwards, forever.
    pub async fn connect(
        urls: &[String],
        access: &super::EngineAccess,
        node_id: &str,
    ) -> Result<Self> {
        let (addrs, options) = connect_options(urls, access, format!("vectord-{node_id}"))?;
        let client = options
            .connect(addrs)
            .await
            .map_err(|e| unavailable(urls, "connecting", e))?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(PUBLISH_TIMEOUT);
        let known = client.server_info().connect_urls.len();
        let replicas = urls.len().max(known).clamp(1, 3);
        Ok(WriteLog {
            client,
            js,
            urls: urls.to_vec(),
            replicas,
        })
    }

    /// The largest message the connected NATS server takes (its `max_payload`), when known.
    pub fn max_payload(&self) -> Option<usize> {
        Some(self.client.server_info().max_payload).filter(|&m| m > 0)
    }

    fn check_connected(&self) -> Result<()> {
        match self.client.connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            state => Err(unavailable(
                &self.urls,
                "",
                format!("not connected ({state:?}): the write was not logged; retry later"),
            )),
        }
    }

    fn stream_config(&self, uid: u64, shard: u32) -> stream::Config {
        stream::Config {
            name: stream_name(uid, shard),
            subjects: vec![subject(uid, shard)],
            storage: stream::StorageType::File,
            num_replicas: self.replicas,
            duplicate_window: DUPLICATE_WINDOW,
            description: Some("vectord write log (docs/cluster.md)".into()),
            ..Default::default()
        }
    }

    /// Creates the shard's stream if it does not exist (an existing one is kept as it is).
    pub async fn ensure_stream(&self, uid: u64, shard: u32) -> Result<stream::Stream> {
        self.check_connected()?;
        tokio::time::timeout(
            PUBLISH_TIMEOUT,
            self.js.get_or_create_stream(self.stream_config(uid, shard)),
        )
        .await
        .map_err(|_| unavailable(&self.urls, "creating the write log", "timed out"))?
        .map_err(|e| unavailable(&self.urls, "creating the write log", e))
    }

    /// The shard's stream; UNAVAILABLE naming NATS when it does not exist (yet) or NATS does
    /// not answer.
    pub async fn get_stream(&self, uid: u64, shard: u32) -> Result<stream::Stream> {
        self.check_connected()?;
        tokio::time::timeout(PUBLISH_TIMEOUT, self.js.get_stream(stream_name(uid, shard)))
            .await
            .map_err(|_| unavailable(&self.urls, "reading the write log", "timed out"))?
            .map_err(|e| unavailable(&self.urls, "reading the write log", e))
    }

    /// The first and last sequence the shard's stream holds (an empty stream: last + 1, last;
    /// a trimmed stream's first is past 1).
    pub async fn bounds(&self, uid: u64, shard: u32) -> Result<(u64, u64)> {
        let state = self
            .get_stream(uid, shard)
            .await?
            .cached_info()
            .state
            .clone();
        Ok((state.first_sequence, state.last_sequence))
    }

    /// Trims the shard's stream: removes every message below sequence `below` (JetStream's
    /// purge up to a sequence: idempotent, a second trim to the same place removes nothing).
    /// The number of messages removed.
    pub async fn trim_below(&self, uid: u64, shard: u32, below: u64) -> Result<u64> {
        let stream = self.get_stream(uid, shard).await?;
        let what = "trimming the write log";
        tokio::time::timeout(
            PUBLISH_TIMEOUT,
            stream.purge().sequence(below).into_future(),
        )
        .await
        .map_err(|_| unavailable(&self.urls, what, "timed out"))?
        .map(|r| r.purged)
        .map_err(|e| unavailable(&self.urls, what, e))
    }

    /// Removes the shard's stream (its index is deleted).
    pub async fn delete_stream(&self, uid: u64, shard: u32) -> Result<()> {
        match tokio::time::timeout(
            PUBLISH_TIMEOUT,
            self.js.delete_stream(stream_name(uid, shard)),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(unavailable(&self.urls, "deleting the write log", e)),
            Err(_) => Err(unavailable(
                &self.urls,
                "deleting the write log",
                "timed out",
            )),
        }
    }

    /// Logs one write with dedupe id `msg_id`; its stream sequence once JetStream has it.
    /// UNAVAILABLE naming NATS when not connected or not acknowledged within
    /// [`PUBLISH_TIMEOUT`]; RESOURCE_EXHAUSTED when the message is larger than the server takes.
    ///
    /// Returns the sequence, and whether JetStream found the id already logged (a retry: the
    /// sequence is then the first write's).
    pub async fn publish(&self, uid: u64, op: &WriteOp, msg_id: &str) -> Result<(u64, bool)> {
        self.check_connected()?;
        let payload = codec::encode(op);
        let max = self.client.server_info().max_payload;
        if max > 0 && payload.len() > max {
            return Err(Error::Limit(format!(
                "the write is {} bytes in the write log; the NATS server takes messages of at most {max} bytes (its max_payload): split it",
                payload.len()
            )));
        }
        let payload = bytes::Bytes::from(payload);
        let mut created = false;
        loop {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", msg_id);
            let res = tokio::time::timeout(PUBLISH_TIMEOUT, async {
                let ack = self
                    .js
                    .publish_with_headers(subject(uid, 0), headers, payload.clone())
                    .await?;
                ack.await
            })
            .await;
            use async_nats::jetstream::context::PublishErrorKind as Kind;
            match res {
                Ok(Ok(ack)) => return Ok((ack.sequence, ack.duplicate)),
                // No stream yet (its creation failed when the index was created): create it
                // once and publish again.
                Ok(Err(e)) if !created && matches!(e.kind(), Kind::StreamNotFound) => {
                    self.ensure_stream(uid, 0).await?;
                    created = true;
                }
                Ok(Err(e)) if matches!(e.kind(), Kind::TimedOut | Kind::BrokenPipe) => {
                    return Err(unavailable(
                        &self.urls,
                        "",
                        format!(
                            "did not acknowledge the write ({e}): it may or may not be logged; retry with the same request_id to apply it once"
                        ),
                    ))
                }
                Ok(Err(e)) => {
                    return Err(unavailable(
                        &self.urls,
                        "",
                        format!(
                            "the write failed ({e}); retry with the same request_id to apply it at most once"
                        ),
                    ))
                }
                Err(_) => {
                    return Err(unavailable(
                        &self.urls,
                        "",
                        format!(
                            "did not acknowledge the write within {} s: it may or may not be logged; retry with the same request_id to apply it once",
                            PUBLISH_TIMEOUT.as_secs()
                        ),
                    ))
                }
            }
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

/// What the apply loop tells about the writes it applied (their outcomes by sequence).
pub type OnApplied = Arc<dyn Fn(u64, &[(u64, u64)]) + Send + Sync>;

/// Why [`apply_from`] stopped without an error.
#[derive(Debug)]
pub enum Stopped {
    /// The next message the replica needs is no longer in the stream (trimmed below `first`):
    /// it must be copied from a peer (`catchup.rs`).
    Trimmed { needed: u64, first: u64 },
}

/// One batch read from a stream ([`read_from`]): its messages as (stream sequence, payload), in
/// order, and the error that cut it short (the reader then starts again from its store).
pub struct Batch {
    pub messages: Vec<(u64, bytes::Bytes)>,
    pub failed: Option<Error>,
    /// The messages the stream held after the batch's last one when it was delivered (0: the
    /// reader was at the stream's end then).
    pub pending: u64,
}

/// Reads `stream` from sequence `start` with an ordered consumer (the node's store, not NATS,
/// keeps its position): the messages in batches of what is ready, at most `max` each. Errors
/// name NATS and `what` (e.g. "reading the write log").
pub async fn read_from(
    stream: &stream::Stream,
    start: u64,
    max: usize,
    urls: &[String],
    what: &'static str,
) -> Result<impl futures_util::Stream<Item = Batch>> {
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            ..Default::default()
        })
        .await
        .map_err(|e| unavailable(urls, what, e))?;
    let messages = consumer
        .messages()
        .await
        .map_err(|e| unavailable(urls, what, e))?;
    let urls = urls.to_vec();
    Ok(messages.ready_chunks(max).map(move |batch| {
        let mut out = Batch {
            messages: Vec::with_capacity(batch.len()),
            failed: None,
            pending: u64::MAX,
        };
        for m in batch {
            let read = m
                .map_err(|e| unavailable(&urls, what, e))
                .and_then(|m| match m.info() {
                    Ok(i) => Ok((i.stream_sequence, i.pending, m.payload.clone())),
                    Err(e) => Err(unavailable(&urls, what, e)),
                });
            match read {
                Ok((seq, pending, payload)) => {
                    out.messages.push((seq, payload));
                    out.pending = pending;
                }
                Err(e) => {
                    out.failed = Some(e);
                    break;
                }
            }
        }
        out
    }))
}

/// Applies the index's write log to the replica in stream order, from the sequence after the
/// one it holds, until an error (the caller retries) or a gap: the stream no longer holds the
/// next message needed ([`Stopped::Trimmed`]; JetStream sequences are contiguous, so a jump
/// is a trim).
pub async fn apply_from(
    log: &WriteLog,
    catalog: &Arc<Catalog>,
    handle: &Arc<IndexHandle>,
    cluster_uid: u64,
    on_applied: &OnApplied,
) -> Result<Stopped> {
    // Never created here: an apply loop outliving its index (deleted on another node, its
    // stream removed) must not bring the stream back. CreateIndex creates it, or the first
    // publish when that failed; until then this retries.
    let stream = log.get_stream(cluster_uid, 0).await?;
    let start = handle.applied() + 1;
    let first = stream.cached_info().state.first_sequence;
    if first > start {
        return Ok(Stopped::Trimmed {
            needed: start,
            first,
        });
    }
    let mut next = start;
    let what = "reading the write log";
    let batches = read_from(&stream, start, APPLY_BATCH, &log.urls, what).await?;
    tokio::pin!(batches);
    tracing::info!(index = %handle.meta.name, from = start, "applying the write log");
    let dimension = handle.meta.dimension;
    while let Some(Batch {
        messages,
        mut failed,
        ..
    }) = batches.next().await
    {
        let mut waiting = Vec::with_capacity(messages.len());
        let mut trimmed = None;
        for (seq, payload) in messages {
            if seq < next {
                continue;
            }
            if seq > next {
                trimmed = Some(Stopped::Trimmed {
                    needed: next,
                    first: seq,
                });
                break;
            }
            next = seq + 1;
            let op = match codec::decode(&payload, dimension) {
                Ok(op) => op,
                Err(e) => {
                    // Every node decodes the same bytes the same way: skipping keeps them equal.
                    tracing::error!(index = %handle.meta.name, seq, error = %e, "a write log message is unreadable: skipped");
                    WriteOp::Delete(Vec::new())
                }
            };
            waiting.push((seq, catalog.queue_logged(handle, op, seq).await?));
        }
        let mut outcomes = Vec::with_capacity(waiting.len());
        for (seq, answer) in waiting {
            let outcome = answer
                .await
                .map_err(|_| Error::Unavailable("the index's writes have stopped".into()))
                .and_then(|r| r);
            match outcome {
                Ok(o) => outcomes.push((seq, o.affected)),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        // The outcomes first, then the applied mark: a writer waiting for its sequence must
        // find its outcome when it wakes.
        if let Some(&(last, _)) = outcomes.last() {
            on_applied(cluster_uid, &outcomes);
            handle.mark_applied(last);
            catalog.after_logged_write(handle);
        }
        if let Some(e) = failed {
            return Err(e);
        }
        if let Some(t) = trimmed {
            return Ok(t);
        }
    }
    Err(unavailable(
        &log.urls,
        "reading the write log",
        "the consumer ended",
    ))
}
