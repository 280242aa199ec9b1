//! Issue 21's benchmark: a 3-node cluster (docs/cluster.md) against the single node, both real
//! release server processes (`vectord serve`, the bench profile's binary) over gRPC on
//! loopback, measured in the same run, alternating, with medians and spreads.
//!
//! Run with `cargo bench --bench cluster`. The engines come from `scripts/cluster.sh` (it
//! installs the pinned etcd and nats-server when missing): 1 etcd + 1 NATS, or 3 + 3 with
//! `VECTORD_CLUSTER_ENGINES=3`. Data: a seeded Gaussian mixture (64 clusters, L2, 128-d) of
//! `VECTORD_CLUSTER_POINTS` points (default 100,000), 500 queries from the same mixture with
//! exact top-10 ground truth.
//!
//! Steps:
//! 1. import: ImportPoints into the single node, and through node 1 of the cluster (answered
//!    once JetStream holds every batch), then the time until all 3 nodes have applied it;
//! 2. the ef_search reaching recall@10 0.95 on the single node, and the recall of each cluster
//!    node at that ef (every node builds its own graph: same data, its own insertion order);
//! 3. search QPS at that ef through the single node and through 1, 2 and 3 cluster nodes,
//!    `VECTORD_CLUSTER_CALLERS` concurrent callers (default 6) spread over the nodes, each a
//!    loop of SearchBatch calls of 100 queries, for `VECTORD_CLUSTER_SECS` (default 5) per
//!    measurement, `VECTORD_CLUSTER_ROUNDS` rounds (default 3) alternating the four set-ups;
//! 4. 64 concurrent writers (one new point per UpsertPoints) into the single node, then spread
//!    over the 3 cluster nodes, alternating, for `VECTORD_CLUSTER_WRITE_SECS` (default 10) per
//!    round: acknowledged writes/s, p50, p99;
//! 5. rollout: ActivateProfile of a profile with another config (ef_construction 100 and 200
//!    in turn) on the single node (one rebuild) and through node 1 of the cluster (answered
//!    when every node serves it), alternating, per round;
//! 6. a wiped node: node 3 stopped, its data dir deleted, started again (it copies the index
//!    from a peer, or replays the stream when the peers are fewer than 1,000 messages ahead:
//!    the bench says which, from the node's log): seconds until it
//!    serves the index with every point (GetIndex's point count, the index's health SERVING),
//!    against the single node's import of the same points (step 1).
//!
//! On one machine the three nodes share its cores: search QPS cannot grow with the nodes
//! there (each node's SearchBatch already uses every core); the bench says so and measures it
//! anyway. Results also go to `target/bench-cluster.json`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use tonic::transport::Channel;
use vectord::pb;

#[path = "../tests/it/common/child.rs"]
mod child;
#[path = "../tests/it/common/engines.rs"]
mod engines;
#[path = "common/machine.rs"]
mod machine;
#[path = "common/serving.rs"]
mod serving;

use engines::Engines;
use serving::*;

const INDEX: &str = "bench";
/// What [`writers`] measured: acks/s, p50 ms, p99 ms, errors, the acknowledged ids.
type Writes = WriterRun;
const WRITERS: u64 = 64;
const BATCH: usize = 100;
/// Longest the bench waits for a node to apply or catch up.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(1800);

/// A cluster node: its id, data dir and server process.
struct Node {
    id: String,
    dir: PathBuf,
    server: Server,
}

impl Node {
    async fn start(e: &Engines, id: &str, dir: &Path) -> BoxResult<(Node, f64)> {
        std::fs::create_dir_all(dir)?;
        let (server, took) = Server::start_with(
            env!("CARGO_BIN_EXE_vectord").as_ref(),
            dir,
            &["--etcd", &e.etcd, "--nats", &e.nats, "--node-id", id],
        )
        .await?;
        Ok((
            Node {
                id: id.into(),
                dir: dir.into(),
                server,
            },
            took,
        ))
    }
}

/// The index's point count and unindexed count on the node of `c`.
async fn counts(c: &mut Client) -> BoxResult<(u64, u64)> {
    Ok(c.get_index(pb::GetIndexRequest { name: INDEX.into() })
        .await?
        .into_inner()
        .index
        .map_or((0, u64::MAX), |i| (i.point_count, i.unindexed_count)))
}

/// Waits until the node of `addr` holds at least `n` points of the index, all linked into its
/// graph (`unindexed_count` 0), and, on a cluster node (`cluster`), its health for the index
/// is SERVING; the seconds since `since`.
async fn wait_caught_up(addr: SocketAddr, n: u64, cluster: bool, since: Instant) -> BoxResult<f64> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let ch = Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let mut c = Client::new(ch.clone());
    let mut health = HealthClient::new(ch);
    let deadline = Instant::now() + CATCH_UP_LIMIT;
    loop {
        let (count, unindexed) = counts(&mut c).await.unwrap_or((0, u64::MAX));
        let serving = !cluster
            || health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: format!("vectord.v1.IndexService/{INDEX}"),
                })
                .await
                .map(|r| r.into_inner().status == ServingStatus::Serving as i32)
                .unwrap_or(false);
        if count >= n && unindexed == 0 && serving {
            return Ok(since.elapsed().as_secs_f64());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{addr} holds {count} of {n} points ({unindexed} unlinked) after {CATCH_UP_LIMIT:?}"
            )
            .into());
        }
        // A bench polls (the state it waits for has no event); 50 ms is far below what it reads.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Total queries/s of `callers` concurrent callers spread over `addrs`, each a loop of
/// SearchBatch calls of [`BATCH`] queries at `ef` for `secs`.
async fn qps(
    addrs: &[SocketAddr],
    callers: usize,
    queries: &[Vec<f32>],
    ef: u32,
    secs: f64,
) -> BoxResult<f64> {
    let mut tasks = Vec::new();
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    for t in 0..callers {
        let addr = addrs[t % addrs.len()];
        let ch = Channel::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        let chunks: Vec<Vec<Vec<f32>>> = queries.chunks(BATCH).map(|c| c.to_vec()).collect();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::new(ch).max_decoding_message_size(64 * 1024 * 1024);
            let mut done = 0usize;
            let mut i = t;
            while Instant::now() < until {
                let qs = &chunks[i % chunks.len()];
                i += 1;
                c.search_batch(batch_request(INDEX, qs, ef))
                    .await
                    .map_err(|e| e.to_string())?;
                done += qs.len();
            }
            Ok::<usize, String>(done)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// ActivateProfile of a one-index profile with ef_construction `ef_c` through `addr`: seconds
/// until it answered (on a cluster node: every node serves it, or an error).
async fn activate(addr: SocketAddr, profile: &str, ef_c: u32) -> BoxResult<f64> {
    let ch = Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let mut c = Client::new(ch);
    c.put_profile(pb::PutProfileRequest {
        profile: Some(pb::Profile {
            name: profile.into(),
            indexes: vec![pb::ProfileIndex {
                index_name: INDEX.into(),
                default_config: Some(pb::HnswConfig {
                    m: 16,
                    ef_construction: ef_c,
                    ef_search: 64,
                    ..Default::default()
                }),
            }],
        }),
    })
    .await?;
    let started = Instant::now();
    let mut req = tonic::Request::new(pb::ActivateProfileRequest {
        name: profile.into(),
    });
    req.set_timeout(Duration::from_secs(3600));
    let r = c.activate_profile(req).await?.into_inner();
    let took = started.elapsed().as_secs_f64();
    if !r.rolled_out {
        return Err(format!("the activation did not roll out: {:?}", r.nodes).into());
    }
    Ok(took)
}

fn ratio(a: f64, b: f64) -> String {
    format!("{:.2}x", a / b)
}

#[tokio::main]
async fn main() -> BoxResult<()> {
    let n = env_usize("VECTORD_CLUSTER_POINTS", 100_000);
    let rounds = env_usize("VECTORD_CLUSTER_ROUNDS", 3).max(1);
    let qps_secs = env_usize("VECTORD_CLUSTER_SECS", 5) as f64;
    let write_secs = env_usize("VECTORD_CLUSTER_WRITE_SECS", 10) as u64;
    let callers = env_usize("VECTORD_CLUSTER_CALLERS", 6).max(1);
    let members = env_usize("VECTORD_CLUSTER_ENGINES", 1).max(1);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "machine: {}, {cores} cores, load average {}; {}",
        machine::cpu_model(),
        machine::load_average().unwrap_or_else(|| "?".into()),
        Command::new("date")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    );
    println!(
        "data: {n} x 128 L2 (seeded mixture of 64 Gaussians), 500 queries; engines: {members} etcd + {members} NATS (scripts/cluster.sh); 3 vectord nodes and 1 single node, all on this machine"
    );
    let set = Set {
        name: format!("l2-{n}"),
        n,
        dim: 128,
        metric: Metric::L2,
    };
    let mixture = Mixture::new(set.dim, 7);
    let base = mixture.samples(1, n);
    let queries = mixture.samples(2, 500);
    let all: Vec<u64> = (0..n as u64).collect();
    let truth = exact(set.metric, &base, &all, &queries);

    let engines = Engines::try_start(members, members)?;
    let single_dir = engines.dir.path().join("single");
    std::fs::create_dir_all(&single_dir)?;
    let (single, _) = Server::start(&single_dir).await?;
    let mut nodes = Vec::new();
    for i in 1..=3 {
        let id = format!("n{i}");
        let dir = engines.dir.path().join(format!("vectord-{i}"));
        nodes.push(Node::start(&engines, &id, &dir).await?.0);
    }
    let cluster_addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.server.addr).collect();

    // 1. import
    let mut s = single.client().await?;
    create(&mut s, INDEX, &set).await?;
    let t0 = Instant::now();
    let import_single = import(&mut s, INDEX, &base, &all).await?;
    let linked_single = wait_caught_up(single.addr, n as u64, false, t0).await?;
    let mut c1 = nodes[0].server.client().await?;
    create(&mut c1, INDEX, &set).await?;
    let t0 = Instant::now();
    let import_cluster = import(&mut c1, INDEX, &base, &all).await?;
    let mut applied = Vec::new();
    for node in &nodes {
        applied.push(wait_caught_up(node.server.addr, n as u64, true, t0).await?);
    }
    let all_applied = applied.iter().cloned().fold(0.0, f64::max);
    println!("\n1. import of {n} points:");
    println!(
        "  single node: acknowledged in {} ({:.0} points/s), every point linked into the graph after {}",
        secs(import_single),
        n as f64 / import_single,
        secs(linked_single)
    );
    println!(
        "  cluster through n1: acknowledged in {} ({} the single node's), every node applied and linked it after {} ({} the single node's)",
        secs(import_cluster),
        ratio(import_cluster, import_single),
        secs(all_applied),
        ratio(all_applied, linked_single)
    );

    // 2. the ef at recall 0.95
    let mut ef = EF_SWEEP[EF_SWEEP.len() - 1];
    let mut single_recall = 0.0;
    for &e in &EF_SWEEP {
        let (_, found) = batch(&mut s, INDEX, &queries, e, 1).await?;
        let r = recall(&found, &truth);
        if r >= 0.95 {
            ef = e;
            single_recall = r;
            break;
        }
        single_recall = r;
    }
    let mut node_recalls = Vec::new();
    for node in &nodes {
        let mut c = node.server.client().await?;
        let (_, found) = batch(&mut c, INDEX, &queries, ef, 1).await?;
        node_recalls.push(recall(&found, &truth));
    }
    println!("\n2. ef_search {ef}: recall@10 single {single_recall:.4}; cluster nodes {node_recalls:.4?}");

    // 3. search QPS, alternating
    let setups: Vec<(&str, Vec<SocketAddr>)> = vec![
        ("single node", vec![single.addr]),
        ("cluster, 1 node", cluster_addrs[..1].to_vec()),
        ("cluster, 2 nodes", cluster_addrs[..2].to_vec()),
        ("cluster, 3 nodes", cluster_addrs.clone()),
    ];
    let mut qps_runs: Vec<Vec<f64>> = vec![Vec::new(); setups.len()];
    for _ in 0..rounds {
        for (i, (_, addrs)) in setups.iter().enumerate() {
            qps_runs[i].push(qps(addrs, callers, &queries, ef, qps_secs).await?);
        }
    }
    println!(
        "\n3. search QPS at ef {ef} (recall >= 0.95), {callers} callers of SearchBatch x {BATCH}, {qps_secs} s each, {rounds} rounds alternating (median (min–max)):"
    );
    let base_qps = median(&qps_runs[0]);
    for (i, (name, _)) in setups.iter().enumerate() {
        println!(
            "  {name:<17} {}  {} the single node",
            spread(&qps_runs[i], |x| format!("{x:.0}")),
            ratio(median(&qps_runs[i]), base_qps)
        );
    }
    println!("  (all on {cores} cores: the nodes share them, so QPS cannot grow with the nodes here; on separate machines each node adds its own cores)");

    // 4. writers, alternating
    let (mut w_single, mut w_cluster) = (Vec::new(), Vec::new());
    let mut next_id = 1_000_000_000u64;
    for _ in 0..rounds {
        for (addrs, runs) in [
            (&[single.addr][..], &mut w_single),
            (&cluster_addrs[..], &mut w_cluster),
        ] {
            runs.push(writers(addrs, INDEX, WRITERS, &mixture, next_id, write_secs).await?);
            next_id += 1_000_000_000;
        }
    }
    let col = |w: &[Writes], f: fn(&Writes) -> f64| w.iter().map(f).collect::<Vec<f64>>();
    println!("\n4. {WRITERS} writers x 1 point per UpsertPoints, {write_secs} s, {rounds} rounds alternating:");
    for (name, w) in [
        ("single node", &w_single),
        ("cluster (3 nodes)", &w_cluster),
    ] {
        println!(
            "  {name:<17} {} acks/s, p50 {} ms, p99 {} ms, {} errors",
            spread(&col(w, |r| r.per_s), |x| format!("{x:.0}")),
            spread(&col(w, |r| r.p50), |x| format!("{x:.1}")),
            spread(&col(w, |r| r.p99), |x| format!("{x:.1}")),
            w.iter().map(|r| r.errors).sum::<u64>()
        );
    }
    let (acks_s, acks_c) = (
        median(&col(&w_single, |r| r.per_s)),
        median(&col(&w_cluster, |r| r.per_s)),
    );
    let (p50_s, p50_c) = (
        median(&col(&w_single, |r| r.p50)),
        median(&col(&w_cluster, |r| r.p50)),
    );
    let (p99_s, p99_c) = (
        median(&col(&w_single, |r| r.p99)),
        median(&col(&w_cluster, |r| r.p99)),
    );
    println!(
        "  cluster / single: acks/s {}, p50 {}, p99 {}",
        ratio(acks_c, acks_s),
        ratio(p50_c, p50_s),
        ratio(p99_c, p99_s)
    );

    // 5. rollout, alternating
    let (mut a_single, mut a_cluster) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let ef_c = if r % 2 == 0 { 100 } else { 200 };
        let profile = format!("p{r}");
        a_single.push(activate(single.addr, &profile, ef_c).await?);
        a_cluster.push(activate(cluster_addrs[0], &profile, ef_c).await?);
    }
    let total_points = counts(&mut c1).await?.0;
    println!("\n5. ActivateProfile ({total_points} points, ef_construction 100/200 in turn), {rounds} rounds alternating:");
    println!("  single node (one rebuild): {}", spread(&a_single, secs));
    println!(
        "  cluster, until all 3 nodes serve it: {}  {} the single node",
        spread(&a_cluster, secs),
        ratio(median(&a_cluster), median(&a_single))
    );

    // 6. a wiped node
    let n3 = nodes.pop().ok_or("no node 3")?;
    let (id, dir) = (n3.id.clone(), n3.dir.clone());
    n3.server.stop().await?;
    std::fs::remove_dir_all(&dir)?;
    let t0 = Instant::now();
    let (n3, serving) = Node::start(&engines, &id, &dir).await?;
    let caught_up = wait_caught_up(n3.server.addr, total_points, true, t0).await?;
    let mut n3 = n3;
    // Which way it caught up (docs/cluster.md): a copy from a peer, or the stream replayed.
    let path = if n3
        .server
        .proc
        .log()
        .contains("caught the index up from a peer")
    {
        "copied from a peer"
    } else {
        "replayed the stream"
    };
    println!("\n6. node 3 wiped and restarted: SERVING after {}, the index with all {total_points} points linked after {} ({path}; {} the single node's import of {n} until linked, scaled to {total_points} points)",
        secs(serving),
        secs(caught_up),
        ratio(caught_up, linked_single * total_points as f64 / n as f64)
    );
    nodes.push(n3);

    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-cluster.json");
    std::fs::write(
        &path,
        serde_json::to_vec_pretty(&json!({
            "points": n, "engines": members, "cores": cores,
            "import": {"single_s": import_single, "single_linked_s": linked_single, "cluster_ack_s": import_cluster, "cluster_all_applied_s": all_applied},
            "ef": ef, "recall": {"single": single_recall, "nodes": node_recalls},
            "qps": setups.iter().zip(&qps_runs).map(|((name, _), v)| json!({"setup": name, "runs": v})).collect::<Vec<_>>(),
            "writers": {"single": w_single.iter().map(|r| json!([r.per_s, r.p50, r.p99, r.errors])).collect::<Vec<_>>(),
                        "cluster": w_cluster.iter().map(|r| json!([r.per_s, r.p50, r.p99, r.errors])).collect::<Vec<_>>()},
            "activate": {"single_s": a_single, "cluster_s": a_cluster},
            "catch_up": {"points": total_points, "serving_s": serving, "caught_up_s": caught_up, "path": path},
        }))?,
    )?;
    println!("results: {}", path.display());
    for node in nodes {
        node.server.stop().await?;
    }
    single.stop().await?;
    Ok(())
}
