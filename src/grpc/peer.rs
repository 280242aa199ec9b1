//! The client of a peer's FetchIndexState (`cluster/catchup.rs` calls it through
//! [`StateSource`]): connects to the peer's advertise address (TLS when this node serves TLS,
//! trusting its own certificate's chain, the cluster's nodes sharing it; with this node's
//! certificate as its client identity under mTLS), with the admin key when keys are on.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::auth::ApiKeys;
use crate::cluster::catchup::{GraphChunk, StateChunk, StateSource, StateStream};
use crate::config::TlsConfig;
use crate::error::{Error, Result};
use crate::model::{Name, Point};
use crate::pb;
use crate::pb::cluster_service_client::ClusterServiceClient;

/// Longest a connection to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest chunk taken from a peer (a chunk holds at most 1 MiB of vectors and their ids).
const MAX_CHUNK_BYTES: usize = 4 << 20;

pub struct PeerClient {
    keys: Option<Arc<ApiKeys>>,
    tls: Option<TlsConfig>,
}

impl PeerClient {
    pub fn new(keys: Option<Arc<ApiKeys>>, tls: Option<TlsConfig>) -> Arc<Self> {
        Arc::new(PeerClient { keys, tls })
    }

    async fn connect(&self, addr: &str) -> Result<ClusterServiceClient<tonic::transport::Channel>> {
        let unavailable = |e: &dyn std::fmt::Display| {
            Error::Unavailable(format!("connecting to peer {addr}: {e}"))
        };
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| unavailable(&e))?
            .connect_timeout(CONNECT_TIMEOUT);
        if let Some(tls) = &self.tls {
            let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
            let mut cfg = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&tls.cert))
                .domain_name(host.trim_matches(['[', ']']));
            if tls.client_ca.is_some() {
                cfg = cfg.identity(Identity::from_pem(&tls.cert, &tls.key));
            }
            endpoint = endpoint.tls_config(cfg).map_err(|e| unavailable(&e))?;
        }
        let channel = endpoint.connect().await.map_err(|e| unavailable(&e))?;
        Ok(ClusterServiceClient::new(channel).max_decoding_message_size(MAX_CHUNK_BYTES))
    }
}

impl StateSource for PeerClient {
    fn fetch(
        &self,
        addr: &str,
        index: &Name,
        cluster_uid: u64,
    ) -> BoxFuture<'static, Result<StateStream>> {
        let addr = addr.to_string();
        let mut req = tonic::Request::new(pb::FetchIndexStateRequest {
            index_name: index.to_string(),
            cluster_uid,
            with_graph: true,
        });
        if let Some(keys) = &self.keys {
            if let Ok(v) = keys.admin().bearer().parse() {
                req.metadata_mut().insert("authorization", v);
            }
        }
        let client = self.connect_owned(addr.clone());
        Box::pin(async move {
            let mut client = client.await?;
            let failed = |s: tonic::Status| {
                Error::Unavailable(format!("peer {addr}: {:?}: {}", s.code(), s.message()))
            };
            let stream = client
                .fetch_index_state(req)
                .await
                .map_err(failed)?
                .into_inner();
            let stream: StateStream = stream
                .map(move |c| {
                    c.map(|c| StateChunk {
                        sequence: c.sequence,
                        point_count: c.point_count,
                        points_changed: c.points_changed,
                        points: c
                            .points
                            .into_iter()
                            .map(|p| Point {
                                id: p.id,
                                vector: p.vector,
                            })
                            .collect(),
                        graph: c.graph.map(|g| GraphChunk {
                            data: g.data,
                            size: g.size,
                            snapshot_seq: g.snapshot_seq,
                            source_uid: g.source_uid,
                            touched: g.touched,
                            // A config this node would refuse is none: the graph is not used.
                            config: super::convert::trial_config("graph.config", g.config).ok(),
                        }),
                    })
                    .map_err(|s| {
                        Error::Unavailable(format!(
                            "the copy was cut short: {:?}: {}",
                            s.code(),
                            s.message()
                        ))
                    })
                })
                .boxed();
            Ok(stream)
        })
    }
}

impl PeerClient {
    fn connect_owned(
        &self,
        addr: String,
    ) -> BoxFuture<'static, Result<ClusterServiceClient<tonic::transport::Channel>>> {
        let this = PeerClient {
            keys: self.keys.clone(),
            tls: self.tls.clone(),
        };
        Box::pin(async move { this.connect(&addr).await })
    }
}
