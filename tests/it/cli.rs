//! The client subcommands of the real `vectord` binary against an in-process server: output
//! (human and `--json`), imports of every format, autotune's NDJSON stream, promotions, and the
//! exit codes. No sleeps and no fixed ports; every run of the binary is bounded by `DEADLINE`.

use crate::common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{create_index, points, upsert, Gen, TestServer};
use serde_json::Value;
use vectord::pb;

const DEADLINE: Duration = Duration::from_secs(60);

/// What one run of the binary printed and how it exited.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(self) -> Self {
        assert_eq!(
            self.code, 0,
            "stdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    fn code(self, code: i32) -> Self {
        assert_eq!(
            self.code, code,
            "stdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    /// Stdout as one JSON value per line.
    fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
            .collect()
    }

    fn json(&self) -> Value {
        let mut lines = self.json_lines();
        assert_eq!(lines.len(), 1, "{}", self.stdout);
        lines.remove(0)
    }
}

/// Runs `vectord --server <server> <args>` with no VECTORD_* from the environment.
async fn vectord(server: &str, args: &[&str]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vectord"));
    cmd.arg("--server")
        .arg(server)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for var in [
        "VECTORD_SERVER",
        "VECTORD_LOG",
        "RUST_LOG",
        "VECTORD_API_KEY",
        "VECTORD_API_KEY_FILE",
        "VECTORD_TLS_CA",
        "VECTORD_TLS_CLIENT_CERT",
        "VECTORD_TLS_CLIENT_KEY",
    ] {
        cmd.env_remove(var);
    }
    let what = format!("vectord {}", args.join(" "));
    let child = cmd.spawn().expect("start vectord");
    let out: Output = tokio::time::timeout(
        DEADLINE,
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await
    .unwrap_or_else(|_| panic!("{what}: no exit within {DEADLINE:?}"))
    .expect("join")
    .expect("wait");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn point_count(s: &TestServer, name: &str) -> u64 {
    s.index()
        .await
        .get_index(pb::GetIndexRequest { name: name.into() })
        .await
        .expect("get index")
        .into_inner()
        .index
        .expect("index")
        .point_count
}

fn write_fvecs(path: &Path, rows: &[Vec<f32>]) {
    let mut bytes = Vec::new();
    for r in rows {
        bytes.extend_from_slice(&(r.len() as i32).to_le_bytes());
        for x in r {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
    }
    std::fs::write(path, bytes).expect("write fvecs");
}

fn write_npy(path: &Path, rows: &[Vec<f32>]) {
    let d = rows.first().map_or(0, Vec::len);
    let mut header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {d}), }}",
        rows.len()
    );
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for r in rows {
        for x in r {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
    }
    std::fs::write(path, bytes).expect("write npy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_create_list_get_delete_json() {
    let s = TestServer::start().await;
    let url = s.url();
    let created = vectord(
        &url,
        &[
            "index", "create", "docs", "--dim", "4", "--metric", "cosine", "--json",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(created["index"]["name"], "docs");
    assert_eq!(created["index"]["dimension"], 4);
    assert_eq!(created["index"]["metric"], "METRIC_COSINE");
    assert_eq!(created["index"]["default_config"]["m"], 16);
    assert_eq!(created["index"]["active_generation"]["number"], 1);

    vectord(
        &url,
        &["index", "create", "docs", "--dim", "4", "--metric", "l2"],
    )
    .await
    .code(7);

    let listed = vectord(&url, &["--json", "index", "list"])
        .await
        .ok()
        .json();
    let names: Vec<&str> = listed["indexes"]
        .as_array()
        .expect("indexes")
        .iter()
        .filter_map(|i| i["name"].as_str())
        .collect();
    assert_eq!(names, ["docs"]);

    let got = vectord(&url, &["index", "get", "docs", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(got["index"]["point_count"], 0);

    let human = vectord(&url, &["index", "list"]).await.ok();
    assert!(human.stdout.starts_with("NAME"), "{}", human.stdout);
    assert!(human.stdout.contains("docs"), "{}", human.stdout);

    vectord(&url, &["index", "delete", "docs"]).await.ok();
    let gone = vectord(&url, &["index", "get", "docs"]).await.code(3);
    assert!(
        gone.stderr.starts_with("error: NOT_FOUND: "),
        "{}",
        gone.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_fvecs_npy_jsonl_and_reject_a_malformed_file_whole() {
    let s = TestServer::start().await;
    let url = s.url();
    create_index(&mut s.index().await, "imp", 4, pb::Metric::L2).await;
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut g = Gen::new(7);
    let rows = |g: &mut Gen, n: usize| (0..n).map(|_| g.vector(4)).collect::<Vec<_>>();

    let fvecs = tmp.path().join("a.fvecs");
    write_fvecs(&fvecs, &rows(&mut g, 5));
    let r = vectord(
        &url,
        &[
            "import",
            "--index",
            "imp",
            fvecs.to_str().expect("path"),
            "--batch-size",
            "2",
        ],
    )
    .await
    .ok();
    assert_eq!(
        r.stdout.trim(),
        "imported 5 points into imp (point count 5)"
    );
    assert_eq!(point_count(&s, "imp").await, 5);

    let npy = tmp.path().join("b.npy");
    write_npy(&npy, &rows(&mut g, 7));
    let r = vectord(
        &url,
        &[
            "import",
            "--index",
            "imp",
            npy.to_str().expect("path"),
            "--start-id",
            "100",
            "--json",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(r["upserted_count"], 7);
    assert_eq!(r["point_count"], 12);

    let jsonl = tmp.path().join("c.jsonl");
    let text: String = (0..4)
        .map(|i| {
            let v = serde_json::to_string(&g.vector(4)).expect("json");
            format!("{{\"id\": {}, \"vector\": {v}}}\n", 1000 + i)
        })
        .collect();
    std::fs::write(&jsonl, text).expect("write jsonl");
    vectord(
        &url,
        &["import", "--index", "imp", jsonl.to_str().expect("path")],
    )
    .await
    .ok();
    assert_eq!(point_count(&s, "imp").await, 16);

    // The same file with --format, under a name that says nothing.
    let renamed = tmp.path().join("points.txt");
    std::fs::copy(&jsonl, &renamed).expect("copy");
    let p = renamed.to_str().expect("path");
    vectord(&url, &["import", "--index", "imp", p])
        .await
        .code(4);
    vectord(&url, &["import", "--index", "imp", p, "--format", "jsonl"])
        .await
        .ok();
    assert_eq!(point_count(&s, "imp").await, 16, "same ids: replaced");

    // Line 3 is broken: nothing of lines 1 and 2 is imported.
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"id\": 5000, \"vector\": [1, 2, 3, 4]}\n{\"id\": 5001, \"vector\": [1, 2, 3, 4]}\n{\"id\": 5002, \"vector\": [1, 2, 3\n",
    )
    .expect("write bad");
    let r = vectord(
        &url,
        &["import", "--index", "imp", bad.to_str().expect("path")],
    )
    .await
    .code(4);
    assert!(r.stderr.contains("line 3"), "{}", r.stderr);
    assert!(
        r.stderr.starts_with("error: INVALID_ARGUMENT: "),
        "{}",
        r.stderr
    );
    assert_eq!(point_count(&s, "imp").await, 16);

    // A vector of the wrong dimension on line 2 is caught before sending too.
    std::fs::write(
        &bad,
        "{\"vector\": [1, 2, 3, 4]}\n{\"vector\": [1, 2, 3]}\n",
    )
    .expect("write bad");
    let r = vectord(
        &url,
        &["import", "--index", "imp", bad.to_str().expect("path")],
    )
    .await
    .code(4);
    assert!(r.stderr.contains("line 2"), "{}", r.stderr);
    assert_eq!(point_count(&s, "imp").await, 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autotune_json_stream_then_promote_rollback_promoted() {
    let s = TestServer::start().await;
    let url = s.url();
    let mut c = s.index().await;
    create_index(&mut c, "tune", 8, pb::Metric::L2).await;
    upsert(&mut c, "tune", points(&mut Gen::new(3), 0..60, 8)).await;

    let h = vectord(
        &url,
        &[
            "harness", "create", "--index", "tune", "smoke", "--sample", "10", "-k", "5", "--json",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(h["harness"]["query_count"], 10);
    assert_eq!(h["harness"]["k"], 5);

    let run = vectord(
        &url,
        &[
            "autotune",
            "--index",
            "tune",
            "--harness",
            "smoke",
            "--json",
            "--requested-by",
            "ci",
        ],
    )
    .await
    .ok();
    // Progress lines may come in between (progress.rs checks them).
    let events: Vec<Value> = run
        .json_lines()
        .into_iter()
        .filter(|e| e["event"] != "progress")
        .collect();
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(
        kinds,
        ["started", "trial", "trial", "trial", "trial", "trial", "finished"],
        "{}",
        run.stdout
    );
    let job_id = events[0]["job_id"].as_str().expect("job id");
    assert_eq!(events[0]["grid"].as_array().expect("grid").len(), 5);
    let trial_ids: Vec<u64> = events[1..6]
        .iter()
        .map(|t| {
            assert_eq!(t["source"], format!("autotune:{job_id}"));
            assert_eq!(t["recall"], 1.0);
            t["id"].as_u64().expect("trial id")
        })
        .collect();
    let finished = &events[6];
    assert_eq!(finished["job_id"], job_id);
    assert_eq!(finished["promoted"], true, "{finished}");
    assert_eq!(finished["promotion"]["promoted_by"], "ci");
    let winner = finished["winner"]["id"].as_u64().expect("winner");
    assert!(finished["generation"].is_null());
    let front = finished["pareto_front"].as_array().expect("pareto_front");
    assert!(
        !front.is_empty()
            && front
                .iter()
                .all(|t| trial_ids.contains(&t["id"].as_u64().unwrap_or(0)))
    );

    let jobs = vectord(&url, &["jobs", "list", "--json"]).await.ok().json();
    assert_eq!(jobs["jobs"][0]["state"], "JOB_STATE_SUCCEEDED");

    // Promote another trial by hand, then roll back to the autotune winner, then clear.
    let other = *trial_ids
        .iter()
        .find(|&&t| t != winner)
        .expect("another trial");
    let other_s = other.to_string();
    let p = vectord(
        &url,
        &[
            "promote", "--index", "tune", "--trial", &other_s, "--by", "alice", "--note",
            "by hand", "--json",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(p["current"]["trial_id"], other);
    assert_eq!(p["history_depth"], 1);

    let shown = vectord(&url, &["promoted", "--index", "tune", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(shown["current"]["trial_id"], other);
    assert_eq!(shown["current"]["note"], "by hand");
    assert_eq!(shown["history"][0]["trial_id"], winner);

    let human = vectord(&url, &["promoted", "--index", "tune"]).await.ok();
    assert!(human.stdout.contains("alice"), "{}", human.stdout);

    let back = vectord(&url, &["rollback", "--index", "tune", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(back["current"]["trial_id"], winner);
    let cleared = vectord(&url, &["rollback", "--index", "tune"]).await.ok();
    assert!(
        cleared.stdout.contains("nothing is promoted"),
        "{}",
        cleared.stdout
    );
    let r = vectord(&url, &["rollback", "--index", "tune"])
        .await
        .code(6);
    assert!(
        r.stderr.starts_with("error: FAILED_PRECONDITION: "),
        "{}",
        r.stderr
    );

    let trials = vectord(
        &url,
        &["trial", "list", "--index", "tune", "--limit", "3", "--json"],
    )
    .await
    .ok()
    .json();
    assert_eq!(trials["trials"].as_array().expect("trials").len(), 3);
    assert_eq!(trials["trials"][0]["id"], trial_ids[4], "newest first");

    // --target-recall: the fastest trial that reaches it wins (5% p50 ties to fewer distance
    // computations).
    let tuned = vectord(
        &url,
        &[
            "autotune",
            "--index",
            "tune",
            "--harness",
            "smoke",
            "--json",
            "--target-recall",
            "0.5",
        ],
    )
    .await
    .ok()
    .json_lines();
    let trials: Vec<&Value> = tuned.iter().filter(|e| e["event"] == "trial").collect();
    // The objective's rule: of the trials reaching it, p50s within 5% of the lowest are tied,
    // and the tie goes to fewer distance computations.
    let f = |t: &Value, k: &str| t[k].as_f64().unwrap_or(f64::MAX);
    let reached: Vec<&&Value> = trials
        .iter()
        .filter(|t| f(t, "recall") >= 0.5 && f(t, "recall") != f64::MAX)
        .collect();
    let fin = tuned.last().expect("finished");
    let w = &fin["winner"];
    let pairs: Vec<(f64, f64)> = reached
        .iter()
        .map(|t| (f(t, "p50_micros"), f(t, "mean_distance_evals")))
        .collect();
    common::assert_target_recall_winner(
        &pairs,
        (f(w, "p50_micros"), f(w, "mean_distance_evals")),
        &fin.to_string(),
    );
    assert!(trials.iter().any(|t| t["id"] == w["id"]), "{fin}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes() {
    let s = TestServer::start().await;
    let url = s.url();
    let mut c = s.index().await;
    create_index(&mut c, "codes", 3, pb::Metric::L2).await;
    upsert(&mut c, "codes", points(&mut Gen::new(5), 0..10, 3)).await;

    let r = vectord(&url, &["health"]).await.ok();
    assert_eq!(r.stdout.trim(), "SERVING");

    let r = vectord(&url, &["search", "--index", "nope", "--vector", "1,2,3"])
        .await
        .code(3);
    assert!(r.stderr.starts_with("error: NOT_FOUND: "), "{}", r.stderr);

    let r = vectord(
        &url,
        &["search", "--index", "codes", "--vector", "1,2,3", "-k", "0"],
    )
    .await
    .code(4);
    assert!(
        r.stderr.starts_with("error: INVALID_ARGUMENT: "),
        "{}",
        r.stderr
    );

    let r = vectord(
        &url,
        &[
            "search", "--index", "codes", "--vector", "-1,0.5,2", "-k", "2", "--json",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(r["neighbors"].as_array().expect("neighbors").len(), 2);

    // --id searches with a stored point's vector: it finds itself first.
    let r = vectord(
        &url,
        &[
            "search", "--index", "codes", "--id", "7", "-k", "3", "--json",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(r["neighbors"][0]["id"], 7, "{r}");
    vectord(&url, &["search", "--index", "codes", "--id", "999"])
        .await
        .code(3);

    // Usage errors are clap's.
    vectord(&url, &["search", "--index", "codes"]).await.code(2);
    vectord(
        &url,
        &[
            "search", "--index", "codes", "--id", "1", "--vector", "1,2,3",
        ],
    )
    .await
    .code(2);

    // A closed port: connection failure.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let r = vectord(&format!("http://127.0.0.1:{closed}"), &["health"])
        .await
        .code(5);
    assert!(r.stderr.starts_with("error: UNAVAILABLE: "), "{}", r.stderr);
    vectord(&format!("http://127.0.0.1:{closed}"), &["index", "list"])
        .await
        .code(5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_harness_trials_profiles_and_jobs() {
    let s = TestServer::start().await;
    let url = s.url();
    let mut c = s.index().await;
    create_index(&mut c, "lab", 4, pb::Metric::L2).await;
    let mut g = Gen::new(11);
    upsert(&mut c, "lab", points(&mut g, 0..40, 4)).await;

    let tmp = tempfile::tempdir().expect("temp dir");
    let queries = tmp.path().join("q.fvecs");
    write_fvecs(&queries, &(0..6).map(|_| g.vector(4)).collect::<Vec<_>>());
    let q = queries.to_str().expect("path");
    let h = vectord(
        &url,
        &[
            "harness",
            "create",
            "--index",
            "lab",
            "ext",
            "--queries",
            q,
            "-k",
            "3",
        ],
    )
    .await
    .ok();
    assert!(h.stdout.contains("6 queries, k 3"), "{}", h.stdout);
    let listed = vectord(&url, &["harness", "list", "--index", "lab", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(listed["harnesses"][0]["name"], "ext");
    assert!(listed["harnesses"][0]["seed"].is_null());

    let t = vectord(
        &url,
        &[
            "trial",
            "run",
            "--index",
            "lab",
            "--harness",
            "ext",
            "--m",
            "8",
            "--ef-construction",
            "20",
            "--ef-search",
            "10",
            "--seed",
            "7",
            "--json",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(t["trial"]["source"], "manual");
    assert_eq!(t["trial"]["config"]["seed"], 7);
    let id = t["trial"]["id"].as_u64().expect("id").to_string();
    let got = vectord(&url, &["trial", "get", &id]).await.ok();
    assert!(
        got.stdout
            .contains("m 8, ef_construction 20, ef_search 10, seed 7"),
        "{}",
        got.stdout
    );
    vectord(&url, &["trial", "get", "999999"]).await.code(3);
    // ef_construction out of its range is the server's INVALID_ARGUMENT.
    vectord(
        &url,
        &[
            "trial",
            "run",
            "--index",
            "lab",
            "--harness",
            "ext",
            "--m",
            "8",
            "--ef-construction",
            "5",
            "--ef-search",
            "10",
        ],
    )
    .await
    .code(4);

    let p = vectord(
        &url,
        &[
            "profile",
            "put",
            "prod",
            "--index",
            "lab:16:100:50",
            "--json",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(
        p["profile"]["indexes"][0]["default_config"]["ef_construction"],
        100
    );
    let names = vectord(&url, &["profile", "list"]).await.ok();
    assert!(names.stdout.contains("prod"), "{}", names.stdout);
    // The result is the last line (progress lines may come before it on a slow build).
    let a = vectord(&url, &["profile", "activate", "prod", "--json"])
        .await
        .ok()
        .json_lines()
        .pop()
        .expect("a result line");
    assert_eq!(a["generations"][0]["number"], 2);
    assert_eq!(a["generations"][0]["config"]["ef_search"], 50);
    assert_eq!(a["generations"][0]["profile"], "prod");
    vectord(&url, &["profile", "put", "bad", "--index", "missing"])
        .await
        .code(3);
    vectord(&url, &["profile", "delete", "prod"]).await.ok();
    vectord(&url, &["profile", "get", "prod"]).await.code(3);

    vectord(&url, &["jobs", "cancel", "job-404"]).await.code(3);
    let h = vectord(&url, &["health", "--json"]).await.ok().json();
    assert_eq!(h["status"], "SERVING");
    vectord(&url, &["harness", "delete", "--index", "lab", "ext"])
        .await
        .ok();
    vectord(&url, &["harness", "delete", "--index", "lab", "ext"])
        .await
        .code(3);
}

/// Ctrl-C during `vectord autotune`: the job is cancelled (CancelJob) and the exit code is 130.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_cancels_the_autotune_job() {
    use std::io::{BufRead, BufReader, Read};

    let s = TestServer::start().await;
    let url = s.url();
    let mut c = s.index().await;
    create_index(&mut c, "slow", 64, pb::Metric::L2).await;
    upsert(&mut c, "slow", points(&mut Gen::new(9), 0..4000, 64)).await;
    vectord(
        &url,
        &[
            "harness", "create", "--index", "slow", "h", "--sample", "100",
        ],
    )
    .await
    .ok();

    // One heavy seeded config: its build takes far longer than delivering a signal.
    let mut child = Command::new(env!("CARGO_BIN_EXE_vectord"))
        .args([
            "--server",
            &url,
            "--json",
            "autotune",
            "--index",
            "slow",
            "--harness",
            "h",
        ])
        .args(["--grid", "400:200:128"])
        .env_remove("VECTORD_SERVER")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vectord");
    let pid = child.id();
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let run = tokio::task::spawn_blocking(move || {
        let mut first = String::new();
        stdout.read_line(&mut first).expect("read started");
        let status = Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let mut rest = String::new();
        stdout.read_to_string(&mut rest).expect("read rest");
        let out = child.wait_with_output().expect("wait");
        (first, rest, out)
    });
    let (first, rest, out) = tokio::time::timeout(DEADLINE, run)
        .await
        .expect("autotune did not stop within the deadline")
        .expect("join");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let started: Value = serde_json::from_str(&first).expect("started line");
    assert_eq!(started["event"], "started", "{first}");
    let job_id = started["job_id"].as_str().expect("job id");
    assert_eq!(
        out.status.code(),
        Some(130),
        "stdout: {first}{rest}\nstderr: {stderr}"
    );
    assert!(
        stderr.contains(&format!("cancelled autotune job {job_id}")),
        "{stderr}"
    );
    assert!(!rest.contains("finished"), "{rest}");

    let jobs = vectord(&url, &["jobs", "list", "--index", "slow", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(jobs["jobs"][0]["id"], job_id);
    assert_eq!(jobs["jobs"][0]["state"], "JOB_STATE_CANCELLED", "{jobs}");
}

#[tokio::test]
async fn api_keys_and_their_exit_codes() {
    use std::sync::Arc;
    use vectord::auth::{ApiKey, ApiKeys};
    let tmp = tempfile::tempdir().unwrap();
    let mut config = vectord::config::Config::for_tests(tmp.path());
    config.api_keys = Some(Arc::new(
        ApiKeys::new(
            ApiKey::parse("--api-key", "cli-admin").unwrap(),
            Some(ApiKey::parse("--read-only-api-key", "cli-reader").unwrap()),
        )
        .unwrap(),
    ));
    let s = TestServer::start_in(tmp.path(), config).await;
    let url = s.url();
    let create = ["index", "create", "docs", "--dim", "4", "--metric", "l2"];

    let r = vectord(&url, &["index", "list"]).await.code(9);
    assert!(
        r.stderr.starts_with("error: UNAUTHENTICATED: "),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("authorization: Bearer <key>"),
        "{}",
        r.stderr
    );
    vectord(&url, &["--api-key", "nope", "index", "list"])
        .await
        .code(9);
    vectord(&url, &[&["--api-key", "cli-admin"][..], &create].concat())
        .await
        .ok();
    let r = vectord(&url, &[&["--api-key", "cli-reader"][..], &create].concat())
        .await
        .code(10);
    assert!(
        r.stderr.starts_with("error: PERMISSION_DENIED: "),
        "{}",
        r.stderr
    );
    let key_file = tmp.path().join("reader.key");
    std::fs::write(&key_file, "cli-reader\n").unwrap();
    let key_file = key_file.to_str().unwrap();
    let r = vectord(
        &url,
        &["--api-key-file", key_file, "--json", "index", "list"],
    )
    .await
    .ok();
    assert_eq!(r.json()["indexes"][0]["name"], "docs", "{}", r.stdout);
    // Health is open: a probe needs no key.
    vectord(&url, &["health"]).await.ok();
}

#[tokio::test]
async fn https_server_with_a_private_ca() {
    use common::tls::{serving, tls_channel, tls_server, write, Pki};
    let pki = Pki::new("cli test CA");
    let s = tls_server(&pki, None).await;
    let ca = write(&s.dir, "ca.pem", &pki.ca_pem);
    let ca = ca.to_str().unwrap();
    let url = format!("https://localhost:{}", s.port);
    let ch = tls_channel(s.port, &pki.ca_pem, None)
        .await
        .expect("TLS connect");
    serving(ch).await.expect("SERVING over TLS");
    let r = vectord(&url, &["--tls-ca", ca, "health"]).await.ok();
    assert_eq!(r.stdout.trim(), "SERVING");
    vectord(
        &url,
        &[
            "--tls-ca", ca, "index", "create", "t", "--dim", "2", "--metric", "l2",
        ],
    )
    .await
    .ok();
    // Without the CA the system roots do not trust it.
    let r = vectord(&url, &["index", "list"]).await.code(5);
    assert!(r.stderr.contains("UNAVAILABLE"), "{}", r.stderr);
    // Plaintext to the TLS port fails too.
    let r = vectord(
        &format!("http://localhost:{}", s.port),
        &["--timeout", "5", "index", "list"],
    )
    .await;
    assert_ne!(r.code, 0, "{}", r.stdout);
    assert!(r.stderr.starts_with("error: "), "{}", r.stderr);
}

#[tokio::test]
async fn mtls_server_needs_the_client_certificate_flags() {
    use common::tls::{serving, tls_channel, tls_server, write, Pki};
    let pki = Pki::new("cli mTLS CA");
    let s = tls_server(&pki, Some(&pki)).await;
    let (cert, key) = pki.leaf(&["cli-client"], true);
    let ch = tls_channel(s.port, &pki.ca_pem, Some((cert.clone(), key.clone())))
        .await
        .expect("mTLS connect");
    serving(ch).await.expect("SERVING over mTLS");
    let ca = write(&s.dir, "ca.pem", &pki.ca_pem);
    let cert = write(&s.dir, "client.pem", &cert);
    let key = write(&s.dir, "client.key", &key);
    let (ca, cert, key) = (
        ca.to_str().unwrap(),
        cert.to_str().unwrap(),
        key.to_str().unwrap(),
    );
    let url = format!("https://localhost:{}", s.port);
    let r = vectord(
        &url,
        &[
            "--tls-ca",
            ca,
            "--tls-client-cert",
            cert,
            "--tls-client-key",
            key,
            "health",
        ],
    )
    .await
    .ok();
    assert_eq!(r.stdout.trim(), "SERVING");
    let r = vectord(&url, &["--tls-ca", ca, "--timeout", "5", "health"]).await;
    assert_ne!(
        r.code, 0,
        "health without a client certificate: {}",
        r.stdout
    );
}

/// `vectord report --svg`: every journaled trial of the harness is a point, the recall × p50
/// front is highlighted, the trials of GetParetoFront (recall × p50 × memory) that are on it only
/// by memory are marked apart, marker size grows with memory, the promoted trial is ringed, and
/// the SVG parses as XML; the text summary lists GetParetoFront's front.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_plots_the_journal_with_front_and_promoted() {
    let s = TestServer::start().await;
    let url = s.url();
    let mut c = s.index().await;
    create_index(&mut c, "rep", 24, pb::Metric::L2).await;
    upsert(&mut c, "rep", points(&mut Gen::new(11), 0..400, 24)).await;

    // No trials yet: a clear precondition error.
    let r = vectord(&url, &["report", "--index", "rep"]).await.code(6);
    assert!(r.stderr.contains("no trials"), "{}", r.stderr);

    vectord(
        &url,
        &[
            "harness", "create", "--index", "rep", "h", "--sample", "40", "-k", "10",
        ],
    )
    .await
    .ok();
    let tuned = vectord(
        &url,
        &[
            "autotune",
            "--index",
            "rep",
            "--harness",
            "h",
            "--grid",
            "10:10:4,10:20:4,20:10:8,40:40:8,80:80:16",
            "--min-recall",
            "0",
            "--json",
        ],
    )
    .await
    .ok()
    .json_lines();
    let fin = tuned.last().expect("finished");
    assert_eq!(fin["promoted"], true, "{fin}");
    let promoted = fin["winner"]["id"].as_u64().expect("winner id");
    let trial_events: Vec<&serde_json::Value> =
        tuned.iter().filter(|e| e["event"] == "trial").collect();
    let trial_ids: Vec<u64> = trial_events
        .iter()
        .filter_map(|e| e["id"].as_u64())
        .collect();
    assert_eq!(trial_ids.len(), 5);
    // (id, recall, p50, memory) of each trial, as streamed.
    let measured: Vec<(u64, f64, f64, u64)> = trial_events
        .iter()
        .map(|e| {
            (
                e["id"].as_u64().expect("id"),
                e["recall"].as_f64().expect("recall"),
                e["p50_micros"].as_f64().expect("p50"),
                e["memory_bytes"].as_u64().expect("memory"),
            )
        })
        .collect();
    // The recall × p50 front, computed here from the streamed figures.
    let mut front_2d: Vec<u64> = measured
        .iter()
        .filter(|&&(_, r, p, _)| {
            !measured
                .iter()
                .any(|&(_, r2, p2, _)| r2 >= r && p2 <= p && (r2 > r || p2 < p))
        })
        .map(|&(id, ..)| id)
        .collect();
    front_2d.sort_unstable();

    let front: Vec<u64> = s
        .autotune()
        .await
        .get_pareto_front(pb::GetParetoFrontRequest {
            index_name: "rep".into(),
            harness: "h".into(),
            ..Default::default()
        })
        .await
        .expect("front")
        .into_inner()
        .trials
        .iter()
        .map(|t| t.id)
        .collect();
    assert!(!front.is_empty());

    let dir = tempfile::tempdir().expect("tempdir");
    let svg_path = dir.path().join("front.svg");
    let svg_arg = svg_path.to_str().expect("utf-8 path");
    let human = vectord(&url, &["report", "--index", "rep", "--svg", svg_arg])
        .await
        .ok();
    assert!(
        human
            .stdout
            .contains(&format!("5 trials, {} on the Pareto front", front.len())),
        "{}",
        human.stdout
    );
    assert!(
        human
            .stdout
            .contains(&format!("* promoted: trial {promoted}"))
            || human
                .stdout
                .contains(&format!("promoted: trial {promoted}")),
        "{}",
        human.stdout
    );

    let text = std::fs::read_to_string(&svg_path).expect("svg written");
    let doc = roxmltree::Document::parse(&text).expect("the SVG is well-formed XML");
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "svg");
    assert_eq!(
        root.tag_name().namespace(),
        Some("http://www.w3.org/2000/svg")
    );
    let circles = |class: &str| -> Vec<u64> {
        let mut ids: Vec<u64> = root
            .descendants()
            .filter(|n| n.has_tag_name("circle"))
            .filter(|n| {
                n.attribute("class")
                    .is_some_and(|c| c.split(' ').any(|w| w == class))
            })
            .filter_map(|n| n.attribute("data-trial-id")?.parse().ok())
            .collect();
        ids.sort_unstable();
        ids
    };
    let mut all = trial_ids.clone();
    all.sort_unstable();
    assert_eq!(circles("trial"), all, "every trial is plotted once");
    assert!(!front_2d.is_empty());
    assert_eq!(
        circles("front"),
        front_2d,
        "the recall × p50 front is highlighted"
    );
    let mut memory_only: Vec<u64> = front
        .iter()
        .copied()
        .filter(|id| !front_2d.contains(id))
        .collect();
    memory_only.sort_unstable();
    assert_eq!(
        circles("memory-front"),
        memory_only,
        "trials on GetParetoFront's front only by memory are marked apart"
    );
    // Marker size grows with memory: sorted by memory, the radii never shrink.
    let mut sized: Vec<(u64, f64)> = root
        .descendants()
        .filter(|n| n.has_tag_name("circle"))
        .filter(|n| {
            n.attribute("class")
                .is_some_and(|c| c.split(' ').any(|w| w == "trial"))
        })
        .map(|n| {
            let id: u64 = n
                .attribute("data-trial-id")
                .and_then(|v| v.parse().ok())
                .expect("trial id");
            let mem = measured
                .iter()
                .find(|m| m.0 == id)
                .expect("a plotted trial was streamed")
                .3;
            assert_eq!(
                n.attribute("data-memory-bytes"),
                Some(mem.to_string().as_str())
            );
            (
                mem,
                n.attribute("r").and_then(|v| v.parse().ok()).expect("r"),
            )
        })
        .collect();
    // Marker area is proportional to memory (the trial with the most has the largest marker;
    // markers are never drawn smaller than 3 px).
    sized.sort_by_key(|s| s.0);
    let (max_mem, max_r) = *sized.last().expect("trials");
    assert!(
        sized[0].0 < max_mem,
        "the grid's m values give different memory"
    );
    for &(mem, r) in &sized {
        let want = (max_r * (mem as f64 / max_mem as f64).sqrt()).max(3.0);
        assert!((r - want).abs() < 0.02, "area ∝ memory: {sized:?}");
    }
    assert!(
        text.contains("marker area ∝ memory"),
        "the legend says size is memory"
    );
    assert_eq!(
        circles("promoted"),
        vec![promoted],
        "the promoted trial is ringed"
    );

    let j = vectord(
        &url,
        &["report", "--index", "rep", "--harness", "h", "--json"],
    )
    .await
    .ok()
    .json();
    assert_eq!(j["trial_count"], 5);
    assert_eq!(j["promoted_trial_id"], promoted);
    let jf: Vec<u64> = j["pareto_front"]
        .as_array()
        .expect("front")
        .iter()
        .filter_map(|t| t["id"].as_u64())
        .collect();
    assert_eq!(jf, front, "same front, same order as GetParetoFront");

    // Unknown index and unknown harness.
    vectord(&url, &["report", "--index", "nope"]).await.code(3);
    vectord(&url, &["report", "--index", "rep", "--harness", "zz"])
        .await
        .code(6);
}

/// `--server` with several addresses (a cluster's nodes): the first that connects and serves is
/// used; a stopped node is skipped; none reachable is UNAVAILABLE (exit 5) naming each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_servers_use_the_first_that_serves() {
    let mut a = TestServer::start().await;
    let b = TestServer::start().await;
    create_index(&mut a.index().await, "only_on_a", 4, pb::Metric::L2).await;
    // Nothing listens on `dead` (bound, then closed).
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").to_string()
    };
    let names = |r: Run| -> Vec<String> {
        r.ok().json()["indexes"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|i| i["name"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let first_dead = vectord(&format!("{dead},{}", a.url()), &["--json", "index", "list"]).await;
    assert_eq!(names(first_dead), ["only_on_a"]);
    let both = format!("{},{}", a.url(), b.url());
    assert_eq!(
        names(vectord(&both, &["--json", "index", "list"]).await),
        ["only_on_a"]
    );
    a.stop().await;
    let after = vectord(&both, &["index", "list"]).await.ok();
    assert!(
        !after.stdout.contains("only_on_a") && after.stderr.contains("skipped"),
        "{} / {}",
        after.stdout,
        after.stderr
    );
    let none = vectord(&format!("{dead},{}", a.addr), &["index", "list"])
        .await
        .code(5);
    assert!(
        none.stderr.contains("cannot connect to any of --server")
            && none.stderr.contains(&dead)
            && none.stderr.contains(&a.addr.to_string()),
        "{}",
        none.stderr
    );
}
