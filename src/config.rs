//! Server configuration: typed and validated once, from flags and environment (see main.rs).

use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    /// Largest request message accepted, in bytes; larger is RESOURCE_EXHAUSTED.
    pub max_request_bytes: usize,
    /// Most points in one UpsertPoints call or one ImportPoints message; more is
    /// RESOURCE_EXHAUSTED.
    pub max_points_per_upsert: usize,
    /// Most vectord calls in flight server-wide; one more is refused at once with
    /// RESOURCE_EXHAUSTED instead of queueing. Health and reflection are not counted.
    pub max_concurrent_requests: usize,
    /// Longest a unary call may take (the client's grpc-timeout, when shorter, wins); None: no
    /// server limit. A call past it gets DEADLINE_EXCEEDED while its work still completes.
    pub request_timeout: Option<Duration>,
    /// Most autotune jobs running at once server-wide; one more is RESOURCE_EXHAUSTED.
    pub max_concurrent_jobs: usize,
    /// Most queries a harness may have.
    pub max_harness_queries: usize,
    /// How long in-flight calls get to finish after a shutdown signal.
    pub shutdown_grace: Duration,
    /// Finished autotune jobs kept in ListJobs (running ones are always listed).
    pub jobs_kept: usize,
    /// Where to serve Prometheus metrics at /metrics; None: not served.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

pub const DEFAULT_MAX_REQUEST_BYTES: usize = 64 * 1024 * 1024;
pub const DEFAULT_MAX_POINTS_PER_UPSERT: u64 = 100_000;
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: u64 = 256;
pub const DEFAULT_REQUEST_TIMEOUT_SECS: u64 = 300;
pub const DEFAULT_MAX_CONCURRENT_JOBS: u64 = 4;
pub const DEFAULT_MAX_HARNESS_QUERIES: u64 = 10_000;

impl Config {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Config {
            data_dir: data_dir.into(),
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_points_per_upsert: DEFAULT_MAX_POINTS_PER_UPSERT as usize,
            max_concurrent_requests: DEFAULT_MAX_CONCURRENT_REQUESTS as usize,
            request_timeout: Some(Duration::from_secs(DEFAULT_REQUEST_TIMEOUT_SECS)),
            max_concurrent_jobs: DEFAULT_MAX_CONCURRENT_JOBS as usize,
            max_harness_queries: DEFAULT_MAX_HARNESS_QUERIES as usize,
            shutdown_grace: Duration::from_secs(10),
            jobs_kept: 100,
            metrics_addr: None,
        }
    }

    /// A config for tests: everything default but the data dir.
    pub fn for_tests(dir: &Path) -> Self {
        Config::new(dir)
    }
}
