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
    autotune::AutotuneApi, index::IndexApi, promotion::PromotionApi, Core, EdgeLimits, Ready,
};
use crate::metrics::{Metrics, RpcMetricsLayer};
use crate::pb;
use crate::promotion::Registry;
use crate::refresh::Refresher;
use crate::store::Store;

/// The names health reports on: "" (the whole server) and each vectord service.
pub const HEALTH_SERVICES: [&str; 4] = [
    "",
    "vectord.v1.IndexService",
    "vectord.v1.AutotuneService",
    "vectord.v1.PromotionService",
];

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
        .map_err(|e| Error::Internal(format!("reflection: {e}")))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| Error::Internal(format!("reflection: {e}")))?;

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

    let (sig_tx, sig_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = sig_tx.send(true);
    });
    let local = listener.local_addr().ok();
    let stop = {
        let mut rx = sig_rx.clone();
        let health = health.clone();
        let core = core.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
            tracing::info!(
                "shutting down: no new calls; in-flight calls may finish; jobs are cancelled"
            );
            core.shutdown();
            set_health(&health, ServingStatus::NotServing).await;
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
    let incoming = crate::connections::incoming(
        listener,
        crate::connections::ConnLimits {
            max: config.max_connections,
            handshake_timeout: config.handshake_timeout,
            tcp_keepalive: config.tcp_keepalive,
            tls: config.tls.is_some(),
        },
    );
    let serve = builder
        .trace_fn(|req| tracing::info_span!("rpc", method = %req.uri().path()))
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
        .serve_with_incoming_shutdown(incoming, stop);
    tokio::pin!(serve);

    let (jobs_kept, max_jobs, max_queries) = (
        config.jobs_kept,
        config.max_concurrent_jobs,
        config.max_harness_queries,
    );
    let probe_interval = config.refresh_probe_interval;
    let job_gate = config.job_gate.clone();
    let recovery = {
        let (core, health, store) = (core.clone(), health.clone(), store.clone());
        async move {
            let catalog = Arc::new(Catalog::recover(store, registry).await?);
            let lab = Arc::new(Lab::new(catalog.clone(), max_queries));
            let jobs = Jobs::recover(lab.clone(), jobs_kept, max_jobs, job_gate).await?;
            let refresh = Refresher::start(lab.clone(), jobs.clone())?;
            refresh.spawn_prober(probe_interval, jobs.shutdown_token());
            core.set_ready(Ready {
                catalog,
                lab,
                jobs,
                refresh,
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

    let mut recovered = false;
    let outcome = loop {
        tokio::select! {
            r = &mut serve => break r.map_err(|e| Error::Unavailable(format!("server: {e}"))),
            r = &mut recovery, if !recovered => {
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
