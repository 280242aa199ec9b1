//! Refresh policies against a real server: ON_APPEND starts exactly one tune after the changed
//! points cross the threshold (and none while a job runs), the recall-floor probe starts a tune
//! on a deliberately bad promoted config, and the policy is durable.

use crate::common;

use std::time::Duration;

use common::*;
use tonic::Code;
use vectord::config::Config;
use vectord::pb;

/// Waits (bounded) for a finished job requested by the refresh policy.
async fn wait_refresh_job(s: &TestServer, index: &str) -> pb::Job {
    let what = format!("a refresh job finished on {index}");
    eventually(Duration::from_secs(90), &what, || async {
        s.jobs(index)
            .await
            .into_iter()
            .find(|j| j.requested_by == "refresh-policy" && j.state != pb::JobState::Running as i32)
    })
    .await
}

async fn harness(s: &TestServer, index: &str, count: u32) {
    s.autotune()
        .await
        .create_harness(harness_request(index, "h", 10, count, Some(1)))
        .await
        .expect("harness");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_append_starts_one_tune_after_the_threshold_and_none_while_a_job_runs() {
    let s = TestServer::start().await;
    let mut c = s.index().await;
    let mut g = Gen::new(4);
    create_index(&mut c, "app", 16, pb::Metric::L2).await;
    upsert(&mut c, "app", points(&mut g, 0..200, 16)).await;
    harness(&s, "app", 20).await;

    // Bad policies are refused and change nothing.
    for (what, p) in [
        ("threshold 0", on_append(0.0)),
        (
            "no harness",
            pb::RefreshPolicy {
                harness: String::new(),
                ..on_append(0.2)
            },
        ),
        (
            "unknown mode",
            pb::RefreshPolicy {
                mode: 9,
                ..on_append(0.2)
            },
        ),
        (
            "floor 2",
            pb::RefreshPolicy {
                recall_floor: Some(2.0),
                ..on_append(0.2)
            },
        ),
        (
            "adaptive without target",
            pb::RefreshPolicy {
                adaptive: true,
                ..on_append(0.2)
            },
        ),
    ] {
        assert_eq!(
            code_of(set_policy(&s, "app", Some(p)).await),
            Code::InvalidArgument,
            "{what}"
        );
    }
    let unknown_harness = pb::RefreshPolicy {
        harness: "nope".into(),
        ..on_append(0.2)
    };
    assert_eq!(
        code_of(set_policy(&s, "app", Some(unknown_harness)).await),
        Code::NotFound
    );
    assert_eq!(
        code_of(set_policy(&s, "nope", Some(on_append(0.2))).await),
        Code::NotFound
    );
    assert!(s.get_index("app").await.refresh_policy.is_none());

    let saved = set_policy(&s, "app", Some(on_append(0.25)))
        .await
        .expect("set");
    assert_eq!(saved.mode, pb::RefreshMode::OnAppend as i32);
    // 200 points were upserted before the policy and before any tune: that is 100% changed,
    // so setting the policy starts a tune at once.
    let first = wait_refresh_job(&s, "app").await;
    assert_eq!(first.state, pb::JobState::Succeeded as i32, "{first:?}");
    let st = s.get_index("app").await.refresh_status.expect("status");
    assert_eq!(st.points_changed_since_tune, 0);
    assert_eq!(st.last_job_id, first.id);

    // 40 of 200 changed (20%): under the threshold, no job.
    upsert(&mut c, "app", points(&mut g, 200..240, 16)).await;
    let st = s.get_index("app").await.refresh_status.expect("status");
    assert_eq!(st.points_changed_since_tune, 40);
    assert_eq!(s.jobs("app").await.len(), 1);

    // 30 more (70 of 270 = 26%): crosses it; exactly one more job, decided by the time the
    // write is acknowledged.
    upsert(&mut c, "app", points(&mut g, 240..270, 16)).await;
    let st = s.get_index("app").await.refresh_status.expect("status");
    assert!(st.last_trigger.starts_with("started: 70 of 270"), "{st:?}");
    let second = eventually(Duration::from_secs(90), "the second job ends", || async {
        let js: Vec<pb::Job> = s
            .jobs("app")
            .await
            .into_iter()
            .filter(|j| j.id != first.id)
            .collect();
        let done = js
            .iter()
            .find(|j| j.state != pb::JobState::Running as i32)?;
        assert_eq!(js.len(), 1, "{js:?}");
        Some(done.clone())
    })
    .await;
    assert_eq!(second.requested_by, "refresh-policy");
    assert_eq!(s.jobs("app").await.len(), 2);

    // While a job runs (a slow manual one), crossing the threshold starts nothing.
    let mut a = s.autotune().await;
    let slow: Vec<pb::HnswConfig> = (0..300)
        .map(|i| pb::HnswConfig {
            m: 16,
            ef_construction: 400,
            ef_search: 200,
            seed: Some(i),
        })
        .collect();
    let mut stream = a
        .autotune(pb::AutotuneRequest {
            index_name: "app".into(),
            harness: "h".into(),
            grid: slow,
            ..Default::default()
        })
        .await
        .expect("manual job")
        .into_inner();
    let started = job_started(&mut stream).await;
    upsert(&mut c, "app", points(&mut g, 270..400, 16)).await;
    let st = s.get_index("app").await.refresh_status.expect("status");
    assert!(
        st.last_trigger.starts_with("skipped") && st.last_trigger.contains(&started.job_id),
        "{st:?}"
    );
    let js = s.jobs("app").await;
    assert_eq!(js.len(), 3, "{js:?}");
    assert_eq!(
        js.iter()
            .filter(|j| j.requested_by == "refresh-policy")
            .count(),
        2
    );
    a.cancel_job(pb::CancelJobRequest {
        id: started.job_id.clone(),
    })
    .await
    .expect("cancel");
    drop(stream);

    // Clearing the policy (MANUAL) is durable, as is setting it.
    set_policy(&s, "app", Some(on_append(0.5)))
        .await
        .expect("set");
    let s = s.restart().await;
    let p = s
        .get_index("app")
        .await
        .refresh_policy
        .expect("policy kept");
    assert_eq!(p.change_threshold, 0.5);
    let cleared = set_policy(
        &s,
        "app",
        Some(pb::RefreshPolicy {
            mode: pb::RefreshMode::Manual as i32,
            ..Default::default()
        }),
    )
    .await
    .expect("clear");
    assert_eq!(cleared.mode, pb::RefreshMode::Manual as i32);
    let s = s.restart().await;
    assert!(s.get_index("app").await.refresh_policy.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recall_floor_probe_retunes_a_bad_promoted_config() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut config = Config::for_tests(tmp.path());
    config.refresh_probe_interval = Duration::from_millis(50);
    let s = TestServer::start_in(tmp.path(), config).await;
    let mut c = s.index().await;
    create_index(&mut c, "bad", 32, pb::Metric::L2).await;
    upsert(&mut c, "bad", points(&mut Gen::new(8), 0..1500, 32)).await;
    harness(&s, "bad", 40).await;

    // A deliberately bad config, promoted and activated through a profile.
    let mut a = s.autotune().await;
    let bad = a
        .run_trial(pb::RunTrialRequest {
            index_name: "bad".into(),
            harness: "h".into(),
            config: Some(pb::HnswConfig {
                m: 2,
                ef_construction: 10,
                ef_search: 10,
                seed: Some(1),
            }),
        })
        .await
        .expect("trial")
        .into_inner()
        .trial
        .expect("trial");
    assert!(
        bad.recall < 0.95,
        "the bad config is not bad: {}",
        bad.recall
    );
    let mut p = s.promotion().await;
    p.promote(pb::PromoteRequest {
        index_name: "bad".into(),
        trial_id: bad.id,
        ..Default::default()
    })
    .await
    .expect("promote");
    c.put_profile(pb::PutProfileRequest {
        profile: Some(pb::Profile {
            name: "prod".into(),
            indexes: vec![pb::ProfileIndex {
                index_name: "bad".into(),
                ..Default::default()
            }],
        }),
    })
    .await
    .expect("profile");
    c.activate_profile(pb::ActivateProfileRequest {
        name: "prod".into(),
    })
    .await
    .expect("activate");
    assert_eq!(
        s.get_index("bad")
            .await
            .active_generation
            .and_then(|g| g.config)
            .map(|c| c.m),
        Some(2)
    );

    // The policy's threshold is never crossed (100x the points): only the probe can act.
    let policy = pb::RefreshPolicy {
        recall_floor: Some(0.99),
        activate: true,
        ..on_append(100.0)
    };
    set_policy(&s, "bad", Some(policy)).await.expect("set");
    let job = wait_refresh_job(&s, "bad").await;
    assert_eq!(job.state, pb::JobState::Succeeded as i32, "{job:?}");
    let idx = s.get_index("bad").await;
    let st = idx.refresh_status.expect("status");
    // The trigger names the probe's recall (the bad config's), under the floor.
    let probed: f64 = st
        .last_trigger
        .strip_prefix("started: probe recall ")
        .and_then(|r| r.split(' ').next())
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("{st:?}"));
    assert!(probed < 0.99, "{st:?}");
    assert!(st.last_probe_recall.is_some());
    assert_eq!(st.last_job_id, job.id);
    // The tune promoted and activated something better than the bad config.
    let promoted = p
        .get_promoted(pb::GetPromotedRequest {
            index_name: "bad".into(),
        })
        .await
        .expect("promoted")
        .into_inner()
        .current
        .expect("current");
    assert_ne!(promoted.trial_id, bad.id);
    assert!(promoted.recall > bad.recall);
    // Later probes of the same data start no second tune, even if still under the floor.
    let now = s.get_index("bad").await.refresh_status.expect("status");
    let t0 = now
        .last_probe_time
        .map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000);
    eventually(
        Duration::from_secs(30),
        "a probe after the tune",
        || async {
            let st = s.get_index("bad").await.refresh_status.expect("status");
            let t = st
                .last_probe_time
                .map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000);
            (t > t0).then_some(())
        },
    )
    .await;
    let refresh_jobs = s
        .jobs("bad")
        .await
        .into_iter()
        .filter(|j| j.requested_by == "refresh-policy")
        .count();
    assert_eq!(refresh_jobs, 1);
}
