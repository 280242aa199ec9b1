//! The `vectord` command line: `serve` runs the server; the other subcommands are clients.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use std::sync::Arc;

use clap::{Parser, Subcommand};
use vectord::auth::ApiKeys;
use vectord::config::{self, api_key_from, Config, TlsConfig};

mod cli;

#[derive(Parser)]
#[command(
    name = "vectord",
    version,
    about = "Approximate nearest-neighbour search over gRPC, with measured HNSW configs",
    after_help = cli::EXIT_CODES_HELP
)]
struct Cli {
    /// Log level or filter of the server (e.g. info, debug, vectord=debug); RUST_LOG is used when unset.
    #[arg(long, global = true, env = "VECTORD_LOG")]
    log: Option<String>,
    #[command(flatten)]
    client: cli::GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start and matched at once: the variants' sizes (the server's many flags, the
// client subcommands) do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(ServeArgs),
    #[command(flatten)]
    Client(cli::ClientCommand),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "VECTORD_ADDR", default_value = "127.0.0.1:50051")]
    addr: SocketAddr,
    /// Directory of the store (created if missing).
    #[arg(long, env = "VECTORD_DATA_DIR", default_value = "./vectord-data")]
    data_dir: PathBuf,
    /// Largest request message accepted, in bytes; larger is RESOURCE_EXHAUSTED.
    #[arg(long, env = "VECTORD_MAX_REQUEST_BYTES", default_value_t = 64 * 1024 * 1024)]
    max_request_bytes: usize,
    /// Most points in one UpsertPoints call or one ImportPoints message; more is RESOURCE_EXHAUSTED.
    #[arg(long, env = "VECTORD_MAX_POINTS_PER_UPSERT", default_value_t = config::DEFAULT_MAX_POINTS_PER_UPSERT,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_points_per_upsert: u64,
    /// Most writes (UpsertPoints / DeletePoints calls, ImportPoints messages) waiting per index
    /// for its group commit; one more gets RESOURCE_EXHAUSTED at once.
    #[arg(long, env = "VECTORD_MAX_PENDING_WRITES", default_value_t = vectord::catalog::DEFAULT_MAX_PENDING_WRITES as u64,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_pending_writes: u64,
    /// Most points per index committed (and searchable) but not yet linked into its graph;
    /// while that many wait, the index's writes queue (then RESOURCE_EXHAUSTED).
    #[arg(long, env = "VECTORD_MAX_UNINDEXED_POINTS", default_value_t = vectord::catalog::DEFAULT_MAX_UNINDEXED_POINTS as u64,
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    max_unindexed_points: u64,
    /// Most calls in flight server-wide; one more gets RESOURCE_EXHAUSTED at once (health is not counted).
    #[arg(long, env = "VECTORD_MAX_CONCURRENT_REQUESTS", default_value_t = config::DEFAULT_MAX_CONCURRENT_REQUESTS,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_concurrent_requests: u64,
    /// Seconds a unary call may take (the client's deadline wins when shorter); 0: no limit.
    #[arg(long, env = "VECTORD_REQUEST_TIMEOUT_SECS", default_value_t = config::DEFAULT_REQUEST_TIMEOUT_SECS)]
    request_timeout_secs: u64,
    /// Most autotune jobs running at once server-wide; one more gets RESOURCE_EXHAUSTED.
    #[arg(long, env = "VECTORD_MAX_CONCURRENT_JOBS", default_value_t = config::DEFAULT_MAX_CONCURRENT_JOBS,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_concurrent_jobs: u64,
    /// Most queries in a harness.
    #[arg(long, env = "VECTORD_MAX_HARNESS_QUERIES", default_value_t = config::DEFAULT_MAX_HARNESS_QUERIES,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_harness_queries: u64,
    /// Finished autotune jobs kept (ListJobs, GetJob); older ones are deleted. Running jobs are always kept.
    #[arg(long, env = "VECTORD_JOBS_KEPT", default_value_t = config::DEFAULT_JOBS_KEPT,
          value_parser = clap::value_parser!(u64).range(1..))]
    jobs_kept: u64,
    /// Trials kept per index and harness: the newest; older ones are deleted, except promoted ones (current or in the history).
    #[arg(long, env = "VECTORD_TRIALS_KEPT", default_value_t = config::DEFAULT_TRIALS_KEPT,
          value_parser = clap::value_parser!(u64).range(1..))]
    trials_kept: u64,
    /// Seconds in-flight calls get to finish after SIGINT/SIGTERM.
    #[arg(long, env = "VECTORD_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    shutdown_grace_secs: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics (off when unset), e.g. 127.0.0.1:9464.
    #[arg(long, env = "VECTORD_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Seconds between the recall probes of refresh policies with a recall floor (0: none).
    #[arg(long, env = "VECTORD_REFRESH_PROBE_SECS", default_value_t = 60)]
    refresh_probe_secs: u64,
    /// Rebuild an index in the background (same config) once this share of its graph's points are tombstones of deleted or replaced points: 0 (never) or in (0, 1).
    #[arg(long, env = "VECTORD_COMPACT_DELETED_FRACTION", default_value_t = vectord::compaction::DEFAULT_DELETED_FRACTION,
        value_parser = |s: &str| s.parse::<f64>().map_err(|e| e.to_string()).and_then(vectord::compaction::check_fraction))]
    compact_deleted_fraction: f64,
    /// Megabytes of the store's pages kept in memory (sled's page cache); the serving graphs hold the vectors themselves, so a bigger cache mainly speeds GetPoint and restarts that rebuild.
    #[arg(long, env = "VECTORD_STORE_CACHE_MB", default_value_t = vectord::store::DEFAULT_CACHE_BYTES / (1024 * 1024),
          value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    store_cache_mb: u64,
    /// Keep the float vectors of native_f16 and native_i8 graphs (read only to rank a search's last candidates exactly and while inserting) in mapped, unlinked temp files under DATA_DIR/float-vectors, which the kernel may write back and evict under memory pressure, instead of in the process's anonymous memory; needs disk space for them (4 x dimension bytes per point per graph). false: keep them in RAM.
    #[arg(long, env = "VECTORD_MAP_FLOAT_VECTORS", default_value_t = true, action = clap::ArgAction::Set,
          value_name = "BOOL")]
    map_float_vectors: bool,
    /// When an index has nothing to link, search for each of its points by its own vector at the index's ef_search (in passes, at the lowest CPU priority) and link any a search does not find first, so that every stored point can be found (docs/scale.md, "Every point can be found"). false: no check; some points unlike the rest of the data stay unfound.
    #[arg(long, env = "VECTORD_CHECK_FINDABLE", default_value_t = true, action = clap::ArgAction::Set,
          value_name = "BOOL")]
    check_findable: bool,
    /// Snapshot an index's graph in the background once its writes have stopped for this many seconds and it changed since its last snapshot (at most one such snapshot per 30 s, or 10x the last one's duration), so a restart loads it instead of replaying the writes; 0: only at an import's end, past a quarter of the index changed, after a start that replayed many points and at shutdown.
    #[arg(long, env = "VECTORD_SNAPSHOT_IDLE_SECS", default_value_t = vectord::snapshots::DEFAULT_IDLE.as_secs(),
          value_parser = clap::value_parser!(u64).range(0..=86_400))]
    snapshot_idle_secs: u64,
    /// HNSW engine of indexes created without one (CreateIndex's engine field) and of indexes created before the engine was stored per index: native_i8 (the default: vectord's own with 8-bit search vectors and exact float vectors for the final ranking, which --map-float-vectors keeps out of anonymous memory; fastest searches and builds), native_f16 (the same with half-float search vectors, about 1.2x native_i8's memory), native (float vectors only, all in RAM: about 0.8x native_i8's memory with everything in RAM, more than native_i8 keeps in RAM with --map-float-vectors) or hnsw_rs.
    #[arg(long, env = "VECTORD_ENGINE", default_value_t = vectord::index::engine::EngineKind::DEFAULT)]
    engine: vectord::index::engine::EngineKind,
    /// Log format: text (for people) or json (one object per line, for log shippers).
    #[arg(long, env = "VECTORD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Read-only API key: may call Get*/List*/Search*/GetPoint, health and reflection (needs --api-key).
    #[arg(
        long,
        env = "VECTORD_READ_ONLY_API_KEY",
        hide_env_values = true,
        conflicts_with = "read_only_api_key_file"
    )]
    read_only_api_key: Option<String>,
    /// File whose first line is the read-only API key.
    #[arg(long, env = "VECTORD_READ_ONLY_API_KEY_FILE", value_name = "PATH")]
    read_only_api_key_file: Option<PathBuf>,
    /// TLS certificate chain (PEM) of the gRPC listener; needs --tls-key.
    #[arg(
        long,
        env = "VECTORD_TLS_CERT",
        value_name = "PEM",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM: PKCS#8, PKCS#1 or SEC1) of --tls-cert.
    #[arg(
        long,
        env = "VECTORD_TLS_KEY",
        value_name = "PEM",
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,
    /// CA (PEM) that client certificates must chain to: clients without one are refused (mTLS).
    #[arg(
        long,
        env = "VECTORD_TLS_CLIENT_CA",
        value_name = "PEM",
        requires = "tls_cert"
    )]
    tls_client_ca: Option<PathBuf>,
    /// Cluster: etcd endpoints, comma-separated (e.g. http://127.0.0.1:2379); needs --nats and
    /// --node-id. Unset: a single node (docs/cluster.md).
    #[arg(long, env = "VECTORD_ETCD", value_name = "URLS", requires_all = ["nats", "node_id"])]
    etcd: Option<String>,
    /// Cluster: NATS servers with JetStream, comma-separated (e.g. nats://127.0.0.1:4222); needs --etcd.
    #[arg(long, env = "VECTORD_NATS", value_name = "URLS", requires = "etcd")]
    nats: Option<String>,
    /// Cluster: this node's id, unique in the cluster (1 to 64 characters of [A-Za-z0-9_.-]).
    #[arg(long, env = "VECTORD_NODE_ID", requires = "etcd")]
    node_id: Option<String>,
    /// Cluster: the HOST:PORT other nodes and clients reach this node at (default: --addr).
    #[arg(
        long,
        env = "VECTORD_ADVERTISE_ADDR",
        value_name = "HOST:PORT",
        requires = "etcd"
    )]
    advertise_addr: Option<String>,
    /// Cluster: write-log messages every index's stream keeps below the oldest one a live node
    /// still needs (for nodes that restart quickly); older ones are trimmed, and a node that
    /// comes back needing one of them copies the index from a peer (docs/cluster.md).
    #[arg(long, env = "VECTORD_LOG_KEEP_MESSAGES", value_name = "N", requires = "etcd",
          default_value_t = vectord::cluster::catchup::DEFAULT_LOG_KEEP_MESSAGES)]
    log_keep_messages: u64,
    /// Cluster: the CA (PEM) etcd's certificate must chain to (with https:// --etcd URLs;
    /// without it, the system's roots).
    #[arg(long, env = "VECTORD_ETCD_CA", value_name = "PEM", requires = "etcd")]
    etcd_ca: Option<PathBuf>,
    /// Cluster: this node's client certificate (PEM) for etcd; needs --etcd-key.
    #[arg(long, env = "VECTORD_ETCD_CERT", value_name = "PEM", requires_all = ["etcd", "etcd_key"])]
    etcd_cert: Option<PathBuf>,
    /// Cluster: the key (PEM) of --etcd-cert.
    #[arg(
        long,
        env = "VECTORD_ETCD_KEY",
        value_name = "PEM",
        requires = "etcd_cert"
    )]
    etcd_key: Option<PathBuf>,
    /// Cluster: etcd user (with authentication on); its password from VECTORD_ETCD_PASSWORD.
    #[arg(long, env = "VECTORD_ETCD_USER", requires = "etcd")]
    etcd_user: Option<String>,
    /// Cluster: the password of --etcd-user (prefer the environment variable to the flag).
    #[arg(
        long,
        env = "VECTORD_ETCD_PASSWORD",
        hide_env_values = true,
        requires = "etcd_user"
    )]
    etcd_password: Option<String>,
    /// Cluster: the CA (PEM) the NATS servers' certificates must chain to (with tls:// --nats URLs).
    #[arg(long, env = "VECTORD_NATS_CA", value_name = "PEM", requires = "etcd")]
    nats_ca: Option<PathBuf>,
    /// Cluster: this node's client certificate (PEM) for NATS; needs --nats-key.
    #[arg(long, env = "VECTORD_NATS_CERT", value_name = "PEM", requires_all = ["etcd", "nats_key"])]
    nats_cert: Option<PathBuf>,
    /// Cluster: the key (PEM) of --nats-cert.
    #[arg(
        long,
        env = "VECTORD_NATS_KEY",
        value_name = "PEM",
        requires = "nats_cert"
    )]
    nats_key: Option<PathBuf>,
    /// Cluster: NATS user; its password from VECTORD_NATS_PASSWORD.
    #[arg(long, env = "VECTORD_NATS_USER", requires = "etcd")]
    nats_user: Option<String>,
    /// Cluster: the password of --nats-user (prefer the environment variable to the flag).
    #[arg(
        long,
        env = "VECTORD_NATS_PASSWORD",
        hide_env_values = true,
        requires = "nats_user"
    )]
    nats_password: Option<String>,
    /// Cluster: the lab log (harnesses and trials) is trimmed when it holds more records that
    /// no longer change the lab (trials removed by --trials-kept, deleted harnesses, the records
    /// that removed them) than this and than live ones (docs/cluster.md).
    #[arg(long, env = "VECTORD_LAB_LOG_MAX_DEAD", value_name = "N", requires = "etcd",
          default_value_t = vectord::cluster::lab::DEFAULT_LAB_LOG_MAX_DEAD,
          value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    lab_log_max_dead: u64,
    /// Allow a non-loopback --addr without TLS, and a non-loopback --metrics-addr (when the network is the boundary).
    #[arg(long, env = "VECTORD_INSECURE")]
    insecure: bool,
    /// Most ids in one DeletePoints call; more is RESOURCE_EXHAUSTED.
    #[arg(long, env = "VECTORD_MAX_IDS_PER_DELETE", default_value_t = config::DEFAULT_MAX_IDS_PER_DELETE,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_ids_per_delete: u64,
    /// Most queries in one SearchBatch call; more is RESOURCE_EXHAUSTED.
    #[arg(long, env = "VECTORD_MAX_BATCH_QUERIES", default_value_t = config::DEFAULT_MAX_BATCH_QUERIES,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_batch_queries: u64,
    /// Most neighbours one SearchBatch may ask for (queries x k); more is RESOURCE_EXHAUSTED.
    #[arg(long, env = "VECTORD_MAX_BATCH_RESULTS", default_value_t = config::DEFAULT_MAX_BATCH_RESULTS,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_batch_results: u64,
    /// Largest response message, in bytes; a SearchBatch whose answer could be larger is RESOURCE_EXHAUSTED.
    #[arg(long, env = "VECTORD_MAX_RESPONSE_BYTES", default_value_t = config::DEFAULT_MAX_RESPONSE_BYTES,
          value_parser = clap::value_parser!(u64).range(1024..=(u32::MAX as u64)))]
    max_response_bytes: u64,
    /// Most client connections served at once; one more closes the connection idle longest
    /// (no call in flight), or is closed at once when every one has a call in flight.
    #[arg(long, env = "VECTORD_MAX_CONNECTIONS", default_value_t = config::DEFAULT_MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: u64,
    /// Seconds a new connection may take to send its first bytes (the HTTP/2 preface) before it is closed.
    #[arg(long, env = "VECTORD_HANDSHAKE_TIMEOUT_SECS", default_value_t = config::DEFAULT_HANDSHAKE_TIMEOUT_SECS,
          value_parser = clap::value_parser!(u64).range(1..))]
    handshake_timeout_secs: u64,
    /// Seconds a connection may stay open with no call in flight before it is closed (0: no
    /// limit); clients reconnect at their next call.
    #[arg(long, env = "VECTORD_IDLE_TIMEOUT_SECS", default_value_t = config::DEFAULT_IDLE_TIMEOUT_SECS)]
    idle_timeout_secs: u64,
    /// Calls one HTTP/2 connection may have open at once.
    #[arg(long, env = "VECTORD_HTTP2_MAX_CONCURRENT_STREAMS", default_value_t = config::DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS,
          value_parser = clap::value_parser!(u32).range(1..))]
    http2_max_concurrent_streams: u32,
    /// Seconds between HTTP/2 PINGs the server sends on each connection (0: none).
    #[arg(long, env = "VECTORD_HTTP2_KEEPALIVE_INTERVAL_SECS", default_value_t = config::DEFAULT_HTTP2_KEEPALIVE_INTERVAL_SECS)]
    http2_keepalive_interval_secs: u64,
    /// Seconds a PING may go unanswered before the connection is closed.
    #[arg(long, env = "VECTORD_HTTP2_KEEPALIVE_TIMEOUT_SECS", default_value_t = config::DEFAULT_HTTP2_KEEPALIVE_TIMEOUT_SECS,
          value_parser = clap::value_parser!(u64).range(1..))]
    http2_keepalive_timeout_secs: u64,
    /// Seconds of idleness before TCP keepalive probes start on a connection (0: no TCP keepalive).
    #[arg(long, env = "VECTORD_TCP_KEEPALIVE_SECS", default_value_t = config::DEFAULT_TCP_KEEPALIVE_SECS)]
    tcp_keepalive_secs: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logging(level: Option<&str>, format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let spec = level
        .map(str::to_string)
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".into());
    // hnsw_rs logs every graph allocation at info; keep it quiet unless asked for by name.
    let spec = if spec.contains("hnsw_rs") {
        spec
    } else {
        format!("{spec},hnsw_rs=warn")
    };
    let filter = EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new("info,hnsw_rs=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().with_current_span(true).init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// The config from the flags; every file is read here so a bad one is named before binding.
fn config_of(args: &ServeArgs, client: &cli::GlobalArgs) -> Result<Config, String> {
    let mut config = Config::new(args.data_dir.clone());
    config.max_request_bytes = args.max_request_bytes;
    config.shutdown_grace = Duration::from_secs(args.shutdown_grace_secs);
    config.metrics_addr = args.metrics_addr;
    config.refresh_probe_interval = Duration::from_secs(args.refresh_probe_secs);
    config.max_points_per_upsert = args.max_points_per_upsert as usize;
    config.max_pending_writes = args.max_pending_writes as usize;
    config.max_unindexed_points = args.max_unindexed_points as usize;
    // A test hook (the binary's tests): the indexers sleep this long before each batch.
    if let Some(ms) = std::env::var("VECTORD_TEST_INDEXER_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        config.indexer_hold = Some(vectord::catalog::IndexerHold::delayed(
            std::time::Duration::from_millis(ms),
        ));
    }
    // Test hooks (the binary's tests), read here so that no code below reads the environment:
    // builds sleep before each chunk; a snapshot write pauses before its rename.
    let ms = |var: &str| {
        std::env::var(var)
            .ok()
            .and_then(|v| v.parse().ok())
            .map(std::time::Duration::from_millis)
    };
    config.test_pauses = vectord::catalog::TestPauses {
        build_chunk: ms("VECTORD_TEST_BUILD_CHUNK_DELAY_MS"),
        snapshot_write: ms("VECTORD_TEST_SNAPSHOT_DELAY_MS"),
    };
    config.max_concurrent_requests = args.max_concurrent_requests as usize;
    config.request_timeout =
        (args.request_timeout_secs > 0).then(|| Duration::from_secs(args.request_timeout_secs));
    config.max_concurrent_jobs = args.max_concurrent_jobs as usize;
    config.max_harness_queries = args.max_harness_queries as usize;
    config.jobs_kept = args.jobs_kept as usize;
    config.trials_kept = args.trials_kept as usize;
    config.engine = args.engine;
    config.compact_deleted_fraction = args.compact_deleted_fraction;
    config.store_cache_bytes = args.store_cache_mb * 1024 * 1024;
    config.map_float_vectors = args.map_float_vectors;
    config.check_findable = args.check_findable;
    config.snapshot_idle =
        (args.snapshot_idle_secs > 0).then(|| Duration::from_secs(args.snapshot_idle_secs));
    config.max_ids_per_delete = args.max_ids_per_delete as usize;
    config.max_batch_queries = args.max_batch_queries as usize;
    config.max_batch_results = args.max_batch_results as usize;
    config.max_response_bytes = args.max_response_bytes as usize;
    config.max_connections = args.max_connections as usize;
    config.handshake_timeout = Duration::from_secs(args.handshake_timeout_secs);
    config.idle_timeout =
        (args.idle_timeout_secs > 0).then(|| Duration::from_secs(args.idle_timeout_secs));
    config.http2_max_concurrent_streams = args.http2_max_concurrent_streams;
    config.http2_keepalive_interval = (args.http2_keepalive_interval_secs > 0)
        .then(|| Duration::from_secs(args.http2_keepalive_interval_secs));
    config.http2_keepalive_timeout = Duration::from_secs(args.http2_keepalive_timeout_secs);
    config.tcp_keepalive =
        (args.tcp_keepalive_secs > 0).then(|| Duration::from_secs(args.tcp_keepalive_secs));
    let admin = api_key_from(
        "--api-key",
        client.api_key.clone(),
        client.api_key_file.as_deref(),
    )
    .map_err(|e| e.to_string())?;
    let read_only = api_key_from(
        "--read-only-api-key",
        args.read_only_api_key.clone(),
        args.read_only_api_key_file.as_deref(),
    )
    .map_err(|e| e.to_string())?;
    config.api_keys = match (admin, read_only) {
        (Some(admin), ro) => Some(Arc::new(
            ApiKeys::new(admin, ro).map_err(|e| e.to_string())?,
        )),
        (None, Some(_)) => {
            return Err(
                "--read-only-api-key needs --api-key (the admin key): without one \
                 nothing could change the data"
                    .into(),
            )
        }
        (None, None) => None,
    };
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        config.tls = Some(
            TlsConfig::load(cert, key, args.tls_client_ca.as_deref()).map_err(|e| e.to_string())?,
        );
    }
    if let (Some(etcd), Some(nats), Some(node_id)) = (&args.etcd, &args.nats, &args.node_id) {
        config.cluster = Some(
            vectord::cluster::ClusterConfig::parse(
                etcd,
                nats,
                node_id,
                &args
                    .advertise_addr
                    .clone()
                    .unwrap_or_else(|| args.addr.to_string()),
            )
            .map_err(|e| e.to_string())?,
        );
        if let Some(c) = config.cluster.as_mut() {
            c.log_keep_messages = args.log_keep_messages;
            c.lab_log_max_dead = args.lab_log_max_dead;
            c.etcd_access = vectord::cluster::EngineAccess {
                ca: args.etcd_ca.clone(),
                cert: args.etcd_cert.clone().zip(args.etcd_key.clone()),
                user: args.etcd_user.clone(),
                password: args.etcd_password.clone(),
            };
            c.etcd_access
                .check("--etcd", &c.etcd, "https://")
                .map_err(|e| e.to_string())?;
            c.nats_access = vectord::cluster::EngineAccess {
                ca: args.nats_ca.clone(),
                cert: args.nats_cert.clone().zip(args.nats_key.clone()),
                user: args.nats_user.clone(),
                password: args.nats_password.clone(),
            };
            c.nats_access
                .check("--nats", &c.nats, "tls://")
                .map_err(|e| e.to_string())?;
        }
    }
    config
        .check_exposure(args.addr, args.insecure)
        .map_err(|e| e.to_string())?;
    Ok(config)
}

async fn serve(args: ServeArgs, mut config: Config) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.addr))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    if let Some(c) = config.cluster.as_mut() {
        // --addr with port 0 and no --advertise-addr: advertise the port the OS chose.
        if args.advertise_addr.is_none() {
            c.advertise_addr = addr.to_string();
        }
    }
    tracing::info!(%addr, data_dir = %args.data_dir.display(), engine = args.engine.name(), "vectord listening");
    let keys = match &config.api_keys {
        None => "none",
        Some(k) if k.has_read_only() => "admin and read-only",
        Some(_) => "admin",
    };
    tracing::info!(
        tls = config.tls.is_some(),
        mtls = config.tls.as_ref().is_some_and(|t| t.mtls()),
        api_keys = keys,
        "security"
    );
    if config.tls.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(
            "serving plaintext on a non-loopback address: calls{} cross the network unencrypted",
            if config.api_keys.is_some() {
                " and API keys"
            } else {
                ""
            }
        );
    }
    vectord::server::run(listener, config, shutdown_signal())
        .await
        .map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let args = match cli.command {
        Command::Serve(args) => args,
        Command::Client(cmd) => return run_client(cli.client, cmd),
    };
    init_logging(cli.log.as_deref(), args.log_format);
    let config = match config_of(&args, &cli.client) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("vectord: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vectord: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(serve(args, config));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("vectord: {e}");
            // Exit now (a storage failure among others): do not wait for blocking tasks such
            // as a build still running.
            runtime.shutdown_background();
            ExitCode::from(1)
        }
    }
}

/// A client subcommand: no logging (errors go to stderr as `error: CODE: message`).
fn run_client(global: cli::GlobalArgs, cmd: cli::ClientCommand) -> ExitCode {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(cli::run(global, cmd)),
        Err(e) => {
            eprintln!("error: INTERNAL: cannot start the runtime: {e}");
            ExitCode::from(1)
        }
    }
}
