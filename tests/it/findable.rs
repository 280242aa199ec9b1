//! The findability check (docs/scale.md, "Every point can be found"): after online writes
//! from many writers on a graph where a narrow beam misses many points, once GetIndex shows the
//! check caught up, a search for each live point by its own vector at the index's ef_search
//! finds it first; the same writes with `--check-findable false` leave points unfound (so the
//! data is hard enough for the check to matter). The check's links reach disk with the next
//! snapshot: a restart loads them, every point is found first at once, and no pass runs again;
//! a graph snapshotted unchecked (the check off) is checked after a restart with it on.

use crate::common;

use std::time::Duration;

use common::{eventually, Gen, TestServer};
use tonic::transport::Channel;
use vectord::pb;
use vectord::pb::index_service_client::IndexServiceClient;

const DIM: usize = 48;
const INDEX: &str = "hard";

type Client = IndexServiceClient<Channel>;

/// Points of a few tight clusters (the imported base), then points scattered over the cube
/// (upserted online), as (id, vector).
fn data() -> (Vec<pb::Point>, Vec<pb::Point>) {
    let mut g = Gen::new(41);
    let centres: Vec<Vec<f32>> = (0..8).map(|_| g.vector(DIM)).collect();
    let base = (0..2000u64)
        .map(|id| pb::Point {
            id,
            vector: centres[id as usize % 8]
                .iter()
                .map(|c| c + 0.05 * g.f32())
                .collect(),
        })
        .collect();
    let scattered = (0..3000u64)
        .map(|i| pb::Point {
            id: 1_000_000 + i,
            vector: g.vector(DIM).iter().map(|x| 3.0 * x).collect(),
        })
        .collect();
    (base, scattered)
}

/// Creates the index (m 8, ef_construction 64, ef_search 8), imports the base, upserts the
/// scattered points from 8 writers at once (10 a call), then deletes every 7th of them.
/// Returns the live points.
async fn write(c: &mut Client) -> Vec<pb::Point> {
    c.create_index(pb::CreateIndexRequest {
        name: INDEX.into(),
        dimension: DIM as u32,
        metric: pb::Metric::L2 as i32,
        default_config: Some(pb::HnswConfig {
            m: 8,
            ef_construction: 64,
            ef_search: 8,
            ..Default::default()
        }),
        engine: String::new(),
    })
    .await
    .expect("create");
    let (base, scattered) = data();
    common::upsert(c, INDEX, base.clone()).await;
    let writers: Vec<_> = scattered
        .chunks(scattered.len().div_ceil(8))
        .map(|part| {
            let (mut c, part) = (c.clone(), part.to_vec());
            tokio::spawn(async move {
                for call in part.chunks(10) {
                    common::upsert(&mut c, INDEX, call.to_vec()).await;
                }
            })
        })
        .collect();
    for w in writers {
        w.await.expect("writer");
    }
    let gone: Vec<u64> = scattered.iter().step_by(7).map(|p| p.id).collect();
    c.delete_points(pb::DeletePointsRequest {
        index_name: INDEX.into(),
        ids: gone.clone(),
        ..Default::default()
    })
    .await
    .expect("delete");
    base.into_iter()
        .chain(scattered.into_iter().filter(|p| !gone.contains(&p.id)))
        .collect()
}

/// The ids of `live` that a search by their own vector (k 1, the index's ef_search) does not
/// find first.
async fn not_found_first(c: &mut Client, live: &[pb::Point]) -> Vec<u64> {
    let mut lost = Vec::new();
    for p in live {
        let r = common::search(c, INDEX, p.vector.clone(), 1, None).await;
        if r.neighbors.first().map(|n| n.id) != Some(p.id) {
            lost.push(p.id);
        }
    }
    lost
}

/// GetIndex's check, once it has caught up: a pass done, none running, no point unchecked.
async fn caught_up(c: &Client) -> pb::FindabilityCheck {
    let c = c.clone();
    eventually(
        Duration::from_secs(120),
        "the findability check catches up",
        || {
            let mut c = c.clone();
            async move {
                let i = c
                    .get_index(pb::GetIndexRequest { name: INDEX.into() })
                    .await
                    .ok()?
                    .into_inner()
                    .index?;
                let check = i.findability_check?;
                let done = check.passes >= 1 && !check.running && check.unchecked_points == 0;
                (i.unindexed_count == 0 && done).then_some(check)
            }
        },
    )
    .await
}

#[tokio::test]
async fn every_point_is_found_first_once_checked() {
    // Without the check: the data leaves points the index's ef_search misses.
    let off = TestServer::start_with(|c| c.check_findable = false).await;
    let mut c = off.index().await;
    let live = write(&mut c).await;
    eventually(Duration::from_secs(60), "every point linked", || {
        let s = &off;
        async move { (s.get_index(INDEX).await.unindexed_count == 0).then_some(()) }
    })
    .await;
    let unfound = not_found_first(&mut c, &live).await;
    assert!(
        unfound.len() >= 20,
        "without the check only {} of {} unfound: the test's data is too easy",
        unfound.len(),
        live.len()
    );
    let check = off.get_index(INDEX).await.findability_check.expect("check");
    assert_eq!((check.passes, check.points_linked), (0, 0), "{check:?}");
    // Its snapshot was not checked: a restart with the check on checks the loaded graph.
    let on = off.restart_with(|c| c.check_findable = true).await;
    let mut c = on.index().await;
    let check = caught_up(&c).await;
    assert!(check.passes >= 1 && check.points_linked >= 20, "{check:?}");
    let lost = not_found_first(&mut c, &live).await;
    assert!(
        lost.is_empty(),
        "an unchecked snapshot, checked after the restart: {lost:?}"
    );
    drop(on);

    // With it (the default).
    let s = TestServer::start().await;
    let mut c = s.index().await;
    let live = write(&mut c).await;
    let check = caught_up(&c).await;
    println!(
        "without the check {} of {} not found first; with it: {check:?}",
        unfound.len(),
        live.len()
    );
    assert!(check.passes >= 1, "{check:?}");
    assert!(check.points_linked >= 20, "{check:?}");
    assert!(check.last_pass_time.is_some(), "{check:?}");
    let lost = not_found_first(&mut c, &live).await;
    assert!(
        lost.is_empty(),
        "{} of {} not found first after the check ({check:?}): {lost:?}",
        lost.len(),
        live.len()
    );

    // A restart loads the check's links (the stop snapshots them, as checked): every point
    // is found first at once, and no pass runs (one would have started as soon as the
    // index's indexer did, before the searches below end).
    let s = s.restart().await;
    let mut c = s.index().await;
    let lost = not_found_first(&mut c, &live).await;
    assert!(lost.is_empty(), "right after the restart: {lost:?}");
    let check = s.get_index(INDEX).await.findability_check.expect("check");
    assert_eq!(
        (check.passes, check.running, check.unchecked_points),
        (0, false, 0),
        "a checked snapshot is not checked again: {check:?}"
    );
}
