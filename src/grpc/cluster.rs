//! ClusterService: the nodes of the cluster, from etcd; and the internal FetchIndexState a
//! catching-up node calls on a peer (`cluster/catchup.rs`; its client is `grpc/peer.rs`).

use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::Core;
use crate::error::Error;
use crate::pb;
use crate::pb::cluster_service_server::ClusterService;

pub struct ClusterApi {
    core: Arc<Core>,
}

impl ClusterApi {
    pub fn new(core: Arc<Core>) -> Self {
        ClusterApi { core }
    }
}

/// Most bytes of vectors in one FetchIndexState chunk (at least one point each).
pub const STATE_CHUNK_BYTES: usize = 1 << 20;
/// Touched ids in one graph part at most (1 MiB of ids).
pub const TOUCHED_PER_PART: usize = 131_072;
/// Longest FetchIndexState waits for its receiver to take the next chunk.
pub const STATE_SEND_IDLE: std::time::Duration = std::time::Duration::from_secs(30);

fn single_node() -> Error {
    Error::Precondition(
        "this server is a single node: it was started without --etcd and --nats".into(),
    )
}

#[tonic::async_trait]
impl ClusterService for ClusterApi {
    type FetchIndexStateStream = ReceiverStream<Result<pb::FetchIndexStateResponse, Status>>;

    async fn fetch_index_state(
        &self,
        req: Request<pb::FetchIndexStateRequest>,
    ) -> Result<Response<Self::FetchIndexStateStream>, Status> {
        let req = req.into_inner();
        let name = super::convert::name("index_name", &req.index_name)?;
        let app = self.core.app()?;
        let cluster = app.cluster.as_ref().ok_or_else(single_node)?;
        let copy = cluster
            .index_state(&name, req.cluster_uid, req.with_graph)
            .await?;
        tracing::info!(
            index = %name,
            points = copy.point_count,
            sequence = copy.applied.sequence,
            graph = copy.graph.is_some(),
            "sending the index's copy to a catching-up peer"
        );
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let stop = self.core.tasks.stop_token();
        self.core.tasks.spawn(async move {
            if let Err(why) = send_copy(copy, &tx, &stop).await {
                tracing::warn!(index = %name, "{why}: the transfer ended");
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn list_nodes(
        &self,
        _req: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let cluster = self.core.app()?.cluster.as_ref().ok_or_else(single_node)?;
        let nodes = cluster.list_nodes().await?;
        Ok(Response::new(pb::ListNodesResponse {
            nodes: nodes
                .into_iter()
                .map(|n| pb::Node {
                    node_id: n.node_id,
                    advertise_addr: n.advertise_addr,
                    alive: true,
                    applied: n.applied.into_iter().collect(),
                    start_time_ms: n.start_time_ms,
                })
                .collect(),
        }))
    }
}

type CopySender = tokio::sync::mpsc::Sender<Result<pb::FetchIndexStateResponse, Status>>;

/// Sends one message of the copy, unless the server stops or the receiver takes nothing for
/// [`STATE_SEND_IDLE`].
async fn send_part(
    tx: &CopySender,
    stop: &tokio_util::sync::CancellationToken,
    part: pb::FetchIndexStateResponse,
) -> Result<(), String> {
    tokio::select! {
        _ = stop.cancelled() => Err("the server is stopping".into()),
        sent = tokio::time::timeout(STATE_SEND_IDLE, tx.send(Ok(part))) => match sent {
            Ok(Ok(())) => Ok(()),
            _ => Err("a catching-up peer stopped reading the index's copy".into()),
        },
    }
}

/// FetchIndexState's producer: the copy's points, read back from its file a chunk at a time
/// off the async runtime, then (with_graph) the graph's parts: the touched ids, then the
/// snapshot file's bytes.
async fn send_copy(
    copy: crate::catalog::ReplicaCopy,
    tx: &CopySender,
    stop: &tokio_util::sync::CancellationToken,
) -> Result<(), String> {
    let per_chunk = (STATE_CHUNK_BYTES / (8 + 4 * copy.points.dimension().max(1))).max(1);
    let head = pb::FetchIndexStateResponse {
        sequence: copy.applied.sequence,
        point_count: copy.point_count,
        points_changed: copy.points_changed,
        ..Default::default()
    };
    let mut reader = copy.points;
    let mut first = true;
    loop {
        let (r, points) = tokio::task::spawn_blocking(move || {
            let chunk = reader.next_chunk(per_chunk);
            (reader, chunk)
        })
        .await
        .map_err(|e| format!("reading the index's copy failed: {e}"))?;
        reader = r;
        let points = match points {
            Ok(points) => points,
            Err(e) => {
                let why = format!("reading the index's copy failed: {e}");
                let _ = tx.send(Err(Status::from(e))).await;
                return Err(why);
            }
        };
        let last = points.len() < per_chunk;
        if points.is_empty() && !first {
            break;
        }
        first = false;
        let part = pb::FetchIndexStateResponse {
            points: points
                .into_iter()
                .map(|p| pb::Point {
                    id: p.id,
                    vector: p.vector,
                })
                .collect(),
            ..head.clone()
        };
        send_part(tx, stop, part).await?;
        if last {
            break;
        }
    }
    let Some(graph) = copy.graph else {
        return Ok(());
    };
    let part = |data: Vec<u8>, touched: Vec<u64>| pb::FetchIndexStateResponse {
        graph: Some(pb::GraphPart {
            data,
            size: graph.size,
            snapshot_seq: graph.seq,
            source_uid: graph.source_uid,
            touched,
            config: Some(super::convert::config_to(&graph.config)),
        }),
        ..head.clone()
    };
    for ids in graph.touched.chunks(TOUCHED_PER_PART) {
        send_part(tx, stop, part(Vec::new(), ids.to_vec())).await?;
    }
    let mut file = graph.file;
    let mut left = graph.size;
    while left > 0 {
        let want = left.min(STATE_CHUNK_BYTES as u64) as usize;
        let (f, data) = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut buf = vec![0u8; want];
            let read = file.read_exact(&mut buf).map(|()| buf);
            (file, read)
        })
        .await
        .map_err(|e| format!("reading the index's snapshot failed: {e}"))?;
        file = f;
        let data = data.map_err(|e| format!("reading the index's snapshot failed: {e}"))?;
        left -= data.len() as u64;
        send_part(tx, stop, part(data, Vec::new())).await?;
    }
    Ok(())
}
