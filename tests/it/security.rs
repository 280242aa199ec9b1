//! Security as a caller meets it: API keys (none, wrong, read-only, admin) on a real server,
//! health and reflection open for probes, TLS with a CA made in the test, and mTLS.

use crate::common;

use std::sync::Arc;

use common::tls::{serving, tls_channel, tls_server, Pki};
use common::{create_index, points, Gen, TestServer};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use vectord::auth::{ApiKey, ApiKeys};
use vectord::config::Config;
use vectord::pb;
use vectord::pb::autotune_service_client::AutotuneServiceClient;
use vectord::pb::index_service_client::IndexServiceClient;
use vectord::pb::promotion_service_client::PromotionServiceClient;

const ADMIN: &str = "admin-key-7f3c";
const READER: &str = "reader-key-91ab";

type Keyed = InterceptedService<Channel, Bearer>;

/// Sends `authorization: <value>` on every call (None: no header).
#[derive(Clone)]
struct Bearer(Option<String>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut()
                .insert("authorization", v.parse().expect("ascii header"));
        }
        Ok(req)
    }
}

fn keyed(ch: &Channel, header: Option<&str>) -> Keyed {
    InterceptedService::new(ch.clone(), Bearer(header.map(str::to_string)))
}

fn index_client(ch: &Channel, header: Option<&str>) -> IndexServiceClient<Keyed> {
    IndexServiceClient::new(keyed(ch, header))
}

fn admin_header() -> String {
    format!("Bearer {ADMIN}")
}

fn reader_header() -> String {
    format!("Bearer {READER}")
}

fn keys() -> Arc<ApiKeys> {
    Arc::new(
        ApiKeys::new(
            ApiKey::parse("--api-key", ADMIN).unwrap(),
            Some(ApiKey::parse("--read-only-api-key", READER).unwrap()),
        )
        .unwrap(),
    )
}

/// A keyed server over a temp dir (the dir lives as long as the returned guard).
async fn keyed_server() -> (TestServer, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = Config::for_tests(tmp.path());
    config.api_keys = Some(keys());
    (TestServer::start_in(tmp.path(), config).await, tmp)
}

fn err<T: std::fmt::Debug>(r: Result<T, Status>) -> Status {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => s,
    }
}

#[tokio::test]
async fn calls_without_a_key_or_with_a_wrong_one_are_unauthenticated() {
    let (s, _tmp) = keyed_server().await;
    let ch = s.channel().await;
    let wrong = "Bearer not-the-key-5d2e".to_string();
    for header in [
        None,
        Some(wrong.as_str()),
        Some("Basic YWRtaW4="),
        Some(ADMIN),
    ] {
        let mut c = index_client(&ch, header);
        let e = err(c.list_indexes(pb::ListIndexesRequest::default()).await);
        assert_eq!(e.code(), Code::Unauthenticated, "{header:?}: {e:?}");
        assert!(
            e.message().contains("authorization: Bearer <key>"),
            "the message says what to send: {e:?}"
        );
        assert!(
            !e.message().contains("not-the-key"),
            "echoes the key: {e:?}"
        );
        assert!(!e.message().contains(ADMIN), "echoes the key: {e:?}");
        let e = err(c
            .search(pb::SearchRequest {
                index_name: "x".into(),
                vector: vec![0.0; 4],
                k: 1,
                ef_search: None,
                ..Default::default()
            })
            .await);
        assert_eq!(e.code(), Code::Unauthenticated);
        let mut a = AutotuneServiceClient::new(keyed(&ch, header));
        let e = err(a.list_jobs(pb::ListJobsRequest::default()).await);
        assert_eq!(e.code(), Code::Unauthenticated);
    }
}

#[tokio::test]
async fn health_and_reflection_need_no_key() {
    use tonic_reflection::pb::v1;
    let (s, _tmp) = keyed_server().await;
    let ch = s.channel().await;
    let status = HealthClient::new(ch.clone())
        .check(HealthCheckRequest {
            service: "vectord.v1.IndexService".into(),
        })
        .await
        .expect("health without a key")
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);

    let mut c = v1::server_reflection_client::ServerReflectionClient::new(ch);
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut resp = c
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .expect("reflection without a key")
        .into_inner();
    let msg = resp.message().await.unwrap().unwrap();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        msg.message_response
    else {
        panic!("not a list response: {msg:?}");
    };
    assert!(list
        .service
        .iter()
        .any(|s| s.name == "vectord.v1.IndexService"));
}

/// The admin key builds an index, a harness and a trial; the read-only key can read all of
/// it but every change is PERMISSION_DENIED, and nothing changed afterwards.
#[tokio::test]
async fn read_only_key_reads_everything_and_changes_nothing() {
    let (s, _tmp) = keyed_server().await;
    let ch = s.channel().await;
    let (admin, reader) = (admin_header(), reader_header());

    // Admin: everything.
    let mut ai = index_client(&ch, Some(&admin));
    let mut aa = AutotuneServiceClient::new(keyed(&ch, Some(&admin)));
    let mut ap = PromotionServiceClient::new(keyed(&ch, Some(&admin)));
    ai.create_index(pb::CreateIndexRequest {
        name: "docs".into(),
        dimension: 8,
        metric: pb::Metric::L2 as i32,
        default_config: None,
        engine: String::new(),
    })
    .await
    .expect("admin create");
    let pts = points(&mut Gen::new(3), 0..200, 8);
    ai.upsert_points(pb::UpsertPointsRequest {
        index_name: "docs".into(),
        points: pts.clone(),
        ..Default::default()
    })
    .await
    .expect("admin upsert");
    aa.create_harness(common::harness_request("docs", "h", 5, 10, Some(1)))
        .await
        .expect("admin harness");
    let trial = aa
        .run_trial(pb::RunTrialRequest {
            index_name: "docs".into(),
            harness: "h".into(),
            config: Some(pb::HnswConfig {
                m: 8,
                ef_construction: 40,
                ef_search: 20,
                seed: Some(1),
            }),
        })
        .await
        .expect("admin trial")
        .into_inner()
        .trial
        .expect("trial");
    ap.promote(pb::PromoteRequest {
        index_name: "docs".into(),
        trial_id: trial.id,
        promoted_by: "test".into(),
        note: String::new(),
    })
    .await
    .expect("admin promote");

    // Read-only: reads work.
    let mut ri = index_client(&ch, Some(&reader));
    let mut ra = AutotuneServiceClient::new(keyed(&ch, Some(&reader)));
    let mut rp = PromotionServiceClient::new(keyed(&ch, Some(&reader)));
    let query = pb::SearchRequest {
        index_name: "docs".into(),
        vector: pts[7].vector.clone(),
        k: 3,
        ef_search: None,
        ..Default::default()
    };
    let before = ri
        .search(query.clone())
        .await
        .expect("read-only search")
        .into_inner();
    assert_eq!(before.neighbors[0].id, 7);
    let listed = ri
        .list_indexes(pb::ListIndexesRequest::default())
        .await
        .expect("read-only list")
        .into_inner();
    assert_eq!(listed.indexes.len(), 1);
    let got = ri
        .get_index(pb::GetIndexRequest {
            name: "docs".into(),
        })
        .await
        .expect("read-only get")
        .into_inner()
        .index
        .unwrap();
    assert_eq!(got.point_count, 200);
    ri.get_point(pb::GetPointRequest {
        index_name: "docs".into(),
        id: 7,
    })
    .await
    .expect("read-only get point");
    ra.list_trials(pb::ListTrialsRequest {
        index_name: "docs".into(),
        ..Default::default()
    })
    .await
    .expect("read-only list trials");
    ra.list_jobs(pb::ListJobsRequest::default())
        .await
        .expect("read-only list jobs");
    let promoted = rp
        .get_promoted(pb::GetPromotedRequest {
            index_name: "docs".into(),
        })
        .await
        .expect("read-only get promoted")
        .into_inner();

    // Read-only: every change is refused before it runs.
    let denied = |what: &str, e: Status, method: &str| {
        assert_eq!(e.code(), Code::PermissionDenied, "{what}: {e:?}");
        assert!(
            e.message().contains(method),
            "{what} names the method: {e:?}"
        );
        assert!(
            e.message().contains("admin"),
            "{what} says what is needed: {e:?}"
        );
    };
    let e = err(ri
        .upsert_points(pb::UpsertPointsRequest {
            index_name: "docs".into(),
            points: points(&mut Gen::new(9), 0..50, 8),
            ..Default::default()
        })
        .await);
    denied("upsert", e, "vectord.v1.IndexService/UpsertPoints");
    let e = err(ri
        .create_index(pb::CreateIndexRequest {
            name: "other".into(),
            dimension: 4,
            metric: pb::Metric::L2 as i32,
            default_config: None,
            engine: String::new(),
        })
        .await);
    denied("create", e, "vectord.v1.IndexService/CreateIndex");
    let e = err(ri
        .delete_index(pb::DeleteIndexRequest {
            name: "docs".into(),
        })
        .await);
    denied("delete", e, "vectord.v1.IndexService/DeleteIndex");
    let e = err(ri
        .import_points(tokio_stream::iter(vec![pb::ImportPointsRequest {
            index_name: "docs".into(),
            points: points(&mut Gen::new(10), 500..510, 8),
            ..Default::default()
        }]))
        .await);
    denied("import", e, "vectord.v1.IndexService/ImportPoints");
    let e = err(rp
        .promote(pb::PromoteRequest {
            index_name: "docs".into(),
            trial_id: trial.id,
            promoted_by: "reader".into(),
            note: String::new(),
        })
        .await);
    denied("promote", e, "vectord.v1.PromotionService/Promote");
    let e = err(rp
        .rollback(pb::RollbackRequest {
            index_name: "docs".into(),
        })
        .await);
    denied("rollback", e, "vectord.v1.PromotionService/Rollback");
    let e = err(ra
        .autotune(pb::AutotuneRequest {
            index_name: "docs".into(),
            harness: "h".into(),
            ..Default::default()
        })
        .await);
    denied("autotune", e, "vectord.v1.AutotuneService/Autotune");

    // Nothing changed.
    let after = ri.search(query).await.unwrap().into_inner();
    assert_eq!(after.neighbors, before.neighbors);
    let listed = ri
        .list_indexes(pb::ListIndexesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.indexes.len(), 1);
    assert_eq!(listed.indexes[0].point_count, 200);
    let promoted_after = rp
        .get_promoted(pb::GetPromotedRequest {
            index_name: "docs".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(promoted_after, promoted);
    let jobs = ra
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        jobs.jobs.is_empty(),
        "a denied autotune started a job: {jobs:?}"
    );

    // The admin key still changes things.
    ai.delete_index(pb::DeleteIndexRequest {
        name: "docs".into(),
    })
    .await
    .expect("admin delete");
}

#[tokio::test]
async fn tls_serves_clients_that_trust_its_ca_and_refuses_plaintext() {
    let pki = Pki::new("test server CA");
    let s = tls_server(&pki, None).await;
    let ch = tls_channel(s.port, &pki.ca_pem, None)
        .await
        .expect("TLS connect");
    serving(ch.clone()).await.expect("health over TLS");
    let mut c = IndexServiceClient::new(ch);
    create_index(&mut c, "tls", 4, pb::Metric::L2).await;
    let listed = c
        .list_indexes(pb::ListIndexesRequest::default())
        .await
        .expect("list over TLS")
        .into_inner();
    assert_eq!(listed.indexes[0].name, "tls");

    // Plaintext HTTP/2 to the TLS port: no answer.
    let plain = Endpoint::from_shared(format!("http://127.0.0.1:{}", s.port))
        .unwrap()
        .connect_lazy();
    let r = IndexServiceClient::new(plain)
        .list_indexes(pb::ListIndexesRequest::default())
        .await;
    assert!(r.is_err(), "plaintext call to a TLS server answered: {r:?}");

    // A client that trusts another CA refuses the server.
    let other = Pki::new("another CA");
    let refused = match tls_channel(s.port, &other.ca_pem, None).await {
        Err(_) => true,
        Ok(ch) => serving(ch).await.is_err(),
    };
    assert!(refused, "a client trusting another CA connected");
}

#[tokio::test]
async fn mtls_requires_a_client_certificate_from_the_client_ca() {
    let pki = Pki::new("server CA");
    let clients = Pki::new("client CA");
    let s = tls_server(&pki, Some(&clients)).await;

    let ch = tls_channel(s.port, &pki.ca_pem, Some(clients.leaf(&["client-a"], true)))
        .await
        .expect("mTLS connect with a client certificate");
    serving(ch).await.expect("health over mTLS");

    for (what, identity) in [
        ("no client certificate", None),
        (
            "a certificate from another CA",
            Some(Pki::new("rogue CA").leaf(&["client-b"], true)),
        ),
    ] {
        let refused = match tls_channel(s.port, &pki.ca_pem, identity).await {
            Err(_) => true,
            Ok(ch) => serving(ch).await.is_err(),
        };
        assert!(refused, "{what}: the server accepted the client");
    }
}
