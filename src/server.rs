//! The server: opens the store, serves health and reflection at once, recovers the application
//! (`app.rs`), then reports SERVING. On shutdown: cancels every task, reports NOT_SERVING, lets
//! in-flight calls finish, drains every task (`tasks.rs`), flushes and closes the store, all
//! within the grace period.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tonic_health::ServingStatus;

use crate::app::App;
use crate::auth::AuthLayer;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::grpc::names;
use crate::grpc::{
    autotune::AutotuneApi, cluster::ClusterApi, index::IndexApi, promotion::PromotionApi, Core,
    EdgeLimits,
};
use crate::metrics::{Metrics, RpcMetricsLayer};
use crate::pb;
use crate::store::Store;
use crate::tasks::Tasks;

/// The names health reports on: "" (the whole server) and each vectord service (names from
/// the generated code).
pub const HEALTH_SERVICES: [&str; 5] = [
    "",
    names::INDEX,
    names::AUTOTUNE,
    names::PROMOTION,
    names::CLUSTER,
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

/// The TLS settings of the listener: the server's identity and, with mTLS, the client CA.
fn server_tls(tls: &crate::config::TlsConfig) -> Result<tokio_rustls::TlsAcceptor> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;
    let unusable = |e: &dyn std::fmt::Display| {
        Error::invalid(format!("TLS certificate or key not usable: {e}"))
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| unusable(&e))?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(ca)
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| unusable(&format!("client CA: {e}")))?;
            roots.add_parsable_certificates(certs);
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| unusable(&format!("client CA: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&tls.cert)
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| unusable(&format!("certificate: {e}")))?;
    let key =
        PrivateKeyDer::from_pem_slice(&tls.key).map_err(|e| unusable(&format!("key: {e}")))?;
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| unusable(&e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Serves until `shutdown` completes (or the grace period after it runs out); binds
/// `config.metrics_addr` for the metrics when it is set.
///
/// The shutdown future is boxed here, so every function below is compiled once, in this crate:
/// a caller (the binary, each test or bench crate) does not instantiate the server's generic
/// stack (tonic, hyper, tower) again for its own future type, which cost minutes of CI build.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    run_boxed(listener, config, Box::pin(shutdown)).await
}

/// The shutdown future of [`run`] and [`run_with`], boxed.
type Shutdown = std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

async fn run_boxed(listener: TcpListener, config: Config, shutdown: Shutdown) -> Result<()> {
    let metrics_listener = match config.metrics_addr {
        Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
            Error::Unavailable(format!("cannot listen for metrics on {addr}: {e}"))
        })?),
        None => None,
    };
    run_with_boxed(listener, metrics_listener, config, shutdown).await
}

/// [`run`] with the metrics listener already bound (None: no metrics endpoint).
///
/// The steps, in order: open the store; report NOT_SERVING and start listening (health and
/// reflection answer at once, vectord calls are UNAVAILABLE); recover the application
/// ([`App::open`]) and report SERVING; serve until `shutdown`; then shut down: cancel →
/// in-flight calls finish → drain every task → flush → close the store (the whole of it
/// bounded by `config.shutdown_grace`; see [`Tasks`]).
pub async fn run_with(
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    run_with_boxed(listener, metrics_listener, config, Box::pin(shutdown)).await
}

async fn run_with_boxed(
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    config: Config,
    shutdown: Shutdown,
) -> Result<()> {
    let store = open_store(&config).await?;
    let tasks = Tasks::new();
    let core = Arc::new(Core::new(EdgeLimits::of(&config), tasks.clone()));
    let metrics = Metrics::new()?;
    let (health, serve) = grpc_server(listener, &config, &core, &metrics, &tasks)?;
    if let Some(l) = metrics_listener {
        serve_metrics(l, &metrics, &core, &tasks)?;
    }
    set_health(&health, ServingStatus::NotServing).await;
    let recovery = recover(
        config.clone(),
        store.clone(),
        core.clone(),
        health.clone(),
        tasks.clone(),
    );
    // From here the services, the metrics endpoint and recovery hold the core; it goes (and
    // the application with it) when they end.
    drop(core);
    let grace = config.shutdown_grace;
    match serve_until(serve, recovery, shutdown, &store, &health, &tasks, grace).await {
        Served::Stopped { deadline, outcome } => {
            shut_down(store, &tasks, deadline).await?;
            outcome
        }
        // A storage failure: stop without flushing again (see Store::failed).
        Served::Failed(e) => Err(e),
    }
}

/// Opens the store (off the async runtime).
async fn open_store(config: &Config) -> Result<Arc<Store>> {
    let dir = config.data_dir.clone();
    let options = crate::store::StoreOptions {
        cache_bytes: config.store_cache_bytes,
        // A restart (a supervisor's, or a test's) can come while the stopped process's last
        // sled writes still hold the lock for a moment.
        lock_wait: std::time::Duration::from_secs(5),
    };
    Ok(Arc::new(
        tokio::task::spawn_blocking(move || Store::open_with(&dir, &options)).await??,
    ))
}

/// Serves `/metrics` on `listener` until shutdown.
fn serve_metrics(
    listener: TcpListener,
    metrics: &Arc<Metrics>,
    core: &Arc<Core>,
    tasks: &Tasks,
) -> Result<()> {
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Unavailable(format!("metrics listener: {e}")))?;
    tracing::info!(metrics = %crate::metrics::describe(&addr), "serving metrics");
    tasks.spawn(crate::metrics::serve(
        listener,
        metrics.clone(),
        core.clone(),
        tasks.clone(),
    ));
    Ok(())
}

/// The gRPC server on `listener`: health, reflection and the four vectord services behind
/// the edge layers (metrics, auth, the request-size rewrite, admission), with the connection
/// limits. It stops taking calls when `tasks` stop and completes once the calls in flight are
/// done.
fn grpc_server(
    listener: TcpListener,
    config: &Config,
    core: &Arc<Core>,
    metrics: &Arc<Metrics>,
    tasks: &Tasks,
) -> Result<(
    tonic_health::server::HealthReporter,
    impl Future<Output = ()>,
)> {
    let (health, health_service) = tonic_health::server::health_reporter();
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
    let cluster =
        pb::cluster_service_server::ClusterServiceServer::new(ClusterApi::new(core.clone()))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max_out);

    let mut routes = tonic::service::RoutesBuilder::default();
    routes
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(index)
        .add_service(promotion)
        .add_service(autotune)
        .add_service(cluster);
    let connections = crate::connections::Registry::new();
    let svc = tower::ServiceBuilder::new()
        // Boxed, the body and the error made concrete (an error RecoverError did not turn
        // into an answer resets the call's stream, as before).
        .layer(crate::connections::Edge::layer())
        .map_response(|r: http::Response<_>| r.map(tonic::body::Body::new))
        .map_err(tonic::Status::from_error)
        // An error from a layer becomes its gRPC status.
        .layer(tonic::service::RecoverErrorLayer::new())
        // The client's grpc-timeout.
        .layer(crate::admission::DeadlineLayer)
        // Every call, refused ones included, makes its connection busy.
        .layer(connections.layer())
        .layer(RpcMetricsLayer(metrics.clone()))
        .layer(AuthLayer(config.api_keys.clone()))
        .layer(tower::util::MapResponseLayer::new(
            too_large_is_resource_exhausted,
        ))
        .layer(crate::admission::AdmissionLayer::new(
            config.max_concurrent_requests,
            config.request_timeout,
            tasks.clone(),
        ))
        .service(routes.routes().prepare());
    // Per connection: at most this many calls at once; a PING every interval, and the
    // connection is closed when one goes unanswered for the timeout (a peer that vanished
    // without a FIN no longer holds a slot).
    let serving = crate::connections::Serving {
        max_concurrent_streams: config.http2_max_concurrent_streams,
        keepalive_interval: config.http2_keepalive_interval,
        keepalive_timeout: config.http2_keepalive_timeout,
        tls: config.tls.as_ref().map(server_tls).transpose()?,
    };
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
        tasks.clone(),
    );
    let serve = crate::connections::serve(incoming, svc, serving, tasks.stop_token());
    Ok((health, serve))
}

/// Startup recovery: builds the application and hands it to the services, then reports
/// SERVING (unless shutdown started meanwhile).
async fn recover(
    config: Config,
    store: Arc<Store>,
    core: Arc<Core>,
    health: tonic_health::server::HealthReporter,
    tasks: Tasks,
) -> Result<()> {
    let mut config = config;
    let peers = crate::grpc::peer::PeerClient::new(config.api_keys.clone(), config.tls.clone());
    if let Some(c) = config.cluster.as_mut() {
        // A catching-up replica copies its index from a peer through the edge's gRPC client.
        c.peers.get_or_insert(crate::cluster::catchup::Peers(peers));
    }
    let app = App::open(&config, store, tasks.clone()).await?;
    if let Some(c) = &app.cluster {
        tasks.spawn(index_health(
            c.control().rollouts(),
            health.clone(),
            tasks.stop_token(),
        ));
    }
    core.set_app(Arc::new(app))?;
    if !tasks.is_stopping() {
        set_health(&health, ServingStatus::Serving).await;
        tracing::info!("vectord is serving");
    }
    Ok(())
}

/// The health service name of one index on a cluster node.
pub fn index_health_name(index: &str) -> String {
    format!("{}/{index}", names::INDEX)
}

/// A cluster node's per-index health: `vectord.v1.IndexService/<index>` is SERVING while the
/// node serves the index's desired generation and is not behind on its write log, and
/// NOT_SERVING while it is behind on either (building the generation, or failing to; applying
/// a backlog of writes); an index the node no longer has is cleared. All NOT_SERVING at
/// shutdown.
async fn index_health(
    mut rollouts: tokio::sync::watch::Receiver<
        std::collections::BTreeMap<String, crate::cluster::control::Rollout>,
    >,
    mut health: tonic_health::server::HealthReporter,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut known: std::collections::BTreeMap<String, bool> = Default::default();
    loop {
        let now: std::collections::BTreeMap<String, bool> = rollouts
            .borrow_and_update()
            .iter()
            .map(|(k, r)| (k.clone(), r.serving()))
            .collect();
        for (index, current) in &now {
            if known.get(index) != Some(current) {
                let status = if *current {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                health
                    .set_service_status(index_health_name(index), status)
                    .await;
            }
        }
        for index in known.keys() {
            if !now.contains_key(index) {
                health.clear_service_status(&index_health_name(index)).await;
            }
        }
        known = now;
        tokio::select! {
            _ = stop.cancelled() => break,
            changed = rollouts.changed() => if changed.is_err() { break },
        }
    }
    for index in known.keys() {
        health
            .set_service_status(index_health_name(index), ServingStatus::NotServing)
            .await;
    }
}

/// How serving ended.
enum Served {
    /// Shutdown, or the server or its recovery failed (`outcome`): the drain must end by
    /// `deadline`.
    Stopped {
        deadline: tokio::time::Instant,
        outcome: Result<()>,
    },
    /// A storage failure: the process must stop at once, without flushing.
    Failed(Error),
}

/// Serves until `shutdown` and the calls in flight are done (or the grace period after
/// `shutdown` ran out), a storage failure, or a startup recovery failure. At `shutdown`:
/// cancels every task (jobs, builds, probes, compactions stop), reports NOT_SERVING, and stops
/// taking calls.
async fn serve_until(
    serve: impl Future<Output = ()>,
    recovery: impl Future<Output = Result<()>>,
    shutdown: impl Future<Output = ()>,
    store: &Store,
    health: &tonic_health::server::HealthReporter,
    tasks: &Tasks,
    grace: std::time::Duration,
) -> Served {
    tokio::pin!(serve, recovery, shutdown);
    let failed = store.failed().clone();
    let mut recovered = false;
    let mut deadline: Option<tokio::time::Instant> = None;
    let far = tokio::time::Instant::now() + std::time::Duration::from_secs(86_400 * 365);
    let outcome = loop {
        tokio::select! {
            _ = failed.cancelled() => {
                let why = store.failure().unwrap_or_default();
                tracing::error!(error = %why, "storage failure: stopping without flushing; restart to recover from what is on disk");
                set_health(health, ServingStatus::NotServing).await;
                tasks.cancel();
                return Served::Failed(Error::Unavailable(format!("storage failure: {why}")));
            }
            () = &mut shutdown, if deadline.is_none() => {
                tracing::info!(
                    "shutting down: no new calls; in-flight calls may finish; jobs and builds are cancelled"
                );
                deadline = Some(tokio::time::Instant::now() + grace);
                tasks.cancel();
                set_health(health, ServingStatus::NotServing).await;
            }
            () = &mut serve => break Ok(()),
            r = &mut recovery, if !recovered => {
                recovered = true;
                match r {
                    Err(_) if tasks.is_stopping() => tracing::info!("shutdown during recovery: builds stopped"),
                    Err(e) => {
                        tracing::error!(error = %e, "startup recovery failed");
                        break Err(e);
                    }
                    Ok(()) => {}
                }
            }
            () = tokio::time::sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => {
                tracing::warn!(?grace, "grace period over: dropping the calls still in flight");
                break Ok(());
            }
        }
    };
    tasks.cancel();
    let deadline = deadline.unwrap_or_else(|| tokio::time::Instant::now() + grace);
    Served::Stopped { deadline, outcome }
}

/// The end of shutdown: waits until `deadline` for every task to end (a job cancelled by the
/// shutdown records CANCELLED as it ends), flushes the store, and closes it, so the data dir is
/// free when this returns (unless a task outlived the grace period).
async fn shut_down(store: Arc<Store>, tasks: &Tasks, deadline: tokio::time::Instant) -> Result<()> {
    let within = deadline.saturating_duration_since(tokio::time::Instant::now());
    if !tasks.drain(within).await {
        tracing::warn!(
            tasks = tasks.len(),
            "grace period over: tasks still running are abandoned"
        );
    }
    store.flush().await?;
    // Blocking calls whose callers went away (a search or a snapshot write of a call whose
    // client left) may still hold the store: wait for them too, within the same deadline, so
    // the data dir is free when this returns.
    let closed = store.closed();
    drop(store);
    if let Some(closed) = closed {
        if tokio::time::timeout_at(deadline, closed).await.is_err() {
            tracing::warn!(
                "the store is still held by work that outlived the grace period; it closes when that ends"
            );
        }
    }
    tracing::info!("store flushed; stopped");
    Ok(())
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
