//! Measurements for docs/scale.md (ignored: run by hand with
//! `cargo test --test scale_measure -- --ignored --nocapture`). They print figures and assert
//! nothing about time: timed assertions belong in benchmarks.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use vectord::index::engine::{EngineKind, EngineMemory};
use vectord::index::Generation;
use vectord::model::{ConfigSource, GenerationMeta, HnswConfig, Metric, Point};

const DIM: usize = 64;

fn meta() -> GenerationMeta {
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

fn clustered(rng: &mut rand_chacha::ChaCha8Rng, ids: std::ops::Range<u64>) -> Vec<Point> {
    let centres: Vec<Vec<f32>> = (0..50)
        .map(|_| (0..DIM).map(|_| rng.gen_range(-1.0f32..1.0)).collect())
        .collect();
    ids.map(|id| {
        let c = &centres[rng.gen_range(0..centres.len())];
        Point {
            id,
            vector: c.iter().map(|x| x + rng.gen_range(-0.1f32..0.1)).collect(),
        }
    })
    .collect()
}

fn p50(g: &Generation, queries: &[Vec<f32>]) -> f64 {
    let mut t: Vec<f64> = queries
        .iter()
        .map(|q| {
            let s = Instant::now();
            std::hint::black_box(g.search(q, 10, 64));
            s.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

#[test]
#[ignore]
fn measure_online_inserts_and_search_after_deletes() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let base = clustered(&mut rng, 0..20_000);
    let g = Generation::build(
        EngineKind::NativeI8,
        &EngineMemory::IN_RAM,
        Metric::L2,
        DIM as u32,
        meta(),
        base.clone(),
        &|| false,
    )
    .unwrap();

    // Online inserts, one point per call on one thread: like the base, then outliers.
    let like = clustered(&mut rng, 100_000..103_000);
    let s = Instant::now();
    for p in &like {
        g.upsert(std::slice::from_ref(p));
    }
    let like_rate = like.len() as f64 / s.elapsed().as_secs_f64();
    let outliers: Vec<Point> = (200_000..200_500)
        .map(|id| Point {
            id,
            vector: (0..DIM).map(|_| rng.gen_range(-3.0f32..3.0)).collect(),
        })
        .collect();
    let s = Instant::now();
    for p in &outliers {
        g.upsert(std::slice::from_ref(p));
    }
    let outlier_rate = outliers.len() as f64 / s.elapsed().as_secs_f64();
    let found = outliers
        .iter()
        .filter(|p| g.search(&p.vector, 1, 64).first().map(|h| h.id) == Some(p.id))
        .count();
    let found_like = like
        .iter()
        .filter(|p| g.search(&p.vector, 1, 64).first().map(|h| h.id) == Some(p.id))
        .count();
    println!(
        "online inserts/s: like the data {like_rate:.0}, outliers {outlier_rate:.0}; \
         found first by own vector at ef 64: outliers {found}/{}, like {found_like}/{}",
        outliers.len(),
        like.len()
    );

    // Search p50 at ef 64 after deleting 90% of the base, against a fresh index of the rest.
    let queries: Vec<Vec<f32>> = clustered(&mut rng, 0..2000)
        .into_iter()
        .map(|p| p.vector)
        .collect();
    let g = Generation::build(
        EngineKind::NativeI8,
        &EngineMemory::IN_RAM,
        Metric::L2,
        DIM as u32,
        meta(),
        base.clone(),
        &|| false,
    )
    .unwrap();
    let before = p50(&g, &queries);
    let gone: Vec<u64> = (0..20_000).filter(|id| id % 10 != 0).collect();
    g.delete(&gone);
    let live: Vec<Point> = base.iter().filter(|p| p.id % 10 == 0).cloned().collect();
    let fresh = Generation::build(
        EngineKind::NativeI8,
        &EngineMemory::IN_RAM,
        Metric::L2,
        DIM as u32,
        meta(),
        live.clone(),
        &|| false,
    )
    .unwrap();
    let (tomb, alone) = (p50(&g, &queries), p50(&fresh, &queries));
    let recall = |g: &Generation| {
        let mut hit = 0;
        for q in queries.iter().take(200) {
            let mut exact: Vec<(f32, u64)> = live
                .iter()
                .map(|p| {
                    (
                        p.vector.iter().zip(q).map(|(a, b)| (a - b) * (a - b)).sum(),
                        p.id,
                    )
                })
                .collect();
            exact.sort_by(|a, b| a.0.total_cmp(&b.0));
            let hits = g.search(q, 10, 64);
            hit += exact[..10]
                .iter()
                .filter(|(_, id)| hits.iter().any(|h| h.id == *id))
                .count();
        }
        hit as f64 / 2000.0
    };
    println!(
        "search p50 us at ef 64: full index {before:.1}; after deleting 90% {tomb:.1}; \
         fresh index of the live 10% {alone:.1} (ratio {:.2}); recall@10 {:.3} vs fresh {:.3}",
        tomb / alone,
        recall(&g),
        recall(&fresh)
    );
}

/// The cost of build progress (issue 23): the same seeded build with and without a
/// `Progress` (one relaxed store per chunk of 256 points), alternated so that load on the
/// machine hits both alike. Prints the fastest of each and their ratio.
#[test]
#[ignore]
fn measure_build_progress_overhead() {
    use vectord::index::{Phase, Progress};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    let base = clustered(&mut rng, 0..20_000);
    let mut m = meta();
    m.config = HnswConfig {
        m: 16,
        ef_construction: 100,
        ef_search: 64,
        seed: Some(42),
    };
    let (mut plain, mut tracked) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let t = Instant::now();
        let g = Generation::build(
            EngineKind::NativeI8,
            &EngineMemory::IN_RAM,
            Metric::L2,
            DIM as u32,
            m.clone(),
            base.clone(),
            &|| false,
        );
        plain.push(t.elapsed().as_secs_f64());
        drop(g);
        let p = Progress::new(Phase::Build, Some(m.config), 0);
        let t = Instant::now();
        let g = Generation::build_tracked(
            EngineKind::NativeI8,
            &EngineMemory::IN_RAM,
            Metric::L2,
            DIM as u32,
            m.clone(),
            base.clone(),
            &|| false,
            &p,
        );
        tracked.push(t.elapsed().as_secs_f64());
        assert_eq!(p.view().done, 20_000);
        drop(g);
    }
    let best = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "20k x {DIM}-d seeded build (m 16, ef_c 100), best of 3: plain {:.3} s, with progress {:.3} s, ratio {:.3}; all: {plain:?} {tracked:?}",
        best(&plain),
        best(&tracked),
        best(&tracked) / best(&plain)
    );
}
