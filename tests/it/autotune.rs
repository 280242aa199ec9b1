//! Harnesses, the trial journal, the promotion registry and autotune jobs against a real
//! server.

use crate::common;

use std::time::Duration;

use common::*;
use tonic::transport::Channel;
use tonic::Code;
use vectord::pb;
use vectord::pb::autotune_service_client::AutotuneServiceClient;
use vectord::pb::promotion_service_client::PromotionServiceClient;

async fn sampled_harness(
    a: &mut AutotuneServiceClient<Channel>,
    index: &str,
    name: &str,
    count: u32,
    seed: Option<u64>,
) -> pb::Harness {
    a.create_harness(harness_request(index, name, 10, count, seed))
        .await
        .expect("create harness")
        .into_inner()
        .harness
        .expect("harness")
}

fn cfg(m: u32, ef_construction: u32, ef_search: u32) -> pb::HnswConfig {
    pb::HnswConfig {
        m,
        ef_construction,
        ef_search,
        seed: Some(42),
    }
}

async fn trial(
    a: &mut AutotuneServiceClient<Channel>,
    index: &str,
    harness: &str,
    c: pb::HnswConfig,
) -> pb::Trial {
    a.run_trial(pb::RunTrialRequest {
        index_name: index.into(),
        harness: harness.into(),
        config: Some(c),
    })
    .await
    .expect("run trial")
    .into_inner()
    .trial
    .expect("trial")
}

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

async fn job(a: &mut AutotuneServiceClient<Channel>, id: &str) -> pb::Job {
    a.list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs
        .into_iter()
        .find(|j| j.id == id)
        .expect("job listed")
}

/// Waits (bounded) until the job is no longer RUNNING.
async fn wait_job_end(a: &mut AutotuneServiceClient<Channel>, id: &str) -> pb::Job {
    eventually(Duration::from_secs(60), &format!("job {id} ends"), || {
        let mut a = a.clone();
        async move { Some(job(&mut a, id).await).filter(|j| j.state != pb::JobState::Running as i32) }
    })
    .await
}

#[tokio::test]
async fn harness_round_trip_and_errors() {
    let s = TestServer::start().await;
    seeded_index(&s, "h", 100, 8).await;
    let mut a = s.autotune().await;
    let h = sampled_harness(&mut a, "h", "smoke", 10, None).await;
    assert_eq!((h.k, h.query_count, h.seed), (10, 10, Some(42)));
    let got = a
        .get_harness(pb::GetHarnessRequest {
            index_name: "h".into(),
            name: "smoke".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.harness.unwrap().query_count, 10);
    let explicit = a
        .create_harness(pb::CreateHarnessRequest {
            index_name: "h".into(),
            name: "mine".into(),
            k: 0,
            queries: Some(pb::create_harness_request::Queries::Explicit(
                pb::ExplicitQueries {
                    queries: vec![pb::QueryVector {
                        vector: vec![0.5; 8],
                    }],
                },
            )),
        })
        .await
        .unwrap()
        .into_inner()
        .harness
        .unwrap();
    assert_eq!(
        (explicit.k, explicit.query_count, explicit.seed),
        (10, 1, None)
    );
    let list = a
        .list_harnesses(pb::ListHarnessesRequest {
            index_name: "h".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.harnesses.len(), 2);

    let dup = a
        .create_harness(harness_request("h", "smoke", 10, 5, None))
        .await;
    assert_eq!(code_of(dup), Code::AlreadyExists);
    let too_many = a
        .create_harness(harness_request("h", "big", 10, 101, None))
        .await;
    assert_eq!(code_of(too_many), Code::InvalidArgument);
    let wrong_dim = a
        .create_harness(pb::CreateHarnessRequest {
            index_name: "h".into(),
            name: "w".into(),
            k: 10,
            queries: Some(pb::create_harness_request::Queries::Explicit(
                pb::ExplicitQueries {
                    queries: vec![pb::QueryVector {
                        vector: vec![0.5; 7],
                    }],
                },
            )),
        })
        .await;
    assert_eq!(code_of(wrong_dim), Code::InvalidArgument);
    let none = a
        .create_harness(pb::CreateHarnessRequest {
            index_name: "h".into(),
            name: "n".into(),
            k: 10,
            queries: None,
        })
        .await;
    assert_eq!(code_of(none), Code::InvalidArgument);
    let unknown = a
        .create_harness(harness_request("nope", "n", 10, 1, None))
        .await;
    assert_eq!(code_of(unknown), Code::NotFound);
    a.delete_harness(pb::DeleteHarnessRequest {
        index_name: "h".into(),
        name: "mine".into(),
    })
    .await
    .unwrap();
    assert_eq!(
        code_of(
            a.get_harness(pb::GetHarnessRequest {
                index_name: "h".into(),
                name: "mine".into()
            })
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code_of(
            a.delete_harness(pb::DeleteHarnessRequest {
                index_name: "h".into(),
                name: "mine".into()
            })
            .await
        ),
        Code::NotFound
    );
}

#[tokio::test]
async fn trials_measure_sanely_exclude_self_matches_and_follow_point_changes() {
    let s = TestServer::start().await;
    let pts = seeded_index(&s, "t", 54, 8).await;
    let mut a = s.autotune().await;
    sampled_harness(&mut a, "t", "smoke", 10, Some(42)).await;
    sampled_harness(&mut a, "t", "smoke2", 10, Some(42)).await;
    // On 54 points, ef 200 searches exhaustively: with the query itself excluded from both
    // truth and results, recall is exactly 1 (a self-match would push out the 10th neighbour).
    let t = trial(&mut a, "t", "smoke", cfg(16, 200, 200)).await;
    assert_eq!(t.recall, 1.0);
    assert_eq!((t.k, t.point_count, t.source.as_str()), (10, 54, "manual"));
    assert!(t.p50_micros > 0.0 && t.p50_micros <= t.p95_micros && t.p95_micros <= t.p99_micros);
    assert!(t.qps > 0.0 && t.memory_bytes > 54 * 8 * 4);
    // Same seed, same queries: the same seeded build measures the same recall.
    let t2 = trial(&mut a, "t", "smoke2", cfg(16, 200, 200)).await;
    assert_eq!(t2.recall, t.recall);
    assert!(t2.id > t.id);

    // A new point exactly at a query: the stale ground truth would not have it, and the
    // trial would score it a miss. Recomputed, recall stays 1 (at ef_search 512, the top of
    // a trial's range and of ADAPTIVE's ladder).
    let mut c = s.index().await;
    let mut close = pts.clone();
    for p in close.iter_mut() {
        p.id += 1000;
        p.vector.iter_mut().for_each(|x| *x += 1e-4);
    }
    upsert(&mut c, "t", close).await;
    let t3 = trial(&mut a, "t", "smoke", cfg(16, 200, 512)).await;
    assert_eq!(t3.point_count, 108);
    assert_eq!(t3.recall, 1.0);

    // Bounds: nothing journaled.
    let before = a
        .list_trials(pb::ListTrialsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .trials
        .len();
    for (bad, field) in [
        (cfg(1, 100, 50), "m"),
        (cfg(129, 100, 50), "m"),
        (cfg(16, 9, 50), "ef_construction"),
        (cfg(16, 401, 50), "ef_construction"),
        (cfg(16, 100, 9), "ef_search"),
        (cfg(16, 100, 513), "ef_search"),
    ] {
        let e = a
            .run_trial(pb::RunTrialRequest {
                index_name: "t".into(),
                harness: "smoke".into(),
                config: Some(bad),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains(field), "{}", e.message());
    }
    assert_eq!(
        code_of(
            a.run_trial(pb::RunTrialRequest {
                index_name: "t".into(),
                harness: "smoke".into(),
                config: None
            })
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code_of(
            a.run_trial(pb::RunTrialRequest {
                index_name: "nope".into(),
                harness: "smoke".into(),
                config: Some(cfg(16, 100, 50))
            })
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code_of(
            a.run_trial(pb::RunTrialRequest {
                index_name: "t".into(),
                harness: "nope".into(),
                config: Some(cfg(16, 100, 50))
            })
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        a.list_trials(pb::ListTrialsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .trials
            .len(),
        before
    );

    // An index emptied of points: FAILED_PRECONDITION.
    let ids: Vec<u64> = (0..54).chain(1000..1054).collect();
    c.delete_points(pb::DeletePointsRequest {
        index_name: "t".into(),
        ids,
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(
        code_of(
            a.run_trial(pb::RunTrialRequest {
                index_name: "t".into(),
                harness: "smoke".into(),
                config: Some(cfg(16, 100, 50))
            })
            .await
        ),
        Code::FailedPrecondition
    );
}

#[tokio::test]
async fn the_journal_pages_newest_first_and_survives_restart() {
    let s = TestServer::start().await;
    seeded_index(&s, "j", 60, 4).await;
    seeded_index(&s, "k", 60, 4).await;
    let mut a = s.autotune().await;
    sampled_harness(&mut a, "j", "h", 5, None).await;
    sampled_harness(&mut a, "k", "h", 5, None).await;
    let mut ids = Vec::new();
    for ef in [10, 20, 30] {
        ids.push(trial(&mut a, "j", "h", cfg(8, 20, ef)).await.id);
        trial(&mut a, "k", "h", cfg(8, 20, ef)).await;
    }
    let p1 = a
        .list_trials(pb::ListTrialsRequest {
            index_name: "j".into(),
            harness: String::new(),
            page_size: 2,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let p2 = a
        .list_trials(pb::ListTrialsRequest {
            index_name: "j".into(),
            harness: String::new(),
            page_size: 2,
            page_token: p1.next_page_token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let got: Vec<u64> = p1.trials.iter().chain(&p2.trials).map(|t| t.id).collect();
    assert_eq!(got, ids.iter().rev().copied().collect::<Vec<_>>());
    assert!(p2.next_page_token.is_empty());
    assert_eq!(
        code_of(
            a.list_trials(pb::ListTrialsRequest {
                page_token: "nonsense".into(),
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code_of(a.get_trial(pb::GetTrialRequest { id: 999 }).await),
        Code::NotFound
    );

    let s = s.restart().await;
    let mut a = s.autotune().await;
    let all = a
        .list_trials(pb::ListTrialsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .trials;
    assert_eq!(all.len(), 6);
    let t = a
        .get_trial(pb::GetTrialRequest { id: ids[0] })
        .await
        .unwrap()
        .into_inner()
        .trial
        .unwrap();
    assert_eq!(t.config.unwrap().ef_search, 10);
    let next = trial(&mut a, "j", "h", cfg(8, 20, 40)).await;
    assert!(
        next.id > all.iter().map(|t| t.id).max().unwrap(),
        "trial ids must keep increasing across restarts"
    );

    // DeleteIndex takes its trials, harnesses and promotions with it.
    let mut c = s.index().await;
    c.delete_index(pb::DeleteIndexRequest { name: "k".into() })
        .await
        .unwrap();
    let left = a
        .list_trials(pb::ListTrialsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .trials;
    assert!(left.iter().all(|t| t.index_name == "j"));
}

/// Index "p" with two trials and a promotion client; "other" with one trial (`foreign`).
struct Promotions {
    s: TestServer,
    pr: PromotionServiceClient<Channel>,
    t1: pb::Trial,
    t2: pb::Trial,
    foreign: pb::Trial,
}

async fn promotions() -> Promotions {
    let s = TestServer::start().await;
    seeded_index(&s, "p", 80, 4).await;
    seeded_index(&s, "other", 20, 4).await;
    let mut a = s.autotune().await;
    let pr = s.promotion().await;
    sampled_harness(&mut a, "p", "h", 5, None).await;
    sampled_harness(&mut a, "other", "h", 5, None).await;
    let t1 = trial(&mut a, "p", "h", cfg(8, 40, 30)).await;
    let t2 = trial(&mut a, "p", "h", cfg(12, 60, 50)).await;
    let foreign = trial(&mut a, "other", "h", cfg(8, 40, 30)).await;
    Promotions {
        s,
        pr,
        t1,
        t2,
        foreign,
    }
}

/// A promotion of trial `id` of index "p" by alice.
fn promote(id: u64) -> pb::PromoteRequest {
    pb::PromoteRequest {
        index_name: "p".into(),
        trial_id: id,
        promoted_by: "alice".into(),
        note: format!("n{id}"),
    }
}

#[tokio::test]
async fn promote_then_rollback_walks_the_history_back_to_nothing() {
    // `_s` keeps the server up (an unbound field would drop it here).
    let Promotions {
        s: _s,
        mut pr,
        t1,
        t2,
        ..
    } = promotions().await;
    let r = pr.promote(promote(t1.id)).await.unwrap().into_inner();
    assert_eq!(r.history_depth, 0);
    let cur = r.current.unwrap();
    assert_eq!(
        (cur.trial_id, cur.recall, cur.p50_micros),
        (t1.id, t1.recall, t1.p50_micros)
    );
    assert_eq!(cur.config, t1.config);
    assert_eq!(cur.promoted_by, "alice");
    let r = pr.promote(promote(t2.id)).await.unwrap().into_inner();
    assert_eq!((r.current.unwrap().trial_id, r.history_depth), (t2.id, 1));
    let r = pr
        .rollback(pb::RollbackRequest {
            index_name: "p".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.current.unwrap().trial_id, r.history_depth), (t1.id, 0));
    let r = pr
        .rollback(pb::RollbackRequest {
            index_name: "p".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.current.is_none());
    assert_eq!(r.history_depth, 0);
    assert_eq!(
        code_of(
            pr.rollback(pb::RollbackRequest {
                index_name: "p".into()
            })
            .await
        ),
        Code::FailedPrecondition
    );
}

#[tokio::test]
async fn promote_refuses_unknown_and_foreign_trials_and_unknown_indexes() {
    let Promotions {
        s: _s,
        mut pr,
        t1,
        foreign,
        ..
    } = promotions().await;
    assert_eq!(code_of(pr.promote(promote(9999)).await), Code::NotFound);
    assert_eq!(
        code_of(pr.promote(promote(foreign.id)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code_of(
            pr.promote(pb::PromoteRequest {
                index_name: "nope".into(),
                trial_id: t1.id,
                ..Default::default()
            })
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code_of(
            pr.get_promoted(pb::GetPromotedRequest {
                index_name: "nope".into()
            })
            .await
        ),
        Code::NotFound
    );
}

#[tokio::test]
async fn history_keeps_the_newest_50_across_a_restart_and_activation_follows_it() {
    let Promotions {
        s, mut pr, t1, t2, ..
    } = promotions().await;
    // 52 promotions: the history keeps the newest 50, newest first.
    for i in 0..52 {
        pr.promote(promote(if i % 2 == 0 { t1.id } else { t2.id }))
            .await
            .unwrap();
    }
    let g = pr
        .get_promoted(pb::GetPromotedRequest {
            index_name: "p".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g.history.len(), 50);
    assert_eq!(g.current.as_ref().unwrap().trial_id, t2.id);
    assert_eq!(g.history[0].trial_id, t1.id);
    let ts = |p: &pb::Promotion| p.promote_time.map(|t| (t.seconds, t.nanos));
    assert!(g.history.windows(2).all(|w| ts(&w[0]) >= ts(&w[1])));

    // Activation builds with the promoted config; after rollbacks clear it, with the default.
    let mut c = s.index().await;
    common::put_profile(&mut c, "prof", &[("p", None)]).await;
    let s = s.restart().await;
    let mut pr = s.promotion().await;
    let mut c = s.index().await;
    let g2 = pr
        .get_promoted(pb::GetPromotedRequest {
            index_name: "p".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g2.current, g.current, "promotion survives a restart");
    assert_eq!(g2.history.len(), 50);
    let act = c
        .activate_profile(pb::ActivateProfileRequest {
            name: "prof".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        act.generations[0].config_source,
        pb::ConfigSource::Promoted as i32
    );
    assert_eq!(act.generations[0].config, t2.config);
    for _ in 0..51 {
        pr.rollback(pb::RollbackRequest {
            index_name: "p".into(),
        })
        .await
        .unwrap();
    }
    let act = c
        .activate_profile(pb::ActivateProfileRequest {
            name: "prof".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        act.generations[0].config_source,
        pb::ConfigSource::Default as i32
    );
    let d = act.generations[0].config.unwrap();
    assert_eq!((d.m, d.ef_construction, d.ef_search), (16, 200, 64));
}

#[tokio::test]
async fn concurrent_promotes_and_rollbacks_keep_a_consistent_history() {
    let s = TestServer::start().await;
    seeded_index(&s, "cc", 40, 4).await;
    let mut a = s.autotune().await;
    sampled_harness(&mut a, "cc", "h", 5, None).await;
    let mut trials = Vec::new();
    for ef in [10, 20, 30, 40] {
        trials.push(trial(&mut a, "cc", "h", cfg(8, 20, ef)).await.id);
    }
    let mut tasks = Vec::new();
    for w in 0..8u64 {
        let mut pr = s.promotion().await;
        let trials = trials.clone();
        tasks.push(tokio::spawn(async move {
            let (mut promotes, mut rollbacks) = (0i64, 0i64);
            for i in 0..20u64 {
                if (w + i) % 2 == 0 {
                    if pr
                        .rollback(pb::RollbackRequest {
                            index_name: "cc".into(),
                        })
                        .await
                        .is_ok()
                    {
                        rollbacks += 1;
                    }
                } else {
                    pr.promote(pb::PromoteRequest {
                        index_name: "cc".into(),
                        trial_id: trials[(i % 4) as usize],
                        promoted_by: format!("w{w}"),
                        note: format!("{w}-{i}"),
                    })
                    .await
                    .unwrap();
                    promotes += 1;
                }
            }
            (promotes, rollbacks)
        }));
    }
    let (mut promotes, mut rollbacks) = (0, 0);
    for t in tasks {
        let (p, r) = t.await.unwrap();
        promotes += p;
        rollbacks += r;
    }
    let mut pr = s.promotion().await;
    let g = pr
        .get_promoted(pb::GetPromotedRequest {
            index_name: "cc".into(),
        })
        .await
        .unwrap()
        .into_inner();
    // Every promote adds one entry (current or history), every successful rollback removes one:
    // nothing lost, nothing duplicated (the cap of 50 is not reached here).
    let entries = g.history.len() as i64 + i64::from(g.current.is_some());
    assert_eq!(
        entries,
        promotes - rollbacks,
        "promotes {promotes}, rollbacks {rollbacks}"
    );
    let mut notes: Vec<_> = g
        .history
        .iter()
        .chain(g.current.iter())
        .map(|p| p.note.clone())
        .collect();
    notes.sort();
    notes.dedup();
    assert_eq!(notes.len() as i64, entries, "an entry was duplicated");
}

#[tokio::test]
async fn reference_scenario_threat_intel() {
    let s = TestServer::start().await;
    seeded_index(&s, "threat_intel_v1", 54, 16).await;
    let mut a = s.autotune().await;
    let mut pr = s.promotion().await;
    sampled_harness(
        &mut a,
        "threat_intel_v1",
        "threat_intel_smoke",
        10,
        Some(42),
    )
    .await;
    let stream = a
        .autotune(pb::AutotuneRequest {
            index_name: "threat_intel_v1".into(),
            harness: "threat_intel_smoke".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (events, err) = collect(stream).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(events.len(), 7, "started, 5 trials, finished");
    let pb::autotune_response::Event::Started(started) = &events[0] else {
        panic!("first event is not started")
    };
    let grid: Vec<_> = started
        .grid
        .iter()
        .map(|c| (c.ef_construction, c.ef_search, c.m, c.seed))
        .collect();
    assert_eq!(
        grid,
        [
            (20, 30, 16, Some(42)),
            (40, 30, 16, Some(42)),
            (80, 30, 16, Some(42)),
            (80, 60, 16, Some(42)),
            (160, 30, 16, Some(42))
        ]
    );
    let trials: Vec<pb::Trial> = events[1..6]
        .iter()
        .map(|e| match e {
            pb::autotune_response::Event::Trial(t) => t.clone(),
            other => panic!("expected a trial, got {other:?}"),
        })
        .collect();
    for (t, c) in trials.iter().zip(&started.grid) {
        assert_eq!(t.config.as_ref(), Some(c));
        assert_eq!(t.source, format!("autotune:{}", started.job_id));
    }
    // (80, 30) and (80, 60) share one build.
    assert_eq!(trials[2].build_millis, trials[3].build_millis);
    let pb::autotune_response::Event::Finished(fin) = &events[6] else {
        panic!("last event is not finished")
    };
    assert!(fin.promoted);
    let winner = fin.winner.clone().unwrap();
    assert_eq!(winner.recall, 1.0);
    let best = trials
        .iter()
        .filter(|t| t.recall == 1.0)
        .map(|t| t.p50_micros)
        .fold(f64::INFINITY, f64::min);
    assert_eq!(winner.p50_micros, best);
    let promo = fin.promotion.clone().unwrap();
    assert!(
        promo.note.starts_with("autotune winner: recall=1.00 p50="),
        "{}",
        promo.note
    );
    assert_eq!(promo.promoted_by, "autotune");
    assert!(fin.reason.is_empty() && fin.generation.is_none());
    // Every trial was journaled; the job shows 4 builds for 5 trials.
    let j = job(&mut a, &started.job_id).await;
    assert_eq!(
        (j.state, j.trials_done, j.trials_total, j.graphs_built),
        (pb::JobState::Succeeded as i32, 5, 5, 4)
    );
    let journal = a
        .list_trials(pb::ListTrialsRequest {
            index_name: "threat_intel_v1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .trials;
    assert_eq!(journal.len(), 5);

    // Manual promote of another trial, then rollbacks.
    let other = trials.iter().find(|t| t.id != winner.id).unwrap();
    let r = pr
        .promote(pb::PromoteRequest {
            index_name: "threat_intel_v1".into(),
            trial_id: other.id,
            promoted_by: "ops".into(),
            note: "manual".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.history_depth, 1);
    let r = pr
        .rollback(pb::RollbackRequest {
            index_name: "threat_intel_v1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.current.unwrap().trial_id, winner.id);
    let r = pr
        .rollback(pb::RollbackRequest {
            index_name: "threat_intel_v1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.current.is_none());
    pr.promote(pb::PromoteRequest {
        index_name: "threat_intel_v1".into(),
        trial_id: winner.id,
        promoted_by: "ops".into(),
        note: "again".into(),
    })
    .await
    .unwrap();
    let mut c = s.index().await;
    common::put_profile(&mut c, "prod", &[("threat_intel_v1", None)]).await;

    let s = s.restart().await;
    let mut pr = s.promotion().await;
    let g = pr
        .get_promoted(pb::GetPromotedRequest {
            index_name: "threat_intel_v1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g.current.unwrap().trial_id, winner.id);
    let mut c = s.index().await;
    let act = c
        .activate_profile(pb::ActivateProfileRequest {
            name: "prod".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(act.generations[0].config, winner.config);
    assert_eq!(
        act.generations[0].config_source,
        pb::ConfigSource::Promoted as i32
    );
}

#[tokio::test]
async fn gate_not_met_promotes_nothing_and_says_why() {
    let s = TestServer::start().await;
    seeded_index(&s, "g", 2000, 32).await;
    let mut a = s.autotune().await;
    sampled_harness(&mut a, "g", "h", 50, None).await;
    let stream = a
        .autotune(pb::AutotuneRequest {
            index_name: "g".into(),
            harness: "h".into(),
            min_recall: Some(1.0),
            grid: vec![cfg(2, 10, 10)],
            activate: true,
            requested_by: "agent".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (events, err) = collect(stream).await;
    assert!(err.is_none());
    let pb::autotune_response::Event::Finished(fin) = events.last().unwrap() else {
        panic!()
    };
    let w = fin.winner.clone().unwrap();
    assert!(
        w.recall < 1.0,
        "a 2-link graph searched with ef 10 should miss something: {}",
        w.recall
    );
    assert!(!fin.promoted && fin.promotion.is_none() && fin.generation.is_none());
    assert!(fin.reason.contains("below min_recall 1"), "{}", fin.reason);
    let mut pr = s.promotion().await;
    assert!(pr
        .get_promoted(pb::GetPromotedRequest {
            index_name: "g".into()
        })
        .await
        .unwrap()
        .into_inner()
        .current
        .is_none());
}

#[tokio::test]
async fn autotune_validates_before_running() {
    let s = TestServer::start().await;
    seeded_index(&s, "v", 30, 4).await;
    let mut c = s.index().await;
    create_index(&mut c, "empty", 4, pb::Metric::L2).await;
    let mut a = s.autotune().await;
    sampled_harness(&mut a, "v", "h", 5, None).await;
    a.create_harness(pb::CreateHarnessRequest {
        index_name: "empty".into(),
        name: "h".into(),
        k: 5,
        queries: Some(pb::create_harness_request::Queries::Explicit(
            pb::ExplicitQueries {
                queries: vec![pb::QueryVector {
                    vector: vec![1.0; 4],
                }],
            },
        )),
    })
    .await
    .unwrap();
    let req = |grid: Vec<pb::HnswConfig>, min_recall: Option<f64>| pb::AutotuneRequest {
        index_name: "v".into(),
        harness: "h".into(),
        min_recall,
        grid,
        ..Default::default()
    };
    let e = a
        .autotune(req(vec![cfg(16, 40, 30), cfg(16, 500, 30)], None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("grid[1].ef_construction"),
        "{}",
        e.message()
    );
    assert_eq!(
        code_of(a.autotune(req(vec![], Some(1.5))).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code_of(
            a.autotune(pb::AutotuneRequest {
                index_name: "nope".into(),
                harness: "h".into(),
                ..Default::default()
            })
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code_of(
            a.autotune(pb::AutotuneRequest {
                index_name: "v".into(),
                harness: "nope".into(),
                ..Default::default()
            })
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code_of(
            a.autotune(pb::AutotuneRequest {
                index_name: "empty".into(),
                harness: "h".into(),
                ..Default::default()
            })
            .await
        ),
        Code::FailedPrecondition
    );
    assert!(a
        .list_trials(pb::ListTrialsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .trials
        .is_empty());
    assert_eq!(
        code_of(
            a.cancel_job(pb::CancelJobRequest {
                id: "job-999".into()
            })
            .await
        ),
        Code::NotFound
    );
}

/// A grid of 12 builds: held at the job gate, so none of it runs.
fn held_grid() -> Vec<pb::HnswConfig> {
    (0..12)
        .map(|i| pb::HnswConfig {
            seed: Some(i),
            ..cfg(8, 20, 20)
        })
        .collect()
}

/// A server whose jobs on "c1" are held RUNNING at the gate (no trial done) until cancelled,
/// "c2" tuned freely, and a job on "c1" with its stream after the Started event.
async fn held_job() -> (
    TestServer,
    AutotuneServiceClient<Channel>,
    tonic::Streaming<pb::AutotuneResponse>,
    pb::AutotuneStarted,
) {
    let (s, _gate) = TestServer::start_gated(&["c1"]).await;
    seeded_index(&s, "c1", 300, 8).await;
    seeded_index(&s, "c2", 60, 4).await;
    let mut a = s.autotune().await;
    sampled_harness(&mut a, "c1", "h", 20, None).await;
    sampled_harness(&mut a, "c2", "h", 5, None).await;
    let mut first = a
        .autotune(pb::AutotuneRequest {
            index_name: "c1".into(),
            harness: "h".into(),
            grid: held_grid(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let started = job_started(&mut first).await;
    (s, a, first, started)
}

#[tokio::test]
async fn one_job_per_index_while_other_indexes_tune() {
    let (_s, mut a, _first, started) = held_job().await;
    // A second job on the same index: ABORTED naming the running job.
    let e = a
        .autotune(pb::AutotuneRequest {
            index_name: "c1".into(),
            harness: "h".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Aborted);
    assert!(e.message().contains(&started.job_id), "{}", e.message());
    // Another index tunes at the same time.
    let other = a
        .autotune(pb::AutotuneRequest {
            index_name: "c2".into(),
            harness: "h".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (events, err) = collect(other).await;
    assert!(err.is_none());
    assert!(matches!(events.last(), Some(pb::autotune_response::Event::Finished(f)) if f.promoted));
    let running = job(&mut a, &started.job_id).await;
    assert_eq!(running.state, pb::JobState::Running as i32);
    let listed = a
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(listed[0].id, started.job_id, "running jobs come first");
}

#[tokio::test]
async fn cancel_job_ends_the_job_and_its_stream_cancelled_and_promotes_nothing() {
    let (s, mut a, first, started) = held_job().await;
    // CancelJob: CANCELLED, the stream ends with CANCELLED, nothing promoted, trials kept.
    let cancelled = a
        .cancel_job(pb::CancelJobRequest {
            id: started.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(cancelled.state, pb::JobState::Cancelled as i32);
    assert_eq!((cancelled.trials_done, cancelled.trials_total), (0, 12));
    let (_, err) = collect(first).await;
    assert_eq!(err.map(|e| e.code()), Some(Code::Cancelled));
    let mut pr = s.promotion().await;
    assert!(pr
        .get_promoted(pb::GetPromotedRequest {
            index_name: "c1".into()
        })
        .await
        .unwrap()
        .into_inner()
        .current
        .is_none());
    let journaled = a
        .list_trials(pb::ListTrialsRequest {
            index_name: "c1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .trials
        .len();
    assert_eq!(journaled as u32, cancelled.trials_done);
    assert_eq!(
        code_of(
            a.cancel_job(pb::CancelJobRequest {
                id: started.job_id.clone()
            })
            .await
        ),
        Code::FailedPrecondition
    );
}

#[tokio::test]
async fn dropping_the_stream_cancels_the_job() {
    let (s, mut a, first, started) = held_job().await;
    let mut pr = s.promotion().await;
    // Dropping the stream cancels too.
    drop(first);
    let j = wait_job_end(&mut a, &started.job_id).await;
    assert_eq!(j.state, pb::JobState::Cancelled as i32);
    assert!(pr
        .get_promoted(pb::GetPromotedRequest {
            index_name: "c1".into()
        })
        .await
        .unwrap()
        .into_inner()
        .current
        .is_none());
}

#[tokio::test]
async fn autotune_with_activate_swaps_while_searches_run() {
    let s = TestServer::start().await;
    let pts = seeded_index(&s, "act", 1500, 16).await;
    let mut a = s.autotune().await;
    sampled_harness(&mut a, "act", "h", 30, None).await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let searcher = spawn_searcher(s.index().await, "act", &pts[7], 5, stop_rx);
    let stream = a
        .autotune(pb::AutotuneRequest {
            index_name: "act".into(),
            harness: "h".into(),
            min_recall: Some(0.5),
            activate: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (events, err) = collect(stream).await;
    stop_tx.send(true).unwrap();
    assert!(searcher.await.unwrap().0 > 5);
    assert!(err.is_none(), "{err:?}");
    let pb::autotune_response::Event::Finished(fin) = events.last().unwrap() else {
        panic!()
    };
    assert!(fin.promoted);
    let generation = fin
        .generation
        .clone()
        .expect("a generation when activate and promoted");
    assert_eq!(generation.number, 2);
    assert_eq!(generation.config, fin.winner.as_ref().unwrap().config);
    assert_eq!(generation.config_source, pb::ConfigSource::Promoted as i32);
    assert!(generation.profile.is_empty());
    let mut c = s.index().await;
    let idx = c
        .get_index(pb::GetIndexRequest { name: "act".into() })
        .await
        .unwrap()
        .into_inner()
        .index
        .unwrap();
    assert_eq!(idx.active_generation.unwrap().number, 2);
}

/// A graceful shutdown (what SIGTERM starts in `main`) while a job is held RUNNING by the gate:
/// the job's stream ends UNAVAILABLE, the job is recorded CANCELLED before the server returns,
/// and a server started on the same data dir right after finds it so in GetJob and ListJobs.
#[tokio::test]
async fn shutdown_ends_a_running_job_as_cancelled_and_its_stream_as_unavailable() {
    let (s, _gate) = TestServer::start_gated(&["sd"]).await;
    seeded_index(&s, "sd", 300, 8).await;
    let mut a = s.autotune().await;
    sampled_harness(&mut a, "sd", "h", 20, None).await;
    let mut stream = a
        .autotune(pb::AutotuneRequest {
            index_name: "sd".into(),
            harness: "h".into(),
            grid: held_grid(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let started = job_started(&mut stream).await;
    let reader = tokio::spawn(async move { collect(stream).await });
    let s = s.restart().await;
    let (_, err) = reader.await.unwrap();
    assert_eq!(err.map(|e| e.code()), Some(Code::Unavailable));
    // The restart opened the data dir at once: the stopped server recorded the job's end and
    // closed its store before `run` returned.
    let mut a = s.autotune().await;
    let j = job(&mut a, &started.job_id).await;
    assert_eq!(j.state, pb::JobState::Cancelled as i32);
    assert!(j.reason.contains("shut down"), "{}", j.reason);
    let listed = a
        .list_jobs(pb::ListJobsRequest {
            index_name: "sd".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let found: Vec<_> = listed
        .jobs
        .iter()
        .filter(|l| l.id == started.job_id)
        .collect();
    assert_eq!(found.len(), 1, "{listed:?}");
    assert_eq!(found[0].state, pb::JobState::Cancelled as i32);
}

fn dominated(a: &pb::Trial, b: &pb::Trial) -> bool {
    // a dominated by b
    let no_worse =
        b.recall >= a.recall && b.p50_micros <= a.p50_micros && b.memory_bytes <= a.memory_bytes;
    let better =
        b.recall > a.recall || b.p50_micros < a.p50_micros || b.memory_bytes < a.memory_bytes;
    no_worse && better
}

#[tokio::test]
async fn target_recall_objective_and_pareto_fronts() {
    let s = TestServer::start().await;
    seeded_index(&s, "obj", 2000, 32).await;
    let mut a = s.autotune().await;
    sampled_harness(&mut a, "obj", "h", 40, None).await;
    let grid: Vec<pb::HnswConfig> = [
        (4, 10, 10),
        (8, 20, 20),
        (16, 40, 40),
        (16, 40, 120),
        (16, 100, 10),
    ]
    .into_iter()
    .map(|(m, ec, es)| cfg(m, ec, es))
    .collect();
    let req = |objective: pb::Objective, target: Option<f64>| pb::AutotuneRequest {
        index_name: "obj".into(),
        harness: "h".into(),
        min_recall: Some(0.0),
        grid: grid.clone(),
        objective: objective as i32,
        target_recall: target,
        ..Default::default()
    };
    assert_eq!(
        code_of(a.autotune(req(pb::Objective::TargetRecall, None)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code_of(
            a.autotune(req(pb::Objective::TargetRecall, Some(1.5)))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code_of(a.autotune(req(pb::Objective::MaxRecall, Some(0.5))).await),
        Code::InvalidArgument
    );

    let (events, err) = collect(
        a.autotune(req(pb::Objective::TargetRecall, Some(0.8)))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    assert!(err.is_none(), "{err:?}");
    let trials: Vec<pb::Trial> = events
        .iter()
        .filter_map(|e| match e {
            pb::autotune_response::Event::Trial(t) => Some(t.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(trials.len(), 5);
    let pb::autotune_response::Event::Finished(fin) = events.last().unwrap() else {
        panic!()
    };
    let expected = trials
        .iter()
        .filter(|t| t.recall >= 0.8)
        .min_by(|x, y| {
            (x.p50_micros, x.memory_bytes, x.build_millis)
                .partial_cmp(&(y.p50_micros, y.memory_bytes, y.build_millis))
                .unwrap()
        })
        .expect("some config reaches 0.8");
    assert_eq!(fin.winner.as_ref().unwrap().id, expected.id);
    assert!(fin.promoted);
    // The job's front: no member dominated by any trial; every other trial dominated by one.
    assert!(!fin.pareto_front.is_empty());
    let in_front = |t: &pb::Trial| fin.pareto_front.iter().any(|f| f.id == t.id);
    for t in &trials {
        let beaten = trials.iter().any(|o| dominated(t, o));
        assert_eq!(in_front(t), !beaten, "trial {} front membership", t.id);
    }
    assert!(fin
        .pareto_front
        .windows(2)
        .all(|w| w[0].p50_micros <= w[1].p50_micros));

    // An unreachable target: the best recall is reported, nothing promoted.
    let mut pr = s.promotion().await;
    pr.rollback(pb::RollbackRequest {
        index_name: "obj".into(),
    })
    .await
    .unwrap();
    let (events, _) = collect(
        a.autotune(req(pb::Objective::TargetRecall, Some(1.0)))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    let pb::autotune_response::Event::Finished(fin2) = events.last().unwrap() else {
        panic!()
    };
    if fin2.winner.as_ref().unwrap().recall < 1.0 {
        assert!(!fin2.promoted);
        assert!(
            fin2.reason.contains("no trial reached target_recall 1"),
            "{}",
            fin2.reason
        );
    }

    // GetParetoFront over the whole journal for the harness (both jobs and a manual trial).
    trial(&mut a, "obj", "h", cfg(32, 200, 200)).await;
    let journal = a
        .list_trials(pb::ListTrialsRequest {
            index_name: "obj".into(),
            harness: "h".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .trials;
    assert_eq!(journal.len(), 11);
    let front = a
        .get_pareto_front(pb::GetParetoFrontRequest {
            index_name: "obj".into(),
            harness: "h".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .trials;
    let mut got: Vec<u64> = front.iter().map(|t| t.id).collect();
    got.sort();
    let mut want: Vec<u64> = journal
        .iter()
        .filter(|t| !journal.iter().any(|o| dominated(t, o)))
        .map(|t| t.id)
        .collect();
    want.sort();
    assert_eq!(got, want);
    assert_eq!(
        code_of(
            a.get_pareto_front(pb::GetParetoFrontRequest {
                index_name: "nope".into(),
                harness: "h".into(),
                ..Default::default()
            })
            .await
        ),
        Code::NotFound
    );
    let none = a
        .get_pareto_front(pb::GetParetoFrontRequest {
            index_name: "obj".into(),
            harness: "other".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none.trials.is_empty());
}

fn adaptive_req(index: &str, max_trials: u32, seed: u64) -> pb::AutotuneRequest {
    pb::AutotuneRequest {
        index_name: index.into(),
        harness: "h".into(),
        min_recall: Some(0.0),
        objective: pb::Objective::TargetRecall as i32,
        target_recall: Some(0.97),
        strategy: pb::Strategy::Adaptive as i32,
        budget: Some(pb::AdaptiveBudget {
            max_trials,
            max_seconds: 0,
        }),
        seed: Some(seed),
        adaptive_m: vec![4, 8, 16],
        adaptive_ef_construction: vec![10, 40],
        ..Default::default()
    }
}

/// Runs ADAPTIVE to its end; the trials it streamed, and the finished event.
async fn run_adaptive(
    a: &mut AutotuneServiceClient<Channel>,
    req: pb::AutotuneRequest,
) -> (Vec<pb::Trial>, pb::AutotuneFinished) {
    let (events, err) = collect(a.autotune(req).await.expect("start").into_inner()).await;
    assert!(err.is_none(), "{err:?}");
    let pb::autotune_response::Event::Started(started) = &events[0] else {
        panic!("first event is not started: {:?}", events[0])
    };
    assert_eq!(started.strategy, pb::Strategy::Adaptive as i32);
    assert!(
        started.grid.is_empty(),
        "ADAPTIVE chooses configs as it goes"
    );
    let trials: Vec<pb::Trial> = events
        .iter()
        .filter_map(|e| match e {
            pb::autotune_response::Event::Trial(t) => Some(t.clone()),
            _ => None,
        })
        .collect();
    let Some(pb::autotune_response::Event::Finished(fin)) = events.last() else {
        panic!("last event is not finished")
    };
    (trials, fin.clone())
}

/// ADAPTIVE: the same seed and data give the same trials (configs, order, recall, work per
/// query); it stays within its trial budget; for each graph it finds the smallest ef_search
/// that reaches the target; its winner is the fastest trial that reached it; and bad
/// combinations are refused.
#[tokio::test]
async fn adaptive_is_deterministic_for_a_seed_and_keeps_its_budget() {
    let s = TestServer::start().await;
    for name in ["ad1", "ad2"] {
        seeded_index(&s, name, 1500, 24).await;
        let mut a = s.autotune().await;
        sampled_harness(&mut a, name, "h", 40, Some(9)).await;
    }
    let mut a = s.autotune().await;

    let (t1, fin1) = run_adaptive(&mut a, adaptive_req("ad1", 25, 5)).await;
    let (t2, _) = run_adaptive(&mut a, adaptive_req("ad2", 25, 5)).await;
    assert!(!t1.is_empty() && t1.len() <= 25, "{} trials", t1.len());
    let shape = |ts: &[pb::Trial]| -> Vec<(u32, u32, u32, Option<u64>, u64, u64)> {
        ts.iter()
            .map(|t| {
                let c = t.config.expect("config");
                (
                    c.m,
                    c.ef_construction,
                    c.ef_search,
                    c.seed,
                    (t.recall * 1e6).round() as u64,
                    (t.mean_distance_evals * 1e3).round() as u64,
                )
            })
            .collect()
    };
    assert_eq!(shape(&t1), shape(&t2), "same seed and data, same trials");
    assert!(t1.iter().all(|t| t.mean_distance_evals > 0.0));
    assert!(t1.iter().all(|t| t.config.and_then(|c| c.seed) == Some(5)));

    // Rung 1 measured every m at the cheapest ef_construction; for every graph that reached the
    // target, the ef_search step below its smallest passing one was measured and missed (or it
    // is the ladder's first step).
    for m in [4, 8, 16] {
        assert!(
            t1.iter().any(|t| t
                .config
                .is_some_and(|c| c.m == m && c.ef_construction == 10)),
            "m {m} not explored"
        );
    }
    // The server's own ladder (up to 512): a copy here once stopped at 200.
    let ladder = vectord::autotune::adaptive::EF_LADDER;
    let mut graphs: Vec<(u32, u32)> = t1
        .iter()
        .filter_map(|t| t.config.map(|c| (c.m, c.ef_construction)))
        .collect();
    graphs.dedup();
    for (m, ec) in graphs {
        let on: Vec<&pb::Trial> = t1
            .iter()
            .filter(|t| {
                t.config
                    .is_some_and(|c| c.m == m && c.ef_construction == ec)
            })
            .collect();
        let ef = |t: &pb::Trial| t.config.map_or(0, |c| c.ef_search);
        if let Some(best) = on.iter().filter(|t| t.recall >= 0.97).map(|t| ef(t)).min() {
            let i = ladder
                .iter()
                .position(|&e| e == best)
                .expect("ladder value");
            if i > 0 {
                let below = on.iter().find(|t| ef(t) == ladder[i - 1]);
                assert!(
                    below.is_some_and(|t| t.recall < 0.97),
                    "m {m} ec {ec}: {best} passes but {} was not shown to miss",
                    ladder[i - 1]
                );
            }
        }
    }

    // The winner is the objective's: of the trials that reached the target, one within 5% of
    // the lowest p50, and none of those needs fewer distance computations.
    let reached: Vec<&pb::Trial> = t1.iter().filter(|t| t.recall >= 0.97).collect();
    let w = fin1.winner.expect("winner");
    if reached.is_empty() {
        assert!(!fin1.promoted);
    } else {
        assert!(w.recall >= 0.97);
        assert!(w.mean_distance_evals > 0.0);
        let pairs: Vec<(f64, f64)> = reached
            .iter()
            .map(|t| (t.p50_micros, t.mean_distance_evals))
            .collect();
        common::assert_target_recall_winner(
            &pairs,
            (w.p50_micros, w.mean_distance_evals),
            &format!("{w:?}"),
        );
        assert!(fin1.promoted, "{}", fin1.reason);
    }
    // Every streamed trial is in the journal under the job.
    let journal = a
        .list_trials(pb::ListTrialsRequest {
            index_name: "ad1".into(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .trials;
    assert_eq!(journal.len(), t1.len());

    // Budgets: never more trials than allowed, and the job says what it was allowed.
    for max in [1, 3, 7] {
        let (t, fin) = run_adaptive(&mut a, adaptive_req("ad2", max, 5)).await;
        assert!(
            !t.is_empty() && t.len() <= max as usize,
            "{max}: {}",
            t.len()
        );
        let j = job(&mut a, &fin.job_id).await;
        assert_eq!(j.trials_total, max);
        assert_eq!(j.trials_done as usize, t.len());
    }

    // Refused, with nothing started.
    let mut no_target = adaptive_req("ad1", 5, 5);
    no_target.objective = pb::Objective::MaxRecall as i32;
    no_target.target_recall = None;
    let mut with_grid = adaptive_req("ad1", 5, 5);
    with_grid.grid = vec![cfg(8, 20, 20)];
    let mut bad_m = adaptive_req("ad1", 5, 5);
    bad_m.adaptive_m = vec![16, 1];
    let mut grid_with_budget = adaptive_req("ad1", 5, 5);
    grid_with_budget.strategy = pb::Strategy::Grid as i32;
    let mut unknown = adaptive_req("ad1", 5, 5);
    unknown.strategy = 99;
    for (what, r) in [
        ("no target", no_target),
        ("grid", with_grid),
        ("m 1", bad_m),
        ("budget on grid", grid_with_budget),
        ("unknown strategy", unknown),
    ] {
        assert_eq!(
            code_of(a.autotune(r).await),
            Code::InvalidArgument,
            "{what}"
        );
    }
    let jobs = a
        .list_jobs(pb::ListJobsRequest {
            index_name: "ad1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(jobs.len(), 1, "refused requests start no job");
}
