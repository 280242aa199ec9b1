//! In-process search benchmark of the engine (no gRPC) on real sentence embeddings.
//!
//! Run with `cargo bench --bench search`. It loads `words_minilm_30k.fvecs` (override the path
//! with `VECTORD_BENCH_DATA`, cap the number of vectors with `VECTORD_BENCH_N`), holds out the
//! last 1,000 vectors as queries, builds one HNSW generation on one thread (seeded) and one on
//! all cores (unseeded), and reports recall@10 against exact brute force, single-thread QPS and
//! latency, all-core batch QPS and the speed-up over brute force for a sweep of `ef_search`.
//! The figures also go to `target/bench-search.json`.
//!
//! Without the data file it prints why and exits successfully, so `cargo bench` does not fail on
//! machines that lack the data.

use std::collections::HashSet;
use std::error::Error;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use serde_json::json;
use vectord::index::engine::{EngineKind, EngineMemory};
use vectord::index::{distance, Generation};
use vectord::model::{ConfigSource, GenerationMeta, Hit, HnswConfig, Metric, Point};

#[path = "common/machine.rs"]
mod machine;

use machine::{cpu_model, load_average, micros, percentile, rss_bytes};

type BoxResult<T> = Result<T, Box<dyn Error>>;

const DEFAULT_DATA: &str = "../shared/data/words_minilm_30k.fvecs";
const QUERIES: usize = 1_000;
const K: usize = 10;
const EF_SWEEP: [usize; 5] = [10, 20, 40, 80, 160];
/// Queries timed for the brute-force baseline: it is ~100x slower than the graph, so a subset
/// keeps the run short while still averaging over many queries.
const BRUTE_FORCE_QUERIES: usize = 200;
/// Timed passes over the queries per measurement: one pass at low ef takes only tens of
/// milliseconds, too short for a stable rate on its own.
const PASSES: usize = 3;
const METRIC: Metric = Metric::Cosine;
const M: u32 = 16;
const EF_CONSTRUCTION: u32 = 100;
const EF_SEARCH_DEFAULT: u32 = 64;
const SEED: u64 = 42;

/// Rows of the data set with known exact neighbours (from the data README), query excluded.
const SANITY: [(usize, &str, [&str; 5]); 3] = [
    (
        12142,
        "rivers",
        ["headwaters", "creeks", "waters", "watershed", "riverfront"],
    ),
    (
        16672,
        "guitar",
        ["fender", "instrument", "musically", "acoustics", "mandolin"],
    ),
    (
        5677,
        "happy",
        ["joyful", "pleased", "joyed", "smilingly", "satisfied"],
    ),
];

fn main() -> BoxResult<()> {
    let data_path = std::env::var_os("VECTORD_BENCH_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA));
    if !data_path.exists() {
        println!(
            "search bench skipped: data file {} not found (set VECTORD_BENCH_DATA to an .fvecs file)",
            data_path.display()
        );
        return Ok(());
    }
    let limit = match std::env::var("VECTORD_BENCH_N") {
        Ok(s) => Some(
            s.parse::<usize>()
                .map_err(|e| format!("VECTORD_BENCH_N={s:?} is not a count: {e}"))?,
        ),
        Err(_) => None,
    };

    let (dimension, mut vectors) = vectord::dataset::read_fvecs(&data_path, limit)?;
    // Hold out the last vectors as queries; with a small VECTORD_BENCH_N keep at least half as
    // points so the graph is not trivially small.
    let n_queries = QUERIES.min(vectors.len() / 2);
    if n_queries == 0 {
        return Err(format!("{} holds too few vectors to benchmark", data_path.display()).into());
    }
    let mut queries = vectors.split_off(vectors.len() - n_queries);
    let base = vectors;
    // The server normalises cosine queries before searching; do the same (the data is already
    // unit length, so this changes at most the last bit).
    for (i, q) in queries.iter_mut().enumerate() {
        vectord::model::normalize(&format!("query {i}"), q)?;
    }
    let words = read_words(&data_path.with_extension("txt"));

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = cpu_model();
    println!("vectord search bench");
    println!(
        "  machine : {cpu}, {cores} cores (rayon threads: {})",
        rayon::current_num_threads()
    );
    println!(
        "  data    : {} ({} points + {} queries, dimension {dimension}, metric {METRIC})",
        data_path.display(),
        base.len(),
        queries.len()
    );
    println!("  config  : m={M} ef_construction={EF_CONSTRUCTION} k={K}");
    // Other work on the machine skews every figure below, the all-core ones most: say so.
    let load = load_average();
    println!(
        "  load    : {} (1/5/15-min load average at start)",
        load.as_deref().unwrap_or("n/a")
    );

    // Exact ground truth, one query per rayon task.
    let started = Instant::now();
    let truth: Vec<Vec<u64>> = queries
        .par_iter()
        .map(|q| exact_top_k(&base, q, K).into_iter().map(|h| h.id).collect())
        .collect();
    println!(
        "  ground truth: brute force over {} queries in {:.1} s (all cores)",
        queries.len(),
        started.elapsed().as_secs_f64()
    );

    // Brute-force baseline, single thread, the speed every ef row is compared with.
    let bf_queries = &queries[..BRUTE_FORCE_QUERIES.min(queries.len())];
    let started = Instant::now();
    for q in bf_queries {
        black_box(exact_top_k(&base, q, K));
    }
    let brute_force_qps = bf_queries.len() as f64 / started.elapsed().as_secs_f64();
    println!(
        "  brute force: {brute_force_qps:.1} QPS single thread (over {} queries)",
        bf_queries.len()
    );

    // Single-thread build first, while the resident set is not yet inflated by another graph,
    // so its RSS delta is meaningful. The points are cloned before the measurement starts.
    let points_1t = to_points(&base);
    let rss_before = rss_bytes();
    let started = Instant::now();
    let gen = Generation::build(
        EngineKind::DEFAULT,
        &EngineMemory::IN_RAM,
        METRIC,
        dimension,
        meta(Some(SEED)),
        points_1t,
        &|| false,
    )?;
    let build_1t = started.elapsed();
    let rss_after = rss_bytes();
    let rss_delta = match (rss_before, rss_after) {
        (Some(b), Some(a)) => Some(a as i64 - b as i64),
        _ => None,
    };

    let points_par = to_points(&base);
    let started = Instant::now();
    let gen_par = Generation::build(
        EngineKind::DEFAULT,
        &EngineMemory::IN_RAM,
        METRIC,
        dimension,
        meta(None),
        points_par,
        &|| false,
    )?;
    let build_par = started.elapsed();
    // The parallel graph is not the one swept below; one recall figure at the default ef shows
    // whether building on all cores costs quality.
    let par_recall = recall(
        &search_all(&gen_par, &queries, EF_SEARCH_DEFAULT as usize),
        &truth,
    );
    drop(gen_par);

    println!();
    println!(
        "build: 1 thread (seed {SEED}) {:.2} s | all {cores} cores (no seed) {:.2} s | speed-up {:.2}x",
        build_1t.as_secs_f64(),
        build_par.as_secs_f64(),
        build_1t.as_secs_f64() / build_par.as_secs_f64()
    );
    println!("       all-core graph recall@{K} at ef={EF_SEARCH_DEFAULT}: {par_recall:.4}");
    println!(
        "memory: engine estimate {:.1} MiB | RSS delta over the 1-thread build {}",
        mib(gen.memory_bytes() as f64),
        rss_delta.map_or("n/a".to_string(), |d| format!("{:.1} MiB", mib(d as f64)))
    );

    println!();
    println!(
        "{:>5} | {:>9} | {:>12} | {:>8} | {:>8} | {:>12} | {:>12} | {:>14}",
        "ef",
        "recall@10",
        "1-thread QPS",
        "p50 µs",
        "p99 µs",
        "all-core QPS",
        "batch/single",
        "vs brute force"
    );
    println!("{}", "-".repeat(104));
    let mut rows = Vec::new();
    for ef in EF_SWEEP {
        let row = measure(&gen, &queries, &truth, ef);
        println!(
            "{:>5} | {:>9.4} | {:>12.0} | {:>8.1} | {:>8.1} | {:>12.0} | {:>11.2}x | {:>13.1}x",
            ef,
            row.recall,
            row.single_qps,
            row.p50_us,
            row.p99_us,
            row.batch_qps,
            row.batch_qps / row.single_qps,
            row.single_qps / brute_force_qps
        );
        rows.push(json!({
            "ef_search": ef,
            "recall_at_10": row.recall,
            "single_thread_qps": row.single_qps,
            "p50_us": row.p50_us,
            "p99_us": row.p99_us,
            "all_core_batch_qps": row.batch_qps,
            "batch_over_single": row.batch_qps / row.single_qps,
            "speedup_over_brute_force": row.single_qps / brute_force_qps,
        }));
    }

    println!();
    let sanity = sanity_check(&gen, &base, words.as_deref());

    let report = json!({
        "machine": {
            "cpu": cpu,
            "cores": cores,
            "rayon_threads": rayon::current_num_threads(),
            "load_average_at_start": load,
        },
        "data": {
            "path": data_path.display().to_string(),
            "points": base.len(),
            "queries": queries.len(),
            "dimension": dimension,
            "metric": METRIC.to_string(),
        },
        "config": { "m": M, "ef_construction": EF_CONSTRUCTION, "k": K, "seed": SEED },
        "build": {
            "one_thread_seconds": build_1t.as_secs_f64(),
            "all_cores_seconds": build_par.as_secs_f64(),
            "all_cores_recall_at_10_ef_default": par_recall,
            "ef_default": EF_SEARCH_DEFAULT,
        },
        "memory": {
            "engine_estimate_bytes": gen.memory_bytes(),
            "rss_delta_bytes": rss_delta,
        },
        "brute_force_single_thread_qps": brute_force_qps,
        "rows": rows,
        "sanity": sanity,
    });
    let out = Path::new("target").join("bench-search.json");
    std::fs::create_dir_all("target")?;
    std::fs::write(&out, serde_json::to_string_pretty(&report)?)?;
    println!("\nwrote {}", out.display());
    Ok(())
}

/// The figures of one ef_search setting.
struct Row {
    recall: f64,
    single_qps: f64,
    p50_us: f64,
    p99_us: f64,
    batch_qps: f64,
}

fn measure(gen: &Generation, queries: &[Vec<f32>], truth: &[Vec<u64>], ef: usize) -> Row {
    // The warm-up pass also gives the results recall is computed from: a search on a fixed graph
    // is deterministic, so the timed passes would return the same hits.
    let recall = recall(&search_all(gen, queries, ef), truth);

    let t = machine::time_searches(queries, PASSES, |q| gen.search(q, K, ef));
    Row {
        recall,
        single_qps: t.single_qps,
        p50_us: micros(percentile(&t.latencies, 0.50)),
        p99_us: micros(percentile(&t.latencies, 0.99)),
        batch_qps: t.batch_qps,
    }
}

fn search_all(gen: &Generation, queries: &[Vec<f32>], ef: usize) -> Vec<Vec<u64>> {
    queries
        .iter()
        .map(|q| gen.search(q, K, ef).into_iter().map(|h| h.id).collect())
        .collect()
}

/// Mean over queries of |returned ∩ exact| / k.
fn recall(found: &[Vec<u64>], truth: &[Vec<u64>]) -> f64 {
    let total: usize = found
        .iter()
        .zip(truth)
        .map(|(f, t)| {
            let t: HashSet<u64> = t.iter().copied().collect();
            f.iter().filter(|id| t.contains(id)).count()
        })
        .sum();
    total as f64 / (truth.len() * K) as f64
}

/// The exact `k` nearest of `base` to `q` (ids are row numbers), nearest first.
fn exact_top_k(base: &[Vec<f32>], q: &[f32], k: usize) -> Vec<Hit> {
    let mut all: Vec<Hit> = base
        .iter()
        .enumerate()
        .map(|(i, v)| Hit {
            id: i as u64,
            distance: distance::exact(METRIC, q, v),
        })
        .collect();
    let by_distance = |a: &Hit, b: &Hit| a.distance.total_cmp(&b.distance).then(a.id.cmp(&b.id));
    let k = k.min(all.len());
    if k < all.len() {
        all.select_nth_unstable_by(k, by_distance);
        all.truncate(k);
    }
    all.sort_unstable_by(by_distance);
    all
}

/// Searches the graph with the stored vectors of a few rows whose exact neighbours the data
/// README lists, and prints what came back next to what should have. Printed, not asserted: a
/// miss on an approximate index is a finding, not a bench failure.
fn sanity_check(
    gen: &Generation,
    base: &[Vec<f32>],
    words: Option<&[String]>,
) -> serde_json::Value {
    let Some(words) = words else {
        println!("neighbour sanity check skipped: no word list next to the data file");
        return serde_json::Value::Null;
    };
    let word = |id: u64| words.get(id as usize).map_or("?", String::as_str);
    println!("neighbour sanity check (graph, ef={EF_SEARCH_DEFAULT}; k=6 minus the row itself):");
    let mut results = Vec::new();
    for (row, name, expected) in SANITY {
        let (Some(v), Some(w)) = (base.get(row), words.get(row)) else {
            println!("  {name:>7} (row {row}): not among the loaded points, skipped");
            continue;
        };
        if w != name {
            println!("  {name:>7} (row {row}): the word list has {w:?} on that row, skipped");
            continue;
        }
        let top5 = |hits: Vec<Hit>| -> Vec<&str> {
            hits.into_iter()
                .filter(|h| h.id != row as u64)
                .take(5)
                .map(|h| word(h.id))
                .collect()
        };
        let graph = top5(gen.search(v, 6, EF_SEARCH_DEFAULT as usize));
        let exact = top5(exact_top_k(base, v, 6));
        let graph_ok = graph == expected;
        let exact_ok = exact == expected;
        println!(
            "  {name:>7} (row {row}): graph {:<50} {}",
            graph.join(", "),
            if graph_ok { "MATCH" } else { "DIFFERS" }
        );
        println!(
            "  {:>7}             expected {:<47} (exact brute force here: {})",
            "",
            expected.join(", "),
            if exact_ok { "matches" } else { "differs" }
        );
        results.push(json!({
            "row": row,
            "word": name,
            "expected": expected,
            "graph": graph,
            "graph_matches": graph_ok,
            "exact_matches": exact_ok,
        }));
    }
    serde_json::Value::Array(results)
}

/// The word list next to the data (line i goes with vector i), if there is one.
fn read_words(path: &Path) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(text.lines().map(str::to_owned).collect())
}

fn to_points(base: &[Vec<f32>]) -> Vec<Point> {
    base.iter()
        .enumerate()
        .map(|(i, v)| Point {
            id: i as u64,
            vector: v.clone(),
        })
        .collect()
}

fn meta(seed: Option<u64>) -> GenerationMeta {
    GenerationMeta {
        number: 1,
        config: HnswConfig {
            m: M,
            ef_construction: EF_CONSTRUCTION,
            ef_search: EF_SEARCH_DEFAULT,
            seed,
        },
        source: ConfigSource::Default,
        point_count: 0,
        build_millis: 0,
        activate_time_ms: 0,
        profile: String::new(),
        trial_id: 0,
    }
}

fn mib(bytes: f64) -> f64 {
    bytes / (1024.0 * 1024.0)
}
