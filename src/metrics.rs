//! Prometheus metrics: RPC counts and latencies (a tower layer around every service), and the
//! state of indexes, promotions, jobs and the journal (read from the core at each scrape, so
//! they are always current and survive restarts). Served as text at `/metrics` on
//! `--metrics-addr`.

use std::collections::HashSet;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body_util::Full;
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::autotune::jobs::JobState;
use crate::error::{Error, Result};
use crate::grpc::Core;

pub struct Metrics {
    /// The paths of every method served (vectord's, health's, reflection's), from their
    /// descriptor sets: the only values of the `method` label, so that calls to made-up
    /// methods (answered UNIMPLEMENTED, and not authenticated: this layer is outside auth)
    /// cannot grow the metrics without bound. Any other path is counted as `unknown`.
    methods: HashSet<String>,
    registry: Registry,
    rpcs: IntCounterVec,
    rpc_seconds: HistogramVec,
    points: IntGaugeVec,
    generation: IntGaugeVec,
    config: IntGaugeVec,
    build_seconds: GaugeVec,
    promoted_recall: GaugeVec,
    promoted_p50: GaugeVec,
    probe_recall: GaugeVec,
    jobs: IntGaugeVec,
    trials: IntGauge,
    tombstones: IntGaugeVec,
    unindexed: IntGaugeVec,
    deleted_fraction: GaugeVec,
    compactions: IntGaugeVec,
    compaction_running: IntGaugeVec,
    check_linked: IntGaugeVec,
    check_unchecked: IntGaugeVec,
    activation_builds: IntGauge,
    activation_adopted: IntGauge,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> Result<T> {
    r.register(Box::new(c.clone()))
        .map_err(|e| Error::Internal(format!("metrics: {e}")))?;
    Ok(c)
}

/// `/package.Service/Method` of every method of the descriptor sets.
fn method_paths(sets: &[&[u8]]) -> Result<HashSet<String>> {
    use prost::Message as _;
    let mut out = HashSet::new();
    for bytes in sets {
        let set = prost_types::FileDescriptorSet::decode(*bytes)
            .map_err(|e| Error::Internal(format!("metrics: a descriptor set: {e}")))?;
        for file in &set.file {
            let package = file.package();
            for service in &file.service {
                let full = if package.is_empty() {
                    service.name().to_string()
                } else {
                    format!("{package}.{}", service.name())
                };
                for m in &service.method {
                    out.insert(format!("/{full}/{}", m.name()));
                }
            }
        }
    }
    Ok(out)
}

/// The `method` label of the metrics for a unknown path.
pub const UNKNOWN_METHOD: &str = "unknown";

fn err(e: prometheus::Error) -> Error {
    Error::Internal(format!("metrics: {e}"))
}

impl Metrics {
    pub fn new() -> Result<Arc<Self>> {
        let r = Registry::new();
        let rpcs = register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "vectord_rpc_requests_total",
                    "gRPC calls by method and status code (as known when the response starts)",
                ),
                &["method", "code"],
            )
            .map_err(err)?,
        )?;
        let rpc_seconds = register(
            &r,
            HistogramVec::new(
                HistogramOpts::new(
                    "vectord_rpc_duration_seconds",
                    "gRPC call latency until the response starts, by method and status code",
                )
                .buckets(vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                ]),
                &["method", "code"],
            )
            .map_err(err)?,
        )?;
        let g = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(Opts::new(name, help), labels).map_err(err)
        };
        let f =
            |name: &str, help: &str| GaugeVec::new(Opts::new(name, help), &["index"]).map_err(err);
        let methods = method_paths(&[
            crate::pb::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ])?;
        Ok(Arc::new(Metrics {
            methods,
            points: register(&r, g("vectord_index_points", "points in the index", &["index"])?)?,
            generation: register(&r, g("vectord_index_generation", "number of the active generation", &["index"])?)?,
            config: register(&r, g("vectord_index_config", "HNSW parameter of the active generation (param = m, ef_construction, ef_search)", &["index", "param"])?)?,
            build_seconds: register(&r, f("vectord_index_build_seconds", "build time of the active generation")?)?,
            promoted_recall: register(&r, f("vectord_promoted_recall", "recall of the promoted trial")?)?,
            promoted_p50: register(&r, f("vectord_promoted_p50_seconds", "p50 latency of the promoted trial")?)?,
            probe_recall: register(&r, f("vectord_refresh_probe_recall", "recall of the last refresh-policy probe of the serving generation")?)?,
            jobs: register(&r, g("vectord_autotune_jobs", "autotune jobs kept, by state", &["state"])?)?,
            trials: register(&r, IntGauge::new("vectord_trials_journaled", "trials in the journal").map_err(err)?)?,
            tombstones: register(&r, g("vectord_index_tombstones", "points in the active generation's graph that no search returns (replaced or deleted)", &["index"])?)?,
            unindexed: register(&r, g("vectord_index_unindexed_points", "points written and searchable but not yet linked into the active generation's graph (scanned by every search; bounded by --max-unindexed-points)", &["index"])?)?,
            deleted_fraction: register(&r, f("vectord_index_deleted_fraction", "tombstones over every point in the active generation's graph; past --compact-deleted-fraction the index is compacted")?)?,
            compactions: register(&r, g("vectord_index_compactions", "tombstone compactions swapped in since the server started", &["index"])?)?,
            compaction_running: register(&r, g("vectord_index_compaction_running", "1 while a tombstone compaction of the index is scheduled or building", &["index"])?)?,
            check_linked: register(&r, g("vectord_index_findability_links", "points the findability check linked so that a search by their own vector finds them first, since the server started", &["index"])?)?,
            check_unchecked: register(&r, g("vectord_index_findability_unchecked_points", "points of the active generation's graph the findability check has yet to check (linked since its last pass began, or left by a series of passes cut off at its bound)", &["index"])?)?,
            activation_builds: register(&r, IntGauge::new("vectord_activation_builds", "graphs built by activations (profile, autotune, rebuild) and compactions since the server started").map_err(err)?)?,
            activation_adopted: register(&r, IntGauge::new("vectord_activation_trial_graphs_adopted", "activations since the server started that swapped in an autotune trial's graph instead of building one").map_err(err)?)?,
            registry: r,
            rpcs,
            rpc_seconds,
        }))
    }

    /// The `method` label of a request path: the path of a served method, else `unknown`.
    pub fn method_label<'a>(&self, path: &'a str) -> &'a str {
        if self.methods.contains(path) {
            path
        } else {
            UNKNOWN_METHOD
        }
    }

    fn observe(&self, path: &str, code: &str, seconds: f64) {
        let method = self.method_label(path);
        self.rpcs.with_label_values(&[method, code]).inc();
        self.rpc_seconds
            .with_label_values(&[method, code])
            .observe(seconds);
    }

    /// Reads the current state from the core and renders every metric as Prometheus text.
    pub fn render(&self, core: &Core) -> Result<String> {
        if let Ok(ready) = core.app() {
            for g in [
                &self.points,
                &self.generation,
                &self.config,
                &self.jobs,
                &self.tombstones,
                &self.unindexed,
                &self.compactions,
                &self.compaction_running,
                &self.check_linked,
                &self.check_unchecked,
            ] {
                g.reset();
            }
            for g in [
                &self.build_seconds,
                &self.promoted_recall,
                &self.promoted_p50,
                &self.probe_recall,
                &self.deleted_fraction,
            ] {
                g.reset();
            }
            for (name, recall) in ready.refresh.probe_recalls() {
                self.probe_recall
                    .with_label_values(&[name.as_str()])
                    .set(recall);
            }
            let catalog = &ready.catalog;
            for name in catalog.index_names() {
                let Ok(view) = catalog.get_index(&name) else {
                    continue;
                };
                let n = name.as_str();
                self.points
                    .with_label_values(&[n])
                    .set(view.point_count as i64);
                self.generation
                    .with_label_values(&[n])
                    .set(view.generation.number as i64);
                let c = view.generation.config;
                for (param, v) in [
                    ("m", c.m),
                    ("ef_construction", c.ef_construction),
                    ("ef_search", c.ef_search),
                ] {
                    self.config.with_label_values(&[n, param]).set(v as i64);
                }
                self.tombstones
                    .with_label_values(&[n])
                    .set(view.tombstones as i64);
                self.deleted_fraction
                    .with_label_values(&[n])
                    .set(view.deleted_fraction);
                self.unindexed
                    .with_label_values(&[n])
                    .set(view.unindexed as i64);
                self.compactions
                    .with_label_values(&[n])
                    .set(view.compaction.count as i64);
                self.compaction_running
                    .with_label_values(&[n])
                    .set(view.compaction.running as i64);
                self.check_linked
                    .with_label_values(&[n])
                    .set(view.check.points_linked as i64);
                self.check_unchecked
                    .with_label_values(&[n])
                    .set(view.check.unchecked as i64);
                self.build_seconds
                    .with_label_values(&[n])
                    .set(view.generation.build_millis as f64 / 1000.0);
                if let Ok(Some(p)) = catalog.registry().current_known(&name) {
                    self.promoted_recall.with_label_values(&[n]).set(p.recall);
                    self.promoted_p50
                        .with_label_values(&[n])
                        .set(p.p50_micros / 1e6);
                }
            }
            for state in ["running", "succeeded", "failed", "cancelled"] {
                self.jobs.with_label_values(&[state]).set(0);
            }
            for job in ready.jobs.list_local(None)? {
                let state = match job.state {
                    JobState::Running => "running",
                    JobState::Succeeded => "succeeded",
                    JobState::Failed => "failed",
                    JobState::Cancelled => "cancelled",
                };
                self.jobs.with_label_values(&[state]).inc();
            }
            self.trials.set(catalog.store().trial_count() as i64);
            let counts = catalog.activations();
            self.activation_builds
                .set(counts.builds.load(std::sync::atomic::Ordering::Relaxed) as i64);
            self.activation_adopted
                .set(counts.adopted.load(std::sync::atomic::Ordering::Relaxed) as i64);
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .map_err(err)?;
        String::from_utf8(out).map_err(|e| Error::Internal(format!("metrics text: {e}")))
    }
}

/// Serves `/metrics` over HTTP/1.1 until `tasks` stop; each connection is a task of `tasks`
/// that ends at the stop too.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    core: Arc<Core>,
    tasks: crate::tasks::Tasks,
) {
    let stop = tasks.stop_token();
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept failed");
                    continue;
                }
            },
        };
        let (metrics, core, stop) = (metrics.clone(), core.clone(), stop.clone());
        tasks.spawn(async move {
            let service =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (metrics, core) = (metrics.clone(), core.clone());
                    async move {
                        let resp = if req.uri().path() != "/metrics" {
                            http::Response::builder()
                                .status(404)
                                .body(Full::new(bytes_of("not found: metrics are at /metrics\n")))
                        } else {
                            match metrics.render(&core) {
                                Ok(text) => http::Response::builder()
                                    .header("content-type", "text/plain; version=0.0.4")
                                    .body(Full::new(bytes_of(&text))),
                                Err(e) => http::Response::builder()
                                    .status(500)
                                    .body(Full::new(bytes_of(&format!("{e}\n")))),
                            }
                        };
                        Ok::<_, Infallible>(
                            resp.unwrap_or_else(|_| http::Response::new(Full::new(bytes_of("")))),
                        )
                    }
                });
            let io = hyper_util::rt::TokioIo::new(stream);
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, service);
            tokio::pin!(conn);
            let ended = tokio::select! {
                r = conn.as_mut() => r,
                _ = stop.cancelled() => {
                    // Finish the response being written, then close (keep-alive ends).
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
}

fn bytes_of(s: &str) -> hyper::body::Bytes {
    hyper::body::Bytes::copy_from_slice(s.as_bytes())
}

/// The address a metrics listener bound, for the log line.
pub fn describe(addr: &SocketAddr) -> String {
    format!("http://{addr}/metrics")
}

/// A tower layer that counts every gRPC call and times it until its response starts; calls to
/// paths that are not served methods all count as method `unknown`.
#[derive(Clone)]
pub struct RpcMetricsLayer(pub Arc<Metrics>);

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics {
            inner,
            metrics: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B, ResBody> tower::Service<http::Request<B>> for RpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = std::result::Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req.uri().path().to_string();
        let started = Instant::now();
        let metrics = self.metrics.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            // Errors answered at once carry grpc-status in the headers; a call that started
            // answering is OK so far (a stream's final status comes later, in its trailers).
            let code = resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
                .map(|c| format!("{:?}", tonic::Code::from_i32(c)))
                .unwrap_or_else(|| "Ok".into());
            metrics.observe(&method, &code, started.elapsed().as_secs_f64());
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_served_methods_are_labels() {
        let m = Metrics::new().unwrap();
        for path in [
            "/vectord.v1.IndexService/Search",
            "/vectord.v1.AutotuneService/Autotune",
            "/vectord.v1.PromotionService/Promote",
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            assert_eq!(m.method_label(path), path);
        }
        for path in [
            "/x.Y/M0",
            "/vectord.v1.IndexService/Nope",
            "/vectord.v1.IndexService/Search/",
            "",
        ] {
            assert_eq!(m.method_label(path), UNKNOWN_METHOD, "{path}");
        }
    }
}
