//! Side-by-side benchmark: vectord's engines (native, native_f16, native_i8, hnsw_rs) against hnswlib on the same data,
//! queries and ground truth in the same run, plus vectord over gRPC on loopback.
//!
//! Run with `cargo bench --bench perf`. Data sets:
//! - `words_minilm_30k.fvecs` (cosine, 384-d; path from `VECTORD_BENCH_DATA`, skipped if absent),
//!   the last 1,000 vectors held out as queries;
//! - a generated, seeded 100k x 128 L2 set (16-d latent structure plus noise) and 1,000 queries.
//!
//! Each set is written to a temp dir (base.fvecs, queries.fvecs, truth.ivecs) so that
//! `bench/hnswlib_bench.py` reads the same bytes. The Python used is `VECTORD_BENCH_PYTHON`
//! (default `python3`); without hnswlib the hnswlib columns are empty and the rest still runs.
//! `VECTORD_PERF_ROUNDS=N` measures the engines and hnswlib N times per set, alternating which
//! runs first, and prints the median ratios (the machine's load moves single runs a lot).
//! Over gRPC (every engine's server running at once, the passes alternating between them),
//! unary Search runs in 5 passes of every query and reports the median pass's p50.
//! `VECTORD_PERF_GRPC=0` skips the gRPC section and `VECTORD_PERF_GRPC=only` runs it alone; `VECTORD_PERF_ENGINES=native` (comma-separated,
//! default `native,native_f16,native_i8,hnsw_rs`) and `VECTORD_PERF_SETS=minilm` or `l2` run a subset (hnsw_rs takes
//! minutes per build on the 100k set). Results go to `target/bench-perf.json`.
//!
//! Per engine: build time with 1 and 2 threads, recall@10 and single-thread QPS per ef_search,
//! QPS interpolated at recall 0.90 and 0.95, all-core batch QPS, and memory (engine estimate and
//! resident-set growth of a build in a fresh child process, as hnswlib's is measured in its own).

use std::error::Error;
use std::hint::black_box;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde_json::{json, Value};
use vectord::index::distance;
use vectord::index::engine::{new_engine_of, Engine, EngineKind};
use vectord::model::{HnswConfig, Metric};

type BoxResult<T> = Result<T, Box<dyn Error>>;

#[path = "../tests/it/common/child.rs"]
mod child;
#[path = "common/machine.rs"]
mod machine;

use machine::{cpu_model, load_average, micros, percentile, rss_bytes};

const DEFAULT_DATA: &str = "../shared/data/words_minilm_30k.fvecs";
const QUERIES: usize = 1_000;
const K: usize = 10;
const EF_SWEEP: [usize; 5] = [10, 20, 40, 80, 160];
const M: u32 = 16;
const EF_CONSTRUCTION: u32 = 100;
const SEED: u64 = 42;
const PASSES: usize = 3;
/// The engines to run, from VECTORD_PERF_ENGINES (default all four).
fn engine_kinds() -> Vec<EngineKind> {
    match std::env::var("VECTORD_PERF_ENGINES") {
        Ok(list) => list
            .split(',')
            .filter_map(|e| e.trim().parse().ok())
            .collect(),
        Err(_) => vec![
            EngineKind::Native,
            EngineKind::NativeF16,
            EngineKind::NativeI8,
            EngineKind::HnswRs,
        ],
    }
}

/// `VECTORD_PERF_ROUNDS` (default 1): how many times the engines and hnswlib are measured
/// against each other on each set.
fn perf_rounds() -> usize {
    std::env::var("VECTORD_PERF_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1)
        .max(1)
}

const RATIO_KEYS: [&str; 5] = [
    "qps_at_recall_0.90",
    "qps_at_recall_0.95",
    "build_1_thread",
    "build_2_threads",
    "rss_delta",
];

/// The median of `v` (the mean of the middle two for an even count); None if empty.
fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => None,
        n if n % 2 == 1 => Some(v[n / 2]),
        n => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// Per engine and ratio, the median over the rounds that have it.
fn median_ratios(rounds: &[Value]) -> Value {
    let mut out = serde_json::Map::new();
    for kind in engine_kinds() {
        let mut per = serde_json::Map::new();
        for key in RATIO_KEYS {
            let v: Vec<f64> = rounds
                .iter()
                .filter_map(|r| r["ratios_vs_hnswlib"][kind.name()][key].as_f64())
                .collect();
            per.insert(key.to_string(), json!(median(&v)));
        }
        out.insert(kind.name().to_string(), Value::Object(per));
    }
    Value::Object(out)
}

fn print_median(median: &Value, rounds: usize) {
    for kind in engine_kinds() {
        let m = &median[kind.name()];
        println!(
            "  {}/hnswlib, median of {rounds} rounds: QPS@0.90 {} | QPS@0.95 {} | build 1t {} | build 2t {} | RSS {}",
            kind.name(),
            fmt_ratio(m["qps_at_recall_0.90"].as_f64()),
            fmt_ratio(m["qps_at_recall_0.95"].as_f64()),
            fmt_ratio(m["build_1_thread"].as_f64()),
            fmt_ratio(m["build_2_threads"].as_f64()),
            fmt_ratio(m["rss_delta"].as_f64()),
        );
    }
}

/// `VECTORD_PERF_GRPC=only`: the gRPC section alone (no in-process engines, no hnswlib).
fn grpc_only() -> bool {
    std::env::var("VECTORD_PERF_GRPC").as_deref() == Ok("only")
}

fn wants_set(name: &str) -> bool {
    std::env::var("VECTORD_PERF_SETS")
        .map_or(true, |s| s.split(',').any(|w| name.contains(w.trim())))
}
const GRPC_EF: u32 = 40;

struct DataSet {
    name: &'static str,
    metric: Metric,
    dim: usize,
    base: Vec<Vec<f32>>,
    queries: Vec<Vec<f32>>,
}

fn main() -> BoxResult<()> {
    if let Ok(spec) = std::env::var("VECTORD_PERF_CHILD") {
        return child(&spec);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = cpu_model();
    let engines: Vec<&str> = engine_kinds().iter().map(|k| k.name()).collect();
    println!(
        "vectord perf bench: {} against hnswlib, {} round(s)",
        engines.join(", "),
        perf_rounds()
    );
    println!(
        "  machine: {cpu}, {cores} cores; load average at start: {}",
        load_average().unwrap_or_else(|| "n/a".into())
    );
    println!("  config : M={M} ef_construction={EF_CONSTRUCTION} k={K} seed={SEED}");

    let tmp = tempfile::tempdir()?;
    let mut sets = Vec::new();
    let data_path = std::env::var_os("VECTORD_BENCH_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA));
    let minilm = wants_set("minilm");
    if minilm && data_path.exists() {
        let (dim, mut vectors) = vectord::dataset::read_fvecs(&data_path, None)?;
        for (i, v) in vectors.iter_mut().enumerate() {
            vectord::model::normalize(&format!("row {i}"), v)?;
        }
        let queries = vectors.split_off(vectors.len() - QUERIES.min(vectors.len() / 2));
        sets.push(DataSet {
            name: "minilm_30k_cosine",
            metric: Metric::Cosine,
            dim: dim as usize,
            base: vectors,
            queries,
        });
    } else {
        println!(
            "  {} not found: the 30k set is skipped",
            data_path.display()
        );
    }
    if wants_set("l2") {
        let mut generated = generate_l2(100_000 + QUERIES, 128, 16, SEED);
        let queries = generated.split_off(100_000);
        sets.push(DataSet {
            name: "generated_100k_l2",
            metric: Metric::L2,
            dim: 128,
            base: generated,
            queries,
        });
    }

    let mut report_sets = Vec::new();
    let mut grpc = Value::Null;
    for set in &sets {
        println!();
        println!(
            "== {} ({} points + {} queries, {}-d, {}) ==",
            set.name,
            set.base.len(),
            set.queries.len(),
            set.dim,
            set.metric
        );
        let started = Instant::now();
        let truth: Vec<Vec<u32>> = set
            .queries
            .par_iter()
            .map(|q| exact_top_k(set.metric, &set.base, q, K))
            .collect();
        println!("  ground truth: {:.1} s", started.elapsed().as_secs_f64());
        let dir = tmp.path().join(set.name);
        std::fs::create_dir_all(&dir)?;
        write_fvecs(&dir.join("base.fvecs"), &set.base)?;
        write_fvecs(&dir.join("queries.fvecs"), &set.queries)?;
        write_ivecs(&dir.join("truth.ivecs"), &truth)?;

        // Rounds alternate which side runs first, so a burst of load from elsewhere does not
        // always land on the same side; the ratios are reported per round and as medians.
        let rounds = if grpc_only() { 0 } else { perf_rounds() };
        let mut round_reports = Vec::new();
        for round in 0..rounds {
            if rounds > 1 {
                println!("  -- round {} of {rounds} --", round + 1);
            }
            let mut engines = Vec::new();
            let mut hnswlib = None;
            if round % 2 == 1 {
                hnswlib = run_hnswlib(set, &dir);
            }
            for kind in engine_kinds() {
                engines.push(engine_report(kind, set, &truth, &dir)?);
            }
            if round % 2 == 0 {
                hnswlib = run_hnswlib(set, &dir);
            }
            print_set(&engines, hnswlib.as_ref());
            let mut all = engines.clone();
            if let Some(h) = &hnswlib {
                all.push(h.clone());
            }
            round_reports.push(json!({
                "load_average_at_end": load_average().unwrap_or_else(|| "n/a".into()),
                "engines": all,
                "ratios_vs_hnswlib": hnswlib.as_ref().map(|h| ratios(&engines, h)),
            }));
        }
        let median = median_ratios(&round_reports);
        if rounds > 1 {
            print_median(&median, rounds);
        }
        let last = round_reports.last().cloned().unwrap_or(Value::Null);
        report_sets.push(json!({
            "name": set.name,
            "metric": set.metric.to_string(),
            "dimension": set.dim,
            "points": set.base.len(),
            "queries": set.queries.len(),
            "engines": last["engines"],
            "ratios_vs_hnswlib": last["ratios_vs_hnswlib"],
            "median_ratios_vs_hnswlib": median,
            "rounds": round_reports,
        }));
        if set.metric == Metric::Cosine && std::env::var("VECTORD_PERF_GRPC").as_deref() != Ok("0")
        {
            grpc = grpc_section(set, &truth)?;
        }
    }

    let report = json!({
        "machine": { "cpu": cpu, "cores": cores, "load_average_at_start": load_average().unwrap_or_else(|| "n/a".into()) },
        "config": { "m": M, "ef_construction": EF_CONSTRUCTION, "k": K, "seed": SEED },
        "sets": report_sets,
        "grpc": grpc,
    });
    std::fs::create_dir_all("target")?;
    let out = Path::new("target").join("bench-perf.json");
    std::fs::write(&out, serde_json::to_string_pretty(&report)?)?;
    println!("\nwrote {}", out.display());
    Ok(())
}

fn config(seed: Option<u64>) -> HnswConfig {
    HnswConfig {
        m: M,
        ef_construction: EF_CONSTRUCTION,
        ef_search: GRPC_EF,
        seed,
    }
}

fn build(kind: EngineKind, set: &DataSet, threads: usize) -> BoxResult<(Box<dyn Engine>, f64)> {
    let engine = new_engine_of(
        kind,
        set.metric,
        set.dim as u32,
        &config(Some(SEED)),
        set.base.len(),
    );
    let items: Vec<(&[f32], usize)> = set
        .base
        .iter()
        .enumerate()
        .map(|(i, v)| (v.as_slice(), i))
        .collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let started = Instant::now();
    pool.install(|| engine.insert_many(&items, threads > 1));
    // As a generation's build does (a scan of the level-0 links; milliseconds).
    engine.link_orphans();
    Ok((engine, started.elapsed().as_secs_f64()))
}

fn engine_report(
    kind: EngineKind,
    set: &DataSet,
    truth: &[Vec<u32>],
    dir: &Path,
) -> BoxResult<Value> {
    let name = kind.name();
    print!("  {name}: building (1 thread) ...");
    std::io::stdout().flush()?;
    let (engine, build_1t) = build(kind, set, 1)?;
    print!(" {build_1t:.2} s; 2 threads ...");
    std::io::stdout().flush()?;
    let (par, build_2t) = build(kind, set, 2)?;
    let par_recall = recall(&search_all(par.as_ref(), &set.queries, 40), truth);
    drop(par);
    println!(" {build_2t:.2} s (its recall at ef 40: {par_recall:.4})");
    let mut rows = Vec::new();
    for ef in EF_SWEEP {
        rows.push(sweep_row(engine.as_ref(), &set.queries, truth, ef));
    }
    let rss = child_rss(kind, set.metric, &dir.join("base.fvecs"));
    Ok(json!({
        "engine": name,
        "build_seconds": { "1": build_1t, "2": build_2t },
        "two_thread_build_recall_at_ef40": par_recall,
        "engine_estimate_bytes": engine.memory_bytes(),
        "rss_delta_bytes": rss,
        "rows": rows,
    }))
}

fn sweep_row(engine: &dyn Engine, queries: &[Vec<f32>], truth: &[Vec<u32>], ef: usize) -> Value {
    let r = recall(&search_all(engine, queries, ef), truth);
    let t = machine::time_searches(queries, PASSES, |q| engine.search(q, K, ef));
    json!({
        "ef_search": ef,
        "recall_at_10": r,
        "single_thread_qps": t.single_qps,
        "p50_us": micros(percentile(&t.latencies, 0.5)),
        "p99_us": micros(percentile(&t.latencies, 0.99)),
        "all_core_batch_qps": t.batch_qps,
        "batch_over_single": t.batch_qps / t.single_qps,
    })
}

/// Resident-set growth of a 2-thread build in a fresh process (this binary, as a child).
fn child_rss(kind: EngineKind, metric: Metric, base: &Path) -> Option<i64> {
    let exe = std::env::current_exe().ok()?;
    let out = std::process::Command::new(exe)
        .env(
            "VECTORD_PERF_CHILD",
            format!("{}|{}|{}", kind.name(), metric, base.display()),
        )
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("RSS_DELTA "))
        .and_then(|v| v.trim().parse().ok())
}

fn child(spec: &str) -> BoxResult<()> {
    let parts: Vec<&str> = spec.splitn(3, '|').collect();
    let [kind, metric, path] = parts[..] else {
        return Err(format!("bad VECTORD_PERF_CHILD {spec:?}").into());
    };
    let kind: EngineKind = kind.parse()?;
    let metric = match metric {
        "l2" => Metric::L2,
        "cosine" => Metric::Cosine,
        _ => Metric::Dot,
    };
    let (dim, base) = vectord::dataset::read_fvecs(Path::new(path), None)?;
    let set = DataSet {
        name: "child",
        metric,
        dim: dim as usize,
        base,
        queries: Vec::new(),
    };
    let before = rss_bytes().unwrap_or(0) as i64;
    let (engine, _) = build(kind, &set, 2)?;
    let after = rss_bytes().unwrap_or(0) as i64;
    black_box(engine.len());
    println!("RSS_DELTA {}", after - before);
    Ok(())
}

fn run_hnswlib(set: &DataSet, dir: &Path) -> Option<Value> {
    let python = std::env::var("VECTORD_BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/hnswlib_bench.py");
    let space = match set.metric {
        Metric::L2 => "l2",
        Metric::Cosine => "cosine",
        Metric::Dot => "ip",
    };
    let efs: Vec<String> = EF_SWEEP.iter().map(|e| e.to_string()).collect();
    print!("  hnswlib: running {} ...", script.display());
    let _ = std::io::stdout().flush();
    let out = std::process::Command::new(&python)
        .arg(&script)
        .args(["--base", &dir.join("base.fvecs").display().to_string()])
        .args([
            "--queries",
            &dir.join("queries.fvecs").display().to_string(),
        ])
        .args(["--truth", &dir.join("truth.ivecs").display().to_string()])
        .args(["--space", space])
        .args(["--m", &M.to_string()])
        .args(["--ef-construction", &EF_CONSTRUCTION.to_string()])
        .args(["--ef", &efs.join(",")])
        .args(["--k", &K.to_string()])
        .args(["--passes", &PASSES.to_string()])
        .args(["--seed", &SEED.to_string()])
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let v: Option<Value> = serde_json::from_slice(&o.stdout).ok();
            println!(" done");
            v
        }
        Ok(o) => {
            println!(
                " failed (pip install numpy hnswlib, or set VECTORD_BENCH_PYTHON): {}",
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            );
            None
        }
        Err(e) => {
            println!(" cannot run {python}: {e}");
            None
        }
    }
}

/// QPS at a recall target, interpolated linearly between the sweep's neighbouring rows. When
/// even the smallest ef beats the target, its QPS is a lower bound ("at_least").
fn qps_at(engine: &Value, target: f64) -> Value {
    let rows: Vec<(f64, f64)> = engine["rows"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .filter_map(|r| {
                    Some((
                        r["recall_at_10"].as_f64()?,
                        r["single_thread_qps"].as_f64()?,
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    let Some(i) = rows.iter().position(|&(r, _)| r >= target) else {
        return Value::Null;
    };
    if i == 0 {
        return json!({ "qps": rows[0].1, "bound": "at_least" });
    }
    let ((r0, q0), (r1, q1)) = (rows[i - 1], rows[i]);
    let t = if r1 > r0 {
        (target - r0) / (r1 - r0)
    } else {
        1.0
    };
    json!({ "qps": q0 + t * (q1 - q0), "bound": "interpolated" })
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => Some(a / b),
        _ => None,
    }
}

fn ratios(engines: &[Value], hnswlib: &Value) -> Value {
    let mut out = serde_json::Map::new();
    for e in engines {
        let name = e["engine"].as_str().unwrap_or("?").to_string();
        out.insert(
            name,
            json!({
                "qps_at_recall_0.90": ratio(qps_at(e, 0.90)["qps"].as_f64(), qps_at(hnswlib, 0.90)["qps"].as_f64()),
                "qps_at_recall_0.95": ratio(qps_at(e, 0.95)["qps"].as_f64(), qps_at(hnswlib, 0.95)["qps"].as_f64()),
                "build_1_thread": ratio(e["build_seconds"]["1"].as_f64(), hnswlib["build_seconds"]["1"].as_f64()),
                "build_2_threads": ratio(e["build_seconds"]["2"].as_f64(), hnswlib["build_seconds"]["2"].as_f64()),
                "rss_delta": ratio(e["rss_delta_bytes"].as_f64(), hnswlib["rss_delta_bytes"].as_f64()),
            }),
        );
    }
    Value::Object(out)
}

fn fmt_qps(v: &Value) -> String {
    match v["qps"].as_f64() {
        Some(q) if v["bound"] == "at_least" => format!(">={q:.0}"),
        Some(q) => format!("{q:.0}"),
        None => "n/a".into(),
    }
}

fn fmt_ratio(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |r| format!("{r:.2}x"))
}

fn print_set(engines: &[Value], hnswlib: Option<&Value>) {
    let mut all: Vec<&Value> = engines.iter().collect();
    if let Some(h) = hnswlib {
        all.push(h);
    }
    println!();
    println!(
        "{:>10} | {:>9} | {:>9} | {:>9} | {:>9} | {:>9} | {:>9}",
        "engine", "build 1t", "build 2t", "QPS@0.90", "QPS@0.95", "RSS MiB", "est MiB"
    );
    for e in &all {
        println!(
            "{:>10} | {:>8.2}s | {:>8.2}s | {:>9} | {:>9} | {:>9} | {:>9}",
            e["engine"].as_str().unwrap_or("?"),
            e["build_seconds"]["1"].as_f64().unwrap_or(f64::NAN),
            e["build_seconds"]["2"].as_f64().unwrap_or(f64::NAN),
            fmt_qps(&qps_at(e, 0.90)),
            fmt_qps(&qps_at(e, 0.95)),
            e["rss_delta_bytes"]
                .as_f64()
                .map_or("n/a".into(), |b| format!("{:.1}", b / 1048576.0)),
            e["engine_estimate_bytes"]
                .as_f64()
                .map_or("n/a".into(), |b| format!("{:.1}", b / 1048576.0)),
        );
    }
    println!();
    println!(
        "{:>10} | {:>4} | {:>9} | {:>10} | {:>8} | {:>10} | {:>8}",
        "engine", "ef", "recall@10", "1t QPS", "p50 µs", "batch QPS", "batch/1t"
    );
    for e in &all {
        for r in e["rows"].as_array().into_iter().flatten() {
            println!(
                "{:>10} | {:>4} | {:>9.4} | {:>10.0} | {:>8} | {:>10.0} | {:>7.2}x",
                e["engine"].as_str().unwrap_or("?"),
                r["ef_search"].as_u64().unwrap_or(0),
                r["recall_at_10"].as_f64().unwrap_or(f64::NAN),
                r["single_thread_qps"].as_f64().unwrap_or(f64::NAN),
                r["p50_us"]
                    .as_f64()
                    .map_or("-".into(), |p| format!("{p:.0}")),
                r["all_core_batch_qps"].as_f64().unwrap_or(f64::NAN),
                r["all_core_batch_qps"].as_f64().unwrap_or(f64::NAN)
                    / r["single_thread_qps"].as_f64().unwrap_or(f64::NAN),
            );
        }
    }
    if let Some(h) = hnswlib {
        println!();
        for e in engines {
            let name = e["engine"].as_str().unwrap_or("?");
            let r = |f: &dyn Fn(&Value) -> Option<f64>| ratio(f(e), f(h));
            println!(
                "  {name}/hnswlib: QPS@0.90 {} | QPS@0.95 {} | build 1t {} | build 2t {} | RSS {}",
                fmt_ratio(r(&|v| qps_at(v, 0.90)["qps"].as_f64())),
                fmt_ratio(r(&|v| qps_at(v, 0.95)["qps"].as_f64())),
                fmt_ratio(r(&|v| v["build_seconds"]["1"].as_f64())),
                fmt_ratio(r(&|v| v["build_seconds"]["2"].as_f64())),
                fmt_ratio(r(&|v| v["rss_delta_bytes"].as_f64())),
            );
        }
    }
}

// ---- gRPC on loopback ----

fn grpc_section(set: &DataSet, truth: &[Vec<u32>]) -> BoxResult<Value> {
    // The client side runs as a client process would: each client on its own thread with a
    // current-thread runtime. The servers are the real `vectord serve` binary, each in its own
    // process, all running at once: the passes alternate between them, so every engine meets
    // the same moments of the host's load (a pass's p50 moves with it from one second to the
    // next, by more than the engines differ).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    println!();
    println!(
        "== gRPC on loopback ({}; ef_search {GRPC_EF}; a `vectord serve` child process per engine, clients on their own threads, passes alternating between the engines) ==",
        set.name
    );
    let mut servers = Vec::new();
    for kind in engine_kinds() {
        servers.push(rt.block_on(GrpcServer::start(kind, set, truth))?);
    }
    let mut tcp = Vec::with_capacity(GRPC_PASSES);
    for _ in 0..GRPC_PASSES {
        tcp.push(tcp_round_trip_p50(set.queries.len())?);
        for s in &mut servers {
            s.one_client_pass(&set.queries)?;
        }
    }
    for _ in 0..GRPC_PASSES {
        for s in &mut servers {
            s.four_client_pass(&set.queries)?;
        }
    }
    let tcp_rtt = median(&tcp).unwrap_or(0.0);
    let mut out = serde_json::Map::new();
    for s in servers {
        let kind = s.kind;
        let v = rt.block_on(s.finish(set, tcp_rtt))?;
        out.insert(kind.name().to_string(), v);
    }
    Ok(Value::Object(out))
}

type Client = vectord::pb::index_service_client::IndexServiceClient<tonic::transport::Channel>;

async fn connect(addr: std::net::SocketAddr) -> BoxResult<Client> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    Ok(Client::new(channel)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX))
}

fn search_request(q: &[f32]) -> vectord::pb::SearchRequest {
    vectord::pb::SearchRequest {
        index_name: GRPC_INDEX.into(),
        vector: q.to_vec(),
        k: K as u32,
        ef_search: Some(GRPC_EF),
        ..Default::default()
    }
}

const GRPC_INDEX: &str = "bench";
/// Passes of the unary Search measurement (each client sends every query once per pass).
const GRPC_PASSES: usize = 5;

/// Unary Search latencies of one client sending `requests` one after another.
async fn unary_client(
    mut c: Client,
    requests: Vec<vectord::pb::SearchRequest>,
) -> BoxResult<Vec<Duration>> {
    let mut lat = Vec::with_capacity(requests.len());
    for r in requests {
        let t = Instant::now();
        c.search(r).await?;
        lat.push(t.elapsed());
    }
    Ok(lat)
}

/// `clients` concurrent clients, each on its own thread and runtime, each sending every query
/// once (from its own offset); all connect first, then start together.
fn unary_clients(
    addr: std::net::SocketAddr,
    queries: &[Vec<f32>],
    clients: usize,
) -> BoxResult<(Vec<Duration>, f64)> {
    let barrier = std::sync::Barrier::new(clients + 1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|t| {
                let barrier = &barrier;
                let requests: Vec<_> = queries
                    .iter()
                    .cycle()
                    .skip(t * 97)
                    .take(queries.len())
                    .map(|q| search_request(q))
                    .collect();
                scope.spawn(move || -> Result<Vec<Duration>, String> {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| e.to_string())?;
                    let c = rt.block_on(connect(addr));
                    barrier.wait();
                    let c = c.map_err(|e| e.to_string())?;
                    rt.block_on(unary_client(c, requests))
                        .map_err(|e| e.to_string())
                })
            })
            .collect();
        barrier.wait();
        let started = Instant::now();
        let mut lat = Vec::new();
        for h in handles {
            match h.join() {
                Ok(r) => lat.extend(r?),
                Err(_) => return Err("a client thread panicked".into()),
            }
        }
        let qps = lat.len() as f64 / started.elapsed().as_secs_f64();
        lat.sort_unstable();
        Ok((lat, qps))
    })
}

/// The p50 of `n` `grpc.health.v1.Health/Check` calls from a client on its own thread and
/// runtime, as the unary Search clients are.
fn health_p50(addr: std::net::SocketAddr, n: usize) -> BoxResult<f64> {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let run = move || -> Result<f64, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async {
            let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
                .map_err(|e| e.to_string())?
                .connect()
                .await
                .map_err(|e| e.to_string())?;
            let mut h = HealthClient::new(channel);
            let mut lat = Vec::with_capacity(n);
            for _ in 0..n {
                let t = Instant::now();
                h.check(HealthCheckRequest::default())
                    .await
                    .map_err(|e| e.to_string())?;
                lat.push(t.elapsed());
            }
            lat.sort_unstable();
            Ok(micros(percentile(&lat, 0.5)))
        })
    };
    match std::thread::spawn(run).join() {
        Ok(r) => Ok(r?),
        Err(_) => Err("the health client thread panicked".into()),
    }
}

/// The p50 of `n` round trips of 64 bytes over loopback TCP between two threads (blocking
/// sockets, TCP_NODELAY): what the kernel alone costs a call on this machine.
fn tcp_round_trip_p50(n: usize) -> BoxResult<f64> {
    use std::io::Read;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    // Connect before the echo thread starts: the kernel completes the handshake into the
    // listener's backlog, so `accept` returns at once, and a failed connect leaves no thread
    // waiting in it.
    let c = std::net::TcpStream::connect(listener.local_addr()?)?;
    let (mut s, _) = listener.accept()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        s.set_nodelay(true)?;
        let mut b = [0u8; 64];
        while s.read_exact(&mut b).is_ok() {
            s.write_all(&b)?;
        }
        Ok(())
    });
    let mut lat = Vec::with_capacity(n);
    {
        // Closed at the end of this block, which ends the echo loop.
        let mut c = c;
        c.set_nodelay(true)?;
        let mut b = [0u8; 64];
        for _ in 0..n {
            let t = Instant::now();
            c.write_all(&b)?;
            c.read_exact(&mut b)?;
            lat.push(t.elapsed());
        }
    }
    match echo.join() {
        Ok(r) => r?,
        Err(_) => return Err("the echo thread panicked".into()),
    }
    lat.sort_unstable();
    Ok(micros(percentile(&lat, 0.5)))
}

/// Unary passes of one client or of four: every pass's p50 and QPS, and all latencies.
#[derive(Default)]
struct Passes {
    p50s: Vec<f64>,
    qps: Vec<f64>,
    all: Vec<Duration>,
}

impl Passes {
    fn add(&mut self, (lat, qps): (Vec<Duration>, f64)) {
        self.p50s.push(micros(percentile(&lat, 0.5)));
        self.qps.push(qps);
        self.all.extend(lat);
    }

    /// The median pass's p50 and QPS, the p99 over all passes, and every pass.
    fn report(&mut self) -> Value {
        self.all.sort_unstable();
        json!({
            "qps": median(&self.qps),
            "p50_us": median(&self.p50s),
            "p99_us": micros(percentile(&self.all, 0.99)),
            "passes": { "p50_us": self.p50s, "qps": self.qps },
        })
    }
}

/// One engine's server in the gRPC section, filled and warmed up, with what its passes measured.
struct GrpcServer {
    kind: EngineKind,
    server: child::Vectord,
    addr: std::net::SocketAddr,
    client: Client,
    _dir: tempfile::TempDir,
    upsert_s: f64,
    recall: f64,
    get_index_p50: f64,
    one: Passes,
    /// Per 1-client pass, the p50 of a pass of health checks right after it.
    health: Vec<f64>,
    four: Passes,
}

impl GrpcServer {
    /// Starts `vectord serve` with engine `kind`, fills the index through UpsertPoints, then
    /// measures recall through the whole stack (which also warms it up) and GetIndex's p50.
    async fn start(kind: EngineKind, set: &DataSet, truth: &[Vec<u32>]) -> BoxResult<Self> {
        use vectord::pb;

        let dir = tempfile::tempdir()?;
        let data_dir = dir.path().to_string_lossy().into_owned();
        let mut server = child::Vectord::spawn(
            "bench server",
            &[
                "--addr",
                "127.0.0.1:0",
                "--data-dir",
                &data_dir,
                "--engine",
                kind.name(),
            ],
            &[],
        );
        let addr = server.wait_listening().await;
        server.wait_serving(addr).await;
        let mut c = connect(addr).await?;
        c.create_index(pb::CreateIndexRequest {
            name: GRPC_INDEX.into(),
            dimension: set.dim as u32,
            metric: pb::Metric::Cosine as i32,
            default_config: Some(pb::HnswConfig {
                m: M,
                ef_construction: EF_CONSTRUCTION,
                ef_search: GRPC_EF,
                seed: None,
            }),
            engine: String::new(),
        })
        .await?;
        let started = Instant::now();
        for (chunk_no, chunk) in set.base.chunks(1000).enumerate() {
            let points = chunk
                .iter()
                .enumerate()
                .map(|(i, v)| pb::Point {
                    id: (chunk_no * 1000 + i) as u64,
                    vector: v.clone(),
                })
                .collect();
            c.upsert_points(pb::UpsertPointsRequest {
                index_name: GRPC_INDEX.into(),
                points,
                ..Default::default()
            })
            .await?;
        }
        let upsert_s = started.elapsed().as_secs_f64();

        // Warm-up, and recall through the whole stack.
        let mut found = Vec::new();
        for q in &set.queries {
            let r = c.search(search_request(q)).await?.into_inner();
            found.push(r.neighbors.iter().map(|h| h.id as u32).collect::<Vec<_>>());
        }
        let recall = recall(&found, truth);

        // The stack alone: a unary call that does no search (GetIndex), same layers and codec.
        let mut stack = Vec::with_capacity(set.queries.len());
        for _ in 0..set.queries.len() {
            let t = Instant::now();
            c.get_index(pb::GetIndexRequest {
                name: GRPC_INDEX.into(),
            })
            .await?;
            stack.push(t.elapsed());
        }
        stack.sort_unstable();
        Ok(GrpcServer {
            kind,
            server,
            addr,
            client: c,
            _dir: dir,
            upsert_s,
            recall,
            get_index_p50: micros(percentile(&stack, 0.5)),
            one: Passes::default(),
            health: Vec::new(),
            four: Passes::default(),
        })
    }

    /// A pass of every query from one client, then a pass of health checks on a fresh client
    /// thread: the gRPC stack as this server runs it (its layers, no handler work) at that
    /// moment, so `Search − Health` per pass is what the search request adds, whatever the
    /// host's load did to both.
    fn one_client_pass(&mut self, queries: &[Vec<f32>]) -> BoxResult<()> {
        self.one.add(unary_clients(self.addr, queries, 1)?);
        self.health.push(health_p50(self.addr, queries.len())?);
        Ok(())
    }

    /// A pass of every query from each of four concurrent clients.
    fn four_client_pass(&mut self, queries: &[Vec<f32>]) -> BoxResult<()> {
        self.four.add(unary_clients(self.addr, queries, 4)?);
        Ok(())
    }

    /// SearchBatch of 100 queries, then stops the server; prints the engine's line and returns
    /// its JSON.
    async fn finish(mut self, set: &DataSet, tcp_rtt: f64) -> BoxResult<Value> {
        use vectord::pb;

        let mut lat = Vec::new();
        let started = Instant::now();
        for chunk in set.queries.chunks(100) {
            let req = pb::SearchBatchRequest {
                index_name: GRPC_INDEX.into(),
                queries: chunk
                    .iter()
                    .map(|q| pb::QueryVector { vector: q.clone() })
                    .collect(),
                k: K as u32,
                ef_search: Some(GRPC_EF),
                ..Default::default()
            };
            let t = Instant::now();
            self.client.search_batch(req).await?;
            lat.push(t.elapsed());
        }
        let batch_qps = set.queries.len() as f64 / started.elapsed().as_secs_f64();
        lat.sort_unstable();

        drop(self.client);
        self.server.signal("TERM");
        let status = self.server.wait_exit().await;
        if !status.success() {
            return Err(format!("the bench server exited with {status}").into());
        }
        let over_health: Vec<f64> = self
            .one
            .p50s
            .iter()
            .zip(&self.health)
            .map(|(search, health)| search - health)
            .collect();
        let passes = self
            .one
            .p50s
            .iter()
            .map(|p| format!("{p:.0}"))
            .collect::<Vec<_>>()
            .join("/");
        let u1 = self.one.report();
        let u4 = self.four.report();
        println!(
            "  {:>10}: upsert {:.1} s | recall {:.4} | loopback TCP round trip p50 {:.0} µs | Health p50 {:.0} µs | GetIndex p50 {:.0} µs | unary 1 client p50 {:.0} µs (passes {passes}; Search − Health {:.0} µs) p99 {:.0} µs {:.0} QPS | 4 clients p50 {:.0} µs {:.0} QPS | SearchBatch(100) p50 {:.1} ms, {:.0} QPS",
            self.kind.name(),
            self.upsert_s,
            self.recall,
            tcp_rtt,
            median(&self.health).unwrap_or(0.0),
            self.get_index_p50,
            u1["p50_us"].as_f64().unwrap_or(0.0),
            median(&over_health).unwrap_or(0.0),
            u1["p99_us"].as_f64().unwrap_or(0.0),
            u1["qps"].as_f64().unwrap_or(0.0),
            u4["p50_us"].as_f64().unwrap_or(0.0),
            u4["qps"].as_f64().unwrap_or(0.0),
            micros(percentile(&lat, 0.5)) / 1000.0,
            batch_qps,
        );
        Ok(json!({
            "server": "vectord serve (child process)",
            "upsert_seconds": self.upsert_s,
            "recall_at_10": self.recall,
            "get_index_p50_us": self.get_index_p50,
            "tcp_round_trip_p50_us": tcp_rtt,
            "health_p50_us": { "median": median(&self.health), "passes": self.health },
            "search_minus_health_p50_us": { "median": median(&over_health), "passes": over_health },
            "unary": { "1": u1, "4": u4 },
            "search_batch_100": {
                "p50_ms": micros(percentile(&lat, 0.5)) / 1000.0,
                "p99_ms": micros(percentile(&lat, 0.99)) / 1000.0,
                "qps": batch_qps,
            },
        }))
    }
}

// ---- data ----

/// `n` points of dimension `dim` on a random `latent`-d subspace plus a little noise.
fn generate_l2(n: usize, dim: usize, latent: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let w: Vec<Vec<f32>> = (0..dim)
        .map(|_| (0..latent).map(|_| rng.gen_range(-1.0f32..1.0)).collect())
        .collect();
    let mut gauss = move || {
        // Box-Muller
        let u1: f32 = rng.gen_range(f32::EPSILON..1.0);
        let u2: f32 = rng.gen_range(0.0f32..1.0);
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    };
    (0..n)
        .map(|_| {
            let z: Vec<f32> = (0..latent).map(|_| gauss()).collect();
            w.iter()
                .map(|row| row.iter().zip(&z).map(|(a, b)| a * b).sum::<f32>() + 0.1 * gauss())
                .collect()
        })
        .collect()
}

fn exact_top_k(metric: Metric, base: &[Vec<f32>], q: &[f32], k: usize) -> Vec<u32> {
    let mut all: Vec<(f32, u32)> = base
        .iter()
        .enumerate()
        .map(|(i, v)| (distance::exact(metric, q, v), i as u32))
        .collect();
    let by = |a: &(f32, u32), b: &(f32, u32)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
    if k < all.len() {
        all.select_nth_unstable_by(k, by);
        all.truncate(k);
    }
    all.sort_unstable_by(by);
    all.into_iter().map(|(_, i)| i).collect()
}

fn search_all(engine: &dyn Engine, queries: &[Vec<f32>], ef: usize) -> Vec<Vec<u32>> {
    queries
        .iter()
        .map(|q| {
            engine
                .search(q, K, ef)
                .into_iter()
                .map(|(i, _)| i as u32)
                .collect()
        })
        .collect()
}

fn recall(found: &[Vec<u32>], truth: &[Vec<u32>]) -> f64 {
    let hits: usize = found
        .iter()
        .zip(truth)
        .map(|(f, t)| f.iter().take(K).filter(|id| t.contains(id)).count())
        .sum();
    hits as f64 / (truth.len() * K) as f64
}

fn write_fvecs(path: &Path, rows: &[Vec<f32>]) -> BoxResult<()> {
    let mut out = Vec::with_capacity(rows.len() * (rows.first().map_or(0, Vec::len) + 1) * 4);
    for r in rows {
        out.extend_from_slice(&(r.len() as i32).to_le_bytes());
        for x in r {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    std::fs::write(path, out)?;
    Ok(())
}

fn write_ivecs(path: &Path, rows: &[Vec<u32>]) -> BoxResult<()> {
    let mut out = Vec::new();
    for r in rows {
        out.extend_from_slice(&(r.len() as i32).to_le_bytes());
        for x in r {
            out.extend_from_slice(&(*x as i32).to_le_bytes());
        }
    }
    std::fs::write(path, out)?;
    Ok(())
}
