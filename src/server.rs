//! The server: opens the store, serves health and reflection at once, recovers the indexes,
//! then reports SERVING; on shutdown reports NOT_SERVING, lets in-flight calls finish within
//! the grace period, and flushes the store.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tonic_health::ServingStatus;

use crate::auth::AuthLayer;
use crate::autotune::{jobs::Jobs, lab::Lab};
use crate::catalog::Catalog;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::grpc::{
    autotune::AutotuneApi, cluster::ClusterApi, index::IndexApi, promotion::PromotionApi, Core,
    EdgeLimits, Ready,
};
use crate::metrics::{Metrics, RpcMetricsLayer};
use crate::pb;
use crate::promotion::Registry;
use crate::refresh::Refresher;
use crate::store::Store;

/// The names health reports on: "" (the whole server) and each vectord service.
pub const HEALTH_SERVICES: [&str; 5] = [
    "",
    "vectord.v1.IndexService",
    "vectord.v1.AutotuneService",
    "vectord.v1.PromotionService",
    "vectord.v1.ClusterService",
];

/// The largest reflection request (a symbol or file name): larger is OUT_OF_RANGE.
/// tonic-reflection answers an unknown name with NOT_FOUND quoting it whole; unbounded, a huge
/// name made a grpc-message trailer over the client's HTTP/2 header limit (16 KiB in hyper's
/// client), which then dropped the connection. 4 KiB, even percent-encoded, stays under it.
pub const MAX_REFLECTION_REQUEST_BYTES: usize = 4096;

async fn set_health(reporter: &tonic_health::server::HealthReporter, status: ServingStatus) {
    for s in HEALTH_SERVICES {
        reporter.set_service_status(s, status).await;
    }
}

/// Rewrites tonic's OUT_OF_RANGE for an oversized request into RESOURCE_EXHAUSTED, the code
/// for a limit, with a message that names the limit.
fn too_large_is_resource_exhausted<B>(mut resp: http::Response<B>) -> http::Response<B> {
    // grpc-message is percent-encoded on the wire.
    let message = resp
        .headers()
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .map(|m| m.replace("%20", " "))
        .unwrap_or_default();
    let is_too_large = resp.headers().get("grpc-status").is_some_and(|v| v == "11")
        && message.contains("decoded message length too large");
    if is_too_large {
        let msg = message
            .replace(
                "Error, decoded message length too large",
                "request too large (see --max-request-bytes)",
            )
            .replace(' ', "%20");
        let headers = resp.headers_mut();
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
        if let Ok(v) = http::HeaderValue::from_str(&msg) {
            headers.insert("grpc-message", v);
        }
    }
    resp
}

/// Serves until `shutdown` completes (or the grace period after it runs out); binds
/// `config.metrics_addr` for the metrics when it is set.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let metrics_listener = match config.metrics_addr {
        Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
            Error::Unavailable(format!("cannot listen for metrics on {addr}: {e}"))
        })?),
        None => None,
    };
    run_with(listener, metrics_listener, config, shutdown).await
}

/// [`run`] with the metrics listener already bound (None: no metrics endpoint).
pub async fn run_with(
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    crate::index::engine::set_default_engine(config.engine);
    let dir = config.data_dir.clone();
    let store = Arc::new(tokio::task::spawn_blocking(move || Store::open(&dir)).await??);
    let registry = Arc::new(Registry::new(store.clone()));

    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::NotServing).await;

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Internal(format!("reflection: {e}")))?
        .max_decoding_message_size(MAX_REFLECTION_REQUEST_BYTES);
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| Error::Internal(format!("reflection: {e}")))?
        .max_decoding_message_size(MAX_REFLECTION_REQUEST_BYTES);

    let core = Arc::new(Core::new(EdgeLimits::of(&config)));
    let max = config.max_request_bytes;
    // The answer's cap is explicit: SearchBatch checks before searching that its answer fits
    // (RESOURCE_EXHAUSTED otherwise); the other answers are bounded by page sizes and limits.
    let max_out = config.max_response_bytes;
    let index = pb::index_service_server::IndexServiceServer::new(IndexApi::new(core.clone()))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max_out);
    let promotion =
        pb::promotion_service_server::PromotionServiceServer::new(PromotionApi::new(core.clone()))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max_out);

    let autotune =
        pb::autotune_service_server::AutotuneServiceServer::new(AutotuneApi::new(core.clone()))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max_out);

    let cluster_api =
        pb::cluster_service_server::ClusterServiceServer::new(ClusterApi::new(core.clone()))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max_out);

    let (sig_tx, sig_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = sig_tx.send(true);
    });
    let local = listener.local_addr().ok();
    // Owned here, handed to the catalog (and through it to jobs): cancelled at the shutdown
    // signal, so every build (recovery, activation, trial) stops at its next chunk.
    let halt = tokio_util::sync::CancellationToken::new();
    let stop = {
        let mut rx = sig_rx.clone();
        let health = health.clone();
        let core = core.clone();
        let halt = halt.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
            tracing::info!(
                "shutting down: no new calls; in-flight calls may finish; jobs and builds are cancelled"
            );
            halt.cancel();
            core.shutdown();
            set_health(&health, ServingStatus::NotServing).await;
            if let Ok(Some(c)) = core.cluster() {
                c.leave().await;
            }
        }
    };
    let metrics = Metrics::new()?;
    if let Some(l) = metrics_listener {
        let addr = l
            .local_addr()
            .map_err(|e| Error::Unavailable(format!("metrics listener: {e}")))?;
        tracing::info!(metrics = %crate::metrics::describe(&addr), "serving metrics");
        let mut rx = sig_rx.clone();
        tokio::spawn(crate::metrics::serve(
            l,
            metrics.clone(),
            core.clone(),
            async move {
                let _ = rx.wait_for(|s| *s).await;
            },
        ));
    }
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &config.tls {
        builder = builder.tls_config(tls.server_config()).map_err(|e| {
            let cause = std::error::Error::source(&e)
                .map(|s| format!(": {s}"))
                .unwrap_or_default();
            Error::invalid(format!("TLS certificate or key not usable: {e}{cause}"))
        })?;
    }
    // The span names the method only: metadata (and so the API key) is never recorded.
    // Per connection: at most this many calls at once; a PING every interval, and the
    // connection is closed when one goes unanswered for the timeout (a peer that vanished
    // without a FIN no longer holds a slot).
    builder = builder
        .max_concurrent_streams(config.http2_max_concurrent_streams)
        .http2_keepalive_interval(config.http2_keepalive_interval)
        .http2_keepalive_timeout(Some(config.http2_keepalive_timeout));
    let connections = crate::connections::Registry::new();
    let incoming = crate::connections::incoming(
        listener,
        crate::connections::ConnLimits {
            max: config.max_connections,
            handshake_timeout: config.handshake_timeout,
            tcp_keepalive: config.tcp_keepalive,
            tls: config.tls.is_some(),
            idle_timeout: config.idle_timeout,
        },
        connections.clone(),
    );
    let serve = builder
        .trace_fn(|req| tracing::info_span!("rpc", method = %req.uri().path()))
        // Outermost: every call, refused ones included, makes its connection busy.
        .layer(connections.layer())
        .layer(RpcMetricsLayer(metrics.clone()))
        .layer(AuthLayer(config.api_keys.clone()))
        .layer(tower::util::MapResponseLayer::new(
            too_large_is_resource_exhausted,
        ))
        .layer(crate::admission::AdmissionLayer::new(
            config.max_concurrent_requests,
            config.request_timeout,
        ))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(index)
        .add_service(promotion)
        .add_service(autotune)
        .add_service(cluster_api)
        .serve_with_incoming_shutdown(incoming, stop);
    tokio::pin!(serve);

    let (jobs_kept, max_jobs, max_queries) = (
        config.jobs_kept,
        config.max_concurrent_jobs,
        config.max_harness_queries,
    );
    let probe_interval = config.refresh_probe_interval;
    let compact_fraction = config.compact_deleted_fraction;
    let job_gate = config.job_gate.clone();
    let trials_kept = config.trials_kept;
    let max_pending = config.max_pending_writes;
    let cluster_config = config.cluster.clone();
    let recovery = {
        let (core, health, store) = (core.clone(), health.clone(), store.clone());
        let halt = halt.clone();
        async move {
            let catalog =
                Arc::new(Catalog::recover(store, registry, halt.clone(), max_pending).await?);
            catalog.start_compaction(compact_fraction);
            let lab =
                Arc::new(Lab::new(catalog.clone(), max_queries).with_trials_kept(trials_kept));
            let jobs = Jobs::recover(lab.clone(), jobs_kept, max_jobs, job_gate).await?;
            let refresh = Refresher::start(lab.clone(), jobs.clone())?;
            refresh.spawn_prober(probe_interval, jobs.shutdown_token());
            let cluster = match cluster_config {
                Some(cfg) => {
                    // The cluster drops a local index the way DeleteIndex does (its job and
                    // refresh state first) once the server is ready, directly before.
                    let drop_index: crate::cluster::DropIndex = {
                        let (core, catalog) = (core.clone(), catalog.clone());
                        Arc::new(move |name: crate::model::Name| {
                            let (core, catalog) = (core.clone(), catalog.clone());
                            Box::pin(async move {
                                match core.ready() {
                                    Ok(r) => r.delete_index(&name).await,
                                    Err(_) => catalog.delete_index(&name).await,
                                }
                            })
                        })
                    };
                    Some(
                        crate::cluster::Cluster::join(cfg, catalog.clone(), drop_index, halt)
                            .await?,
                    )
                }
                None => None,
            };
            core.set_ready(Ready {
                catalog,
                lab,
                jobs,
                refresh,
                cluster,
            });
            set_health(&health, ServingStatus::Serving).await;
            tracing::info!(addr = ?local, "vectord is serving");
            Ok::<_, Error>(())
        }
    };
    tokio::pin!(recovery);
    let grace = config.shutdown_grace;
    let grace_over = {
        let mut rx = sig_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        }
    };
    tokio::pin!(grace_over);

    // A storage failure is fatal: stop serving, exit non-zero, and do not flush again (see
    // Store::failed).
    let failed = store.failed().clone();
    let mut recovered = false;
    let outcome = loop {
        tokio::select! {
            _ = failed.cancelled() => {
                let why = store.failure().unwrap_or_default();
                tracing::error!(error = %why, "storage failure: stopping without flushing; restart to recover from what is on disk");
                set_health(&health, ServingStatus::NotServing).await;
                core.shutdown();
                return Err(Error::Unavailable(format!("storage failure: {why}")));
            }
            r = &mut serve => break r.map_err(|e| Error::Unavailable(format!("server: {e}"))),
            r = &mut recovery, if !recovered => {
                if r.is_err() && halt.is_cancelled() {
                    tracing::info!("shutdown during recovery: builds stopped");
                    recovered = true;
                    continue;
                }
                if let Err(e) = r {
                    tracing::error!(error = %e, "startup recovery failed");
                    break Err(e);
                }
                recovered = true;
            }
            _ = &mut grace_over => {
                tracing::warn!(?grace, "grace period over: dropping the calls still in flight");
                break Ok(());
            }
        }
    };
    store.flush().await?;
    tracing::info!("store flushed; stopped");
    outcome
}

#[cfg(test)]
mod tests {
    //! The crash-only storage path, driven through a real server in this process: the fault
    //! hook (`store::faults`) is compiled in tests only, so it cannot be reached from the
    //! integration tests' binary (see `Store::injected_fault` for why it is not an env var).
    use super::*;
    use crate::pb::index_service_client::IndexServiceClient;
    use tonic_health::pb::health_check_response::ServingStatus as Hs;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    type Task = tokio::task::JoinHandle<Result<()>>;

    async fn start(dir: &std::path::Path) -> (String, Task, tokio::sync::oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(run(listener, Config::for_tests(dir), async move {
            let _ = stopped.await;
        }));
        let mut health = HealthClient::new(
            tonic::transport::Channel::from_shared(url.clone())
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
        let mut watch = health
            .watch(HealthCheckRequest::default())
            .await
            .unwrap()
            .into_inner();
        while let Some(m) = watch.message().await.unwrap() {
            if m.status == Hs::Serving as i32 {
                return (url, task, stop);
            }
        }
        panic!("no SERVING");
    }

    fn point(id: u64) -> pb::Point {
        pb::Point {
            id,
            vector: vec![id as f32, 1.0],
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_flush_stops_the_server_and_after_restart_store_and_graph_agree() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let (url, task, _stop) = start(&dir).await;
        let mut c = IndexServiceClient::connect(url.clone()).await.unwrap();
        c.create_index(pb::CreateIndexRequest {
            name: "v".into(),
            dimension: 2,
            metric: pb::Metric::L2 as i32,
            ..Default::default()
        })
        .await
        .unwrap();
        let up = |ids: Vec<u64>| pb::UpsertPointsRequest {
            index_name: "v".into(),
            points: ids.into_iter().map(point).collect(),
            ..Default::default()
        };
        c.upsert_points(up((0..20).collect())).await.unwrap();
        let mut health = HealthClient::new(
            tonic::transport::Channel::from_shared(url.clone())
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
        let mut watch = health
            .watch(HealthCheckRequest::default())
            .await
            .unwrap()
            .into_inner();

        crate::store::faults::fail_flushes_in(&dir);
        let e = c.upsert_points(up(vec![100])).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Internal, "{e:?}");
        // The server stops on its own, non-zero (main turns this Err into exit code 1).
        let out = tokio::time::timeout(std::time::Duration::from_secs(60), task)
            .await
            .expect("the server exits after a storage failure")
            .unwrap();
        let e = out.unwrap_err().to_string();
        assert!(e.contains("storage failure"), "{e}");
        // Health said NOT_SERVING before the connection went (or the stream just ended).
        loop {
            match watch.message().await {
                Ok(Some(m)) if m.status == Hs::Serving as i32 => continue,
                Ok(Some(m)) => {
                    assert_eq!(m.status, Hs::NotServing as i32);
                    break;
                }
                Ok(None) | Err(_) => break,
            }
        }
        crate::store::faults::clear(&dir);
        // Open connections hold the old server's services (and so its store).
        drop((c, health, watch));

        // The old store's last handles go as its tasks wind down; wait for sled's lock.
        let mut opened = false;
        for _ in 0..500 {
            let d = dir.clone();
            if tokio::task::spawn_blocking(move || Store::open(&d))
                .await
                .unwrap()
                .is_ok()
            {
                opened = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(opened, "the failed server's store was never released");

        let (url, task, stop) = start(&dir).await;
        let mut c = IndexServiceClient::connect(url).await.unwrap();
        let found_first = |c: &mut IndexServiceClient<tonic::transport::Channel>, id: u64| {
            let mut c = c.clone();
            async move {
                let r = c
                    .search(pb::SearchRequest {
                        index_name: "v".into(),
                        vector: point(id).vector,
                        k: 1,
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                r.neighbors.first().map(|n| n.id) == Some(id)
            }
        };
        for id in 0..20 {
            assert!(found_first(&mut c, id).await, "acknowledged point {id}");
        }
        // The refused write may or may not have reached the disk; either way the graph and
        // the store agree about it.
        let stored = c
            .get_point(pb::GetPointRequest {
                index_name: "v".into(),
                id: 100,
            })
            .await
            .is_ok();
        assert_eq!(found_first(&mut c, 100).await, stored, "stored: {stored}");
        let count = c
            .get_index(pb::GetIndexRequest { name: "v".into() })
            .await
            .unwrap()
            .into_inner()
            .index
            .unwrap()
            .point_count;
        assert_eq!(count, 20 + stored as u64);
        let _ = stop.send(());
        task.await.unwrap().unwrap();
    }
}
