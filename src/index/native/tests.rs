//! The engine's tests: memory layout, visited set, recall against hnsw_rs and brute force,
//! determinism, concurrency and snapshots.

use super::encoding::{Kept, Storage};
use super::memory::{cache_lines, huge_cells, mapped_cells, HUGE_PAGE};
use super::scratch::Scratch;
use super::*;
use crate::index::distance;
use crate::index::engine::{new_engine_in, new_engine_of, EngineKind, EngineMemory};
use crate::index::engine::{Checked, Engine};
use rand::{Rng, SeedableRng};

#[test]
fn large_cell_arrays_start_on_a_huge_page_and_hold_what_init_wrote() {
    let check = |n: usize| {
        let cells = huge_cells(n, |i| (i as u32).wrapping_mul(3));
        assert_eq!(cells.len(), n);
        assert!(cells
            .iter()
            .enumerate()
            .all(|(i, c)| c.load(AtOrd::Relaxed) == (i as u32).wrapping_mul(3)));
        cells
    };
    assert!(check(0).is_empty());
    check(1);
    check(1_000);
    let large = check(HUGE_PAGE / 4 + 5);
    if cfg!(target_os = "linux") {
        assert_eq!(large.as_ptr() as usize % HUGE_PAGE, 0);
    }
    // Cells stay writable, and freeing them (the drops here) frees with the same layout.
    large[7].store(1, AtOrd::Relaxed);
    assert_eq!(large[7].load(AtOrd::Relaxed), 1);
}

#[test]
fn mapped_cells_start_zeroed_stay_writable_and_leave_no_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    for n in [0, 1, 1_000, HUGE_PAGE / 4 + 5] {
        let cells = mapped_cells(n, dir.path()).expect("mapped cells");
        assert_eq!(cells.len(), n);
        assert_eq!(cells.is_mapped(), n > 0);
        assert!(cells.iter().all(|c| c.load(AtOrd::Relaxed) == 0));
        for (i, c) in cells.iter().enumerate().step_by(997) {
            c.store(i as u32 + 1, AtOrd::Relaxed);
        }
        for (i, c) in cells.iter().enumerate().step_by(997) {
            assert_eq!(c.load(AtOrd::Relaxed), i as u32 + 1);
        }
        let names = std::fs::read_dir(dir.path()).expect("read dir").count();
        assert_eq!(names, 0, "a mapped file left a name behind");
        // The kernel may evict the pages (here at once, as memory pressure would), and they
        // come back from the file unchanged.
        #[cfg(target_os = "linux")]
        if n > 0 {
            let resident = cells.evict().expect("evict").expect("mapped");
            assert!(
                resident < (n * 4).div_ceil(4096).max(2) / 2,
                "{resident} pages still resident"
            );
            for (i, c) in cells.iter().enumerate().step_by(997) {
                assert_eq!(c.load(AtOrd::Relaxed), i as u32 + 1);
            }
        }
    }
    assert!(
        mapped_cells(10, &dir.path().join("missing")).is_err(),
        "a directory that does not exist is an error, not a panic"
    );
}

/// The float vectors in mapped files change nothing a search answers: the same seeded build
/// in RAM and mapped gives the same neighbours at the same distances, through segment growth
/// (inserts one at a time from a small capacity) and a snapshot round trip, and no file name
/// is left in the directory, while the engine lives or after.
#[test]
fn mapped_float_vectors_answer_exactly_like_ram_and_leave_no_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let files = || std::fs::read_dir(dir.path()).expect("read dir").count();
    let memory = EngineMemory::mapped_in(dir.path());
    for storage in [Storage::Half, Storage::Int8] {
        for metric in [Metric::L2, Metric::Cosine] {
            let unit = metric != Metric::L2;
            let base = data(3000, 24, 21, unit);
            let queries = data(60, 24, 22, unit);
            let make = |memory: &EngineMemory| {
                // The smallest first segment (1,024 nodes): the points fill three segments,
                // each created by an insert.
                let e = Native::with_storage(metric, 24, &config(Some(4)), 0, storage)
                    .with_memory(memory.clone());
                for (i, v) in base.iter().enumerate() {
                    e.insert(v, i);
                }
                e
            };
            let ram = make(&EngineMemory::IN_RAM);
            let map = make(&memory);
            let segments = |e: &Native| -> Vec<bool> {
                e.segments
                    .iter()
                    .filter_map(|s| s.get())
                    .map(|s| s.full.is_mapped())
                    .collect()
            };
            assert_eq!(segments(&ram), vec![false; 3], "{storage:?}");
            assert_eq!(segments(&map), vec![true; 3], "{storage:?}");
            assert_eq!(files(), 0, "{storage:?}: a mapped file has a name");
            let mut bytes = Vec::new();
            ram.save_graph(&mut bytes).expect("save");
            let mut d = crate::index::snapshot::Dec::new(&bytes);
            let loaded = Native::load_graph(metric, 24, &config(Some(4)), storage, &memory, &mut d)
                .expect("load");
            // Loaded into one segment of the nodes' number, mapped.
            assert_eq!(segments(&loaded), vec![true], "{storage:?}");
            // Evicted (as under memory pressure), the float vectors are read back from the
            // files by the searches below.
            #[cfg(target_os = "linux")]
            for seg in map.segments.iter().filter_map(|s| s.get()) {
                seg.full.evict().expect("evict");
            }
            for q in &queries {
                let want = ram.search(q, 10, 40);
                assert_eq!(want.len(), 10);
                assert_eq!(map.search(q, 10, 40), want, "{storage:?} {metric:?}");
                assert_eq!(loaded.search(q, 10, 40), want, "{storage:?} {metric:?}");
                // The distances are the exact ones, read from the mapped float vectors.
                for &(i, d) in &want {
                    assert_eq!(d, distance::internal(metric, q, &base[i]));
                }
            }
        }
    }
    assert_eq!(files(), 0);
}

/// A directory the float vectors cannot be mapped in (here: it does not exist) leaves them
/// in RAM, with the same answers.
#[test]
fn float_vectors_stay_in_ram_when_they_cannot_be_mapped() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = EngineMemory::mapped_in(dir.path().join("missing"));
    let base = data(500, 8, 23, false);
    let a = build_in(
        EngineKind::NativeI8,
        Metric::L2,
        &base,
        Some(2),
        false,
        &missing,
    );
    let b = build_in(
        EngineKind::NativeI8,
        Metric::L2,
        &base,
        Some(2),
        false,
        &EngineMemory::IN_RAM,
    );
    for q in data(20, 8, 24, false) {
        assert_eq!(a.search(&q, 5, 20), b.search(&q, 5, 20));
    }
}

#[test]
fn a_prefetch_asks_for_every_line_a_vector_spans() {
    let cells: Vec<AtomicU32> = (0..2_000).map(AtomicU32::new).collect();
    let line_of = |c: &AtomicU32| c as *const AtomicU32 as usize / 64;
    for start in 0..16 {
        for len in [1, 16, 17, 97, 384] {
            let v = &cells[start..start + len];
            let lines: Vec<usize> = cache_lines(v).map(|a| a / 64).collect();
            let (first, last) = (line_of(&v[0]), line_of(&v[len - 1]));
            let want: Vec<usize> = (first..=last).collect();
            assert_eq!(lines, want, "{len} cells from cell {start}");
        }
    }
    assert_eq!(cache_lines(&cells[..0]).count(), 0);
}

#[test]
fn a_beam_asks_for_small_vectors_further_ahead_than_big_ones() {
    let ahead = |dim: u32, storage: Storage| {
        Native::with_storage(Metric::L2, dim, &config(None), 16, storage).beam_lookahead
    };
    // The sizes hnsw.rs's `beam_lookahead` documents as measured.
    assert_eq!(ahead(128, Storage::Int8), 8);
    assert_eq!(ahead(384, Storage::Int8), 2);
    assert_eq!(ahead(128, Storage::Half), 4);
    assert_eq!(ahead(128, Storage::F32), 2);
    // Never fewer than 2, never more than 8.
    assert_eq!(ahead(4_096, Storage::F32), 2);
    assert_eq!(ahead(8, Storage::Int8), 8);
}

/// With 128-d 8-bit codes and M 16 a node's row (32 link slots, 32 cells of codes) is four
/// whole cache lines: its links two, its codes two, so a distance reads two lines (module docs).
#[test]
fn a_row_of_128d_codes_with_m16_is_whole_cache_lines() {
    let base = data(1500, 128, 31, false);
    // The smallest first segment (1,024 nodes, under a huge page) and a second one.
    let e = Native::with_storage(Metric::L2, 128, &config(Some(2)), 0, Storage::Int8);
    for (i, v) in base.iter().enumerate() {
        e.insert(v, i);
    }
    let lines = |cells: &[AtomicU32]| {
        assert_eq!(cells.as_ptr() as usize % 64, 0, "starts on a line");
        cache_lines(cells).count()
    };
    for id in 0..base.len() as u32 {
        let (seg, off) = e.node(id).expect("an inserted node");
        let (count, slots) = e.links_in(seg, off, 0).expect("a level-0 block");
        assert!(count.load(AtOrd::Relaxed) >= 1, "node {id} has links");
        assert_eq!(lines(slots), 2, "node {id}'s links");
        assert_eq!(lines(e.search_cells(seg, off)), 2, "node {id}'s codes");
        let (codes, scale) = e.i8_in(seg, off);
        assert_eq!(codes.len(), 128);
        // Node 0 is the center itself (inserted first and alone): all its codes are 0.
        assert!(id == 0 || scale > 0.0, "node {id}'s scale");
    }
}

/// A snapshot keeps the node layout it always had (count, slots, the 8-bit scale, codes, the
/// float vector), whatever cells the engine keeps them in, so files written before the count
/// and scale moved out of the row load as they did.
#[test]
fn a_snapshot_keeps_the_node_layout_it_always_had() {
    let dim = 8;
    let base = data(300, dim, 32, false);
    let e = Native::with_storage(Metric::L2, dim as u32, &config(Some(3)), 0, Storage::Int8);
    for (i, v) in base.iter().enumerate() {
        e.insert(v, i);
    }
    let mut bytes = Vec::new();
    e.save_graph(&mut bytes).expect("save");
    let mut d = crate::index::snapshot::Dec::new(&bytes);
    assert_eq!(d.u8().expect("storage"), 2);
    assert_eq!(d.u32().expect("dim"), dim as u32);
    let _ = (d.u32(), d.u32(), d.u64(), d.u64()); // m, ef_construction, seed, base
    assert_eq!(d.u8().expect("center"), 1);
    for _ in 0..dim {
        d.u32().expect("center cell");
    }
    assert_eq!(d.u8().expect("entry"), 1);
    let _ = (d.u32(), d.u32());
    assert_eq!(d.u64().expect("count"), base.len() as u64);
    assert_eq!(d.u64().expect("slots"), base.len() as u64);
    for (id, v) in base.iter().enumerate() {
        // Read through the engine's accessors, compared with the file's cells in order.
        let (seg, off) = e.node(id as u32).expect("a node");
        let (count, slots) = e.links_in(seg, off, 0).expect("a level-0 block");
        let (codes, scale) = e.i8_in(seg, off);
        let mut want = vec![count.load(AtOrd::Relaxed)];
        want.extend(slots.iter().map(|s| s.load(AtOrd::Relaxed)));
        want.push(scale.to_bits());
        want.extend(
            codes
                .chunks(4)
                .map(|c| u32::from_ne_bytes([c[0] as u8, c[1] as u8, c[2] as u8, c[3] as u8])),
        );
        want.extend(v.iter().map(|x| x.to_bits()));
        let claimed = d.u8().expect("claimed");
        assert_eq!(claimed, 1);
        let got: Vec<u32> = (0..want.len()).map(|_| d.u32().expect("a cell")).collect();
        assert_eq!(got, want, "node {id}");
        let upper = d.u32().expect("upper length");
        for _ in 0..upper {
            d.u32().expect("an upper cell");
        }
    }
}

#[test]
fn the_visited_set_starts_empty_for_every_search_and_grows_past_its_size() {
    let mut s = Scratch::default();
    for _ in 0..3 {
        s.start(100);
        for id in [0, 5, 63, 64, 99] {
            assert!(s.visit(id), "{id} was not visited yet in this search");
            assert!(!s.visit(id), "{id} was just visited");
        }
        // A node past the size the search started with (inserted meanwhile).
        assert!(s.visit(10_000));
        assert!(!s.visit(10_000));
        assert!(s.visit(6), "a neighbour of a visited node in the same word");
    }
    s.start(100);
    assert!(
        (0..20_000).all(|id| s.visit(id)),
        "a new search sees nothing visited"
    );
}

/// A graph frozen for a snapshot and written while inserts go on past its nodes (as a
/// background snapshot is written while the linker links) writes the same bytes as the graph
/// saved at the moment it was frozen, for every storage: the inserts change the frozen nodes'
/// links, and the file must not see it.
#[test]
fn a_frozen_graph_writes_what_it_was_while_inserts_go_on() {
    for storage in [Storage::F32, Storage::Half, Storage::Int8] {
        let points = data(6_000, 16, 31, false);
        let (base, more) = points.split_at(3_000);
        // A first segment of 1,024 nodes: the inserts below add segments too.
        let e = Native::with_storage(Metric::L2, 16, &config(Some(9)), 0, storage);
        e.insert_many(&indexed(base), true);
        let mut saved = Vec::new();
        e.save_graph(&mut saved).expect("save");
        let frozen = e.freeze_links(base.len());
        let more: Vec<(&[f32], usize)> = more
            .iter()
            .enumerate()
            .map(|(i, v)| (v.as_slice(), base.len() + i))
            .collect();
        let mut written = Vec::new();
        std::thread::scope(|s| {
            s.spawn(|| e.insert_many(&more[..1_500], true));
            frozen.write(&mut written).expect("write");
        });
        e.insert_many(&more[1_500..], true);
        let mut again = Vec::new();
        frozen.write(&mut again).expect("write");
        assert_eq!(written, saved, "{storage:?}: written while inserting");
        assert_eq!(again, saved, "{storage:?}: written after inserting");
        // The inserts did change the frozen nodes' links: the test would see a live read.
        let mut now = Vec::new();
        e.freeze_links(base.len()).write(&mut now).expect("write");
        assert_ne!(
            now, saved,
            "{storage:?}: the inserts left the old links alone"
        );
    }
}

fn config(seed: Option<u64>) -> HnswConfig {
    HnswConfig {
        m: 16,
        ef_construction: 100,
        ef_search: 40,
        seed,
    }
}

/// Clustered data, so the graph has work to do.
fn data(n: usize, dim: usize, seed: u64, unit: bool) -> Vec<Vec<f32>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let centres: Vec<Vec<f32>> = (0..100)
        .map(|_| (0..dim).map(|_| rng.gen_range(-1.0..1.0)).collect())
        .collect();
    (0..n)
        .map(|i| {
            let c = &centres[(i * 7919) % centres.len()];
            let mut v: Vec<f32> = c.iter().map(|x| x + rng.gen_range(-0.2..0.2)).collect();
            if unit {
                crate::model::normalize("v", &mut v).unwrap();
            }
            v
        })
        .collect()
}

/// The points of `base` with their positions as ids, as `insert_many` takes them.
fn indexed(base: &[Vec<f32>]) -> Vec<(&[f32], usize)> {
    base.iter()
        .enumerate()
        .map(|(i, v)| (v.as_slice(), i))
        .collect()
}

fn exact(metric: Metric, base: &[Vec<f32>], q: &[f32], k: usize) -> Vec<usize> {
    let mut all: Vec<(f32, usize)> = base
        .iter()
        .enumerate()
        .map(|(i, v)| (distance::internal(metric, q, v), i))
        .collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    all.into_iter().take(k).map(|(_, i)| i).collect()
}

fn recall(
    engine: &dyn Engine,
    metric: Metric,
    base: &[Vec<f32>],
    queries: &[Vec<f32>],
    ef: usize,
) -> f64 {
    let k = 10;
    let mut hit = 0;
    for q in queries {
        let truth = exact(metric, base, q, k);
        let got: Vec<usize> = engine
            .search(q, k, ef)
            .into_iter()
            .map(|(i, _)| i)
            .collect();
        hit += truth.iter().filter(|t| got.contains(t)).count();
    }
    hit as f64 / (queries.len() * k) as f64
}

/// Where the tests' engines map their float vectors: the system's temp dir (the files have no
/// name, so nothing is left there).
fn mapped() -> EngineMemory {
    EngineMemory::mapped_in(std::env::temp_dir())
}

/// A graph of `base` (float vectors mapped, as the server runs by default).
fn build(
    kind: EngineKind,
    metric: Metric,
    base: &[Vec<f32>],
    seed: Option<u64>,
    parallel: bool,
) -> Box<dyn Engine> {
    build_in(kind, metric, base, seed, parallel, &mapped())
}

fn build_in(
    kind: EngineKind,
    metric: Metric,
    base: &[Vec<f32>],
    seed: Option<u64>,
    parallel: bool,
    memory: &EngineMemory,
) -> Box<dyn Engine> {
    let e = new_engine_in(
        kind,
        metric,
        base[0].len() as u32,
        &config(seed),
        base.len(),
        memory,
    );
    let items = indexed(base);
    e.insert_many(&items, parallel);
    e
}

#[test]
fn recall_matches_hnsw_rs_on_the_same_data() {
    for metric in [Metric::L2, Metric::Cosine] {
        let base = data(4000, 32, 1, metric == Metric::Cosine);
        let queries = data(100, 32, 2, metric == Metric::Cosine);
        let native = build(EngineKind::Native, metric, &base, Some(3), false);
        let theirs = build(EngineKind::HnswRs, metric, &base, Some(3), false);
        assert_eq!(native.len(), base.len());
        for ef in [10, 20, 40, 80] {
            let (a, b) = (
                recall(native.as_ref(), metric, &base, &queries, ef),
                recall(theirs.as_ref(), metric, &base, &queries, ef),
            );
            // Same data and config; hnsw_rs links a new node to 2*M neighbours at level 0
            // where hnswlib (and native) link M, so the curves differ a little either way.
            assert!(
                a >= b - 0.05,
                "{metric:?} ef={ef}: native {a} < hnsw_rs {b}"
            );
            if ef == 80 {
                assert!(a >= 0.95, "{metric:?} ef={ef}: recall {a}");
            }
        }
    }
}

#[test]
fn compact_storages_keep_recall_and_report_exact_distances() {
    for (kind, metric) in [EngineKind::NativeF16, EngineKind::NativeI8]
        .into_iter()
        .flat_map(|k| [Metric::L2, Metric::Cosine, Metric::Dot].map(|m| (k, m)))
    {
        let unit = metric != Metric::L2;
        // 33-d: an odd dimension, so the last cell holds one half (one code).
        let base = data(4000, 33, 1, unit);
        let queries = data(100, 33, 2, unit);
        let full = build(EngineKind::Native, metric, &base, Some(3), false);
        let half = build(kind, metric, &base, Some(3), false);
        assert_eq!(half.len(), base.len());
        for ef in [10, 40, 80] {
            let (a, b) = (
                recall(full.as_ref(), metric, &base, &queries, ef),
                recall(half.as_ref(), metric, &base, &queries, ef),
            );
            // Halves change distances by about 1e-4 of their size, 8-bit codes by about
            // 1e-2, which changes ties between near candidates (and so which links a
            // build keeps), not the quality of the graph; the final candidates are ranked
            // exactly. On this data 8-bit recall moved by -0.012..+0.017 at ef 10..80.
            let slack = if kind == EngineKind::NativeI8 {
                0.02
            } else {
                0.01
            };
            assert!(
                b >= a - slack,
                "{kind:?} {metric:?} ef={ef}: {b} against f32 {a}"
            );
        }
        for q in &queries {
            let hits = half.search(q, 10, 40);
            assert_eq!(hits.len(), 10);
            for w in hits.windows(2) {
                assert!(w[0].1 <= w[1].1, "{metric:?}: not nearest first: {hits:?}");
            }
            for &(i, d) in &hits {
                assert_eq!(d, distance::internal(metric, q, &base[i]), "{metric:?}");
            }
        }
        // Every point finds itself, first, at distance zero (dot: its own norm).
        for (i, v) in base.iter().enumerate().step_by(37) {
            let hits = half.search(v, 1, 40);
            assert_eq!(hits.first().map(|h| h.0), Some(i), "{metric:?}");
        }
    }
}

#[test]
fn compact_storages_find_vectors_that_share_a_large_offset() {
    // Every component 1000 +- 1.2: scaled to each vector's largest component, the codes of
    // all these vectors would be nearly the same (8-bit recall was 0.01 before the center).
    let shift = |v: Vec<Vec<f32>>| -> Vec<Vec<f32>> {
        v.into_iter()
            .map(|p| p.into_iter().map(|x| x + 1000.0).collect())
            .collect()
    };
    let base = shift(data(3000, 16, 21, false));
    let queries = shift(data(100, 16, 22, false));
    for metric in [Metric::L2, Metric::Dot] {
        let full = build(EngineKind::Native, metric, &base, Some(3), false);
        let a = recall(full.as_ref(), metric, &base, &queries, 40);
        for kind in [EngineKind::NativeF16, EngineKind::NativeI8] {
            // One batch (center: its mean) and one point at a time (center: the first). The
            // batch is inserted on one thread: a parallel build is not reproducible, and its
            // recall on this dot-product set varied past the bound (0.9 in one CI run).
            for batch in [false, true] {
                let e = if batch {
                    build(kind, metric, &base, Some(3), false)
                } else {
                    let e = new_engine_of(kind, metric, 16, &config(Some(3)), 0);
                    for (i, v) in base.iter().enumerate() {
                        e.insert(v, i);
                    }
                    e
                };
                let b = recall(e.as_ref(), metric, &base, &queries, 40);
                assert!(b >= a - 0.03, "{kind:?} {metric:?}: {b} against f32 {a}");
            }
        }
    }
}

#[test]
fn parallel_build_finds_as_well() {
    let base = data(4000, 32, 5, false);
    let queries = data(100, 32, 6, false);
    let par = build(EngineKind::Native, Metric::L2, &base, None, true);
    assert_eq!(par.len(), base.len());
    assert!(recall(par.as_ref(), Metric::L2, &base, &queries, 40) >= 0.9);
}

/// The unfiltered search's sorted pool (`Native::beam`) expands the nodes hnswlib's two heaps
/// would, in the same order: on one graph, for every storage, level, ef and `enough`, it finds
/// exactly what the heap search (`beam_filtered`, every node kept) finds.
#[test]
fn the_pool_beam_finds_what_the_two_heaps_find() {
    use super::hnsw::{Cand, Layer};
    let base = data(3000, 16, 12, false);
    for storage in [Storage::F32, Storage::Half, Storage::Int8] {
        let e = Native::with_storage(Metric::L2, 16, &config(Some(3)), base.len(), storage);
        let items = indexed(&base);
        e.insert_many(&items, false);
        let (ep, top) = (*e.entry.read()).expect("an entry point");
        let all = |_: u32| true;
        let mut compared = 0;
        for (i, v) in data(40, 16, 13, false).iter().enumerate() {
            let mut bufs = super::scratch::QueryBufs::default();
            let q = e.query(v, &mut bufs);
            let start = Cand {
                d: e.dist_to(&q, ep).expect("the entry's distance"),
                id: ep,
            };
            for level in 0..=top.min(1) {
                let cases = [
                    (1, None),
                    (10, None),
                    (64, Some(10)),
                    (200, None),
                    (700, None),
                ];
                for (ef, enough) in cases {
                    let ahead = i % 2 == 0;
                    let mut s = Scratch::default();
                    let l = Layer {
                        ef,
                        level,
                        enough,
                        ahead,
                    };
                    e.beam(&q, start, l, &mut s);
                    let pool = std::mem::take(&mut s.found);
                    e.beam_filtered(&q, start, l, &mut s, &all);
                    assert_eq!(pool, s.found, "{storage:?} level {level} ef {ef}");
                    assert!(pool.windows(2).all(|w| w[0] < w[1]), "nearest first");
                    assert!(!pool.is_empty() && pool.len() <= ef);
                    compared += 1;
                }
            }
        }
        assert!(compared >= 200);
    }
}

#[test]
fn seeded_single_thread_builds_are_identical() {
    let base = data(2000, 16, 7, false);
    for kind in [
        EngineKind::Native,
        EngineKind::NativeF16,
        EngineKind::NativeI8,
    ] {
        let a = build(kind, Metric::L2, &base, Some(11), false);
        let b = build(kind, Metric::L2, &base, Some(11), false);
        for q in data(50, 16, 8, false) {
            assert_eq!(a.search(&q, 10, 20), b.search(&q, 10, 20), "{kind:?}");
        }
    }
}

#[test]
fn every_point_finds_itself_after_concurrent_inserts_and_searches() {
    let base = data(3000, 16, 9, false);
    // Small initial capacity, so inserts grow new segments while searches run.
    let e = Native::new(Metric::L2, 16, &config(None), 100);
    std::thread::scope(|scope| {
        for t in 0..2 {
            let (e, base) = (&e, &base);
            scope.spawn(move || {
                for (i, v) in base.iter().enumerate().filter(|(i, _)| i % 2 == t) {
                    e.insert(v, i);
                }
            });
        }
        let (e, base) = (&e, &base);
        scope.spawn(move || {
            for q in base.iter().cycle().take(3000) {
                let found = e.search(q, 5, 20);
                assert!(found.len() <= 5);
                assert!(found.windows(2).all(|w| w[0].1 <= w[1].1));
            }
        });
    });
    assert_eq!(e.len(), base.len());
    let mut missed = 0;
    for (i, v) in base.iter().enumerate() {
        let found = e.search(v, 1, 40);
        if found.first().map(|f| f.1) != Some(0.0) {
            missed += 1;
        }
        let _ = i;
    }
    assert!(
        missed <= base.len() / 200,
        "{missed} of {} points not found",
        base.len()
    );
}

/// Parallel builds (4 threads, more than this machine's cores, so inserts interleave),
/// followed as in a generation's build by `link_orphans`, must leave every point reachable:
/// each is found first by its own vector, and a walk over level-0 links from the entry point
/// reaches every node. Before inserts waited for the nodes they reach to be complete (module docs),
/// these builds lost about two points in each round, most of them still linked from some
/// node (so `link_orphans` alone would not have saved them).
#[test]
fn parallel_builds_lose_no_point() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(4)
        .build()
        .expect("thread pool");
    let (n, dim) = (2000, 4);
    let config = HnswConfig {
        m: 8,
        ef_construction: 32,
        ef_search: 40,
        seed: None,
    };
    for (round, storage) in (0..21u64).map(|r| {
        (
            r / 3,
            [Storage::F32, Storage::Half, Storage::Int8][r as usize % 3],
        )
    }) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(round);
        let base: Vec<Vec<f32>> = (0..n)
            .map(|_| (0..dim).map(|_| rng.gen_range(-1.0f32..1.0)).collect())
            .collect();
        // Mapped float vectors, in segments grown while inserts run (capacity n / 8).
        let e = Native::with_storage(Metric::L2, dim as u32, &config, n / 8, storage)
            .with_memory(mapped());
        let items = indexed(&base);
        pool.install(|| e.insert_many(&items, true));
        assert_eq!(e.len(), n);
        e.link_orphans();
        // A walk over level-0 links from the entry point.
        let entry = e.entry.read().map(|(id, _)| id as usize).expect("an entry");
        let mut reached = vec![false; n];
        reached[entry] = true;
        let mut stack = vec![entry];
        while let Some(i) = stack.pop() {
            let (count, slots) = e.links(i as u32, 0).expect("a level-0 block");
            for slot in &slots[..count.load(AtOrd::Relaxed) as usize] {
                let to = slot.load(AtOrd::Relaxed) as usize;
                if !reached[to] {
                    reached[to] = true;
                    stack.push(to);
                }
            }
        }
        let unreached: Vec<usize> = (0..n).filter(|&i| !reached[i]).collect();
        let lost: Vec<usize> = (0..n)
            .filter(|&i| e.search(&base[i], 1, 400).first().map(|f| f.0) != Some(i))
            .collect();
        assert!(
            unreached.is_empty() && lost.is_empty(),
            "round {round} {storage:?}: nodes no walk from the entry reaches {unreached:?}, points not found {lost:?}"
        );
    }
}

/// A point no level-0 link reaches cannot be found; `link_orphans` links it from a near
/// point, into a free slot or, when every list is full, in place of a link to a point that
/// other links also reach.
#[test]
fn link_orphans_reconnects_a_point_no_link_reaches() {
    for full_lists in [false, true] {
        let base = data(1000, 16, 12, false);
        let e = Native::new(Metric::L2, 16, &config(Some(1)), base.len());
        for (i, v) in base.iter().enumerate() {
            e.insert(v, i);
        }
        let entry = e.entry.read().map(|(id, _)| id).expect("an entry point");
        let u = (0..base.len() as u32)
            .find(|&i| e.level_of(i) == 0 && i != entry)
            .expect("a level-0 node");
        let (_, upper_top) = e.entry.read().expect("entry");
        assert!(upper_top >= 1);
        for i in 0..base.len() as u32 {
            let (count, slots) = e.links(i, 0).expect("a block");
            let n = count.load(AtOrd::Relaxed) as usize;
            let mut kept: Vec<u32> = slots[..n]
                .iter()
                .map(|s| s.load(AtOrd::Relaxed))
                .filter(|&o| o != u)
                .collect();
            if full_lists {
                kept.resize(slots.len(), entry);
            }
            rewrite_level0(&e, i, kept);
        }
        let found = |e: &Native| e.search(&base[u as usize], 1, 400).first().map(|f| f.0);
        assert_ne!(found(&e), Some(u as usize), "an orphan is found");
        assert_eq!(e.link_orphans(), 1, "full lists: {full_lists}");
        assert_eq!(found(&e), Some(u as usize), "full lists: {full_lists}");
        assert_eq!(e.link_orphans(), 0);
    }
}

/// Replaces node `id`'s level-0 list as a writer of the engine does: under its lock, with no
/// link known to pass the heuristic with the others.
fn rewrite_level0(e: &Native, id: u32, ids: Vec<u32>) {
    let (seg, off) = e.node(id).expect("an inserted node");
    let mut known = seg.locks[off].lock();
    Native::write_links(e.links(id, 0), ids.into_iter());
    *known = 0;
}

/// Two points that link only each other (an island: each has an in-link, so a check of
/// in-links alone misses them) cannot be found; `link_orphans` links each from a reached point
/// near it, and both are found.
#[test]
fn link_orphans_reconnects_an_island() {
    let base = data(1000, 16, 12, false);
    let e = Native::new(Metric::L2, 16, &config(Some(1)), base.len());
    for (i, v) in base.iter().enumerate() {
        e.insert(v, i);
    }
    let entry = e.entry.read().map(|(id, _)| id).expect("an entry point");
    let mut level0 = (0..base.len() as u32).filter(|&i| e.level_of(i) == 0 && i != entry);
    let (a, b) = (
        level0.next().expect("a node"),
        level0.next().expect("a node"),
    );
    for i in 0..base.len() as u32 {
        let (count, slots) = e.links(i, 0).expect("a block");
        let n = count.load(AtOrd::Relaxed) as usize;
        let kept: Vec<u32> = if i == a {
            vec![b]
        } else if i == b {
            vec![a]
        } else {
            slots[..n]
                .iter()
                .map(|s| s.load(AtOrd::Relaxed))
                .filter(|&o| o != a && o != b)
                .collect()
        };
        rewrite_level0(&e, i, kept);
    }
    let found = |e: &Native, u: u32| e.search(&base[u as usize], 1, 400).first().map(|f| f.0);
    assert_ne!(found(&e, a), Some(a as usize), "an island's point is found");
    assert_ne!(found(&e, b), Some(b as usize), "an island's point is found");
    assert_eq!(e.link_orphans(), 2, "each point of the island is linked");
    assert_eq!(found(&e, a), Some(a as usize));
    assert_eq!(found(&e, b), Some(b as usize));
    assert_eq!(e.link_orphans(), 0);
}

#[test]
fn unit_vectors_whose_dot_is_one_are_at_distance_zero() {
    for metric in [Metric::Cosine, Metric::Dot] {
        let base = data(500, 384, 12, true);
        let e = build(EngineKind::Native, metric, &base, Some(1), false);
        for (i, v) in base.iter().enumerate().take(50) {
            let found = e.search(v, 1, 40);
            assert_eq!(found[0].0, i, "{metric:?}");
            let d = distance::reported(metric, found[0].1);
            assert!(d.abs() < 1e-5 && d >= -1e-5, "{metric:?}: {d}");
        }
    }
}

#[test]
fn empty_and_oversized_requests() {
    let e = Native::new(Metric::L2, 4, &config(Some(1)), 10);
    assert!(e.search(&[0.0; 4], 10, 10).is_empty());
    e.insert(&[1.0, 0.0, 0.0, 0.0], 0);
    e.insert(&[1.0, 0.0, 0.0, 0.0], 0); // a repeated id is ignored
    e.insert(&[0.0, 1.0, 0.0, 0.0], 5000); // past the first segment
    assert_eq!(e.len(), 2);
    let found = e.search(&[0.0, 1.0, 0.0, 0.0], 10, 1);
    assert_eq!(found.iter().map(|f| f.0).collect::<Vec<_>>(), vec![5000, 0]);
    assert!(e.search(&[0.0; 3], 10, 10).is_empty()); // wrong dimension
    assert!(e.memory_bytes() > 0);
}

/// 8-bit codes cannot tell apart points close to each other and far from the center (the
/// code step there is large): 2-d points [100 + r, 0.5] beside points [0..8, up to 16,000]
/// (group_commit's test data). With k = 1 the re-rank window holds 11 candidates, fewer than
/// the points its codes tie; the candidates the codes cannot rule out are ranked exactly
/// too, so each point is found first by its own vector.
#[test]
fn int8_searches_rank_every_candidate_the_codes_cannot_rule_out() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
    let spread: Vec<Vec<f32>> = (0..400)
        .map(|i| vec![(i % 8) as f32, rng.gen_range(0.0f32..16_000.0)])
        .collect();
    let near: Vec<Vec<f32>> = (0..40).map(|r| vec![100.0 + r as f32 * 0.5, 0.5]).collect();
    let lost = |bounded: bool| {
        let mut e = Native::with_storage(Metric::L2, 2, &HnswConfig::default(), 16, Storage::Int8);
        e.bounded_rerank = bounded;
        let items: Vec<(&[f32], usize)> = spread
            .iter()
            .enumerate()
            .map(|(i, v)| (v.as_slice(), i))
            .collect();
        e.insert_many(&items, false);
        for (r, v) in near.iter().enumerate() {
            e.insert(v, 400 + r);
        }
        (0..near.len())
            .filter(|&r| e.search(&near[r], 1, 64).first().map(|f| f.0) != Some(400 + r))
            .count()
    };
    assert!(lost(false) > 0, "the data no longer shows the codes' ties");
    assert_eq!(lost(true), 0);
}

/// The measuring tests' sizes: `name` from the environment, else `default`.
fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// The median of the measuring tests' repeats.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Clustered 32-d points around 20 centres in [-1, 1), spread 0.05 (the generation tests'
/// data), and points unlike them: uniform in [-3, 3).
fn clustered_and_outliers(seed: u64, n: usize, outliers: usize) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let dim = 32;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let centres: Vec<Vec<f32>> = (0..20)
        .map(|_| (0..dim).map(|_| rng.gen_range(-1.0f32..1.0)).collect())
        .collect();
    let base = (0..n)
        .map(|_| {
            let c = &centres[rng.gen_range(0..20)];
            c.iter()
                .map(|x| x + rng.gen_range(-0.05f32..0.05))
                .collect()
        })
        .collect();
    let far = (0..outliers)
        .map(|_| (0..dim).map(|_| rng.gen_range(-3.0f32..3.0)).collect())
        .collect();
    (base, far)
}

/// Online outliers on the engine, seed after seed: the points a search with their own vector
/// does not find first, at ef 64 (the default ef_search) and at ef 200. Run with
/// `cargo test --lib online_outliers_over_many_seeds -- --ignored --nocapture`
/// (`SEEDS`, `THREADS` in the environment; about 25 s per 10 seeds on 2 cores).
#[test]
#[ignore]
fn online_outliers_over_many_seeds() {
    let (seeds, threads) = (env_or("SEEDS", 40) as u64, env_or("THREADS", 1));
    for storage in [Storage::F32, Storage::Half, Storage::Int8] {
        let (mut lost64, mut lost200) = (Vec::new(), Vec::new());
        for seed in 0..seeds {
            let (base, far) = clustered_and_outliers(seed, 4000, 200);
            let e = Native::with_storage(Metric::L2, 32, &HnswConfig::default(), 4000, storage);
            let items = indexed(&base);
            e.insert_many(&items, true);
            e.link_orphans();
            let per = far.len().div_ceil(threads);
            std::thread::scope(|s| {
                for (c, part) in far.chunks(per).enumerate() {
                    let e = &e;
                    s.spawn(move || {
                        for (j, v) in part.iter().enumerate() {
                            e.insert_many(&[(v.as_slice(), 4000 + c * per + j)], false);
                        }
                    });
                }
            });
            for (j, v) in far.iter().enumerate() {
                let id = 4000 + j;
                if e.search(v, 1, 64).first().map(|f| f.0) != Some(id) {
                    lost64.push((seed, id));
                }
                if e.search(v, 1, 200).first().map(|f| f.0) != Some(id) {
                    lost200.push((seed, id));
                }
            }
        }
        println!(
            "{storage:?}, {threads} threads, {} outliers: not found first at ef 64: {lost64:?}; at ef 200: {lost200:?}",
            seeds * 200
        );
    }
}

/// What keeping every point findable costs inserts: the same inserts with and without it
/// (`Native::findable`), alternating, 5 repeats, medians. Run with
/// `cargo test --lib findability_cost -- --ignored --nocapture`.
#[test]
#[ignore]
fn findability_cost() {
    for storage in [Storage::Int8, Storage::F32] {
        // [mode][phase]: points/s of the build (parallel), of online clustered points and of
        // online outliers (one at a time).
        let mut rates = [
            [Vec::new(), Vec::new(), Vec::new()],
            [Vec::new(), Vec::new(), Vec::new()],
        ];
        for rep in 0..5u64 {
            let (points, far) = clustered_and_outliers(100 + rep, 12_000, 300);
            let (base, online) = points.split_at(10_000);
            for (mode, findable) in [(0, true), (1, false)] {
                let mut e =
                    Native::with_storage(Metric::L2, 32, &HnswConfig::default(), 10_000, storage);
                e.findable = findable;
                let items = indexed(base);
                let t = std::time::Instant::now();
                e.insert_many(&items, true);
                rates[mode][0].push(base.len() as f64 / t.elapsed().as_secs_f64());
                let t = std::time::Instant::now();
                for (j, v) in online.iter().enumerate() {
                    e.insert_many(&[(v.as_slice(), 10_000 + j)], false);
                }
                rates[mode][1].push(online.len() as f64 / t.elapsed().as_secs_f64());
                let t = std::time::Instant::now();
                for (j, v) in far.iter().enumerate() {
                    e.insert_many(&[(v.as_slice(), 12_000 + j)], false);
                }
                rates[mode][2].push(far.len() as f64 / t.elapsed().as_secs_f64());
            }
        }
        for (phase, what) in ["build (2 threads)", "online clustered", "online outliers"]
            .iter()
            .enumerate()
        {
            let (with, without) = (
                median(rates[0][phase].clone()),
                median(rates[1][phase].clone()),
            );
            println!(
                "{storage:?} {what}: {with:.0} points/s with, {without:.0} without: ratio {:.3} (runs with {:?}, without {:?})",
                with / without,
                rates[0][phase].iter().map(|r| *r as u64).collect::<Vec<_>>(),
                rates[1][phase].iter().map(|r| *r as u64).collect::<Vec<_>>()
            );
        }
    }
}

/// What ranking the candidates the 8-bit codes cannot rule out costs searches
/// (`Native::bounded_rerank`), on the 30k 384-d sentence embeddings (cosine) if present: QPS
/// on one thread with and without, alternating, 5 repeats, medians, and recall@k against
/// exact search. Run with `cargo test --lib bounded_rerank_cost -- --ignored --nocapture`.
#[test]
#[ignore]
fn bounded_rerank_cost() {
    let path = std::path::Path::new("../shared/data/words_minilm_30k.fvecs");
    let Ok((dim, mut all)) = crate::dataset::read_fvecs(path, None) else {
        println!("no {}: skipped", path.display());
        return;
    };
    for v in &mut all {
        crate::model::normalize("v", v).unwrap();
    }
    let queries = all.split_off(all.len() - 1000);
    let metric = Metric::Cosine;
    let mut e = Native::with_storage(
        metric,
        dim,
        &HnswConfig {
            m: 16,
            ef_construction: 100,
            ef_search: 64,
            seed: None,
        },
        all.len(),
        Storage::Int8,
    );
    let items: Vec<(&[f32], usize)> = all
        .iter()
        .enumerate()
        .map(|(i, v)| (v.as_slice(), i))
        .collect();
    e.insert_many(&items, true);
    let truth: Vec<Vec<usize>> = queries.iter().map(|q| exact(metric, &all, q, 10)).collect();
    for (k, ef) in [(1usize, 64usize), (10, 40), (10, 64)] {
        let mut qps = [Vec::new(), Vec::new()];
        let mut rec = [0.0, 0.0];
        for _ in 0..5 {
            for (mode, on) in [(0, true), (1, false)] {
                e.bounded_rerank = on;
                let t = std::time::Instant::now();
                let mut hit = 0;
                for (q, want) in queries.iter().zip(&truth) {
                    let got = e.search(q, k, ef);
                    hit += want[..k]
                        .iter()
                        .filter(|w| got.iter().any(|g| g.0 == **w))
                        .count();
                }
                qps[mode].push(queries.len() as f64 / t.elapsed().as_secs_f64());
                rec[mode] = hit as f64 / (k * queries.len()) as f64;
            }
        }
        let (with, without) = (median(qps[0].clone()), median(qps[1].clone()));
        println!(
            "k {k} ef {ef}: {with:.0} QPS with, {without:.0} without: ratio {:.3}; recall@{k} {:.4} with, {:.4} without (runs with {:?}, without {:?})",
            with / without, rec[0], rec[1],
            qps[0].iter().map(|r| *r as u64).collect::<Vec<_>>(),
            qps[1].iter().map(|r| *r as u64).collect::<Vec<_>>()
        );
    }
    // Each point found first by its own vector: how many are not, with and without.
    for (mode, on) in [(0, true), (1, false)] {
        e.bounded_rerank = on;
        let lost = all
            .iter()
            .enumerate()
            .step_by(10)
            .filter(|(i, v)| e.search(v, 1, 64).first().map(|f| f.0) != Some(*i))
            .count();
        println!(
            "mode {mode} (bounded {on}): {lost} of {} points not found first at k 1 ef 64",
            all.len().div_ceil(10)
        );
    }
}

/// Clustered points (tests/it/scale_measure.rs's: 50 centres in 64-d, spread 0.1) inserted
/// online after a 20,000-point build of other clusters: how many a search with their own vector does
/// not find first, by beam. Run with `cargo test --lib online_points_like_the_data --
/// --ignored --nocapture` (`SEED` in the environment, default 1, draws other data).
#[test]
#[ignore]
fn online_points_like_the_data_found_first_by_beam() {
    let dim = 64;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(env_or("SEED", 1) as u64);
    // As scale_measure's `clustered`: each call draws its own 50 centres, so the online
    // points form 50 new clusters of about 60 points each.
    let mut clustered = |n: usize| -> Vec<Vec<f32>> {
        let centres: Vec<Vec<f32>> = (0..50)
            .map(|_| (0..dim).map(|_| rng.gen_range(-1.0f32..1.0)).collect())
            .collect();
        (0..n)
            .map(|_| {
                let c = &centres[rng.gen_range(0..50)];
                c.iter().map(|x| x + rng.gen_range(-0.1f32..0.1)).collect()
            })
            .collect()
    };
    let base = clustered(20_000);
    let like = clustered(3000);
    for storage in [Storage::Int8, Storage::F32] {
        let e = Native::with_storage(
            Metric::L2,
            dim as u32,
            &HnswConfig::default(),
            20_000,
            storage,
        );
        let items = indexed(&base);
        e.insert_many(&items, true);
        e.link_orphans();
        for (j, v) in like.iter().enumerate() {
            e.insert(v, 20_000 + j);
        }
        for ef in [64, 128, 200, 400] {
            let missed = like
                .iter()
                .enumerate()
                .filter(|(j, v)| e.search(v, 1, ef).first().map(|f| f.0) != Some(20_000 + j))
                .count();
            let missed_base = base
                .iter()
                .enumerate()
                .step_by(7)
                .filter(|(j, v)| e.search(v, 1, ef).first().map(|f| f.0) != Some(*j))
                .count();
            if ef == 64 {
                let mut into_new = 0;
                let mut few = 0;
                let mut nn_hit = 0;
                for (j, v) in like.iter().enumerate() {
                    let got = e.search(v, 1, ef).first().map(|f| f.0);
                    if got != Some(20_000 + j) {
                        into_new += usize::from(got.is_some_and(|g| g >= 20_000));
                        let mut all: Vec<&Vec<f32>> = base.iter().collect();
                        all.extend(like.iter());
                        let nn = (0..all.len())
                            .filter(|&i| i != 20_000 + j)
                            .min_by(|&a, &b| {
                                distance::internal(Metric::L2, v, all[a])
                                    .total_cmp(&distance::internal(Metric::L2, v, all[b]))
                            });
                        nn_hit += usize::from(got == nn);
                        few += usize::from(
                            e.in_links_of((20_000 + j) as u32)
                                .is_some_and(|c| c.load(AtOrd::Relaxed) <= 3),
                        );
                    }
                }
                println!("{storage:?}: of the missed, the search ended at another online point: {into_new}; with <= 3 in-links: {few}; at its exact nearest neighbour: {nn_hit}");
            }
            println!("{storage:?} ef {ef}: online like the data not found first {missed}/3000; built points {missed_base}/{}", base.len().div_ceil(7));
        }
    }
}

/// What asking for neighbours' vectors further ahead ([`super::hnsw::beam_lookahead`]) gives
/// against 2 ahead (what every size used before): per round, the same `N` clustered 128-d
/// points (default 100,000; float vectors mapped, as the server runs) built on 2 threads with
/// each, `M` more (default 20,000) inserted online into each, then searches (k 10, ef 64) that
/// alternate between the two graphs query by query. Rounds alternate which goes first. Run
/// with `cargo test --release --lib beam_lookahead_cost -- --ignored --nocapture` (`N`, `M`,
/// `ROUNDS` in the environment).
#[test]
#[ignore]
fn beam_lookahead_cost() {
    let (n, m, rounds) = (
        env_or("N", 100_000),
        env_or("M", 20_000),
        env_or("ROUNDS", 3),
    );
    let all = data(n + m + 1_000, 128, 11, false);
    let (base, rest) = all.split_at(n);
    let (online, queries) = rest.split_at(m);
    let base_items = indexed(base);
    let online_items: Vec<(&[f32], usize)> = online
        .iter()
        .enumerate()
        .map(|(i, v)| (v.as_slice(), n + i))
        .collect();
    let ahead = Native::with_storage(Metric::L2, 128, &HnswConfig::default(), n, Storage::Int8)
        .beam_lookahead;
    let memory = mapped();
    let mut rates: [[Vec<f64>; 2]; 2] = Default::default(); // [phase][mode]
    let mut p50s: [Vec<f64>; 2] = Default::default();
    for round in 0..rounds {
        let mut engines = Vec::new();
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for mode in order {
            let mut e =
                Native::with_storage(Metric::L2, 128, &HnswConfig::default(), n, Storage::Int8)
                    .with_memory(memory.clone());
            e.beam_lookahead = if mode == 0 { 2 } else { ahead };
            let t = std::time::Instant::now();
            e.insert_many(&base_items, true);
            rates[0][mode].push(n as f64 / t.elapsed().as_secs_f64());
            let t = std::time::Instant::now();
            for chunk in online_items.chunks(64) {
                e.insert_many(chunk, true);
            }
            rates[1][mode].push(m as f64 / t.elapsed().as_secs_f64());
            engines.push((mode, e));
        }
        engines.sort_by_key(|(mode, _)| *mode);
        let mut took: [Vec<f64>; 2] = Default::default();
        for q in queries {
            for (mode, e) in &engines {
                let t = std::time::Instant::now();
                std::hint::black_box(e.search(q, 10, 64));
                took[*mode].push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        for mode in 0..2 {
            p50s[mode].push(median(std::mem::take(&mut took[mode])));
        }
    }
    for (phase, what) in ["build (2 threads), points/s", "online, 64 a call, points/s"]
        .iter()
        .enumerate()
    {
        println!(
            "{what}: 2 ahead {:?}, {ahead} ahead {:?}: median ratio {:.3}",
            rates[phase][0]
                .iter()
                .map(|r| *r as u64)
                .collect::<Vec<_>>(),
            rates[phase][1]
                .iter()
                .map(|r| *r as u64)
                .collect::<Vec<_>>(),
            median(rates[phase][1].clone()) / median(rates[phase][0].clone()),
        );
    }
    println!(
        "search p50 (k 10, ef 64), us: 2 ahead {:?}, {ahead} ahead {:?}: median ratio {:.3}",
        p50s[0].iter().map(|r| *r as u64).collect::<Vec<_>>(),
        p50s[1].iter().map(|r| *r as u64).collect::<Vec<_>>(),
        median(p50s[1].clone()) / median(p50s[0].clone()),
    );
}

/// What the sorted pool (`Native::beam`) saves against hnswlib's two heaps (`beam_filtered`
/// keeping every node), on one graph: `N` clustered 128-d points (`native_i8`), then for each
/// of 1,000 queries a search at k 10 ef 64 (through `search_keeping`) and a level-0 beam at
/// each ef of `EFS` (comma-separated, default 200: an insert's), both ways, alternating;
/// `ROUNDS` rounds, medians of the per-round p50s. Run with
/// `cargo test --release --lib pool_beam_cost -- --ignored --nocapture`.
#[test]
#[ignore]
fn pool_beam_cost() {
    use super::hnsw::{Cand, Keep, Layer};
    let (n, rounds) = (env_or("N", 100_000), env_or("ROUNDS", 3));
    let efs: Vec<usize> = std::env::var("EFS")
        .unwrap_or_else(|_| "200".into())
        .split(',')
        .filter_map(|x| x.trim().parse().ok())
        .collect();
    let all = data(n + 1_000, 128, 11, false);
    let (base, queries) = all.split_at(n);
    let items = indexed(base);
    let e = Native::with_storage(Metric::L2, 128, &HnswConfig::default(), n, Storage::Int8)
        .with_memory(mapped());
    e.insert_many(&items, true);
    let Some((ep, top)) = *e.entry.read() else {
        return;
    };
    let keep_all = |_: u32| true;
    // [what][mode]: per-round p50s in microseconds; mode 0 the heaps, 1 the pool; what 0 the
    // search, 1 + i the beam at efs[i].
    let mut p50s: Vec<[Vec<f64>; 2]> = vec![Default::default(); 1 + efs.len()];
    for round in 0..rounds {
        let mut took: Vec<[Vec<f64>; 2]> = vec![Default::default(); 1 + efs.len()];
        for (i, q) in queries.iter().enumerate() {
            let order = if (i + round) % 2 == 0 { [0, 1] } else { [1, 0] };
            let mut bufs = super::scratch::QueryBufs::default();
            let query = e.query(q, &mut bufs);
            let mut cur = Cand {
                d: e.dist_to(&query, ep).unwrap_or(f32::INFINITY),
                id: ep,
            };
            for l in (1..=top).rev() {
                cur = e.greedy(&query, cur, l);
            }
            for mode in order {
                let keep = if mode == 0 {
                    Keep::Only(&keep_all)
                } else {
                    Keep::All
                };
                let t = std::time::Instant::now();
                std::hint::black_box(e.search_keeping(q, 10, 64, keep));
                took[0][mode].push(t.elapsed().as_secs_f64() * 1e6);
                for (j, &ef) in efs.iter().enumerate() {
                    let mut s = Scratch::default();
                    let t = std::time::Instant::now();
                    if mode == 0 {
                        e.beam_filtered(&query, cur, Layer::insert(ef, 0), &mut s, &keep_all);
                    } else {
                        e.beam(&query, cur, Layer::insert(ef, 0), &mut s);
                    }
                    std::hint::black_box(s.found.len());
                    took[1 + j][mode].push(t.elapsed().as_secs_f64() * 1e6);
                }
            }
        }
        for (what, t) in took.iter_mut().enumerate() {
            for mode in 0..2 {
                p50s[what][mode].push(median(std::mem::take(&mut t[mode])));
            }
        }
    }
    let names = std::iter::once("search k 10 ef 64".to_string())
        .chain(efs.iter().map(|ef| format!("level-0 beam ef {ef}")));
    for (what, name) in names.enumerate() {
        println!(
            "{name} p50, us: heaps {:?}, pool {:?}: pool / heaps {:.3}",
            p50s[what][0].iter().map(|r| *r as u64).collect::<Vec<_>>(),
            p50s[what][1].iter().map(|r| *r as u64).collect::<Vec<_>>(),
            median(p50s[what][1].clone()) / median(p50s[what][0].clone()),
        );
    }
}

/// A prune of a full level-0 list that skips the distances between links known to pass the
/// heuristic together builds the same graph as one that computes them all (hnswlib's way):
/// one thread, the same seed, on the 8-bit and float storages, through the clustered points
/// and then 300 points far from every cluster (the prunes that keep an outlier's link or a
/// protected one, and the adopted links that replace a slot), every list at every level is
/// the same. Over a fifth of the lists end with known links, so the shortcut was taken.
#[test]
fn known_links_build_the_same_graph() {
    let dim = 32;
    let mut points = data(4000, dim, 31, false);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(32);
    points.extend((0..300).map(|_| (0..dim).map(|_| rng.gen_range(-4.0..4.0)).collect()));
    for storage in [Storage::Int8, Storage::F32] {
        let build = |known_links: bool| {
            // M 6: lists of 12 at level 0 fill and are pruned often.
            let c = HnswConfig {
                m: 6,
                ..config(Some(9))
            };
            let mut e = Native::with_storage(Metric::L2, dim as u32, &c, 0, storage);
            e.known_links = known_links;
            for (i, v) in points.iter().enumerate() {
                e.insert(v, i);
            }
            e
        };
        let (fast, full) = (build(true), build(false));
        for id in 0..points.len() as u32 {
            for level in 0..=fast.level_of(id) {
                let ids = |e: &Native| e.linked(id, level).collect::<Vec<u32>>();
                assert_eq!(
                    ids(&fast),
                    ids(&full),
                    "{storage:?}: node {id} level {level}"
                );
            }
        }
        let known = (0..points.len() as u32)
            .filter(|&id| {
                fast.node(id)
                    .is_some_and(|(seg, off)| *seg.locks[off].lock() > 0)
            })
            .count();
        assert!(
            known > points.len() / 5,
            "{storage:?}: {known} lists with known links"
        );
    }
}

/// A standard normal sample (Box-Muller), as the benches' `common::normal`.
fn normal(rng: &mut rand_chacha::ChaCha8Rng) -> f32 {
    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
    let u2: f64 = rng.gen();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// A `dim`-d point with each coordinate N(0, 1): a mixture's centre, or an outlier.
fn gaussian(rng: &mut rand_chacha::ChaCha8Rng, dim: usize) -> Vec<f32> {
    (0..dim).map(|_| normal(rng)).collect()
}

/// A point of the scale bench's mixture: a centre picked by `pick`, plus N(0, 0.35) noise.
fn mixture_point(
    centres: &[Vec<f32>],
    pick: &mut rand_chacha::ChaCha8Rng,
    rng: &mut rand_chacha::ChaCha8Rng,
) -> Vec<f32> {
    let c = &centres[pick.gen_range(0..centres.len())];
    c.iter().map(|x| x + 0.35 * normal(rng)).collect()
}

/// Online outliers at scale (issue 20's fifth target), and why some are missed: `N` (default
/// 100,000) 128-d points of a 64-Gaussian mixture (centres N(0, 1), spread 0.35, as the scale
/// bench) built on 2 threads, recall@10 of 300 queries like them at ef 16 and 64, then `OUT`
/// (40,000) outliers N(0, 1) inserted one at a time by `THREADS` (2) threads, then optionally
/// a pass of [`Native::make_findable`] over all of them (`REPAIR=1`) and `MORE` further
/// outliers. Every 20th of the first `OUT` is searched by its own vector right after its
/// insert and at the end (ef 64 and 200); of those missed at the end it prints their
/// in-links, where the search ended (rank among the point's true neighbours) and, when that
/// was the nearest neighbour, how the two are linked. `PINS=0` turns the pins
/// ([`Native::pinned`]) off; `LINKS` (16) and `EFC` (200) set m and ef_construction. With
/// `BUILT=1` it then builds a fresh graph of all the same points at once and searches it for
/// the same sample: what a build finds, against the online inserts. Run with
/// `cargo test --release --lib online_outliers_at_scale -- --ignored --nocapture`.
///
/// Measured (2-core AMD EPYC, MORE=20000, 2 runs each): without pins 507 and 503 of 2,000
/// missed at ef 64, 171 and 173 at ef 200; with pins 356 and 338, 81 and 82; insert rates
/// and recall@10 at ef 64 within run-to-run spread (0.964-0.972). About half the misses end
/// at the point's nearest neighbour, mostly inserted after it, which ranks it 100th or so
/// among its own neighbours; a repair pass over all outliers fixed few for long (after the
/// next 20,000, 275 missed at ef 64 against 336 without it).
///
/// With `N=200000 OUT=60000 MORE=30000 BUILT=1` (2026-12-06, 2-core Intel Xeon, seeds 7 and
/// 3): 252 and 228 of 3,000 missed at ef 200 online, 223 and 216 by the one build; at m 32
/// 42 and 30, at m 48 29 and 15 (docs/scale.md, "Every point can be found").
///
/// `CHECKS=3` then runs the findability check (`Engine::check_found`) over every outlier at
/// ef `CHECK_EF` (default 200), up to 3 passes, with the recall@10 of the clustered queries
/// before and after: at ef 200 4,504, 7 and 0 linked, at ef 64 16,674, 153 and 1, then none of
/// the 3,000 missed at ef 64 or 200, the recall the same (2026-12-06).
#[test]
#[ignore]
fn online_outliers_at_scale() {
    let dim = 128;
    let (n, out, threads) = (
        env_or("N", 100_000),
        env_or("OUT", 40_000),
        env_or("THREADS", 2),
    );
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(env_or("SEED", 7) as u64);
    let centres: Vec<Vec<f32>> = (0..64).map(|_| gaussian(&mut rng, dim)).collect();
    let mut pick = rand_chacha::ChaCha8Rng::seed_from_u64(99);
    let base: Vec<Vec<f32>> = (0..n)
        .map(|_| mixture_point(&centres, &mut pick, &mut rng))
        .collect();
    let far: Vec<Vec<f32>> = (0..out).map(|_| gaussian(&mut rng, dim)).collect();
    let cfg = HnswConfig {
        m: env_or("LINKS", 16) as u32,
        ef_construction: env_or("EFC", 200) as u32,
        ef_search: 64,
        seed: None,
    };
    let mut e = Native::with_storage(Metric::L2, dim as u32, &cfg, n, Storage::Int8);
    e.pins = env_or("PINS", 1) == 1;
    let t = std::time::Instant::now();
    e.insert_many(&indexed(&base), true);
    e.link_orphans();
    println!("built {n} in {:.1} s", t.elapsed().as_secs_f64());
    let queries: Vec<Vec<f32>> = (0..300)
        .map(|_| mixture_point(&centres, &mut pick, &mut rng))
        .collect();
    let base_recall = |when: &str| {
        for ef in [16, 64] {
            let r = recall(&e, Metric::L2, &base, &queries, ef);
            println!("{when} the check: recall@10 of the base's queries at ef {ef}: {r:.4}");
        }
    };
    for ef in [16, 64] {
        let t = std::time::Instant::now();
        let r = recall(&e, Metric::L2, &base, &queries, ef);
        println!(
            "recall@10 at ef {ef}: {r:.4} ({:.1} s with exact)",
            t.elapsed().as_secs_f64()
        );
    }
    let per = far.len().div_ceil(threads);
    let t = std::time::Instant::now();
    let at_insert: Vec<(usize, bool)> = std::thread::scope(|s| {
        let hs: Vec<_> = far
            .chunks(per)
            .enumerate()
            .map(|(c, part)| {
                let e = &e;
                s.spawn(move || {
                    let mut seen = Vec::new();
                    for (j, v) in part.iter().enumerate() {
                        let id = n + c * per + j;
                        e.insert(v, id);
                        if id % 20 == 0 {
                            seen.push((id, e.search(v, 1, 64).first().map(|f| f.0) == Some(id)));
                        }
                    }
                    seen
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    println!(
        "inserted {out} outliers in {:.1} s ({:.0}/s)",
        t.elapsed().as_secs_f64(),
        out as f64 / t.elapsed().as_secs_f64()
    );
    if env_or("REPAIR", 0) >= 1 {
        let t = std::time::Instant::now();
        for (j, v) in far.iter().enumerate() {
            e.make_findable((n + j) as u32, v);
        }
        println!(
            "repair pass over {out} in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    let more = env_or("MORE", 0);
    let mut all_far = far.clone();
    if more > 0 {
        let mut r2 = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let extra: Vec<Vec<f32>> = (0..more).map(|_| gaussian(&mut r2, dim)).collect();
        let per = more.div_ceil(threads);
        std::thread::scope(|s| {
            for (c, part) in extra.chunks(per).enumerate() {
                let e = &e;
                s.spawn(move || {
                    for (j, v) in part.iter().enumerate() {
                        e.insert(v, n + out + c * per + j);
                    }
                });
            }
        });
        println!("then {more} more outliers");
        all_far.extend(extra);
    }
    // The findability check (`Engine::check_found`) over every outlier at ef `CHECK_EF`,
    // `CHECKS` passes (each stops the loop once it links none).
    if env_or("CHECKS", 0) > 0 {
        base_recall("before");
    }
    let check_ef = env_or("CHECK_EF", 200);
    for round in 0..env_or("CHECKS", 0) {
        let t = std::time::Instant::now();
        let per = all_far.len().div_ceil(threads);
        let counts: Vec<[usize; 3]> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..all_far.len())
                .collect::<Vec<_>>()
                .chunks(per)
                .map(|part| {
                    let (e, part) = (&e, part.to_vec());
                    s.spawn(move || {
                        let mut c = [0usize; 3];
                        for j in part {
                            match e.check_found(n + j, check_ef, None, &|f| f()) {
                                Checked::Linked => c[0] += 1,
                                Checked::Missed => c[1] += 1,
                                _ => c[2] += 1,
                            }
                        }
                        c
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let linked: usize = counts.iter().map(|c| c[0]).sum();
        let missed: usize = counts.iter().map(|c| c[1]).sum();
        println!(
            "check {round} at ef {check_ef}: {linked} linked, {missed} still missed, of {} in {:.1} s",
            all_far.len(),
            t.elapsed().as_secs_f64()
        );
        if linked == 0 {
            break;
        }
    }
    if env_or("CHECKS", 0) > 0 {
        base_recall("after");
    }
    let found_then = at_insert.iter().filter(|x| x.1).count();
    let mut lost = [[0usize; 4]; 2];
    let mut lost_in = Vec::new();
    let mut kept_in = Vec::new();
    let mut lost_to_base = 0;
    let mut ranks = Vec::new();
    let vector_of = |g: usize| if g < n { &base[g] } else { &all_far[g - n] };
    // How many points are nearer to `from` than `d` (itself excepted).
    let nearer = |from: &[f32], d: f32| {
        base.iter()
            .chain(all_far.iter())
            .filter(|w| {
                let dw = distance::internal(Metric::L2, from, w);
                dw > 0.0 && dw < d
            })
            .count()
    };
    let mut diag = [0usize; 7];
    let mut n0rank = Vec::new();
    let mut xrank = Vec::new();
    for &(id, _) in &at_insert {
        let v = &far[id - n];
        let quarter = (id - n) * 4 / out;
        let ins = e
            .in_links_of(id as u32)
            .map_or(0, |c| c.load(AtOrd::Relaxed));
        let got64 = e.search(v, 1, 64).first().map(|f| f.0);
        if got64 != Some(id) {
            lost[0][quarter] += 1;
            lost_in.push(ins);
            lost_to_base += usize::from(got64.is_some_and(|g| g < n));
            if let Some(g) = got64 {
                let vg = vector_of(g);
                ranks.push(nearer(v, distance::internal(Metric::L2, v, vg)));
                if ranks.last() == Some(&0) {
                    let xl: Vec<u32> = e.linked(id as u32, 0).collect();
                    let ll: Vec<u32> = e.linked(g as u32, 0).collect();
                    diag[0] += usize::from(xl.contains(&(g as u32)));
                    diag[1] += usize::from(xl.first() == Some(&(g as u32)));
                    diag[2] += usize::from(g > id);
                    diag[3] += usize::from(ll.len() < 32);
                    diag[4] += 1;
                    if let Some(&n0) = xl.first() {
                        diag[6] += usize::from(e.linked(n0, 0).any(|y| y as usize == id));
                        let vn = vector_of(n0 as usize);
                        n0rank.push(nearer(v, distance::internal(Metric::L2, v, vn)));
                    }
                    let cand: Vec<usize> =
                        e.search(vg, 200, 200).into_iter().map(|f| f.0).collect();
                    diag[5] += usize::from(cand.contains(&id));
                    xrank.push(nearer(vg, distance::internal(Metric::L2, vg, v)));
                }
            }
        } else {
            kept_in.push(ins);
        }
        if e.search(v, 1, 200).first().map(|f| f.0) != Some(id) {
            lost[1][quarter] += 1;
        }
    }
    let hist = |v: &[u16]| [4u16, 6, 8, 10, 12].map(|t| v.iter().filter(|&&x| x <= t).count());
    println!(
        "in-links <= 4, 6, 8, 10, 12: missed {:?}, found {:?}",
        hist(&lost_in),
        hist(&kept_in)
    );
    let mean = |v: &[u16]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64;
    println!(
        "sampled {}: found at ef 64 right after insert {found_then}; at the end not found at ef 64 by insert quarter {:?}, at ef 200 {:?}; missed ones' in-links mean {:.1} (found ones {:.1}); misses ending at a base point {lost_to_base}",
        at_insert.len(),
        lost[0],
        lost[1],
        mean(&lost_in),
        mean(&kept_in)
    );
    ranks.sort_unstable();
    println!("rank of where missed searches ended among the point's neighbours: {ranks:?}");
    println!("of {} missed at their nearest L: X links L {}, X's first link is L {}, L inserted after X {}, L's list not full {}", diag[4], diag[0], diag[1], diag[2], diag[3]);
    xrank.sort_unstable();
    n0rank.sort_unstable();
    println!(
        "X's first link N0 links X: {}; N0's rank among X's neighbours {n0rank:?}",
        diag[6]
    );
    println!(
        "X in a search for L at ef 200: {}; X's rank among L's neighbours {xrank:?}",
        diag[5]
    );
    if env_or("BUILT", 0) == 1 {
        // The same points in one build (the base, then every outlier): how many of the same
        // sample does a graph built with all of them find first?
        let all: Vec<Vec<f32>> = base.iter().chain(all_far.iter()).cloned().collect();
        let mut b = Native::with_storage(Metric::L2, dim as u32, &cfg, all.len(), Storage::Int8);
        b.pins = e.pins;
        let t = std::time::Instant::now();
        b.insert_many(&indexed(&all), true);
        b.link_orphans();
        let missed = |ef: usize| {
            at_insert
                .iter()
                .filter(|&&(id, _)| b.search(&all[id], 1, ef).first().map(|f| f.0) != Some(id))
                .count()
        };
        println!(
            "one build of all {} points ({:.1} s): of the {} sampled outliers not found first at ef 64 {}, at ef 200 {}",
            all.len(),
            t.elapsed().as_secs_f64(),
            at_insert.len(),
            missed(64),
            missed(200)
        );
    }
}

/// Every level-0 link is counted once in its target's in-link counter ([`Native::in_links`],
/// which the in-link floor and the pins read): after a build and online inserts, each count
/// equals the links that reach the node, as a loaded snapshot counts them again. (A prune
/// that took back a link it had just given up for another left it uncounted; the dot
/// product's hubs met that often.)
#[test]
fn in_link_counts_match_the_links() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let pts: Vec<Vec<f32>> = (0..3300)
        .map(|_| (0..12).map(|_| rng.gen_range(-1.0f32..1.0)).collect())
        .collect();
    for metric in [Metric::Dot, Metric::L2] {
        for storage in [Storage::F32, Storage::Int8] {
            let e = Native::with_storage(metric, 12, &config(Some(5)), 0, storage);
            e.insert_many(&indexed(&pts[..3000]), true);
            for (j, v) in pts[3000..].iter().enumerate() {
                e.insert(v, 3000 + j);
            }
            let mut reach = vec![0u16; pts.len()];
            for id in 0..pts.len() as u32 {
                for to in e.linked(id, 0) {
                    reach[to as usize] += 1;
                }
            }
            let counted: Vec<u16> = (0..pts.len() as u32)
                .map(|id| e.in_links_of(id).map_or(0, |c| c.load(AtOrd::Relaxed)))
                .collect();
            let wrong = (0..pts.len()).filter(|&i| counted[i] != reach[i]).count();
            assert_eq!(wrong, 0, "{metric:?} {storage:?}: counts that disagree");
        }
    }
}

/// What the pins ([`Native::pinned`]) cost inserts of points like the data: per round, `N`
/// (default 100,000) points of the scale bench's 128-d mixture built on 2 threads, then `M`
/// (20,000) more inserted one at a time by 2 threads, with pins and without, alternating which
/// goes first, `ROUNDS` (3) rounds; medians of the ratios. Run with
/// `cargo test --release --lib pins_cost -- --ignored --nocapture`.
#[test]
#[ignore]
fn pins_cost() {
    let dim = 128;
    let (n, m, rounds) = (
        env_or("N", 100_000),
        env_or("M", 20_000),
        env_or("ROUNDS", 3),
    );
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let centres: Vec<Vec<f32>> = (0..64).map(|_| gaussian(&mut rng, dim)).collect();
    let mut pick = rand_chacha::ChaCha8Rng::seed_from_u64(4);
    let points: Vec<Vec<f32>> = (0..n + m)
        .map(|_| mixture_point(&centres, &mut pick, &mut rng))
        .collect();
    let (base, online) = points.split_at(n);
    let cfg = HnswConfig {
        m: 16,
        ef_construction: 200,
        ef_search: 64,
        seed: None,
    };
    let (mut build, mut insert) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let mut rate = [[0.0f64; 2]; 2];
        for k in 0..2 {
            let pins = (round + k) % 2 == 0;
            let mut e = Native::with_storage(Metric::L2, dim as u32, &cfg, n, Storage::Int8);
            e.pins = pins;
            let t = std::time::Instant::now();
            e.insert_many(&indexed(base), true);
            rate[usize::from(pins)][0] = n as f64 / t.elapsed().as_secs_f64();
            let per = m.div_ceil(2);
            let t = std::time::Instant::now();
            std::thread::scope(|s| {
                for (c, part) in online.chunks(per).enumerate() {
                    let e = &e;
                    s.spawn(move || {
                        for (j, v) in part.iter().enumerate() {
                            e.insert(v, n + c * per + j);
                        }
                    });
                }
            });
            rate[usize::from(pins)][1] = m as f64 / t.elapsed().as_secs_f64();
        }
        println!(
            "round {round}: build {:.0} with pins, {:.0} without; online {:.0} with, {:.0} without",
            rate[1][0], rate[0][0], rate[1][1], rate[0][1]
        );
        build.push(rate[1][0] / rate[0][0]);
        insert.push(rate[1][1] / rate[0][1]);
    }
    println!(
        "with pins / without: build {:.3} ({build:.3?}), online inserts {:.3} ({insert:.3?})",
        median(build.clone()),
        median(insert.clone())
    );
}

/// The neighbour heuristic's distance with 8-bit codes (L2 and cosine) is the exact distance
/// within the codes' error, and with the other storages and dot it is the exact one.
#[test]
fn the_heuristic_compares_codes_within_their_error() {
    let dim = 64;
    for (metric, storage, codes) in [
        (Metric::L2, Storage::Int8, true),
        (Metric::Cosine, Storage::Int8, true),
        (Metric::Dot, Storage::Int8, false),
        (Metric::L2, Storage::Half, false),
        (Metric::L2, Storage::F32, false),
    ] {
        let points = data(300, dim, 41, metric != Metric::L2);
        let e = Native::with_storage(metric, dim as u32, &config(Some(3)), 0, storage);
        e.insert_many(&indexed(&points), false);
        let (mut worst, mut n) = (0.0f32, 0);
        for a in 0..40u32 {
            for b in (a + 1)..40 {
                let (Some(ka), Some(kb)) = (e.kept_vector(a), e.kept_vector(b)) else {
                    panic!("{metric:?} {storage:?}: nodes {a} and {b} have vectors");
                };
                assert_eq!(
                    matches!(ka, Kept::Codes(..)),
                    codes,
                    "{metric:?} {storage:?}"
                );
                let exact = e.dist(&points[a as usize], &points[b as usize]);
                let kept = e.kept_dist(ka, kb);
                if codes {
                    worst = worst.max((kept - exact).abs() / exact.max(1e-3));
                    n += 1;
                } else {
                    assert_eq!(kept.to_bits(), exact.to_bits(), "{metric:?} {storage:?}");
                }
            }
        }
        if codes {
            // 8-bit codes: each component within half a step of 1/127 of the largest.
            assert!(n > 0 && worst < 0.05, "{metric:?}: relative error {worst}");
        }
    }
}

/// The findability check's series in process, on the integration test's hard graph
/// (`tests/it/findable.rs`): 2,000 points of 8 tight 48-d clusters, then 3,000 scattered far
/// wider inserted one call at a time, every 7th of those deleted, m 8, ef_construction 64,
/// ef_search 8 (inserts and checks on one thread, levels seeded: the same graph every run).
/// Passes of [`Engine::check_found`] over every live point, each followed by another while it
/// links any (up to `MAX_FOLLOW_UPS`); then a search for each live point by its own vector
/// at ef_search finds it first. The seeds are four of the 8 in 0..100 where the check before
/// 2026-12-06's afternoon left 1 to 4 points unfound (none of the 100 now): the link it gave
/// did not make the confirming search find the point (from a node of a wider search's answer
/// that the point's own search had not expanded, or from none, every list's most redundant
/// link a point's last way in), or the series needed a third follow-up (88).
/// `SEEDS=n` runs seeds 0..n instead.
#[test]
fn a_series_of_checks_leaves_every_point_found_first() {
    let dim = 48;
    let seeds: Vec<u64> = match std::env::var("SEEDS").ok().and_then(|s| s.parse().ok()) {
        Some(n) => (0..n).collect(),
        None => vec![32, 68, 88, 93],
    };
    let follow_ups = crate::catalog::check::MAX_FOLLOW_UPS as usize;
    let mut failed = Vec::new();
    for seed in seeds {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let centres: Vec<Vec<f32>> = (0..8)
            .map(|_| (0..dim).map(|_| rng.gen_range(-1.0f32..1.0)).collect())
            .collect();
        let mut all: Vec<Vec<f32>> = (0..2000)
            .map(|i| {
                centres[i % 8]
                    .iter()
                    .map(|c| c + 0.05 * rng.gen_range(-1.0f32..1.0))
                    .collect()
            })
            .collect();
        all.extend((0..3000).map(|_| {
            (0..dim)
                .map(|_| 3.0 * rng.gen_range(-1.0f32..1.0))
                .collect()
        }));
        let cfg = HnswConfig {
            m: 8,
            ef_construction: 64,
            ef_search: 8,
            seed: Some(seed),
        };
        let e = Native::with_storage(Metric::L2, dim as u32, &cfg, all.len(), Storage::Int8);
        let items = indexed(&all);
        e.insert_many(&items[..2000], false);
        for call in items[2000..].chunks(10) {
            e.insert_many(call, false);
        }
        let live: Vec<bool> = (0..all.len())
            .map(|i| i < 2000 || (i - 2000) % 7 != 0)
            .collect();
        let keep = |x: usize| live[x];
        let ef = 8;
        let unfound = || {
            (0..all.len())
                .filter(|&i| live[i])
                .filter(|&i| {
                    let first = e.search_filtered(&all[i], 1, ef, &keep);
                    first.and_then(|f| f.first().map(|x| x.0)) != Some(i)
                })
                .count()
        };
        let before = unfound();
        assert!(
            before >= 20,
            "seed {seed}: only {before} unfound before the check"
        );
        let mut passes = Vec::new();
        for _ in 0..=follow_ups {
            let mut linked = 0;
            for i in (0..all.len()).filter(|&i| live[i]) {
                if e.check_found(i, ef, Some(&keep), &|f| f()) == Checked::Linked {
                    linked += 1;
                }
            }
            passes.push(linked);
            if linked == 0 {
                break;
            }
        }
        let after = unfound();
        println!("seed {seed}: {before} unfound, links per pass {passes:?}, then {after}");
        if after > 0 || passes.last() != Some(&0) {
            failed.push((seed, before, passes, after));
        }
    }
    assert!(
        failed.is_empty(),
        "(seed, unfound before, links per pass, unfound after): {failed:?}"
    );
}

/// A point whose vector equals another's, which a search for it ranks first (the same
/// distance, the smaller id): the check reports it missed and changes no list, as no link can
/// help (the other's list is given a free slot and no link to it, which a link would take);
/// the other is found first.
#[test]
fn the_check_links_nothing_for_a_point_at_the_same_place_as_another() {
    let base = data(500, 16, 3, false);
    let cfg = HnswConfig {
        m: 8,
        ef_construction: 64,
        ef_search: 16,
        seed: Some(1),
    };
    for storage in [Storage::F32, Storage::Half, Storage::Int8] {
        let e = Native::with_storage(Metric::L2, 16, &cfg, 501, storage);
        e.insert_many(&indexed(&base), false);
        e.insert(&base[123], 500);
        let others: Vec<u32> = e.linked(123, 0).filter(|&x| x != 500).take(8).collect();
        rewrite_level0(&e, 123, others);
        let lists =
            |e: &Native| -> Vec<Vec<u32>> { (0..501).map(|i| e.linked(i, 0).collect()).collect() };
        let before = lists(&e);
        assert_eq!(
            e.check_found(500, 16, None, &|f| f()),
            Checked::Missed,
            "{storage:?}"
        );
        assert_eq!(lists(&e), before, "{storage:?}: no link added or given up");
        assert_eq!(
            e.check_found(123, 16, None, &|f| f()),
            Checked::Found,
            "{storage:?}"
        );
    }
}
