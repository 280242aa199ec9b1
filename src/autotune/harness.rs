//! Harnesses: query vectors with their exact k nearest points (the ground truth).
//!
//! The ground truth is stored with the index's data version it was computed at; a trial on an
//! index whose points changed since recomputes it and stores it again. A sampled query is a
//! stored point: it is excluded from its own ground truth and from its measured results, so
//! recall is not inflated by self-matches.

use rand::SeedableRng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::index::{distance, Progress};
use crate::model::{Metric, Name, Point};

pub const DEFAULT_K: u32 = 10;
pub const DEFAULT_SEED: u64 = 42;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Query {
    /// Prepared for the index (normalised for cosine).
    pub vector: Vec<f32>,
    /// The stored point this query was sampled from, excluded from its truth and results.
    pub exclude: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GroundTruth {
    pub data_version: u64,
    /// Per query, the exact nearest ids, nearest first (at most k).
    pub neighbors: Vec<Vec<u64>>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Harness {
    pub index: Name,
    pub name: Name,
    pub k: u32,
    /// Set when the queries were sampled.
    pub seed: Option<u64>,
    pub create_time_ms: u64,
    pub queries: Vec<Query>,
    pub truth: GroundTruth,
}

/// How the queries of a new harness are chosen.
#[derive(Clone, Debug)]
pub enum QuerySpec {
    Sampled { count: u32, seed: u64 },
    Explicit(Vec<Vec<f32>>),
}

/// Picks `count` distinct points with `seed`: the same points (by id) and seed give the same
/// queries.
pub fn sample(points: &[Point], count: usize, seed: u64) -> Vec<Query> {
    let mut sorted: Vec<&Point> = points.iter().collect();
    sorted.sort_unstable_by_key(|p| p.id);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut picked = rand::seq::index::sample(&mut rng, sorted.len(), count).into_vec();
    picked.sort_unstable();
    picked
        .into_iter()
        .map(|i| Query {
            vector: sorted[i].vector.clone(),
            exclude: Some(sorted[i].id),
        })
        .collect()
}

/// The exact k nearest points of every query, on all cores (call off the async runtime).
pub fn ground_truth(
    metric: Metric,
    points: &[Point],
    queries: &[Query],
    k: usize,
) -> Vec<Vec<u64>> {
    ground_truth_tracked(metric, points, queries, k, None)
}

/// [`ground_truth`], counting the queries done in `progress` (one relaxed add per query).
pub fn ground_truth_tracked(
    metric: Metric,
    points: &[Point],
    queries: &[Query],
    k: usize,
    progress: Option<&Progress>,
) -> Vec<Vec<u64>> {
    queries
        .par_iter()
        .map(|q| {
            let mut best: Vec<(f32, u64)> = Vec::with_capacity(k + 1);
            for p in points {
                if Some(p.id) == q.exclude {
                    continue;
                }
                let d = distance::exact(metric, &q.vector, &p.vector);
                if best.len() < k || d < best[best.len() - 1].0 {
                    let at = best.partition_point(|(bd, bid)| (*bd, *bid) <= (d, p.id));
                    best.insert(at, (d, p.id));
                    best.truncate(k);
                }
            }
            if let Some(p) = progress {
                p.add_done(1);
            }
            best.into_iter().map(|(_, id)| id).collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pts(n: u64) -> Vec<Point> {
        (0..n)
            .map(|i| Point {
                id: i,
                vector: vec![i as f32, 0.0],
            })
            .collect()
    }

    #[test]
    fn sampling_is_deterministic_and_distinct() {
        let p = pts(100);
        let a = sample(&p, 10, 42);
        let b = sample(&p, 10, 42);
        let c = sample(&p, 10, 43);
        let ids = |q: &[Query]| q.iter().map(|q| q.exclude.unwrap()).collect::<Vec<_>>();
        assert_eq!(ids(&a), ids(&b));
        assert_ne!(ids(&a), ids(&c));
        let mut d = ids(&a);
        d.dedup();
        assert_eq!(d.len(), 10);
    }

    #[test]
    fn truth_excludes_the_query_itself() {
        let p = pts(10);
        let q = vec![Query {
            vector: vec![5.0, 0.0],
            exclude: Some(5),
        }];
        let t = ground_truth(Metric::L2, &p, &q, 3);
        assert_eq!(t[0][0..1], [4]);
        assert!(!t[0].contains(&5));
        assert_eq!(t[0].len(), 3);
    }
}
