//! Trial records: one measured build-and-evaluate of a config, a row of the journal.

use serde::{Deserialize, Serialize};

use crate::model::{HnswConfig, Name};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Trial {
    pub id: u64,
    pub index: Name,
    pub harness: Name,
    pub config: HnswConfig,
    pub k: u32,
    pub recall: f64,
    pub p50_micros: f64,
    pub p95_micros: f64,
    pub p99_micros: f64,
    pub qps: f64,
    pub build_millis: u64,
    pub point_count: u64,
    pub memory_bytes: u64,
    pub create_time_ms: u64,
    /// `"manual"` or `"autotune:<job id>"`.
    pub source: String,
    /// Mean distance computations per query; 0 for trials journaled before it was recorded.
    #[serde(default)]
    pub mean_distance_evals: f64,
    /// On what points it was measured: all the index's (every trial journaled before
    /// multi-fidelity autotune) or a sample (multi-fidelity ADAPTIVE's first phase).
    #[serde(default)]
    pub fidelity: Fidelity,
    /// Cluster only: the node that ran the trial (built and measured its graph); empty on a
    /// single node.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node_id: String,
}

/// The points a trial's graph was built over and its recall measured against.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Fidelity {
    /// All the index's points, with the harness's ground truth.
    #[default]
    Full,
    /// A seeded sample of them (`point_count` of them), with ground truth computed over the
    /// sample. Never picked, promoted or activated; left out of Pareto fronts unless asked.
    Sample,
}

impl Trial {
    pub fn is_full(&self) -> bool {
        self.fidelity == Fidelity::Full
    }
}
