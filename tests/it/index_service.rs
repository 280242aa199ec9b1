//! IndexService against a real server: round trips, search quality, deletes, restarts,
//! activation under load, validation, reflection and limits.

use crate::common;

use common::*;
use tonic::Code;
use vectord::pb;

#[tokio::test]
async fn index_round_trip_and_paging() {
    let s = TestServer::start().await;
    let mut c = s.index().await;
    for name in ["b", "a", "c"] {
        create_index(&mut c, name, 4, pb::Metric::L2).await;
    }
    let got = c
        .get_index(pb::GetIndexRequest { name: "a".into() })
        .await
        .unwrap()
        .into_inner()
        .index
        .unwrap();
    assert_eq!(got.dimension, 4);
    assert_eq!(got.metric, pb::Metric::L2 as i32);
    let cfg = got.default_config.unwrap();
    assert_eq!((cfg.m, cfg.ef_construction, cfg.ef_search), (16, 200, 64));
    let generation = got.active_generation.unwrap();
    assert_eq!(generation.number, 1);
    assert_eq!(generation.config_source, pb::ConfigSource::Default as i32);

    // Two pages of two, in name order.
    let p1 = c
        .list_indexes(pb::ListIndexesRequest {
            page_size: 2,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = p1.indexes.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert!(!p1.next_page_token.is_empty());
    let p2 = c
        .list_indexes(pb::ListIndexesRequest {
            page_size: 2,
            page_token: p1.next_page_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p2.indexes.len(), 1);
    assert_eq!(p2.indexes[0].name, "c");
    assert!(p2.next_page_token.is_empty());

    assert_eq!(
        code_of(
            c.list_indexes(pb::ListIndexesRequest {
                page_size: 2,
                page_token: "garbage!".into()
            })
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code_of(
            c.list_indexes(pb::ListIndexesRequest {
                page_size: 1001,
                page_token: String::new()
            })
            .await
        ),
        Code::InvalidArgument
    );

    c.delete_index(pb::DeleteIndexRequest { name: "b".into() })
        .await
        .unwrap();
    assert_eq!(
        code_of(c.get_index(pb::GetIndexRequest { name: "b".into() }).await),
        Code::NotFound
    );
    assert_eq!(
        code_of(
            c.delete_index(pb::DeleteIndexRequest { name: "b".into() })
                .await
        ),
        Code::NotFound
    );
    let all = c
        .list_indexes(pb::ListIndexesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.indexes.len(), 2);
}

#[tokio::test]
async fn recall_at_10_against_brute_force() {
    let s = TestServer::start().await;
    let mut c = s.index().await;
    create_index(&mut c, "r", 64, pb::Metric::L2).await;
    let mut g = Gen::new(1);
    let pts = points(&mut g, 0..2000, 64);
    for chunk in pts.chunks(500) {
        upsert(&mut c, "r", chunk.to_vec()).await;
    }
    let mut hits = 0;
    let queries = 100;
    for _ in 0..queries {
        let q = g.vector(64);
        let exact = exact_top_k(pb::Metric::L2, &pts, &q, 10);
        let got = search(&mut c, "r", q, 10, Some(64)).await;
        assert_eq!(got.neighbors.len(), 10);
        // Nearest first.
        assert!(got
            .neighbors
            .windows(2)
            .all(|w| w[0].distance <= w[1].distance));
        hits += got
            .neighbors
            .iter()
            .filter(|n| exact.contains(&n.id))
            .count();
    }
    let recall = hits as f64 / (queries * 10) as f64;
    assert!(recall >= 0.95, "recall@10 = {recall}");
}

#[tokio::test]
async fn a_stored_vector_finds_itself_first_for_every_metric() {
    let s = TestServer::start().await;
    let mut c = s.index().await;
    for (name, metric) in [
        ("l2", pb::Metric::L2),
        ("cos", pb::Metric::Cosine),
        ("dot", pb::Metric::Dot),
    ] {
        create_index(&mut c, name, 16, metric).await;
        let mut g = Gen::new(7);
        // Unit vectors: their dot with themselves is 1 up to rounding, which must not panic.
        let pts: Vec<pb::Point> = (0..300)
            .map(|id| pb::Point {
                id,
                vector: g.unit_vector(16),
            })
            .collect();
        upsert(&mut c, name, pts.clone()).await;
        for p in pts.iter().step_by(17) {
            let r = search(&mut c, name, p.vector.clone(), 3, None).await;
            assert_eq!(r.neighbors[0].id, p.id, "metric {name}");
            assert!(
                r.neighbors[0].distance.abs() < 1e-4,
                "metric {name}: {}",
                r.neighbors[0].distance
            );
        }
    }
    // Cosine normalises: a scaled copy of a stored vector is at distance 0 from it.
    let mut g = Gen::new(7);
    let v: Vec<f32> = g.unit_vector(16).iter().map(|x| x * 5.0).collect();
    let r = search(&mut c, "cos", v, 1, None).await;
    assert_eq!(r.neighbors[0].id, 0);
    assert!(r.neighbors[0].distance.abs() < 1e-4);
}

#[tokio::test]
async fn get_point_returns_the_stored_vector() {
    let s = TestServer::start().await;
    let mut c = s.index().await;
    create_index(&mut c, "gp", 2, pb::Metric::Cosine).await;
    upsert(
        &mut c,
        "gp",
        vec![pb::Point {
            id: 5,
            vector: vec![3.0, 4.0],
        }],
    )
    .await;
    let p = c
        .get_point(pb::GetPointRequest {
            index_name: "gp".into(),
            id: 5,
        })
        .await
        .unwrap()
        .into_inner()
        .point
        .unwrap();
    assert_eq!(p.id, 5);
    // A cosine index stores the normalised vector.
    assert!(
        (p.vector[0] - 0.6).abs() < 1e-6 && (p.vector[1] - 0.8).abs() < 1e-6,
        "{:?}",
        p.vector
    );
    assert_eq!(
        code_of(
            c.get_point(pb::GetPointRequest {
                index_name: "gp".into(),
                id: 6
            })
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code_of(
            c.get_point(pb::GetPointRequest {
                index_name: "nope".into(),
                id: 5
            })
            .await
        ),
        Code::NotFound
    );
    c.delete_points(pb::DeletePointsRequest {
        index_name: "gp".into(),
        ids: vec![5],
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(
        code_of(
            c.get_point(pb::GetPointRequest {
                index_name: "gp".into(),
                id: 5
            })
            .await
        ),
        Code::NotFound
    );
}

#[tokio::test]
async fn search_batch_equals_search() {
    let s = TestServer::start().await;
    let mut c = s.index().await;
    create_index(&mut c, "b", 8, pb::Metric::L2).await;
    let mut g = Gen::new(3);
    upsert(&mut c, "b", points(&mut g, 0..500, 8)).await;
    let queries: Vec<Vec<f32>> = (0..40).map(|_| g.vector(8)).collect();
    let batch = c
        .search_batch(pb::SearchBatchRequest {
            index_name: "b".into(),
            queries: queries
                .iter()
                .map(|v| pb::QueryVector { vector: v.clone() })
                .collect(),
            k: 7,
            ef_search: Some(50),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(batch.results.len(), 40);
    assert_eq!(batch.generation, 1);
    for (q, r) in queries.iter().zip(&batch.results) {
        let single = search(&mut c, "b", q.clone(), 7, Some(50)).await;
        assert_eq!(single.neighbors, r.neighbors);
    }
}

#[tokio::test]
async fn deleted_and_replaced_ids_never_come_back() {
    let s = TestServer::start().await;
    let mut c = s.index().await;
    create_index(&mut c, "d", 8, pb::Metric::L2).await;
    let mut g = Gen::new(5);
    let pts = points(&mut g, 0..400, 8);
    upsert(&mut c, "d", pts.clone()).await;

    let deleted: Vec<u64> = (0..400).step_by(3).collect();
    let r = c
        .delete_points(pb::DeletePointsRequest {
            index_name: "d".into(),
            ids: [deleted.clone(), vec![9999]].concat(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.deleted_count, deleted.len() as u64);
    assert_eq!(r.point_count, 400 - deleted.len() as u64);

    // Replace id 1 with a far-away vector.
    let far = vec![100.0f32; 8];
    let r = upsert(
        &mut c,
        "d",
        vec![pb::Point {
            id: 1,
            vector: far.clone(),
        }],
    )
    .await;
    assert_eq!(
        (r.upserted_count, r.point_count),
        (1, 400 - deleted.len() as u64)
    );

    for p in &pts {
        let got = search(&mut c, "d", p.vector.clone(), 20, None).await;
        for n in &got.neighbors {
            assert!(!deleted.contains(&n.id), "deleted id {} came back", n.id);
        }
        if p.id == 1 {
            assert!(
                got.neighbors.iter().all(|n| n.id != 1),
                "the replaced vector of id 1 answered"
            );
        }
    }
    let got = search(&mut c, "d", far, 1, None).await;
    assert_eq!(got.neighbors[0].id, 1);
    // Asking for more than exist returns every live point once.
    let all = search(&mut c, "d", vec![0.0; 8], 1000, None).await;
    assert_eq!(all.neighbors.len(), 400 - deleted.len());
}

#[tokio::test]
async fn restart_keeps_indexes_points_profiles_and_active_config() {
    let s = TestServer::start().await;
    let mut c = s.index().await;
    create_index(&mut c, "keep", 8, pb::Metric::Cosine).await;
    let mut g = Gen::new(11);
    let pts = points(&mut g, 0..300, 8);
    upsert(&mut c, "keep", pts.clone()).await;
    c.delete_points(pb::DeletePointsRequest {
        index_name: "keep".into(),
        ids: vec![0, 1, 2],
        ..Default::default()
    })
    .await
    .unwrap();
    let cfg = pb::HnswConfig {
        m: 12,
        ef_construction: 80,
        ef_search: 40,
        seed: Some(9),
    };
    common::put_profile(&mut c, "prod", &[("keep", Some(cfg))]).await;
    let act = c
        .activate_profile(pb::ActivateProfileRequest {
            name: "prod".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(act.generations[0].number, 2);
    drop(c);

    let s = s.restart().await;
    let mut c = s.index().await;
    let idx = c
        .get_index(pb::GetIndexRequest {
            name: "keep".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .index
        .unwrap();
    assert_eq!(idx.point_count, 297);
    assert_eq!(idx.metric, pb::Metric::Cosine as i32);
    let generation = idx.active_generation.unwrap();
    assert_eq!(generation.number, 2);
    assert_eq!(generation.profile, "prod");
    assert_eq!(generation.config, Some(cfg));
    let prof = c
        .get_profile(pb::GetProfileRequest {
            name: "prod".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(prof.profile.unwrap().indexes[0].default_config, Some(cfg));
    for p in pts.iter().skip(3).step_by(10) {
        let r = search(&mut c, "keep", p.vector.clone(), 1, None).await;
        assert_eq!(r.neighbors[0].id, p.id);
        assert_eq!(r.generation, 2);
    }
    let r = search(&mut c, "keep", pts[0].vector.clone(), 5, None).await;
    assert!(r.neighbors.iter().all(|n| n.id > 2));
}

#[tokio::test]
async fn activation_swaps_generations_while_searches_never_fail() {
    let s = TestServer::start().await;
    let mut c = s.index().await;
    create_index(&mut c, "hot", 16, pb::Metric::L2).await;
    let mut g = Gen::new(13);
    let pts = points(&mut g, 0..3000, 16);
    upsert(&mut c, "hot", pts.clone()).await;
    common::put_profile(&mut c, "p", &[("hot", None)]).await;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let searcher = spawn_searcher(s.index().await, "hot", &pts[42], 10, stop_rx);
    // Writes during the builds must not be lost by the swap.
    let writer = {
        let mut c = s.index().await;
        let extra = points(&mut Gen::new(99), 10_000..10_200, 16);
        tokio::spawn(async move {
            for p in extra.chunks(10) {
                upsert(&mut c, "hot", p.to_vec()).await;
            }
            extra
        })
    };
    let mut last = 0;
    for _ in 0..3 {
        let r = c
            .activate_profile(pb::ActivateProfileRequest { name: "p".into() })
            .await
            .unwrap()
            .into_inner();
        last = r.generations[0].number;
    }
    let extra = writer.await.unwrap();
    stop_tx.send(true).unwrap();
    let (ok, generations) = searcher.await.unwrap();
    assert_eq!(last, 4);
    assert!(ok > 10);
    assert!(generations.iter().all(|g| (1..=4).contains(g)));
    let idx = c
        .get_index(pb::GetIndexRequest { name: "hot".into() })
        .await
        .unwrap()
        .into_inner()
        .index
        .unwrap();
    assert_eq!(idx.point_count, 3200);
    // Every point written during the builds is in the final graph. A search at ef_search 64
    // is approximate, so a point it misses is looked for again with an ef_search above the
    // index's size, which reaches every point linked into the graph: only a point missing from it
    // fails.
    let mut approximate_misses = 0;
    for p in &extra {
        let r = search(&mut c, "hot", p.vector.clone(), 1, None).await;
        assert_eq!(r.generation, 4);
        if r.neighbors[0].id != p.id {
            approximate_misses += 1;
            let deep = search(&mut c, "hot", p.vector.clone(), 1, Some(5000)).await;
            assert_eq!(
                deep.neighbors[0].id, p.id,
                "a point upserted during a build was lost"
            );
        }
    }
    assert!(
        approximate_misses <= 2,
        "{approximate_misses} of 200 points not found by their own vectors at ef_search 64"
    );
}

#[tokio::test]
async fn import_points_streams_batches_and_reports_partial_progress() {
    let s = TestServer::start().await;
    let mut c = s.index().await;
    create_index(&mut c, "imp", 4, pb::Metric::L2).await;
    let mut g = Gen::new(17);
    let batches: Vec<pb::ImportPointsRequest> = (0..5)
        .map(|b| pb::ImportPointsRequest {
            index_name: if b == 0 { "imp".into() } else { String::new() },
            points: points(&mut g, b * 100..(b + 1) * 100, 4),
            ..Default::default()
        })
        .collect();
    let r = c
        .import_points(tokio_stream::iter(batches))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.upserted_count, r.point_count), (500, 500));

    // The third message is bad: the first two stay, the error says how many were upserted.
    let mut bad = vec![
        pb::ImportPointsRequest {
            index_name: "imp".into(),
            points: points(&mut g, 1000..1010, 4),
            ..Default::default()
        },
        pb::ImportPointsRequest {
            index_name: String::new(),
            points: points(&mut g, 1010..1020, 4),
            ..Default::default()
        },
        pb::ImportPointsRequest {
            index_name: String::new(),
            points: points(&mut g, 1020..1030, 3),
            ..Default::default()
        },
    ];
    bad.push(pb::ImportPointsRequest {
        index_name: String::new(),
        points: points(&mut g, 1030..1040, 4),
        ..Default::default()
    });
    let e = c.import_points(tokio_stream::iter(bad)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("20 points were upserted before it"),
        "{}",
        e.message()
    );
    let idx = c
        .get_index(pb::GetIndexRequest { name: "imp".into() })
        .await
        .unwrap()
        .into_inner()
        .index
        .unwrap();
    assert_eq!(idx.point_count, 520);

    let e = c
        .import_points(tokio_stream::iter(vec![pb::ImportPointsRequest {
            index_name: "nope".into(),
            points: vec![],
            ..Default::default()
        }]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test]
async fn oversized_requests_are_resource_exhausted() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = vectord::config::Config::for_tests(tmp.path());
    config.max_request_bytes = 64 * 1024;
    let s = TestServer::start_in(tmp.path(), config).await;
    let mut c = s.index().await;
    create_index(&mut c, "big", 128, pb::Metric::L2).await;
    let mut g = Gen::new(1);
    let e = c
        .upsert_points(pb::UpsertPointsRequest {
            index_name: "big".into(),
            points: points(&mut g, 0..200, 128),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    let idx = c
        .get_index(pb::GetIndexRequest { name: "big".into() })
        .await
        .unwrap()
        .into_inner()
        .index
        .unwrap();
    assert_eq!(idx.point_count, 0);
    // A request under the limit still works on the same server.
    upsert(&mut c, "big", points(&mut g, 0..10, 128)).await;
}

#[tokio::test]
async fn deleting_an_index_removes_its_points() {
    let s = TestServer::start().await;
    let mut c = s.index().await;
    create_index(&mut c, "gone", 4, pb::Metric::L2).await;
    upsert(&mut c, "gone", points(&mut Gen::new(2), 0..50, 4)).await;
    c.delete_index(pb::DeleteIndexRequest {
        name: "gone".into(),
    })
    .await
    .unwrap();
    create_index(&mut c, "gone", 4, pb::Metric::L2).await;
    let idx = c
        .get_index(pb::GetIndexRequest {
            name: "gone".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .index
        .unwrap();
    assert_eq!(idx.point_count, 0);
    assert!(search(&mut c, "gone", vec![0.0; 4], 5, None)
        .await
        .neighbors
        .is_empty());
    let s = s.restart().await;
    let mut c = s.index().await;
    let idx = c
        .get_index(pb::GetIndexRequest {
            name: "gone".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .index
        .unwrap();
    assert_eq!(idx.point_count, 0);
}

#[tokio::test]
async fn reflection_lists_every_service_in_v1_and_v1alpha() {
    use tonic_reflection::pb::{v1, v1alpha};
    let s = TestServer::start().await;
    let mut want = vec![
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "vectord.v1.AutotuneService",
        "vectord.v1.IndexService",
        "vectord.v1.PromotionService",
    ];
    want.sort();

    let mut c = v1::server_reflection_client::ServerReflectionClient::new(s.channel().await);
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut resp = c
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let msg = resp.message().await.unwrap().unwrap();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        msg.message_response
    else {
        panic!("not a list response");
    };
    let mut got: Vec<_> = list
        .service
        .iter()
        .map(|s| s.name.as_str())
        .filter(|n| !n.contains("v1alpha"))
        .collect();
    got.sort();
    for w in &want {
        assert!(got.contains(w), "v1 reflection lacks {w}: {got:?}");
    }

    let mut c = v1alpha::server_reflection_client::ServerReflectionClient::new(s.channel().await);
    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "vectord.v1.IndexService".into(),
            ),
        ),
    };
    let mut resp = c
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let msg = resp.message().await.unwrap().unwrap();
    assert!(
        matches!(msg.message_response, Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(ref f)) if !f.file_descriptor_proto.is_empty()),
        "v1alpha describe failed: {msg:?}"
    );
}

/// Two engines side by side in one server: each index keeps the engine it was created with
/// (shown by GetIndex, kept across a restart with another --engine), and each answers searches
/// as well as brute force says it should. An unknown engine is INVALID_ARGUMENT.
#[tokio::test]
async fn indexes_on_different_engines_serve_side_by_side() {
    let s = TestServer::start().await;
    let mut c = s.index().await;
    let create = |name: &str, engine: &str| pb::CreateIndexRequest {
        name: name.into(),
        dimension: 16,
        metric: pb::Metric::L2 as i32,
        default_config: None,
        engine: engine.into(),
    };
    let e = c.create_index(create("bad", "faiss")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("faiss"), "{}", e.message());
    for (name, engine) in [("i8", "native_i8"), ("rs", "hnsw_rs"), ("dflt", "")] {
        let got = c
            .create_index(create(name, engine))
            .await
            .unwrap()
            .into_inner()
            .index
            .unwrap();
        // The test server runs the default engine (native_i8).
        let want = if engine.is_empty() {
            "native_i8"
        } else {
            engine
        };
        assert_eq!(got.engine, want, "{name}");
    }
    let mut g = Gen::new(7);
    let pts = points(&mut g, 0..600, 16);
    for name in ["i8", "rs"] {
        upsert(&mut c, name, pts.clone()).await;
    }
    let queries: Vec<Vec<f32>> = (0..30).map(|_| g.vector(16)).collect();
    let recall = |c: &mut pb::index_service_client::IndexServiceClient<_>, name: &'static str| {
        let mut c = c.clone();
        let (pts, queries) = (pts.clone(), queries.clone());
        async move {
            let mut hits = 0;
            for q in &queries {
                let exact = exact_top_k(pb::Metric::L2, &pts, q, 10);
                let got = search(&mut c, name, q.clone(), 10, Some(64)).await;
                hits += got
                    .neighbors
                    .iter()
                    .filter(|n| exact.contains(&n.id))
                    .count();
            }
            hits as f64 / (queries.len() * 10) as f64
        }
    };
    for name in ["i8", "rs"] {
        let r = recall(&mut c, name).await;
        assert!(r >= 0.95, "{name}: recall@10 = {r}");
    }

    // A restart with another --engine changes none of them: each index stored its own.
    let s = s
        .restart_with(|c| c.engine = vectord::index::engine::EngineKind::Native)
        .await;
    let mut c = s.index().await;
    for (name, engine) in [
        ("i8", "native_i8"),
        ("rs", "hnsw_rs"),
        ("dflt", "native_i8"),
    ] {
        let got = c
            .get_index(pb::GetIndexRequest { name: name.into() })
            .await
            .unwrap()
            .into_inner()
            .index
            .unwrap();
        assert_eq!(
            got.engine, engine,
            "{name} after a restart with --engine native"
        );
    }
    for name in ["i8", "rs"] {
        let r = recall(&mut c, name).await;
        assert!(r >= 0.95, "{name} after the restart: recall@10 = {r}");
    }
}
