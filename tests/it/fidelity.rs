//! Issue 23 §1: multi-fidelity ADAPTIVE. Configs are ranked on a seeded sample of the points
//! (FIDELITY_SAMPLE trials), the best few are confirmed on all of them (FIDELITY_FULL trials);
//! only full trials are picked, promoted and put on the Pareto front.

use crate::common;

use std::collections::HashSet;

use common::*;
use tonic::transport::Channel;
use tonic::Code;
use vectord::pb;
use vectord::pb::autotune_service_client::AutotuneServiceClient;

const N: u64 = 3000;
const SAMPLE: u32 = 1000;

async fn index_with_harness(s: &TestServer, name: &str) {
    let mut c = s.index().await;
    create_index(&mut c, name, 16, pb::Metric::L2).await;
    let pts = points(&mut Gen::new(21), 0..N, 16);
    for chunk in pts.chunks(1000) {
        upsert(&mut c, name, chunk.to_vec()).await;
    }
    s.autotune()
        .await
        .create_harness(harness_request(name, "h", 10, 40, Some(4)))
        .await
        .expect("harness");
}

fn req(index: &str) -> pb::AutotuneRequest {
    pb::AutotuneRequest {
        index_name: index.into(),
        harness: "h".into(),
        min_recall: Some(0.0),
        objective: pb::Objective::TargetRecall as i32,
        target_recall: Some(0.95),
        strategy: pb::Strategy::Adaptive as i32,
        budget: Some(pb::AdaptiveBudget {
            max_trials: 30,
            max_seconds: 0,
        }),
        seed: Some(5),
        adaptive_m: vec![4, 8, 16],
        adaptive_ef_construction: vec![10, 40],
        adaptive_sample_points: Some(SAMPLE),
        adaptive_confirm: 2,
        ..Default::default()
    }
}

async fn run(
    a: &mut AutotuneServiceClient<Channel>,
    r: pb::AutotuneRequest,
) -> (Vec<pb::Trial>, pb::AutotuneFinished) {
    let mut stream = a.autotune(r).await.expect("start").into_inner();
    let mut trials = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(m)) => match m.event {
                Some(pb::autotune_response::Event::Trial(t)) => trials.push(t),
                Some(pb::autotune_response::Event::Finished(f)) => return (trials, f),
                _ => {}
            },
            Ok(None) => panic!("no Finished event"),
            Err(s) => panic!("job failed: {s}"),
        }
    }
}

fn sample(t: &pb::Trial) -> bool {
    t.fidelity == pb::Fidelity::Sample as i32
}

/// The same seed gives the same trials in both phases; sample trials are marked with their
/// sample's size and come first; only the best sample graphs are built on all points; the
/// winner is a full trial whose recall a RunTrial of its config on all points measures again
/// exactly; sample trials are never promoted and stay off the Pareto front unless asked.
#[tokio::test]
async fn multi_fidelity_ranks_on_a_sample_and_answers_on_all_points() {
    let s = TestServer::start().await;
    index_with_harness(&s, "f1").await;
    index_with_harness(&s, "f2").await;
    let mut a = s.autotune().await;
    let (t1, fin) = run(&mut a, req("f1")).await;
    let (t2, _) = run(&mut a, req("f2")).await;

    let shape = |ts: &[pb::Trial]| -> Vec<(u32, u32, u32, i32, u64, u64, u64)> {
        ts.iter()
            .map(|t| {
                let c = t.config.expect("config");
                (
                    c.m,
                    c.ef_construction,
                    c.ef_search,
                    t.fidelity,
                    t.point_count,
                    (t.recall * 1e6).round() as u64,
                    (t.mean_distance_evals * 1e3).round() as u64,
                )
            })
            .collect()
    };
    assert_eq!(shape(&t1), shape(&t2), "same seed and data, same trials");
    assert!(t1.len() <= 30, "{} trials over the budget", t1.len());

    // Sample trials first, each marked with the sample's size; then full ones on every point.
    let first_full = t1
        .iter()
        .position(|t| !sample(t))
        .expect("some full trials");
    assert!(first_full > 0, "the sample phase ran first");
    assert!(t1[..first_full]
        .iter()
        .all(|t| sample(t) && t.point_count == u64::from(SAMPLE)));
    assert!(t1[first_full..]
        .iter()
        .all(|t| t.fidelity == pb::Fidelity::Full as i32 && t.point_count == N));
    // At most `adaptive_confirm` graphs built on all the points, each one the sample measured.
    let graph = |t: &pb::Trial| t.config.map(|c| (c.m, c.ef_construction)).expect("config");
    let sampled: HashSet<_> = t1[..first_full].iter().map(graph).collect();
    let full: HashSet<_> = t1[first_full..].iter().map(graph).collect();
    assert!(
        full.len() <= 2 && full.is_subset(&sampled),
        "{full:?} of {sampled:?}"
    );

    // The winner is a full trial; re-measured on all the points it gives the same recall.
    let w = fin.winner.clone().expect("winner");
    assert_eq!(w.fidelity, pb::Fidelity::Full as i32);
    assert_eq!(w.point_count, N);
    assert!(fin.pareto_front.iter().all(|t| !sample(t)));
    let again = a
        .run_trial(pb::RunTrialRequest {
            index_name: "f1".into(),
            harness: "h".into(),
            config: w.config,
        })
        .await
        .expect("run trial")
        .into_inner()
        .trial
        .expect("trial");
    assert_eq!(again.fidelity, pb::Fidelity::Full as i32);
    assert_eq!(
        again.recall, w.recall,
        "the winner's recall is the full data's"
    );
    if w.recall >= 0.95 {
        assert!(fin.promoted, "{}", fin.reason);
    }

    // A sample trial is never promoted.
    let st = t1.iter().find(|t| sample(t)).expect("a sample trial");
    let e = s
        .promotion()
        .await
        .promote(pb::PromoteRequest {
            index_name: "f1".into(),
            trial_id: st.id,
            promoted_by: "test".into(),
            note: String::new(),
        })
        .await
        .expect_err("a sample trial cannot be promoted");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");

    // GetParetoFront: full trials only, unless asked.
    let front = |include: bool| {
        let mut a = a.clone();
        async move {
            a.get_pareto_front(pb::GetParetoFrontRequest {
                index_name: "f1".into(),
                harness: "h".into(),
                include_sample_trials: include,
            })
            .await
            .expect("front")
            .into_inner()
            .trials
        }
    };
    let only_full = front(false).await;
    assert!(!only_full.is_empty() && only_full.iter().all(|t| !sample(t)));
    let with_sample = front(true).await;
    assert!(!with_sample.is_empty());
    // Sample trials (on 1000 points) are faster: some are on the front when asked.
    assert!(with_sample.iter().any(sample), "{with_sample:?}");
}

#[tokio::test]
async fn multi_fidelity_fields_are_validated() {
    let s = TestServer::start().await;
    index_with_harness(&s, "v").await;
    let mut a = s.autotune().await;
    for (what, r) in [
        (
            "a sample under 1000 points",
            pb::AutotuneRequest {
                adaptive_sample_points: Some(10),
                ..req("v")
            },
        ),
        (
            "more than 8 graphs confirmed",
            pb::AutotuneRequest {
                adaptive_confirm: 9,
                ..req("v")
            },
        ),
        (
            "a sample for a grid",
            pb::AutotuneRequest {
                strategy: pb::Strategy::Grid as i32,
                objective: pb::Objective::MaxRecall as i32,
                target_recall: None,
                budget: None,
                seed: None,
                adaptive_m: vec![],
                adaptive_ef_construction: vec![],
                adaptive_confirm: 0,
                ..req("v")
            },
        ),
    ] {
        let e = a.autotune(r).await.expect_err(what);
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e}");
    }
}
