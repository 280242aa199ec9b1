//! A short run of the load test (`benches/load.rs` is the 60 s one): mixed Search, UpsertPoints
//! and Promote from 16 clients for 5 s against a server limited to 8 calls in flight. Asserts
//! only correctness: every error is deliberate shedding (RESOURCE_EXHAUSTED), some calls of
//! every kind succeeded, and afterwards every acknowledged write is counted. No timing asserts.

use crate::common;
use crate::common::load;

use std::time::Duration;

use vectord::pb;

const SEED_POINTS: u64 = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_load_at_saturation_has_no_errors_but_shedding() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = vectord::config::Config::for_tests(tmp.path());
    config.max_concurrent_requests = 8;
    let s = common::TestServer::start_in(tmp.path(), config).await;
    let trials = load::prepare(s.channel().await, SEED_POINTS).await;
    let mut report = load::run(s.addr, 16, Duration::from_secs(5), trials, SEED_POINTS).await;
    report.print();
    assert!(
        report.unexpected_errors().is_empty(),
        "{:?}",
        report.unexpected_errors()
    );
    for op in [load::Op::Search, load::Op::Upsert, load::Op::Promote] {
        let ok = report.ops.get(&op).map(|s| s.micros.len()).unwrap_or(0);
        assert!(ok > 0, "no {op:?} succeeded");
    }
    let upserts = report.ops[&load::Op::Upsert].micros.len() as u64;
    let mut c = s.index().await;
    let count = c
        .get_index(pb::GetIndexRequest {
            name: "load".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .index
        .unwrap()
        .point_count;
    // Shed upserts stored nothing; acknowledged ones are all counted (ids never repeat).
    assert_eq!(count, SEED_POINTS + upserts * 10);
}
