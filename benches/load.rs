//! A bounded load test: an in-process server on 127.0.0.1 and tokio clients running a mixed
//! Search / UpsertPoints / Promote load at saturation for a fixed time; prints throughput,
//! p50/p99 and errors by code per operation.
//!
//! `cargo bench --bench load` runs 64 clients for 60 s with the server's default limits.
//! Set `VECTORD_LOAD_SECS`, `VECTORD_LOAD_CLIENTS`, `VECTORD_LOAD_POINTS` (10,000), and `VECTORD_LOAD_MAX_CONCURRENT` (the
//! server's --max-concurrent-requests: set it below the client count to see shedding).

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

#[tokio::main]
async fn main() {
    let secs = env_or("VECTORD_LOAD_SECS", 60);
    let clients = env_or("VECTORD_LOAD_CLIENTS", 64) as usize;
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
