//! The server's limits: calls over --max-concurrent-requests are shed at once while health
//! still answers; --request-timeout answers DEADLINE_EXCEEDED yet never leaves a write half
//! done, and never cuts a stream; --max-concurrent-jobs is RESOURCE_EXHAUSTED server-wide
//! (distinct from the per-index ABORTED).

use crate::common;

use std::time::{Duration, Instant};

use common::*;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use vectord::config::Config;
use vectord::pb;

/// The longest a condition may take to show up before the test fails.
const DEADLINE: Duration = Duration::from_secs(30);

async fn point_count(
    c: &mut vectord::pb::index_service_client::IndexServiceClient<tonic::transport::Channel>,
    name: &str,
) -> Result<u64, tonic::Status> {
    Ok(c.get_index(pb::GetIndexRequest { name: name.into() })
        .await?
        .into_inner()
        .index
        .map(|i| i.point_count)
        .unwrap_or_default())
}

#[tokio::test]
async fn calls_over_the_limit_are_shed_at_once_and_health_still_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = Config::for_tests(tmp.path());
    config.max_concurrent_requests = 1;
    let s = TestServer::start_in(tmp.path(), config).await;
    let mut c = s.index().await;
    create_index(&mut c, "v", 4, pb::Metric::L2).await;

    // An import whose stream stays open holds the one permit until it ends.
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::ImportPointsRequest>(4);
    tx.send(pb::ImportPointsRequest {
        index_name: "v".into(),
        points: points(&mut Gen::new(1), 0..10, 4),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut importer = s.index().await;
    let import = tokio::spawn(async move {
        importer
            .import_points(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });

    // Until the import is admitted, GetIndex passes; once it is, GetIndex is shed.
    let started = Instant::now();
    let shed = loop {
        match c.get_index(pb::GetIndexRequest { name: "v".into() }).await {
            Ok(_) => {
                assert!(started.elapsed() < DEADLINE, "no call was ever shed");
                tokio::task::yield_now().await;
            }
            Err(e) => break e,
        }
    };
    assert_eq!(shed.code(), Code::ResourceExhausted, "{}", shed.message());
    assert!(
        shed.message().contains("--max-concurrent-requests"),
        "{}",
        shed.message()
    );
    // Health is outside the limit.
    let health = HealthClient::new(s.channel().await)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health answers while the server is saturated")
        .into_inner();
    assert_eq!(health.status, ServingStatus::Serving as i32);

    // The import ends; its permit comes back and calls pass again.
    tx.send(pb::ImportPointsRequest {
        index_name: String::new(),
        points: points(&mut Gen::new(2), 10..20, 4),
        ..Default::default()
    })
    .await
    .unwrap();
    drop(tx);
    let done = import.await.unwrap().expect("import").into_inner();
    assert_eq!(done.upserted_count, 20);
    assert_eq!(point_count(&mut c, "v").await.expect("get index"), 20);
}

#[tokio::test]
async fn a_timed_out_write_completes_whole_and_streams_are_not_cut() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = Config::for_tests(tmp.path());
    // Far shorter than any write: fsync alone takes longer.
    config.request_timeout = Some(Duration::from_millis(1));
    let s = TestServer::start_in(tmp.path(), config).await;
    let mut c = s.index().await;
    // CreateIndex may itself time out; it completes all the same.
    let _ = c
        .create_index(pb::CreateIndexRequest {
            name: "v".into(),
            dimension: 16,
            metric: pb::Metric::L2 as i32,
            default_config: None,
            engine: String::new(),
        })
        .await;
    let started = Instant::now();
    while point_count(&mut c, "v").await.is_err() {
        assert!(
            started.elapsed() < DEADLINE,
            "the timed-out CreateIndex never completed"
        );
        tokio::task::yield_now().await;
    }

    let pts = points(&mut Gen::new(3), 0..3000, 16);
    let e = c
        .upsert_points(pb::UpsertPointsRequest {
            index_name: "v".into(),
            points: pts.clone(),
            ..Default::default()
        })
        .await
        .expect_err("3000 points are not stored and indexed within 1 ms");
    assert_eq!(e.code(), Code::DeadlineExceeded, "{}", e.message());
    assert!(e.message().contains("--request-timeout"), "{}", e.message());

    // The write goes on to completion: the count reaches 3000 and every point is searchable
    // (a write cut halfway would be stored but missing from the graph).
    eventually(DEADLINE, "the timed-out upsert completes", || {
        let mut c = c.clone();
        async move {
            match point_count(&mut c, "v").await {
                Ok(3000) => Some(()),
                Ok(n) => {
                    assert_eq!(n, 0, "a half-applied upsert");
                    None
                }
                Err(e) => {
                    assert_eq!(e.code(), Code::DeadlineExceeded, "{}", e.message());
                    None
                }
            }
        }
    })
    .await;
    for probe in [&pts[0], &pts[1500], &pts[2999]] {
        let started = Instant::now();
        let r = loop {
            match c
                .search(pb::SearchRequest {
                    index_name: "v".into(),
                    vector: probe.vector.clone(),
                    k: 1,
                    ef_search: None,
                    ..Default::default()
                })
                .await
            {
                Ok(r) => break r.into_inner(),
                Err(e) => assert_eq!(e.code(), Code::DeadlineExceeded, "{}", e.message()),
            }
            assert!(started.elapsed() < DEADLINE);
        };
        assert_eq!(r.neighbors[0].id, probe.id);
    }

    // The streams are not cut by the unary timeout: an import of several messages succeeds...
    let batches: Vec<pb::ImportPointsRequest> = (0..4u64)
        .map(|b| pb::ImportPointsRequest {
            index_name: if b == 0 { "v".into() } else { String::new() },
            points: points(&mut Gen::new(10 + b), 3000 + b * 500..3500 + b * 500, 16),
            ..Default::default()
        })
        .collect();
    let imported = c
        .import_points(tokio_stream::iter(batches))
        .await
        .expect("an import is not cut by --request-timeout")
        .into_inner();
    assert_eq!(imported.upserted_count, 2000);
    assert_eq!(imported.point_count, 5000);
}

/// A server that runs one autotune job at a time (--max-concurrent-jobs 1), with `gate` if
/// given, and two 8-d indexes "a" and "b" of `n` points, each with harness "h": the server,
/// an autotune client and the data dir.
async fn one_job_server(
    gate: Option<vectord::autotune::jobs::JobGate>,
    n: u64,
) -> (
    TestServer,
    vectord::pb::autotune_service_client::AutotuneServiceClient<tonic::transport::Channel>,
    tempfile::TempDir,
) {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut config = Config::for_tests(tmp.path());
    config.max_concurrent_jobs = 1;
    config.job_gate = gate;
    let s = TestServer::start_in(tmp.path(), config).await;
    let mut c = s.index().await;
    let mut a = s.autotune().await;
    for name in ["a", "b"] {
        create_index(&mut c, name, 8, pb::Metric::L2).await;
        upsert(&mut c, name, points(&mut Gen::new(5), 0..n, 8)).await;
        a.create_harness(harness_request(name, "h", 10, 10, Some(1)))
            .await
            .expect("harness");
    }
    (s, a, tmp)
}

/// A job of one quick trial on `index`'s harness "h".
fn one_trial(index: &str) -> pb::AutotuneRequest {
    pb::AutotuneRequest {
        index_name: index.into(),
        harness: "h".into(),
        grid: vec![pb::HnswConfig {
            m: 8,
            ef_construction: 16,
            ef_search: 16,
            seed: Some(1),
        }],
        ..Default::default()
    }
}

#[tokio::test]
async fn jobs_over_the_server_limit_are_resource_exhausted() {
    let gate = vectord::autotune::jobs::JobGate::closed(["a"]);
    let (_s, mut a, _tmp) = one_job_server(Some(gate), 500).await;
    // The first job is held RUNNING at the server's job gate while the next requests arrive.
    let grid = vec![pb::HnswConfig {
        m: 8,
        ef_construction: 20,
        ef_search: 20,
        seed: Some(1),
    }];
    let tune = |index: &str, grid: Vec<pb::HnswConfig>| pb::AutotuneRequest {
        index_name: index.into(),
        harness: "h".into(),
        grid,
        ..Default::default()
    };
    let mut first = a
        .autotune(tune("a", grid))
        .await
        .expect("first job")
        .into_inner();
    let job_id = job_started(&mut first).await.job_id;
    let other_index = a.autotune(tune("b", vec![])).await;
    let e = other_index.expect_err("a second job server-wide is over the limit");
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    assert!(
        e.message().contains("--max-concurrent-jobs"),
        "{}",
        e.message()
    );
    let same_index = a.autotune(tune("a", vec![])).await;
    assert_eq!(code_of(same_index), Code::Aborted);

    // Once the first job ends, the other index can be tuned.
    a.cancel_job(pb::CancelJobRequest { id: job_id })
        .await
        .expect("cancel");
    drop(first);
    let mut second = a
        .autotune(tune("b", vec![]))
        .await
        .expect("second job")
        .into_inner();
    let mut finished = false;
    while let Some(m) = second.message().await.expect("stream") {
        if let Some(pb::autotune_response::Event::Finished(_)) = m.event {
            finished = true;
        }
    }
    assert!(finished);
}

/// A client that sees a job ended in ListJobs (an agent polling it) starts the next one at
/// once: neither the index's one-job place nor the server's job limit still counts the ended
/// job while it makes its last writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_listed_as_ended_frees_its_index_and_the_server_limit_at_once() {
    let (s, mut a, _tmp) = one_job_server(None, 300).await;
    let ch = s.channel().await;
    // Each index twice in a row (its own place), then the other (the server's one job). A job
    // takes a few ms here; the moment it used to keep counting after its end was recorded (its
    // record's flush) was hit in two runs of five (60 rounds each) before it was fixed.
    let order = ["a", "a", "b", "b", "a", "b", "b", "a", "a", "b", "a", "b"];
    for (round, index) in order.into_iter().cycle().take(60).enumerate() {
        let mut stream = a
            .autotune(one_trial(index))
            .await
            .unwrap_or_else(|e| panic!("round {round}: job on {index}: {e:?}"))
            .into_inner();
        let job_id = job_started(&mut stream).await.job_id;
        // Polled as fast as the server answers: the first answer that lists it ended.
        let ended = first_listed_ended(&ch, index, &job_id, Duration::from_secs(60)).await;
        assert_eq!(ended.state, pb::JobState::Succeeded as i32, "{ended:?}");
        // The stream stays open (closing it would cancel the job) and is read to its end.
        drop(tokio::spawn(async move {
            while let Ok(Some(_)) = stream.message().await {}
        }));
    }
}

/// The same, with the moment made long (a test gate holds the job after its end is recorded,
/// before it frees its place): while ListJobs shows it ended, a job on another index starts at
/// once under a server limit of 1, and one on its own index waits for the place instead of
/// being refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_held_after_its_recorded_end_neither_refuses_nor_counts() {
    let gate = vectord::autotune::jobs::JobGate::closed_at_end(["a"]);
    let (s, mut a, _tmp) = one_job_server(Some(gate.clone()), 300).await;
    let ch = s.channel().await;
    let mut first = a
        .autotune(one_trial("a"))
        .await
        .expect("first job")
        .into_inner();
    let id = job_started(&mut first).await.job_id;
    let ended = first_listed_ended(&ch, "a", &id, Duration::from_secs(60)).await;
    assert_eq!(ended.state, pb::JobState::Succeeded as i32, "{ended:?}");

    // Held at the gate with its end recorded: a start on its index waits for the place instead
    // of being refused (issued first, so that it is waiting while the next job runs)...
    let next = tokio::spawn({
        let (mut a, req) = (a.clone(), one_trial("a"));
        async move { a.autotune(req).await }
    });
    // ...and it does not count under the limit of 1: a whole job on b runs meanwhile.
    let other = a
        .autotune(one_trial("b"))
        .await
        .expect("a job on b while a's has ended");
    let (events, err) = collect(other.into_inner()).await;
    assert!(err.is_none(), "{err:?} after {events:?}");
    assert!(!next.is_finished(), "the start on a waits for its place");
    gate.open();
    let next = next
        .await
        .expect("the start's task")
        .expect("the next job on a")
        .into_inner();
    let (events, err) = collect(next).await;
    assert!(err.is_none(), "{err:?} after {events:?}");
    drop(first);
}
