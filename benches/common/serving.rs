//! What the benches that drive real `vectord serve` processes over gRPC share (`scale`,
//! `cluster`): seeded Gaussian-mixture data with exact ground truth, a server process, import,
//! SearchBatch sweeps, unary p50, concurrent writers, medians and spreads. Each bench uses a
//! part of it, hence `allow(dead_code)`.
#![allow(dead_code)]

use std::error::Error;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use tonic::transport::Channel;
use vectord::pb;
use vectord::pb::index_service_client::IndexServiceClient;

use super::child;

pub type BoxResult<T> = Result<T, Box<dyn Error>>;
pub type Client = IndexServiceClient<Channel>;

pub const K: usize = 10;
/// The ef_search values swept for recall (to 512: at 1M × 128 hnswlib needs more than 256 for 0.95).
pub const EF_SWEEP: [u32; 10] = [16, 24, 32, 48, 64, 96, 128, 256, 384, 512];
pub const P50_EF: u32 = 64;
/// Longest a start may take before the bench gives up (a rebuild of 1M points is minutes).
pub const START_LIMIT: Duration = Duration::from_secs(3600);

pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

#[derive(Clone, Copy, PartialEq)]
pub enum Metric {
    L2,
    Cosine,
}

pub struct Set {
    pub name: String,
    pub n: usize,
    pub dim: usize,
    pub metric: Metric,
}

/// A standard normal sample (Box-Muller).
pub fn normal(rng: &mut rand_chacha::ChaCha8Rng) -> f32 {
    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
    let u2: f64 = rng.gen();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// A seeded mixture of 64 Gaussians: centres N(0, 1) per coordinate, spread 0.35.
pub struct Mixture {
    pub centres: Vec<Vec<f32>>,
}

impl Mixture {
    pub fn new(dim: usize, seed: u64) -> Self {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        Mixture {
            centres: (0..64)
                .map(|_| (0..dim).map(|_| normal(&mut rng)).collect())
                .collect(),
        }
    }

    pub fn sample(&self, rng: &mut rand_chacha::ChaCha8Rng) -> Vec<f32> {
        let c = &self.centres[rng.gen_range(0..self.centres.len())];
        c.iter().map(|x| x + 0.35 * normal(rng)).collect()
    }

    pub fn samples(&self, seed: u64, n: usize) -> Vec<Vec<f32>> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| self.sample(&mut rng)).collect()
    }
}

pub fn distance(metric: Metric, a: &[f32], b: &[f32]) -> f32 {
    match metric {
        Metric::L2 => a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum(),
        Metric::Cosine => {
            let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
            1.0 - a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>() / (n(a) * n(b))
        }
    }
}

/// Exact top-k ids among `live` (ids into `base`) for each query.
pub fn exact(
    metric: Metric,
    base: &[Vec<f32>],
    live: &[u64],
    queries: &[Vec<f32>],
) -> Vec<Vec<u64>> {
    queries
        .par_iter()
        .map(|q| {
            let mut d: Vec<(f32, u64)> = live
                .iter()
                .map(|&id| (distance(metric, q, &base[id as usize]), id))
                .collect();
            d.select_nth_unstable_by(K, |a, b| a.0.total_cmp(&b.0));
            d.truncate(K);
            d.sort_by(|a, b| a.0.total_cmp(&b.0));
            d.into_iter().map(|(_, id)| id).collect()
        })
        .collect()
}

pub fn recall(found: &[Vec<u64>], truth: &[Vec<u64>]) -> f64 {
    let hits: usize = found
        .iter()
        .zip(truth)
        .map(|(f, t)| f.iter().take(K).filter(|id| t.contains(id)).count())
        .sum();
    hits as f64 / (truth.len() * K) as f64
}

pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// "median (min–max, n runs)" of `v`, each formatted with `f`.
pub fn spread(v: &[f64], f: impl Fn(f64) -> String) -> String {
    if v.len() < 2 {
        return v.first().map(|&x| f(x)).unwrap_or_else(|| "-".into());
    }
    let min = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    format!("{} ({}–{}, {} runs)", f(median(v)), f(min), f(max), v.len())
}

pub fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((p / 100.0 * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// VmRSS of process `pid`, in bytes.
pub fn rss_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

pub fn mib(b: f64) -> String {
    format!("{:.0} MiB", b / (1024.0 * 1024.0))
}

pub fn secs(s: f64) -> String {
    format!("{s:.2} s")
}

pub struct Server {
    pub proc: child::Vectord,
    pub addr: SocketAddr,
}

impl Server {
    /// Starts `vectord serve` on `dir` and waits (up to [`START_LIMIT`]) until SERVING; returns
    /// it and the seconds from spawn to SERVING.
    pub async fn start(dir: &Path) -> BoxResult<(Server, f64)> {
        Self::start_program(env!("CARGO_BIN_EXE_vectord").as_ref(), dir).await
    }

    /// [`Server::start`] of the server binary `program`.
    pub async fn start_program(program: &Path, dir: &Path) -> BoxResult<(Server, f64)> {
        Self::start_with(program, dir, &[]).await
    }

    /// [`Server::start_program`] with `more` flags after `VECTORD_SCALE_SERVER_ARGS`.
    pub async fn start_with(program: &Path, dir: &Path, more: &[&str]) -> BoxResult<(Server, f64)> {
        let extra = std::env::var("VECTORD_SCALE_SERVER_ARGS").unwrap_or_default();
        let mut args = vec![
            "--addr",
            "127.0.0.1:0",
            "--data-dir",
            child::path_str(dir),
            "--log",
            "info",
        ];
        args.extend(extra.split_whitespace());
        args.extend(more);
        let started = Instant::now();
        let mut proc = child::Vectord::spawn_program(program, "vectord under bench", &args, &[]);
        let addr = proc.wait_listening().await;
        wait_serving(addr).await?;
        let took = started.elapsed().as_secs_f64();
        Ok((Server { proc, addr }, took))
    }

    pub async fn client(&self) -> BoxResult<Client> {
        let ch = Channel::from_shared(format!("http://{}", self.addr))?
            .connect()
            .await?;
        Ok(IndexServiceClient::new(ch)
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024))
    }

    pub fn rss(&self) -> f64 {
        rss_of(self.proc.pid).map(|b| b as f64).unwrap_or(f64::NAN)
    }

    pub async fn stop(mut self) -> BoxResult<()> {
        self.proc.signal("TERM");
        let status = self.proc.wait_exit().await;
        if !status.success() {
            return Err(format!("the server exited with {status}").into());
        }
        Ok(())
    }
}

/// Waits on health's Watch stream until SERVING (at most [`START_LIMIT`]).
pub async fn wait_serving(addr: SocketAddr) -> BoxResult<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    tokio::time::timeout(START_LIMIT, async {
        let ch = Channel::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        let mut stream = HealthClient::new(ch)
            .watch(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await?
            .into_inner();
        while let Some(m) = stream.message().await? {
            if m.status == ServingStatus::Serving as i32 {
                return Ok(());
            }
        }
        Err::<(), Box<dyn Error>>("health stream ended before SERVING".into())
    })
    .await?
}

pub async fn create(c: &mut Client, name: &str, set: &Set) -> BoxResult<()> {
    create_with(c, name, set, None).await
}

/// [`create`] with `config` as the index's default config (None: the server's).
pub async fn create_with(
    c: &mut Client,
    name: &str,
    set: &Set,
    config: Option<pb::HnswConfig>,
) -> BoxResult<()> {
    c.create_index(pb::CreateIndexRequest {
        name: name.into(),
        dimension: set.dim as u32,
        metric: match set.metric {
            Metric::L2 => pb::Metric::L2,
            Metric::Cosine => pb::Metric::Cosine,
        } as i32,
        default_config: config,
        ..Default::default()
    })
    .await?;
    Ok(())
}

/// The ImportPoints messages of `ids` of `base` into `name`, 1,000 points each.
pub fn import_batches(name: &str, base: &[Vec<f32>], ids: &[u64]) -> Vec<pb::ImportPointsRequest> {
    ids.chunks(1000)
        .enumerate()
        .map(|(b, chunk)| pb::ImportPointsRequest {
            index_name: if b == 0 { name.into() } else { String::new() },
            points: chunk
                .iter()
                .map(|&id| pb::Point {
                    id,
                    vector: base[id as usize].clone(),
                })
                .collect(),
            ..Default::default()
        })
        .collect()
}

/// Imports `ids` of `base` into `name`; returns the seconds taken.
pub async fn import(c: &mut Client, name: &str, base: &[Vec<f32>], ids: &[u64]) -> BoxResult<f64> {
    let batches = import_batches(name, base, ids);
    let started = Instant::now();
    let r = c
        .import_points(tokio_stream::iter(batches))
        .await?
        .into_inner();
    let took = started.elapsed().as_secs_f64();
    if r.point_count != ids.len() as u64 {
        return Err(format!("imported {} points, expected {}", r.point_count, ids.len()).into());
    }
    Ok(took)
}

/// A SearchBatch of `queries` for their top [`K`] at `ef`.
pub fn batch_request(name: &str, queries: &[Vec<f32>], ef: u32) -> pb::SearchBatchRequest {
    pb::SearchBatchRequest {
        index_name: name.into(),
        queries: queries
            .iter()
            .map(|q| pb::QueryVector { vector: q.clone() })
            .collect(),
        k: K as u32,
        ef_search: Some(ef),
        ..Default::default()
    }
}

/// SearchBatch of every query at `ef`, `passes` times: (QPS, the answers).
pub async fn batch(
    c: &mut Client,
    name: &str,
    queries: &[Vec<f32>],
    ef: u32,
    passes: usize,
) -> BoxResult<(f64, Vec<Vec<u64>>)> {
    let req = batch_request(name, queries, ef);
    let mut answers = Vec::new();
    let started = Instant::now();
    for _ in 0..passes {
        let r = c.search_batch(req.clone()).await?.into_inner();
        answers = r
            .results
            .iter()
            .map(|r| r.neighbors.iter().map(|h| h.id).collect())
            .collect();
    }
    let qps = (passes * queries.len()) as f64 / started.elapsed().as_secs_f64();
    Ok((qps, answers))
}

/// Unary Search of every query at ef 64, one at a time, twice: (p50 µs, the answers).
pub async fn unary_p50(
    c: &mut Client,
    name: &str,
    queries: &[Vec<f32>],
) -> BoxResult<(f64, Vec<Vec<u64>>)> {
    let mut lat = Vec::new();
    let mut answers = Vec::new();
    for pass in 0..2 {
        for q in queries {
            let t = Instant::now();
            let r = c
                .search(pb::SearchRequest {
                    index_name: name.into(),
                    vector: q.clone(),
                    k: K as u32,
                    ef_search: Some(P50_EF),
                    ..Default::default()
                })
                .await?
                .into_inner();
            lat.push(t.elapsed().as_secs_f64() * 1e6);
            if pass == 0 {
                answers.push(r.neighbors.iter().map(|h| h.id).collect());
            }
        }
    }
    lat.sort_by(f64::total_cmp);
    Ok((pct(&lat, 50.0), answers))
}

/// What [`writers`] measured.
pub struct WriterRun {
    /// Acknowledged upserts a second over the whole window.
    pub per_s: f64,
    /// Acknowledged upserts a second over the window's second half: by then the index's fresh
    /// segment (`--max-unindexed-points`) has filled, so this is the rate linking sustains
    /// (the whole window's also holds the burst the segment absorbed).
    pub later_per_s: f64,
    /// Latency percentiles of the acknowledged calls, in ms.
    pub p50: f64,
    pub p99: f64,
    pub errors: u64,
    /// The acknowledged ids.
    pub acked: Vec<u64>,
}

/// `count` writers (spread over `addrs` in turn), one new point per UpsertPoints, for `secs`.
pub async fn writers(
    addrs: &[SocketAddr],
    index: &str,
    count: u64,
    mixture: &Mixture,
    first_id: u64,
    secs: u64,
) -> BoxResult<WriterRun> {
    let mut channels = Vec::new();
    for addr in addrs {
        channels.push(
            Channel::from_shared(format!("http://{addr}"))?
                .connect()
                .await?,
        );
    }
    // Each writer's points, all drawn before the clock starts: drawing them (a core-second or
    // more) costs nothing in the timed window, and no writer starts before the last is ready.
    let drawn: Vec<Vec<Vec<f32>>> = (0..count)
        .map(|t| writer_points(mixture, t, WRITER_POINTS))
        .collect();
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let half = started + Duration::from_secs_f64(secs as f64 / 2.0);
    let mut tasks = Vec::new();
    for (t, vectors) in (0..count).zip(drawn) {
        let mut c = IndexServiceClient::new(channels[t as usize % channels.len()].clone());
        let index = index.to_string();
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut errors, mut acked) = (Vec::new(), 0u64, Vec::new());
            let mut later = 0u64;
            let mut i = 0usize;
            while Instant::now() < until {
                let id = first_id + t * WRITER_IDS + i as u64;
                let vector = vectors[i % vectors.len()].clone();
                i += 1;
                let t0 = Instant::now();
                match c
                    .upsert_points(pb::UpsertPointsRequest {
                        index_name: index.clone(),
                        points: vec![pb::Point { id, vector }],
                        ..Default::default()
                    })
                    .await
                {
                    Ok(_) => {
                        lat.push(t0.elapsed().as_secs_f64() * 1e3);
                        acked.push(id);
                        if Instant::now() >= half {
                            later += 1;
                        }
                    }
                    Err(_) => errors += 1,
                }
            }
            (lat, errors, acked, later)
        }));
    }
    let (mut lat, mut errors, mut acked, mut later) = (Vec::new(), 0, Vec::new(), 0);
    for t in tasks {
        let (l, e, a, h) = t.await?;
        lat.extend(l);
        errors += e;
        acked.extend(a);
        later += h;
    }
    let ended = Instant::now();
    let elapsed = (ended - started).as_secs_f64();
    lat.sort_by(f64::total_cmp);
    Ok(WriterRun {
        per_s: lat.len() as f64 / elapsed,
        later_per_s: later as f64 / (ended - half).as_secs_f64(),
        p50: pct(&lat, 50.0),
        p99: pct(&lat, 99.0),
        errors,
        acked,
    })
}

/// The first `n` points writer `t` of [`writers`] upserts, in order (it draws
/// [`WRITER_POINTS`], the `i`-th as id `first_id + t * WRITER_IDS + i`, cycling past the end;
/// a smaller `n` gives the start of the same sequence): drawn from `mixture`, like the data,
/// or with `VECTORD_SCALE_WRITER_POINTS=outliers` each coordinate N(0, 1), unlike it (as far
/// from every centre as the centres are from each other: issue 20's "random, unlike the base
/// data").
pub fn writer_points(mixture: &Mixture, t: u64, n: usize) -> Vec<Vec<f32>> {
    if std::env::var("VECTORD_SCALE_WRITER_POINTS").as_deref() == Ok("outliers") {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1_000 + t);
        let dim = mixture.centres.first().map_or(0, Vec::len);
        return (0..n)
            .map(|_| (0..dim).map(|_| normal(&mut rng)).collect())
            .collect();
    }
    mixture.samples(1_000 + t, n)
}

/// How many points each of [`writers`]' writers draws.
pub const WRITER_POINTS: usize = 4_000;

/// Ids apart between two of [`writers`]' writers.
pub const WRITER_IDS: u64 = 1_000_000;

/// Issue 20's "every stored point can be found": of `acked` (ids [`writers`] had acknowledged
/// with `first_id`), `sample` spread evenly are searched with their own vector (SearchBatch,
/// k 1, at each of `efs`): (how many came back first at each ef, how many were searched).
pub async fn found_first(
    c: &mut Client,
    index: &str,
    mixture: &Mixture,
    first_id: u64,
    acked: &[u64],
    sample: usize,
    efs: &[u32],
) -> BoxResult<(Vec<usize>, usize)> {
    // Only each writer's first pass over its points: past it, a vector comes again as another id.
    let first_pass: Vec<u64> = acked
        .iter()
        .copied()
        .filter(|&id| (id - first_id) % WRITER_IDS < WRITER_POINTS as u64)
        .collect();
    let step = first_pass.len().div_ceil(sample.max(1)).max(1);
    let ids: Vec<u64> = first_pass.into_iter().step_by(step).collect();
    let mut drawn = std::collections::HashMap::new();
    let mut queries = Vec::with_capacity(ids.len());
    for &id in &ids {
        let (t, i) = ((id - first_id) / WRITER_IDS, (id - first_id) % WRITER_IDS);
        let points = drawn
            .entry(t)
            .or_insert_with(|| writer_points(mixture, t, WRITER_POINTS));
        queries.push(points[i as usize].clone());
    }
    let mut found = vec![0; efs.len()];
    for (n, &ef) in found.iter_mut().zip(efs) {
        for (ids, queries) in ids.chunks(500).zip(queries.chunks(500)) {
            let mut req = batch_request(index, queries, ef);
            req.k = 1;
            let r = c.search_batch(req).await?.into_inner();
            *n += r
                .results
                .iter()
                .zip(ids)
                .filter(|(r, &id)| r.neighbors.first().map(|h| h.id) == Some(id))
                .count();
        }
    }
    Ok((found, ids.len()))
}

/// The first ef of `rows` (ef, recall, QPS) reaching recall 0.95: (ef, recall, QPS).
pub fn at_095(rows: &[(u32, f64, f64)]) -> Option<(u32, f64, f64)> {
    rows.iter().find(|r| r.1 >= 0.95).copied()
}
