//! Autotune vs separate trials, over gRPC against a real in-process server.
//!
//! Run with `cargo bench --bench autotune`. Loads `words_minilm_30k.fvecs` (override with
//! `VECTORD_BENCH_DATA`, cap with `VECTORD_BENCH_N`), imports it into a cosine index, creates a
//! 200-query sampled harness, then times in one run:
//! - the baseline: the five default-grid configs as five separate RunTrial calls;
//! - one Autotune with the default grid (configs sharing m/ef_construction/seed share a build).
//!
//! Prints both wall times, the ratio (target <= 0.8), and every trial; writes
//! `target/bench-autotune.json`. Without the data file it says so and exits successfully.

use std::error::Error;
use std::path::PathBuf;
use std::time::Instant;

use serde_json::json;
use vectord::pb;
use vectord::pb::autotune_service_client::AutotuneServiceClient;
use vectord::pb::index_service_client::IndexServiceClient;

type BoxResult<T> = Result<T, Box<dyn Error>>;

const DEFAULT_DATA: &str = "../shared/data/words_minilm_30k.fvecs";
const HARNESS_QUERIES: u32 = 200;

fn default_grid() -> Vec<pb::HnswConfig> {
    [(20, 30), (40, 30), (80, 30), (80, 60), (160, 30)]
        .into_iter()
        .map(|(ef_construction, ef_search)| pb::HnswConfig {
            m: 16,
            ef_construction,
            ef_search,
            seed: Some(42),
        })
        .collect()
}

fn row(t: &pb::Trial) -> String {
    let c = t.config.unwrap_or_default();
    format!(
        "{:>5} {:>4} {:>4} | {:>6.4} | {:>8.1} | {:>8.1} | {:>7.0} | {:>7}",
        t.id,
        c.ef_construction,
        c.ef_search,
        t.recall,
        t.p50_micros,
        t.p95_micros,
        t.qps,
        t.build_millis
    )
}

#[tokio::main]
async fn main() -> BoxResult<()> {
    let path = std::env::var_os("VECTORD_BENCH_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA));
    if !path.exists() {
        println!(
            "autotune bench skipped: {} not found (set VECTORD_BENCH_DATA)",
            path.display()
        );
        return Ok(());
    }
    let limit = std::env::var("VECTORD_BENCH_N")
        .ok()
        .and_then(|n| n.parse().ok());
    let (dimension, vectors) = vectord::dataset::read_fvecs(&path, limit)?;
    let n = vectors.len();
    println!("data: {} ({n} x {dimension})", path.display());

    let tmp = tempfile::tempdir()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(vectord::server::run(
        listener,
        vectord::config::Config::new(tmp.path()),
        async move {
            let _ = stopped.await;
        },
    ));
    let url = format!("http://{addr}");
    let channel = tonic::transport::Channel::from_shared(url)?
        .connect()
        .await?;
    // Wait for SERVING (startup recovery done) on health's Watch stream.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let mut watch = health
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner();
    while let Some(s) = watch.message().await? {
        if s.status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
            break;
        }
    }
    let mut index = IndexServiceClient::new(channel.clone()).max_encoding_message_size(usize::MAX);
    let mut tune = AutotuneServiceClient::new(channel);
    let name = "words";
    index
        .create_index(pb::CreateIndexRequest {
            name: name.into(),
            dimension,
            metric: pb::Metric::Cosine as i32,
            default_config: None,
        })
        .await?;
    let started = Instant::now();
    let batches: Vec<pb::ImportPointsRequest> = vectors
        .chunks(1000)
        .enumerate()
        .map(|(b, chunk)| pb::ImportPointsRequest {
            index_name: if b == 0 { name.into() } else { String::new() },
            points: chunk
                .iter()
                .enumerate()
                .map(|(i, v)| pb::Point {
                    id: (b * 1000 + i) as u64,
                    vector: v.clone(),
                })
                .collect(),
        })
        .collect();
    let imported = index
        .import_points(tokio_stream::iter(batches))
        .await?
        .into_inner();
    println!(
        "import: {} points in {:.1} s (includes the serving graph's inserts)",
        imported.point_count,
        started.elapsed().as_secs_f64()
    );
    tune.create_harness(pb::CreateHarnessRequest {
        index_name: name.into(),
        name: "h200".into(),
        k: 10,
        queries: Some(pb::create_harness_request::Queries::Sampled(
            pb::SampledQueries {
                query_count: HARNESS_QUERIES,
                seed: Some(42),
            },
        )),
    })
    .await?;

    println!("\n   id   ec   es | recall  | p50 us   | p95 us   | qps     | build ms");
    let started = Instant::now();
    let mut separate = Vec::new();
    for config in default_grid() {
        let t = tune
            .run_trial(pb::RunTrialRequest {
                index_name: name.into(),
                harness: "h200".into(),
                config: Some(config),
            })
            .await?
            .into_inner()
            .trial
            .ok_or("no trial")?;
        println!("{}  (RunTrial)", row(&t));
        separate.push(t);
    }
    let separate_secs = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let mut stream = tune
        .autotune(pb::AutotuneRequest {
            index_name: name.into(),
            harness: "h200".into(),
            min_recall: Some(0.0),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut tuned = Vec::new();
    let mut winner = None;
    while let Some(msg) = stream.message().await? {
        match msg.event {
            Some(pb::autotune_response::Event::Trial(t)) => {
                println!("{}  (Autotune)", row(&t));
                tuned.push(t);
            }
            Some(pb::autotune_response::Event::Finished(f)) => winner = f.winner,
            _ => {}
        }
    }
    let autotune_secs = started.elapsed().as_secs_f64();
    let ratio = autotune_secs / separate_secs;
    println!("\nfive separate RunTrial calls: {separate_secs:.1} s");
    println!("one Autotune (default grid):  {autotune_secs:.1} s");
    println!("ratio autotune/separate:      {ratio:.2} (target <= 0.80)");
    if let Some(w) = &winner {
        println!(
            "winner: trial {} recall {:.4} p50 {:.1} us",
            w.id, w.recall, w.p50_micros
        );
    }
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let out = json!({
        "points": n, "dimension": dimension, "harness_queries": HARNESS_QUERIES, "cores": cores,
        "separate_secs": separate_secs, "autotune_secs": autotune_secs, "ratio": ratio,
        "separate": separate.iter().map(|t| json!({"ec": t.config.unwrap_or_default().ef_construction, "es": t.config.unwrap_or_default().ef_search, "recall": t.recall, "p50": t.p50_micros, "build_ms": t.build_millis})).collect::<Vec<_>>(),
        "autotune": tuned.iter().map(|t| json!({"ec": t.config.unwrap_or_default().ef_construction, "es": t.config.unwrap_or_default().ef_search, "recall": t.recall, "p50": t.p50_micros, "build_ms": t.build_millis})).collect::<Vec<_>>(),
    });
    std::fs::create_dir_all("target")?;
    std::fs::write(
        "target/bench-autotune.json",
        serde_json::to_vec_pretty(&out)?,
    )?;
    let _ = stop.send(());
    server.await??;
    Ok(())
}
