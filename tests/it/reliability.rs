//! Reliability (issue 22): DeleteIndex during an autotune job, retention of trials and job
//! records, and shutdown during a build (through the real binary).

use crate::common;

use std::time::{Duration, Instant};

use common::*;
use tonic::transport::Channel;
use tonic::Code;
use vectord::config::Config;
use vectord::pb;
use vectord::pb::autotune_service_client::AutotuneServiceClient;

use crate::common::child;

/// An index of `n` random `dim`-d L2 points.
async fn seeded_index(s: &TestServer, name: &str, n: u64, dim: usize) -> Vec<pb::Point> {
    let mut c = s.index().await;
    create_index(&mut c, name, dim as u32, pb::Metric::L2).await;
    let pts = points(&mut Gen::new(n), 0..n, dim);
    for chunk in pts.chunks(1000) {
        upsert(&mut c, name, chunk.to_vec()).await;
    }
    pts
}

async fn harness(a: &mut AutotuneServiceClient<Channel>, index: &str, name: &str, count: u32) {
    a.create_harness(harness_request(index, name, 10, count, Some(1)))
        .await
        .expect("create harness");
}

async fn all_jobs(a: &mut AutotuneServiceClient<Channel>) -> Vec<pb::Job> {
    a.list_jobs(pb::ListJobsRequest::default())
        .await
        .expect("list jobs")
        .into_inner()
        .jobs
}

async fn trials_of(a: &mut AutotuneServiceClient<Channel>, index: &str) -> Vec<pb::Trial> {
    a.list_trials(pb::ListTrialsRequest {
        index_name: index.into(),
        page_size: 1000,
        ..Default::default()
    })
    .await
    .expect("list trials")
    .into_inner()
    .trials
}

/// A grid slow enough to be caught running (seeded, big builds on a few thousand points); every
/// trial clears min_recall 0, so a job that finished would promote and activate its winner.
fn slow_grid() -> Vec<pb::HnswConfig> {
    (0..12)
        .map(|i| pb::HnswConfig {
            m: 32,
            ef_construction: 400,
            ef_search: 200,
            seed: Some(i),
        })
        .collect()
}

#[tokio::test]
async fn delete_index_cancels_its_job_and_nothing_reaches_an_index_recreated_under_its_name() {
    let s = TestServer::start().await;
    seeded_index(&s, "del", 3000, 32).await;
    let mut a = s.autotune().await;
    harness(&mut a, "del", "h", 50).await;
    // A policy that never triggers by itself: its state must not outlive the index.
    a.set_refresh_policy(pb::SetRefreshPolicyRequest {
        index_name: "del".into(),
        policy: Some(pb::RefreshPolicy {
            mode: pb::RefreshMode::OnAppend as i32,
            change_threshold: 100.0,
            harness: "h".into(),
            ..Default::default()
        }),
    })
    .await
    .expect("set policy");
    assert!(s.get_index("del").await.refresh_policy.is_some());

    let mut stream = a
        .autotune(pb::AutotuneRequest {
            index_name: "del".into(),
            harness: "h".into(),
            grid: slow_grid(),
            activate: true,
            min_recall: Some(0.0),
            ..Default::default()
        })
        .await
        .expect("autotune")
        .into_inner();
    let started = job_started(&mut stream).await;
    // The job is journaling: its first trial is out (after progress on its builds).
    let first = loop {
        let m = stream.message().await.expect("stream").expect("event");
        if !matches!(m.event, Some(pb::autotune_response::Event::Progress(_))) {
            break m;
        }
    };
    assert!(
        matches!(first.event, Some(pb::autotune_response::Event::Trial(_))),
        "{first:?}"
    );

    s.index()
        .await
        .delete_index(pb::DeleteIndexRequest { name: "del".into() })
        .await
        .expect("delete index");
    // DeleteIndex answered after the job's end was recorded.
    let job = all_jobs(&mut a)
        .await
        .into_iter()
        .find(|j| j.id == started.job_id)
        .expect("the job is listed");
    assert!(
        job.state == pb::JobState::Cancelled as i32 || job.state == pb::JobState::Failed as i32,
        "{job:?}"
    );
    assert!(job.reason.contains("deleted"), "{}", job.reason);
    assert!(job.trials_done < 12, "{job:?}");
    let (events, err) = collect(stream).await;
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, pb::autotune_response::Event::Finished(_))),
        "{events:?}"
    );
    assert_eq!(err.map(|e| e.code()), Some(Code::Cancelled));

    // The same name again, with a harness of the same name the old job could have used.
    seeded_index(&s, "del", 500, 32).await;
    harness(&mut a, "del", "h", 20).await;
    let idx = s.get_index("del").await;
    assert_eq!(idx.active_generation.as_ref().map(|g| g.number), Some(1));
    assert!(idx.refresh_policy.is_none(), "{:?}", idx.refresh_policy);
    assert!(trials_of(&mut a, "del").await.is_empty());
    let p = s.promoted("del").await;
    assert!(p.current.is_none() && p.history.is_empty(), "{p:?}");
    // And a new job on the new index is not refused because of the old one.
    let (events, err) = collect(
        a.autotune(pb::AutotuneRequest {
            index_name: "del".into(),
            harness: "h".into(),
            grid: vec![pb::HnswConfig {
                m: 8,
                ef_construction: 20,
                ef_search: 20,
                seed: Some(1),
            }],
            min_recall: Some(0.0),
            ..Default::default()
        })
        .await
        .expect("autotune on the new index")
        .into_inner(),
    )
    .await;
    assert!(err.is_none(), "{err:?}");
    assert!(matches!(
        events.last(),
        Some(pb::autotune_response::Event::Finished(_))
    ));
    assert_eq!(trials_of(&mut a, "del").await.len(), 1);
    assert_eq!(
        s.get_index("del").await.active_generation.map(|g| g.number),
        Some(1),
        "the new index's generation is its own (no activation was asked)"
    );
}

fn tiny(ef_search: u32) -> pb::HnswConfig {
    pb::HnswConfig {
        m: 8,
        ef_construction: 20,
        ef_search,
        seed: Some(3),
    }
}

async fn run_trial(
    a: &mut AutotuneServiceClient<Channel>,
    index: &str,
    harness: &str,
    ef_search: u32,
) -> u64 {
    a.run_trial(pb::RunTrialRequest {
        index_name: index.into(),
        harness: harness.into(),
        config: Some(tiny(ef_search)),
    })
    .await
    .expect("run trial")
    .into_inner()
    .trial
    .expect("trial")
    .id
}

async fn promote(s: &TestServer, index: &str, trial_id: u64) {
    s.promotion()
        .await
        .promote(pb::PromoteRequest {
            index_name: index.into(),
            trial_id,
            ..Default::default()
        })
        .await
        .expect("promote");
}

async fn trial_exists(a: &mut AutotuneServiceClient<Channel>, id: u64) -> bool {
    match a.get_trial(pb::GetTrialRequest { id }).await {
        Ok(_) => true,
        Err(e) if e.code() == Code::NotFound => false,
        Err(e) => panic!("get trial {id}: {e}"),
    }
}

#[tokio::test]
async fn trial_retention_keeps_the_newest_per_index_and_harness_and_every_promoted_trial() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut config = Config::for_tests(tmp.path());
    config.trials_kept = 3;
    let mut s = TestServer::start_in(tmp.path(), config).await;
    seeded_index(&s, "ret", 300, 8).await;
    let mut a = s.autotune().await;
    harness(&mut a, "ret", "h", 10).await;
    harness(&mut a, "ret", "other", 10).await;

    let mut ids = Vec::new();
    for ef in 10..12 {
        ids.push(run_trial(&mut a, "ret", "h", ef).await);
    }
    // t0 goes to the history, t1 is current: both are kept whatever comes after.
    promote(&s, "ret", ids[0]).await;
    promote(&s, "ret", ids[1]).await;
    let other = run_trial(&mut a, "ret", "other", 10).await;
    for ef in 12..18 {
        ids.push(run_trial(&mut a, "ret", "h", ef).await);
    }
    // 8 trials on h: the newest 3 stay, plus the two promoted; the other harness is counted
    // on its own.
    let listed: Vec<u64> = trials_of(&mut a, "ret")
        .await
        .iter()
        .filter(|t| t.harness == "h")
        .map(|t| t.id)
        .collect();
    let mut expected = vec![ids[7], ids[6], ids[5], ids[1], ids[0]];
    expected.sort_unstable_by(|x, y| y.cmp(x));
    assert_eq!(listed, expected);
    for id in &ids[2..5] {
        assert!(
            !trial_exists(&mut a, *id).await,
            "trial {id} is past the retention"
        );
    }
    assert!(trial_exists(&mut a, other).await);
    let p = s.promoted("ret").await;
    assert_eq!(p.current.map(|c| c.trial_id), Some(ids[1]));

    // Rolling back to a kept history entry works, and the retention holds across a restart.
    s.promotion()
        .await
        .rollback(pb::RollbackRequest {
            index_name: "ret".into(),
        })
        .await
        .expect("rollback");
    s.stop().await;
    let mut config = Config::for_tests(tmp.path());
    config.trials_kept = 3;
    let s = TestServer::start_in(tmp.path(), config).await;
    let mut a = s.autotune().await;
    let newest = run_trial(&mut a, "ret", "h", 30).await;
    let listed: Vec<u64> = trials_of(&mut a, "ret")
        .await
        .iter()
        .filter(|t| t.harness == "h")
        .map(|t| t.id)
        .collect();
    // ids[1] left current and history by the rollback: it is an ordinary old trial now.
    assert_eq!(listed, vec![newest, ids[7], ids[6], ids[0]]);
}

#[tokio::test]
async fn finished_job_records_are_bounded_on_disk_by_jobs_kept() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut config = Config::for_tests(tmp.path());
    config.jobs_kept = 2;
    let mut s = TestServer::start_in(tmp.path(), config).await;
    seeded_index(&s, "jobs", 200, 8).await;
    let mut a = s.autotune().await;
    harness(&mut a, "jobs", "h", 10).await;
    let mut ids = Vec::new();
    for i in 0..4 {
        let mut stream = a
            .autotune(pb::AutotuneRequest {
                index_name: "jobs".into(),
                harness: "h".into(),
                grid: vec![tiny(10 + i)],
                min_recall: Some(0.0),
                ..Default::default()
            })
            .await
            .expect("autotune")
            .into_inner();
        let st = job_started(&mut stream).await;
        let (_, err) = collect(stream).await;
        assert!(err.is_none(), "{err:?}");
        ids.push(st.job_id);
    }
    let listed: Vec<String> = all_jobs(&mut a).await.into_iter().map(|j| j.id).collect();
    assert_eq!(listed, vec![ids[3].clone(), ids[2].clone()]);
    // What is on disk, not only what is listed: a server allowed to list more finds only 2.
    s.stop().await;
    let mut config = Config::for_tests(tmp.path());
    config.jobs_kept = 50;
    let s = TestServer::start_in(tmp.path(), config).await;
    let mut a = s.autotune().await;
    let listed: Vec<String> = all_jobs(&mut a).await.into_iter().map(|j| j.id).collect();
    assert_eq!(listed, vec![ids[3].clone(), ids[2].clone()]);
}

/// SIGTERM while ActivateProfile builds (a build slowed by the binary's test hook): the build
/// stops at its next chunk, the process exits 0 well within the grace period, and a restart
/// serves every point with the generation recorded before the activation.
#[tokio::test]
async fn sigterm_stops_an_activation_build_and_the_previous_generation_serves() {
    use child::Vectord;
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().to_str().expect("utf-8 path").to_string();
    let grace = 3u64;
    let grace_s = grace.to_string();
    let args = [
        "--addr",
        "127.0.0.1:0",
        "--data-dir",
        &dir,
        "--shutdown-grace-secs",
        &grace_s,
    ];
    // 3,000 points in seeded chunks of 256: 12 chunks of 1 s each, a 12 s build.
    let delay = std::path::Path::new("1000");
    let mut v = Vectord::spawn(
        "slow builds",
        &args,
        &[("VECTORD_TEST_BUILD_CHUNK_DELAY_MS", delay)],
    );
    let addr = v.wait_listening().await;
    v.wait_serving(addr).await;
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut c = vectord::pb::index_service_client::IndexServiceClient::new(channel);
    create_index(&mut c, "big", 16, pb::Metric::L2).await;
    let pts = points(&mut Gen::new(9), 0..3000, 16);
    for chunk in pts.chunks(1000) {
        upsert(&mut c, "big", chunk.to_vec()).await;
    }
    let before = c
        .get_index(pb::GetIndexRequest { name: "big".into() })
        .await
        .expect("get index")
        .into_inner()
        .index
        .expect("index")
        .active_generation
        .expect("generation");
    common::put_profile(
        &mut c,
        "p",
        &[(
            "big",
            Some(pb::HnswConfig {
                m: 12,
                ef_construction: 60,
                ef_search: 40,
                seed: Some(5),
            }),
        )],
    )
    .await;
    let mut c2 = c.clone();
    let activation = tokio::spawn(async move {
        c2.activate_profile(pb::ActivateProfileRequest { name: "p".into() })
            .await
    });
    v.wait_line("the activation's build starting", |l| {
        l.contains("building HNSW index=big")
    })
    .await;
    let signalled = Instant::now();
    v.signal("TERM");
    let status = v.wait_exit().await;
    let took = signalled.elapsed();
    assert!(status.success(), "exit status {status}");
    assert!(
        took < Duration::from_secs(grace) + Duration::from_secs(2),
        "exited {took:?} after SIGTERM; the grace period is {grace} s and the build had ~11 s left"
    );
    let answer = activation.await.expect("activation task");
    let code = answer.as_ref().map_err(|e| e.code()).err();
    assert!(
        matches!(code, Some(Code::Unavailable)),
        "the interrupted activation answers UNAVAILABLE: {answer:?}"
    );

    let mut v = Vectord::spawn("restart", &args, &[]);
    let addr = v.wait_listening().await;
    v.wait_serving(addr).await;
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut c = vectord::pb::index_service_client::IndexServiceClient::new(channel);
    let idx = c
        .get_index(pb::GetIndexRequest { name: "big".into() })
        .await
        .expect("get index")
        .into_inner()
        .index
        .expect("index");
    assert_eq!(idx.point_count, 3000);
    let g = idx.active_generation.expect("generation");
    assert_eq!((g.number, g.config), (before.number, before.config));
    let r = search(&mut c, "big", pts[17].vector.clone(), 1, None).await;
    assert_eq!(r.neighbors.first().map(|h| h.id), Some(17), "{r:?}");
    v.signal("TERM");
    assert!(v.wait_exit().await.success());
}
