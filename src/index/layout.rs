//! The order of a build's internal ids: points near each other get ids near each other.
//!
//! An engine keeps a node's links and search vector at a place given by its internal id, and
//! a beam reads them at every node it meets. When ids follow the order the points arrived in
//! (a user's ids, usually unrelated to where the points lie), the nodes one beam meets are
//! spread over the whole graph; when they follow the data, they are mostly within a few
//! hundred kilobytes, which the caches keep. So a build first puts the points in buckets by
//! their nearest of `n / BUCKET` sample points (evenly spaced in the build's order, so a seeded
//! build orders the same way every time), then numbers them bucket by bucket. It still inserts
//! them in its own order, so the graph is built the same way; only where each node lives
//! changes, and which points sit on upper levels (an engine draws a node's level from its id),
//! so it is another draw of the same random graph. Nothing depends on the order for
//! correctness. Measured in docs/engines.md ("Id order").

use rayon::prelude::*;

use super::distance;
use crate::error::{Error, Result};

/// Points a bucket holds on average: a bucket's links and 8-bit codes at 128-d are then about
/// 270 KB, within a core's L2 cache.
const BUCKET: usize = 1024;

/// At most this many buckets, which bounds the ordering's cost at `n * MAX_BUCKETS` distances
/// (about 1 % of a build's time).
const MAX_BUCKETS: usize = 256;

/// Below this many points the whole graph stays in cache anyway: ids keep the build's order.
pub(super) const MIN_POINTS: usize = 4 * BUCKET;

/// Points assigned to buckets between two checks of the cancellation flag.
const CHUNK: usize = 1 << 16;

/// For each vector (by position), its internal id: a permutation of `0..vectors.len()` that
/// numbers the vectors bucket by bucket (module docs), or the identity below [`MIN_POINTS`].
/// Polls `cancelled` between chunks of [`CHUNK`] vectors.
pub(super) fn locality_rank(
    vectors: &[&[f32]],
    cancelled: &dyn Fn() -> bool,
) -> Result<Vec<usize>> {
    let n = vectors.len();
    #[cfg(test)]
    if tests::OFF.with(|off| off.get()) {
        return Ok((0..n).collect());
    }
    if n < MIN_POINTS {
        return Ok((0..n).collect());
    }
    let k = (n / BUCKET).clamp(2, MAX_BUCKETS);
    let centres: Vec<&[f32]> = (0..k).map(|c| vectors[c * n / k]).collect();
    let mut bucket: Vec<u32> = Vec::with_capacity(n);
    for chunk in vectors.chunks(CHUNK) {
        if cancelled() {
            return Err(Error::Cancelled("the build was cancelled".into()));
        }
        bucket.par_extend(chunk.par_iter().map(|v| nearest(v, &centres)));
    }
    // A stable sort keeps the build's order within a bucket.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&j| bucket[j]);
    let mut rank = vec![0; n];
    for (r, &j) in order.iter().enumerate() {
        rank[j] = r;
    }
    Ok(rank)
}

/// The position in `centres` of the one nearest `v` (squared L2; the first of equals).
fn nearest(v: &[f32], centres: &[&[f32]]) -> u32 {
    let mut best = (f32::INFINITY, 0u32);
    for (c, centre) in centres.iter().enumerate() {
        let d = distance::l2sq(v, centre);
        if d < best.0 {
            best = (d, c as u32);
        }
    }
    best.1
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    thread_local! {
        /// Set by measuring tests to build in the build's own id order on this thread.
        pub(crate) static OFF: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// `n` points around `clusters` far-apart centres, in random cluster order; returns the
    /// points and each one's cluster.
    fn clustered(n: usize, clusters: usize, dim: usize) -> (Vec<Vec<f32>>, Vec<usize>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let centres: Vec<Vec<f32>> = (0..clusters)
            .map(|_| (0..dim).map(|_| rng.gen_range(-1.0f32..1.0)).collect())
            .collect();
        (0..n)
            .map(|_| {
                let c = rng.gen_range(0..clusters);
                let v = centres[c]
                    .iter()
                    .map(|x| x + rng.gen_range(-0.05f32..0.05))
                    .collect();
                (v, c)
            })
            .unzip()
    }

    #[test]
    fn ids_follow_the_data_and_are_a_permutation() {
        let (points, cluster) = clustered(20_000, 16, 32);
        let vectors: Vec<&[f32]> = points.iter().map(|v| v.as_slice()).collect();
        let rank = locality_rank(&vectors, &|| false).unwrap();
        let mut seen = vec![false; rank.len()];
        for &r in &rank {
            assert!(!seen[r], "internal id {r} given twice");
            seen[r] = true;
        }
        // Each cluster's points fill a few runs of ids (its buckets, or the bucket of the
        // nearest sample when none of its own was sampled); in the build's order they are
        // spread over every block of 1,024 ids.
        let blocks = |id_of: &dyn Fn(usize) -> usize| {
            let mut used = vec![std::collections::BTreeSet::new(); 16];
            for (j, &c) in cluster.iter().enumerate() {
                used[c].insert(id_of(j) / 1024);
            }
            used.iter().map(|b| b.len()).sum::<usize>() as f64 / 16.0
        };
        let (ordered, arrived) = (blocks(&|j| rank[j]), blocks(&|j| j));
        assert!(ordered <= 5.0, "{ordered} blocks a cluster");
        assert!(
            arrived >= 19.0,
            "{arrived} blocks a cluster in the build's order"
        );
        // The same points give the same ids.
        assert_eq!(locality_rank(&vectors, &|| false).unwrap(), rank);
    }

    #[test]
    fn few_points_keep_their_order_and_a_cancelled_build_stops() {
        let (points, _) = clustered(MIN_POINTS - 1, 4, 8);
        let vectors: Vec<&[f32]> = points.iter().map(|v| v.as_slice()).collect();
        let rank = locality_rank(&vectors, &|| false).unwrap();
        assert_eq!(rank, (0..vectors.len()).collect::<Vec<_>>());
        let (points, _) = clustered(MIN_POINTS, 4, 8);
        let vectors: Vec<&[f32]> = points.iter().map(|v| v.as_slice()).collect();
        assert!(matches!(
            locality_rank(&vectors, &|| true),
            Err(Error::Cancelled(_))
        ));
    }
}
