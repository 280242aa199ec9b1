//! Crash safety with the real binary: SIGKILL at seeded moments while several clients write
//! (every acknowledged batch survives, an unacknowledged one is all or nothing, promotions and
//! the trial journal are intact), a kill in the middle of ActivateProfile (the previous
//! generations stay active on every index), and startup on a data dir that is not usable (a
//! clear error naming the path and a non-zero exit, never a panic, never an empty start).

use crate::common;
use crate::common::child;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use child::{channel, path_str, start, Vectord, DEADLINE};
use common::{create_index, points, Gen};
use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;
use vectord::pb;
use vectord::pb::autotune_service_client::AutotuneServiceClient;
use vectord::pb::index_service_client::IndexServiceClient;
use vectord::pb::promotion_service_client::PromotionServiceClient;

/// Runs `vectord serve` on `dir`, expecting it to refuse to start: a non-zero exit, a message
/// naming the data dir that contains `expect`, and no panic. Returns stderr.
async fn refused(what: &'static str, dir: &Path, expect: &str) -> String {
    let mut s = Vectord::spawn(
        what,
        &["--addr", "127.0.0.1:0", "--data-dir", path_str(dir)],
        &[],
    );
    let status = s.wait_exit().await;
    let log = s.log();
    assert!(
        !status.success(),
        "{what}: must not start, got {status}; stderr:\n{log}"
    );
    assert!(
        !log.contains("panicked"),
        "{what}: panicked; stderr:\n{log}"
    );
    assert!(
        !log.contains("vectord is serving"),
        "{what}: started; stderr:\n{log}"
    );
    let named = log.lines().any(|l| {
        l.contains("vectord:") && l.contains(&dir.display().to_string()) && l.contains(expect)
    });
    assert!(
        named,
        "{what}: the error must name {} and say {expect:?}; stderr:\n{log}",
        dir.display()
    );
    log
}

const DIM: usize = 16;
const BATCH: u64 = 25;
const WRITERS: usize = 4;
const CYCLES: usize = 4;

/// Batch `k`: ids k*BATCH.., vectors seeded by k.
fn batch(k: u64) -> Vec<pb::Point> {
    points(&mut Gen::new(1000 + k), k * BATCH..(k + 1) * BATCH, DIM)
}

#[derive(Default)]
struct Ledger {
    acked: Vec<u64>,
    unacked: Vec<u64>,
}

/// Checks the state a restarted server must show: every acked batch counted and found first
/// by its exact vectors; each unacked batch whole or absent; the promotion and the journal as
/// acknowledged. Returns the batches of unacked ones that turned out stored.
async fn verify(
    addr: SocketAddr,
    ledger: &Ledger,
    trials: &[u64],
    promoted: Option<u64>,
) -> Vec<u64> {
    let ch = channel(addr).await;
    let mut c = IndexServiceClient::new(ch.clone()).max_decoding_message_size(usize::MAX);
    let mut stored_unacked = Vec::new();
    for &k in &ledger.unacked {
        let mut present = 0;
        for p in batch(k) {
            match c
                .get_point(pb::GetPointRequest {
                    index_name: "w".into(),
                    id: p.id,
                })
                .await
            {
                Ok(r) => {
                    assert_eq!(r.into_inner().point.expect("point").vector, p.vector);
                    present += 1;
                }
                Err(e) => assert_eq!(e.code(), tonic::Code::NotFound, "{}", e.message()),
            }
        }
        assert!(
            present == 0 || present == BATCH,
            "unacknowledged batch {k} is half visible: {present} of {BATCH} points"
        );
        if present == BATCH {
            stored_unacked.push(k);
        }
    }
    let count = c
        .get_index(pb::GetIndexRequest { name: "w".into() })
        .await
        .expect("get index")
        .into_inner()
        .index
        .expect("index")
        .point_count;
    let expected = (ledger.acked.len() + stored_unacked.len()) as u64 * BATCH;
    assert_eq!(count, expected, "point count after restart");
    let acked: Vec<pb::Point> = ledger.acked.iter().flat_map(|&k| batch(k)).collect();
    for chunk in acked.chunks(500) {
        let r = c
            .search_batch(pb::SearchBatchRequest {
                index_name: "w".into(),
                queries: chunk
                    .iter()
                    .map(|p| pb::QueryVector {
                        vector: p.vector.clone(),
                    })
                    .collect(),
                k: 1,
                ef_search: Some(200),
                ..Default::default()
            })
            .await
            .expect("search batch")
            .into_inner();
        for (p, res) in chunk.iter().zip(&r.results) {
            assert_eq!(
                res.neighbors.first().map(|n| n.id),
                Some(p.id),
                "acknowledged point {} is not found first by its own vector",
                p.id
            );
        }
    }
    let journal: BTreeSet<u64> = AutotuneServiceClient::new(ch.clone())
        .list_trials(pb::ListTrialsRequest {
            index_name: "w".into(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("list trials")
        .into_inner()
        .trials
        .into_iter()
        .map(|t| t.id)
        .collect();
    for id in trials {
        assert!(
            journal.contains(id),
            "acknowledged trial {id} is missing from the journal"
        );
    }
    let current = PromotionServiceClient::new(ch)
        .get_promoted(pb::GetPromotedRequest {
            index_name: "w".into(),
        })
        .await
        .expect("get promoted")
        .into_inner()
        .current
        .map(|p| p.trial_id);
    assert_eq!(current, promoted, "the promoted trial after restart");
    stored_unacked
}

#[tokio::test]
async fn sigkill_at_seeded_moments_loses_no_acknowledged_write() {
    let seed: u64 = std::env::var("VECTORD_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261125);
    println!("crash loop seed {seed} (set VECTORD_CRASH_SEED to replay another)");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();

    let (mut s, mut addr) = start("server", dir).await;
    {
        let ch = channel(addr).await;
        let mut c = IndexServiceClient::new(ch.clone());
        create_index(&mut c, "w", DIM as u32, pb::Metric::L2).await;
        common::upsert(&mut c, "w", batch(0)).await;
        AutotuneServiceClient::new(ch)
            .create_harness(common::harness_request("w", "h", 10, 20, Some(1)))
            .await
            .expect("harness");
    }
    let ledger = Arc::new(Mutex::new(Ledger {
        acked: vec![0],
        unacked: vec![],
    }));
    let next_batch = Arc::new(AtomicU64::new(1));
    let mut trials: Vec<u64> = Vec::new();
    let mut promoted: Option<u64>;
    let mut stored_unacked_total = 0;

    for cycle in 0..CYCLES {
        // A trial and a promotion per cycle, both acknowledged before the writers start.
        let ch = channel(addr).await;
        let trial = AutotuneServiceClient::new(ch.clone())
            .run_trial(pb::RunTrialRequest {
                index_name: "w".into(),
                harness: "h".into(),
                config: Some(pb::HnswConfig {
                    m: 8,
                    ef_construction: 40,
                    ef_search: 40,
                    seed: Some(cycle as u64),
                }),
            })
            .await
            .expect("run trial")
            .into_inner()
            .trial
            .expect("trial");
        if let Some(&last) = trials.last() {
            assert!(
                trial.id > last,
                "trial ids keep increasing: {} after {last}",
                trial.id
            );
        }
        trials.push(trial.id);
        PromotionServiceClient::new(ch.clone())
            .promote(pb::PromoteRequest {
                index_name: "w".into(),
                trial_id: trial.id,
                promoted_by: "crash-test".into(),
                note: format!("cycle {cycle}"),
            })
            .await
            .expect("promote");
        promoted = Some(trial.id);

        // Writers upsert batches until the server dies; the kill comes after a seeded number
        // of acknowledged batches plus a seeded delay.
        let kill_after = rng.gen_range(8..40u64);
        let kill_delay = Duration::from_millis(rng.gen_range(0..40));
        let (acks_tx, mut acks_rx) = tokio::sync::watch::channel(0u64);
        let acks_tx = Arc::new(acks_tx);
        let mut writers = Vec::new();
        for _ in 0..WRITERS {
            let mut c = IndexServiceClient::new(ch.clone());
            let (ledger, next_batch, acks_tx) =
                (ledger.clone(), next_batch.clone(), acks_tx.clone());
            writers.push(tokio::spawn(async move {
                loop {
                    let k = next_batch.fetch_add(1, Ordering::SeqCst);
                    let r = c
                        .upsert_points(pb::UpsertPointsRequest {
                            index_name: "w".into(),
                            points: batch(k),
                            ..Default::default()
                        })
                        .await;
                    match r {
                        Ok(_) => {
                            ledger.lock().acked.push(k);
                            acks_tx.send_modify(|n| *n += 1);
                        }
                        Err(_) => {
                            ledger.lock().unacked.push(k);
                            return;
                        }
                    }
                }
            }));
        }
        tokio::time::timeout(DEADLINE, acks_rx.wait_for(|n| *n >= kill_after))
            .await
            .expect("writers acknowledged in time")
            .expect("acks channel");
        tokio::time::sleep(kill_delay).await;
        s.signal("KILL");
        let status = s.wait_exit().await;
        assert!(!status.success(), "killed, so no clean exit: {status}");
        for w in writers {
            tokio::time::timeout(DEADLINE, w)
                .await
                .expect("writers stop once the server is gone")
                .expect("writer task");
        }
        println!(
            "cycle {cycle}: killed after {} acknowledged batches (+{kill_delay:?})",
            *acks_rx.borrow()
        );

        (s, addr) = start("restarted", dir).await;
        let snapshot = {
            let l = ledger.lock();
            Ledger {
                acked: l.acked.clone(),
                unacked: l.unacked.clone(),
            }
        };
        let stored = verify(addr, &snapshot, &trials, promoted).await;
        stored_unacked_total += stored.len();
        // From here on the unacked batches that were stored count as acknowledged facts.
        let mut l = ledger.lock();
        l.unacked.retain(|k| !stored.contains(k));
        l.acked.extend(stored);
        // Absent ones were never written; their ids are not reused, so drop them.
        l.unacked.clear();
    }
    let acked = ledger.lock().acked.len();
    println!(
        "{CYCLES} kills: {acked} batches ({} points) present, {stored_unacked_total} unacknowledged batches found whole, none half",
        acked as u64 * BATCH
    );
    s.signal("TERM");
    assert!(s.wait_exit().await.success());
}

#[tokio::test]
async fn a_kill_during_activate_profile_leaves_every_index_on_its_previous_generation() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let (mut s, addr) = start("server", dir).await;
    let ch = channel(addr).await;
    let mut c = IndexServiceClient::new(ch.clone());
    // "a" builds fast and first; "b" builds slowly, so the kill lands while "a" is done.
    create_index(&mut c, "a", 8, pb::Metric::L2).await;
    create_index(&mut c, "b", 32, pb::Metric::L2).await;
    common::upsert(&mut c, "a", points(&mut Gen::new(1), 0..200, 8)).await;
    let b_points = points(&mut Gen::new(2), 0..3000, 32);
    common::upsert(&mut c, "b", b_points.clone()).await;
    let before = |c: &mut IndexServiceClient<Channel>, name: &'static str| {
        let mut c = c.clone();
        async move {
            c.get_index(pb::GetIndexRequest { name: name.into() })
                .await
                .expect("get index")
                .into_inner()
                .index
                .expect("index")
                .active_generation
                .expect("generation")
        }
    };
    let (a0, b0) = (before(&mut c, "a").await, before(&mut c, "b").await);
    let slow = pb::HnswConfig {
        m: 48,
        ef_construction: 400,
        ef_search: 100,
        seed: Some(7),
    };
    c.put_profile(pb::PutProfileRequest {
        profile: Some(pb::Profile {
            name: "big".into(),
            indexes: ["a", "b"]
                .iter()
                .map(|n| pb::ProfileIndex {
                    index_name: n.to_string(),
                    default_config: Some(slow),
                })
                .collect(),
        }),
    })
    .await
    .expect("put profile");
    let mut activator = c.clone();
    let activation = tokio::spawn(async move {
        activator
            .activate_profile(pb::ActivateProfileRequest { name: "big".into() })
            .await
    });
    // Kill while "b" is being built: "a" is already built by then.
    s.wait_line("the build of b", |l| l.contains("building HNSW index=b"))
        .await;
    s.signal("KILL");
    assert!(!s.wait_exit().await.success());
    let r = activation.await.expect("activation task");
    assert!(r.is_err(), "the activation cannot have been acknowledged");

    let (mut s, addr) = start("restarted", dir).await;
    let mut c = IndexServiceClient::new(channel(addr).await);
    for (name, was) in [("a", a0), ("b", b0)] {
        let now = before(&mut c, name).await;
        assert_eq!(
            now.config, was.config,
            "index {name}: the previous config is active"
        );
        assert_eq!(
            now.number, was.number,
            "index {name}: the previous generation"
        );
        assert_eq!(
            now.profile, was.profile,
            "index {name}: no profile half-activated"
        );
    }
    for p in b_points.iter().step_by(301) {
        let r = common::search(&mut c, "b", p.vector.clone(), 1, None).await;
        assert_eq!(r.neighbors[0].id, p.id);
    }
    s.signal("TERM");
    assert!(s.wait_exit().await.success());
}

#[tokio::test]
async fn startup_on_an_unusable_data_dir_fails_clearly_and_never_panics() {
    // A file where the data dir should be.
    let tmp = tempfile::tempdir().expect("temp dir");
    let file = tmp.path().join("not-a-dir");
    std::fs::write(&file, b"hello").expect("write file");
    refused("file as data dir", &file, "").await;

    // A store of a newer format version.
    let newer = tmp.path().join("newer");
    {
        let (mut s, _) = start("server", &newer).await;
        s.signal("TERM");
        assert!(s.wait_exit().await.success());
        let db = sled::open(&newer).expect("open the store with sled");
        db.open_tree("meta")
            .expect("meta tree")
            .insert("format_version", &2u32.to_be_bytes())
            .expect("write version");
        db.flush().expect("flush");
    }
    refused("newer format", &newer, "format version 2").await;

    // A store whose files are garbage.
    let garbage = tmp.path().join("garbage");
    {
        let (mut s, addr) = start("server", &garbage).await;
        let mut c = IndexServiceClient::new(channel(addr).await);
        create_index(&mut c, "g", 4, pb::Metric::L2).await;
        s.signal("TERM");
        assert!(s.wait_exit().await.success());
        let mut g = Gen::new(9);
        for entry in walk(&garbage) {
            let len = std::fs::metadata(&entry).expect("metadata").len().max(64);
            let junk: Vec<u8> = (0..len).map(|_| g.next_u64() as u8).collect();
            std::fs::write(&entry, junk).expect("overwrite");
        }
    }
    refused("garbage store", &garbage, "").await;

    // An unreadable data dir (root reads everything, so this case needs another user).
    let locked = tmp.path().join("locked");
    std::fs::create_dir(&locked).expect("mkdir");
    let is_root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if is_root {
        println!(
            "running as root: the unreadable-permissions case is skipped (root bypasses them)"
        );
    } else {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).expect("chmod");
        refused("unreadable dir", &locked, "").await;
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("read dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
