//! The fresh segment: writes are answered once durable and staged, before the background
//! indexer links them into the graph. A write is searchable when answered, with the indexer
//! held, lagging or racing the searches; order (last write wins, deletes) holds while it lags;
//! a full segment turns into RESOURCE_EXHAUSTED at once, never a hang; an activation or a
//! restart while points wait loses nothing and resurrects nothing.

use crate::common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{create_index, eventually, Gen, TestServer};
use tonic::transport::Channel;
use vectord::catalog::IndexerHold;
use vectord::pb;
use vectord::pb::index_service_client::IndexServiceClient;

const DIM: usize = 16;

type Client = IndexServiceClient<Channel>;

fn point(g: &mut Gen, id: u64) -> pb::Point {
    pb::Point {
        id,
        vector: g.vector(DIM),
    }
}

async fn upsert_one(c: &mut Client, index: &str, p: pb::Point) -> Result<(), tonic::Status> {
    c.upsert_points(pb::UpsertPointsRequest {
        index_name: index.into(),
        points: vec![p],
        ..Default::default()
    })
    .await
    .map(drop)
}

async fn delete(c: &mut Client, index: &str, ids: Vec<u64>) {
    c.delete_points(pb::DeletePointsRequest {
        index_name: index.into(),
        ids,
        ..Default::default()
    })
    .await
    .expect("delete");
}

async fn index(c: &mut Client, name: &str) -> pb::Index {
    c.get_index(pb::GetIndexRequest { name: name.into() })
        .await
        .expect("get index")
        .into_inner()
        .index
        .expect("index")
}

/// The distance at which a search by `v` (k 10, a wide ef) returns `id`, if it does.
async fn found(c: &mut Client, index: &str, id: u64, v: &[f32]) -> Option<f32> {
    let r = common::search(c, index, v.to_vec(), 10, Some(256)).await;
    r.neighbors.iter().find(|n| n.id == id).map(|n| n.distance)
}

/// Every id of `expect` is found by its own vector at distance 0, every other id of `gone` is
/// found by no search, and the index counts exactly `expect`.
async fn check(
    c: &mut Client,
    name: &str,
    expect: &BTreeMap<u64, Vec<f32>>,
    gone: &[u64],
    what: &str,
) {
    for (id, v) in expect {
        let d = found(c, name, *id, v).await;
        assert_eq!(d, Some(0.0), "{what}: id {id} not found by its own vector");
    }
    let mut g = Gen::new(99);
    for _ in 0..20 {
        let r = common::search(c, name, g.vector(DIM), 100, Some(256)).await;
        for n in &r.neighbors {
            assert!(
                !gone.contains(&n.id),
                "{what}: deleted id {} answered",
                n.id
            );
            assert!(
                expect.contains_key(&n.id),
                "{what}: unknown id {} answered",
                n.id
            );
        }
    }
    for id in gone {
        let r = c
            .get_point(pb::GetPointRequest {
                index_name: name.into(),
                id: *id,
            })
            .await;
        assert_eq!(common::code_of(r), tonic::Code::NotFound, "{what}: id {id}");
    }
    assert_eq!(
        index(c, name).await.point_count,
        expect.len() as u64,
        "{what}"
    );
}

async fn wait_indexed(c: &mut Client, name: &str) {
    eventually(
        Duration::from_secs(60),
        "the indexer linked every point",
        || {
            let mut c = c.clone();
            async move { (index(&mut c, name).await.unindexed_count == 0).then_some(()) }
        },
    )
    .await;
}

/// 64 writers, one point per UpsertPoints: each searches for its point right after the answer
/// and finds it at distance 0 — first with the indexer held (every point in the fresh
/// segment, which GetIndex counts), then with it running (points moving into the graph while
/// they are searched), then once everything is linked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_point_is_found_right_after_its_upsert_under_64_writers() {
    let hold = IndexerHold::default();
    hold.pause();
    let h = hold.clone();
    let s = TestServer::start_with(|c| c.indexer_hold = Some(h)).await;
    let mut c = s.index().await;
    create_index(&mut c, "w", DIM as u32, pb::Metric::L2).await;
    let mut all = BTreeMap::new();
    for phase in 0..2u64 {
        if phase == 1 {
            hold.resume();
        }
        let mut writers = Vec::new();
        for w in 0..64u64 {
            let mut c = s.index().await;
            writers.push(tokio::spawn(async move {
                let mut g = Gen::new(phase * 1000 + w);
                let mut mine = Vec::new();
                for n in 0..15u64 {
                    let p = point(&mut g, phase * 1_000_000 + w * 1000 + n);
                    upsert_one(&mut c, "w", p.clone()).await.expect("upsert");
                    let d = found(&mut c, "w", p.id, &p.vector).await;
                    assert_eq!(d, Some(0.0), "id {} right after its upsert", p.id);
                    mine.push(p);
                }
                mine
            }));
        }
        for w in writers {
            for p in w.await.expect("writer") {
                all.insert(p.id, p.vector);
            }
        }
        if phase == 0 {
            // Nothing was linked: every point was found in the fresh segment.
            assert_eq!(index(&mut c, "w").await.unindexed_count, all.len() as u64);
        }
    }
    wait_indexed(&mut c, "w").await;
    check(&mut c, "w", &all, &[], "linked").await;
}

/// One client's upserts, replacements and deletes of the same ids, with the indexer held:
/// the last write of each id wins (a deleted id is gone, a replaced one answers with its new
/// vector only), before linking, after it, and after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_holds_while_the_indexer_lags() {
    let hold = IndexerHold::default();
    hold.pause();
    let h = hold.clone();
    let s = TestServer::start_with(|c| c.indexer_hold = Some(h)).await;
    let mut c = s.index().await;
    create_index(&mut c, "o", DIM as u32, pb::Metric::L2).await;
    let mut g = Gen::new(7);
    let mut expect = BTreeMap::new();
    let mut gone = Vec::new();
    for id in 0..60u64 {
        let first = point(&mut g, id);
        upsert_one(&mut c, "o", first.clone())
            .await
            .expect("upsert");
        match id % 3 {
            // upsert, then delete
            0 => {
                delete(&mut c, "o", vec![id]).await;
                gone.push(id);
                assert_eq!(found(&mut c, "o", id, &first.vector).await, None, "id {id}");
            }
            // upsert, then replace: the old vector must not answer
            1 => {
                let second = point(&mut g, id);
                upsert_one(&mut c, "o", second.clone())
                    .await
                    .expect("replace");
                let r = common::search(&mut c, "o", first.vector.clone(), 100, Some(256)).await;
                let hit = r
                    .neighbors
                    .iter()
                    .find(|n| n.id == id)
                    .expect("replaced id");
                assert!(hit.distance > 0.0, "id {id}: its old vector answered");
                expect.insert(id, second.vector);
            }
            // upsert, delete, upsert again
            _ => {
                delete(&mut c, "o", vec![id]).await;
                let again = point(&mut g, id);
                upsert_one(&mut c, "o", again.clone()).await.expect("again");
                expect.insert(id, again.vector);
            }
        }
    }
    assert!(index(&mut c, "o").await.unindexed_count > 0);
    check(&mut c, "o", &expect, &gone, "held").await;
    hold.resume();
    wait_indexed(&mut c, "o").await;
    check(&mut c, "o", &expect, &gone, "linked").await;
    let s = s.restart().await;
    let mut c = s.index().await;
    check(&mut c, "o", &expect, &gone, "restarted").await;
}

/// A full fresh segment (--max-unindexed-points 10, indexer held): the committer takes no more
/// writes, so with --max-pending-writes 2 the next write waits, two more queue, and the rest
/// are refused with RESOURCE_EXHAUSTED at once. Once the indexer runs, the waiting ones are
/// answered and every acknowledged point is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_fresh_segment_refuses_writes_at_once() {
    let hold = IndexerHold::default();
    hold.pause();
    let h = hold.clone();
    let s = TestServer::start_with(|c| {
        c.indexer_hold = Some(h);
        c.max_unindexed_points = 10;
        c.max_pending_writes = 2;
    })
    .await;
    let mut c = s.index().await;
    create_index(&mut c, "f", DIM as u32, pb::Metric::L2).await;
    let mut g = Gen::new(3);
    let mut expect = BTreeMap::new();
    for id in 0..10u64 {
        let p = point(&mut g, id);
        upsert_one(&mut c, "f", p.clone()).await.expect("upsert");
        expect.insert(id, p.vector);
    }
    assert_eq!(index(&mut c, "f").await.unindexed_count, 10);
    // Eight at once: the committer takes one (and waits for room), two fill the queue, and
    // five are refused at once (they return while the indexer is still held).
    let mut calls = Vec::new();
    for id in 10..18u64 {
        let (mut c, p) = (s.index().await, point(&mut g, id));
        calls.push((
            id,
            p.vector.clone(),
            tokio::spawn(async move { upsert_one(&mut c, "f", p).await }),
        ));
    }
    eventually(
        Duration::from_secs(30),
        "five writes refused at once",
        || {
            let done = calls.iter().filter(|(_, _, t)| t.is_finished()).count();
            async move { (done >= 5).then_some(()) }
        },
    )
    .await;
    let (mut waiting, mut gone) = (Vec::new(), Vec::new());
    for (id, v, t) in calls {
        if t.is_finished() {
            let st = t.await.expect("task").expect_err("accepted while full");
            assert_eq!(st.code(), tonic::Code::ResourceExhausted, "{st:?}");
            assert!(st.message().contains("--max-pending-writes"), "{st:?}");
            gone.push(id);
        } else {
            waiting.push((id, v, t));
        }
    }
    assert_eq!((gone.len(), waiting.len()), (5, 3));
    assert_eq!(index(&mut c, "f").await.unindexed_count, 10);
    hold.resume();
    for (id, v, t) in waiting {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("the waiting writes are answered once there is room")
            .expect("task")
            .expect("the waiting write succeeds");
        expect.insert(id, v);
    }
    wait_indexed(&mut c, "f").await;
    check(&mut c, "f", &expect, &gone, "after room").await;
}

/// An activation (a new generation built from the store, with writes made during the build
/// replayed into it) while the indexer is held and writers keep writing: no acknowledged
/// point is lost, no deleted one comes back, before and after the indexer catches up and
/// after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_activation_while_the_indexer_lags_loses_nothing() {
    let hold = IndexerHold::default();
    hold.pause();
    let h = hold.clone();
    let s = TestServer::start_with(|c| c.indexer_hold = Some(h)).await;
    let mut c = s.index().await;
    create_index(&mut c, "a", DIM as u32, pb::Metric::L2).await;
    let mut g = Gen::new(11);
    let mut expect = BTreeMap::new();
    let mut gone = Vec::new();
    for id in 0..3000u64 {
        let p = point(&mut g, id);
        expect.insert(id, p.vector.clone());
        if id % 500 == 499 {
            let batch: Vec<pb::Point> = (id - 499..=id)
                .map(|i| pb::Point {
                    id: i,
                    vector: expect[&i].clone(),
                })
                .collect();
            common::upsert(&mut c, "a", batch).await;
        }
    }
    let del: Vec<u64> = (0..3000).filter(|i| i % 7 == 0).collect();
    delete(&mut c, "a", del.clone()).await;
    for id in &del {
        expect.remove(id);
    }
    gone.extend(del);
    assert!(index(&mut c, "a").await.unindexed_count > 0);
    common::put_profile(
        &mut c,
        "p",
        &[(
            "a",
            Some(pb::HnswConfig {
                m: 12,
                ef_construction: 100,
                ef_search: 64,
                seed: None,
            }),
        )],
    )
    .await;
    // Writers during the activation: new points, replacements, deletes.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let (mut c, stop_rx) = (s.index().await, stop_rx.clone());
        writers.push(tokio::spawn(async move {
            let mut g = Gen::new(100 + w);
            let (mut put, mut del) = (BTreeMap::new(), Vec::new());
            let mut n = 0u64;
            while !*stop_rx.borrow() || n < 20 {
                let id = 10_000 + w * 10_000 + n;
                let p = point(&mut g, id);
                upsert_one(&mut c, "a", p.clone()).await.expect("upsert");
                put.insert(id, p.vector);
                if n % 5 == 4 {
                    delete(&mut c, "a", vec![id - 2]).await;
                    put.remove(&(id - 2));
                    del.push(id - 2);
                }
                n += 1;
            }
            (put, del)
        }));
    }
    let before = index(&mut c, "a")
        .await
        .active_generation
        .expect("gen")
        .number;
    c.activate_profile(pb::ActivateProfileRequest { name: "p".into() })
        .await
        .expect("activate");
    let _ = stop_tx.send(true);
    for w in writers {
        let (put, del) = w.await.expect("writer");
        expect.extend(put);
        gone.extend(del);
    }
    let i = index(&mut c, "a").await;
    assert_eq!(i.active_generation.expect("gen").number, before + 1);
    check(&mut c, "a", &expect, &gone, "activated, indexer held").await;
    // Stopped with the writes replayed into the new generation still unlinked: the restart
    // loads its snapshot (taken when its build ended) and replays the change log after it.
    assert!(index(&mut c, "a").await.unindexed_count > 0);
    let s = s.restart().await;
    let mut c = s.index().await;
    check(
        &mut c,
        "a",
        &expect,
        &gone,
        "restarted with points unlinked",
    )
    .await;
    // And once more after linking everything.
    let h = hold.clone();
    let s = s.restart_with(|c| c.indexer_hold = Some(h)).await;
    let mut c = s.index().await;
    let mut g = Gen::new(500);
    for id in 50_000..50_100u64 {
        let p = point(&mut g, id);
        upsert_one(&mut c, "a", p.clone()).await.expect("upsert");
        expect.insert(id, p.vector);
    }
    assert_eq!(index(&mut c, "a").await.unindexed_count, 100);
    hold.resume();
    wait_indexed(&mut c, "a").await;
    check(&mut c, "a", &expect, &gone, "restarted, linked").await;
}
