//! Tombstone compaction on a real server: deleting a large share of an index while other tasks
//! search and upsert gets the index rebuilt in the background, with no failed search, no lost
//! point and no deleted point coming back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::{self, create_index, eventually, Gen, TestServer};
use tonic::transport::Channel;
use vectord::config::Config;
use vectord::pb;
use vectord::pb::index_service_client::IndexServiceClient;

const DIM: usize = 16;
const INDEX: &str = "docs";

async fn get_index(c: &mut IndexServiceClient<Channel>) -> pb::Index {
    c.get_index(pb::GetIndexRequest { name: INDEX.into() })
        .await
        .expect("get index")
        .into_inner()
        .index
        .expect("index")
}

/// Polls GetIndex until `done` holds (a compaction is a background event with nothing to watch
/// but the index's state), failing after a minute.
async fn wait_for(
    c: &mut IndexServiceClient<Channel>,
    what: &str,
    done: impl Fn(&pb::Index) -> bool,
) -> pb::Index {
    eventually(Duration::from_secs(60), what, || {
        let mut c = c.clone();
        let done = &done;
        async move {
            let index = get_index(&mut c).await;
            done(&index).then_some(index)
        }
    })
    .await
}

/// Searches each vector at k and ef 200 in one batch.
async fn search_all(
    c: &mut IndexServiceClient<Channel>,
    vectors: &[Vec<f32>],
    k: u32,
) -> Vec<Vec<pb::Neighbor>> {
    let mut out = Vec::with_capacity(vectors.len());
    for chunk in vectors.chunks(500) {
        let resp = c
            .search_batch(pb::SearchBatchRequest {
                index_name: INDEX.into(),
                queries: chunk
                    .iter()
                    .map(|v| pb::QueryVector { vector: v.clone() })
                    .collect(),
                k,
                ef_search: Some(200),
                ..Default::default()
            })
            .await
            .expect("search batch")
            .into_inner();
        out.extend(resp.results.into_iter().map(|r| r.neighbors));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compaction_under_concurrent_writes_and_searches_loses_and_resurrects_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = Config::for_tests(tmp.path());
    config.compact_deleted_fraction = 0.25;
    let server = TestServer::start_in(tmp.path(), config).await;
    let mut c = server.index().await;
    create_index(&mut c, INDEX, DIM as u32, pb::Metric::L2).await;

    // 4,000 base points; the ones a test task will replace or delete are known up front.
    let mut g = Gen::new(20);
    let base: Vec<pb::Point> = common::points(&mut g, 0..4000, DIM);
    for chunk in base.chunks(1000) {
        common::upsert(&mut c, INDEX, chunk.to_vec()).await;
    }
    let first = get_index(&mut c).await;
    assert_eq!(
        (first.tombstone_count, first.deleted_fraction),
        (0, 0.0),
        "{first:?}"
    );
    let compaction = first.compaction.expect("compaction status");
    assert_eq!((compaction.compactions, compaction.running), (0, false));
    let start_generation = first.active_generation.as_ref().unwrap().number;

    let stop = Arc::new(AtomicBool::new(false));
    // Searchers: every search must succeed and return k distinct points.
    let mut searchers = Vec::new();
    for s in 0..2u64 {
        let (mut c, stop) = (server.index().await, stop.clone());
        searchers.push(tokio::spawn(async move {
            let mut g = Gen::new(100 + s);
            let mut n = 0u64;
            while !stop.load(Ordering::Acquire) {
                let hits = common::search(&mut c, INDEX, g.vector(DIM), 10, Some(64)).await;
                let mut ids: Vec<u64> = hits.neighbors.iter().map(|h| h.id).collect();
                ids.sort_unstable();
                ids.dedup();
                assert_eq!(ids.len(), 10, "a search returned {:?}", hits.neighbors);
                n += 1;
            }
            n
        }));
    }
    // The writer: new points (ids from 100,000) and replacements of base ids 3,000..4,000, a few
    // per call; it returns the vector each id was last acknowledged with.
    let writer = {
        let (mut c, stop) = (server.index().await, stop.clone());
        tokio::spawn(async move {
            let mut g = Gen::new(7);
            let mut acked: HashMap<u64, Vec<f32>> = HashMap::new();
            let mut next_new = 100_000u64;
            let mut round = 0u64;
            while !stop.load(Ordering::Acquire) || round < 20 {
                let replaced = 3000 + (round * 7) % 1000;
                let points = vec![
                    pb::Point {
                        id: next_new,
                        vector: g.vector(DIM),
                    },
                    pb::Point {
                        id: next_new + 1,
                        vector: g.vector(DIM),
                    },
                    pb::Point {
                        id: replaced,
                        vector: g.vector(DIM),
                    },
                ];
                common::upsert(&mut c, INDEX, points.clone()).await;
                acked.extend(points.into_iter().map(|p| (p.id, p.vector)));
                next_new += 2;
                round += 1;
            }
            acked
        })
    };

    // Delete 70% of the base (ids 0..2,800) in calls of 100.
    for chunk in (0..2800u64).collect::<Vec<_>>().chunks(100) {
        let resp = c
            .delete_points(pb::DeletePointsRequest {
                index_name: INDEX.into(),
                ids: chunk.to_vec(),
                ..Default::default()
            })
            .await
            .expect("delete")
            .into_inner();
        assert_eq!(resp.deleted_count, chunk.len() as u64);
    }
    // Writes and searches go on until a compaction has been swapped in.
    wait_for(&mut c, "a compaction swapped in", |i| {
        i.compaction.as_ref().is_some_and(|s| s.compactions >= 1)
    })
    .await;
    stop.store(true, Ordering::Release);
    let mut searches = 0;
    for s in searchers {
        searches += s.await.expect("searcher");
    }
    let acked = writer.await.expect("writer");
    assert!(searches > 0);

    // Settled: no compaction running and the deleted share under the threshold.
    let index = wait_for(&mut c, "compactions settled", |i| {
        i.compaction.as_ref().is_some_and(|s| !s.running) && i.deleted_fraction <= 0.25
    })
    .await;
    let generation = index.active_generation.as_ref().unwrap();
    assert!(generation.number > start_generation, "{index:?}");
    assert!(index
        .compaction
        .as_ref()
        .is_some_and(|s| s.last_compaction_time.is_some()));

    // Every acknowledged point is there with its last vector, found first by it.
    let mut live: HashMap<u64, Vec<f32>> = base[2800..]
        .iter()
        .map(|p| (p.id, p.vector.clone()))
        .collect();
    live.extend(acked);
    assert_eq!(index.point_count, live.len() as u64);
    assert_eq!(generation.point_count, live.len() as u64);
    let ids: Vec<u64> = live.keys().copied().collect();
    let vectors: Vec<Vec<f32>> = ids.iter().map(|id| live[id].clone()).collect();
    let found = search_all(&mut c, &vectors, 1).await;
    for (id, hits) in ids.iter().zip(&found) {
        assert_eq!(
            hits.first().map(|h| (h.id, h.distance < 1e-4)),
            Some((*id, true)),
            "point {id} not found first by its last vector"
        );
    }
    // No deleted point answers, even searched by its own vector.
    let deleted: Vec<Vec<f32>> = base[..2800].iter().map(|p| p.vector.clone()).collect();
    for hits in search_all(&mut c, &deleted, 5).await {
        assert!(
            hits.iter().all(|h| live.contains_key(&h.id)),
            "a deleted point came back: {hits:?}"
        );
    }
    for id in [0u64, 1399, 2799] {
        let e = c
            .get_point(pb::GetPointRequest {
                index_name: INDEX.into(),
                id,
            })
            .await;
        assert_eq!(common::code_of(e), tonic::Code::NotFound);
    }

    // And after a restart (which rebuilds from the store) the same.
    let server = server.restart().await;
    let mut c = server.index().await;
    let after = get_index(&mut c).await;
    assert_eq!(after.point_count, live.len() as u64);
    let found = search_all(&mut c, &vectors, 1).await;
    for (id, hits) in ids.iter().zip(&found) {
        assert_eq!(hits.first().map(|h| h.id), Some(*id));
    }
}

/// With compaction off (0), tombstones stay and GetIndex reports them.
#[tokio::test]
async fn compaction_off_keeps_tombstones_and_reports_them() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = Config::for_tests(tmp.path());
    config.compact_deleted_fraction = 0.0;
    let server = TestServer::start_in(tmp.path(), config).await;
    let mut c = server.index().await;
    create_index(&mut c, INDEX, DIM as u32, pb::Metric::L2).await;
    let mut g = Gen::new(3);
    common::upsert(&mut c, INDEX, common::points(&mut g, 0..100, DIM)).await;
    c.delete_points(pb::DeletePointsRequest {
        index_name: INDEX.into(),
        ids: (0..60).collect(),
        ..Default::default()
    })
    .await
    .expect("delete");
    let index = get_index(&mut c).await;
    assert_eq!(index.tombstone_count, 60);
    assert!((index.deleted_fraction - 0.6).abs() < 1e-9, "{index:?}");
    let status = index.compaction.expect("status");
    assert_eq!((status.compactions, status.running), (0, false));
    assert_eq!(index.active_generation.unwrap().number, 1);
}
