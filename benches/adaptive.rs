//! Autotune at scale (issue 23 §4), over gRPC against a real in-process server, in one run on
//! one index:
//! - the reference: an exhaustive grid (m 8/16/32 x ef_construction 40/100/200 x every
//!   ef_search of ADAPTIVE's ladder (10 to 512), 162 configs, builds shared per (m, ef_construction)),
//!   whose trial with the least distance computations per query at recall >= 0.95 is the best;
//! - ADAPTIVE on all the points (multi-fidelity off), target 0.95;
//! - multi-fidelity ADAPTIVE (ranked on a sample, the best `confirm` graphs built on all the
//!   points), target 0.95, with `activate`: the winner's graph becomes the generation.
//!
//! For each: wall time, trials (sample / full), graphs built on all the points, the winner's
//! recall, its distance computations per query and the ratio to the grid's least, and the
//! winners' p50 re-measured side by side at the end (a RunTrial of each winner's config, one
//! after the other). Then activation: the time from the multi-fidelity job's last trial to its
//! Finished event (promotion + adopting the winner's graph), against an ActivateProfile of the
//! same config that builds it (the held graph was used up), and against the winner's build time.
//! Writes `target/bench-adaptive.json`.
//!
//! Sizes, by environment (a short run: `VECTORD_BENCH_N=3000`):
//! - `VECTORD_BENCH_GEN=300000`: generated clustered 128-d L2 points instead of the words file
//!   (`VECTORD_BENCH_DATA`, default ../shared/data/words_minilm_30k.fvecs, cosine; without it the
//!   bench says so and succeeds), `VECTORD_BENCH_N` caps the words;
//! - `VECTORD_BENCH_QUERIES` harness queries (default 500);
//! - `VECTORD_BENCH_SAMPLE` multi-fidelity's sample (default a tenth of the points, at least
//!   1,000; a comma-separated list runs one job per size), `VECTORD_BENCH_CONFIRM` graphs
//!   confirmed (default 2);
//! - `VECTORD_BENCH_SKIP_GRID=1` / `VECTORD_BENCH_SKIP_ADAPTIVE=1` skip those runs (the grid is
//!   20 minutes at 1M points on 2 cores), `VECTORD_BENCH_REMEASURE=0` skips the side-by-side p50.

mod common;
#[path = "common/machine.rs"]
mod machine;

use std::collections::HashSet;
use std::time::Instant;

use common::BoxResult;
use serde_json::json;
use tonic::transport::Channel;
use vectord::pb;
use vectord::pb::autotune_service_client::AutotuneServiceClient;
use vectord::pb::index_service_client::IndexServiceClient;

const HARNESS: &str = "h";
const TARGET: f64 = 0.95;
/// The grid's ef_search values: ADAPTIVE's own ladder, so the grid can find whatever it can.
const LADDER: [u32; 18] = vectord::autotune::adaptive::EF_LADDER;

fn env(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn row(t: &pb::Trial) -> String {
    let c = t.config.unwrap_or_default();
    let fidelity = if t.fidelity == pb::Fidelity::Sample as i32 {
        "sample"
    } else {
        "full"
    };
    format!(
        "{:>5} {:>3} {:>4} {:>4} {:>6} | {:>6.4} | {:>8.1} | {:>7.0} | {:>7}",
        t.id,
        c.m,
        c.ef_construction,
        c.ef_search,
        fidelity,
        t.recall,
        t.p50_micros,
        t.mean_distance_evals,
        t.build_millis
    )
}

fn cfg(t: &pb::Trial) -> String {
    let c = t.config.unwrap_or_default();
    format!(
        "m {} ef_construction {} ef_search {}",
        c.m, c.ef_construction, c.ef_search
    )
}

fn full(t: &pb::Trial) -> bool {
    t.fidelity != pb::Fidelity::Sample as i32
}

/// The full trial reaching the target with the least distance computations per query.
fn cheapest(trials: &[pb::Trial]) -> Option<&pb::Trial> {
    trials
        .iter()
        .filter(|t| full(t) && t.recall >= TARGET)
        .min_by(|a, b| a.mean_distance_evals.total_cmp(&b.mean_distance_evals))
}

struct Outcome {
    name: &'static str,
    secs: f64,
    trials: Vec<pb::Trial>,
    finished: Option<pb::AutotuneFinished>,
    /// From the last trial to the Finished event: pick, promote and (with activate) activate.
    tail_secs: f64,
}

impl Outcome {
    fn graphs(&self, fidelity_full: bool) -> usize {
        self.trials
            .iter()
            .filter(|t| full(t) == fidelity_full)
            .filter_map(|t| t.config.map(|c| (c.m, c.ef_construction)))
            .collect::<HashSet<_>>()
            .len()
    }

    fn winner(&self) -> Option<&pb::Trial> {
        self.finished.as_ref().and_then(|f| f.winner.as_ref())
    }
}

async fn run(
    tune: &mut AutotuneServiceClient<Channel>,
    name: &'static str,
    req: pb::AutotuneRequest,
) -> BoxResult<Outcome> {
    println!("\n{name}");
    println!("   id   m   ec   es fidel. | recall |   p50 us |   evals | build ms");
    let started = Instant::now();
    let mut stream = tune.autotune(req).await?.into_inner();
    let (mut trials, mut finished, mut last) = (Vec::new(), None, started);
    while let Some(msg) = stream.message().await? {
        match msg.event {
            Some(pb::autotune_response::Event::Trial(t)) => {
                println!("{}", row(&t));
                trials.push(t);
                last = Instant::now();
            }
            Some(pb::autotune_response::Event::Finished(f)) => finished = Some(f),
            _ => {}
        }
    }
    Ok(Outcome {
        name,
        secs: started.elapsed().as_secs_f64(),
        trials,
        finished,
        tail_secs: last.elapsed().as_secs_f64(),
    })
}

fn adaptive_req(sample: Option<u32>, confirm: u32, activate: bool) -> pb::AutotuneRequest {
    pb::AutotuneRequest {
        index_name: common::INDEX.into(),
        harness: HARNESS.into(),
        min_recall: Some(0.0),
        objective: pb::Objective::TargetRecall as i32,
        target_recall: Some(TARGET),
        strategy: pb::Strategy::Adaptive as i32,
        seed: Some(42),
        adaptive_sample_points: sample,
        adaptive_confirm: confirm,
        activate,
        ..Default::default()
    }
}

#[tokio::main]
async fn main() -> BoxResult<()> {
    let queries = env("VECTORD_BENCH_QUERIES").unwrap_or(500) as u32;
    let bench = match env("VECTORD_BENCH_GEN") {
        Some(n) => {
            println!("data: {n} generated clustered points x 128, L2");
            let vectors = common::clustered(n, 128, 7);
            common::setup_vectors(vectors, 128, pb::Metric::L2, HARNESS, queries).await?
        }
        None => match common::setup("adaptive", HARNESS, queries).await? {
            Some(b) => b,
            None => return Ok(()),
        },
    };
    let n = bench.points;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "machine: {} ({cores} cores), load average {}",
        machine::cpu_model(),
        machine::load_average().unwrap_or_default()
    );
    let mut tune = bench.tune();
    let mut outcomes = Vec::new();

    if env("VECTORD_BENCH_SKIP_GRID") != Some(1) {
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
        let req = pb::AutotuneRequest {
            index_name: common::INDEX.into(),
            harness: HARNESS.into(),
            min_recall: Some(0.0),
            grid,
            objective: pb::Objective::TargetRecall as i32,
            target_recall: Some(TARGET),
            ..Default::default()
        };
        outcomes.push(run(&mut tune, "exhaustive grid (shared graphs)", req).await?);
    }
    if env("VECTORD_BENCH_SKIP_ADAPTIVE") != Some(1) {
        let req = adaptive_req(Some(0), 0, false);
        outcomes.push(run(&mut tune, "ADAPTIVE (all points)", req).await?);
    }
    // One multi-fidelity run per sample size asked for (a comma-separated list), the last one
    // with activate.
    let samples: Vec<u32> = match std::env::var("VECTORD_BENCH_SAMPLE") {
        Ok(v) => v.split(',').filter_map(|x| x.trim().parse().ok()).collect(),
        Err(_) => vec![(n / 10).max(1000) as u32],
    };
    let sample = samples.last().copied().unwrap_or(1000);
    let confirm = env("VECTORD_BENCH_CONFIRM").unwrap_or(2) as u32;
    for (i, &s) in samples.iter().enumerate() {
        let last = i + 1 == samples.len();
        let req = adaptive_req(Some(s), confirm, last);
        let name: &'static str = Box::leak(
            format!(
                "multi-fidelity ADAPTIVE (sample {s}{})",
                if last { ", activate" } else { "" }
            )
            .into_boxed_str(),
        );
        outcomes.push(run(&mut tune, name, req).await?);
    }
    let mf = outcomes.last().expect("pushed");

    // Activation with a build, for comparison: the held graph was adopted by the job, so an
    // ActivateProfile of the promoted config builds it.
    let mut index = IndexServiceClient::new(bench.channel.clone());
    index
        .put_profile(pb::PutProfileRequest {
            profile: Some(pb::Profile {
                name: "bench".into(),
                indexes: vec![pb::ProfileIndex {
                    index_name: common::INDEX.into(),
                    default_config: None,
                }],
            }),
        })
        .await?;
    let started = Instant::now();
    let built = index
        .activate_profile(pb::ActivateProfileRequest {
            name: "bench".into(),
        })
        .await?
        .into_inner()
        .generations;
    let build_activation_secs = started.elapsed().as_secs_f64();
    let adopted = mf
        .finished
        .as_ref()
        .and_then(|f| f.generation.as_ref())
        .is_some_and(|g| g.trial_id != 0);
    let rebuilt = built.first().is_some_and(|g| g.trial_id == 0);

    // The winners' p50, re-measured one after the other.
    let mut remeasured = Vec::new();
    if env("VECTORD_BENCH_REMEASURE") != Some(0) {
        for o in &outcomes {
            let Some(w) = o.winner() else {
                remeasured.push(None);
                continue;
            };
            let t = tune
                .run_trial(pb::RunTrialRequest {
                    index_name: common::INDEX.into(),
                    harness: HARNESS.into(),
                    config: w.config,
                })
                .await?
                .into_inner()
                .trial;
            remeasured.push(t.map(|t| t.p50_micros));
        }
    }

    let reference = outcomes
        .iter()
        .find(|o| o.name.starts_with("exhaustive"))
        .and_then(|o| cheapest(&o.trials))
        .cloned();
    let grid_secs = outcomes
        .iter()
        .find(|o| o.name.starts_with("exhaustive"))
        .map(|o| o.secs);
    println!("\n{n} points, target recall {TARGET}, {queries} harness queries");
    println!(
        "{:<48} {:>8} {:>6} {:>7} {:>6} {:>7} {:>9} {:>9} {:>9}  winner",
        "run", "wall s", "x grid", "trials", "full", "sample", "recall", "evals/q", "p50 us"
    );
    let mut rows = Vec::new();
    for (i, o) in outcomes.iter().enumerate() {
        let w = o.winner();
        let sample_trials = o.trials.iter().filter(|t| !full(t)).count();
        let p50 = remeasured.get(i).copied().flatten();
        println!(
            "{:<48} {:>8.1} {:>6} {:>7} {:>6} {:>7} {:>9} {:>9} {:>9}  {}",
            o.name,
            o.secs,
            grid_secs.map_or("-".into(), |g| format!("{:.2}", o.secs / g)),
            o.trials.len(),
            o.graphs(true),
            o.graphs(false),
            w.map_or("-".into(), |w| format!("{:.4}", w.recall)),
            w.map_or("-".into(), |w| format!("{:.0}", w.mean_distance_evals)),
            p50.map_or("-".into(), |p| format!("{p:.1}")),
            w.map_or("-".into(), cfg),
        );
        rows.push(json!({
            "run": o.name, "secs": o.secs, "trials": o.trials.len(), "sample_trials": sample_trials,
            "full_graphs": o.graphs(true), "sample_graphs": o.graphs(false),
            "winner": w.map(|w| json!({"config": cfg(w), "recall": w.recall,
                "mean_distance_evals": w.mean_distance_evals, "build_millis": w.build_millis,
                "p50_micros_in_job": w.p50_micros})),
            "p50_micros_remeasured": p50,
            "evals_ratio_to_grid": match (w, &reference) {
                (Some(w), Some(r)) => Some(w.mean_distance_evals / r.mean_distance_evals),
                _ => None,
            },
            "wall_ratio_to_grid": grid_secs.map(|g| o.secs / g),
            "tail_secs": o.tail_secs,
        }));
    }
    if let Some(r) = &reference {
        println!(
            "grid's least distance computations at recall >= {TARGET}: {:.0} ({})",
            r.mean_distance_evals,
            cfg(r)
        );
        for o in &outcomes {
            if let Some(w) = o.winner() {
                println!(
                    "  {}: winner {:.0} evals/q, {:.3}x the grid's least (target <= 1.10)",
                    o.name,
                    w.mean_distance_evals,
                    w.mean_distance_evals / r.mean_distance_evals
                );
            }
        }
    }
    let winner_build = mf.winner().map(|w| w.build_millis as f64 / 1000.0);
    println!(
        "activation: autotune --activate's last trial to serving {:.2} s (adopted the trial's graph: {adopted}); ActivateProfile building it {build_activation_secs:.2} s (built: {rebuilt})",
        mf.tail_secs
    );
    if let Some(b) = winner_build {
        println!(
            "  winner's build {b:.2} s: activation after autotune {:.3}x a build (target <= 0.1); multi-fidelity with activation {:.2}x a build (target at 1M <= 2.5)",
            mf.tail_secs / b,
            mf.secs / b
        );
    }
    let out = json!({
        "points": n, "dimension": bench.dimension, "harness_queries": queries, "cores": cores,
        "cpu": machine::cpu_model(), "load_average": machine::load_average(),
        "target_recall": TARGET, "samples": samples, "sample": sample, "confirm": confirm,
        "runs": rows,
        "grid_cheapest": reference.as_ref().map(|r| json!({"config": cfg(r), "mean_distance_evals": r.mean_distance_evals})),
        "activation": {"after_autotune_secs": mf.tail_secs, "adopted": adopted,
                       "activate_profile_build_secs": build_activation_secs, "built": rebuilt,
                       "winner_build_secs": winner_build},
    });
    std::fs::create_dir_all("target")?;
    std::fs::write(
        "target/bench-adaptive.json",
        serde_json::to_vec_pretty(&out)?,
    )?;
    bench.stop().await?;
    Ok(())
}
