//! ClusterService: the nodes of the cluster, from etcd.

use std::sync::Arc;

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

#[tonic::async_trait]
impl ClusterService for ClusterApi {
    async fn list_nodes(
        &self,
        _req: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let cluster = self.core.app()?.cluster.as_ref().ok_or_else(|| {
            Error::Precondition(
                "this server is a single node: it was started without --etcd and --nats".into(),
            )
        })?;
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
