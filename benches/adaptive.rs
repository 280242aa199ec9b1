//! The ADAPTIVE quality bar, over gRPC against a real in-process server, in one run:
//! - the reference: an exhaustive grid (m 8/16/32 x ef_construction 40/100/200 x every
//!   ef_search of ADAPTIVE's ladder, 126 configs, builds shared per (m, ef_construction)),
//!   whose fastest trial with recall >= 0.95 is the "best config";
//! - ADAPTIVE with target_recall 0.95 and a time budget of 0.3x the exhaustive wall time.
//!
//! Prints both wall times and their ratio (target <= 0.30), the two best p50s and their ratio
//! (target <= 1.10), the same for the machine-independent cost (distance computations per
//! query), and writes `target/bench-adaptive.json`. Run with `cargo bench --bench adaptive`
//! (`VECTORD_BENCH_N` caps the points; without the data file it says so and succeeds).

mod common;

use std::time::Instant;

use common::BoxResult;
use serde_json::json;
use vectord::pb;

const HARNESS_QUERIES: u32 = 500;
const TARGET: f64 = 0.95;
const LADDER: [u32; 14] = [10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 100, 128, 160, 200];

fn row(t: &pb::Trial) -> String {
    let c = t.config.unwrap_or_default();
    format!(
        "{:>5} {:>3} {:>4} {:>4} | {:>6.4} | {:>8.1} | {:>7.0} | {:>7}",
        t.id,
        c.m,
        c.ef_construction,
        c.ef_search,
        t.recall,
        t.p50_micros,
        t.mean_distance_evals,
        t.build_millis
    )
}

/// The trial reaching the target with the least `key` (p50, or distance computations).
fn least_reaching(trials: &[pb::Trial], key: fn(&pb::Trial) -> f64) -> Option<&pb::Trial> {
    trials
        .iter()
        .filter(|t| t.recall >= TARGET)
        .min_by(|a, b| key(a).total_cmp(&key(b)))
}

fn p50(t: &pb::Trial) -> f64 {
    t.p50_micros
}

fn evals(t: &pb::Trial) -> f64 {
    t.mean_distance_evals
}

fn summary(t: Option<&pb::Trial>) -> serde_json::Value {
    t.map_or(serde_json::Value::Null, |t| {
        let c = t.config.unwrap_or_default();
        json!({"id": t.id, "m": c.m, "ef_construction": c.ef_construction, "ef_search": c.ef_search,
               "recall": t.recall, "p50_micros": t.p50_micros, "mean_distance_evals": t.mean_distance_evals})
    })
}

#[tokio::main]
async fn main() -> BoxResult<()> {
    let Some(bench) = common::setup("adaptive", "h500", HARNESS_QUERIES).await? else {
        return Ok(());
    };
    let mut tune = bench.tune();
    let mut grid = Vec::new();
    for m in [8, 16, 32] {
        for ef_construction in [40, 100, 200] {
            for ef_search in LADDER {
                grid.push(pb::HnswConfig {
                    m,
                    ef_construction,
                    ef_search,
                    seed: Some(42),
                });
            }
        }
    }
    println!("\nexhaustive grid: {} configs", grid.len());
    println!("   id   m   ec   es | recall |   p50 us |   evals | build ms");
    let started = Instant::now();
    let (exhaustive, _) = common::autotune(
        &mut tune,
        pb::AutotuneRequest {
            index_name: common::INDEX.into(),
            harness: "h500".into(),
            min_recall: Some(0.0),
            grid,
            objective: pb::Objective::TargetRecall as i32,
            target_recall: Some(TARGET),
            ..Default::default()
        },
        |t| println!("{}", row(t)),
    )
    .await?;
    let exhaustive_secs = started.elapsed().as_secs_f64();
    let budget = (exhaustive_secs * 0.3).floor().max(1.0) as u32;

    println!("\nADAPTIVE, target {TARGET}, budget {budget} s");
    let started = Instant::now();
    let (adaptive, _) = common::autotune(
        &mut tune,
        pb::AutotuneRequest {
            index_name: common::INDEX.into(),
            harness: "h500".into(),
            min_recall: Some(0.0),
            objective: pb::Objective::TargetRecall as i32,
            target_recall: Some(TARGET),
            strategy: pb::Strategy::Adaptive as i32,
            budget: Some(pb::AdaptiveBudget {
                max_trials: 0,
                max_seconds: budget,
            }),
            seed: Some(42),
            ..Default::default()
        },
        |t| println!("{}", row(t)),
    )
    .await?;
    let adaptive_secs = started.elapsed().as_secs_f64();

    let (rb, ab) = (
        least_reaching(&exhaustive, p50),
        least_reaching(&adaptive, p50),
    );
    let (rc, ac) = (
        least_reaching(&exhaustive, evals),
        least_reaching(&adaptive, evals),
    );
    let time_ratio = adaptive_secs / exhaustive_secs;
    println!(
        "\nexhaustive: {} trials in {exhaustive_secs:.1} s; ADAPTIVE: {} trials in {adaptive_secs:.1} s; ratio {time_ratio:.2} (target <= 0.30)",
        exhaustive.len(),
        adaptive.len()
    );
    let p50_ratio = match (rb, ab) {
        (Some(r), Some(a)) => {
            let ratio = a.p50_micros / r.p50_micros;
            println!("best p50 at recall >= {TARGET}: exhaustive {:.1} us ({}), ADAPTIVE {:.1} us ({}); ratio {ratio:.3} (target <= 1.10)",
                r.p50_micros, common_cfg(r), a.p50_micros, common_cfg(a));
            Some(ratio)
        }
        _ => {
            println!("a run found no config reaching {TARGET}");
            None
        }
    };
    let cost_ratio = match (rc, ac) {
        (Some(r), Some(a)) => {
            let ratio = a.mean_distance_evals / r.mean_distance_evals;
            println!("least distance computations per query at recall >= {TARGET}: exhaustive {:.0} ({}), ADAPTIVE {:.0} ({}); ratio {ratio:.3}",
                r.mean_distance_evals, common_cfg(r), a.mean_distance_evals, common_cfg(a));
            Some(ratio)
        }
        _ => None,
    };
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let out = json!({
        "points": bench.points, "dimension": bench.dimension, "harness_queries": HARNESS_QUERIES,
        "cores": cores, "target_recall": TARGET,
        "exhaustive": {"trials": exhaustive.len(), "secs": exhaustive_secs, "best": summary(rb), "cheapest": summary(rc)},
        "adaptive": {"trials": adaptive.len(), "secs": adaptive_secs, "budget_secs": budget, "best": summary(ab), "cheapest": summary(ac)},
        "time_ratio": time_ratio, "p50_ratio": p50_ratio, "cost_ratio": cost_ratio,
    });
    std::fs::create_dir_all("target")?;
    std::fs::write(
        "target/bench-adaptive.json",
        serde_json::to_vec_pretty(&out)?,
    )?;
    bench.stop().await?;
    Ok(())
}

fn common_cfg(t: &pb::Trial) -> String {
    let c = t.config.unwrap_or_default();
    format!(
        "m {} ef_construction {} ef_search {}",
        c.m, c.ef_construction, c.ef_search
    )
}
