//! Issue 20's benchmark: the costs that grow with the data, against a real release server
//! process (`vectord serve`, the bench profile's binary) over gRPC on loopback, with hnswlib's
//! figures for the same data measured in the same run.
//!
//! Run with `cargo bench --bench scale`. Data: a seeded Gaussian mixture (64 clusters, L2,
//! 128-d) at each size of `VECTORD_SCALE_SIZES` (comma-separated, default `100000`, e.g.
//! `100000,300000,1000000`), plus 100k x 384 cosine when `VECTORD_SCALE_COSINE=1`; 500 queries
//! from the same mixture (`VECTORD_SCALE_QUERIES`) with exact top-10 ground truth.
//!
//! Per set, in this order:
//! 1. import points/s through ImportPoints (1,000 points a message) as acknowledged and until
//!    every point is linked (GetIndex `unindexed_count` 0), and the server's VmRSS
//!    (`/proc/<pid>/status`) after it, less an empty server's;
//! 2. QPS at recall@10 0.95: SearchBatch of every query at each ef_search of a sweep, the first
//!    ef reaching 0.95 (hnswlib: the same rule over its all-core batch QPS);
//! 3. restart to SERVING with the snapshot, `VECTORD_SCALE_REPEATS` times (default 3, median
//!    and spread), the VmRSS after each; then with the snapshot files deleted (a forced rebuild,
//!    `VECTORD_SCALE_REBUILDS` times, default 1);
//! 4. 64 concurrent writers (tokio tasks in this process, one channel, one new point per
//!    UpsertPoints) for `VECTORD_SCALE_WRITE_SECS` (default 20): acknowledged upserts/s, p50, p99;
//! 5. DeletePoints of 90% of the points (the writers' too): search p50 at ef 64 right after
//!    (while compaction runs), the seconds until compaction has finished (GetIndex's
//!    `compaction` and `deleted_fraction`), p50 after it, and p50 of a fresh index holding only
//!    the live points (imported into the same server).
//!
//! hnswlib (`bench/hnswlib_bench.py`, Python from `VECTORD_BENCH_PYTHON`, default `python3`):
//! one 2-thread build of the same bytes (M 16, ef_construction 200 like vectord's default),
//! recall and QPS per ef, then `load_index` in a fresh process `VECTORD_SCALE_REPEATS` times
//! (seconds and resident growth). Without hnswlib the bench says so and prints the rest.
//! `VECTORD_SCALE_SERVER_ARGS` adds flags to every `vectord serve` (e.g. `--store-cache-mb 16`).
//!
//! `VECTORD_SCALE_PHASES=restart` runs only the restart phase, without hnswlib: the import
//! (then a graceful stop, as a user would restart), then `VECTORD_SCALE_REPEATS` pairs of a
//! restart with the snapshot and a forced rebuild, alternating (medians of each), then one
//! crash case: 20% more points imported, SIGKILL right after the import is acknowledged, and
//! a restart that replays them (the import's snapshot may not have been written).
//! `VECTORD_SCALE_PHASES=deletes` runs only the import and step 5 (no hnswlib, no writers).
//! Results also go to `target/bench-scale.json`.
//!
//! `VECTORD_SCALE_ONLY=writers` runs only step 4, on a fresh server per run: import each size's
//! points, then the 64 writers; `VECTORD_SCALE_ROUNDS` rounds (default 3) of one run per server
//! binary of `VECTORD_SCALE_BINS` (colon-separated paths, default this build's `vectord`),
//! alternating, then each binary's medians. For comparing two builds in one run on a shared
//! machine. Each round also times hnswlib inserting the writers' first 20,000 points into its
//! build of the same base, 64 a call on 2 threads: the graph work alone, without a server, as a
//! reference for what linking every write costs on this machine.
//! `VECTORD_SCALE_EF_CONSTRUCTION` (writers-only mode; default 200, the server's) creates the
//! index with that ef_construction (M 16, ef_search 64) and gives hnswlib the same.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vectord::pb;

#[path = "../tests/it/common/child.rs"]
mod child;
#[path = "common/machine.rs"]
mod machine;
#[path = "common/serving.rs"]
mod serving;

use serving::*;

const WRITERS: u64 = 64;
const INDEX: &str = "scale";
/// vectord's default config, which hnswlib is given too.
const M: u32 = 16;
const EF_CONSTRUCTION: u32 = 200;
/// How many of the writers' points hnswlib inserts in the writers-only mode.
const HNSWLIB_INSERTS: usize = 20_000;
/// How many of the writers' acknowledged points are searched by their own vector once linked,
/// and at which ef: the index's ef_search (64), and 200 (issue 20: "a search with its own
/// vector at the index's ef_search finds it first"; "at ef 200: 100 % found").
const FOUND_SAMPLE: usize = 2_000;
const FOUND_EFS: [u32; 2] = [P50_EF, 200];
const FOUND_EF: u32 = FOUND_EFS[1];
/// The writers' first id (the imported points are 0..n).
const FIRST_WRITER_ID: u64 = 1_000_000_000;

fn write_vecs<T: Copy>(
    path: &Path,
    rows: &[Vec<T>],
    to_bytes: impl Fn(T) -> [u8; 4],
) -> BoxResult<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for r in rows {
        out.write_all(&(r.len() as i32).to_le_bytes())?;
        for &x in r {
            out.write_all(&to_bytes(x))?;
        }
    }
    out.flush()?;
    Ok(())
}

/// A process's resident memory (`/proc/<pid>/status`), in bytes: VmRSS and its parts RssAnon
/// (anonymous: the heap and anonymous mappings, which only swap could evict), RssFile (pages
/// of mapped files: the binary, and with `--map-float-vectors` the float vectors, which the
/// kernel may write back and evict) and RssShmem.
#[derive(Clone, Copy, Debug, Default)]
struct Rss {
    total: f64,
    anon: f64,
    file: f64,
    shmem: f64,
}

impl Rss {
    fn of(pid: u32) -> Rss {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
                .map_or(f64::NAN, |kib| kib * 1024.0)
        };
        Rss {
            total: field("VmRSS:"),
            anon: field("RssAnon:"),
            file: field("RssFile:"),
            shmem: field("RssShmem:"),
        }
    }

    fn minus(self, o: Rss) -> Rss {
        Rss {
            total: self.total - o.total,
            anon: self.anon - o.anon,
            file: self.file - o.file,
            shmem: self.shmem - o.shmem,
        }
    }

    fn show(self, n: usize) -> String {
        format!(
            "VmRSS {} ({:.0} B/point) = anon {} ({:.0} B/point) + file {} ({:.0} B/point) + shmem {}",
            mib(self.total),
            self.total / n as f64,
            mib(self.anon),
            self.anon / n as f64,
            mib(self.file),
            self.file / n as f64,
            mib(self.shmem)
        )
    }
}

/// Where process `pid`'s resident memory is, from `/proc/<pid>/smaps`: the mapped float
/// vectors (files under `float-vectors`), other files (the binary, libraries), the heap, and
/// the largest anonymous mappings one by one (the graph's cell arrays are allocations of their
/// own, from 2 MiB up; glibc's thread arenas are 64 MiB reservations), then the rest.
fn smaps_breakdown(pid: u32) -> Vec<(String, f64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let (mut floats, mut files, mut heap, mut small) = (0.0, 0.0, 0.0, 0.0);
    let mut anon: Vec<(f64, f64)> = Vec::new(); // (size, rss)
    let mut current: Option<(String, f64)> = None;
    let mut flush = |c: Option<(String, f64)>, rss: f64| {
        if let Some((path, size)) = c {
            if path.contains("float-vectors") {
                floats += rss;
            } else if path.starts_with('/') {
                files += rss;
            } else if path == "[heap]" {
                heap += rss;
            } else if path.is_empty() && size >= 2.0 * 1024.0 * 1024.0 {
                anon.push((size, rss));
            } else {
                small += rss;
            }
        }
    };
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if let Some((a, b)) = first
            .split_once('-')
            .filter(|(a, _)| !a.is_empty() && a.chars().all(|c| c.is_ascii_hexdigit()))
        {
            let size = (u64::from_str_radix(b, 16).unwrap_or(0)
                - u64::from_str_radix(a, 16).unwrap_or(0)) as f64;
            let path = words.skip(4).collect::<Vec<_>>().join(" ");
            current = Some((path, size));
        } else if first == "Rss:" {
            let kib: f64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0.0);
            flush(current.take(), kib * 1024.0);
        }
    }
    anon.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut out = vec![
        ("mapped float vectors (RssFile)".to_string(), floats),
        ("other files: binary, libraries".to_string(), files),
        ("[heap] (brk)".to_string(), heap),
    ];
    let rest: f64 = anon.iter().skip(12).map(|a| a.1).sum();
    for (size, rss) in anon.iter().take(12) {
        out.push((format!("anonymous mapping of {}", mib(*size)), *rss));
    }
    out.push(("other large anonymous mappings".into(), rest));
    out.push(("small anonymous mappings, stacks".into(), small));
    out
}

/// The scale bench's own readings of a server.
impl Server {
    fn rss_parts(&self) -> Rss {
        Rss::of(self.proc.pid)
    }

    /// The `from=` and `millis=` of the last `recovered index` line of index `INDEX`.
    fn recovery(&mut self) -> String {
        let log = self.proc.log();
        log.lines()
            .rev()
            .find(|l| l.contains("recovered index") && l.contains(&format!("index={INDEX} ")))
            .map(|l| {
                l.split_whitespace()
                    .filter(|w| {
                        w.starts_with("from=")
                            || w.starts_with("millis=")
                            || w.starts_with("replayed=")
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_else(|| "no recovery line".into())
    }
}

fn python() -> String {
    std::env::var("VECTORD_BENCH_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Runs the hnswlib helper with `args`; its JSON, or None (and why, printed).
/// hnswlib's build (2 threads, vectord's M and ef_construction) of `base`, its ef sweep over
/// `queries` against `truth`, saved to `save`.
fn hnswlib_build(
    base: &Path,
    queries: &Path,
    truth: &Path,
    space: &str,
    save: &Path,
) -> Option<Value> {
    let p = |p: &Path| p.display().to_string();
    let efs: Vec<String> = EF_SWEEP.iter().map(|e| e.to_string()).collect();
    hnswlib(&[
        "--base".into(),
        p(base),
        "--queries".into(),
        p(queries),
        "--truth".into(),
        p(truth),
        "--space".into(),
        space.into(),
        "--m".into(),
        M.to_string(),
        "--ef-construction".into(),
        EF_CONSTRUCTION.to_string(),
        "--ef".into(),
        efs.join(","),
        "--builds".into(),
        "2".into(),
        "--save".into(),
        p(save),
    ])
}

fn hnswlib(args: &[String]) -> Option<Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/hnswlib_bench.py");
    match std::process::Command::new(python())
        .arg(&script)
        .args(args)
        .output()
    {
        Ok(o) if o.status.success() => serde_json::from_slice(&o.stdout).ok(),
        Ok(o) => {
            println!(
                "  hnswlib: not measured (pip install numpy hnswlib, or set VECTORD_BENCH_PYTHON): {}",
                String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("")
            );
            None
        }
        Err(e) => {
            println!("  hnswlib: not measured: cannot run {}: {e}", python());
            None
        }
    }
}

async fn run_set(set: &Set, repeats: usize, rebuilds: usize, write_secs: u64) -> BoxResult<Value> {
    println!(
        "\n== {} ({} x {}, {}) ==",
        set.name,
        set.n,
        set.dim,
        match set.metric {
            Metric::L2 => "L2",
            Metric::Cosine => "cosine",
        }
    );
    let tmp = tempfile::tempdir()?;
    let data_dir = tmp.path().join("data");
    let mixture = Mixture::new(set.dim, 7);
    let t = Instant::now();
    let base = mixture.samples(11, set.n);
    let queries = mixture.samples(13, env_usize("VECTORD_SCALE_QUERIES", 500));
    let all: Vec<u64> = (0..set.n as u64).collect();
    let truth = exact(set.metric, &base, &all, &queries);
    println!(
        "  data and ground truth: {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let space = if set.metric == Metric::L2 {
        "l2"
    } else {
        "cosine"
    };
    let (bf, qf, tf, hf) = (
        tmp.path().join("base.fvecs"),
        tmp.path().join("queries.fvecs"),
        tmp.path().join("truth.ivecs"),
        tmp.path().join("hnswlib.bin"),
    );
    write_vecs(&bf, &base, f32::to_le_bytes)?;
    write_vecs(&qf, &queries, f32::to_le_bytes)?;
    let truth_i: Vec<Vec<i32>> = truth
        .iter()
        .map(|t| t.iter().map(|&i| i as i32).collect())
        .collect();
    write_vecs(&tf, &truth_i, i32::to_le_bytes)?;
    let mut out = json!({"set": set.name, "points": set.n, "dimension": set.dim});

    // 1. Import.
    let (server, _) = Server::start(&data_dir).await?;
    let empty_rss = server.rss();
    let empty_parts = server.rss_parts();
    let mut c = server.client().await?;
    create(&mut c, INDEX, set).await?;
    let took = import(&mut c, INDEX, &base, &all).await?;
    let import_rate = set.n as f64 / took;
    // An import is answered once its points are stored and searchable (the last ones from the
    // index's fresh segment); the figures below are of the linked graph.
    let linked_after = wait_linked(&mut c, INDEX).await?;
    let linked_rate = set.n as f64 / (took + linked_after);
    let import_rss = server.rss() - empty_rss;
    println!(
        "  import: {import_rate:.0} points/s acknowledged ({took:.1} s), every point linked {linked_after:.1} s later ({linked_rate:.0} points/s); server RSS then {} over an empty server's {} ({:.0} B/point)",
        mib(import_rss),
        mib(empty_rss),
        import_rss / set.n as f64
    );
    out["linked_after_import_s"] = json!(linked_after);
    out["import_linked_points_per_s"] = json!(linked_rate);
    println!(
        "  server memory after the import, less an empty server's: {}",
        server.rss_parts().minus(empty_parts).show(set.n)
    );
    out["import_points_per_s"] = json!(import_rate);
    out["empty_server_rss"] = json!(empty_rss);
    out["rss_after_import"] = json!(import_rss);
    if std::env::var("VECTORD_SCALE_PHASES").as_deref() == Ok("restart") {
        drop(c);
        let stopping = Instant::now();
        server.stop().await?;
        println!(
            "  graceful stop after the import: {:.2} s",
            stopping.elapsed().as_secs_f64()
        );
        return restarts_only(set, &data_dir, &mixture, repeats, out).await;
    }
    if std::env::var("VECTORD_SCALE_PHASES").as_deref() == Ok("deletes") {
        out["delete"] = deletes(&mut c, set, &base, &queries, &[]).await?;
        drop(c);
        server.stop().await?;
        return Ok(out);
    }
    if std::env::var("VECTORD_SCALE_PHASES").as_deref() == Ok("qps") {
        out["qps"] = qps_and_check(&mut c, &queries, &truth).await?;
        drop(c);
        server.stop().await?;
        return Ok(out);
    }
    if std::env::var("VECTORD_SCALE_PHASES").as_deref() == Ok("memory") {
        drop(c);
        server.stop().await?;
        let hl = (space, bf, qf, tf, hf);
        return memory_only(set, &data_dir, &queries, &truth, hl, repeats, out).await;
    }

    // 2. QPS at recall 0.95, once the findability check's pass over the imported graph is done
    // (what a pass costs searches meanwhile: VECTORD_SCALE_PHASES=qps).
    if let Some((secs, check)) = wait_checked(&mut c, INDEX).await? {
        println!(
            "  the findability check caught up {secs:.1} s later: {} passes, {} points linked",
            check.passes, check.points_linked
        );
        out["check_caught_up_s"] = json!(secs);
        // The snapshot its passes ask for (background work that would overlap the sweep).
        let since = std::time::SystemTime::now() - Duration::from_secs(1);
        match wait_snapshot_written(&data_dir, since).await {
            Some(waited) => println!("  then its snapshot was written, {waited:.1} s later"),
            None => println!("  no snapshot written within 90 s after it"),
        }
    }
    let mut rows = Vec::new();
    for ef in EF_SWEEP {
        let (qps, found) = batch(&mut c, INDEX, &queries, ef, 3).await?;
        let r = recall(&found, &truth);
        println!("  ef {ef:>3}: recall@10 {r:.3}, SearchBatch QPS {qps:.0}");
        rows.push((ef, r, qps));
        if r >= 0.99 {
            break;
        }
    }
    let vd = at_095(&rows);
    out["vectord_sweep"] = json!(rows);
    drop(c);
    server.stop().await?;

    // hnswlib: build, sweep, then load_index in fresh processes.
    let p = |p: &PathBuf| p.display().to_string();
    let built = hnswlib_build(&bf, &qf, &tf, space, &hf);
    let mut hl_loads = Vec::new();
    let mut hl_rss = Vec::new();
    let mut hl_095 = None;
    if let Some(b) = &built {
        let rows: Vec<(u32, f64, f64)> = b["rows"]
            .as_array()
            .map(|rs| {
                rs.iter()
                    .map(|r| {
                        (
                            r["ef_search"].as_u64().unwrap_or(0) as u32,
                            r["recall_at_10"].as_f64().unwrap_or(0.0),
                            r["all_core_batch_qps"].as_f64().unwrap_or(0.0),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        hl_095 = at_095(&rows);
        for _ in 0..repeats {
            if let Some(l) = hnswlib(&[
                "--load".into(),
                p(&hf),
                "--space".into(),
                space.into(),
                "--dim".into(),
                set.dim.to_string(),
            ]) {
                hl_loads.push(l["load_seconds"].as_f64().unwrap_or(f64::NAN));
                hl_rss.push(l["rss_delta_bytes"].as_f64().unwrap_or(f64::NAN));
            }
        }
        println!(
            "  hnswlib {}: build (2 threads) {:.1} s; load_index {}; resident growth with the loaded index {}",
            b["version"].as_str().unwrap_or("?"),
            b["build_seconds"]["2"].as_f64().unwrap_or(f64::NAN),
            spread(&hl_loads, secs),
            spread(&hl_rss, mib)
        );
        out["hnswlib"] = json!({"build_2_threads_s": b["build_seconds"]["2"], "load_s": hl_loads,
            "rss": hl_rss, "sweep": rows, "version": b["version"]});
    }
    match (vd, hl_095) {
        (Some(v), Some(h)) => println!(
            "  QPS at recall 0.95 (all-core batch): vectord {:.0} (ef {}, {:.3}), hnswlib {:.0} (ef {}, {:.3}): {:.2}x",
            v.2, v.0, v.1, h.2, h.0, h.1, v.2 / h.2
        ),
        (Some(v), None) => println!("  QPS at recall 0.95 (all-core batch): vectord {:.0} (ef {}, {:.3})", v.2, v.0, v.1),
        _ => println!("  vectord did not reach recall 0.95 in the sweep"),
    }
    out["qps_at_095"] = json!(vd.map(|v| v.2));
    out["hnswlib_qps_at_095"] = json!(hl_095.map(|v| v.2));

    // 3. Restarts: with the snapshot, then forced rebuilds.
    let mut restarts = Vec::new();
    let mut rss = Vec::new();
    for _ in 0..repeats {
        let (mut s, took) = Server::start(&data_dir).await?;
        let r = s.rss() - empty_rss;
        println!(
            "  restart with snapshot: {took:.2} s to SERVING ({}), RSS {} ({:.0} B/point): {}",
            s.recovery(),
            mib(r),
            r / set.n as f64,
            s.rss_parts().minus(empty_parts).show(set.n)
        );
        restarts.push(took);
        rss.push(r);
        s.stop().await?;
    }
    let mut rebuilt = Vec::new();
    for _ in 0..rebuilds {
        let snaps = data_dir.join("snapshots");
        let mut removed = 0;
        for e in std::fs::read_dir(&snaps)? {
            let e = e?;
            if e.path().extension().is_some_and(|x| x == "snap") {
                std::fs::remove_file(e.path())?;
                removed += 1;
            }
        }
        let (mut s, took) = Server::start(&data_dir).await?;
        println!(
            "  restart without snapshot ({removed} file(s) deleted): {took:.2} s to SERVING ({})",
            s.recovery()
        );
        rebuilt.push(took);
        s.stop().await?;
    }
    let (restart, rebuild) = (median(&restarts), median(&rebuilt));
    println!(
        "  restart: with snapshot {}, rebuild {}: {:.3}x a rebuild (target <= 0.1x)",
        spread(&restarts, secs),
        spread(&rebuilt, secs),
        restart / rebuild
    );
    if !hl_loads.is_empty() {
        let bound = 3.0 * median(&hl_loads) + 2.0;
        println!(
            "  restart vs hnswlib: {} against 3 x load_index + 2 s = {bound:.2} s: {}",
            secs(restart),
            if restart <= bound { "met" } else { "NOT met" }
        );
    }
    let per_point = median(&rss) / set.n as f64;
    print!(
        "  server RSS after a restart: {} over an empty server ({per_point:.0} B/point)",
        spread(&rss, mib)
    );
    if !hl_rss.is_empty() {
        let h = median(&hl_rss);
        print!(
            "; hnswlib's loaded index {} ({:.0} B/point): {:.2}x (target <= 1.2x)",
            mib(h),
            h / set.n as f64,
            median(&rss) / h
        );
        out["rss_ratio_vs_hnswlib"] = json!(median(&rss) / h);
    }
    println!();
    out["restart_s"] = json!(restarts);
    out["rebuild_s"] = json!(rebuilt);
    out["rss_after_restart"] = json!(rss);
    out["rss_per_point"] = json!(per_point);

    // 4. 64 writers, then 5. deletes, on one more server start.
    let (server, _) = Server::start(&data_dir).await?;
    let mut c = server.client().await?;
    let first_id = FIRST_WRITER_ID;
    let WriterRun {
        per_s: acks,
        later_per_s,
        p50,
        p99,
        errors,
        acked,
    } = writers(
        &[server.addr],
        INDEX,
        WRITERS,
        &mixture,
        first_id,
        write_secs,
    )
    .await?;
    println!(
        "  {WRITERS} writers x 1 point for {write_secs} s: {acks:.0} acknowledged upserts/s ({later_per_s:.0}/s in the second half), p50 {p50:.1} ms, p99 {p99:.1} ms, {errors} errors (issue 20 before: 1,001/s, p99 146 ms; targets >= 5,005/s, p99 <= 100 ms)"
    );
    // Once linked, are the writers' points found by their own vector (issue 20's 100 %)?
    wait_linked(&mut c, INDEX).await?;
    let (found, searched) = found_first(
        &mut c,
        INDEX,
        &mixture,
        first_id,
        &acked,
        FOUND_SAMPLE,
        &FOUND_EFS,
    )
    .await?;
    println!(
        "  the writers' points searched by their own vector (k 1): found first {} of {searched} (target: all)",
        found_at(&found)
    );
    out["writers"] = json!({"acks_per_s": acks, "later_half_acks_per_s": later_per_s, "p50_ms": p50, "p99_ms": p99, "errors": errors,
        "found_first": found, "found_first_efs": FOUND_EFS, "searched": searched});

    out["delete"] = deletes(&mut c, set, &base, &queries, &acked).await?;
    drop(c);
    server.stop().await?;
    Ok(out)
}

/// Step 5: DeletePoints of 90 % of the points (and of `acked`, the writers'): search p50
/// right after, the seconds until compaction finished, p50 then and p50 of a fresh index of
/// the live points (imported into the same server).
async fn deletes(
    c: &mut Client,
    set: &Set,
    base: &[Vec<f32>],
    queries: &[Vec<f32>],
    acked: &[u64],
) -> BoxResult<Value> {
    let before = index_info(c, INDEX)
        .await?
        .compaction
        .map(|c| c.compactions)
        .unwrap_or(0);
    let live: Vec<u64> = (0..set.n as u64).filter(|id| id % 10 == 0).collect();
    let mut gone: Vec<u64> = (0..set.n as u64).filter(|id| id % 10 != 0).collect();
    gone.extend(acked);
    let t = Instant::now();
    for chunk in gone.chunks(50_000) {
        c.delete_points(pb::DeletePointsRequest {
            index_name: INDEX.into(),
            ids: chunk.to_vec(),
            ..Default::default()
        })
        .await?;
    }
    let deleted_at = Instant::now();
    println!(
        "  deleted {} of {} points in {:.1} s",
        gone.len(),
        set.n + acked.len(),
        t.elapsed().as_secs_f64()
    );
    let live_truth = exact(set.metric, base, &live, queries);
    let (during, _) = unary_p50(c, INDEX, queries).await?;
    // Compaction done: none running, more than before, and the deleted share back under 0.2.
    let mut done = None;
    while deleted_at.elapsed() < Duration::from_secs(1800) {
        let i = index_info(c, INDEX).await?;
        let comp = i.compaction.unwrap_or_default();
        if !comp.running && comp.compactions > before && i.deleted_fraction < 0.2 {
            done = Some(deleted_at.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (after, found_after) = unary_p50(c, INDEX, queries).await?;
    create(c, "fresh", set).await?;
    import(c, "fresh", base, &live).await?;
    wait_linked(c, "fresh").await?;
    let (fresh, found_fresh) = unary_p50(c, "fresh", queries).await?;
    println!(
        "  search p50 at ef {P50_EF} after deleting 90%: {during:.0} us right after (compaction running), {after:.0} us once compacted ({} after the last delete), fresh index of the live 10%: {fresh:.0} us; compacted/fresh {:.2}x (target <= 1.5x within 60 s); recall@10 {:.3} vs fresh {:.3}",
        done.map(secs).unwrap_or_else(|| "compaction NOT finished within 30 min".into()),
        after / fresh,
        recall(&found_after, &live_truth),
        recall(&found_fresh, &live_truth)
    );
    Ok(
        json!({"p50_during_us": during, "p50_after_us": after, "p50_fresh_us": fresh,
        "compaction_s": done, "ratio": after / fresh}),
    )
}

/// `VECTORD_SCALE_ONLY=writers`: step 4 alone, alternating the binaries of `VECTORD_SCALE_BINS`.
async fn writers_only(set: &Set, write_secs: u64) -> BoxResult<()> {
    let bins: Vec<PathBuf> = match std::env::var("VECTORD_SCALE_BINS") {
        Ok(v) if !v.trim().is_empty() => v.split(':').map(PathBuf::from).collect(),
        _ => vec![PathBuf::from(env!("CARGO_BIN_EXE_vectord"))],
    };
    let rounds = env_usize("VECTORD_SCALE_ROUNDS", 3).max(1);
    let mixture = Mixture::new(set.dim, 7);
    let base = mixture.samples(11, set.n);
    let queries = mixture.samples(13, 200);
    let all: Vec<u64> = (0..set.n as u64).collect();
    let ef_construction = env_usize("VECTORD_SCALE_EF_CONSTRUCTION", EF_CONSTRUCTION as usize);
    let config = (ef_construction != EF_CONSTRUCTION as usize).then_some(pb::HnswConfig {
        m: M,
        ef_construction: ef_construction as u32,
        ef_search: P50_EF,
        seed: None,
    });
    println!(
        "\n== writers only: {} ({} x {}, ef_construction {ef_construction}), {rounds} rounds x {} binaries, {write_secs} s each ==",
        set.name,
        set.n,
        set.dim,
        bins.len()
    );
    // hnswlib's side: the base, and the writers' first points in the order they would arrive
    // (each writer's i-th point, writer after writer).
    let files = tempfile::tempdir()?;
    let (base_file, inserts_file) = (
        files.path().join("base.fvecs"),
        files.path().join("inserts.fvecs"),
    );
    let per_writer: Vec<Vec<Vec<f32>>> = (0..WRITERS)
        .map(|t| writer_points(&mixture, t, HNSWLIB_INSERTS.div_ceil(WRITERS as usize)))
        .collect();
    let inserts: Vec<Vec<f32>> = (0..HNSWLIB_INSERTS)
        .map(|i| per_writer[i % WRITERS as usize][i / WRITERS as usize].clone())
        .collect();
    write_vecs(&base_file, &base, f32::to_le_bytes)?;
    write_vecs(&inserts_file, &inserts, f32::to_le_bytes)?;
    let hnswlib_inserts = || {
        let p = |p: &Path| p.display().to_string();
        hnswlib(&[
            "--base".into(),
            p(&base_file),
            "--inserts".into(),
            p(&inserts_file),
            "--space".into(),
            "l2".into(),
            "--m".into(),
            M.to_string(),
            "--ef-construction".into(),
            ef_construction.to_string(),
            "--ef".into(),
            FOUND_EF.to_string(),
        ])
        .and_then(|v| {
            let found = v["found_first"].as_f64();
            v["insert_per_s"]
                .as_f64()
                .zip(v["build_per_s"].as_f64())
                .map(|(i, b)| (i, b, found))
        })
    };
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); bins.len()];
    // hnswlib's inserts/s per round (None where it could not run).
    let mut reference: Vec<Option<f64>> = Vec::new();
    for round in 0..rounds {
        let measured = hnswlib_inserts();
        if let Some((inserts, build, found)) = measured {
            let found = found
                .map(|f| {
                    format!(
                        "; {:.1} % of them found first by their own vector at ef {FOUND_EF}",
                        f * 100.0
                    )
                })
                .unwrap_or_default();
            println!(
                "  round {round} hnswlib: {HNSWLIB_INSERTS} inserts into its build, {inserts:.0} points/s (64 a call, 2 threads; its build {build:.0} points/s){found}"
            );
        }
        reference.push(measured.map(|(inserts, _, _)| inserts));
        for (b, bin) in bins.iter().enumerate() {
            let tmp = tempfile::tempdir()?;
            let (server, _) = Server::start_program(bin, &tmp.path().join("data")).await?;
            let mut c = server.client().await?;
            create_with(&mut c, INDEX, set, config).await?;
            import(&mut c, INDEX, &base, &all).await?;
            // The writers start on a graph with every imported point linked.
            wait_linked(&mut c, INDEX).await?;
            let WriterRun {
                per_s: acks,
                later_per_s,
                p50,
                p99,
                errors,
                acked,
            } = writers(
                &[server.addr],
                INDEX,
                WRITERS,
                &mixture,
                FIRST_WRITER_ID,
                write_secs,
            )
            .await?;
            // Search p50 right after the writers (with the points not yet linked), then once
            // the graph has every point.
            let index = index_info(&mut c, INDEX).await?;
            let (search_during, _) = unary_p50(&mut c, INDEX, &queries).await?;
            let drained = wait_linked(&mut c, INDEX).await?;
            let (search_after, _) = unary_p50(&mut c, INDEX, &queries).await?;
            // The same sample of the writers' points, each time.
            let sample = async |c: &mut Client| {
                found_first(
                    c,
                    INDEX,
                    &mixture,
                    FIRST_WRITER_ID,
                    &acked,
                    FOUND_SAMPLE,
                    &FOUND_EFS,
                )
                .await
            };
            let (found, searched) = sample(&mut c).await?;
            // Once the findability check caught up (servers that have one), again.
            let checked = match wait_checked(&mut c, INDEX).await? {
                Some((secs, check)) => {
                    let (found, _) = sample(&mut c).await?;
                    let (search_checked, _) = unary_p50(&mut c, INDEX, &queries).await?;
                    format!(
                        "; the findability check caught up {secs:.1} s later ({} passes, {} points linked), then found first {}, search p50 {search_checked:.0} us",
                        check.passes,
                        check.points_linked,
                        found_at(&found)
                    )
                }
                None => String::new(),
            };
            println!(
                "  round {round} {}: {acks:.0} acknowledged upserts/s ({later_per_s:.0}/s in the second half), p50 {p50:.1} ms, p99 {p99:.1} ms, {errors} errors, {} acknowledged, {} points; {} not yet linked at the end (linked {drained:.1} s later); search p50 at ef {P50_EF} {search_during:.0} us then, {search_after:.0} us once linked; of {searched} of the writers' points, found first by their own vector {}{checked}",
                bin.display(),
                acked.len(),
                index.point_count,
                index.unindexed_count,
                found_at(&found)
            );
            runs[b].push((acks, p50, p99, later_per_s));
            drop(c);
            server.stop().await?;
        }
    }
    let measured: Vec<f64> = reference.iter().flatten().copied().collect();
    if !measured.is_empty() {
        println!(
            "  hnswlib inserts: {} points/s",
            spread(&measured, |v| format!("{v:.0}"))
        );
    }
    for (bin, r) in bins.iter().zip(&runs) {
        let col = |f: fn(&Run) -> f64| r.iter().map(f).collect::<Vec<_>>();
        // Each round's acknowledged rate over hnswlib's insert rate of the same round.
        let of_hnswlib: Vec<f64> = r
            .iter()
            .zip(&reference)
            .filter_map(|(x, h)| h.map(|h| x.0 / h))
            .collect();
        let against = if of_hnswlib.is_empty() {
            String::new()
        } else {
            format!(
                "; acks/s / hnswlib's inserts/s {}",
                spread(&of_hnswlib, |v| format!("{v:.2}x"))
            )
        };
        println!(
            "  {}: acks/s {} (second half {}), p50 {}, p99 {}{against}",
            bin.display(),
            spread(&col(|x| x.0), |v| format!("{v:.0}")),
            spread(&col(|x| x.3), |v| format!("{v:.0}")),
            spread(&col(|x| x.1), |v| format!("{v:.1} ms")),
            spread(&col(|x| x.2), |v| format!("{v:.1} ms"))
        );
    }
    // Each later binary against the first, the baseline of the same run: the ratio of the
    // medians, and each round's ratio (the binaries ran back to back in a round).
    let acks = |r: &[Run]| median(&r.iter().map(|x| x.0).collect::<Vec<_>>());
    let later = |r: &[Run]| median(&r.iter().map(|x| x.3).collect::<Vec<_>>());
    if let Some((first, base)) = bins.first().zip(runs.first()) {
        for (bin, r) in bins.iter().zip(&runs).skip(1) {
            let per_round: Vec<f64> = r.iter().zip(base).map(|(x, b)| x.0 / b.0).collect();
            println!(
                "  {} / {}: acks/s {:.2}x by the medians, {:.2}x in the second half; per round {}",
                bin.display(),
                first.display(),
                acks(r) / acks(base),
                later(r) / later(base),
                spread(&per_round, |v| format!("{v:.2}x"))
            );
        }
    }
    Ok(())
}

/// One binary's round of `writers_only`: acknowledged/s, p50 ms, p99 ms, acknowledged/s in the
/// window's second half.
type Run = (f64, f64, f64, f64);

/// "a at ef 64, b at ef 200" for [`found_first`]'s counts at [`FOUND_EFS`].
fn found_at(found: &[usize]) -> String {
    found
        .iter()
        .zip(FOUND_EFS)
        .map(|(n, ef)| format!("{n} at ef {ef}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `VECTORD_SCALE_PHASES=restart`: restarts with the snapshot and forced rebuilds,
/// alternating, then a restart after a SIGKILL right after an import of 20% more points.
async fn restarts_only(
    set: &Set,
    data_dir: &Path,
    mixture: &Mixture,
    pairs: usize,
    mut out: Value,
) -> BoxResult<Value> {
    let (mut restarts, mut rebuilt) = (Vec::new(), Vec::new());
    for _ in 0..pairs {
        let (mut s, took) = Server::start(data_dir).await?;
        println!(
            "  restart with snapshot: {took:.2} s to SERVING ({})",
            s.recovery()
        );
        restarts.push(took);
        s.stop().await?;
        let mut removed = 0;
        for e in std::fs::read_dir(data_dir.join("snapshots"))? {
            let e = e?;
            if e.path().extension().is_some_and(|x| x == "snap") {
                std::fs::remove_file(e.path())?;
                removed += 1;
            }
        }
        let (mut s, took) = Server::start(data_dir).await?;
        println!(
            "  restart without snapshot ({removed} file(s) deleted): {took:.2} s to SERVING ({})",
            s.recovery()
        );
        rebuilt.push(took);
        s.stop().await?;
    }
    let (restart, rebuild) = (median(&restarts), median(&rebuilt));
    println!(
        "  restart: with snapshot {}, rebuild {}: {:.3}x a rebuild (target <= 0.1x)",
        spread(&restarts, secs),
        spread(&rebuilt, secs),
        restart / rebuild
    );
    // A crash right after an import: the start replays it (in batches, on every core).
    let extra = set.n / 5;
    let more = mixture.samples(17, extra);
    let ids: Vec<u64> = (set.n as u64..(set.n + extra) as u64).collect();
    let mut base = vec![Vec::new(); set.n];
    base.extend(more);
    let (mut s, _) = Server::start(data_dir).await?;
    let mut c = s.client().await?;
    let r = c
        .import_points(tokio_stream::iter(import_batches(INDEX, &base, &ids)))
        .await?
        .into_inner();
    s.proc.signal("KILL");
    s.proc.wait_exit().await;
    let (mut s, took) = Server::start(data_dir).await?;
    println!(
        "  restart after SIGKILL right after importing {} more points (to {}): {took:.2} s to SERVING ({}): {:.3}x a rebuild",
        r.upserted_count,
        r.point_count,
        s.recovery(),
        took / rebuild
    );
    s.stop().await?;
    out["restart_s"] = json!(restarts);
    out["rebuild_s"] = json!(rebuilt);
    out["restart_after_kill_s"] = json!(took);
    Ok(out)
}

/// One restart of the memory phase: memory after SERVING, after the searches, QPS at recall
/// 0.95 and its ef.
type Round = (Rss, Rss, f64, u32);

/// `VECTORD_SCALE_PHASES=memory`: after the import and a graceful stop, `VECTORD_SCALE_REPEATS`
/// rounds of a restart with `--map-float-vectors true` and one with `false` (alternating which
/// goes first): the server's resident memory after SERVING (VmRSS, RssAnon, RssFile, less an
/// empty server's, and where it is by smaps), SearchBatch QPS at the first ef of the sweep
/// reaching recall@10 0.95, and the memory after those searches; then hnswlib's build, its QPS
/// at 0.95 and the resident growth of its loaded index.
async fn memory_only(
    set: &Set,
    data_dir: &Path,
    queries: &[Vec<f32>],
    truth: &[Vec<u64>],
    (space, bf, qf, tf, hf): (&str, PathBuf, PathBuf, PathBuf, PathBuf),
    rounds: usize,
    mut out: Value,
) -> BoxResult<Value> {
    let program: &Path = env!("CARGO_BIN_EXE_vectord").as_ref();
    let empty_dir = tempfile::tempdir()?;
    let (empty, _) = Server::start(empty_dir.path()).await?;
    let base_rss = empty.rss_parts();
    empty.stop().await?;
    println!(
        "  an empty server: VmRSS {}, anon {}, file {}",
        mib(base_rss.total),
        mib(base_rss.anon),
        mib(base_rss.file)
    );
    let modes = ["true", "false"];
    // Per mode: after SERVING, after the searches, QPS at 0.95, its ef.
    let mut seen: Vec<Vec<Round>> = vec![Vec::new(); modes.len()];
    for round in 0..rounds {
        for i in 0..modes.len() {
            let m = if round % 2 == 0 {
                i
            } else {
                modes.len() - 1 - i
            };
            let (mut s, took) =
                Server::start_with(program, data_dir, &["--map-float-vectors", modes[m]]).await?;
            let start = s.rss_parts().minus(base_rss);
            println!(
                "  round {} --map-float-vectors {}: SERVING in {took:.2} s ({}); {}",
                round + 1,
                modes[m],
                s.recovery(),
                start.show(set.n)
            );
            if round == 0 {
                for (what, b) in smaps_breakdown(s.proc.pid) {
                    if b >= 1024.0 * 1024.0 {
                        println!("      {what}: {} ({:.0} B/point)", mib(b), b / set.n as f64);
                    }
                }
            }
            let mut c = s.client().await?;
            let mut at = None;
            for ef in EF_SWEEP {
                let (qps, found) = batch(&mut c, INDEX, queries, ef, 3).await?;
                let r = recall(&found, truth);
                if r >= 0.95 {
                    at = Some((ef, r, qps));
                    break;
                }
            }
            let after = s.rss_parts().minus(base_rss);
            let (ef, r, qps) = at.unwrap_or((0, f64::NAN, f64::NAN));
            println!(
                "      SearchBatch QPS at recall 0.95: {qps:.0} (ef {ef}, {r:.3}); after the searches: {}",
                after.show(set.n)
            );
            seen[m].push((start, after, qps, ef));
            drop(c);
            s.stop().await?;
        }
    }
    let p = |p: &PathBuf| p.display().to_string();
    let built = hnswlib_build(&bf, &qf, &tf, space, &hf);
    let (mut hl_rss, mut hl_qps) = (Vec::new(), f64::NAN);
    if let Some(b) = &built {
        let rows: Vec<(u32, f64, f64)> = b["rows"]
            .as_array()
            .map(|rs| {
                rs.iter()
                    .map(|r| {
                        (
                            r["ef_search"].as_u64().unwrap_or(0) as u32,
                            r["recall_at_10"].as_f64().unwrap_or(0.0),
                            r["all_core_batch_qps"].as_f64().unwrap_or(0.0),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        if let Some(h) = at_095(&rows) {
            hl_qps = h.2;
            println!(
                "  hnswlib {}: QPS at recall 0.95 {:.0} (ef {}, {:.3})",
                b["version"].as_str().unwrap_or("?"),
                h.2,
                h.0,
                h.1
            );
        }
        for _ in 0..rounds {
            if let Some(l) = hnswlib(&[
                "--load".into(),
                p(&hf),
                "--space".into(),
                space.into(),
                "--dim".into(),
                set.dim.to_string(),
            ]) {
                hl_rss.push(l["rss_delta_bytes"].as_f64().unwrap_or(f64::NAN));
            }
        }
        println!(
            "  hnswlib's loaded index: resident growth {} ({:.0} B/point)",
            spread(&hl_rss, mib),
            median(&hl_rss) / set.n as f64
        );
    }
    let h = median(&hl_rss);
    let mut summary = Vec::new();
    for (m, rows) in seen.iter().enumerate() {
        let col = |f: &dyn Fn(&Round) -> f64| -> Vec<f64> { rows.iter().map(f).collect() };
        let (total, anon, file) = (col(&|r| r.0.total), col(&|r| r.0.anon), col(&|r| r.0.file));
        let (after_total, after_anon, qps) =
            (col(&|r| r.1.total), col(&|r| r.1.anon), col(&|r| r.2));
        println!(
            "  --map-float-vectors {} ({} rounds), after a restart: VmRSS {} = {:.0} B/point ({:.2}x hnswlib), anon {} = {:.0} B/point ({:.2}x), file {}; after the searches VmRSS {} ({:.2}x), anon {} ({:.2}x); QPS at 0.95 {} ({:.2}x hnswlib's)",
            modes[m],
            rows.len(),
            spread(&total, mib),
            median(&total) / set.n as f64,
            median(&total) / h,
            spread(&anon, mib),
            median(&anon) / set.n as f64,
            median(&anon) / h,
            spread(&file, mib),
            spread(&after_total, mib),
            median(&after_total) / h,
            spread(&after_anon, mib),
            median(&after_anon) / h,
            spread(&qps, |q| format!("{q:.0}")),
            median(&qps) / hl_qps
        );
        summary.push(json!({"map_float_vectors": modes[m], "rss": total, "anon": anon, "file": file,
            "rss_after_searches": after_total, "anon_after_searches": after_anon, "qps_at_095": qps}));
    }
    out["memory"] = json!({"modes": summary, "hnswlib_rss": hl_rss, "hnswlib_qps_at_095": hl_qps,
        "empty_server": {"rss": base_rss.total, "anon": base_rss.anon, "file": base_rss.file}});
    Ok(out)
}

#[tokio::main]
async fn main() -> BoxResult<()> {
    let sizes: Vec<usize> = std::env::var("VECTORD_SCALE_SIZES")
        .unwrap_or_else(|_| "100000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let repeats = env_usize("VECTORD_SCALE_REPEATS", 3).max(1);
    let rebuilds = env_usize("VECTORD_SCALE_REBUILDS", 1).max(1);
    let write_secs = env_usize("VECTORD_SCALE_WRITE_SECS", 20) as u64;
    println!(
        "machine: {}, {} cores, load average {}; {}",
        machine::cpu_model(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        machine::load_average().unwrap_or_else(|| "?".into()),
        std::process::Command::new("date")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    );
    let mut sets: Vec<Set> = sizes
        .iter()
        .map(|&n| Set {
            name: format!("l2-{n}"),
            n,
            dim: 128,
            metric: Metric::L2,
        })
        .collect();
    if std::env::var("VECTORD_SCALE_COSINE").as_deref() == Ok("1") {
        sets.push(Set {
            name: "cosine-100000".into(),
            n: 100_000,
            dim: 384,
            metric: Metric::Cosine,
        });
    }
    if std::env::var("VECTORD_SCALE_ONLY").as_deref() == Ok("writers") {
        for set in &sets {
            writers_only(set, write_secs).await?;
        }
        return Ok(());
    }
    let mut results = Vec::new();
    for set in &sets {
        results.push(run_set(set, repeats, rebuilds, write_secs).await?);
    }
    let l2: Vec<&Value> = results.iter().filter(|r| r["dimension"] == 128).collect();
    if l2.len() > 1 {
        let (a, b) = (l2[0], l2[l2.len() - 1]);
        let grow = |path: &[&str], what: &str| {
            let get = |v: &Value| path.iter().fold(v, |v, k| &v[*k]).clone();
            let as_f = |v: Value| match v {
                Value::Array(xs) => {
                    median(&xs.iter().filter_map(|x| x.as_f64()).collect::<Vec<_>>())
                }
                v => v.as_f64().unwrap_or(f64::NAN),
            };
            let (x, y) = (as_f(get(a)), as_f(get(b)));
            println!("  {what}: {x:.4} -> {y:.4} ({:.2}x)", y / x);
        };
        println!(
            "\ngrowth from {} to {} points ({:.1}x the points):",
            a["points"],
            b["points"],
            b["points"].as_f64().unwrap_or(0.0) / a["points"].as_f64().unwrap_or(1.0)
        );
        grow(&["import_points_per_s"], "import points/s");
        grow(&["restart_s"], "restart with snapshot, s");
        grow(&["rebuild_s"], "restart by rebuild, s");
        grow(&["rss_per_point"], "server RSS bytes/point");
        grow(&["rss_ratio_vs_hnswlib"], "RSS / hnswlib");
        grow(&["qps_at_095"], "QPS at recall 0.95");
        grow(&["writers", "acks_per_s"], "64 writers acks/s");
        grow(&["writers", "p99_ms"], "64 writers p99 ms");
        grow(&["delete", "ratio"], "p50 after 90% deleted / fresh");
        grow(&["delete", "compaction_s"], "compaction seconds");
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-scale.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&json!({"sets": results}))?)?;
    println!("results: {}", path.display());
    Ok(())
}

/// Waits until the index's graph has linked every written point (GetIndex's
/// `unindexed_count` is 0): the seconds it took.
async fn wait_linked(c: &mut Client, name: &str) -> BoxResult<f64> {
    let started = Instant::now();
    loop {
        if index_info(c, name).await?.unindexed_count == 0 {
            return Ok(started.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the findability check of `name` has caught up (a pass done, none running, no
/// point unchecked): the seconds it took and its counters; None at once for a server without
/// the check (a build before it).
async fn wait_checked(
    c: &mut Client,
    name: &str,
) -> BoxResult<Option<(f64, pb::FindabilityCheck)>> {
    let started = Instant::now();
    loop {
        let Some(check) = index_info(c, name).await?.findability_check else {
            return Ok(None);
        };
        if check.passes >= 1 && !check.running && check.unchecked_points == 0 {
            return Ok(Some((started.elapsed().as_secs_f64(), check)));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `VECTORD_SCALE_PHASES=qps`: the QPS sweep right after the import (while the findability
/// check's pass over the imported graph may run), then again once the check has caught up,
/// alternating `VECTORD_SCALE_ROUNDS` (default 3) times; medians per ef.
async fn qps_and_check(
    c: &mut Client,
    queries: &[Vec<f32>],
    truth: &[Vec<u64>],
) -> BoxResult<serde_json::Value> {
    let rounds: usize = std::env::var("VECTORD_SCALE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let sweep = |c: &mut Client, label: &'static str| {
        let mut c = c.clone();
        async move {
            let mut rows = Vec::new();
            for ef in EF_SWEEP {
                let (qps, found) = batch(&mut c, INDEX, queries, ef, 3).await?;
                let r = recall(&found, truth);
                let check = index_info(&mut c, INDEX).await?.findability_check;
                let running = check.is_some_and(|k| k.running || k.unchecked_points > 0);
                println!(
                    "  {label}: ef {ef:>3}: recall@10 {r:.3}, SearchBatch QPS {qps:.0}{}",
                    if running { " (check running)" } else { "" }
                );
                rows.push((ef, r, qps));
                if r >= 0.99 {
                    break;
                }
            }
            BoxResult::Ok(rows)
        }
    };
    let mut during = vec![sweep(c, "right after the import").await?];
    let checked = wait_checked(c, INDEX).await?;
    if let Some((secs, check)) = &checked {
        println!(
            "  the check caught up {secs:.1} s after that sweep: {} passes, {} points linked",
            check.passes, check.points_linked
        );
    }
    let mut after = Vec::new();
    for _ in 0..rounds {
        after.push(sweep(c, "check caught up").await?);
    }
    during.truncate(1);
    let med = |runs: &[Vec<(u32, f64, f64)>], i: usize| {
        let mut v: Vec<f64> = runs.iter().filter_map(|r| r.get(i).map(|x| x.2)).collect();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => 0.0,
            n if n % 2 == 0 => (v[n / 2 - 1] + v[n / 2]) / 2.0,
            n => v[n / 2],
        }
    };
    for (i, (ef, _, _)) in during[0].iter().enumerate() {
        let (d, a) = (med(&during, i), med(&after, i));
        println!(
            "  ef {ef:>3}: right after the import {d:.0} QPS, once checked (median of {rounds}) \
             {a:.0}: {:.2}x",
            d / a
        );
    }
    Ok(json!({ "right_after_import": during, "checked": after }))
}

/// Waits until a snapshot file under `data_dir` was written after `since` and none is being
/// written (no temp file); the seconds waited, or None after 90 s.
async fn wait_snapshot_written(data_dir: &Path, since: std::time::SystemTime) -> Option<f64> {
    let started = Instant::now();
    let dir = data_dir.join("snapshots");
    while started.elapsed() < Duration::from_secs(90) {
        let (mut fresh, mut writing) = (false, false);
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            writing |= name.ends_with(".tmp");
            let modified = e.metadata().and_then(|m| m.modified()).ok();
            fresh |= name.ends_with(".snap") && modified.is_some_and(|t| t >= since);
        }
        if fresh && !writing {
            return Some(started.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// GetIndex of `name`.
async fn index_info(c: &mut Client, name: &str) -> BoxResult<pb::Index> {
    Ok(c.get_index(pb::GetIndexRequest { name: name.into() })
        .await?
        .into_inner()
        .index
        .ok_or("no index")?)
}
