//! The Prometheus endpoint against a real server: RPC counts by method and code, index,
//! promotion, job, journal and refresh-probe figures.

use crate::common;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vectord::pb;

async fn scrape(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect metrics");
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn metrics_show_rpcs_indexes_promotions_jobs_and_trials() {
    let tmp = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (addr, maddr) = (
        listener.local_addr().unwrap(),
        metrics.local_addr().unwrap(),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(vectord::server::run_with(
        listener,
        Some(metrics),
        {
            let mut config = vectord::config::Config::for_tests(tmp.path());
            config.refresh_probe_interval = std::time::Duration::from_millis(50);
            config
        },
        async move {
            let _ = stopped.await;
        },
    ));
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let mut watch = health
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(s) = watch.message().await.unwrap() {
        if s.status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
            break;
        }
    }
    let mut c = vectord::pb::index_service_client::IndexServiceClient::new(channel.clone());
    create_index(&mut c, "m", 8, pb::Metric::L2).await;
    let pts = points(&mut Gen::new(1), 0..100, 8);
    upsert(&mut c, "m", pts.clone()).await;
    for p in pts.iter().take(3) {
        search(&mut c, "m", p.vector.clone(), 5, None).await;
    }
    assert!(c
        .get_index(pb::GetIndexRequest {
            name: "nope".into()
        })
        .await
        .is_err());
    let mut a = vectord::pb::autotune_service_client::AutotuneServiceClient::new(channel.clone());
    a.create_harness(harness_request("m", "h", 5, 10, None))
        .await
        .unwrap();
    let mut stream = a
        .autotune(pb::AutotuneRequest {
            index_name: "m".into(),
            harness: "h".into(),
            min_recall: Some(0.0),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut winner = None;
    while let Some(e) = stream.message().await.unwrap() {
        if let Some(pb::autotune_response::Event::Finished(f)) = e.event {
            winner = f.winner;
        }
    }
    let winner = winner.expect("a winner");

    // A refresh policy whose floor the index clears: the probe runs and reports its recall.
    a.set_refresh_policy(pb::SetRefreshPolicyRequest {
        index_name: "m".into(),
        policy: Some(pb::RefreshPolicy {
            recall_floor: Some(0.0),
            min_recall: None,
            ..common::on_append(100.0)
        }),
    })
    .await
    .unwrap();
    let probed = eventually(std::time::Duration::from_secs(30), "a probe ran", || {
        let mut c = c.clone();
        async move {
            c.get_index(pb::GetIndexRequest { name: "m".into() })
                .await
                .unwrap()
                .into_inner()
                .index
                .and_then(|i| i.refresh_status)
                .and_then(|s| s.last_probe_recall)
        }
    })
    .await;

    let text = scrape(maddr, "/metrics").await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(
        value(
            &text,
            r#"vectord_rpc_requests_total{code="Ok",method="/vectord.v1.IndexService/Search"}"#
        ),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            r#"vectord_rpc_requests_total{code="NotFound",method="/vectord.v1.IndexService/GetIndex"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &text,
            r#"vectord_rpc_duration_seconds_count{code="Ok",method="/vectord.v1.IndexService/Search"}"#
        ),
        Some(3.0)
    );
    assert_eq!(
        value(&text, r#"vectord_index_points{index="m"}"#),
        Some(100.0)
    );
    assert_eq!(
        value(&text, r#"vectord_index_generation{index="m"}"#),
        Some(1.0)
    );
    assert_eq!(
        value(&text, r#"vectord_index_config{index="m",param="m"}"#),
        Some(16.0)
    );
    assert_eq!(
        value(&text, r#"vectord_promoted_recall{index="m"}"#),
        Some(winner.recall)
    );
    assert!(value(&text, r#"vectord_promoted_p50_seconds{index="m"}"#).is_some_and(|v| v > 0.0));
    assert_eq!(
        value(&text, r#"vectord_autotune_jobs{state="succeeded"}"#),
        Some(1.0)
    );
    assert_eq!(
        value(&text, r#"vectord_autotune_jobs{state="running"}"#),
        Some(0.0)
    );
    assert_eq!(value(&text, "vectord_trials_journaled"), Some(5.0));
    let exported = value(&text, r#"vectord_refresh_probe_recall{index="m"}"#);
    // The same graph and queries give the same recall at every probe.
    assert_eq!(exported, Some(probed), "{text}");
    assert!(scrape(maddr, "/other").await.starts_with("HTTP/1.1 404"));

    // Close every stream and connection first: shutdown waits for in-flight calls.
    drop((watch, health, c, a, channel));
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
