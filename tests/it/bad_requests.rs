//! Every RPC answers bad input with its exact code and changes nothing: a table of bad
//! requests across the three services, then the server is still SERVING and the data written
//! before the table is all there.

use crate::common;

use common::*;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use vectord::pb;

fn ok<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Result<(), tonic::Status> {
    r.map(|_| ())
}

fn create(name: &str, dim: u32, metric: i32) -> pb::CreateIndexRequest {
    pb::CreateIndexRequest {
        name: name.into(),
        dimension: dim,
        metric,
        default_config: None,
        engine: String::new(),
    }
}

fn pt(id: u64, vector: Vec<f32>) -> pb::Point {
    pb::Point { id, vector }
}

fn upsert_req(index: &str, points: Vec<pb::Point>) -> pb::UpsertPointsRequest {
    pb::UpsertPointsRequest {
        index_name: index.into(),
        points,
        ..Default::default()
    }
}

fn search_req(index: &str, vector: Vec<f32>, k: u32, ef: Option<u32>) -> pb::SearchRequest {
    pb::SearchRequest {
        index_name: index.into(),
        vector,
        k,
        ef_search: ef,
        ..Default::default()
    }
}

fn cfg(m: u32, ef_construction: u32, ef_search: u32) -> pb::HnswConfig {
    pb::HnswConfig {
        m,
        ef_construction,
        ef_search,
        seed: Some(42),
    }
}

fn harness_req(
    index: &str,
    name: &str,
    k: u32,
    queries: Option<pb::create_harness_request::Queries>,
) -> pb::CreateHarnessRequest {
    pb::CreateHarnessRequest {
        index_name: index.into(),
        name: name.into(),
        k,
        queries,
    }
}

fn sampled(n: u32) -> Option<pb::create_harness_request::Queries> {
    Some(pb::create_harness_request::Queries::Sampled(
        pb::SampledQueries {
            query_count: n,
            seed: Some(1),
        },
    ))
}

fn explicit(qs: Vec<Vec<f32>>) -> Option<pb::create_harness_request::Queries> {
    Some(pb::create_harness_request::Queries::Explicit(
        pb::ExplicitQueries {
            queries: qs
                .into_iter()
                .map(|vector| pb::QueryVector { vector })
                .collect(),
        },
    ))
}

fn tune(index: &str, harness: &str) -> pb::AutotuneRequest {
    pb::AutotuneRequest {
        index_name: index.into(),
        harness: harness.into(),
        ..Default::default()
    }
}

fn token(raw: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

const DIM: usize = 8;

#[tokio::test]
async fn every_bad_request_gets_its_exact_code_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = vectord::config::Config::for_tests(tmp.path());
    config.max_points_per_upsert = 100;
    config.max_harness_queries = 50;
    config.max_request_bytes = 256 * 1024;
    // The job on "t" stays RUNNING at the gate until it is cancelled after the table.
    config.job_gate = Some(vectord::autotune::jobs::JobGate::closed(["t"]));
    let s = TestServer::start_in(tmp.path(), config).await;
    let mut c = s.index().await;
    let mut a = s.autotune().await;
    let mut p = s.promotion().await;

    // The data the table must leave alone: "v" (3-d, one point), "vc" (cosine), "e" (empty),
    // "t" (DIM-d, 600 points, a harness "h" and one trial), and a running job on "t".
    create_index(&mut c, "v", 3, pb::Metric::L2).await;
    create_index(&mut c, "vc", 3, pb::Metric::Cosine).await;
    create_index(&mut c, "e", 3, pb::Metric::L2).await;
    create_index(&mut c, "t", DIM as u32, pb::Metric::L2).await;
    upsert(&mut c, "v", vec![pt(1, vec![1.0, 2.0, 3.0])]).await;
    let mut g = Gen::new(7);
    let t_points = points(&mut g, 0..600, DIM);
    for chunk in t_points.chunks(100) {
        upsert(&mut c, "t", chunk.to_vec()).await;
    }
    a.create_harness(harness_req("t", "h", 10, sampled(20)))
        .await
        .expect("harness");
    let trial = a
        .run_trial(pb::RunTrialRequest {
            index_name: "t".into(),
            harness: "h".into(),
            config: Some(cfg(8, 40, 40)),
        })
        .await
        .expect("trial")
        .into_inner()
        .trial
        .expect("trial");
    // A job held RUNNING (the gate) through the table; it is cancelled after it.
    let long_grid: Vec<pb::HnswConfig> = (0..200)
        .map(|i| pb::HnswConfig {
            seed: Some(i),
            ..cfg(8, 40, 40)
        })
        .collect();
    let mut job_stream = a
        .autotune(pb::AutotuneRequest {
            grid: long_grid,
            ..tune("t", "h")
        })
        .await
        .expect("autotune")
        .into_inner();
    let job_id = match job_stream
        .message()
        .await
        .expect("event")
        .and_then(|m| m.event)
    {
        Some(pb::autotune_response::Event::Started(st)) => st.job_id,
        other => panic!("expected Started, got {other:?}"),
    };
    let q3 = vec![1.0f32; 3];

    let cases: Vec<(&str, Code, Result<(), tonic::Status>)> = vec![
        // CreateIndex
        (
            "create: empty name",
            Code::InvalidArgument,
            ok(c.create_index(create("", 3, 1)).await),
        ),
        (
            "create: bad char",
            Code::InvalidArgument,
            ok(c.create_index(create("a/b", 3, 1)).await),
        ),
        (
            "create: 65 chars",
            Code::InvalidArgument,
            ok(c.create_index(create(&"x".repeat(65), 3, 1)).await),
        ),
        (
            "create: dimension 0",
            Code::InvalidArgument,
            ok(c.create_index(create("z", 0, 1)).await),
        ),
        (
            "create: dimension 4097",
            Code::InvalidArgument,
            ok(c.create_index(create("z", 4097, 1)).await),
        ),
        (
            "create: metric unset",
            Code::InvalidArgument,
            ok(c.create_index(create("z", 3, 0)).await),
        ),
        (
            "create: metric unknown",
            Code::InvalidArgument,
            ok(c.create_index(create("z", 3, 42)).await),
        ),
        (
            "create: default m 1",
            Code::InvalidArgument,
            ok(c.create_index(pb::CreateIndexRequest {
                default_config: Some(pb::HnswConfig {
                    m: 1,
                    ..Default::default()
                }),
                ..create("z", 3, 1)
            })
            .await),
        ),
        (
            "create: default ef_search 10001",
            Code::InvalidArgument,
            ok(c.create_index(pb::CreateIndexRequest {
                default_config: Some(pb::HnswConfig {
                    ef_search: 10_001,
                    ..Default::default()
                }),
                ..create("z", 3, 1)
            })
            .await),
        ),
        (
            "create: duplicate",
            Code::AlreadyExists,
            ok(c.create_index(create("v", 3, 1)).await),
        ),
        // GetIndex, ListIndexes, DeleteIndex
        (
            "get: unknown index",
            Code::NotFound,
            ok(c.get_index(pb::GetIndexRequest {
                name: "nope".into(),
            })
            .await),
        ),
        (
            "get: bad name",
            Code::InvalidArgument,
            ok(c.get_index(pb::GetIndexRequest {
                name: "no pe".into(),
            })
            .await),
        ),
        (
            "list: page_size 1001",
            Code::InvalidArgument,
            ok(c.list_indexes(pb::ListIndexesRequest {
                page_size: 1001,
                page_token: String::new(),
            })
            .await),
        ),
        (
            "list: token not base64",
            Code::InvalidArgument,
            ok(c.list_indexes(pb::ListIndexesRequest {
                page_size: 0,
                page_token: "!!!".into(),
            })
            .await),
        ),
        (
            "list: token of another version",
            Code::InvalidArgument,
            ok(c.list_indexes(pb::ListIndexesRequest {
                page_size: 0,
                page_token: token("v9:a"),
            })
            .await),
        ),
        (
            "list: token naming no valid name",
            Code::InvalidArgument,
            ok(c.list_indexes(pb::ListIndexesRequest {
                page_size: 0,
                page_token: token("v1:a b"),
            })
            .await),
        ),
        (
            "delete: unknown index",
            Code::NotFound,
            ok(c.delete_index(pb::DeleteIndexRequest {
                name: "nope".into(),
            })
            .await),
        ),
        (
            "delete: empty name",
            Code::InvalidArgument,
            ok(c.delete_index(pb::DeleteIndexRequest {
                name: String::new(),
            })
            .await),
        ),
        // UpsertPoints
        (
            "upsert: unknown index",
            Code::NotFound,
            ok(c.upsert_points(upsert_req("nope", vec![pt(1, q3.clone())]))
                .await),
        ),
        (
            "upsert: empty batch",
            Code::InvalidArgument,
            ok(c.upsert_points(upsert_req("v", vec![])).await),
        ),
        (
            "upsert: wrong length",
            Code::InvalidArgument,
            ok(c.upsert_points(upsert_req(
                "v",
                vec![pt(2, q3.clone()), pt(3, vec![1.0; 4])],
            ))
            .await),
        ),
        (
            "upsert: empty vector",
            Code::InvalidArgument,
            ok(c.upsert_points(upsert_req("v", vec![pt(2, vec![])])).await),
        ),
        (
            "upsert: NaN",
            Code::InvalidArgument,
            ok(
                c.upsert_points(upsert_req("v", vec![pt(2, vec![1.0, f32::NAN, 0.0])]))
                    .await,
            ),
        ),
        (
            "upsert: +inf",
            Code::InvalidArgument,
            ok(
                c.upsert_points(upsert_req("v", vec![pt(2, vec![1.0, f32::INFINITY, 0.0])]))
                    .await,
            ),
        ),
        (
            "upsert: -inf",
            Code::InvalidArgument,
            ok(c.upsert_points(upsert_req(
                "v",
                vec![pt(2, vec![f32::NEG_INFINITY, 0.0, 0.0])],
            ))
            .await),
        ),
        (
            "upsert: zero vector for cosine",
            Code::InvalidArgument,
            ok(c.upsert_points(upsert_req("vc", vec![pt(2, vec![0.0; 3])]))
                .await),
        ),
        (
            "upsert: over --max-points-per-upsert",
            Code::ResourceExhausted,
            ok(c.upsert_points(upsert_req(
                "v",
                (10..111).map(|i| pt(i, q3.clone())).collect(),
            ))
            .await),
        ),
        (
            "upsert: over --max-request-bytes",
            Code::ResourceExhausted,
            ok(
                c.upsert_points(upsert_req("v", vec![pt(2, vec![1.0; 100_000])]))
                    .await,
            ),
        ),
        // ImportPoints
        (
            "import: no message",
            Code::InvalidArgument,
            ok(
                c.import_points(tokio_stream::iter(Vec::<pb::ImportPointsRequest>::new()))
                    .await,
            ),
        ),
        (
            "import: unknown index",
            Code::NotFound,
            ok(
                c.import_points(tokio_stream::iter(vec![pb::ImportPointsRequest {
                    index_name: "nope".into(),
                    points: vec![pt(1, q3.clone())],
                    ..Default::default()
                }]))
                .await,
            ),
        ),
        (
            "import: bad first name",
            Code::InvalidArgument,
            ok(
                c.import_points(tokio_stream::iter(vec![pb::ImportPointsRequest {
                    index_name: String::new(),
                    points: vec![pt(1, q3.clone())],
                    ..Default::default()
                }]))
                .await,
            ),
        ),
        (
            "import: NaN in a message",
            Code::InvalidArgument,
            ok(
                c.import_points(tokio_stream::iter(vec![pb::ImportPointsRequest {
                    index_name: "v".into(),
                    points: vec![pt(2, vec![f32::NAN; 3])],
                    ..Default::default()
                }]))
                .await,
            ),
        ),
        (
            "import: message over --max-points-per-upsert",
            Code::ResourceExhausted,
            ok(
                c.import_points(tokio_stream::iter(vec![pb::ImportPointsRequest {
                    index_name: "v".into(),
                    points: (10..111).map(|i| pt(i, q3.clone())).collect(),
                    ..Default::default()
                }]))
                .await,
            ),
        ),
        // DeletePoints, GetPoint
        (
            "delete points: empty ids",
            Code::InvalidArgument,
            ok(c.delete_points(pb::DeletePointsRequest {
                index_name: "v".into(),
                ids: vec![],
                ..Default::default()
            })
            .await),
        ),
        (
            "delete points: unknown index",
            Code::NotFound,
            ok(c.delete_points(pb::DeletePointsRequest {
                index_name: "nope".into(),
                ids: vec![1],
                ..Default::default()
            })
            .await),
        ),
        (
            "get point: unknown id",
            Code::NotFound,
            ok(c.get_point(pb::GetPointRequest {
                index_name: "v".into(),
                id: 999,
            })
            .await),
        ),
        (
            "get point: unknown index",
            Code::NotFound,
            ok(c.get_point(pb::GetPointRequest {
                index_name: "nope".into(),
                id: 1,
            })
            .await),
        ),
        // Search, SearchBatch
        (
            "search: k 0",
            Code::InvalidArgument,
            ok(c.search(search_req("v", q3.clone(), 0, None)).await),
        ),
        (
            "search: k 1001",
            Code::InvalidArgument,
            ok(c.search(search_req("v", q3.clone(), 1001, None)).await),
        ),
        (
            "search: ef 0",
            Code::InvalidArgument,
            ok(c.search(search_req("v", q3.clone(), 1, Some(0))).await),
        ),
        (
            "search: ef 10001",
            Code::InvalidArgument,
            ok(c.search(search_req("v", q3.clone(), 1, Some(10_001))).await),
        ),
        (
            "search: wrong dimension",
            Code::InvalidArgument,
            ok(c.search(search_req("v", vec![1.0; 2], 1, None)).await),
        ),
        (
            "search: empty vector",
            Code::InvalidArgument,
            ok(c.search(search_req("v", vec![], 1, None)).await),
        ),
        (
            "search: NaN",
            Code::InvalidArgument,
            ok(c.search(search_req("v", vec![f32::NAN; 3], 1, None)).await),
        ),
        (
            "search: unknown index",
            Code::NotFound,
            ok(c.search(search_req("nope", q3.clone(), 1, None)).await),
        ),
        (
            "batch: no queries",
            Code::InvalidArgument,
            ok(c.search_batch(pb::SearchBatchRequest {
                index_name: "v".into(),
                queries: vec![],
                k: 1,
                ef_search: None,
                ..Default::default()
            })
            .await),
        ),
        (
            "batch: one bad query",
            Code::InvalidArgument,
            ok(c.search_batch(pb::SearchBatchRequest {
                index_name: "v".into(),
                queries: vec![
                    pb::QueryVector { vector: q3.clone() },
                    pb::QueryVector {
                        vector: vec![f32::NAN; 3],
                    },
                ],
                k: 1,
                ef_search: None,
                ..Default::default()
            })
            .await),
        ),
        // Profiles
        (
            "put profile: unknown index",
            Code::NotFound,
            ok(c.put_profile(pb::PutProfileRequest {
                profile: Some(pb::Profile {
                    name: "p".into(),
                    indexes: vec![pb::ProfileIndex {
                        index_name: "nope".into(),
                        default_config: None,
                    }],
                }),
            })
            .await),
        ),
        (
            "put profile: missing",
            Code::InvalidArgument,
            ok(c.put_profile(pb::PutProfileRequest { profile: None }).await),
        ),
        (
            "put profile: bad name",
            Code::InvalidArgument,
            ok(c.put_profile(pb::PutProfileRequest {
                profile: Some(pb::Profile {
                    name: "bad name".into(),
                    indexes: vec![],
                }),
            })
            .await),
        ),
        (
            "put profile: index twice",
            Code::InvalidArgument,
            ok(c.put_profile(pb::PutProfileRequest {
                profile: Some(pb::Profile {
                    name: "p".into(),
                    indexes: vec![
                        pb::ProfileIndex {
                            index_name: "v".into(),
                            default_config: None,
                        },
                        pb::ProfileIndex {
                            index_name: "v".into(),
                            default_config: None,
                        },
                    ],
                }),
            })
            .await),
        ),
        (
            "put profile: bad config",
            Code::InvalidArgument,
            ok(c.put_profile(pb::PutProfileRequest {
                profile: Some(pb::Profile {
                    name: "p".into(),
                    indexes: vec![pb::ProfileIndex {
                        index_name: "v".into(),
                        default_config: Some(pb::HnswConfig {
                            m: 1000,
                            ..Default::default()
                        }),
                    }],
                }),
            })
            .await),
        ),
        (
            "get profile: unknown",
            Code::NotFound,
            ok(c.get_profile(pb::GetProfileRequest {
                name: "nope".into(),
            })
            .await),
        ),
        (
            "delete profile: unknown",
            Code::NotFound,
            ok(c.delete_profile(pb::DeleteProfileRequest {
                name: "nope".into(),
            })
            .await),
        ),
        (
            "activate profile: unknown",
            Code::NotFound,
            ok(c.activate_profile(pb::ActivateProfileRequest {
                name: "nope".into(),
            })
            .await),
        ),
        (
            "list profiles: bad token",
            Code::InvalidArgument,
            ok(c.list_profiles(pb::ListProfilesRequest {
                page_size: 0,
                page_token: "x".into(),
            })
            .await),
        ),
        // Harnesses
        (
            "harness: unknown index",
            Code::NotFound,
            ok(a.create_harness(harness_req("nope", "h2", 10, sampled(5)))
                .await),
        ),
        (
            "harness: no queries",
            Code::InvalidArgument,
            ok(a.create_harness(harness_req("t", "h2", 10, None)).await),
        ),
        (
            "harness: explicit empty",
            Code::InvalidArgument,
            ok(
                a.create_harness(harness_req("t", "h2", 10, explicit(vec![])))
                    .await,
            ),
        ),
        (
            "harness: explicit wrong dimension",
            Code::InvalidArgument,
            ok(
                a.create_harness(harness_req("t", "h2", 10, explicit(vec![vec![1.0; 3]])))
                    .await,
            ),
        ),
        (
            "harness: over --max-harness-queries",
            Code::ResourceExhausted,
            ok(a.create_harness(harness_req(
                "t",
                "h2",
                10,
                explicit(vec![vec![0.5; DIM]; 51]),
            ))
            .await),
        ),
        (
            "harness: sampled 0",
            Code::InvalidArgument,
            ok(a.create_harness(harness_req("t", "h2", 10, sampled(0)))
                .await),
        ),
        (
            "harness: k 1001",
            Code::InvalidArgument,
            ok(a.create_harness(harness_req("t", "h2", 1001, sampled(5)))
                .await),
        ),
        (
            "harness: sampled from an empty index",
            Code::FailedPrecondition,
            ok(a.create_harness(harness_req("e", "h2", 10, sampled(5)))
                .await),
        ),
        (
            "harness: duplicate",
            Code::AlreadyExists,
            ok(a.create_harness(harness_req("t", "h", 10, sampled(5)))
                .await),
        ),
        (
            "get harness: unknown",
            Code::NotFound,
            ok(a.get_harness(pb::GetHarnessRequest {
                index_name: "t".into(),
                name: "nope".into(),
            })
            .await),
        ),
        (
            "list harnesses: unknown index",
            Code::NotFound,
            ok(a.list_harnesses(pb::ListHarnessesRequest {
                index_name: "nope".into(),
            })
            .await),
        ),
        (
            "delete harness: unknown",
            Code::NotFound,
            ok(a.delete_harness(pb::DeleteHarnessRequest {
                index_name: "t".into(),
                name: "nope".into(),
            })
            .await),
        ),
        // Trials
        (
            "trial: no config",
            Code::InvalidArgument,
            ok(a.run_trial(pb::RunTrialRequest {
                index_name: "t".into(),
                harness: "h".into(),
                config: None,
            })
            .await),
        ),
        (
            "trial: m 1",
            Code::InvalidArgument,
            ok(a.run_trial(pb::RunTrialRequest {
                index_name: "t".into(),
                harness: "h".into(),
                config: Some(cfg(1, 40, 40)),
            })
            .await),
        ),
        (
            "trial: ef_construction 401",
            Code::InvalidArgument,
            ok(a.run_trial(pb::RunTrialRequest {
                index_name: "t".into(),
                harness: "h".into(),
                config: Some(cfg(8, 401, 40)),
            })
            .await),
        ),
        (
            "trial: ef_search 5",
            Code::InvalidArgument,
            ok(a.run_trial(pb::RunTrialRequest {
                index_name: "t".into(),
                harness: "h".into(),
                config: Some(cfg(8, 40, 5)),
            })
            .await),
        ),
        (
            "trial: unknown harness",
            Code::NotFound,
            ok(a.run_trial(pb::RunTrialRequest {
                index_name: "t".into(),
                harness: "nope".into(),
                config: Some(cfg(8, 40, 40)),
            })
            .await),
        ),
        (
            "trial: unknown index",
            Code::NotFound,
            ok(a.run_trial(pb::RunTrialRequest {
                index_name: "nope".into(),
                harness: "h".into(),
                config: Some(cfg(8, 40, 40)),
            })
            .await),
        ),
        (
            "get trial: unknown id",
            Code::NotFound,
            ok(a.get_trial(pb::GetTrialRequest { id: 999_999 }).await),
        ),
        (
            "list trials: bad token",
            Code::InvalidArgument,
            ok(a.list_trials(pb::ListTrialsRequest {
                page_token: "%%".into(),
                ..Default::default()
            })
            .await),
        ),
        (
            "list trials: token not a trial id",
            Code::InvalidArgument,
            ok(a.list_trials(pb::ListTrialsRequest {
                page_token: token("v1:abc"),
                ..Default::default()
            })
            .await),
        ),
        (
            "list trials: page_size 1001",
            Code::InvalidArgument,
            ok(a.list_trials(pb::ListTrialsRequest {
                page_size: 1001,
                ..Default::default()
            })
            .await),
        ),
        (
            "list trials: bad index name",
            Code::InvalidArgument,
            ok(a.list_trials(pb::ListTrialsRequest {
                index_name: "a b".into(),
                ..Default::default()
            })
            .await),
        ),
        // Autotune and jobs
        (
            "autotune: min_recall 1.5",
            Code::InvalidArgument,
            ok(a.autotune(pb::AutotuneRequest {
                min_recall: Some(1.5),
                ..tune("v", "h")
            })
            .await),
        ),
        (
            "autotune: min_recall NaN",
            Code::InvalidArgument,
            ok(a.autotune(pb::AutotuneRequest {
                min_recall: Some(f64::NAN),
                ..tune("v", "h")
            })
            .await),
        ),
        (
            "autotune: grid of 1001",
            Code::ResourceExhausted,
            ok(a.autotune(pb::AutotuneRequest {
                grid: vec![cfg(8, 40, 40); 1001],
                ..tune("v", "h")
            })
            .await),
        ),
        (
            "autotune: bad grid entry",
            Code::InvalidArgument,
            ok(a.autotune(pb::AutotuneRequest {
                grid: vec![cfg(8, 40, 40), cfg(8, 4, 40)],
                ..tune("v", "h")
            })
            .await),
        ),
        (
            "autotune: target_recall without its objective",
            Code::InvalidArgument,
            ok(a.autotune(pb::AutotuneRequest {
                target_recall: Some(0.9),
                ..tune("v", "h")
            })
            .await),
        ),
        (
            "autotune: objective unknown",
            Code::InvalidArgument,
            ok(a.autotune(pb::AutotuneRequest {
                objective: 99,
                ..tune("v", "h")
            })
            .await),
        ),
        (
            "autotune: unknown harness",
            Code::NotFound,
            ok(a.autotune(tune("v", "nope")).await),
        ),
        (
            "autotune: index already being tuned",
            Code::Aborted,
            ok(a.autotune(tune("t", "h")).await),
        ),
        (
            "list jobs: bad index name",
            Code::InvalidArgument,
            ok(a.list_jobs(pb::ListJobsRequest {
                index_name: "a/b".into(),
            })
            .await),
        ),
        (
            "pareto: unknown index",
            Code::NotFound,
            ok(a.get_pareto_front(pb::GetParetoFrontRequest {
                index_name: "nope".into(),
                harness: "h".into(),
                ..Default::default()
            })
            .await),
        ),
        (
            "cancel: empty id",
            Code::InvalidArgument,
            ok(a.cancel_job(pb::CancelJobRequest { id: String::new() })
                .await),
        ),
        (
            "cancel: unknown job",
            Code::NotFound,
            ok(a.cancel_job(pb::CancelJobRequest {
                id: "job-999".into(),
            })
            .await),
        ),
        // Promotions
        (
            "promote: unknown trial",
            Code::NotFound,
            ok(p.promote(pb::PromoteRequest {
                index_name: "t".into(),
                trial_id: 999_999,
                ..Default::default()
            })
            .await),
        ),
        (
            "promote: unknown index",
            Code::NotFound,
            ok(p.promote(pb::PromoteRequest {
                index_name: "nope".into(),
                trial_id: trial.id,
                ..Default::default()
            })
            .await),
        ),
        (
            "promote: another index's trial",
            Code::InvalidArgument,
            ok(p.promote(pb::PromoteRequest {
                index_name: "v".into(),
                trial_id: trial.id,
                ..Default::default()
            })
            .await),
        ),
        (
            "rollback: nothing promoted",
            Code::FailedPrecondition,
            ok(p.rollback(pb::RollbackRequest {
                index_name: "t".into(),
            })
            .await),
        ),
        (
            "get promoted: unknown index",
            Code::NotFound,
            ok(p.get_promoted(pb::GetPromotedRequest {
                index_name: "nope".into(),
            })
            .await),
        ),
        (
            "get promoted: bad name",
            Code::InvalidArgument,
            ok(p.get_promoted(pb::GetPromotedRequest {
                index_name: String::new(),
            })
            .await),
        ),
    ];
    assert!(cases.len() >= 40, "the table has {} rows", cases.len());
    let mut wrong = Vec::new();
    for (what, code, result) in &cases {
        match result {
            Ok(()) => wrong.push(format!("{what}: expected {code:?}, got OK")),
            Err(s) if s.code() != *code => wrong.push(format!(
                "{what}: expected {code:?}, got {:?}: {}",
                s.code(),
                s.message()
            )),
            Err(s) if s.message().is_empty() => wrong.push(format!("{what}: empty message")),
            Err(_) => {}
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} rows wrong:\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n")
    );

    // The running job: cancelling it works, and cancelling it again is FAILED_PRECONDITION.
    let cancelled = a
        .cancel_job(pb::CancelJobRequest { id: job_id.clone() })
        .await
        .expect("cancel")
        .into_inner()
        .job
        .expect("job");
    assert_eq!(cancelled.state, pb::JobState::Cancelled as i32);
    let again = a.cancel_job(pb::CancelJobRequest { id: job_id }).await;
    assert_eq!(code_of(again), Code::FailedPrecondition);
    drop(job_stream);

    // After the whole table: health SERVING, and the data from before is all there.
    let health = HealthClient::new(s.channel().await)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(health.status, ServingStatus::Serving as i32);
    let count = |name: &'static str| {
        let mut c = c.clone();
        async move {
            c.get_index(pb::GetIndexRequest { name: name.into() })
                .await
                .expect("get index")
                .into_inner()
                .index
                .expect("index")
                .point_count
        }
    };
    assert_eq!(count("v").await, 1);
    assert_eq!(count("vc").await, 0);
    assert_eq!(count("t").await, 600);
    let hit = search(&mut c, "v", vec![1.0, 2.0, 3.0], 5, None).await;
    assert_eq!(hit.neighbors.len(), 1);
    assert_eq!(hit.neighbors[0].id, 1);
    for probe in [&t_points[0], &t_points[333], &t_points[599]] {
        let r = search(&mut c, "t", probe.vector.clone(), 3, None).await;
        assert_eq!(r.neighbors[0].id, probe.id);
    }
    let names: Vec<String> = c
        .list_indexes(pb::ListIndexesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .indexes
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(names, ["e", "t", "v", "vc"]);
    let profiles = c
        .list_profiles(pb::ListProfilesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .profiles;
    assert!(profiles.is_empty());
    let harnesses = a
        .list_harnesses(pb::ListHarnessesRequest {
            index_name: "t".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .harnesses;
    assert_eq!(harnesses.len(), 1);
    let (current, _) = {
        let r = p
            .get_promoted(pb::GetPromotedRequest {
                index_name: "t".into(),
            })
            .await
            .unwrap()
            .into_inner();
        (r.current, r.history)
    };
    assert!(current.is_none(), "nothing was promoted");
}

/// Found by tests/fuzz.rs: an error that quoted a client's value in full (a 100,000-character
/// job id or page token) became a grpc-message header larger than the HTTP/2 header list a
/// client accepts (tonic's: 16 KiB), and the client dropped the whole connection
/// (GOAWAY ENHANCE_YOUR_CALM) with every call on it. The message is clipped; the code stays.
#[tokio::test]
async fn an_error_quoting_a_huge_value_is_clipped_and_keeps_the_connection() {
    let s = TestServer::start().await;
    let ch = s.channel().await;
    let mut a = vectord::pb::autotune_service_client::AutotuneServiceClient::new(ch.clone());
    let mut c = vectord::pb::index_service_client::IndexServiceClient::new(ch);
    let huge = "x".repeat(100_000);
    // A job id over its 64-byte bound is refused before any lookup, without quoting it whole.
    let e = a
        .cancel_job(pb::CancelJobRequest { id: huge.clone() })
        .await
        .expect_err("too long");
    assert_eq!(e.code(), Code::InvalidArgument, "{}", clip(e.message()));
    assert!(e.message().len() <= 1100, "{}", clip(e.message()));
    // A 64-byte id of no job is NOT_FOUND, quoted (short enough to quote whole).
    let e = a
        .cancel_job(pb::CancelJobRequest { id: "x".repeat(64) })
        .await
        .expect_err("no such job");
    assert_eq!(e.code(), Code::NotFound, "{}", clip(e.message()));
    assert!(
        e.message().len() <= 1100 && e.message().starts_with("job \"xxx"),
        "clipped, and still says what: {}",
        clip(e.message())
    );
    let e = c
        .list_indexes(pb::ListIndexesRequest {
            page_size: 0,
            page_token: huge,
        })
        .await
        .expect_err("not a token");
    assert_eq!(e.code(), Code::InvalidArgument, "{}", clip(e.message()));
    assert!(e.message().len() <= 1100, "{}", clip(e.message()));
    // Clipped at a character boundary.
    let e = c
        .list_profiles(pb::ListProfilesRequest {
            page_size: 0,
            page_token: "é".repeat(50_000),
        })
        .await
        .expect_err("not a token");
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(e.message().len() <= 1100, "{}", clip(e.message()));
    // The connection is still usable.
    c.list_indexes(pb::ListIndexesRequest::default())
        .await
        .expect("the same channel still works");
}

fn clip(s: &str) -> String {
    s.chars().take(300).collect()
}

/// Found by tests/fuzz.rs: reflection (tonic-reflection) answers an unknown symbol or file with
/// NOT_FOUND quoting the name whole; a 100,000-character name made a grpc-message trailer over
/// the client's HTTP/2 header limit and the client dropped the connection. Reflection requests
/// are bounded (4 KiB: symbol and file names), so a quote stays small; over the bound,
/// tonic-reflection ends the stream without an answer.
#[tokio::test]
async fn reflection_with_a_huge_symbol_is_refused_and_keeps_the_connection() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let s = TestServer::start().await;
    let ch = s.channel().await;
    let mut r = ServerReflectionClient::new(ch.clone());
    for (what, request) in [
        (
            "a huge symbol",
            MessageRequest::FileContainingSymbol("x".repeat(100_000)),
        ),
        (
            "a huge file name",
            MessageRequest::FileByFilename("é".repeat(50_000)),
        ),
        (
            "an unknown symbol",
            MessageRequest::FileContainingSymbol("x.Y".into()),
        ),
    ] {
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(request),
        };
        let answer = async {
            let mut stream = r
                .server_reflection_info(futures_util::stream::iter([req]))
                .await?
                .into_inner();
            stream.message().await
        }
        .await;
        match answer {
            // tonic-reflection ends the stream without a message when a request cannot be
            // read (here: over the bound).
            Ok(None) => assert_ne!(what, "an unknown symbol"),
            Ok(Some(m)) => panic!("{what}: answered {m:?}"),
            Err(e) => {
                assert!(
                    std::error::Error::source(&e).is_none(),
                    "{what}: the server's status, not a broken connection: {e:?}"
                );
                assert_eq!(e.code(), Code::NotFound, "{what}");
                assert!(e.message().len() <= 1100, "{what}: {}", clip(e.message()));
            }
        }
    }
    let mut c = vectord::pb::index_service_client::IndexServiceClient::new(ch);
    c.list_indexes(pb::ListIndexesRequest::default())
        .await
        .expect("the same channel still works");
}
