//! A bounded load test: an in-process server on 127.0.0.1 and tokio clients running a mixed
//! Search / UpsertPoints / Promote load at saturation for a fixed time; prints throughput,
//! p50/p99 and errors by code per operation.
//!
//! `cargo bench --bench load` runs 64 clients for 60 s with the server's default limits.
//! Set `VECTORD_LOAD_SECS`, `VECTORD_LOAD_CLIENTS`, `VECTORD_LOAD_POINTS` (10,000), and `VECTORD_LOAD_MAX_CONCURRENT` (the
//! server's --max-concurrent-requests: set it below the client count to see shedding).
//!
//! `VECTORD_LOAD_MODE=writes` runs write-only instead: each client loops UpsertPoints of one new
//! point (64-d) into one index, and the run prints acknowledged upserts/s, p50 and p99 (the
//! group-commit figure: 64 concurrent single-point writers).

#[path = "../tests/it/common/mod.rs"]
mod common;

use common::load;

use std::time::Duration;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Write-only load: `clients` tasks, each upserting one new point per call, for `secs`.
async fn writes(addr: std::net::SocketAddr, clients: usize, secs: u64, seed_points: u64) {
    use std::time::Instant;
    use vectord::pb;
    let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut c = vectord::pb::index_service_client::IndexServiceClient::new(ch.clone());
    common::create_index(&mut c, "w", load::DIM as u32, pb::Metric::L2).await;
    let mut gen = common::Gen::new(7);
    for start in (0..seed_points).step_by(10_000) {
        let end = (start + 10_000).min(seed_points);
        common::upsert(&mut c, "w", common::points(&mut gen, start..end, load::DIM)).await;
    }
    let until = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..clients as u64 {
        let mut c = vectord::pb::index_service_client::IndexServiceClient::new(ch.clone());
        tasks.push(tokio::spawn(async move {
            let mut gen = common::Gen::new(1000 + t);
            let (mut lat, mut errors) = (Vec::new(), 0u64);
            let mut id = 1_000_000_000 + t * 100_000_000;
            while Instant::now() < until {
                let p = common::points(&mut gen, id..id + 1, load::DIM);
                id += 1;
                let t0 = Instant::now();
                match c
                    .upsert_points(pb::UpsertPointsRequest {
                        index_name: "w".into(),
                        points: p,
                        ..Default::default()
                    })
                    .await
                {
                    Ok(_) => lat.push(t0.elapsed().as_micros() as u64),
                    Err(_) => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let (mut lat, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (l, e) = t.await.expect("writer");
        lat.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct =
        |p: f64| lat[((p / 100.0 * lat.len() as f64).ceil() as usize).clamp(1, lat.len()) - 1];
    println!(
        "writes: {clients} clients x 1 point, {elapsed:.1} s on {seed_points} seed points: {:.0} acknowledged upserts/s, p50 {:.1} ms, p99 {:.1} ms, {errors} errors",
        lat.len() as f64 / elapsed,
        pct(50.0) as f64 / 1000.0,
        pct(99.0) as f64 / 1000.0
    );
}

#[tokio::main]
async fn main() {
    let secs = env_or("VECTORD_LOAD_SECS", 60);
    let clients = env_or("VECTORD_LOAD_CLIENTS", 64) as usize;
    if std::env::var("VECTORD_LOAD_MODE").as_deref() == Ok("writes") {
        let tmp = tempfile::tempdir().expect("temp dir");
        let config = vectord::config::Config::for_tests(tmp.path());
        let s = common::TestServer::start_in(tmp.path(), config).await;
        writes(s.addr, clients, secs, env_or("VECTORD_LOAD_POINTS", 10_000)).await;
        return;
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut config = vectord::config::Config::for_tests(tmp.path());
    if let Ok(max) = std::env::var("VECTORD_LOAD_MAX_CONCURRENT") {
        config.max_concurrent_requests = max.parse().expect("VECTORD_LOAD_MAX_CONCURRENT");
    }
    println!(
        "server: --max-concurrent-requests {}, --request-timeout {:?}",
        config.max_concurrent_requests, config.request_timeout
    );
    let s = common::TestServer::start_in(tmp.path(), config).await;
    let seed_points = env_or("VECTORD_LOAD_POINTS", 10_000);
    let trials = load::prepare(s.channel().await, seed_points).await;
    let mut report = load::run(
        s.addr,
        clients,
        Duration::from_secs(secs),
        trials,
        seed_points,
    )
    .await;
    report.print();
    let unexpected = report.unexpected_errors();
    if !unexpected.is_empty() {
        println!("UNEXPECTED ERRORS: {}", unexpected.join(", "));
        std::process::exit(1);
    }
}
