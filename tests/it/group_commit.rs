//! Group commit: concurrent writes to one index share a transaction and a flush, keep their
//! arrival order, lose nothing acknowledged across SIGKILL (real binary), and a full write
//! queue answers RESOURCE_EXHAUSTED at once. Graph work stays off the async runtime: a large
//! DeletePoints while searches run leaves health answering promptly.

use crate::common;
use crate::common::child;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use child::{channel, DEADLINE};
use common::{create_index, points, stored, versioned, Gen, IdLedger, TestServer};
use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use vectord::pb;
use vectord::pb::index_service_client::IndexServiceClient;

fn upsert_req(index: &str, id: u64, vector: Vec<f32>) -> pb::UpsertPointsRequest {
    pb::UpsertPointsRequest {
        index_name: index.into(),
        points: vec![pb::Point { id, vector }],
        ..Default::default()
    }
}

fn delete_req(index: &str, ids: Vec<u64>) -> pb::DeletePointsRequest {
    pb::DeletePointsRequest {
        index_name: index.into(),
        ids,
        ..Default::default()
    }
}

/// Whether a search by `vector` finds `id` first.
async fn found_first(c: &mut IndexServiceClient<Channel>, index: &str, id: u64, v: &[f32]) -> bool {
    let r = c
        .search(pb::SearchRequest {
            index_name: index.into(),
            vector: v.to_vec(),
            k: 1,
            ef_search: None,
            ..Default::default()
        })
        .await
        .expect("search")
        .into_inner();
    r.neighbors.first().map(|n| n.id) == Some(id)
}

/// One write as a client saw it: when it was sent and acknowledged, and what it wrote.
#[derive(Clone, Debug)]
struct Write {
    sent: Instant,
    acked: Instant,
    /// Some(value) for an upsert, None for a delete.
    value: Option<f32>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_upserts_and_deletes_of_the_same_ids_keep_their_order() {
    let s = TestServer::start().await;
    let mut c = s.index().await;
    create_index(&mut c, "g", 2, pb::Metric::L2).await;
    const IDS: u64 = 8;
    const TASKS: u64 = 16;
    const OPS: u64 = 40;
    let log: Arc<Mutex<BTreeMap<u64, Vec<Write>>>> = Default::default();
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (mut c, log) = (s.index().await, log.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(t);
            for n in 0..OPS {
                let id = rng.gen_range(0..IDS);
                let sent = Instant::now();
                let value = if rng.gen_bool(0.7) {
                    // Unique per write, so the stored vector names the write that won.
                    let value = (t * 1000 + n + 1) as f32;
                    let r = c
                        .upsert_points(upsert_req("g", id, vec![id as f32, value]))
                        .await
                        .expect("upsert")
                        .into_inner();
                    assert_eq!(r.upserted_count, 1);
                    assert!(r.point_count >= 1 && r.point_count <= IDS, "{r:?}");
                    Some(value)
                } else {
                    let r = c
                        .delete_points(delete_req("g", vec![id]))
                        .await
                        .expect("delete")
                        .into_inner();
                    assert!(r.deleted_count <= 1 && r.point_count < IDS, "{r:?}");
                    None
                };
                let acked = Instant::now();
                log.lock()
                    .entry(id)
                    .or_default()
                    .push(Write { sent, acked, value });
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    // Per id, the final state is the value of a write that no other write of that id
    // strictly followed (sent after it was acknowledged): arrival order, last write wins.
    let log = log.lock().clone();
    let mut live = 0;
    for (id, writes) in &log {
        let last: Vec<Option<f32>> = writes
            .iter()
            .filter(|w| !writes.iter().any(|o| o.sent > w.acked))
            .map(|w| w.value)
            .collect();
        let got = stored(&mut c, "g", *id).await;
        let got_value = got.as_ref().map(|v| v[1]);
        assert!(
            last.contains(&got_value),
            "id {id}: stored {got_value:?}, but the last acknowledged writes were {last:?}"
        );
        if let Some(v) = got {
            live += 1;
            assert!(
                found_first(&mut c, "g", *id, &v).await,
                "id {id}: the graph misses it"
            );
        }
    }
    let count = c
        .get_index(pb::GetIndexRequest { name: "g".into() })
        .await
        .expect("get index")
        .into_inner()
        .index
        .expect("index")
        .point_count;
    assert_eq!(count, live, "point count and stored points agree");

    // One client, in order: an upsert then a delete of the same id leaves it absent; a delete
    // then an upsert leaves it present, with the graph agreeing.
    let mut a = s.index().await;
    let mut b = s.index().await;
    for round in 0..20u64 {
        let id = 100 + round;
        let v = vec![id as f32, 0.5];
        let (x, y) = tokio::join!(a.upsert_points(upsert_req("g", id, v.clone())), async {
            // Sent while the upsert may still be queued: whichever arrived first, the
            // reported outcomes must be consistent with one order.
            b.delete_points(delete_req("g", vec![id])).await
        });
        let (x, y) = (
            x.expect("upsert").into_inner(),
            y.expect("delete").into_inner(),
        );
        let present = stored(&mut c, "g", id).await.is_some();
        // Delete after upsert: deleted 1 and absent. Delete first: deleted 0 and present.
        assert_eq!(y.deleted_count == 1, !present, "round {round}: {x:?} {y:?}");
        assert_eq!(
            found_first(&mut c, "g", id, &v).await,
            present,
            "round {round}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_write_queue_answers_resource_exhausted_at_once() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut config = vectord::config::Config::for_tests(tmp.path());
    config.max_pending_writes = 1;
    let s = TestServer::start_in(tmp.path(), config).await;
    let mut c = s.index().await;
    create_index(&mut c, "q", 64, pb::Metric::L2).await;
    const CALLS: u64 = 48;
    const BATCH: u64 = 400;
    let mut calls = Vec::new();
    for k in 0..CALLS {
        let mut c = s.index().await;
        calls.push(tokio::spawn(async move {
            let pts = points(&mut Gen::new(k), k * BATCH..(k + 1) * BATCH, 64);
            c.upsert_points(pb::UpsertPointsRequest {
                index_name: "q".into(),
                points: pts,
                ..Default::default()
            })
            .await
        }));
    }
    let (mut ok, mut refused) = (0u64, 0u64);
    for call in calls {
        match call.await.expect("call") {
            Ok(_) => ok += 1,
            Err(s) => {
                assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
                assert!(s.message().contains("--max-pending-writes"), "{s:?}");
                refused += 1;
            }
        }
    }
    assert!(
        refused > 0,
        "{CALLS} concurrent writes to a queue of 1: some must be refused"
    );
    assert!(ok > 0);
    // Refused writes changed nothing.
    let count = c
        .get_index(pb::GetIndexRequest { name: "q".into() })
        .await
        .expect("get index")
        .into_inner()
        .index
        .expect("index")
        .point_count;
    assert_eq!(count, ok * BATCH);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_delete_while_searches_run_keeps_health_prompt() {
    let s = TestServer::start().await;
    let mut c = s.index().await;
    const DIM: usize = 8;
    create_index(&mut c, "d", DIM as u32, pb::Metric::L2).await;
    let mut gen = Gen::new(5);
    let mut kept = None;
    for k in 0..6u64 {
        let pts = points(&mut gen, k * 10_000..(k + 1) * 10_000, DIM);
        if k == 0 {
            kept = Some(pts[0].clone());
        }
        c.upsert_points(pb::UpsertPointsRequest {
            index_name: "d".into(),
            points: pts,
            ..Default::default()
        })
        .await
        .expect("upsert");
    }
    let kept = kept.expect("a kept point");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let searchers: Vec<_> = (0..4)
        .map(|_| {
            let c = c.clone();
            common::spawn_searcher(c, "d", &kept, 1, stop_rx.clone())
        })
        .collect();
    // Health is checked in a loop while the delete runs; every answer must be SERVING and
    // prompt (the delete and the searches run on the blocking pool, not on the workers).
    let mut health = HealthClient::new(s.channel().await);
    let (done_tx, mut done_rx) = tokio::sync::watch::channel(false);
    let checker = tokio::spawn(async move {
        let mut worst = Duration::ZERO;
        let mut checks = 0u64;
        loop {
            let t = Instant::now();
            let r = tokio::time::timeout(
                Duration::from_secs(10),
                health.check(HealthCheckRequest {
                    service: String::new(),
                }),
            )
            .await
            .expect("health answered")
            .expect("health check")
            .into_inner();
            assert_eq!(r.status, ServingStatus::Serving as i32);
            worst = worst.max(t.elapsed());
            checks += 1;
            if *done_rx.borrow_and_update() && checks > 3 {
                return (worst, checks);
            }
        }
    });
    let r = c
        .delete_points(delete_req("d", (10_000..60_000).collect()))
        .await
        .expect("delete")
        .into_inner();
    assert_eq!((r.deleted_count, r.point_count), (50_000, 10_000));
    let _ = done_tx.send(true);
    let (worst, checks) = checker.await.expect("checker");
    let _ = stop_tx.send(true);
    for sr in searchers {
        sr.await.expect("searcher");
    }
    println!("health: {checks} checks during the delete, slowest {worst:?}");
    assert!(
        worst < Duration::from_secs(2),
        "a health check took {worst:?} during a 50k-id delete"
    );
}

// ---- SIGKILL loop against the real binary ----

const KDIM: usize = 8;
const KWRITERS: u64 = 16;
const KIDS: u64 = 12;

/// The vector of write `version` of `id` ([`versioned`] at [`KDIM`]).
fn kvec(id: u64, version: u64) -> Vec<f32> {
    versioned(id, version, KDIM)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_write_is_lost_across_sigkill_with_16_writers() {
    sigkill_loop(&[]).await;
}

/// The same with the indexer slowed (30 ms before each batch it links): writes are answered
/// while their points wait in the fresh segment, so the kill finds acknowledged points that
/// only the change log holds; the restart replays them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_write_is_lost_across_sigkill_while_the_indexer_lags() {
    sigkill_loop(&[("VECTORD_TEST_INDEXER_DELAY_MS", std::path::Path::new("30"))]).await;
}

/// `child::start` with `envs`.
async fn start_env(
    what: &'static str,
    dir: &std::path::Path,
    envs: &[(&str, &std::path::Path)],
) -> (child::Vectord, std::net::SocketAddr) {
    let mut s = child::Vectord::spawn(
        what,
        &["--addr", "127.0.0.1:0", "--data-dir", child::path_str(dir)],
        envs,
    );
    let addr = s.wait_listening().await;
    s.wait_serving(addr).await;
    (s, addr)
}

async fn sigkill_loop(envs: &[(&str, &std::path::Path)]) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let (mut s, mut addr) = start_env("first", dir, envs).await;
    create_index(
        &mut IndexServiceClient::new(channel(addr).await),
        "k",
        KDIM as u32,
        pb::Metric::L2,
    )
    .await;
    let ledger: Arc<Mutex<BTreeMap<u64, IdLedger>>> = Default::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(20);
    let mut version = 0u64;
    for cycle in 0..3 {
        let ch = channel(addr).await;
        let kill_after = rng.gen_range(40..200u64);
        let (acks_tx, mut acks_rx) = tokio::sync::watch::channel(0u64);
        let acks_tx = Arc::new(acks_tx);
        let mut writers = Vec::new();
        for w in 0..KWRITERS {
            let (mut c, ledger, acks_tx) = (
                IndexServiceClient::new(ch.clone()),
                ledger.clone(),
                acks_tx.clone(),
            );
            // Versions stay exact in an f32 (< 2^24).
            let base = version + w * 5_000;
            writers.push(tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(base + w);
                for n in 1..5_000 {
                    let id = w * 1000 + rng.gen_range(0..KIDS);
                    let op = if rng.gen_bool(0.8) {
                        Some(base + n)
                    } else {
                        None
                    };
                    ledger.lock().entry(id).or_default().in_flight = Some(op);
                    let r = match op {
                        Some(v) => c
                            .upsert_points(upsert_req("k", id, kvec(id, v)))
                            .await
                            .map(|_| ()),
                        None => c.delete_points(delete_req("k", vec![id])).await.map(|_| ()),
                    };
                    if r.is_err() {
                        return;
                    }
                    let mut l = ledger.lock();
                    let e = l.entry(id).or_default();
                    e.acked = Some(op);
                    e.in_flight = None;
                    drop(l);
                    acks_tx.send_modify(|n| *n += 1);
                }
            }));
        }
        tokio::time::timeout(DEADLINE, acks_rx.wait_for(|n| *n >= kill_after))
            .await
            .expect("writers acknowledged in time")
            .expect("acks channel");
        let unindexed = IndexServiceClient::new(ch.clone())
            .get_index(pb::GetIndexRequest { name: "k".into() })
            .await
            .ok()
            .and_then(|r| r.into_inner().index)
            .map(|i| i.unindexed_count);
        s.signal("KILL");
        let status = s.wait_exit().await;
        assert!(!status.success(), "killed: {status}");
        for w in writers {
            tokio::time::timeout(DEADLINE, w)
                .await
                .expect("writers stop once the server is gone")
                .expect("writer task");
        }
        let acked = *acks_rx.borrow();
        version += 100_000;
        (s, addr) = start_env("restarted", dir, envs).await;
        let mut c = IndexServiceClient::new(channel(addr).await);
        let snapshot = ledger.lock().clone();
        let mut live = 0u64;
        for (id, l) in &snapshot {
            let got = stored(&mut c, "k", *id).await;
            let got_version = got.as_ref().map(|v| v[1] as u64);
            assert!(
                l.allows(got_version),
                "cycle {cycle}, id {id}: stored {got_version:?}, last acknowledged {:?}, in flight {:?}",
                l.acked_state(),
                l.in_flight
            );
            if let Some(v) = got {
                live += 1;
                assert_eq!(v, kvec(*id, v[1] as u64), "id {id}: the stored vector");
                assert!(
                    found_first(&mut c, "k", *id, &v).await,
                    "cycle {cycle}, id {id}: stored but the graph does not find it"
                );
            }
            // Settle the ledger: what is stored now is what the next cycle builds on.
            ledger.lock().insert(
                *id,
                IdLedger {
                    acked: Some(got_version),
                    in_flight: None,
                },
            );
        }
        let count = c
            .get_index(pb::GetIndexRequest { name: "k".into() })
            .await
            .expect("get index")
            .into_inner()
            .index
            .expect("index")
            .point_count;
        assert_eq!(count, live, "cycle {cycle}");
        println!(
            "cycle {cycle}: killed after {acked} acknowledged writes ({unindexed:?} not yet linked); {live} points live"
        );
    }
    s.signal("TERM");
    assert!(s.wait_exit().await.success());
}
