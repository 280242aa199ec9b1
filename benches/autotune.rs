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

use std::time::Instant;

use common::BoxResult;
use serde_json::json;
use vectord::pb;

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

mod common;

#[tokio::main]
async fn main() -> BoxResult<()> {
    let Some(bench) = common::setup("autotune", "h200", HARNESS_QUERIES).await? else {
        return Ok(());
    };
    let (n, dimension) = (bench.points, bench.dimension);
    let name = common::INDEX;
    let mut tune = bench.tune();

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
    let (tuned, finished) = common::autotune(
        &mut tune,
        pb::AutotuneRequest {
            index_name: name.into(),
            harness: "h200".into(),
            min_recall: Some(0.0),
            ..Default::default()
        },
        |t| println!("{}  (Autotune)", row(t)),
    )
    .await?;
    let winner = finished.and_then(|f| f.winner);
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
    bench.stop().await?;
    Ok(())
}
