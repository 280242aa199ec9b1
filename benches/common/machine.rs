//! What the in-process benches (`search`, `perf`) share: the timing loop of a search sweep,
//! percentiles, and what they report about the machine.
#![allow(dead_code)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use rayon::prelude::*;

/// A search timed one query at a time on this thread, then as a batch on every core.
pub struct Timing {
    /// Per-query latencies of the single-thread passes, sorted.
    pub latencies: Vec<Duration>,
    pub single_qps: f64,
    /// As the server's SearchBatch: one rayon task per query on the global pool.
    pub batch_qps: f64,
}

/// `passes` single-thread passes over `queries`, then `passes` all-core passes.
pub fn time_searches<R: Send>(
    queries: &[Vec<f32>],
    passes: usize,
    search: impl Fn(&[f32]) -> R + Sync,
) -> Timing {
    let mut latencies = Vec::with_capacity(queries.len() * passes);
    let started = Instant::now();
    for _ in 0..passes {
        for q in queries {
            let t = Instant::now();
            black_box(search(q));
            latencies.push(t.elapsed());
        }
    }
    let single_qps = latencies.len() as f64 / started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let started = Instant::now();
    for _ in 0..passes {
        let hits: Vec<R> = queries.par_iter().map(|q| search(q)).collect();
        black_box(hits);
    }
    let batch_qps = (queries.len() * passes) as f64 / started.elapsed().as_secs_f64();
    Timing {
        latencies,
        single_qps,
        batch_qps,
    }
}

/// Nearest-rank percentile of sorted durations (zero for none).
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

pub fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// The resident set size of this process, from /proc (Linux only).
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The 1, 5 and 15-minute load averages (Linux only).
pub fn load_average() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let fields: Vec<&str> = text.split_whitespace().take(3).collect();
    (fields.len() == 3).then(|| fields.join(" "))
}

pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string())
}
