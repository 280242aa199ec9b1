//! Admission: the server-wide limit on vectord calls in flight and the server's per-call
//! timeout, as one tower layer around the gRPC services.
//!
//! - A call over `--max-concurrent-requests` is refused at once with RESOURCE_EXHAUSTED (load
//!   shedding: nothing queues without bound). Health and reflection are not counted, so a
//!   saturated server still answers its health checks.
//! - Every admitted call's handler that changes state runs as its own task, to completion: a
//!   client that goes away or a deadline that passes never drops a handler halfway (say, after
//!   its write is stored but before the graph sees it). The permit is held until the handler
//!   is done, so abandoned work still counts against the limit. The reads (Search,
//!   SearchBatch, Get*, List*) run inline in the connection's task: dropping one halfway
//!   leaves nothing behind, a unary Search saves a task spawn and a cross-task wake, and a
//!   SearchBatch whose caller went away or whose deadline passed is dropped, which stops its
//!   work on the blocking pool after the chunk of queries in progress (`Catalog::search_batch`;
//!   its search slot is held until then).
//! - A unary call past `--request-timeout-secs` gets DEADLINE_EXCEEDED (the client's own
//!   grpc-timeout, when shorter, is enforced by [`DeadlineLayer`] outside this layer). The streaming calls,
//!   ImportPoints and Autotune, are not cut by the server's timeout: they can legitimately run
//!   for long.
//!
//! This is tower's `GlobalConcurrencyLimit` + `LoadShed` in one small service, written out
//! because the health exemption needs the path, and a shed call should carry a gRPC status
//! rather than a transport error.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::Semaphore;
use tonic::Status;

use crate::grpc::names;

/// Methods that stream, as (service, method): the server's timeout does not apply to them.
/// Checked against the contract's descriptor set in the tests (exactly its streaming RPCs).
const STREAMING: [(&str, &str); 3] = [
    (names::CLUSTER, "FetchIndexState"),
    (names::INDEX, "ImportPoints"),
    (names::AUTOTUNE, "Autotune"),
];

/// Services that are not counted (health and reflection): a saturated server still answers
/// its probes.
const EXEMPT: [&str; 3] = [
    names::HEALTH,
    names::REFLECTION_V1,
    names::REFLECTION_V1ALPHA,
];

fn exempt(path: &str) -> bool {
    EXEMPT.contains(&names::split_path(path).0)
}

fn streams(path: &str) -> bool {
    STREAMING.contains(&names::split_path(path))
}

/// Reads run inline (see `call`): dropping one leaves nothing half-done, and dropping it is
/// how a read whose caller went away stops.
fn runs_inline(path: &str) -> bool {
    crate::auth::access_of(path) == crate::auth::Access::ReadOnly
}

fn timed_out<B: Default>(path: &str, t: Duration) -> http::Response<B> {
    tracing::warn!(method = %path, timeout = ?t, "call timed out; a write goes on to completion");
    Status::deadline_exceeded(format!(
        "the call took longer than the server's limit of {}s (--request-timeout-secs); a write may still complete: check before retrying",
        t.as_secs_f64()
    ))
    .into_http()
}

#[derive(Clone)]
pub struct AdmissionLayer {
    shared: Arc<Shared>,
}

struct Shared {
    permits: Arc<Semaphore>,
    max: usize,
    timeout: Option<Duration>,
    /// Owns the handler tasks: shutdown waits for them (within the grace period).
    tasks: crate::tasks::Tasks,
}

impl AdmissionLayer {
    /// `max` calls in flight at most (0 is taken as 1); `timeout` for unary calls; the
    /// handlers that run as their own task are owned by `tasks`.
    pub fn new(max: usize, timeout: Option<Duration>, tasks: crate::tasks::Tasks) -> Self {
        let max = max.max(1);
        AdmissionLayer {
            shared: Arc::new(Shared {
                permits: Arc::new(Semaphore::new(max)),
                max,
                timeout,
                tasks,
            }),
        }
    }
}

impl<S> tower::Layer<S> for AdmissionLayer {
    type Service = Admission<S>;
    fn layer(&self, inner: S) -> Admission<S> {
        Admission {
            inner,
            shared: self.shared.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Admission<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S, ReqB, ResB> tower::Service<http::Request<ReqB>> for Admission<S>
where
    S: tower::Service<http::Request<ReqB>, Response = http::Response<ResB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResB: Default + Send + 'static,
{
    type Response = http::Response<ResB>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqB>) -> Self::Future {
        let path = req.uri().path().to_string();
        if exempt(&path) {
            return Box::pin(self.inner.call(req));
        }
        let permit = match self.shared.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let max = self.shared.max;
                tracing::warn!(method = %path, max, "call shed: too many calls in flight");
                return Box::pin(async move {
                    Ok(Status::resource_exhausted(format!(
                        "the server has {max} calls in flight, its limit (--max-concurrent-requests); retry with backoff"
                    ))
                    .into_http())
                });
            }
        };
        let timeout = if streams(&path) {
            None
        } else {
            self.shared.timeout
        };
        let handler = self.inner.call(req);
        if runs_inline(&path) {
            // A read leaves nothing half-done if it is dropped, so it runs in the connection's
            // own task: no spawn, no cross-task wake on the latency-critical path.
            return Box::pin(async move {
                let _permit = permit;
                match timeout {
                    Some(t) => match tokio::time::timeout(t, handler).await {
                        Ok(r) => r,
                        Err(_) => Ok(timed_out(&path, t)),
                    },
                    None => handler.await,
                }
            });
        }
        let task = self.shared.tasks.spawn(async move {
            let r = handler.await;
            drop(permit);
            r
        });
        Box::pin(async move {
            let joined = match timeout {
                Some(t) => match tokio::time::timeout(t, task).await {
                    Ok(j) => j,
                    Err(_) => return Ok(timed_out(&path, t)),
                },
                None => task.await,
            };
            match joined {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(method = %path, error = %e, "a call's handler failed");
                    Ok(
                        Status::internal(format!("internal error: the handler failed: {e}"))
                            .into_http(),
                    )
                }
            }
        })
    }
}

/// The caller's own deadline, from its grpc-timeout header (what tonic's server enforced when
/// it served the connections): a call whose answer has not begun by then gets
/// DEADLINE_EXCEEDED. As with the server's timeout, a write's handler goes on to completion.
#[derive(Clone, Copy, Debug, Default)]
pub struct DeadlineLayer;

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;
    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline(inner)
    }
}

#[derive(Clone)]
pub struct Deadline<S>(S);

impl<S, ReqB, ResB> tower::Service<http::Request<ReqB>> for Deadline<S>
where
    S: tower::Service<http::Request<ReqB>, Response = http::Response<ResB>>,
    S::Future: Send + 'static,
    S::Error: Into<tower::BoxError>,
{
    type Response = http::Response<ResB>;
    type Error = tower::BoxError;
    type Future = BoxFuture<'static, Result<Self::Response, tower::BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<ReqB>) -> Self::Future {
        let deadline = req
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(crate::grpc::convert::parse_grpc_timeout);
        let fut = self.0.call(req);
        Box::pin(async move {
            let Some(d) = deadline else {
                return fut.await.map_err(Into::into);
            };
            match tokio::time::timeout(d, fut).await {
                Ok(r) => r.map_err(Into::into),
                Err(_) => Err(Box::new(Status::deadline_exceeded(format!(
                    "the caller's deadline (grpc-timeout {}s) passed; a write may still complete: check before retrying",
                    d.as_secs_f64()
                ))) as tower::BoxError),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The admission tables name only RPCs of the contract: the streaming ones are exactly the
    /// contract's streaming RPCs (so a new streaming RPC is not cut by the unary timeout
    /// unnoticed), and health and reflection are the
    /// services the server registers.
    #[test]
    fn the_tables_match_the_contract() {
        use prost::Message;
        let set = prost_types::FileDescriptorSet::decode(crate::pb::FILE_DESCRIPTOR_SET).unwrap();
        let mut all = Vec::new();
        let mut streaming = Vec::new();
        for file in &set.file {
            for service in &file.service {
                let s = format!("{}.{}", file.package(), service.name());
                for method in &service.method {
                    let path = format!("/{s}/{}", method.name());
                    if method.client_streaming() || method.server_streaming() {
                        streaming.push(path.clone());
                    }
                    all.push(path);
                }
            }
        }
        assert!(all.len() > 25, "{all:?}");
        let mut ours: Vec<String> = STREAMING.iter().map(|(s, m)| format!("/{s}/{m}")).collect();
        ours.sort();
        streaming.sort();
        assert_eq!(
            ours, streaming,
            "STREAMING is the contract's streaming RPCs"
        );
        for path in &all {
            assert!(!exempt(path), "{path} is a vectord RPC: it is counted");
            assert_eq!(streams(path), streaming.contains(path), "{path}");
        }
        let health = tonic_health::pb::FILE_DESCRIPTOR_SET;
        let reflection = [
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ];
        let mut probes = Vec::new();
        for fds in [health, reflection[0], reflection[1]] {
            let set = prost_types::FileDescriptorSet::decode(fds).unwrap();
            for file in &set.file {
                for service in &file.service {
                    probes.push(format!("{}.{}", file.package(), service.name()));
                }
            }
        }
        probes.sort();
        let mut exempt_sorted = EXEMPT.to_vec();
        exempt_sorted.sort();
        assert_eq!(probes, exempt_sorted);
    }

    /// The caller's grpc-timeout cuts a call whose answer has not begun: the server answers
    /// DEADLINE_EXCEEDED (through RecoverError, as served) at about that time; without the
    /// header, or with an unreadable one, the call is answered by its handler.
    #[tokio::test]
    async fn the_callers_grpc_timeout_cuts_a_slow_call() {
        use tower::{Layer, ServiceExt};
        let slow = tower::service_fn(|_: http::Request<()>| async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok::<_, std::convert::Infallible>(http::Response::new(tonic::body::Body::empty()))
        });
        let svc = tonic::service::RecoverErrorLayer::new().layer(DeadlineLayer.layer(slow));
        let call = |timeout: Option<&'static str>| {
            let svc = svc.clone();
            async move {
                let mut req = http::Request::new(());
                if let Some(t) = timeout {
                    req.headers_mut()
                        .insert("grpc-timeout", http::HeaderValue::from_static(t));
                }
                let t = std::time::Instant::now();
                let resp = svc.oneshot(req).await.unwrap();
                (Status::from_header_map(resp.headers()), t.elapsed())
            }
        };
        let (status, took) = call(Some("100m")).await;
        let status = status.expect("a status in the headers");
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
        assert!(status.message().contains("grpc-timeout 0.1s"), "{status:?}");
        assert!(took < Duration::from_secs(1), "cut at {took:?}");
        for header in [None, Some("soon")] {
            let (status, took) = call(header).await;
            assert!(status.is_none(), "{header:?}: {status:?}");
            assert!(took >= Duration::from_secs(1), "{header:?}: {took:?}");
        }
    }
}
