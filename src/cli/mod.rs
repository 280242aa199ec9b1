//! The client subcommands of `vectord`: each one is a thin handler over one or a few gRPC calls
//! to a running server (`--server`), printing a human summary or JSON lines (`--json`).

mod autotune;
mod commands;
pub mod error;
mod files;
mod import;
mod json;
mod out;
mod progress;
mod report;

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use vectord::pb::autotune_service_client::AutotuneServiceClient;
use vectord::pb::index_service_client::IndexServiceClient;
use vectord::pb::promotion_service_client::PromotionServiceClient;

use error::CliError;
pub use error::EXIT_CODES_HELP;
use files::Format;

/// The deadline of a quick unary call when `--timeout` is not given.
const DEFAULT_UNARY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long connecting may take when `--timeout` is not given.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Flags of the client subcommands (accepted anywhere on the command line).
#[derive(Args, Debug, Clone)]
pub struct GlobalArgs {
    /// Server to call (client subcommands): HOST:PORT or a URL; several, comma-separated (a
    /// cluster's nodes, at most 32): the first, in order, that connects and reports SERVING.
    #[arg(
        long,
        global = true,
        env = "VECTORD_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    pub server: String,
    /// Machine output: one JSON object per line with the proto field names (client subcommands).
    #[arg(long, global = true)]
    pub json: bool,
    /// Deadline of each call in seconds (client subcommands). Default: 30 for quick calls, none
    /// for streams and for calls that build graphs.
    #[arg(long, global = true, value_name = "SECS", value_parser = parse_secs)]
    pub timeout: Option<Duration>,
    /// API key: clients send it as `authorization: Bearer <key>`; `serve` takes it as the admin key.
    #[arg(
        long,
        global = true,
        env = "VECTORD_API_KEY",
        hide_env_values = true,
        conflicts_with = "api_key_file"
    )]
    pub api_key: Option<String>,
    /// File whose first line is the API key (instead of --api-key).
    #[arg(long, global = true, env = "VECTORD_API_KEY_FILE", value_name = "PATH")]
    pub api_key_file: Option<PathBuf>,
    /// CA certificate (PEM) that an https:// --server's certificate must chain to (client
    /// subcommands; default: the system's roots).
    #[arg(long, global = true, env = "VECTORD_TLS_CA", value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for an https:// --server that requires one (mTLS); needs
    /// --tls-client-key (client subcommands).
    #[arg(
        long,
        global = true,
        env = "VECTORD_TLS_CLIENT_CERT",
        value_name = "PEM",
        requires = "tls_client_key"
    )]
    pub tls_client_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-client-cert (client subcommands).
    #[arg(
        long,
        global = true,
        env = "VECTORD_TLS_CLIENT_KEY",
        value_name = "PEM",
        requires = "tls_client_cert"
    )]
    pub tls_client_key: Option<PathBuf>,
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("not a number of seconds: {s}"))?;
    if secs.is_nan() || secs <= 0.0 {
        return Err(format!("must be positive, got {s}"));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
}

#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// Exit 0 when the server is SERVING, else 5 (usable as an exec probe).
    Health,
    /// Create, show, list and delete indexes.
    #[command(subcommand)]
    Index(IndexCommand),
    /// The k nearest points to a vector.
    Search(SearchArgs),
    /// Load points from a file (.fvecs, .npy, .jsonl) through the ImportPoints stream.
    Import(ImportArgs),
    /// Evaluation harnesses: queries with exact ground truth.
    #[command(subcommand)]
    Harness(HarnessCommand),
    /// Run one trial, show and list the trial journal.
    #[command(subcommand)]
    Trial(TrialCommand),
    /// Run a grid of trials, print each as it finishes, promote the winner (Ctrl-C cancels).
    Autotune(AutotuneArgs),
    /// Promote a trial's config for its index.
    Promote(PromoteArgs),
    /// Put the previous promotion back (or clear the promotion).
    Rollback(IndexFlag),
    /// Show an index's promoted config and its history.
    Promoted(IndexFlag),
    /// Profiles: named sets of indexes rebuilt together on activation.
    #[command(subcommand)]
    Profile(ProfileCommand),
    /// List and cancel autotune jobs.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// The journal of an index: its recall × p50 × memory Pareto front as a table, and with
    /// --svg a recall-vs-p50 plot with the recall × p50 front marked, memory as marker area and
    /// the promoted config ringed.
    Report(report::ReportArgs),
    /// Set an index's refresh policy: re-tune by itself after appends (--on-append FRACTION)
    /// or when a recall probe falls under --recall-floor; --manual clears it.
    Refresh(RefreshArgs),
}

#[derive(Args, Debug)]
pub struct RefreshArgs {
    #[arg(long)]
    pub index: String,
    /// Tune only when asked (clears the policy).
    #[arg(long, conflicts_with_all = ["on_append", "harness", "recall_floor"])]
    pub manual: bool,
    /// Re-tune when this fraction of the points changed since the last tune (e.g. 0.2).
    #[arg(long, required_unless_present = "manual", requires = "harness")]
    pub on_append: Option<f64>,
    /// The harness the tune and the probe measure on.
    #[arg(long)]
    pub harness: Option<String>,
    /// Also re-tune when the periodic probe measures the serving recall under this.
    #[arg(long)]
    pub recall_floor: Option<f64>,
    /// Rebuild the index with the winner.
    #[arg(long)]
    pub activate: bool,
    /// Tune for the fastest config reaching this recall (default: the highest recall).
    #[arg(long)]
    pub target_recall: Option<f64>,
    /// Tune with the ADAPTIVE strategy (needs --target-recall).
    #[arg(long, requires = "target_recall")]
    pub adaptive: bool,
    /// The tune's promotion gate (server default 0.9).
    #[arg(long)]
    pub min_recall: Option<f64>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum MetricArg {
    L2,
    Cosine,
    Dot,
}

#[derive(Subcommand, Debug)]
pub enum IndexCommand {
    /// Create an empty index.
    Create {
        name: String,
        #[arg(long)]
        dim: u32,
        #[arg(long, value_enum)]
        metric: MetricArg,
        /// Default config: links per node (server default 16).
        #[arg(long)]
        m: Option<u32>,
        /// Default config: build candidate list (server default 200).
        #[arg(long)]
        ef_construction: Option<u32>,
        /// Default config: search candidate list (server default 64).
        #[arg(long)]
        ef_search: Option<u32>,
        /// Default config: insertion-order seed (a seeded build is reproducible).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Show one index.
    Get { name: String },
    /// List every index.
    List,
    /// Delete an index with its points, harnesses, trials and promotions.
    Delete { name: String },
}

#[derive(Args, Debug)]
pub struct SearchArgs {
    #[arg(long)]
    pub index: String,
    /// The query, comma-separated: 0.1,0.2,...
    #[arg(
        long,
        value_delimiter = ',',
        required_unless_present = "id",
        conflicts_with = "id",
        allow_hyphen_values = true
    )]
    pub vector: Vec<f32>,
    /// Search with the stored vector of this point (it finds itself first).
    #[arg(long)]
    pub id: Option<u64>,
    #[arg(short, long, default_value_t = 10)]
    pub k: u32,
    /// Overrides the generation's ef_search for this query.
    #[arg(long)]
    pub ef_search: Option<u32>,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    #[arg(long)]
    pub index: String,
    pub file: PathBuf,
    /// Default: from the extension.
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Points per streamed message.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: u32,
    /// Id of the first vector of an fvecs/npy file (and of JSONL lines without an id: start-id + record number).
    #[arg(long, default_value_t = 0)]
    pub start_id: u64,
}

#[derive(Subcommand, Debug)]
pub enum HarnessCommand {
    /// Create a harness: sampled from the index's points or from a query file.
    Create {
        #[arg(long)]
        index: String,
        name: String,
        /// Sample this many of the index's points as queries.
        #[arg(long, conflicts_with = "queries", required_unless_present = "queries")]
        sample: Option<u32>,
        /// Seed of the sample (server default 42).
        #[arg(long, requires = "sample")]
        seed: Option<u64>,
        /// Query vectors from a .jsonl or .fvecs file.
        #[arg(long)]
        queries: Option<PathBuf>,
        /// Recall is measured at this k.
        #[arg(short, long, default_value_t = 10)]
        k: u32,
    },
    /// List an index's harnesses.
    List {
        #[arg(long)]
        index: String,
    },
    /// Delete a harness.
    Delete {
        #[arg(long)]
        index: String,
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum TrialCommand {
    /// Build one graph with the config, measure it on the harness and journal it.
    Run {
        #[arg(long)]
        index: String,
        #[arg(long)]
        harness: String,
        #[arg(long)]
        m: u32,
        #[arg(long)]
        ef_construction: u32,
        #[arg(long)]
        ef_search: u32,
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Show one trial.
    Get { id: u64 },
    /// The journal, newest first.
    List {
        #[arg(long)]
        index: Option<String>,
        #[arg(long)]
        harness: Option<String>,
        /// At most this many trials (pages are followed).
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

#[derive(Args, Debug)]
pub struct AutotuneArgs {
    #[arg(long)]
    pub index: String,
    #[arg(long)]
    pub harness: String,
    /// Recall the winner needs to be promoted (server default 0.9).
    #[arg(long)]
    pub min_recall: Option<f64>,
    /// Configs to try: ef_construction:ef_search[:m],... (m default 16). Default: the server's grid of five.
    #[arg(long, value_delimiter = ',', value_parser = parse_grid_entry)]
    pub grid: Vec<(u32, u32, u32)>,
    /// Seed of every --grid entry, or of every graph --adaptive builds.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Strategy ADAPTIVE (needs --target-recall): successive halving over ef_construction with
    /// a binary search of ef_search per graph, instead of a fixed grid.
    #[arg(long, conflicts_with = "grid", requires = "target_recall")]
    pub adaptive: bool,
    /// ADAPTIVE: at most this many trials (server default 40).
    #[arg(long, requires = "adaptive")]
    pub max_trials: Option<u32>,
    /// ADAPTIVE: start no build or trial that would end after this many seconds.
    #[arg(long, requires = "adaptive")]
    pub max_seconds: Option<u32>,
    /// ADAPTIVE: the m values to explore (server default 8,16,32).
    #[arg(long, value_delimiter = ',', requires = "adaptive")]
    pub adaptive_m: Vec<u32>,
    /// ADAPTIVE: the ef_construction rungs (server default 40,100,200).
    #[arg(long, value_delimiter = ',', requires = "adaptive")]
    pub adaptive_ef_construction: Vec<u32>,
    /// ADAPTIVE: multi-fidelity, ranking configs on a seeded sample of this many points before
    /// confirming the best on all of them; 0 turns it off (server default: on from 50,000
    /// points, a tenth of them, at least 20,000).
    #[arg(long, requires = "adaptive")]
    pub sample_points: Option<u32>,
    /// ADAPTIVE multi-fidelity: graphs of the sample confirmed on all points (server default 2).
    #[arg(long, requires = "adaptive")]
    pub confirm: Option<u32>,
    /// Swap in the winner's config after promoting it: the graph its trial built becomes the
    /// new generation (the writes made since replayed into it), no second build.
    #[arg(long)]
    pub activate: bool,
    /// Recorded as promoted_by (server default "autotune").
    #[arg(long)]
    pub requested_by: Option<String>,
    /// Objective TARGET_RECALL: the fastest config whose recall reaches this (default objective:
    /// the highest recall, then the lowest p50).
    #[arg(long)]
    pub target_recall: Option<f64>,
}

/// `ec:es[:m]` as (ef_construction, ef_search, m).
fn parse_grid_entry(s: &str) -> Result<(u32, u32, u32), String> {
    let parts: Vec<&str> = s.split(':').collect();
    let num = |p: &str, what: &str| {
        p.trim()
            .parse::<u32>()
            .map_err(|_| format!("{what} {p:?} in grid entry {s:?} is not a number"))
    };
    match parts[..] {
        [ec, es] => Ok((num(ec, "ef_construction")?, num(es, "ef_search")?, 16)),
        [ec, es, m] => Ok((
            num(ec, "ef_construction")?,
            num(es, "ef_search")?,
            num(m, "m")?,
        )),
        _ => Err(format!(
            "grid entry {s:?} is not ef_construction:ef_search[:m]"
        )),
    }
}

#[derive(Args, Debug)]
pub struct PromoteArgs {
    #[arg(long)]
    pub index: String,
    #[arg(long)]
    pub trial: u64,
    /// Recorded as promoted_by.
    #[arg(long)]
    pub by: Option<String>,
    #[arg(long)]
    pub note: Option<String>,
}

#[derive(Args, Debug)]
pub struct IndexFlag {
    #[arg(long)]
    pub index: String,
}

#[derive(Subcommand, Debug)]
pub enum ProfileCommand {
    /// Create or replace a profile.
    Put {
        name: String,
        /// An index of the profile, optionally with its default config: NAME or NAME:m:ef_construction:ef_search. Repeatable.
        #[arg(long = "index", required = true, value_parser = parse_profile_index)]
        indexes: Vec<ProfileEntry>,
    },
    Get {
        name: String,
    },
    List,
    Delete {
        name: String,
    },
    /// Rebuild every index of the profile (promoted config, else the profile's, else the index's).
    Activate {
        name: String,
    },
}

/// An index of a profile and its default config (m, ef_construction, ef_search), if any.
pub type ProfileEntry = (String, Option<(u32, u32, u32)>);

/// `NAME` or `NAME:m:ef_construction:ef_search`.
fn parse_profile_index(s: &str) -> Result<ProfileEntry, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let num = |p: &str| {
        p.parse::<u32>()
            .map_err(|_| format!("{p:?} in {s:?} is not a number"))
    };
    match parts[..] {
        [name] => Ok((name.to_string(), None)),
        [name, m, ec, es] => Ok((name.to_string(), Some((num(m)?, num(ec)?, num(es)?)))),
        _ => Err(format!(
            "{s:?} is not NAME or NAME:m:ef_construction:ef_search"
        )),
    }
}

#[derive(Subcommand, Debug)]
pub enum JobsCommand {
    /// Running jobs, then finished ones, newest first.
    List {
        #[arg(long)]
        index: Option<String>,
    },
    /// Cancel a running job.
    Cancel { id: String },
}

/// Adds `authorization: Bearer <key>` to every call when a key is set.
#[derive(Clone)]
pub struct BearerKey(Option<MetadataValue<Ascii>>);

impl Interceptor for BearerKey {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// The channel every client uses: the connection plus the key.
pub type Chan = InterceptedService<Channel, BearerKey>;

/// A connection to the server and how to print.
pub struct Ctx {
    channel: Channel,
    key: BearerKey,
    json: bool,
    timeout: Option<Duration>,
}

impl Ctx {
    async fn connect(g: &GlobalArgs) -> Result<Ctx, CliError> {
        let key = vectord::config::api_key_from(
            "--api-key",
            g.api_key.clone(),
            g.api_key_file.as_deref(),
        )
        .map_err(|e| CliError::invalid(e.to_string()))?;
        let key = match key {
            None => BearerKey(None),
            Some(k) => {
                BearerKey(Some(k.bearer().parse().map_err(|_| {
                    CliError::invalid("--api-key cannot be sent as metadata")
                })?))
            }
        };
        let servers: Vec<&str> = g
            .server
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        if servers.is_empty() {
            return Err(CliError::invalid("--server names no address"));
        }
        if servers.len() > MAX_SERVERS {
            return Err(CliError::invalid(format!(
                "--server names {} addresses; at most {MAX_SERVERS}",
                servers.len()
            )));
        }
        let mut endpoints = Vec::with_capacity(servers.len());
        for server in &servers {
            endpoints.push(endpoint(server, g)?);
        }
        // One address: that server. Several (a cluster's nodes): the first, in the order
        // given, that accepts a connection and reports SERVING; else the first that accepted
        // one (its answers then say why it is not serving).
        let mut failures = Vec::new();
        let mut fallback = None;
        for (server, endpoint) in servers.iter().zip(endpoints) {
            match endpoint.connect().await {
                Ok(channel) if servers.len() == 1 => {
                    fallback = Some(channel);
                    break;
                }
                Ok(channel) => {
                    let mut health = HealthClient::new(channel.clone());
                    let check = health.check(HealthCheckRequest {
                        service: String::new(),
                    });
                    match tokio::time::timeout(HEALTH_PROBE_TIMEOUT, check).await {
                        Ok(Ok(r)) if r.get_ref().status == ServingStatus::Serving as i32 => {
                            fallback = Some(channel);
                            break;
                        }
                        _ => {
                            failures.push(format!("{server}: not SERVING"));
                            fallback.get_or_insert(channel);
                        }
                    }
                }
                Err(e) => failures.push(format!("{server}: {}", error::chain(&e))),
            }
        }
        let Some(channel) = fallback else {
            return Err(CliError::unavailable(if servers.len() == 1 {
                format!("cannot connect to {}", failures.join("; "))
            } else {
                format!("cannot connect to any of --server: {}", failures.join("; "))
            }));
        };
        if !failures.is_empty() && !g.json {
            eprintln!("note: skipped {}", failures.join("; "));
        }
        Ok(Ctx {
            channel,
            key,
            json: g.json,
            timeout: g.timeout,
        })
    }

    /// The connection with the key added to every call.
    fn chan(&self) -> Chan {
        InterceptedService::new(self.channel.clone(), self.key.clone())
    }

    fn index(&self) -> IndexServiceClient<Chan> {
        IndexServiceClient::new(self.chan())
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }

    fn autotune(&self) -> AutotuneServiceClient<Chan> {
        AutotuneServiceClient::new(self.chan())
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }

    fn promotion(&self) -> PromotionServiceClient<Chan> {
        PromotionServiceClient::new(self.chan())
    }

    /// A quick unary call: `--timeout`, else 30 s.
    async fn call<T>(
        &self,
        f: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, CliError> {
        deadline(Some(self.timeout.unwrap_or(DEFAULT_UNARY_TIMEOUT)), f).await
    }

    /// A call that may take long (graph builds, ground truth): only `--timeout` bounds it.
    async fn call_long<T>(
        &self,
        f: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, CliError> {
        deadline(self.timeout, f).await
    }
}

/// Most addresses `--server` may name.
const MAX_SERVERS: usize = 32;
/// How long a node of several named by `--server` has to answer the health check.
const HEALTH_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The endpoint of one `--server` address, with the TLS flags applied.
fn endpoint(server: &str, g: &GlobalArgs) -> Result<Endpoint, CliError> {
    // `host:port` alone means plaintext http.
    let url = if server.contains("://") {
        server.to_string()
    } else {
        format!("http://{server}")
    };
    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| CliError::invalid(format!("--server {server:?}: {e}")))?
        .connect_timeout(g.timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT));
    if url.starts_with("https://") {
        let mut tls = ClientTlsConfig::new();
        tls = match &g.tls_ca {
            Some(path) => {
                let pem = std::fs::read(path)
                    .map_err(|e| CliError::invalid(format!("--tls-ca {}: {e}", path.display())))?;
                tls.ca_certificate(Certificate::from_pem(pem))
            }
            None => tls.with_native_roots(),
        };
        if let (Some(cert), Some(key)) = (&g.tls_client_cert, &g.tls_client_key) {
            let read = |flag: &str, p: &PathBuf| {
                std::fs::read(p)
                    .map_err(|e| CliError::invalid(format!("{flag} {}: {e}", p.display())))
            };
            tls = tls.identity(Identity::from_pem(
                read("--tls-client-cert", cert)?,
                read("--tls-client-key", key)?,
            ));
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| CliError::invalid(format!("TLS: {}", error::chain(&e))))?;
    } else if g.tls_ca.is_some() || g.tls_client_cert.is_some() {
        return Err(CliError::invalid(format!(
            "--tls-ca or --tls-client-cert is given but --server {server} is not https://"
        )));
    }
    Ok(endpoint)
}

async fn deadline<T>(
    limit: Option<Duration>,
    f: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, CliError> {
    let r = match limit {
        None => f.await,
        Some(d) => tokio::time::timeout(d, f).await.map_err(|_| {
            CliError::new(
                Code::DeadlineExceeded,
                format!("no answer within {} s", d.as_secs_f64()),
            )
        })?,
    };
    Ok(r?.into_inner())
}

/// Runs one client subcommand and returns the process exit code.
pub async fn run(g: GlobalArgs, cmd: ClientCommand) -> ExitCode {
    let result = async {
        let ctx = Ctx::connect(&g).await?;
        commands::dispatch(&ctx, cmd).await
    }
    .await;
    match result {
        Ok(code) => code,
        Err(e) => e.report(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grid_and_profile_entries() {
        assert_eq!(parse_grid_entry("20:30"), Ok((20, 30, 16)));
        assert_eq!(parse_grid_entry("20:30:8"), Ok((20, 30, 8)));
        assert!(parse_grid_entry("20").is_err());
        assert!(parse_grid_entry("a:30").is_err());
        assert_eq!(parse_profile_index("x"), Ok(("x".into(), None)));
        assert_eq!(
            parse_profile_index("x:16:100:50"),
            Ok(("x".into(), Some((16, 100, 50))))
        );
        assert!(parse_profile_index("x:16").is_err());
        assert!(parse_secs("0").is_err());
        assert_eq!(parse_secs("1.5"), Ok(Duration::from_millis(1500)));
    }
}
