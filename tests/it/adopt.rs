//! Issue 23 §2: the winner's graph becomes the generation. Autotune with activate (and
//! ActivateProfile of a promotion whose winner's graph is held) swaps in the graph the winning
//! trial built, with the writes made since the trial's snapshot of the points replayed: no
//! second build, no lost point, no resurrected delete.

use crate::common;

use common::*;
use tonic::transport::Channel;
use vectord::pb;
use vectord::pb::autotune_service_client::AutotuneServiceClient;
use vectord::pb::index_service_client::IndexServiceClient;

const DIM: usize = 16;

async fn harness(a: &mut AutotuneServiceClient<Channel>, index: &str) {
    a.create_harness(harness_request(index, "h", 10, 30, Some(3)))
        .await
        .expect("create harness");
}

fn grid() -> Vec<pb::HnswConfig> {
    [(8, 40, 40), (16, 60, 40), (16, 60, 80)]
        .into_iter()
        .map(|(m, ef_construction, ef_search)| pb::HnswConfig {
            m,
            ef_construction,
            ef_search,
            seed: Some(11),
        })
        .collect()
}

/// Runs the job to its end; the Started event's job and the Finished event.
async fn finish(mut stream: tonic::Streaming<pb::AutotuneResponse>) -> pb::AutotuneFinished {
    loop {
        match stream.message().await {
            Ok(Some(m)) => {
                if let Some(pb::autotune_response::Event::Finished(f)) = m.event {
                    return f;
                }
            }
            Ok(None) => panic!("the stream ended without a Finished event"),
            Err(s) => panic!("the job failed: {s}"),
        }
    }
}

/// The writes made while a job runs (after its snapshot of the points): new points, points
/// replaced with new vectors, points deleted. Returns what the index must serve afterwards.
struct Writes {
    added: Vec<pb::Point>,
    replaced: Vec<pb::Point>,
    deleted: Vec<pb::Point>,
}

async fn write_meanwhile(
    c: &mut IndexServiceClient<Channel>,
    index: &str,
    all: &[pb::Point],
) -> Writes {
    let mut g = Gen::new(77);
    let added = points(&mut g, 10_000..10_040, DIM);
    upsert(c, index, added.clone()).await;
    let replaced = points(&mut g, 0..20, DIM);
    upsert(c, index, replaced.clone()).await;
    let deleted: Vec<pb::Point> = all[100..140].to_vec();
    c.delete_points(pb::DeletePointsRequest {
        index_name: index.into(),
        ids: deleted.iter().map(|p| p.id).collect(),
        ..Default::default()
    })
    .await
    .expect("delete");
    // A point added and deleted again while the job runs is not resurrected either.
    let transient = points(&mut g, 20_000..20_005, DIM);
    upsert(c, index, transient.clone()).await;
    c.delete_points(pb::DeletePointsRequest {
        index_name: index.into(),
        ids: transient.iter().map(|p| p.id).collect(),
        ..Default::default()
    })
    .await
    .expect("delete");
    let mut deleted = deleted;
    deleted.extend(transient);
    Writes {
        added,
        replaced,
        deleted,
    }
}

/// Every added and replaced point is found by its (new) vector, no deleted id is ever
/// returned, and the point count is the store's.
async fn serves_the_writes(c: &mut IndexServiceClient<Channel>, index: &str, w: &Writes, n: u64) {
    for p in w.added.iter().chain(&w.replaced) {
        let hits = search(c, index, p.vector.clone(), 3, Some(200)).await;
        assert!(
            hits.neighbors.iter().any(|h| h.id == p.id),
            "point {} not found by its own vector: {:?}",
            p.id,
            hits.neighbors
        );
    }
    let gone: std::collections::HashSet<u64> = w.deleted.iter().map(|p| p.id).collect();
    for p in &w.deleted {
        let hits = search(c, index, p.vector.clone(), 20, Some(200)).await;
        assert!(
            hits.neighbors.iter().all(|h| !gone.contains(&h.id)),
            "a deleted point was returned: {:?}",
            hits.neighbors
        );
    }
    let idx = c
        .get_index(pb::GetIndexRequest { name: index.into() })
        .await
        .expect("get index")
        .into_inner()
        .index
        .expect("index");
    assert_eq!(idx.point_count, n);
    assert_eq!(idx.active_generation.expect("generation").point_count, n);
}

/// Autotune with activate swaps in the winner's own graph (GetIndex names its trial and its
/// build time is the trial's), caught up with the upserts, replacements and deletes made while
/// the job ran; and the same after a restart (its snapshot plus the change log).
#[tokio::test]
async fn autotune_activate_adopts_the_winners_graph_with_the_writes_made_meanwhile() {
    let (s, gate) = TestServer::start_gated(&["w"]).await;
    let mut c = s.index().await;
    create_index(&mut c, "w", DIM as u32, pb::Metric::L2).await;
    let all = points(&mut Gen::new(5), 0..1200, DIM);
    upsert(&mut c, "w", all.clone()).await;
    let mut a = s.autotune().await;
    harness(&mut a, "w").await;
    let mut stream = a
        .autotune(pb::AutotuneRequest {
            index_name: "w".into(),
            harness: "h".into(),
            grid: grid(),
            min_recall: Some(0.0),
            activate: true,
            ..Default::default()
        })
        .await
        .expect("autotune")
        .into_inner();
    // Started: the job has its snapshot of the points and waits at the gate.
    let first = stream.message().await.expect("event").expect("event");
    assert!(matches!(
        first.event,
        Some(pb::autotune_response::Event::Started(_))
    ));
    let w = write_meanwhile(&mut c, "w", &all).await;
    gate.open();
    let fin = finish(stream).await;
    assert!(fin.promoted, "{}", fin.reason);
    let winner = fin.winner.expect("winner");
    let generation = fin.generation.expect("activated");
    assert_eq!(
        generation.trial_id, winner.id,
        "the winner's graph, not a build"
    );
    assert_eq!(generation.build_millis, winner.build_millis);
    assert_eq!(generation.config, winner.config);
    assert_eq!(
        winner.point_count, 1200,
        "the trial saw the points before the writes"
    );
    let n = 1200 + 40 - 40;
    serves_the_writes(&mut c, "w", &w, n).await;
    let active = c
        .get_index(pb::GetIndexRequest { name: "w".into() })
        .await
        .unwrap()
        .into_inner()
        .index
        .unwrap()
        .active_generation
        .unwrap();
    assert_eq!(active.trial_id, winner.id);
    assert_eq!(active.number, 2);

    // After a restart the same generation is served, with the same points.
    let s = s.restart().await;
    let mut c = s.index().await;
    let active = c
        .get_index(pb::GetIndexRequest { name: "w".into() })
        .await
        .unwrap()
        .into_inner()
        .index
        .unwrap()
        .active_generation
        .unwrap();
    assert_eq!((active.number, active.trial_id), (2, winner.id));
    serves_the_writes(&mut c, "w", &w, n).await;
}

/// Autotune without activate keeps its promoted winner's graph; ActivateProfile adopts it,
/// caught up with the writes made since. A second activation (the graph was consumed) builds.
#[tokio::test]
async fn activate_profile_adopts_the_held_winners_graph() {
    let s = TestServer::start().await;
    let mut c = s.index().await;
    create_index(&mut c, "p", DIM as u32, pb::Metric::L2).await;
    let all = points(&mut Gen::new(6), 0..1200, DIM);
    upsert(&mut c, "p", all.clone()).await;
    let mut a = s.autotune().await;
    harness(&mut a, "p").await;
    let stream = a
        .autotune(pb::AutotuneRequest {
            index_name: "p".into(),
            harness: "h".into(),
            grid: grid(),
            min_recall: Some(0.0),
            ..Default::default()
        })
        .await
        .expect("autotune")
        .into_inner();
    let fin = finish(stream).await;
    assert!(fin.promoted, "{}", fin.reason);
    assert!(fin.generation.is_none());
    let winner = fin.winner.expect("winner");
    let w = write_meanwhile(&mut c, "p", &all).await;
    common::put_profile(&mut c, "prof", &[("p", None)]).await;
    let g = common::activate(&mut c, "prof").await;
    assert_eq!(g.trial_id, winner.id, "the held graph, not a build");
    assert_eq!(g.config, winner.config);
    assert_eq!(g.config_source, pb::ConfigSource::Promoted as i32);
    serves_the_writes(&mut c, "p", &w, 1200).await;
    // The held graph was used up: activating again builds the promoted config.
    let g2 = common::activate(&mut c, "prof").await;
    assert_eq!(g2.trial_id, 0);
    assert_eq!(g2.config, winner.config);
    serves_the_writes(&mut c, "p", &w, 1200).await;
}

/// The snapshot files (not temp files) of a data dir.
fn snapshot_files(dir: &std::path::Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir.join("snapshots"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".snap"))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// A background snapshot taken after the job (here: writes stopped for 1 s) keeps the change
/// log after the points the trials were built over, so ActivateProfile still adopts the held
/// winner's graph, caught up with the writes, instead of building.
#[tokio::test]
async fn a_background_snapshot_after_the_job_keeps_the_held_graph_adoptable() {
    let s = TestServer::start_with(|c| {
        c.snapshot_idle = Some(std::time::Duration::from_secs(1));
    })
    .await;
    let mut c = s.index().await;
    create_index(&mut c, "b", DIM as u32, pb::Metric::L2).await;
    let all = points(&mut Gen::new(8), 0..1200, DIM);
    upsert(&mut c, "b", all.clone()).await;
    common::put_profile(&mut c, "prof", &[("b", None)]).await;
    // A build, which snapshots the points (so no background snapshot is due before the job).
    common::activate(&mut c, "prof").await;
    let first = snapshot_files(&s.dir);
    assert_eq!(first.len(), 1, "{first:?}");
    let mut a = s.autotune().await;
    harness(&mut a, "b").await;
    let stream = a
        .autotune(pb::AutotuneRequest {
            index_name: "b".into(),
            harness: "h".into(),
            grid: grid(),
            min_recall: Some(0.0),
            ..Default::default()
        })
        .await
        .expect("autotune")
        .into_inner();
    let fin = finish(stream).await;
    assert!(fin.promoted, "{}", fin.reason);
    let winner = fin.winner.expect("winner");
    let w = write_meanwhile(&mut c, "b", &all).await;
    eventually(
        std::time::Duration::from_secs(60),
        "a background snapshot of the writes",
        || async {
            let f = snapshot_files(&s.dir);
            (f.len() == 1 && f != first).then_some(())
        },
    )
    .await;
    let g = common::activate(&mut c, "prof").await;
    assert_eq!(g.trial_id, winner.id, "the held graph, not a build");
    serves_the_writes(&mut c, "b", &w, 1200).await;
}
