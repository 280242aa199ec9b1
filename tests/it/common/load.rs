//! A bounded load run shared by `cargo bench --bench load` (60 s, figures for the README) and
//! the `load` test module (a few seconds, correctness only): tokio clients on 127.0.0.1 against an
//! in-process server, each looping over a seeded mix of Search (80 %), UpsertPoints (15 %,
//! 10 new points) and Promote (5 %) for a fixed time, recording latency and status codes.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use tonic::transport::Channel;
use vectord::pb;
use vectord::pb::autotune_service_client::AutotuneServiceClient;
use vectord::pb::index_service_client::IndexServiceClient;
use vectord::pb::promotion_service_client::PromotionServiceClient;

use super::{create_index, points, upsert, Gen};

pub const DIM: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Op {
    Search,
    Upsert,
    Promote,
}

#[derive(Default)]
pub struct OpStats {
    pub micros: Vec<u32>,
    pub errors: BTreeMap<String, u64>,
}

pub struct Report {
    pub elapsed: Duration,
    pub seed_points: u64,
    pub clients: usize,
    pub ops: BTreeMap<Op, OpStats>,
}

fn pct(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Report {
    /// Codes other than deliberate shedding (RESOURCE_EXHAUSTED from the concurrency limit).
    pub fn unexpected_errors(&self) -> Vec<String> {
        self.ops
            .iter()
            .flat_map(|(op, s)| {
                s.errors
                    .iter()
                    .filter(|(code, _)| !code.starts_with("ResourceExhausted"))
                    .map(move |(code, n)| format!("{op:?}: {n} x {code}"))
            })
            .collect()
    }

    pub fn print(&mut self) {
        let secs = self.elapsed.as_secs_f64();
        println!(
            "load: {} clients, {:.1} s, {} dims, {} seed points",
            self.clients, secs, DIM, self.seed_points
        );
        println!(
            "{:<8} {:>9} {:>10} {:>9} {:>9} {:>9}  errors by code",
            "op", "ok calls", "ok/s", "p50 µs", "p99 µs", "max µs"
        );
        for (op, s) in self.ops.iter_mut() {
            s.micros.sort_unstable();
            let errors: Vec<String> = s.errors.iter().map(|(c, n)| format!("{c}={n}")).collect();
            println!(
                "{:<8} {:>9} {:>10.0} {:>9} {:>9} {:>9}  {}",
                format!("{op:?}"),
                s.micros.len(),
                s.micros.len() as f64 / secs,
                pct(&s.micros, 50.0),
                pct(&s.micros, 99.0),
                s.micros.last().copied().unwrap_or(0),
                if errors.is_empty() {
                    "none".to_string()
                } else {
                    errors.join(" ")
                }
            );
        }
        let total: usize = self.ops.values().map(|s| s.micros.len()).sum();
        println!("total    {:>9} {:>10.0}", total, total as f64 / secs);
    }
}

/// Creates the index "load" (`n` random points), a harness and two trials to promote back and
/// forth. Returns the trial ids.
pub async fn prepare(ch: Channel, n: u64) -> Vec<u64> {
    let mut c = IndexServiceClient::new(ch.clone());
    create_index(&mut c, "load", DIM as u32, pb::Metric::L2).await;
    let pts = points(&mut Gen::new(1), 0..n, DIM);
    for chunk in pts.chunks(2000) {
        upsert(&mut c, "load", chunk.to_vec()).await;
    }
    let mut a = AutotuneServiceClient::new(ch);
    a.create_harness(pb::CreateHarnessRequest {
        index_name: "load".into(),
        name: "h".into(),
        k: 10,
        queries: Some(pb::create_harness_request::Queries::Sampled(
            pb::SampledQueries {
                query_count: 50,
                seed: Some(1),
            },
        )),
    })
    .await
    .expect("harness");
    let mut trials = Vec::new();
    for ef_search in [40, 80] {
        let t = a
            .run_trial(pb::RunTrialRequest {
                index_name: "load".into(),
                harness: "h".into(),
                config: Some(pb::HnswConfig {
                    m: 16,
                    ef_construction: 100,
                    ef_search,
                    seed: Some(1),
                }),
            })
            .await
            .expect("trial")
            .into_inner()
            .trial
            .expect("trial");
        trials.push(t.id);
    }
    trials
}

/// Runs `clients` clients for `duration` against `addr`, each with its own connection.
pub async fn run(
    addr: std::net::SocketAddr,
    clients: usize,
    duration: Duration,
    trials: Vec<u64>,
    seed_points: u64,
) -> Report {
    let start = Instant::now();
    let until = start + duration;
    let mut tasks = Vec::new();
    for client in 0..clients {
        let ch = Channel::from_shared(format!("http://{addr}"))
            .expect("url")
            .connect()
            .await
            .expect("connect");
        let trials = trials.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(client as u64);
            let mut g = Gen::new(100 + client as u64);
            let mut c = IndexServiceClient::new(ch.clone());
            let mut p = PromotionServiceClient::new(ch);
            let mut stats: BTreeMap<Op, OpStats> = BTreeMap::new();
            let mut next_id = 1_000_000 * (client as u64 + 1);
            while Instant::now() < until {
                let roll = rng.gen_range(0..100);
                let t0 = Instant::now();
                let (op, r) = if roll < 80 {
                    let r = c
                        .search(pb::SearchRequest {
                            index_name: "load".into(),
                            vector: g.vector(DIM),
                            k: 10,
                            ef_search: None,
                            ..Default::default()
                        })
                        .await
                        .map(|_| ());
                    (Op::Search, r)
                } else if roll < 95 {
                    let pts = points(&mut g, next_id..next_id + 10, DIM);
                    next_id += 10;
                    let r = c
                        .upsert_points(pb::UpsertPointsRequest {
                            index_name: "load".into(),
                            points: pts,
                            ..Default::default()
                        })
                        .await
                        .map(|_| ());
                    (Op::Upsert, r)
                } else {
                    let r = p
                        .promote(pb::PromoteRequest {
                            index_name: "load".into(),
                            trial_id: trials[rng.gen_range(0..trials.len())],
                            promoted_by: format!("client-{client}"),
                            note: String::new(),
                        })
                        .await
                        .map(|_| ());
                    (Op::Promote, r)
                };
                let s = stats.entry(op).or_default();
                match r {
                    Ok(()) => s.micros.push(t0.elapsed().as_micros() as u32),
                    Err(e) => {
                        *s.errors.entry(format!("{:?}", e.code())).or_default() += 1;
                        if e.code() == tonic::Code::ResourceExhausted {
                            // Shed: back off a little, as a well-behaved client would.
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                    }
                }
            }
            stats
        }));
    }
    let mut ops: BTreeMap<Op, OpStats> = BTreeMap::new();
    for t in tasks {
        for (op, s) in t.await.expect("client task") {
            let all = ops.entry(op).or_default();
            all.micros.extend(s.micros);
            for (code, n) in s.errors {
                *all.errors.entry(code).or_default() += n;
            }
        }
    }
    Report {
        elapsed: start.elapsed(),
        seed_points,
        clients,
        ops,
    }
}
