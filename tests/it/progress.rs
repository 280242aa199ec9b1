//! Long work shows that it is alive: the Autotune stream's progress events, an activation's
//! build in GetIndex, and the CLI's `--json` progress lines.
//!
//! The server is the real binary with its build slowed by `VECTORD_TEST_BUILD_CHUNK_DELAY_MS`
//! (a sleep before each chunk of 256 points), so a build of a few thousand points takes a few
//! seconds whatever the machine, and progress is seen before the build ends without burning
//! CPU on a big index. No fixed sleeps: the tests follow the stream, or poll GetIndex.

use crate::common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::child::{self, Vectord, DEADLINE};
use common::{eventually, points, upsert, Gen};
use serde_json::Value;
use vectord::pb;
use vectord::pb::autotune_response::Event;
use vectord::pb::autotune_service_client::AutotuneServiceClient;
use vectord::pb::index_service_client::IndexServiceClient;

/// Points of the test index: 12 seeded chunks of 256 (the last one partial).
const POINTS: u64 = 3000;
/// The sleep before each chunk: a seeded build of the index takes at least 12 × this.
const CHUNK_DELAY_MS: &str = "150";
/// The server sends progress at most this often.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// A slowed server with index `big` (POINTS points, 8-d) and its harness `smoke`.
async fn slow_server(dir: &std::path::Path) -> (Vectord, SocketAddr) {
    let mut v = Vectord::spawn(
        "slow builds",
        &["--addr", "127.0.0.1:0", "--data-dir", child::path_str(dir)],
        &[(
            "VECTORD_TEST_BUILD_CHUNK_DELAY_MS",
            std::path::Path::new(CHUNK_DELAY_MS),
        )],
    );
    let addr = v.wait_listening().await;
    v.wait_serving(addr).await;
    let mut c = IndexServiceClient::new(child::channel(addr).await);
    // Seeded, so that its builds go chunk by chunk (an unseeded build inserts 4096 points a
    // chunk in parallel).
    c.create_index(pb::CreateIndexRequest {
        name: "big".into(),
        dimension: 8,
        metric: pb::Metric::L2 as i32,
        default_config: Some(config(40, 40)),
        ..Default::default()
    })
    .await
    .expect("create index");
    let pts = points(&mut Gen::new(3), 0..POINTS, 8);
    for chunk in pts.chunks(1000) {
        upsert(&mut c, "big", chunk.to_vec()).await;
    }
    AutotuneServiceClient::new(child::channel(addr).await)
        .create_harness(common::harness_request("big", "smoke", 5, 20, Some(1)))
        .await
        .expect("create harness");
    (v, addr)
}

fn config(ef_construction: u32, ef_search: u32) -> pb::HnswConfig {
    pb::HnswConfig {
        m: 8,
        ef_construction,
        ef_search,
        seed: Some(7),
    }
}

/// The identity of one piece of work across events: its config and start time.
fn work_key(p: &pb::Progress) -> String {
    format!("{:?} {:?}", p.config, p.start_time)
}

#[tokio::test]
async fn autotune_streams_progress_before_its_trials_end() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let (mut v, addr) = slow_server(tmp.path()).await;
    let grid = vec![config(20, 20), config(20, 40), config(40, 20)];
    let mut a = AutotuneServiceClient::new(child::channel(addr).await);
    let started = Instant::now();
    let mut stream = a
        .autotune(pb::AutotuneRequest {
            index_name: "big".into(),
            harness: "smoke".into(),
            min_recall: Some(0.0),
            grid: grid.clone(),
            ..Default::default()
        })
        .await
        .expect("autotune")
        .into_inner();
    let mut events = Vec::new();
    while let Some(msg) = tokio::time::timeout(DEADLINE, stream.message())
        .await
        .expect("the stream moves within the deadline")
        .expect("stream")
    {
        events.push(msg.event.expect("an event"));
    }
    let elapsed = started.elapsed();
    let job_id = match &events[0] {
        Event::Started(s) => s.job_id.clone(),
        e => v.fail(format!("the first event is started: {e:?}")),
    };
    assert!(
        matches!(events.last(), Some(Event::Finished(_))),
        "the last event is finished (no progress after it): {:?}",
        events.last()
    );
    let first_trial = events
        .iter()
        .position(|e| matches!(e, Event::Trial(_)))
        .expect("a trial");
    let progress: Vec<&pb::AutotuneProgress> = events
        .iter()
        .filter_map(|e| match e {
            Event::Progress(p) => Some(p),
            _ => None,
        })
        .collect();
    assert!(
        events[..first_trial]
            .iter()
            .any(|e| matches!(e, Event::Progress(_))),
        "progress arrives before the first trial ends: {events:?}"
    );
    // At most one event per 500 ms (the first after 500 ms), whatever the builds in flight.
    let bound = (elapsed.as_millis() / PROGRESS_EVERY.as_millis()) as usize;
    assert!(
        progress.len() <= bound,
        "{} progress events in {elapsed:?}: at most {bound}",
        progress.len()
    );
    let mut last_done: HashMap<String, (i32, u64)> = HashMap::new();
    let (mut builds, mut estimates) = (0, 0);
    for p in &progress {
        assert_eq!(p.job_id, job_id);
        assert!(!p.activities.is_empty(), "sent only while work runs: {p:?}");
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert!(p.activities.len() <= cores, "at most one per core: {p:?}");
        for w in &p.activities {
            let c = w.config.expect("a build or measurement names its config");
            assert!(
                grid.iter()
                    .any(|g| (g.m, g.ef_construction, g.seed) == (c.m, c.ef_construction, c.seed)),
                "{c:?} is a graph of the grid"
            );
            assert!(w.start_time.is_some());
            assert!(w.done <= w.total, "{w:?}");
            match pb::ProgressPhase::try_from(w.phase) {
                Ok(pb::ProgressPhase::Build) => {
                    builds += 1;
                    assert_eq!(w.total, POINTS, "a build counts the index's points");
                }
                Ok(pb::ProgressPhase::Measure) => {
                    assert_eq!(w.total, 20, "a measurement counts the harness's queries");
                    assert!(grid.contains(&c), "a measured config is a grid entry");
                }
                other => panic!("a job builds and measures only: {other:?}"),
            }
            if w.done > 0 {
                estimates += usize::from(w.remaining_millis.is_some());
            }
            // Within one piece of work and phase, done never goes back.
            let key = work_key(w);
            if let Some((phase, done)) = last_done.get(&key) {
                if *phase == w.phase {
                    assert!(
                        w.done >= *done,
                        "{key}: done went from {done} to {}",
                        w.done
                    );
                }
            }
            last_done.insert(key, (w.phase, w.done));
        }
    }
    assert!(builds > 0, "builds are reported: {progress:?}");
    assert!(
        estimates > 0,
        "the time left is estimated once points are in: {progress:?}"
    );
    v.signal("TERM");
    assert!(v.wait_exit().await.success());
}

#[tokio::test]
async fn get_index_shows_an_activation_build_while_it_runs() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let (mut v, addr) = slow_server(tmp.path()).await;
    let mut c = IndexServiceClient::new(child::channel(addr).await);
    let profile_config = config(30, 30);
    common::put_profile(&mut c, "p", &[("big", Some(profile_config))]).await;
    let idle = c
        .get_index(pb::GetIndexRequest { name: "big".into() })
        .await
        .expect("get index")
        .into_inner()
        .index
        .expect("index");
    assert_eq!(idle.build_progress, None, "no build, no progress");
    let mut c2 = c.clone();
    let activation = tokio::spawn(async move {
        c2.activate_profile(pb::ActivateProfileRequest { name: "p".into() })
            .await
    });
    let get = |c: IndexServiceClient<tonic::transport::Channel>| async move {
        let mut c = c;
        c.get_index(pb::GetIndexRequest { name: "big".into() })
            .await
            .expect("get index")
            .into_inner()
            .index
            .expect("index")
            .build_progress
    };
    // Points are going in, and more of them later.
    let first = eventually(DEADLINE, "the activation's build is shown", || {
        let c = c.clone();
        async move {
            get(c)
                .await
                .filter(|p| p.phase == pb::ProgressPhase::Build as i32 && p.done > 0)
        }
    })
    .await;
    assert_eq!(first.total, POINTS);
    assert!(first.done <= first.total);
    assert_eq!(first.config, Some(profile_config));
    assert!(first.start_time.is_some() && first.remaining_millis.is_some());
    let first_done = first.done;
    let later = eventually(DEADLINE, "the build advances", || {
        let c = c.clone();
        async move {
            get(c)
                .await
                .filter(|p| p.phase != pb::ProgressPhase::Build as i32 || p.done > first_done)
        }
    })
    .await;
    assert_eq!(later.start_time, first.start_time, "the same build");
    let r = activation
        .await
        .expect("activation task")
        .expect("activation")
        .into_inner();
    assert_eq!(r.generations[0].config, Some(profile_config));
    assert_eq!(
        get(c.clone()).await,
        None,
        "cleared once the build is swapped in"
    );
    v.signal("TERM");
    assert!(v.wait_exit().await.success());
}

/// Runs `vectord --server http://addr <args> --json` with no VECTORD_* from the environment;
/// returns stdout as JSON lines and the exit status.
fn cli_json(addr: SocketAddr, args: &[&str]) -> Vec<Value> {
    let args = [args, &["--json"]].concat();
    cli(addr, &args)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect()
}

/// Runs `vectord --server http://addr <args>` (stdout and stderr are pipes, not terminals);
/// asserts it exits 0 and prints nothing on stderr; returns stdout.
fn cli(addr: SocketAddr, args: &[&str]) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vectord"));
    cmd.arg("--server")
        .arg(format!("http://{addr}"))
        .args(args)
        .stdin(Stdio::null());
    for var in [
        "VECTORD_SERVER",
        "VECTORD_LOG",
        "RUST_LOG",
        "VECTORD_API_KEY",
    ] {
        cmd.env_remove(var);
    }
    let out = cmd.output().expect("run vectord");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "vectord {args:?}: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "no progress noise on a stderr that is not a terminal: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout.into_owned()
}

#[tokio::test]
async fn cli_json_prints_progress_lines() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let (mut v, addr) = slow_server(tmp.path()).await;
    let lines = tokio::task::spawn_blocking(move || {
        cli_json(
            addr,
            &[
                "autotune",
                "--index",
                "big",
                "--harness",
                "smoke",
                "--grid",
                "20:20:8",
                "--min-recall",
                "0",
            ],
        )
    })
    .await
    .expect("cli");
    let kinds: Vec<&str> = lines
        .iter()
        .map(|l| l["event"].as_str().expect("every line is an event"))
        .collect();
    assert_eq!(kinds.first(), Some(&"started"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"finished"), "{kinds:?}");
    let first_trial = kinds.iter().position(|k| *k == "trial").expect("a trial");
    assert!(
        kinds[..first_trial].contains(&"progress"),
        "progress lines come before the trial: {kinds:?}"
    );
    for l in lines.iter().filter(|l| l["event"] == "progress") {
        for w in l["activities"].as_array().expect("activities") {
            let phase = w["phase"].as_str().expect("phase");
            assert!(
                ["PROGRESS_PHASE_BUILD", "PROGRESS_PHASE_MEASURE"].contains(&phase),
                "{l}"
            );
            assert!(w["done"].as_u64() <= w["total"].as_u64(), "{l}");
            assert_eq!(w["config"]["ef_construction"], 20, "{l}");
        }
    }

    // Without --json and without a terminal: the table as before, no bars, nothing on stderr
    // (`cli` checks it).
    let table = tokio::task::spawn_blocking(move || {
        cli(
            addr,
            &[
                "autotune",
                "--index",
                "big",
                "--harness",
                "smoke",
                "--grid",
                "40:20:8",
            ],
        )
    })
    .await
    .expect("cli");
    assert!(table.contains("winner: trial"), "{table}");
    assert!(!table.contains("build m"), "no bar on stdout: {table}");

    // profile activate: progress lines (read from GetIndex), then the generations. The first
    // activation adopts the graph the last autotune's winner built (no build, so no progress:
    // issue 23 §2); the second builds it.
    let (adopted, lines) = tokio::task::spawn_blocking(move || {
        // The index's own (seeded) default config.
        cli_json(addr, &["profile", "put", "p", "--index", "big"]);
        (
            cli_json(addr, &["profile", "activate", "p"]),
            cli_json(addr, &["profile", "activate", "p"]),
        )
    })
    .await
    .expect("cli");
    let adopted = adopted.last().expect("output");
    assert_ne!(
        adopted["generations"][0]["trial_id"], 0,
        "the first activation adopts the winner's graph: {adopted}"
    );
    let (last, progress) = lines.split_last().expect("output");
    assert_eq!(last["generations"][0]["index_name"], "big", "{lines:?}");
    assert!(
        !progress.is_empty(),
        "a build of seconds shows progress: {lines:?}"
    );
    for l in progress {
        assert_eq!(l["event"], "progress", "{l}");
        assert_eq!(l["index_name"], "big", "{l}");
        assert!(l["progress"]["phase"].as_str().is_some(), "{l}");
        assert!(l["progress"]["done"].as_u64() <= l["progress"]["total"].as_u64());
    }
    v.signal("TERM");
    assert!(v.wait_exit().await.success());
}
