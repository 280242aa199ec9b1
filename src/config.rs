//! Server configuration: typed and validated once, from flags and environment (see main.rs).

use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    /// Largest request message accepted, in bytes; larger is RESOURCE_EXHAUSTED.
    pub max_request_bytes: usize,
    /// How long in-flight calls get to finish after a shutdown signal.
    pub shutdown_grace: Duration,
    /// Finished autotune jobs kept in ListJobs (running ones are always listed).
    pub jobs_kept: usize,
    /// Where to serve Prometheus metrics at /metrics; None: not served.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The HNSW engine every graph of this process is built with.
    pub engine: crate::index::engine::EngineKind,
}

impl Config {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Config {
            data_dir: data_dir.into(),
            max_request_bytes: 64 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(10),
            jobs_kept: 100,
            metrics_addr: None,
            engine: crate::index::engine::EngineKind::default(),
        }
    }

    /// A config for tests: everything default but the data dir.
    pub fn for_tests(dir: &Path) -> Self {
        Config::new(dir)
    }
}
