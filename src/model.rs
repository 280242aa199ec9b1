//! Domain types: what the core works with once a request has been validated at the edge.
//!
//! A value of one of these types is valid by construction: names match the allowed alphabet,
//! configs are in their bounds, vectors are finite and of the index's dimension.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::index::engine::EngineKind;

/// Server defaults for a config field left 0.
pub const DEFAULT_M: u32 = 16;
pub const DEFAULT_EF_CONSTRUCTION: u32 = 200;
pub const DEFAULT_EF_SEARCH: u32 = 64;

pub const MAX_DIMENSION: u32 = 4096;
pub const MAX_K: u32 = 1000;
pub const MAX_EF_SEARCH: u32 = 10_000;

/// Bounds of an index's or profile's default config (0 takes the server default).
pub const DEFAULT_CONFIG_M: std::ops::RangeInclusive<u32> = 2..=128;
pub const DEFAULT_CONFIG_EF_CONSTRUCTION: std::ops::RangeInclusive<u32> = 10..=2000;
/// Bounds of a trial's or autotune grid's config, from the contract.
pub const TRIAL_M: std::ops::RangeInclusive<u32> = 2..=128;
pub const TRIAL_EF_CONSTRUCTION: std::ops::RangeInclusive<u32> = 10..=400;
pub const TRIAL_EF_SEARCH: std::ops::RangeInclusive<u32> = 10..=512;

/// Milliseconds since the Unix epoch.
pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Checks `value` against `range`, naming the field in the error.
pub fn in_range<T: PartialOrd + fmt::Display + Copy>(
    field: &str,
    value: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<T> {
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(Error::out_of_range(
            field,
            format!("{}..={}", range.start(), range.end()),
            value,
        ))
    }
}

/// The name of an index, profile or harness: 1 to 64 characters of `[A-Za-z0-9_.-]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Name(String);

impl Name {
    pub fn parse(field: &str, s: &str) -> Result<Self> {
        if s.is_empty() {
            return Err(Error::invalid(format!(
                "{field} is required: 1 to 64 characters of [A-Za-z0-9_.-]"
            )));
        }
        if s.len() > 64 {
            return Err(Error::invalid(format!(
                "{field} must be at most 64 characters of [A-Za-z0-9_.-], got {} characters",
                s.chars().count()
            )));
        }
        if let Some(bad) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
        {
            return Err(Error::invalid(format!(
                "{field} {s:?} has the character {bad:?}; allowed are [A-Za-z0-9_.-]"
            )));
        }
        Ok(Name(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Metric {
    L2,
    Cosine,
    Dot,
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Metric::L2 => "l2",
            Metric::Cosine => "cosine",
            Metric::Dot => "dot",
        })
    }
}

/// A complete HNSW config: every field decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HnswConfig {
    pub m: u32,
    pub ef_construction: u32,
    pub ef_search: u32,
    /// Drives the insertion order; when set the graph is built on one thread, so the same seed,
    /// points and config build the same graph.
    pub seed: Option<u64>,
}

impl Default for HnswConfig {
    fn default() -> Self {
        HnswConfig {
            m: DEFAULT_M,
            ef_construction: DEFAULT_EF_CONSTRUCTION,
            ef_search: DEFAULT_EF_SEARCH,
            seed: None,
        }
    }
}

impl fmt::Display for HnswConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "m={} ef_construction={} ef_search={} seed={:?}",
            self.m, self.ef_construction, self.ef_search, self.seed
        )
    }
}

/// Where the config of a generation came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConfigSource {
    Promoted,
    Default,
}

/// What is recorded of a built graph that serves (or served) an index.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerationMeta {
    pub number: u64,
    pub config: HnswConfig,
    pub source: ConfigSource,
    pub point_count: u64,
    pub build_millis: u64,
    pub activate_time_ms: u64,
    /// The profile whose activation built it; empty otherwise.
    pub profile: String,
    /// The trial whose graph became this generation (autotune's winner adopted at activation,
    /// no second build); 0 when the graph was built for this generation.
    #[serde(default)]
    pub trial_id: u64,
}

/// An index as stored: what it is, independent of its points.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IndexMeta {
    pub name: Name,
    /// Unique per incarnation: a deleted and re-created index never sees the old points.
    pub uid: u64,
    pub dimension: u32,
    pub metric: Metric,
    pub default_config: HnswConfig,
    pub create_time_ms: u64,
    /// The engine its graphs are built with. None (an index created before the engine was
    /// stored): it follows the server's `--engine`, as it always did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<EngineKind>,
}

/// A request to create an index, validated.
#[derive(Clone, Debug)]
pub struct NewIndex {
    pub name: Name,
    pub dimension: u32,
    pub metric: Metric,
    pub default_config: HnswConfig,
    /// None: the server's `--engine` (stored in the index, so a later flag does not change it).
    pub engine: Option<EngineKind>,
}

/// A config as given for an index's or profile's default: 0 fields take the server defaults.
pub fn default_config_from(
    field: &str,
    m: u32,
    ef_construction: u32,
    ef_search: u32,
    seed: Option<u64>,
) -> Result<HnswConfig> {
    let m = if m == 0 { DEFAULT_M } else { m };
    let ef_construction = if ef_construction == 0 {
        DEFAULT_EF_CONSTRUCTION
    } else {
        ef_construction
    };
    let ef_search = if ef_search == 0 {
        DEFAULT_EF_SEARCH
    } else {
        ef_search
    };
    Ok(HnswConfig {
        m: in_range(&format!("{field}.m"), m, DEFAULT_CONFIG_M)?,
        ef_construction: in_range(
            &format!("{field}.ef_construction"),
            ef_construction,
            DEFAULT_CONFIG_EF_CONSTRUCTION,
        )?,
        ef_search: in_range(&format!("{field}.ef_search"), ef_search, 1..=MAX_EF_SEARCH)?,
        seed,
    })
}

/// A config as given for a trial or an autotune grid entry: m 0 means 16, the rest must be set
/// and within the contract's bounds.
pub fn trial_config_from(
    field: &str,
    m: u32,
    ef_construction: u32,
    ef_search: u32,
    seed: Option<u64>,
) -> Result<HnswConfig> {
    let m = if m == 0 { DEFAULT_M } else { m };
    Ok(HnswConfig {
        m: in_range(&format!("{field}m"), m, TRIAL_M)?,
        ef_construction: in_range(
            &format!("{field}ef_construction"),
            ef_construction,
            TRIAL_EF_CONSTRUCTION,
        )?,
        ef_search: in_range(&format!("{field}ef_search"), ef_search, TRIAL_EF_SEARCH)?,
        seed,
    })
}

/// A point as accepted: a finite vector of the index's dimension (checked by the core, which
/// knows the index).
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    pub id: u64,
    pub vector: Vec<f32>,
}

/// Checks a vector against an index's dimension and finiteness; `what` names it in the error.
pub fn check_vector(what: &str, v: &[f32], dimension: u32) -> Result<()> {
    if v.len() != dimension as usize {
        return Err(Error::invalid(format!(
            "{what} has {} values; the index's dimension is {dimension}",
            v.len()
        )));
    }
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(Error::invalid(format!(
            "{what} has a non-finite value ({}) at position {i}; values must be finite",
            v[i]
        )));
    }
    Ok(())
}

/// Scales `v` to unit length for the cosine metric; a zero vector has no direction.
pub fn normalize(what: &str, v: &mut [f32]) -> Result<()> {
    let norm = v
        .iter()
        .map(|x| (*x as f64) * (*x as f64))
        .sum::<f64>()
        .sqrt();
    if norm == 0.0 || !norm.is_finite() {
        return Err(Error::invalid(format!(
            "{what} has no direction (norm {norm}); the cosine metric needs a non-zero vector"
        )));
    }
    for x in v.iter_mut() {
        *x = (*x as f64 / norm) as f32;
    }
    Ok(())
}

/// One search hit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hit {
    pub id: u64,
    pub distance: f32,
}

/// A search request, validated except for the vector (checked against the index by the core).
#[derive(Clone, Debug)]
pub struct SearchParams {
    pub k: usize,
    pub ef_search: Option<usize>,
}

impl SearchParams {
    pub fn parse(k: u32, ef_search: Option<u32>) -> Result<Self> {
        let k = in_range("k", k, 1..=MAX_K)?;
        let ef = ef_search
            .map(|e| in_range("ef_search", e, 1..=MAX_EF_SEARCH))
            .transpose()?;
        Ok(SearchParams {
            k: k as usize,
            ef_search: ef.map(|e| e as usize),
        })
    }
}

/// A profile: a named list of indexes, each with an optional default config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub name: Name,
    pub indexes: Vec<ProfileIndex>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProfileIndex {
    pub index: Name,
    pub default_config: Option<HnswConfig>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_allow_only_the_alphabet() {
        assert!(Name::parse("name", "threat_intel_v1.a-b").is_ok());
        assert!(Name::parse("name", "").is_err());
        assert!(Name::parse("name", "a b").is_err());
        assert!(Name::parse("name", &"x".repeat(65)).is_err());
        assert!(Name::parse("name", &"x".repeat(64)).is_ok());
        assert!(Name::parse("name", "é").is_err());
    }

    #[test]
    fn trial_bounds_name_the_field() {
        let e = trial_config_from("grid[2].", 0, 5, 30, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "grid[2].ef_construction must be in 10..=400, got 5"
        );
        assert_eq!(trial_config_from("", 0, 10, 10, None).unwrap().m, 16);
        assert!(trial_config_from("", 129, 10, 10, None).is_err());
        assert!(trial_config_from("", 1, 10, 10, None).is_err());
        assert!(trial_config_from("", 16, 10, 513, None).is_err());
        assert_eq!(
            trial_config_from("", 16, 10, 512, None).unwrap().ef_search,
            512
        );
    }

    #[test]
    fn normalize_rejects_zero() {
        let mut v = vec![0.0, 0.0];
        assert!(normalize("vector", &mut v).is_err());
        let mut v = vec![3.0, 4.0];
        normalize("vector", &mut v).unwrap();
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
    }
}
