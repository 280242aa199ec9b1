//! Catching a replica up from a peer, and trimming the write log (docs/cluster.md, "Catching
//! up from a peer" and "Retention of the write log").
//!
//! Invariants:
//! - A replica that must start from nothing (it has applied nothing and a live peer has applied
//!   more than `behind_messages` messages, or the stream no longer holds the next message it
//!   needs) copies the index's points from a live peer (`FetchIndexState`, through
//!   [`StateSource`]: the gRPC client lives in `grpc/peer.rs`). The peer sends a consistent
//!   copy at one applied sequence S (`Catalog::replica_state`: the store's applied record
//!   checked around the read, or the read made under the index's writer lock, so the apply
//!   waits for the read and never for the transfer).
//! - The copy is staged in the store under a fresh uid that no index record names, chunk by
//!   chunk, and becomes the replica only by one transaction (`Catalog::replace_replica`): a
//!   copy cut short (a peer gone, a timeout, a crash) leaves nothing visible, its staged points
//!   are removed (or swept at the next start), and the replica stays what it was: NOT_SERVING
//!   for the index until the catch-up is retried and succeeds. After the switch the node
//!   follows the stream from S + 1, so a write logged during the copy is applied.
//! - After the points the peer may send its graph (its active generation's snapshot file and
//!   the ids written since it, up to S): it goes to a temp file of the snapshot directory
//!   named for the staged uid, and the install loads it and applies those ids from the copy
//!   instead of building (`catalog::PeerGraph`). The graph is optional: a part that is wrong,
//!   too big or missing drops it, never the copy, and the graph is built from the points.
//! - Everything is bounded: each chunk must come within [`CHUNK_IDLE`], the whole copy within
//!   [`COPY_TIMEOUT`], and the peer's announced point count bounds what is staged.
//! - Peers are tried by how much they applied, most first; when none can send a copy the stream
//!   is replayed instead if it still holds what the replica needs, else the replica stays
//!   NOT_SERVING (logged, saying why) and the catch-up is retried every [`RETRY`].
//! - Trimming: the live node with the smallest node id trims each index's stream, every
//!   [`TRIM_EVERY`], below the smallest applied sequence any live node reports for the index
//!   (a live node without the index counts as 0) minus `--log-keep-messages`. JetStream's
//!   purge up to a sequence is idempotent, so two nodes that both believe they are first do no
//!   harm.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::catalog::{IndexHandle, PeerGraph};
use crate::error::{Error, Result};
use crate::model::{HnswConfig, Name, Point};
use crate::store::Applied;

use super::log::{self, Stopped};
use super::Cluster;

/// Longest a copy waits for the peer's next chunk (or its answer to the call).
pub const CHUNK_IDLE: Duration = Duration::from_secs(30);
/// Longest a whole copy from one peer may take (transfer and graph build).
pub const COPY_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How soon a failed catch-up is tried again.
pub const RETRY: Duration = Duration::from_secs(2);
/// How often the trimming node looks at the streams.
pub const TRIM_EVERY: Duration = Duration::from_secs(5);
/// `--log-keep-messages` when not given.
pub const DEFAULT_LOG_KEEP_MESSAGES: u64 = 10_000;

/// One chunk of a peer's copy of an index.
pub struct StateChunk {
    /// The write-log sequence the whole copy is at.
    pub sequence: u64,
    /// Points in the whole copy.
    pub point_count: u64,
    /// The index's `points_changed` at `sequence` (refresh policies count it across nodes).
    pub points_changed: u64,
    pub points: Vec<Point>,
    /// After the points, when the peer sends its graph (see `GraphCopy` in catalog/replica.rs).
    pub graph: Option<GraphChunk>,
}

/// A part of a peer's graph (proto `GraphPart`).
pub struct GraphChunk {
    pub data: Vec<u8>,
    pub size: u64,
    pub snapshot_seq: u64,
    pub source_uid: u64,
    pub touched: Vec<u64>,
    /// None when the peer sent one this node would refuse.
    pub config: Option<crate::model::HnswConfig>,
}

pub type StateStream = BoxStream<'static, Result<StateChunk>>;

/// Fetches an index's copy from a peer at `addr` (its advertise address): `FetchIndexState`.
pub trait StateSource: Send + Sync {
    fn fetch(
        &self,
        addr: &str,
        index: &Name,
        cluster_uid: u64,
    ) -> BoxFuture<'static, Result<StateStream>>;
}

/// The node's [`StateSource`], set by the server (the edge owns the gRPC client).
#[derive(Clone)]
pub struct Peers(pub Arc<dyn StateSource>);

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Peers")
    }
}

/// A test hook (no flag sets it): while `fail` is set every copy fails after its first chunk
/// (`failures` counts them); a copy that arrived whole waits at `hold` before it is installed
/// (`held` counts those).
#[derive(Debug)]
pub struct CatchUpHook {
    pub fail: AtomicBool,
    pub failures: AtomicU64,
    pub hold: crate::autotune::jobs::JobGate,
    pub held: AtomicU64,
    /// Copies installed with the peer's graph (not one built here).
    pub graphs_loaded: AtomicU64,
}

/// Why a replica needs a copy.
enum Need {
    /// The stream no longer holds message `needed`.
    Trimmed { needed: u64, first: u64 },
    /// It has nothing, and a peer is far ahead (the stream still starts at 1).
    Empty,
}

impl Cluster {
    /// Follows index `name` (incarnation `uid`)'s write log until `cancel`: copies the replica
    /// from a peer when it must start from nothing, then applies the stream. Failures are
    /// logged and retried.
    pub(super) async fn follow_log(
        self: Arc<Self>,
        name: Name,
        uid: u64,
        cancel: CancellationToken,
        on_applied: log::OnApplied,
    ) {
        if let Some(gate) = self.cfg.apply_gate.clone() {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = gate.pass(&name) => {}
            }
        }
        let mut warned = false;
        loop {
            let handle = match self.catalog.handle(&name) {
                Ok(h) if h.cluster_uid == Some(uid) => h,
                // Dropped, or another incarnation: its own loop follows it.
                _ => return,
            };
            let step = async {
                let need = match self.needs_copy(&handle, uid).await? {
                    Some(n) => n,
                    None => {
                        match log::apply_from(&self.log, &self.catalog, &handle, uid, &on_applied)
                            .await?
                        {
                            Stopped::Trimmed { needed, first } => Need::Trimmed { needed, first },
                        }
                    }
                };
                self.catch_up(&handle, uid, need, &on_applied).await
            };
            let res = tokio::select! {
                _ = cancel.cancelled() => return,
                r = step => r,
            };
            match res {
                Ok(()) => {
                    warned = false;
                    continue;
                }
                Err(e) => {
                    if !warned {
                        tracing::warn!(index = %name, applied = handle.applied(), error = %e, "applying the write log stopped; retrying");
                        warned = true;
                    }
                }
            }
            drop(handle);
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(RETRY) => {}
            }
        }
    }

    /// Whether the replica must be copied from a peer before it can follow the stream.
    async fn needs_copy(&self, handle: &Arc<IndexHandle>, uid: u64) -> Result<Option<Need>> {
        let applied = handle.applied();
        let (first, last) = self.log.bounds(uid, 0).await?;
        if applied + 1 < first {
            return Ok(Some(Need::Trimmed {
                needed: applied + 1,
                first,
            }));
        }
        if applied == 0 && last > self.cfg.behind_messages {
            let best = self
                .peers_ahead(handle, applied)
                .await?
                .first()
                .map_or(0, |(_, _, a)| *a);
            if best > self.cfg.behind_messages {
                return Ok(Some(Need::Empty));
            }
        }
        Ok(None)
    }

    /// The live peers that applied more of the index than `applied`: (node id, address,
    /// applied), most applied first.
    async fn peers_ahead(
        &self,
        handle: &IndexHandle,
        applied: u64,
    ) -> Result<Vec<(String, String, u64)>> {
        let mut peers: Vec<(String, String, u64)> = self
            .list_nodes()
            .await?
            .into_iter()
            .filter(|n| n.node_id != self.cfg.node_id)
            .filter_map(|n| {
                let a = n.applied.get(handle.meta.name.as_str()).copied()?;
                (a > applied).then_some((n.node_id, n.advertise_addr, a))
            })
            .collect();
        peers.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
        Ok(peers)
    }

    /// Copies the replica from the first peer that can send it; or, when none can, replays the
    /// stream if it still holds what the replica needs. The replica is NOT_SERVING meanwhile.
    async fn catch_up(
        self: &Arc<Self>,
        handle: &Arc<IndexHandle>,
        uid: u64,
        need: Need,
        on_applied: &log::OnApplied,
    ) -> Result<()> {
        let name = handle.meta.name.clone();
        let applied = handle.applied();
        self.control.set_rollout_if_known(name.as_str(), |r| {
            let changed = !r.log_behind;
            r.log_behind = true;
            changed
        });
        let Some(peers) = self.cfg.peers.clone() else {
            return Err(Error::Unavailable(
                "this node cannot call its peers (no peer client)".into(),
            ));
        };
        let mut errors = Vec::new();
        for (node, addr, at) in self.peers_ahead(handle, applied).await? {
            tracing::info!(index = %name, peer = node, addr, peer_applied = at, applied, "copying the index from a peer");
            let started = std::time::Instant::now();
            match tokio::time::timeout(COPY_TIMEOUT, self.copy_from(&peers, &addr, handle, uid))
                .await
                .unwrap_or_else(|_| {
                    Err(Error::Unavailable(format!(
                        "the copy took longer than {} s",
                        COPY_TIMEOUT.as_secs()
                    )))
                }) {
                Ok(new) => {
                    tracing::info!(index = %name, peer = node, points = new.point_count(), sequence = new.applied(), millis = started.elapsed().as_millis() as u64, "caught the index up from a peer");
                    self.check_rollout(name.as_str(), true);
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(index = %name, peer = node, error = %e, "copying the index from a peer failed; trying the next one");
                    errors.push(format!("{node}: {e}"));
                }
            }
        }
        if errors.is_empty() {
            errors.push("no live peer has applied more of it".into());
        }
        match need {
            Need::Empty => {
                tracing::info!(index = %name, "no peer could send the index: replaying its write log from the start");
                log::apply_from(&self.log, &self.catalog, handle, uid, on_applied)
                    .await
                    .map(|_| ())
            }
            Need::Trimmed { needed, first } => {
                let why = format!(
                    "index {name}: this node needs write-log message {needed}, the stream now starts at {first} (trimmed), and no peer could send a copy ({}): NOT_SERVING for the index; retrying every {} s",
                    errors.join("; "),
                    RETRY.as_secs()
                );
                tracing::error!("{why}");
                Err(Error::Unavailable(why))
            }
        }
    }

    /// One copy from the peer at `addr`, staged then installed; the new replica's handle.
    async fn copy_from(
        &self,
        peers: &Peers,
        addr: &str,
        handle: &Arc<IndexHandle>,
        uid: u64,
    ) -> Result<Arc<IndexHandle>> {
        let store = self.catalog.store().clone();
        let staged = store.new_uid()?;
        let res = self.stage_copy(peers, addr, handle, uid, staged).await;
        let res = match res {
            Ok((sequence, count, changed, graph)) => {
                let applied = Applied {
                    cluster_uid: uid,
                    sequence,
                };
                let installed = self
                    .catalog
                    .replace_replica(handle, staged, count, changed, applied, graph)
                    .await;
                if let (Ok((_, true)), Some(hook)) = (&installed, &self.cfg.catchup_hook) {
                    hook.graphs_loaded.fetch_add(1, Ordering::AcqRel);
                }
                installed.map(|(h, _)| h)
            }
            Err(e) => Err(e),
        };
        if res.is_err() {
            // Nothing of it is visible: its staged points go (the next start sweeps them too).
            let name = handle.meta.name.to_string();
            let cleaned = tokio::task::spawn_blocking(move || -> Result<()> {
                if store.get_index(&name)?.map(|r| r.meta.uid) != Some(staged) {
                    store.remove_uid_data(staged)?;
                    crate::snapshots::remove_all(&store, staged);
                }
                Ok(())
            })
            .await;
            if let Err(e) = cleaned.map_err(Error::from).and_then(|r| r) {
                tracing::warn!(error = %e, "removing a failed copy's staged points failed: the next start sweeps them");
            }
        }
        res
    }

    /// Receives the peer's copy into the store under `staged`: (its sequence, its points, its
    /// `points_changed`, the peer's graph when it sent a whole one that fits).
    async fn stage_copy(
        &self,
        peers: &Peers,
        addr: &str,
        handle: &Arc<IndexHandle>,
        uid: u64,
        staged: u64,
    ) -> Result<(u64, u64, u64, Option<PeerGraph>)> {
        let name = &handle.meta.name;
        let dimension = handle.meta.dimension as usize;
        let idle = || {
            Error::Unavailable(format!(
                "peer {addr} sent nothing for {} s",
                CHUNK_IDLE.as_secs()
            ))
        };
        let mut chunks = tokio::time::timeout(CHUNK_IDLE, peers.0.fetch(addr, name, uid))
            .await
            .map_err(|_| idle())??;
        let mut copy: Option<(u64, u64, u64)> = None;
        let mut got = 0u64;
        let mut seen = HashSet::new();
        let mut graph = Incoming::new(self.catalog.store().dir(), staged);
        while let Some(chunk) = tokio::time::timeout(CHUNK_IDLE, chunks.next())
            .await
            .map_err(|_| idle())?
        {
            let chunk = chunk?;
            let this = (chunk.sequence, chunk.point_count, chunk.points_changed);
            let (sequence, count, _) = *copy.get_or_insert(this);
            if Some(this) != copy {
                return Err(Error::Unavailable(format!(
                    "peer {addr}'s copy changed mid-way (sequence {sequence} then {})",
                    chunk.sequence
                )));
            }
            if let Some(part) = chunk.graph {
                if got != count || !chunk.points.is_empty() {
                    return Err(Error::Unavailable(format!(
                        "peer {addr} sent its graph before all {count} points"
                    )));
                }
                graph.take_part(part, count, dimension).await;
                continue;
            }
            if graph.started() {
                return Err(Error::Unavailable(format!(
                    "peer {addr} sent points after its graph"
                )));
            }
            got += chunk.points.len() as u64;
            if got > count {
                return Err(Error::Unavailable(format!(
                    "peer {addr} sent more than the {count} points it announced"
                )));
            }
            for p in &chunk.points {
                if p.vector.len() != dimension || !seen.insert(p.id) {
                    return Err(Error::Unavailable(format!(
                        "peer {addr} sent point {} of dimension {} (or twice); the index has {dimension}",
                        p.id,
                        p.vector.len()
                    )));
                }
            }
            let store = self.catalog.store().clone();
            let points = chunk.points;
            tokio::task::spawn_blocking(move || store.stage_points(staged, &points)).await??;
            if let Some(hook) = &self.cfg.catchup_hook {
                if hook.fail.load(Ordering::Acquire) {
                    hook.failures.fetch_add(1, Ordering::AcqRel);
                    return Err(Error::Unavailable(
                        "the copy was cut short (test hook)".into(),
                    ));
                }
            }
        }
        let graph = graph.finish();
        let (sequence, count, changed) = copy.ok_or_else(|| {
            Error::Unavailable(format!("peer {addr} ended the copy before its first chunk"))
        })?;
        if got != count {
            return Err(Error::Unavailable(format!(
                "peer {addr} ended the copy after {got} of {count} points"
            )));
        }
        let (first, _) = self.log.bounds(uid, 0).await?;
        if sequence + 1 < first {
            return Err(Error::Unavailable(format!(
                "peer {addr}'s copy is at sequence {sequence}, older than the stream's first {first}"
            )));
        }
        if let Some(hook) = &self.cfg.catchup_hook {
            hook.held.fetch_add(1, Ordering::AcqRel);
            hook.hold.pass(name).await;
        }
        Ok((sequence, count, changed, graph))
    }

    /// The index's points at one applied sequence, for a peer's catch-up (FetchIndexState).
    pub async fn index_state(
        &self,
        name: &Name,
        uid: u64,
        with_graph: bool,
    ) -> Result<crate::catalog::ReplicaCopy> {
        self.catalog.replica_state(name, uid, with_graph).await
    }

    /// Trims every index's stream below what every live node still needs, minus
    /// `--log-keep-messages`, while this node is the live node with the smallest id; until the
    /// server stops.
    pub(super) async fn trim_loop(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(TRIM_EVERY) => {}
            }
            if let Err(e) = self.trim_once().await {
                tracing::debug!(error = %e, "trimming the write logs failed; trying again later");
            }
        }
    }

    async fn trim_once(&self) -> Result<()> {
        let nodes = self.list_nodes().await?;
        if nodes.iter().map(|n| n.node_id.as_str()).min() != Some(self.cfg.node_id.as_str()) {
            return Ok(());
        }
        for name in self.catalog.index_names() {
            let Some(uid) = self.catalog.handle(&name).ok().and_then(|h| h.cluster_uid) else {
                continue;
            };
            let needed = nodes
                .iter()
                .map(|n| n.applied.get(name.as_str()).copied().unwrap_or(0))
                .min()
                .unwrap_or(0);
            // Messages up to `upto` go; `keep` applied ones stay for quick restarts.
            let upto = needed.saturating_sub(self.cfg.log_keep_messages);
            if upto == 0 {
                continue;
            }
            let (first, _) = self.log.bounds(uid, 0).await?;
            if upto < first {
                continue;
            }
            let purged = self.log.trim_below(uid, 0, upto + 1).await?;
            if purged > 0 {
                tracing::info!(index = %name, below = upto + 1, purged, "trimmed the write log");
            }
        }
        Ok(())
    }
}

/// A peer's graph as it arrives ([`GraphChunk`]s after the points): the touched ids, then the
/// snapshot file's bytes into a temp file of this node's snapshot directory. Anything wrong
/// with it (a size past the bound, parts that disagree, a write that fails, an end before the
/// whole file) drops the graph, not the copy: the node builds its own graph then.
struct Incoming {
    path: std::path::PathBuf,
    file: Option<std::fs::File>,
    state: GraphState,
}

enum GraphState {
    None,
    Receiving {
        size: u64,
        got: u64,
        seq: u64,
        source_uid: u64,
        config: HnswConfig,
        touched: Vec<u64>,
    },
    Dropped,
}

/// Bytes per point a snapshot may hold at most: its id, a float vector, links of level 0 and
/// above at the contract's largest m (128), and record overhead.
fn graph_bytes_per_point(dimension: usize) -> u64 {
    (64 + 4 * dimension + 8 * 2 * 128) as u64
}

impl Incoming {
    fn new(data_dir: &std::path::Path, staged: u64) -> Self {
        Incoming {
            // Named for the staged uid: a start sweeps it (no record names it).
            path: crate::index::snapshot::dir(data_dir).join(format!("{staged}-from-peer.tmp")),
            file: None,
            state: GraphState::None,
        }
    }

    fn started(&self) -> bool {
        !matches!(self.state, GraphState::None)
    }

    fn drop_graph(&mut self, why: &str) {
        tracing::warn!(file = %self.path.display(), "the peer's graph is not used ({why}): the copy's graph is built here");
        self.state = GraphState::Dropped;
        self.file = None;
        let _ = std::fs::remove_file(&self.path);
    }

    async fn take_part(&mut self, part: GraphChunk, count: u64, dimension: usize) {
        if matches!(self.state, GraphState::Dropped) {
            return;
        }
        let Some(config) = part.config else {
            return self.drop_graph("its config is not one this node accepts");
        };
        if let GraphState::None = self.state {
            self.state = GraphState::Receiving {
                size: part.size,
                got: 0,
                seq: part.snapshot_seq,
                source_uid: part.source_uid,
                config,
                touched: Vec::new(),
            };
        }
        let GraphState::Receiving {
            size,
            got,
            seq,
            source_uid,
            config: first,
            touched,
        } = &mut self.state
        else {
            return;
        };
        if (part.size, part.snapshot_seq, part.source_uid, config)
            != (*size, *seq, *source_uid, *first)
        {
            return self.drop_graph("its parts disagree");
        }
        touched.extend_from_slice(&part.touched);
        let most_touched = 4 * (count + 1) + 100_000;
        let bound =
            (count + touched.len() as u64 + 1) * graph_bytes_per_point(dimension) + (1 << 20);
        if touched.len() as u64 > most_touched || *size > bound {
            return self.drop_graph("it is larger than the copy can need");
        }
        if (!part.touched.is_empty() && *got > 0) || *got + part.data.len() as u64 > *size {
            return self.drop_graph("its parts are out of order or past its size");
        }
        if part.data.is_empty() {
            return;
        }
        *got += part.data.len() as u64;
        let (path, file) = (self.path.clone(), self.file.take());
        let written = tokio::task::spawn_blocking(move || -> std::io::Result<std::fs::File> {
            use std::io::Write;
            let mut f = match file {
                Some(f) => f,
                None => {
                    if let Some(dir) = path.parent() {
                        std::fs::create_dir_all(dir)?;
                    }
                    std::fs::File::create(&path)?
                }
            };
            f.write_all(&part.data)?;
            Ok(f)
        })
        .await;
        match written {
            Ok(Ok(f)) => self.file = Some(f),
            Ok(Err(e)) => self.drop_graph(&format!("writing it failed: {e}")),
            Err(e) => self.drop_graph(&format!("writing it failed: {e}")),
        }
    }

    /// The whole graph, or None (a partial file is removed).
    fn finish(mut self) -> Option<PeerGraph> {
        match std::mem::replace(&mut self.state, GraphState::Dropped) {
            GraphState::Receiving {
                size,
                got,
                seq,
                source_uid,
                config,
                touched,
            } if got == size && self.file.is_some() => Some(PeerGraph {
                path: self.path.clone(),
                seq,
                source_uid,
                config,
                touched,
            }),
            GraphState::None | GraphState::Dropped => None,
            GraphState::Receiving { .. } => {
                self.drop_graph("the copy ended before the whole file");
                None
            }
        }
    }
}
