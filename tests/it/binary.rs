//! The `vectord` binary as an operator runs it: flags and environment, the port chosen by the
//! OS and read back from the log, SIGTERM/SIGINT stopping cleanly with exit code 0, a restart
//! over the same data dir, and a second server refused on a data dir that is in use.
//!
//! No fixed ports and no sleeps: readiness is the child's own log line and health's Watch
//! stream, and every wait is bounded by `DEADLINE` so a broken build fails instead of hanging.

use crate::common;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use common::{create_index, points, search, upsert, Gen};
use tonic::transport::Channel;
use vectord::pb;
use vectord::pb::index_service_client::IndexServiceClient;

use crate::common::child;
use child::path_str;

use child::{Vectord, DEADLINE};

/// Runs `fut` within `DEADLINE`, panicking with `what` if it takes longer.
async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: took longer than {DEADLINE:?}"))
}

async fn index_client(addr: SocketAddr) -> IndexServiceClient<Channel> {
    let channel = within("connect", async {
        Channel::from_shared(format!("http://{addr}"))
            .expect("url")
            .connect()
            .await
            .expect("connect to the index service")
    })
    .await;
    IndexServiceClient::new(channel)
}

fn addr_arg() -> [&'static str; 2] {
    ["--addr", "127.0.0.1:0"]
}

#[tokio::test]
async fn serve_flags_env_sigterm_and_restart() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let name = "bin_l2";
    let cfg = pb::HnswConfig {
        m: 12,
        ef_construction: 40,
        ef_search: 20,
        seed: Some(7),
    };
    let pts = points(&mut Gen::new(5), 0..100, 4);

    // First run: the data dir comes from the environment.
    let mut s = Vectord::spawn(
        "first run",
        &[&addr_arg()[..], &["--log", "info"]].concat(),
        &[("VECTORD_DATA_DIR", dir)],
    );
    let addr = s.wait_listening().await;
    s.wait_serving(addr).await;
    {
        let mut c = index_client(addr).await;
        within(
            "create index",
            create_index(&mut c, name, 4, pb::Metric::L2),
        )
        .await;
        let up = within("upsert", upsert(&mut c, name, pts.clone())).await;
        assert_eq!(up.upserted_count, 100, "{up:?}");
        within(
            "put profile",
            c.put_profile(pb::PutProfileRequest {
                profile: Some(pb::Profile {
                    name: "bin".into(),
                    indexes: vec![pb::ProfileIndex {
                        index_name: name.into(),
                        default_config: Some(cfg),
                    }],
                }),
            }),
        )
        .await
        .expect("put profile");
        let act = within(
            "activate profile",
            c.activate_profile(pb::ActivateProfileRequest { name: "bin".into() }),
        )
        .await
        .expect("activate profile")
        .into_inner();
        assert_eq!(act.generations.len(), 1, "{act:?}");
        assert_eq!(act.generations[0].number, 2, "{act:?}");
        // All clients are dropped here, so nothing is in flight at SIGTERM.
    }
    let building =
        format!("building HNSW index={name} m=12 ef_construction=40 ef_search=20 seed=Some(7)");
    s.wait_line(&format!("`{building}`"), |l| l.contains(&building))
        .await;

    // The data dir really came from the environment.
    let listening = s
        .wait_line("listening line", |l| l.contains("vectord listening"))
        .await;
    assert!(
        listening.contains(&format!("data_dir={}", dir.display())),
        "{listening}"
    );

    s.signal("TERM");
    let status = s.wait_exit().await;
    let log = s.log();
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status} after SIGTERM; stderr:\n{log}"
    );
    assert!(
        log.contains("store flushed"),
        "no flush logged; stderr:\n{log}"
    );
    assert!(
        !log.contains("grace period over"),
        "nothing was in flight, yet the grace period ran out; stderr:\n{log}"
    );
    drop(s);

    // Second run: the data dir is a flag this time.
    let mut s = Vectord::spawn(
        "restart",
        &[&addr_arg()[..], &["--data-dir", path_str(dir)]].concat(),
        &[],
    );
    let addr = s.wait_listening().await;
    s.wait_serving(addr).await;
    let mut c = index_client(addr).await;
    let idx = within(
        "get index",
        c.get_index(pb::GetIndexRequest { name: name.into() }),
    )
    .await
    .expect("get index after restart")
    .into_inner()
    .index
    .expect("index in the response");
    assert_eq!(idx.point_count, 100, "{idx:?}");
    let generation = idx.active_generation.expect("an active generation");
    assert_eq!(generation.number, 2, "{generation:?}");
    assert_eq!(generation.config, Some(cfg), "{generation:?}");
    assert_eq!(generation.profile, "bin", "{generation:?}");
    for p in &pts {
        let r = within("search", search(&mut c, name, p.vector.clone(), 1, None)).await;
        assert_eq!(r.generation, 2, "{r:?}");
        assert_eq!(
            r.neighbors.first().map(|n| n.id),
            Some(p.id),
            "a stored vector finds itself: {r:?}"
        );
    }
    drop(c);
    s.signal("TERM");
    let status = s.wait_exit().await;
    assert_eq!(
        status.code(),
        Some(0),
        "restart: exit {status}; stderr:\n{}",
        s.log()
    );
}

#[tokio::test]
async fn a_second_server_on_the_same_data_dir_fails_clearly() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let args = [&addr_arg()[..], &["--data-dir", path_str(dir)]].concat();

    let mut first = Vectord::spawn("first server", &args, &[]);
    let addr = first.wait_listening().await;
    first.wait_serving(addr).await;

    let mut second = Vectord::spawn("second server", &args, &[]);
    let status = second.wait_exit().await;
    let log = second.log();
    assert!(
        !status.success(),
        "the second server on a data dir in use must fail, got {status}; stderr:\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains(&dir.display().to_string()) && l.contains("in use")),
        "the error must name the data dir {} and say it is in use; stderr:\n{log}",
        dir.display()
    );

    // The first one is unharmed.
    first.wait_serving(addr).await;
    first.signal("TERM");
    let status = first.wait_exit().await;
    assert_eq!(
        status.code(),
        Some(0),
        "first: exit {status}; stderr:\n{}",
        first.log()
    );
}

#[tokio::test]
async fn sigint_also_stops_cleanly_with_exit_0() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut s = Vectord::spawn(
        "server",
        &[&addr_arg()[..], &["--data-dir", path_str(tmp.path())]].concat(),
        &[],
    );
    let addr = s.wait_listening().await;
    s.wait_serving(addr).await;
    s.signal("INT");
    let status = s.wait_exit().await;
    let log = s.log();
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status} after SIGINT; stderr:\n{log}"
    );
    assert!(
        log.contains("store flushed"),
        "no flush logged; stderr:\n{log}"
    );
}

/// A server with an index of 3,000 points and a harness, and an autotune job on it far too slow
/// to finish: the stream (its started event read), the job id, the points and the active
/// generation's config before the job.
async fn server_with_a_slow_job(
    args: &[&str],
    what: &'static str,
) -> (
    Vectord,
    tonic::Streaming<pb::AutotuneResponse>,
    String,
    Vec<pb::Point>,
    Option<pb::HnswConfig>,
) {
    use vectord::pb::autotune_service_client::AutotuneServiceClient;
    let mut s = Vectord::spawn(what, args, &[]);
    let addr = s.wait_listening().await;
    s.wait_serving(addr).await;
    let mut c = index_client(addr).await;
    create_index(&mut c, "crash", 32, pb::Metric::L2).await;
    let pts = points(&mut Gen::new(5), 0..3000, 32);
    upsert(&mut c, "crash", pts.clone()).await;
    let before = active_config(&mut c).await;
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut a = AutotuneServiceClient::new(channel);
    a.create_harness(common::harness_request("crash", "h", 10, 50, None))
        .await
        .expect("create harness");
    // A grid far too slow to finish before the signal; it would activate its winner.
    let grid = (0..20)
        .map(|i| pb::HnswConfig {
            m: 48,
            ef_construction: 400,
            ef_search: 200,
            seed: Some(i),
        })
        .collect();
    let mut stream = a
        .autotune(pb::AutotuneRequest {
            index_name: "crash".into(),
            harness: "h".into(),
            grid,
            activate: true,
            ..Default::default()
        })
        .await
        .expect("autotune")
        .into_inner();
    let first = within("the started event", stream.message())
        .await
        .expect("stream")
        .expect("an event");
    let Some(pb::autotune_response::Event::Started(started)) = first.event else {
        panic!("the first event is not started: {first:?}");
    };
    (s, stream, started.job_id, pts, before)
}

async fn active_config(c: &mut IndexServiceClient<Channel>) -> Option<pb::HnswConfig> {
    c.get_index(pb::GetIndexRequest {
        name: "crash".into(),
    })
    .await
    .expect("get index")
    .into_inner()
    .index
    .and_then(|i| i.active_generation)
    .and_then(|g| g.config)
}

/// After a restart: the job is in `state` with a reason containing `why`, nothing is promoted,
/// the index still serves the generation config it had before the job, and every acknowledged
/// point is there.
async fn check_after_restart(
    args: &[&str],
    job_id: &str,
    state: pb::JobState,
    why: &str,
    pts: &[pb::Point],
    before: Option<pb::HnswConfig>,
) {
    use vectord::pb::autotune_service_client::AutotuneServiceClient;
    use vectord::pb::promotion_service_client::PromotionServiceClient;
    let mut s = Vectord::spawn("restarted", args, &[]);
    let addr = s.wait_listening().await;
    s.wait_serving(addr).await;
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut a = AutotuneServiceClient::new(channel.clone());
    let jobs = a
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect("list jobs")
        .into_inner()
        .jobs;
    let job = jobs
        .iter()
        .find(|j| j.id == job_id)
        .expect("the job is listed");
    assert_eq!(job.state, state as i32, "{job:?}");
    assert!(job.reason.contains(why), "{}", job.reason);
    assert!(job.end_time.is_some());
    let mut pr = PromotionServiceClient::new(channel);
    let promoted = pr
        .get_promoted(pb::GetPromotedRequest {
            index_name: "crash".into(),
        })
        .await
        .expect("get promoted")
        .into_inner();
    assert!(promoted.current.is_none(), "nothing may be half-promoted");
    let mut c = index_client(addr).await;
    assert_eq!(
        active_config(&mut c).await,
        before,
        "the previous generation serves"
    );
    // Every acknowledged point survived.
    for p in pts.iter().step_by(97) {
        let r = search(&mut c, "crash", p.vector.clone(), 1, None).await;
        assert_eq!(r.neighbors[0].id, p.id);
    }
    s.signal("TERM");
    assert!(s.wait_exit().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_running_when_the_server_is_killed_shows_failed_after_restart() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let args = [&addr_arg()[..], &["--data-dir", path_str(tmp.path())]].concat();
    let (mut s, stream, job_id, pts, before) = server_with_a_slow_job(&args, "server").await;
    s.signal("KILL");
    let status = s.wait_exit().await;
    assert!(!status.success());
    drop(stream);
    check_after_restart(
        &args,
        &job_id,
        pb::JobState::Failed,
        "stopped",
        &pts,
        before,
    )
    .await;
}

/// SIGTERM during an autotune stream: the stream ends UNAVAILABLE (retry elsewhere), the server
/// exits 0, and after a restart the job is CANCELLED with the shutdown as its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_an_autotune_stream_ends_it_unavailable_and_records_cancelled() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let args = [&addr_arg()[..], &["--data-dir", path_str(tmp.path())]].concat();
    let (mut s, mut stream, job_id, pts, before) = server_with_a_slow_job(&args, "server").await;
    s.signal("TERM");
    let end = within("the stream's end", async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(status) => return Some(status.code()),
            }
        }
    })
    .await;
    assert_eq!(end, Some(tonic::Code::Unavailable));
    assert!(s.wait_exit().await.success(), "SIGTERM exits 0");
    check_after_restart(
        &args,
        &job_id,
        pb::JobState::Cancelled,
        "shut down",
        &pts,
        before,
    )
    .await;
}

#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut s = Vectord::spawn(
        "json logs",
        &[
            &addr_arg()[..],
            &["--data-dir", path_str(tmp.path()), "--log-format", "json"],
        ]
        .concat(),
        &[],
    );
    let line = s
        .wait_line("a json `vectord is serving` line", |l| {
            l.contains("vectord is serving")
        })
        .await;
    let v: serde_json::Value = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("not one JSON object: {line:?}: {e}"));
    assert_eq!(v["level"], "INFO", "{v}");
    assert_eq!(v["fields"]["message"], "vectord is serving", "{v}");
    assert!(v["timestamp"].is_string(), "{v}");
    s.signal("TERM");
    assert!(s.wait_exit().await.success());
    for l in s.log().lines().filter(|l| !l.is_empty()) {
        serde_json::from_str::<serde_json::Value>(l)
            .unwrap_or_else(|e| panic!("a log line is not JSON: {l:?}: {e}"));
    }
}

/// The port of a `vectord listening` line, text (`addr=IP:PORT`) or JSON (`"addr":"IP:PORT"`).
fn listening_port(line: &str) -> u16 {
    let addr = match serde_json::from_str::<serde_json::Value>(line) {
        Ok(v) => v["fields"]["addr"].as_str().unwrap_or_default().to_string(),
        Err(_) => line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .unwrap_or_default()
            .to_string(),
    };
    addr.parse::<SocketAddr>()
        .unwrap_or_else(|e| panic!("no address in {line:?}: {e}"))
        .port()
}

#[tokio::test]
async fn a_public_address_needs_tls_or_insecure() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = path_str(tmp.path());
    let mut s = Vectord::spawn(
        "0.0.0.0 without TLS or a key",
        &["--addr", "0.0.0.0:0", "--data-dir", dir],
        &[],
    );
    let status = s.wait_exit().await;
    let log = s.log();
    assert_eq!(status.code(), Some(2), "{log}");
    for flag in ["--tls-cert", "--api-key", "--insecure", "0.0.0.0"] {
        assert!(log.contains(flag), "the refusal names {flag}: {log}");
    }
    assert!(!log.contains("vectord listening"), "{log}");

    let mut s = Vectord::spawn(
        "0.0.0.0 with --insecure",
        &["--addr", "0.0.0.0:0", "--data-dir", dir, "--insecure"],
        &[],
    );
    let line = s
        .wait_line("`vectord listening`", |l| l.contains("vectord listening"))
        .await;
    let port = listening_port(&line);
    s.wait_serving(SocketAddr::from(([127, 0, 0, 1], port)))
        .await;
    assert!(
        s.log().contains("plaintext on a non-loopback address"),
        "{}",
        s.log()
    );
    s.signal("TERM");
    assert!(s.wait_exit().await.success());
}

/// An API key without TLS on a non-loopback address would cross the network in clear, and the
/// metrics endpoint has neither keys nor TLS: both are refused before anything is bound,
/// unless --insecure.
#[tokio::test]
async fn a_key_without_tls_or_public_metrics_need_insecure() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = path_str(tmp.path());
    let key_file = tmp.path().join("admin.key");
    std::fs::write(&key_file, "adm1n-SECRET-4411\n").unwrap();
    let mut s = Vectord::spawn(
        "0.0.0.0 with a key, without TLS",
        &["--addr", "0.0.0.0:0", "--data-dir", dir],
        &[("VECTORD_API_KEY_FILE", key_file.as_path())],
    );
    let status = s.wait_exit().await;
    let log = s.log();
    assert_eq!(status.code(), Some(2), "{log}");
    for word in ["in clear", "--tls-cert", "--insecure", "0.0.0.0"] {
        assert!(log.contains(word), "the refusal says {word:?}: {log}");
    }
    assert!(!log.contains("vectord listening"), "{log}");
    assert!(!log.contains("SECRET"), "{log}");

    let mut s = Vectord::spawn(
        "metrics on 0.0.0.0",
        &[
            "--addr",
            "127.0.0.1:0",
            "--data-dir",
            dir,
            "--metrics-addr",
            "0.0.0.0:0",
        ],
        &[],
    );
    let status = s.wait_exit().await;
    let log = s.log();
    assert_eq!(status.code(), Some(2), "{log}");
    for word in ["metrics", "0.0.0.0:0", "--insecure"] {
        assert!(log.contains(word), "the refusal says {word:?}: {log}");
    }
    assert!(!log.contains("vectord listening"), "{log}");
}

/// Keys from the environment and from a file, JSON logs at debug: calls with the right key,
/// a wrong key and the read-only key on a change; no key appears anywhere in the output, nor
/// in `--help` with the key in the environment.
#[tokio::test]
async fn api_keys_never_appear_in_logs_or_help() {
    use tonic::metadata::MetadataValue;
    const ADMIN: &str = "adm1n-SECRET-6c1f0e";
    const READER: &str = "read0nly-SECRET-b77a";
    const WRONG: &str = "wr0ng-SECRET-99d3";
    let tmp = tempfile::tempdir().expect("temp dir");
    let key_file = tmp.path().join("reader.key");
    std::fs::write(&key_file, format!("  {READER}  \nsecond line is ignored\n")).unwrap();
    let db = tmp.path().join("db");
    let mut s = Vectord::spawn(
        "keyed server",
        &[
            "--addr",
            "127.0.0.1:0",
            "--data-dir",
            path_str(&db),
            "--read-only-api-key-file",
            path_str(&key_file),
            "--log-format",
            "json",
            "--log",
            "debug",
        ],
        &[("VECTORD_API_KEY", Path::new(ADMIN))],
    );
    let line = s
        .wait_line("`vectord listening`", |l| l.contains("vectord listening"))
        .await;
    let addr = SocketAddr::from(([127, 0, 0, 1], listening_port(&line)));
    s.wait_serving(addr).await;
    let channel = within(
        "connect",
        Channel::from_shared(format!("http://{addr}"))
            .expect("url")
            .connect(),
    )
    .await
    .expect("connect");
    let with = |key: &str| {
        let v: MetadataValue<_> = format!("Bearer {key}").parse().unwrap();
        IndexServiceClient::with_interceptor(channel.clone(), move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", v.clone());
            Ok(r)
        })
    };
    let create = pb::CreateIndexRequest {
        name: "keys".into(),
        dimension: 4,
        metric: pb::Metric::L2 as i32,
        default_config: None,
        engine: String::new(),
    };
    within("admin create", with(ADMIN).create_index(create.clone()))
        .await
        .expect("admin key creates");
    let e = within(
        "wrong key",
        with(WRONG).list_indexes(pb::ListIndexesRequest::default()),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let e = within("read-only create", with(READER).create_index(create))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let listed = within(
        "read-only list",
        with(READER).list_indexes(pb::ListIndexesRequest::default()),
    )
    .await
    .expect("read-only key lists")
    .into_inner();
    assert_eq!(listed.indexes.len(), 1);
    s.signal("TERM");
    assert!(s.wait_exit().await.success());
    let log = s.log();
    assert!(log.contains("call refused"), "refusals are logged: {log}");
    for key in [ADMIN, READER, WRONG] {
        assert!(!log.contains(key), "a key is in the log:\n{log}");
        assert!(!log.contains("SECRET"), "a key is in the log:\n{log}");
    }

    let help = Command::new(env!("CARGO_BIN_EXE_vectord"))
        .args(["serve", "--help"])
        .env("VECTORD_API_KEY", ADMIN)
        .env("VECTORD_READ_ONLY_API_KEY", READER)
        .output()
        .expect("vectord serve --help");
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(text.contains("VECTORD_API_KEY"), "{text}");
    assert!(
        !text.contains("SECRET"),
        "--help shows a key from the environment:\n{text}"
    );
}

/// `--engine native_f16` serves the same API: every point finds itself first, distances are the
/// exact ones (computed here from the vectors sent), and a restart on the same data dir
/// rebuilds the index with the same answers.
#[tokio::test]
async fn the_half_float_engine_answers_with_exact_distances_across_a_restart() {
    engine_answers_with_exact_distances_across_a_restart(Some("native_f16")).await;
}

/// The same without `--engine`: the default is the 8-bit engine (`native_i8`).
#[tokio::test]
async fn the_default_8_bit_engine_answers_with_exact_distances_across_a_restart() {
    engine_answers_with_exact_distances_across_a_restart(None).await;
}

/// The same for the float engine (`--engine native`).
#[tokio::test]
async fn the_float_engine_answers_with_exact_distances_across_a_restart() {
    engine_answers_with_exact_distances_across_a_restart(Some("native")).await;
}

/// Runs the server with `--engine engine` (None: no flag, so the default, which its log must
/// name as `native_i8`).
async fn engine_answers_with_exact_distances_across_a_restart(engine: Option<&'static str>) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut args = [&addr_arg()[..], &["--data-dir", path_str(tmp.path())]].concat();
    if let Some(e) = engine {
        args.extend(["--engine", e]);
    }
    let engine = engine.unwrap_or("native_i8");
    let mut g = Gen::new(16);
    let pts = points(&mut g, 0..600, 24);
    let cosine = |a: &[f32], b: &[f32]| {
        let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        1.0 - a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>() / (n(a) * n(b))
    };
    let mut answers = Vec::new();
    for run in 0..2 {
        let mut s = Vectord::spawn(engine, &args, &[]);
        let addr = s.wait_listening().await;
        s.wait_serving(addr).await;
        assert!(
            s.log().contains(&format!("engine=\"{engine}\"")),
            "{}",
            s.log()
        );
        let mut c = index_client(addr).await;
        if run == 0 {
            create_index(&mut c, "half", 24, pb::Metric::Cosine).await;
            upsert(&mut c, "half", pts.clone()).await;
        }
        let mut got = Vec::new();
        for p in pts.iter().step_by(7) {
            let r = search(&mut c, "half", p.vector.clone(), 5, Some(64)).await;
            assert_eq!(r.neighbors.first().map(|h| h.id), Some(p.id), "run {run}");
            for h in &r.neighbors {
                let want = cosine(&p.vector, &pts[h.id as usize].vector);
                assert!(
                    (h.distance - want).abs() < 1e-5,
                    "{engine} run {run}: id {} at {} but its cosine distance is {want}",
                    h.id,
                    h.distance
                );
            }
            got.push(r.neighbors.iter().map(|h| h.id).collect::<Vec<_>>());
        }
        answers.push(got);
        s.signal("TERM");
        assert!(s.wait_exit().await.success());
    }
    let same = answers[0]
        .iter()
        .zip(&answers[1])
        .filter(|(a, b)| a == b)
        .count();
    // The rebuild after the restart is another graph (parallel build), so a few answers may
    // differ in their approximate tail; nearly all must be the same.
    assert!(
        same * 10 >= answers[0].len() * 9,
        "{same} of {} the same",
        answers[0].len()
    );
}

/// Bytes the process has caused to be written to storage (`write_bytes` of `/proc/PID/io`).
#[cfg(target_os = "linux")]
fn written_bytes(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).expect("read /proc/PID/io");
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no write_bytes in {io}"))
}

/// An idle server leaves its store alone: once writes are acknowledged nothing more is written
/// until data changes. (sled 0.34's background flusher, now off, spent its idle time relocating
/// pages without end: about 2 MB/s on a 73 MB store.) The subject is time passing with
/// nothing happening, so this test watches the server's I/O counter for two seconds, four
/// rounds of that flusher, after a workload that leaves half-dead segments behind.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn an_idle_server_writes_nothing_to_disk() {
    let tmp = tempfile::tempdir().expect("temp dir");
    // Compaction off: the replacements below leave half the graph as tombstones, and a
    // compaction (a rebuild and its snapshot) is work, not idling; the subject is the store.
    // Float vectors in RAM: with them mapped, the indexer linking the last writes after they
    // are acknowledged writes their float vectors to the graph's mapped file (work, too).
    let args = [
        &addr_arg()[..],
        &["--data-dir", path_str(tmp.path())],
        &["--compact-deleted-fraction", "0"],
        &["--map-float-vectors", "false"],
    ]
    .concat();
    let mut s = Vectord::spawn("idle server", &args, &[]);
    let addr = s.wait_listening().await;
    s.wait_serving(addr).await;
    let mut c = index_client(addr).await;
    // 2,000 points of 384-d, half replaced five times: with the flusher on, this store was
    // rewritten at 1-2.6 MB/s while idle (even 1,000 points sufficed).
    let (dim, n) = (384usize, 2000u64);
    create_index(&mut c, "idle", dim as u32, pb::Metric::L2).await;
    let mut g = Gen::new(21);
    for round in 0..6u64 {
        // Each round replaces every other point: the old versions become garbage.
        let ids = (0..n).filter(|id| round == 0 || id % 2 == round % 2);
        let pts = ids
            .map(|id| pb::Point {
                id,
                vector: g.vector(dim),
            })
            .collect();
        upsert(&mut c, "idle", pts).await;
    }
    let before = written_bytes(s.pid);
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let after = written_bytes(s.pid);
    assert_eq!(
        after - before,
        0,
        "an idle server wrote {} bytes in 2 s",
        after - before
    );
    s.signal("TERM");
    assert!(s.wait_exit().await.success());
}

/// A store cache far smaller than the data (`--store-cache-mb 1`, and the same through
/// VECTORD_STORE_CACHE_MB) serves every point right after an import and after a restart; a
/// cache of 0 MB is refused, naming the flag.
#[tokio::test]
async fn a_tiny_store_cache_serves_the_right_data_across_a_restart() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = path_str(tmp.path());
    let refused = Command::new(env!("CARGO_BIN_EXE_vectord"))
        .args(["serve", "--addr", "127.0.0.1:0", "--data-dir", dir])
        .args(["--store-cache-mb", "0"])
        .output()
        .expect("vectord serve --store-cache-mb 0");
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("--store-cache-mb"), "{err}");

    // 4,000 points of 96 floats: 1.5 MB of vectors, more than the 1 MiB cache.
    let mut g = Gen::new(20);
    let pts = points(&mut g, 0..4_000, 96);
    for run in 0..2 {
        let mut s = if run == 0 {
            Vectord::spawn(
                "1 MB cache from the environment",
                &[&addr_arg()[..], &["--data-dir", dir]].concat(),
                &[("VECTORD_STORE_CACHE_MB", Path::new("1"))],
            )
        } else {
            Vectord::spawn(
                "1 MB cache from the flag, restarted",
                &[
                    &addr_arg()[..],
                    &["--data-dir", dir, "--store-cache-mb", "1"],
                ]
                .concat(),
                &[],
            )
        };
        let addr = s.wait_listening().await;
        s.wait_serving(addr).await;
        let mut c = index_client(addr).await;
        if run == 0 {
            create_index(&mut c, "small_cache", 96, pb::Metric::L2).await;
            let batches: Vec<pb::ImportPointsRequest> = pts
                .chunks(500)
                .enumerate()
                .map(|(b, chunk)| pb::ImportPointsRequest {
                    index_name: if b == 0 {
                        "small_cache".into()
                    } else {
                        String::new()
                    },
                    points: chunk.to_vec(),
                    ..Default::default()
                })
                .collect();
            let imported = within("import", c.import_points(tokio_stream::iter(batches)))
                .await
                .expect("import")
                .into_inner();
            assert_eq!(imported.point_count, 4_000);
        }
        for p in pts.iter().step_by(97) {
            let got = within(
                "get point",
                c.get_point(pb::GetPointRequest {
                    index_name: "small_cache".into(),
                    id: p.id,
                }),
            )
            .await
            .expect("get point")
            .into_inner()
            .point
            .expect("the point");
            assert_eq!(got.vector, p.vector, "run {run}: point {}", p.id);
            let r = search(&mut c, "small_cache", p.vector.clone(), 1, Some(64)).await;
            assert_eq!(
                r.neighbors.first().map(|h| h.id),
                Some(p.id),
                "run {run}: searched by its own vector"
            );
        }
        s.signal("TERM");
        assert!(s.wait_exit().await.success());
    }
}

/// `--map-float-vectors` (default on): the real binary serves an import with the float vectors
/// of its native_i8 graph in mapped files under DATA_DIR/float-vectors that have no name (the
/// directory stays empty; the process maps deleted files there), and a seeded graph rebuilt
/// with them mapped, then loaded from its snapshot with mapping off (flag) and on again
/// (environment), answers exactly the same neighbours at the same distances each time. A
/// value that is not a bool is refused, naming the flag.
#[tokio::test]
async fn mapped_float_vectors_serve_and_survive_restarts_with_the_same_answers() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = path_str(tmp.path());
    let refused = Command::new(env!("CARGO_BIN_EXE_vectord"))
        .args(["serve", "--addr", "127.0.0.1:0", "--data-dir", dir])
        .args(["--map-float-vectors", "maybe"])
        .output()
        .expect("vectord serve --map-float-vectors maybe");
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("--map-float-vectors"), "{err}");

    let mut g = Gen::new(31);
    let pts = points(&mut g, 0..3_000, 48);
    let mapped_dir = tmp.path().join("float-vectors");
    // The float-vectors mappings of process `pid`.
    let mappings = |pid: u32| -> Vec<String> {
        std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .expect("the server's maps")
            .lines()
            .filter(|l| l.contains("float-vectors"))
            .map(str::to_string)
            .collect()
    };
    let mut first: Option<Vec<Vec<(u64, f32)>>> = None;
    // (what, flags, environment, whether float vectors are mapped)
    #[allow(clippy::type_complexity)]
    let runs: [(&str, &[&str], &[(&str, &Path)], bool); 4] = [
        ("mapped by default, importing", &[], &[], true),
        ("mapped, rebuilding without the snapshot", &[], &[], true),
        (
            "restarted unmapped",
            &["--map-float-vectors", "false"],
            &[],
            false,
        ),
        (
            "restarted mapped from the environment",
            &[],
            &[("VECTORD_MAP_FLOAT_VECTORS", Path::new("true"))],
            true,
        ),
    ];
    for (run, (what, flags, envs, mapped)) in runs.into_iter().enumerate() {
        if run == 1 {
            // A rebuild of the seeded config: one thread, seeded order, the same graph
            // whatever the run; its snapshot is what the next two runs load.
            for e in std::fs::read_dir(tmp.path().join("snapshots")).expect("snapshots") {
                std::fs::remove_file(e.expect("entry").path()).expect("remove a snapshot");
            }
        }
        let mut s = Vectord::spawn(
            what,
            &[&addr_arg()[..], &["--data-dir", dir], flags].concat(),
            envs,
        );
        let addr = s.wait_listening().await;
        s.wait_serving(addr).await;
        let mut c = index_client(addr).await;
        if run == 0 {
            c.create_index(pb::CreateIndexRequest {
                name: "mapped".into(),
                dimension: 48,
                metric: pb::Metric::L2 as i32,
                default_config: Some(pb::HnswConfig {
                    m: 12,
                    ef_construction: 80,
                    ef_search: 64,
                    seed: Some(7),
                }),
                engine: "native_i8".into(),
            })
            .await
            .expect("create index");
            let batches: Vec<pb::ImportPointsRequest> = pts
                .chunks(1_000)
                .enumerate()
                .map(|(b, chunk)| pb::ImportPointsRequest {
                    index_name: if b == 0 {
                        "mapped".into()
                    } else {
                        String::new()
                    },
                    points: chunk.to_vec(),
                    ..Default::default()
                })
                .collect();
            let imported = within("import", c.import_points(tokio_stream::iter(batches)))
                .await
                .expect("import")
                .into_inner();
            assert_eq!(imported.point_count, 3_000);
        }
        let maps = mappings(s.pid);
        assert_eq!(!maps.is_empty(), mapped, "{what}: {maps:?}");
        assert!(
            maps.iter().all(|l| l.ends_with("(deleted)")),
            "{what}: a mapped file has a name: {maps:?}"
        );
        let names = std::fs::read_dir(&mapped_dir)
            .expect("the float-vectors directory")
            .count();
        assert_eq!(names, 0, "{what}: files left in {}", mapped_dir.display());
        let mut answers = Vec::new();
        for p in pts.iter().step_by(59) {
            let r = search(&mut c, "mapped", p.vector.clone(), 10, Some(64)).await;
            assert_eq!(
                r.neighbors.first().map(|h| (h.id, h.distance)),
                Some((p.id, 0.0)),
                "{what}: point {} searched by its own vector",
                p.id
            );
            answers.push(r.neighbors.iter().map(|h| (h.id, h.distance)).collect());
        }
        match (run, &first) {
            (0, _) => {}
            (_, None) => first = Some(answers),
            (_, Some(want)) => {
                assert!(want == &answers, "{what}: other answers than the rebuild's")
            }
        }
        s.signal("TERM");
        assert!(s.wait_exit().await.success(), "{what}: a clean stop");
    }
}
