use super::replica::CopyFile;
use super::*;

fn p(id: u64, x: f32) -> Point {
    Point {
        id,
        vector: vec![x, 0.0],
    }
}

/// Generation 1 of the default config.
pub(super) fn first_meta() -> GenerationMeta {
    GenerationMeta {
        number: 1,
        config: HnswConfig::default(),
        source: ConfigSource::Default,
        point_count: 0,
        build_millis: 0,
        activate_time_ms: 0,
        profile: String::new(),
        trial_id: 0,
    }
}

/// A peer's snapshot with the writes since applied from the copy holds the copy's points
/// (each found by its own vector, a deleted one nowhere); one of another config, or whose
/// count disagrees with the copy, is refused.
#[test]
fn a_peer_graph_with_the_writes_since_is_the_copy_graph() {
    let dir = tempfile::tempdir().unwrap();
    let meta = first_meta();
    let mem = &EngineMemory::IN_RAM;
    for kind in [EngineKind::DEFAULT, EngineKind::HnswRs] {
        let before: Vec<Point> = (0..50).map(|i| p(i, i as f32)).collect();
        let gen =
            Generation::build(kind, mem, Metric::L2, 2, meta.clone(), before, &|| false).unwrap();
        if !gen.can_save() {
            continue;
        }
        let path = dir.path().join(format!("5-1-9-{kind}.snap"));
        gen.save(dir.path(), &format!("5-1-9-{kind}.snap"), 5, 9, None)
            .unwrap();
        // Since the snapshot: 3 deleted, 7 moved, 60 added; 3 and 60 never existed for
        // the other ids.
        let mut copy: Vec<Point> = (0..50)
            .filter(|i| *i != 3)
            .map(|i| p(i, if i == 7 { 700.0 } else { i as f32 }))
            .collect();
        copy.push(p(60, 600.0));
        let graph = PeerGraph {
            path,
            seq: 9,
            source_uid: 5,
            config: meta.config,
            touched: vec![3, 7, 60],
        };
        let got = graph
            .load(kind, mem, (Metric::L2, 2), &meta, &copy)
            .unwrap();
        assert_eq!(got.live_count(), copy.len(), "{kind}");
        for q in &copy {
            let hits = got.search(&q.vector, 1, 32);
            assert_eq!(
                hits.first().map(|h| (h.id, h.distance)),
                Some((q.id, 0.0)),
                "{kind}"
            );
        }
        assert!(got.search(&[3.0, 0.0], 50, 64).iter().all(|h| h.id != 3));
        let other = PeerGraph {
            config: HnswConfig {
                m: 8,
                ..meta.config
            },
            ..graph
        };
        assert!(other
            .load(kind, mem, (Metric::L2, 2), &meta, &copy)
            .is_err());
        let short = PeerGraph {
            touched: vec![7, 60],
            config: meta.config,
            ..other
        };
        let mut fewer = copy.clone();
        fewer.retain(|q| q.id != 10);
        assert!(
            short
                .load(kind, mem, (Metric::L2, 2), &meta, &fewer)
                .is_err(),
            "{kind}: the graph holds a point the copy lacks"
        );
    }
}

/// A replica's copy file reads back what the last attempt wrote (an attempt that raced a
/// write is void), in chunks of at most the size asked, and ends empty.
#[test]
fn a_copy_file_reads_back_the_last_attempt_in_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = |x: f32| [x.to_le_bytes(), 0f32.to_le_bytes()].concat();
    let mut f = CopyFile::create(dir.path()).unwrap();
    for id in 0..5 {
        f.push(id, &bytes(9.0)).unwrap();
    }
    f.restart().unwrap();
    for id in 10..15 {
        f.push(id, &bytes(id as f32)).unwrap();
    }
    let mut r = f.finish(2).unwrap();
    let a = r.next_chunk(3).unwrap();
    let b = r.next_chunk(3).unwrap();
    assert_eq!(a, vec![p(10, 10.0), p(11, 11.0), p(12, 12.0)]);
    assert_eq!(b, vec![p(13, 13.0), p(14, 14.0)]);
    assert!(r.next_chunk(3).unwrap().is_empty());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "the file has no name"
    );
}

/// A group's writes are searchable in arrival order as soon as they are staged (from the
/// fresh segment) and answer the same once the indexer has linked them.
#[test]
fn a_group_reaches_the_graph_in_arrival_order() {
    let meta = first_meta();
    for kind in [EngineKind::DEFAULT, EngineKind::HnswRs] {
        let gen = Generation::empty(kind, &EngineMemory::IN_RAM, Metric::L2, 2, meta.clone());
        gen.upsert(&[p(7, 70.0), p(1, 5.0)]);
        let ops = vec![
            Op::Upsert(vec![p(1, 10.0)]),
            Op::Delete(vec![1]),
            Op::Upsert(vec![p(1, 20.0), p(2, 30.0)]),
            Op::Upsert(vec![p(2, 40.0)]),
            Op::Upsert(vec![p(3, 50.0)]),
            Op::Delete(vec![3, 9]),
        ];
        stage_writes(&gen, &ops);
        gen.mark(6);
        assert_eq!(gen.unlinked(), 5, "{kind}");
        assert_eq!(gen.linked_seq(), 0, "{kind}");
        let check = |linked: bool| {
            assert_eq!(gen.live_count(), 3, "{kind} linked {linked}");
            let first = |x: f32| {
                gen.search(&[x, 0.0], 1, 16)
                    .first()
                    .map(|h| (h.id, h.distance))
            };
            // 1 holds its last vector (20), 2 its last (40); 3 was deleted after its upsert.
            assert_eq!(first(20.0), Some((1, 0.0)), "{kind} linked {linked}");
            assert_eq!(first(40.0), Some((2, 0.0)), "{kind} linked {linked}");
            assert_eq!(first(70.0), Some((7, 0.0)), "{kind} linked {linked}");
            let all = gen.search(&[50.0, 0.0], 10, 16);
            let mut ids: Vec<u64> = all.iter().map(|h| h.id).collect();
            ids.sort_unstable();
            assert_eq!(
                ids,
                vec![1, 2, 7],
                "{kind} linked {linked}: each live id once"
            );
            // Nearest first, with the exact distances.
            assert!(all.windows(2).all(|w| w[0].distance <= w[1].distance));
            assert_eq!(all[0].distance, 10.0, "{kind} linked {linked}");
            assert!(gen
                .search(&[5.0, 0.0], 3, 16)
                .iter()
                .all(|h| h.distance > 0.0));
        };
        check(false);
        while gen.link_pending(2) > 0 {}
        assert_eq!((gen.unlinked(), gen.linked_seq()), (0, 6), "{kind}");
        check(true);
    }
}
