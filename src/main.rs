//! The `vectord` command line: `serve` runs the server; the other subcommands are clients.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use vectord::config::Config;

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
    /// Seconds in-flight calls get to finish after SIGINT/SIGTERM.
    #[arg(long, env = "VECTORD_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    shutdown_grace_secs: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics (off when unset), e.g. 127.0.0.1:9464.
    #[arg(long, env = "VECTORD_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// HNSW engine: native (vectord's own, the default) or hnsw_rs.
    #[arg(long, env = "VECTORD_ENGINE", default_value = "native")]
    engine: vectord::index::engine::EngineKind,
    /// Log format: text (for people) or json (one object per line, for log shippers).
    #[arg(long, env = "VECTORD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
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

async fn serve(args: ServeArgs) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.addr))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(%addr, data_dir = %args.data_dir.display(), engine = args.engine.name(), "vectord listening");
    let mut config = Config::new(args.data_dir);
    config.max_request_bytes = args.max_request_bytes;
    config.shutdown_grace = Duration::from_secs(args.shutdown_grace_secs);
    config.metrics_addr = args.metrics_addr;
    config.engine = args.engine;
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
    let result = runtime.block_on(serve(args));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("vectord: {e}");
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
