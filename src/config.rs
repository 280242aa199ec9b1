//! Server configuration: typed and validated once, from flags and environment (see main.rs).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::auth::ApiKeys;
use crate::error::{Error, Result};

#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    /// Largest request message accepted, in bytes; larger is RESOURCE_EXHAUSTED.
    pub max_request_bytes: usize,
    /// Most points in one UpsertPoints call or one ImportPoints message; more is
    /// RESOURCE_EXHAUSTED.
    pub max_points_per_upsert: usize,
    /// Most writes (UpsertPoints / DeletePoints calls, ImportPoints messages) queued per index
    /// for its group commit; one more is RESOURCE_EXHAUSTED at once.
    pub max_pending_writes: usize,
    /// Most points per index committed but not yet linked into its graph (the fresh segment
    /// every search scans); while full, the index's committer takes no more writes.
    pub max_unindexed_points: usize,
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
    /// Finished autotune jobs kept (on disk and in ListJobs); running ones are always kept.
    pub jobs_kept: usize,
    /// Trials kept per index and harness (the newest; promoted ones are always kept).
    pub trials_kept: usize,
    /// Where to serve Prometheus metrics at /metrics; None: not served.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// How often refresh policies with a recall floor probe their index; zero: never.
    pub refresh_probe_interval: Duration,
    /// API keys every call but health and reflection must carry; None: no key needed.
    pub api_keys: Option<Arc<ApiKeys>>,
    /// TLS on the gRPC listener; None: plaintext HTTP/2.
    pub tls: Option<TlsConfig>,
    /// `--engine`: the HNSW engine of new indexes that name none, and of indexes created before
    /// the engine was stored with the index.
    pub engine: crate::index::engine::EngineKind,
    /// The deleted share (tombstones over all points of the active generation's graph) past
    /// which an index is rebuilt in the background to drop its tombstones; 0: never.
    pub compact_deleted_fraction: f64,
    /// Most bytes of the store's pages kept in memory (sled's page cache).
    pub store_cache_bytes: u64,
    /// `--map-float-vectors`: native_f16 and native_i8 graphs keep their float vectors (read
    /// only to rank a search's last candidates and while inserting) in mapped temp files under
    /// `data_dir/float-vectors`, which the kernel may evict, instead of in anonymous memory.
    /// `--check-findable`: the findability check (docs/scale.md).
    pub check_findable: bool,
    pub map_float_vectors: bool,
    /// An index with changes since its snapshot and no write for this long is snapshotted in
    /// the background; None: not for that reason (`--snapshot-idle-secs 0`).
    pub snapshot_idle: Option<Duration>,
    /// Most ids in one DeletePoints call; more is RESOURCE_EXHAUSTED.
    pub max_ids_per_delete: usize,
    /// Most queries in one SearchBatch call; more is RESOURCE_EXHAUSTED.
    pub max_batch_queries: usize,
    /// Most neighbours one SearchBatch may return (queries x k); more is RESOURCE_EXHAUSTED.
    pub max_batch_results: usize,
    /// Largest response message the server encodes, in bytes. A SearchBatch whose answer could
    /// exceed it is refused with RESOURCE_EXHAUSTED before any work is done.
    pub max_response_bytes: usize,
    /// Connections past their HTTP/2 preface (or TLS first bytes) served at once; one more
    /// closes the connection idle longest, or is closed at once when every one has a call in
    /// flight.
    pub max_connections: usize,
    /// How long a connection may stay open with no call in flight; None: no limit.
    pub idle_timeout: Option<Duration>,
    /// How long a new connection may take to send its HTTP/2 preface (plaintext) or its first
    /// bytes (TLS; the TLS handshake itself has its own 10 s limit) before it is closed.
    pub handshake_timeout: Duration,
    /// HTTP/2 streams (calls) one connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub http2_max_concurrent_streams: u32,
    /// Interval of HTTP/2 PINGs on a connection; None: no pings.
    pub http2_keepalive_interval: Option<Duration>,
    /// How long a PING may go unanswered before the connection is closed.
    pub http2_keepalive_timeout: Duration,
    /// Idle time before TCP keepalive probes start on a connection; None: no TCP keepalive.
    pub tcp_keepalive: Option<Duration>,
    /// The cluster this node joins (--etcd, --nats, --node-id, --advertise-addr); None: a
    /// single node.
    pub cluster: Option<crate::cluster::ClusterConfig>,
    /// Tests only (no flag sets it): holds autotune jobs on some indexes RUNNING until opened.
    #[doc(hidden)]
    pub job_gate: Option<crate::autotune::jobs::JobGate>,
    /// Tests only (`VECTORD_TEST_INDEXER_DELAY_MS` in the binary): holds or slows the indexers.
    #[doc(hidden)]
    pub indexer_hold: Option<crate::catalog::IndexerHold>,
    /// Tests only (`VECTORD_TEST_BUILD_CHUNK_DELAY_MS`, `VECTORD_TEST_SNAPSHOT_DELAY_MS` in the
    /// binary): pauses in builds and snapshot writes.
    #[doc(hidden)]
    pub test_pauses: crate::catalog::TestPauses,
}

pub const DEFAULT_MAX_REQUEST_BYTES: usize = 64 * 1024 * 1024;
pub const DEFAULT_MAX_POINTS_PER_UPSERT: u64 = 100_000;
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: u64 = 256;
pub const DEFAULT_REQUEST_TIMEOUT_SECS: u64 = 300;
pub const DEFAULT_MAX_CONCURRENT_JOBS: u64 = 4;
pub const DEFAULT_MAX_HARNESS_QUERIES: u64 = 10_000;
pub const DEFAULT_JOBS_KEPT: u64 = 100;
pub const DEFAULT_TRIALS_KEPT: u64 = 1000;
pub const DEFAULT_MAX_IDS_PER_DELETE: u64 = 100_000;
pub const DEFAULT_MAX_BATCH_QUERIES: u64 = 10_000;
pub const DEFAULT_MAX_BATCH_RESULTS: u64 = 1_000_000;
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 64 * 1024 * 1024;
pub const DEFAULT_MAX_CONNECTIONS: u64 = 1024;
pub const DEFAULT_HANDSHAKE_TIMEOUT_SECS: u64 = 10;
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 300;
pub const DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS: u32 = 256;
pub const DEFAULT_HTTP2_KEEPALIVE_INTERVAL_SECS: u64 = 60;
pub const DEFAULT_HTTP2_KEEPALIVE_TIMEOUT_SECS: u64 = 20;
pub const DEFAULT_TCP_KEEPALIVE_SECS: u64 = 60;

impl Config {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Config {
            data_dir: data_dir.into(),
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_points_per_upsert: DEFAULT_MAX_POINTS_PER_UPSERT as usize,
            max_pending_writes: crate::catalog::DEFAULT_MAX_PENDING_WRITES,
            max_unindexed_points: crate::catalog::DEFAULT_MAX_UNINDEXED_POINTS,
            max_concurrent_requests: DEFAULT_MAX_CONCURRENT_REQUESTS as usize,
            request_timeout: Some(Duration::from_secs(DEFAULT_REQUEST_TIMEOUT_SECS)),
            max_concurrent_jobs: DEFAULT_MAX_CONCURRENT_JOBS as usize,
            max_harness_queries: DEFAULT_MAX_HARNESS_QUERIES as usize,
            shutdown_grace: Duration::from_secs(10),
            jobs_kept: DEFAULT_JOBS_KEPT as usize,
            trials_kept: DEFAULT_TRIALS_KEPT as usize,
            metrics_addr: None,
            refresh_probe_interval: Duration::from_secs(60),
            api_keys: None,
            tls: None,
            engine: crate::index::engine::EngineKind::default(),
            compact_deleted_fraction: crate::compaction::DEFAULT_DELETED_FRACTION,
            snapshot_idle: Some(crate::snapshots::DEFAULT_IDLE),
            store_cache_bytes: crate::store::DEFAULT_CACHE_BYTES,
            map_float_vectors: true,
            check_findable: true,
            max_ids_per_delete: DEFAULT_MAX_IDS_PER_DELETE as usize,
            max_batch_queries: DEFAULT_MAX_BATCH_QUERIES as usize,
            max_batch_results: DEFAULT_MAX_BATCH_RESULTS as usize,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES as usize,
            max_connections: DEFAULT_MAX_CONNECTIONS as usize,
            handshake_timeout: Duration::from_secs(DEFAULT_HANDSHAKE_TIMEOUT_SECS),
            idle_timeout: Some(Duration::from_secs(DEFAULT_IDLE_TIMEOUT_SECS)),
            http2_max_concurrent_streams: DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS,
            http2_keepalive_interval: Some(Duration::from_secs(
                DEFAULT_HTTP2_KEEPALIVE_INTERVAL_SECS,
            )),
            http2_keepalive_timeout: Duration::from_secs(DEFAULT_HTTP2_KEEPALIVE_TIMEOUT_SECS),
            tcp_keepalive: Some(Duration::from_secs(DEFAULT_TCP_KEEPALIVE_SECS)),
            cluster: None,
            job_gate: None,
            indexer_hold: None,
            test_pauses: Default::default(),
        }
    }

    /// A config for tests: everything default but the data dir.
    pub fn for_tests(dir: &Path) -> Self {
        Config::new(dir)
    }

    /// The bind policy. The gRPC listener on a non-loopback `addr` needs TLS, or `insecure`:
    /// without TLS every call (and any API key it carries) crosses the network in clear, so a
    /// key alone is not enough. The metrics listener (plain HTTP, no keys) on a non-loopback
    /// address needs `insecure` too: it tells anyone who can reach it every index name and
    /// size. Checked before anything is bound.
    pub fn check_exposure(&self, addr: SocketAddr, insecure: bool) -> Result<()> {
        if !(addr.ip().is_loopback() || insecure || self.tls.is_some()) {
            let keyed = if self.api_keys.is_some() {
                "an API key sent without TLS crosses the network in clear, so anyone who can \
                 see the traffic could replay it"
            } else {
                "anyone who can reach it could read and change every index"
            };
            return Err(Error::invalid(format!(
                "refusing to listen on {addr} (not loopback) without TLS: {keyed}. Pass \
                 --tls-cert and --tls-key (with --api-key or --api-key-file, or \
                 --tls-client-ca, so that only your clients may call), or --insecure if the \
                 network is your boundary (e.g. a container network), or listen on 127.0.0.1"
            )));
        }
        if let Some(m) = self.metrics_addr {
            if !(m.ip().is_loopback() || insecure) {
                return Err(Error::invalid(format!(
                    "refusing to serve metrics on {m} (not loopback): the metrics endpoint is \
                     plain HTTP without keys and shows every index name and size. Pass \
                     --insecure if the network is your boundary (e.g. a scraper on a container \
                     network), or use --metrics-addr 127.0.0.1:PORT"
                )));
            }
        }
        Ok(())
    }
}

/// A key from its flag (or env) or from its file (first line, trimmed); `flag` names both in
/// errors. Neither: None.
pub fn api_key_from(
    flag: &str,
    value: Option<String>,
    file: Option<&Path>,
) -> Result<Option<crate::auth::ApiKey>> {
    use crate::auth::ApiKey;
    match (value, file) {
        (Some(_), Some(_)) => Err(Error::invalid(format!(
            "give {flag} or {flag}-file, not both"
        ))),
        (Some(v), None) => Ok(Some(ApiKey::parse(flag, &v)?)),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Error::invalid(format!("{flag}-file {}: {e}", path.display())))?;
            let first = text.lines().next().unwrap_or("").trim();
            Ok(Some(ApiKey::parse(
                &format!("{flag}-file {} (its first line)", path.display()),
                first,
            )?))
        }
        (None, None) => Ok(None),
    }
}

/// The server's certificate chain and key, and the CA that client certificates must chain to
/// (mTLS) if any; all PEM, checked when loaded so a bad file is named at startup.
#[derive(Clone)]
pub struct TlsConfig {
    /// PEM: the server's certificate chain, its key, and (mTLS) the client CA.
    pub(crate) cert: Vec<u8>,
    pub(crate) key: Vec<u8>,
    pub(crate) client_ca: Option<Vec<u8>>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("mtls", &self.client_ca.is_some())
            .finish_non_exhaustive()
    }
}

fn read(flag: &str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::invalid(format!("{flag} {}: {e}", path.display())))
}

/// Reads a PEM file of certificates (at least one).
fn read_certs(flag: &str, path: &Path) -> Result<Vec<u8>> {
    let pem = read(flag, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::invalid(format!("{flag} {}: not PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::invalid(format!(
            "{flag} {}: no PEM certificate (-----BEGIN CERTIFICATE-----) in the file",
            path.display()
        )));
    }
    Ok(pem)
}

impl TlsConfig {
    pub fn load(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Self> {
        let cert_pem = read_certs("--tls-cert", cert)?;
        let key_pem = read("--tls-key", key)?;
        // The parse error is not shown: it could quote the key file.
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
            Error::invalid(format!(
                "--tls-key {}: no PEM private key (PKCS#8, PKCS#1 or SEC1) in the file",
                key.display()
            ))
        })?;
        let client_ca = client_ca
            .map(|p| read_certs("--tls-client-ca", p))
            .transpose()?;
        Ok(TlsConfig {
            cert: cert_pem,
            key: key_pem,
            client_ca,
        })
    }

    /// True when clients must present a certificate signed by the client CA.
    pub fn mtls(&self) -> bool {
        self.client_ca.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::ApiKey;

    #[test]
    fn bind_policy() {
        let c = Config::new("/tmp/x");
        let any: SocketAddr = "0.0.0.0:50051".parse().unwrap();
        let e = c.check_exposure(any, false).unwrap_err().to_string();
        assert!(
            e.contains("--insecure") && e.contains("--api-key") && e.contains("--tls-cert"),
            "{e}"
        );
        assert!(c.check_exposure(any, true).is_ok());
        assert!(c
            .check_exposure("127.0.0.1:0".parse().unwrap(), false)
            .is_ok());
        assert!(c.check_exposure("[::1]:0".parse().unwrap(), false).is_ok());
        assert!(c.check_exposure("[::]:0".parse().unwrap(), false).is_err());
        // A key without TLS is no longer enough: it would cross the network in clear.
        let mut keyed = c.clone();
        let key = ApiKey::parse("--api-key", "k").unwrap();
        keyed.api_keys = Some(Arc::new(ApiKeys::new(key, None).unwrap()));
        let e = keyed.check_exposure(any, false).unwrap_err().to_string();
        assert!(e.contains("in clear") && e.contains("--insecure"), "{e}");
        assert!(keyed.check_exposure(any, true).is_ok());
        assert!(keyed
            .check_exposure("127.0.0.1:0".parse().unwrap(), false)
            .is_ok());
    }

    #[test]
    fn metrics_bind_policy() {
        let mut c = Config::new("/tmp/x");
        let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
        c.metrics_addr = Some("127.0.0.1:9464".parse().unwrap());
        assert!(c.check_exposure(local, false).is_ok());
        c.metrics_addr = Some("0.0.0.0:9464".parse().unwrap());
        let e = c.check_exposure(local, false).unwrap_err().to_string();
        assert!(
            e.contains("metrics") && e.contains("0.0.0.0:9464") && e.contains("--insecure"),
            "{e}"
        );
        assert!(c.check_exposure(local, true).is_ok());
        // Neither a key nor TLS covers the metrics endpoint: it has neither.
        let key = ApiKey::parse("--api-key", "k").unwrap();
        c.api_keys = Some(Arc::new(ApiKeys::new(key, None).unwrap()));
        assert!(c.check_exposure(local, false).is_err());
    }

    #[test]
    fn tls_files_are_named_when_bad() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = TlsConfig::load(&missing, &missing, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--tls-cert") && e.contains("missing.pem"), "{e}");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let e = TlsConfig::load(&junk, &junk, None).unwrap_err().to_string();
        assert!(
            e.contains("--tls-cert") && e.contains("junk.pem") && e.contains("no PEM certificate"),
            "{e}"
        );
    }
}
