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
        let copy = cluster.index_state(&name, req.cluster_uid).await?;
        let dimension = app.catalog.handle(&name)?.meta.dimension.max(1) as usize;
        let per_chunk = (STATE_CHUNK_BYTES / (8 + 4 * dimension)).max(1);
        let (sequence, point_count, points_changed) =
            (copy.applied.sequence, copy.point_count, copy.points_changed);
        tracing::info!(index = %name, points = point_count, sequence, "sending the index's copy to a catching-up peer");
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let stop = self.core.tasks.stop_token();
        self.core.tasks.spawn(async move {
            let mut reader = copy.points;
            let mut sent = 0u64;
            loop {
                // One chunk read from the copy's file at a time, off the async runtime.
                let read = tokio::task::spawn_blocking(move || {
                    let chunk = reader.next_chunk(per_chunk);
                    (reader, chunk)
                })
                .await;
                let points = match read {
                    Ok((r, Ok(points))) => {
                        reader = r;
                        points
                    }
                    Ok((_, Err(e))) => {
                        tracing::warn!(index = %name, error = %e, "reading the index's copy for a peer failed: the transfer ended");
                        let _ = tx.send(Err(Status::from(e))).await;
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(index = %name, error = %e, "reading the index's copy for a peer failed: the transfer ended");
                        return;
                    }
                };
                let last = (points.len() as u64) < per_chunk as u64;
                let first = sent == 0;
                sent += points.len() as u64;
                if points.is_empty() && !first {
                    return;
                }
                let chunk = pb::FetchIndexStateResponse {
                    sequence,
                    point_count,
                    points_changed,
                    points: points
                        .into_iter()
                        .map(|p| pb::Point {
                            id: p.id,
                            vector: p.vector,
                        })
                        .collect(),
                };
                tokio::select! {
                    _ = stop.cancelled() => return,
                    sent = tokio::time::timeout(STATE_SEND_IDLE, tx.send(Ok(chunk))) => {
                        if !matches!(sent, Ok(Ok(()))) {
                            tracing::warn!(index = %name, "a catching-up peer stopped reading the index's copy: the transfer ended");
                            return;
                        }
                    }
                }
                if last {
                    return;
                }
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
