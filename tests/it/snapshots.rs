//! Persisted generations with the real binary: a restart loads the active generation's snapshot
//! instead of rebuilding it (the "recovered index" log line says `from="snapshot"`), answers
//! exactly as before, and replays the writes acknowledged after the snapshot; a truncated,
//! corrupt, foreign-version or missing snapshot falls back to a rebuild with the right data; a
//! SIGKILL while a snapshot is being written loses nothing and serves the previous generation.
//! Background snapshots: at an import's end, once writes stop (`--snapshot-idle-secs`), after a
//! start that replayed many points and at shutdown, so a restart after normal use is a load.

use crate::common;
use crate::common::child;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use child::{path_str, Vectord, DEADLINE};
use common::{create_index, points, versioned, Gen, IdLedger};
use tonic::transport::Channel;
use vectord::pb;
use vectord::pb::index_service_client::IndexServiceClient;

const DIM: usize = 16;

async fn start(what: &'static str, dir: &Path, envs: &[(&str, &Path)]) -> (Vectord, SocketAddr) {
    let mut s = Vectord::spawn(
        what,
        &["--addr", "127.0.0.1:0", "--data-dir", path_str(dir)],
        envs,
    );
    let addr = s.wait_listening().await;
    s.wait_serving(addr).await;
    (s, addr)
}

async fn client(addr: SocketAddr) -> IndexServiceClient<Channel> {
    let ch = tokio::time::timeout(
        DEADLINE,
        Channel::from_shared(format!("http://{addr}"))
            .expect("url")
            .connect(),
    )
    .await
    .expect("connect in time")
    .expect("connect");
    IndexServiceClient::new(ch)
}

async fn stop(mut s: Vectord) -> Vec<String> {
    s.signal("TERM");
    assert!(s.wait_exit().await.success());
    s.seen.clone()
}

/// The `recovered index` line of `index`, waited for.
async fn recovered(s: &mut Vectord, index: &str) -> String {
    let tag = format!("index={index} ");
    s.wait_line("the recovered index line", |l| {
        l.contains("recovered index") && l.contains(&tag)
    })
    .await
}

/// The snapshot files (not temp files) in the data dir.
fn snap_files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir.join("snapshots"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    out.sort();
    out
}

fn tmp_files(dir: &Path) -> Vec<PathBuf> {
    snap_files(dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "tmp"))
        .collect()
}

async fn put_profile(c: &mut IndexServiceClient<Channel>, profile: &str, seed: u64) {
    let config = pb::HnswConfig {
        m: 12,
        ef_construction: 80,
        ef_search: 48,
        seed: Some(seed),
    };
    common::put_profile(c, profile, &[("s", Some(config))]).await;
}

async fn put_and_activate(c: &mut IndexServiceClient<Channel>, profile: &str, seed: u64) {
    put_profile(c, profile, seed).await;
    c.activate_profile(pb::ActivateProfileRequest {
        name: profile.into(),
    })
    .await
    .expect("activate");
}

async fn answers(
    c: &mut IndexServiceClient<Channel>,
    queries: &[Vec<f32>],
) -> Vec<Vec<(u64, f32)>> {
    let mut out = Vec::new();
    for q in queries {
        let r = common::search(c, "s", q.clone(), 10, None).await;
        out.push(r.neighbors.iter().map(|n| (n.id, n.distance)).collect());
    }
    out
}

async fn point_count(c: &mut IndexServiceClient<Channel>) -> (u64, u64) {
    let i = c
        .get_index(pb::GetIndexRequest { name: "s".into() })
        .await
        .expect("get index")
        .into_inner()
        .index
        .expect("index");
    (
        i.point_count,
        i.active_generation.expect("generation").number,
    )
}

/// Every point in `live` is found first by its own vector, and none of `gone` is stored.
/// Starts a server over `dir` that must load index "s" from its snapshot with a replay count
/// `replayed` accepts; its process and a client.
async fn start_loaded(
    what: &'static str,
    dir: &Path,
    envs: &[(&str, &Path)],
    replayed: impl Fn(usize) -> bool,
) -> (Vectord, IndexServiceClient<Channel>) {
    let (mut s, addr) = start(what, dir, envs).await;
    let line = recovered(&mut s, "s").await;
    assert!(
        line.contains("from=\"snapshot\"") && replayed(replayed_of(&line)),
        "{what}: {line}"
    );
    (s, client(addr).await)
}

async fn check_data(c: &mut IndexServiceClient<Channel>, live: &[pb::Point], gone: &[u64]) {
    let (count, _) = point_count(c).await;
    assert_eq!(count, live.len() as u64, "point count");
    for p in live {
        let r = common::search(c, "s", p.vector.clone(), 1, Some(200)).await;
        assert_eq!(
            r.neighbors.first().map(|n| n.id),
            Some(p.id),
            "point {} found first",
            p.id
        );
    }
    for &id in gone {
        let r = c
            .get_point(pb::GetPointRequest {
                index_name: "s".into(),
                id,
            })
            .await;
        assert_eq!(common::code_of(r), tonic::Code::NotFound, "deleted id {id}");
    }
}

/// Upserts `pts` into "s" in batches of 500.
async fn upsert_all(c: &mut IndexServiceClient<Channel>, pts: &[pb::Point]) {
    for chunk in pts.chunks(500) {
        common::upsert(c, "s", chunk.to_vec()).await;
    }
}

#[tokio::test]
async fn restart_loads_the_snapshot_replays_later_writes_and_rebuilds_from_bad_files() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let mut g = Gen::new(21);
    let mut live = points(&mut g, 0..1500, DIM);
    let queries: Vec<Vec<f32>> = (0..25).map(|_| g.vector(DIM)).collect();

    let (s, addr) = start("first", dir, &[]).await;
    let mut c = client(addr).await;
    create_index(&mut c, "s", DIM as u32, pb::Metric::L2).await;
    upsert_all(&mut c, &live).await;
    put_and_activate(&mut c, "p", 5).await;
    let files = snap_files(dir);
    assert_eq!(
        files.len(),
        1,
        "one snapshot for the one generation: {files:?}"
    );
    let before = answers(&mut c, &queries).await;
    let (_, number) = point_count(&mut c).await;
    stop(s).await;

    // 1. A restart loads it: no rebuild, the same neighbours at the same distances.
    let (s, mut c) = start_loaded("loads the snapshot", dir, &no_idle(), |replayed| {
        replayed == 0
    })
    .await;
    assert_eq!(
        answers(&mut c, &queries).await,
        before,
        "the loaded generation answers the same"
    );
    assert_eq!(point_count(&mut c).await, (1500, number));

    // 2. Writes after the snapshot: new points, a replaced point, deleted points.
    let added = points(&mut g, 5000..5080, DIM);
    upsert_all(&mut c, &added).await;
    live.extend(added);
    let moved = pb::Point {
        id: 10,
        vector: vec![9.0; DIM],
    };
    common::upsert(&mut c, "s", vec![moved.clone()]).await;
    live[10] = moved;
    let gone: Vec<u64> = (20..31).collect();
    c.delete_points(pb::DeletePointsRequest {
        index_name: "s".into(),
        ids: gone.clone(),
        ..Default::default()
    })
    .await
    .expect("delete");
    live.retain(|p| !gone.contains(&p.id));
    stop(s).await;

    let (s, mut c) = start_loaded("replays", dir, &no_idle(), |replayed| replayed == 3).await;
    check_data(&mut c, &live, &gone).await;
    assert_eq!(
        snap_files(dir),
        files,
        "no new snapshot: nothing was rebuilt"
    );
    stop(s).await;

    // 3. Damaged or missing files: each logged and rebuilt from the store, with the right data
    // (and the rebuilt generation snapshotted again, for the next start).
    type Damage = fn(&Path);
    let damages: [(&str, Damage); 4] = [
        ("truncated", |p| {
            let b = std::fs::read(p).unwrap();
            std::fs::write(p, &b[..b.len() / 2]).unwrap();
        }),
        ("flipped byte", |p| {
            let mut b = std::fs::read(p).unwrap();
            let at = b.len() * 2 / 3;
            b[at] ^= 0x01;
            std::fs::write(p, &b).unwrap();
        }),
        ("another format version", |p| {
            let mut b = std::fs::read(p).unwrap();
            b[8..12].copy_from_slice(&99u32.to_le_bytes());
            std::fs::write(p, &b).unwrap();
        }),
        ("missing", |p| std::fs::remove_file(p).unwrap()),
    ];
    for (what, damage) in damages {
        let files = snap_files(dir);
        assert_eq!(files.len(), 1, "{what}: {files:?}");
        damage(&files[0]);
        let (mut s, addr) = start("rebuilds", dir, &[]).await;
        let line = recovered(&mut s, "s").await;
        assert!(line.contains("from=\"rebuild\""), "{what}: {line}");
        let log = s.log();
        assert!(
            log.contains("cannot use the generation's snapshot"),
            "{what}: the fallback is logged:\n{log}"
        );
        let mut c = client(addr).await;
        check_data(&mut c, &live, &gone).await;
        assert_eq!(
            point_count(&mut c).await.1,
            number,
            "{what}: same generation"
        );
        stop(s).await;
        let now = snap_files(dir);
        assert_eq!(
            now.len(),
            1,
            "{what}: the rebuild wrote one snapshot: {now:?}"
        );
    }
    // ... which the next start loads.
    let (mut s, _) = start("loads again", dir, &[]).await;
    let line = recovered(&mut s, "s").await;
    assert!(line.contains("from=\"snapshot\""), "{line}");
    stop(s).await;
}

/// A SIGKILL while an activation's snapshot is being written: the temp file is swept, the
/// previous generation is active with its own snapshot, and every acknowledged write is there.
///
/// The kill must land inside the write, which takes milliseconds: the test-only env var
/// `VECTORD_TEST_SNAPSHOT_DELAY_MS` makes the server pause after writing the temp file's bytes
/// and before fsync and rename, and log that it does, so the test kills it exactly there
/// instead of guessing a moment.
#[tokio::test]
async fn sigkill_while_a_snapshot_is_written_loses_nothing() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let mut g = Gen::new(5);
    let mut live = points(&mut g, 0..1200, DIM);

    let (s, addr) = start("first", dir, &no_idle()).await;
    let mut c = client(addr).await;
    create_index(&mut c, "s", DIM as u32, pb::Metric::L2).await;
    upsert_all(&mut c, &live).await;
    put_and_activate(&mut c, "p", 1).await;
    let (_, number) = point_count(&mut c).await;
    let first = snap_files(dir);
    assert_eq!(first.len(), 1);
    // Acknowledged after the snapshot.
    let later = points(&mut g, 7000..7100, DIM);
    upsert_all(&mut c, &later).await;
    live.extend(later);
    stop(s).await;

    let delay = Path::new("600000");
    let (mut s, addr) = start("paused", dir, &[("VECTORD_TEST_SNAPSHOT_DELAY_MS", delay)]).await;
    let mut c = client(addr).await;
    put_profile(&mut c, "q", 2).await;
    let activation = tokio::spawn(async move {
        c.activate_profile(pb::ActivateProfileRequest { name: "q".into() })
            .await
    });
    s.wait_line("the snapshot pause", |l| l.contains("pausing mid-snapshot"))
        .await;
    assert_eq!(tmp_files(dir).len(), 1, "a temp file is being written");
    s.signal("KILL");
    assert!(!s.wait_exit().await.success());
    let r = activation.await.expect("activation task");
    assert!(r.is_err(), "the activation was not acknowledged");

    let (s, mut c) = start_loaded("after the kill", dir, &[], |replayed| replayed == 1).await;
    check_data(&mut c, &live, &[]).await;
    assert_eq!(
        point_count(&mut c).await.1,
        number,
        "the previous generation"
    );
    assert!(tmp_files(dir).is_empty(), "the temp file was swept");
    assert_eq!(snap_files(dir), first);
    // Deleting the index removes its snapshots.
    c.delete_index(pb::DeleteIndexRequest { name: "s".into() })
        .await
        .expect("delete index");
    assert!(snap_files(dir).is_empty(), "{:?}", snap_files(dir));
    stop(s).await;
}

/// An index filled by upserts alone (never activated) is snapshotted in the background once
/// the points changed since its last snapshot pass a share of it, so a restart replays only
/// the writes after that, not the whole index.
#[tokio::test]
async fn a_growing_index_is_snapshotted_in_the_background() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let mut g = Gen::new(8);
    let live = points(&mut g, 0..12_000, 8);

    let (mut s, addr) = start("first", dir, &[]).await;
    let mut c = client(addr).await;
    create_index(&mut c, "s", 8, pb::Metric::L2).await;
    for chunk in live[..10_000].chunks(1000) {
        common::upsert(&mut c, "s", chunk.to_vec()).await;
    }
    s.wait_line("the background snapshot", |l| {
        l.contains("snapshotted the active generation in the background")
    })
    .await;
    for chunk in live[10_000..].chunks(1000) {
        common::upsert(&mut c, "s", chunk.to_vec()).await;
    }
    stop(s).await;

    let (mut s, addr) = start("restarted", dir, &[]).await;
    let line = recovered(&mut s, "s").await;
    assert!(line.contains("from=\"snapshot\""), "{line}");
    let replayed: usize = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("replayed="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no replayed= in {line}"));
    assert!(
        replayed <= 2,
        "only the writes after the snapshot are replayed: {line}"
    );
    let mut c = client(addr).await;
    let (count, number) = point_count(&mut c).await;
    assert_eq!((count, number), (12_000, 1));
    for p in live.iter().step_by(97) {
        let r = common::search(&mut c, "s", p.vector.clone(), 1, Some(200)).await;
        assert_eq!(
            r.neighbors.first().map(|n| n.id),
            Some(p.id),
            "point {}",
            p.id
        );
    }
    stop(s).await;
}

/// Imports `pts` into "s" through one ImportPoints stream (500 points a message).
async fn import_all(c: &mut IndexServiceClient<Channel>, pts: &[pb::Point]) {
    let msgs: Vec<pb::ImportPointsRequest> = pts
        .chunks(500)
        .enumerate()
        .map(|(i, chunk)| pb::ImportPointsRequest {
            index_name: if i == 0 { "s".into() } else { String::new() },
            points: chunk.to_vec(),
            ..Default::default()
        })
        .collect();
    let r = c
        .import_points(tokio_stream::iter(msgs))
        .await
        .expect("import")
        .into_inner();
    assert_eq!(r.upserted_count, pts.len() as u64);
}

/// The `replayed=` of a `recovered index` line.
fn replayed_of(line: &str) -> usize {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("replayed="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no replayed= in {line}"))
}

/// Waits for the background snapshot logged with `why`.
async fn snapshotted(s: &mut Vectord, why: &str) -> String {
    let tag = format!("why=\"{why}\"");
    s.wait_line(&format!("a background snapshot ({why})"), |l| {
        l.contains("snapshotted the active generation in the background") && l.contains(&tag)
    })
    .await
}

/// The idle rule off, so that only the rules under test snapshot.
fn no_idle() -> [(&'static str, &'static Path); 1] {
    [("VECTORD_SNAPSHOT_IDLE_SECS", Path::new("0"))]
}

/// An index filled through ImportPoints (never activated, far below the 25% rule's 10,000
/// points) is snapshotted when the import ends, so a restart loads it with nothing to replay;
/// writes after that snapshot are replayed; a start that replayed many points snapshots the
/// index right after it, and a shutdown with many points changed since the snapshot writes
/// one before the process exits.
#[tokio::test]
async fn an_import_is_snapshotted_when_it_ends_and_a_restart_loads_it() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let mut g = Gen::new(31);
    let mut live = points(&mut g, 0..3000, DIM);

    let (mut s, addr) = start("first", dir, &no_idle()).await;
    let mut c = client(addr).await;
    create_index(&mut c, "s", DIM as u32, pb::Metric::L2).await;
    import_all(&mut c, &live).await;
    let line = snapshotted(&mut s, "an import ended").await;
    assert!(line.contains("points=3000"), "{line}");
    stop(s).await;

    // 1. Loaded, nothing replayed, every point there.
    let (s, mut c) = start_loaded("after the import", dir, &no_idle(), |replayed| {
        replayed == 0
    })
    .await;
    check_data(&mut c, &live, &[]).await;

    // 2. Writes after the import's snapshot (fewer than the shutdown rule's 1,000 points):
    // replayed at the next start, with the right data.
    let added = points(&mut g, 9000..9100, DIM);
    upsert_all(&mut c, &added).await;
    live.extend(added);
    let gone: Vec<u64> = (100..110).collect();
    c.delete_points(pb::DeletePointsRequest {
        index_name: "s".into(),
        ids: gone.clone(),
        ..Default::default()
    })
    .await
    .expect("delete");
    live.retain(|p| !gone.contains(&p.id));
    let files = snap_files(dir);
    stop(s).await;
    assert_eq!(
        snap_files(dir),
        files,
        "no snapshot at shutdown for 110 points"
    );

    let (mut s, mut c) = start_loaded("replays", dir, &no_idle(), |replayed| replayed >= 1).await;
    check_data(&mut c, &live, &gone).await;

    // 3. 1,500 more points, then a crash (no shutdown snapshot): the start replays them and
    // snapshots right after it, so the start after that replays nothing.
    let more = points(&mut g, 20_000..21_500, DIM);
    upsert_all(&mut c, &more).await;
    live.extend(more);
    s.signal("KILL");
    assert!(!s.wait_exit().await.success());
    let (mut s, addr) = start("replays many", dir, &no_idle()).await;
    let line = recovered(&mut s, "s").await;
    assert!(
        line.contains("from=\"snapshot\"") && replayed_of(&line) >= 1,
        "{line}"
    );
    snapshotted(&mut s, "the start replayed many writes").await;
    let mut c = client(addr).await;
    check_data(&mut c, &live, &gone).await;
    s.signal("KILL");
    assert!(!s.wait_exit().await.success());
    let (mut s, addr) = start("after the start's snapshot", dir, &no_idle()).await;
    let line = recovered(&mut s, "s").await;
    assert!(line.contains("replayed=0"), "{line}");

    // 4. 1,200 more points, then a graceful stop: snapshotted before the process exits.
    let mut c = client(addr).await;
    let last = points(&mut g, 30_000..31_200, DIM);
    upsert_all(&mut c, &last).await;
    live.extend(last);
    s.signal("TERM");
    snapshotted(&mut s, "the server is stopping").await;
    assert!(s.wait_exit().await.success());
    let (mut s, addr) = start("after the shutdown's snapshot", dir, &no_idle()).await;
    let line = recovered(&mut s, "s").await;
    assert!(line.contains("replayed=0"), "{line}");
    let mut c = client(addr).await;
    check_data(&mut c, &live, &gone).await;
    stop(s).await;
}

/// Writes that stop: once no write has come for `--snapshot-idle-secs`, the index is
/// snapshotted (a few upserts, far below every other rule's threshold).
#[tokio::test]
async fn an_index_whose_writes_stopped_is_snapshotted() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let mut g = Gen::new(32);
    let live = points(&mut g, 0..40, DIM);
    let idle = [("VECTORD_SNAPSHOT_IDLE_SECS", Path::new("1"))];
    let (mut s, addr) = start("first", dir, &idle).await;
    let mut c = client(addr).await;
    create_index(&mut c, "s", DIM as u32, pb::Metric::L2).await;
    common::upsert(&mut c, "s", live.clone()).await;
    let line = snapshotted(&mut s, "writes stopped").await;
    assert!(line.contains("points=40"), "{line}");
    s.signal("KILL");
    assert!(!s.wait_exit().await.success());
    let (s, mut c) = start_loaded("restarted", dir, &idle, |replayed| replayed == 0).await;
    check_data(&mut c, &live, &[]).await;
    stop(s).await;
}

/// A SIGKILL while the snapshot an import's end started is being written: the temp file is
/// swept, the previous snapshot is loaded with the import replayed, and every imported point
/// is there.
#[tokio::test]
async fn sigkill_during_an_imports_snapshot_loses_nothing() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let mut g = Gen::new(33);
    let mut live = points(&mut g, 0..1000, DIM);

    let (mut s, addr) = start("first", dir, &no_idle()).await;
    let mut c = client(addr).await;
    create_index(&mut c, "s", DIM as u32, pb::Metric::L2).await;
    import_all(&mut c, &live).await;
    snapshotted(&mut s, "an import ended").await;
    stop(s).await;
    let first = snap_files(dir);
    assert_eq!(first.len(), 1, "{first:?}");

    let delay = [
        ("VECTORD_SNAPSHOT_IDLE_SECS", Path::new("0")),
        ("VECTORD_TEST_SNAPSHOT_DELAY_MS", Path::new("600000")),
    ];
    let (mut s, addr) = start("paused", dir, &delay).await;
    let mut c = client(addr).await;
    let second = points(&mut g, 5000..6500, DIM);
    import_all(&mut c, &second).await; // acknowledged
    live.extend(second);
    s.wait_line("the snapshot pause", |l| l.contains("pausing mid-snapshot"))
        .await;
    assert_eq!(tmp_files(dir).len(), 1, "a temp file is being written");
    s.signal("KILL");
    assert!(!s.wait_exit().await.success());

    let (s, mut c) =
        start_loaded("after the kill", dir, &no_idle(), |replayed| replayed >= 1).await;
    check_data(&mut c, &live, &[]).await;
    assert!(tmp_files(dir).is_empty(), "the temp file was swept");
    stop(s).await;
}

/// Background snapshots copy the graph while writes go on (a write waits only for the copy of
/// the id map): replacements and deletes of linked points keep coming while the quarter rule
/// snapshots the index twice, then SIGKILL mid-write. The restart loads the last snapshot and
/// replays the writes after it: every id holds what its last acknowledged write left (or the
/// write in flight), no deleted point is back, and each stored point is found first.
/// Compaction is off, so that the tombstones these writes leave call for no rebuild (which
/// would write its own snapshot) and the background snapshot is what runs under them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacements_and_deletes_during_background_snapshots_survive_a_kill() {
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    const IDS: u64 = 4_000;
    const WRITERS: u64 = 4;
    const PER_CALL: usize = 50;
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let envs = [
        ("VECTORD_SNAPSHOT_IDLE_SECS", Path::new("0")),
        ("VECTORD_COMPACT_DELETED_FRACTION", Path::new("0")),
    ];
    let (mut s, addr) = start("first", dir, &envs).await;
    let mut c = client(addr).await;
    create_index(&mut c, "s", DIM as u32, pb::Metric::L2).await;
    let first: Vec<pb::Point> = (0..IDS)
        .map(|id| pb::Point {
            id,
            vector: versioned(id, 0, DIM),
        })
        .collect();
    upsert_all(&mut c, &first).await;
    let ledger: Arc<parking_lot::Mutex<BTreeMap<u64, IdLedger>>> = Arc::new(
        (0..IDS)
            .map(|id| {
                let w = IdLedger {
                    acked: Some(Some(0)),
                    in_flight: None,
                };
                (id, w)
            })
            .collect::<BTreeMap<_, _>>()
            .into(),
    );
    let stopping = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (mut c, ledger, stopping) = (client(addr).await, ledger.clone(), stopping.clone());
        writers.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(w);
            let owned: Vec<u64> = (0..IDS).filter(|id| id % WRITERS == w).collect();
            for n in 1u64.. {
                if stopping.load(Ordering::Acquire) {
                    return;
                }
                // Versions stay exact in an f32 (< 2^24).
                let version = w * 1_000_000 + n;
                let ids: Vec<u64> = (0..PER_CALL)
                    .map(|_| owned[rng.gen_range(0..owned.len())])
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect();
                let op = rng.gen_bool(0.8).then_some(version);
                {
                    let mut l = ledger.lock();
                    for id in &ids {
                        l.entry(*id).or_default().in_flight = Some(op);
                    }
                }
                let r = match op {
                    Some(v) => {
                        let points = ids
                            .iter()
                            .map(|&id| pb::Point {
                                id,
                                vector: versioned(id, v, DIM),
                            })
                            .collect();
                        c.upsert_points(pb::UpsertPointsRequest {
                            index_name: "s".into(),
                            points,
                            ..Default::default()
                        })
                        .await
                        .map(|_| ())
                    }
                    None => c
                        .delete_points(pb::DeletePointsRequest {
                            index_name: "s".into(),
                            ids: ids.clone(),
                            ..Default::default()
                        })
                        .await
                        .map(|_| ()),
                };
                if r.is_err() {
                    return; // the server is gone: the in-flight write may or may not be stored
                }
                let mut l = ledger.lock();
                for id in &ids {
                    let e = l.entry(*id).or_default();
                    e.acked = Some(op);
                    e.in_flight = None;
                }
            }
        }));
    }
    // Two snapshots by the quarter rule while the writers run, then a kill mid-write.
    let is_quarter = |l: &str| {
        l.contains("snapshotted the active generation in the background")
            && l.contains("why=\"a quarter of the index changed\"")
    };
    for _ in 0..2 {
        let before: Vec<String> = s.seen.iter().filter(|l| is_quarter(l)).cloned().collect();
        s.wait_line("a background snapshot while writes go on", |l| {
            is_quarter(l) && !before.iter().any(|b| b == l)
        })
        .await;
    }
    s.signal("KILL");
    assert!(!s.wait_exit().await.success());
    stopping.store(true, Ordering::Release);
    for w in writers {
        tokio::time::timeout(DEADLINE, w)
            .await
            .expect("the writers stop once the server is gone")
            .expect("writer");
    }

    let (s, mut c) = start_loaded("after the kill", dir, &envs, |replayed| replayed >= 1).await;
    let ledger = ledger.lock().clone();
    let mut live = 0u64;
    for (&id, w) in &ledger {
        let got = common::stored(&mut c, "s", id).await;
        let state = got.as_ref().map(|v| v[1] as u64);
        let acked = w.acked.expect("every id was written");
        assert!(
            w.allows(state),
            "id {id}: stored {state:?}, acknowledged {acked:?}, in flight {:?}",
            w.in_flight
        );
        if let Some(v) = got {
            assert_eq!(
                v,
                versioned(id, v[1] as u64, DIM),
                "id {id}: the vector of its write"
            );
            live += 1;
            if id % 16 == 0 {
                let r = common::search(&mut c, "s", v, 1, Some(200)).await;
                assert_eq!(
                    r.neighbors.first().map(|n| n.id),
                    Some(id),
                    "id {id} found first"
                );
            }
        }
    }
    let (count, _) = point_count(&mut c).await;
    assert_eq!(count, live, "the point count is the stored points'");
    stop(s).await;
}
