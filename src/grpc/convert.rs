//! Conversions between the contract's prost types and the domain types, with validation at
//! receipt. Nothing past this module sees a prost type.

use crate::autotune::trial::Trial;
use crate::catalog::IndexView;
use crate::error::{Error, Result};
use crate::index::{Phase, ProgressView};
use crate::model::{
    default_config_from, trial_config_from, ConfigSource, GenerationMeta, Hit, HnswConfig, Metric,
    Name, NewIndex, Point, Profile, ProfileIndex, MAX_DIMENSION,
};
use crate::pb;
use crate::promotion::Promotion;
use crate::refresh::{Policy, Status as RefreshStatus};
use base64::Engine as _;

pub fn timestamp(ms: u64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    })
}

pub fn metric_from(m: i32) -> Result<Metric> {
    match pb::Metric::try_from(m) {
        Ok(pb::Metric::L2) => Ok(Metric::L2),
        Ok(pb::Metric::Cosine) => Ok(Metric::Cosine),
        Ok(pb::Metric::Dot) => Ok(Metric::Dot),
        Ok(pb::Metric::Unspecified) => Err(Error::invalid(
            "metric is required: METRIC_L2, METRIC_COSINE or METRIC_DOT",
        )),
        Err(_) => Err(Error::invalid(format!(
            "metric {m} is unknown: use METRIC_L2, METRIC_COSINE or METRIC_DOT"
        ))),
    }
}

pub fn metric_to(m: Metric) -> pb::Metric {
    match m {
        Metric::L2 => pb::Metric::L2,
        Metric::Cosine => pb::Metric::Cosine,
        Metric::Dot => pb::Metric::Dot,
    }
}

pub fn config_to(c: &HnswConfig) -> pb::HnswConfig {
    pb::HnswConfig {
        m: c.m,
        ef_construction: c.ef_construction,
        ef_search: c.ef_search,
        seed: c.seed,
    }
}

/// An index's or profile's default config: 0 fields take the server defaults.
pub fn default_config(field: &str, c: Option<pb::HnswConfig>) -> Result<HnswConfig> {
    let c = c.unwrap_or_default();
    default_config_from(field, c.m, c.ef_construction, c.ef_search, c.seed)
}

/// A trial's or grid entry's config, in the contract's trial bounds. `field` prefixes the
/// field names in errors (`"config."` or `"grid[3]."`).
pub fn trial_config(field: &str, c: Option<pb::HnswConfig>) -> Result<HnswConfig> {
    let c = c.ok_or_else(|| {
        Error::invalid("config is required: m (0 = 16, else 2..=128), ef_construction 10..=400, ef_search 10..=512")
    })?;
    trial_config_from(field, c.m, c.ef_construction, c.ef_search, c.seed)
}

pub fn name(field: &str, s: &str) -> Result<Name> {
    Name::parse(field, s)
}

/// Most bytes (UTF-8) of who did something: PromoteRequest.promoted_by, AutotuneRequest.requested_by.
pub const MAX_WHO_BYTES: usize = 256;
/// Most bytes (UTF-8) of PromoteRequest.note.
pub const MAX_NOTE_BYTES: usize = 4096;
/// Most bytes of a job id in CancelJobRequest.id (ids look like job-3).
pub const MAX_JOB_ID_BYTES: usize = 64;
/// Most bytes of a page_token (the server's own are far shorter).
pub const MAX_PAGE_TOKEN_BYTES: usize = 256;

/// A free-text field of at most `max` bytes (INVALID_ARGUMENT otherwise). The value is not
/// echoed: it may be large.
pub fn text<'a>(field: &str, s: &'a str, max: usize) -> Result<&'a str> {
    if s.len() > max {
        return Err(Error::invalid(format!(
            "{field} must be at most {max} bytes (UTF-8), got {} bytes",
            s.len()
        )));
    }
    Ok(s)
}

impl TryFrom<pb::CreateIndexRequest> for NewIndex {
    type Error = Error;
    fn try_from(r: pb::CreateIndexRequest) -> Result<Self> {
        let name = Name::parse("name", &r.name)?;
        let dimension = crate::model::in_range("dimension", r.dimension, 1..=MAX_DIMENSION)?;
        let metric = metric_from(r.metric)?;
        let default_config = default_config("default_config", r.default_config)?;
        let engine = match r.engine.as_str() {
            "" => None,
            e => Some(e.parse().map_err(Error::Invalid)?),
        };
        Ok(NewIndex {
            name,
            dimension,
            metric,
            default_config,
            engine,
        })
    }
}

pub fn points(ps: Vec<pb::Point>) -> Vec<Point> {
    ps.into_iter()
        .map(|p| Point {
            id: p.id,
            vector: p.vector,
        })
        .collect()
}

pub fn source_to(s: ConfigSource) -> pb::ConfigSource {
    match s {
        ConfigSource::Promoted => pb::ConfigSource::Promoted,
        ConfigSource::Default => pb::ConfigSource::Default,
    }
}

pub fn generation_to(index: &Name, g: &GenerationMeta) -> pb::Generation {
    pb::Generation {
        index_name: index.to_string(),
        number: g.number,
        config: Some(config_to(&g.config)),
        config_source: source_to(g.source) as i32,
        point_count: g.point_count,
        build_millis: g.build_millis,
        activate_time: timestamp(g.activate_time_ms),
        profile: g.profile.clone(),
        trial_id: g.trial_id,
    }
}

impl From<IndexView> for pb::Index {
    fn from(v: IndexView) -> Self {
        pb::Index {
            name: v.meta.name.to_string(),
            dimension: v.meta.dimension,
            metric: metric_to(v.meta.metric) as i32,
            default_config: Some(config_to(&v.meta.default_config)),
            point_count: v.point_count,
            active_generation: Some(generation_to(&v.meta.name, &v.generation)),
            create_time: timestamp(v.meta.create_time_ms),
            refresh_policy: None,
            refresh_status: None,
            tombstone_count: v.tombstones,
            deleted_fraction: v.deleted_fraction,
            unindexed_count: v.unindexed,
            compaction: Some(pb::CompactionStatus {
                compactions: v.compaction.count,
                last_compaction_time: (v.compaction.last_ms > 0)
                    .then(|| timestamp(v.compaction.last_ms))
                    .flatten(),
                running: v.compaction.running,
            }),
            findability_check: Some(pb::FindabilityCheck {
                running: v.check.running,
                passes: v.check.passes,
                points_linked: v.check.points_linked,
                last_pass_missed: v.check.last_pass_missed,
                last_pass_time: (v.check.last_ms > 0)
                    .then(|| timestamp(v.check.last_ms))
                    .flatten(),
                unchecked_points: v.check.unchecked,
            }),
            engine: v.engine.to_string(),
            build_progress: v.build.as_ref().map(progress_to),
            nodes: Vec::new(),
            desired_generation: 0,
        }
    }
}

pub fn phase_to(p: Phase) -> pb::ProgressPhase {
    match p {
        Phase::Load => pb::ProgressPhase::Load,
        Phase::Build => pb::ProgressPhase::Build,
        Phase::GroundTruth => pb::ProgressPhase::GroundTruth,
        Phase::Measure => pb::ProgressPhase::Measure,
        Phase::Snapshot => pb::ProgressPhase::Snapshot,
        Phase::Replay => pb::ProgressPhase::Replay,
    }
}

pub fn progress_to(p: &ProgressView) -> pb::Progress {
    pb::Progress {
        phase: phase_to(p.phase) as i32,
        config: p.config.as_ref().map(config_to),
        done: p.done,
        total: p.total,
        start_time: timestamp(p.started_ms),
        remaining_millis: p
            .remaining
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
    }
}

pub fn refresh_policy_to(p: &Policy) -> pb::RefreshPolicy {
    pb::RefreshPolicy {
        mode: pb::RefreshMode::OnAppend as i32,
        change_threshold: p.change_threshold,
        harness: p.harness.to_string(),
        recall_floor: p.recall_floor,
        activate: p.activate,
        target_recall: p.target_recall,
        adaptive: p.adaptive,
        min_recall: p.min_recall,
    }
}

pub fn refresh_status_to(s: &RefreshStatus) -> pb::RefreshStatus {
    pb::RefreshStatus {
        points_changed_since_tune: s.points_changed_since_tune,
        last_probe_recall: s.last_probe_recall,
        last_probe_time: (s.last_probe_time_ms > 0)
            .then(|| timestamp(s.last_probe_time_ms))
            .flatten(),

        last_trigger: s.last_trigger.clone(),
        last_job_id: s.last_job_id.clone(),
    }
}

/// A requested policy: None (or MODE_MANUAL) clears it.
pub fn refresh_policy_from(p: Option<pb::RefreshPolicy>) -> Result<Option<Policy>> {
    let Some(p) = p else { return Ok(None) };
    match pb::RefreshMode::try_from(p.mode) {
        Ok(pb::RefreshMode::Unspecified) | Ok(pb::RefreshMode::Manual) => {
            if p.recall_floor.is_some() || p.change_threshold != 0.0 {
                return Err(Error::invalid(
                    "policy.change_threshold and policy.recall_floor are only for mode \
                     REFRESH_MODE_ON_APPEND (MANUAL clears the policy)",
                ));
            }
            Ok(None)
        }
        Ok(pb::RefreshMode::OnAppend) => {
            if p.harness.is_empty() {
                return Err(Error::invalid(
                    "policy.harness is required with REFRESH_MODE_ON_APPEND: the tune and the \
                     probe measure on it",
                ));
            }
            let policy = Policy {
                change_threshold: p.change_threshold,
                harness: name("policy.harness", &p.harness)?,
                recall_floor: p.recall_floor,
                activate: p.activate,
                target_recall: p.target_recall,
                adaptive: p.adaptive,
                min_recall: p.min_recall,
            };
            crate::refresh::validate(&policy)?;
            Ok(Some(policy))
        }
        Err(_) => Err(Error::invalid(format!(
            "policy.mode {} is unknown: use REFRESH_MODE_MANUAL or REFRESH_MODE_ON_APPEND",
            p.mode
        ))),
    }
}

pub fn neighbors(hits: Vec<Hit>) -> Vec<pb::Neighbor> {
    hits.into_iter()
        .map(|h| pb::Neighbor {
            id: h.id,
            distance: h.distance,
        })
        .collect()
}

impl TryFrom<pb::Profile> for Profile {
    type Error = Error;
    fn try_from(p: pb::Profile) -> Result<Self> {
        let name = Name::parse("profile.name", &p.name)?;
        let mut seen = std::collections::HashSet::new();
        let mut indexes = Vec::with_capacity(p.indexes.len());
        for (i, pi) in p.indexes.into_iter().enumerate() {
            let index = Name::parse(&format!("profile.indexes[{i}].index_name"), &pi.index_name)?;
            if !seen.insert(index.clone()) {
                return Err(Error::invalid(format!(
                    "profile.indexes[{i}] names index {:?} again; each index may appear once",
                    index.as_str()
                )));
            }
            let default_config = pi
                .default_config
                .map(|c| default_config(&format!("profile.indexes[{i}].default_config"), Some(c)))
                .transpose()?;
            indexes.push(ProfileIndex {
                index,
                default_config,
            });
        }
        Ok(Profile { name, indexes })
    }
}

impl From<Profile> for pb::Profile {
    fn from(p: Profile) -> Self {
        pb::Profile {
            name: p.name.to_string(),
            indexes: p
                .indexes
                .into_iter()
                .map(|pi| pb::ProfileIndex {
                    index_name: pi.index.to_string(),
                    default_config: pi.default_config.as_ref().map(config_to),
                })
                .collect(),
        }
    }
}

impl From<Trial> for pb::Trial {
    fn from(t: Trial) -> Self {
        pb::Trial {
            id: t.id,
            index_name: t.index.to_string(),
            harness: t.harness.to_string(),
            config: Some(config_to(&t.config)),
            k: t.k,
            recall: t.recall,
            p50_micros: t.p50_micros,
            p95_micros: t.p95_micros,
            p99_micros: t.p99_micros,
            qps: t.qps,
            build_millis: t.build_millis,
            point_count: t.point_count,
            memory_bytes: t.memory_bytes,
            create_time: timestamp(t.create_time_ms),
            source: t.source,
            mean_distance_evals: t.mean_distance_evals,
            fidelity: match t.fidelity {
                crate::autotune::trial::Fidelity::Full => pb::Fidelity::Full,
                crate::autotune::trial::Fidelity::Sample => pb::Fidelity::Sample,
            } as i32,
            node_id: t.node_id,
        }
    }
}

impl From<Promotion> for pb::Promotion {
    fn from(p: Promotion) -> Self {
        pb::Promotion {
            index_name: p.index.to_string(),
            trial_id: p.trial_id,
            config: Some(config_to(&p.config)),
            promoted_by: p.promoted_by,
            note: p.note,
            promote_time: timestamp(p.promote_time_ms),
            recall: p.recall,
            p50_micros: p.p50_micros,
            trial_node_id: p.trial_node,
        }
    }
}

/// A cluster node's rollout of an index.
pub fn node_generation_to(n: &crate::cluster::NodeStatus) -> pb::NodeGeneration {
    pb::NodeGeneration {
        node_id: n.node_id.clone(),
        index_name: n.index.clone(),
        generation: n.generation,
        served_desired_generation: n.served,
        desired_generation: n.desired,
        current: n.current(),
        applied_sequence: n.applied,
        error: n.error.clone(),
    }
}

/// Page sizes: 0 is the default (100), at most 1000.
pub fn page_size(n: u32) -> Result<usize> {
    match n {
        0 => Ok(100),
        1..=1000 => Ok(n as usize),
        _ => Err(Error::out_of_range("page_size", "0..=1000 (0: 100)", n)),
    }
}

/// Cuts `items` (fetched with one extra) to `limit` and returns the next page's token: the key
/// of the last item kept when more followed, else empty.
pub fn next_page<T>(items: &mut Vec<T>, limit: usize, key: impl Fn(&T) -> String) -> String {
    if items.len() <= limit {
        return String::new();
    }
    items.truncate(limit);
    items
        .last()
        .map(|t| page_token_encode(&key(t)))
        .unwrap_or_default()
}

/// Page tokens are opaque to clients: "v1:" + the last key of the page, base64url.
pub fn page_token_encode(last: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("v1:{last}"))
}

pub fn page_token_decode(token: &str) -> Result<Option<String>> {
    if token.is_empty() {
        return Ok(None);
    }
    text("page_token", token, MAX_PAGE_TOKEN_BYTES)?;
    let bad = || {
        Error::invalid(format!(
            "page_token {token:?} is not a token this server issued; pass the next_page_token of an earlier response, or nothing for the first page"
        ))
    };
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let s = String::from_utf8(raw).map_err(|_| bad())?;
    s.strip_prefix("v1:")
        .map(|r| Some(r.to_string()))
        .ok_or_else(bad)
}

/// The name after which a page starts, from a page token.
pub fn page_after(token: &str) -> Result<Option<Name>> {
    page_token_decode(token)?
        .map(|s| {
            Name::parse("page_token", &s).map_err(|_| {
                Error::invalid(format!(
                    "page_token {token:?} is not a token this server issued"
                ))
            })
        })
        .transpose()
}

/// The longest request_id (cluster writes' dedupe id).
pub const MAX_REQUEST_ID_BYTES: usize = 128;

/// A write's request_id: empty, or 1 to 128 bytes of [A-Za-z0-9_.:/-].
pub fn request_id(s: &str) -> Result<&str, Error> {
    let ok = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'/' | b'-');
    if s.len() > MAX_REQUEST_ID_BYTES || !s.bytes().all(ok) {
        return Err(Error::invalid(format!(
            "request_id must be at most {MAX_REQUEST_ID_BYTES} bytes of [A-Za-z0-9_.:/-], got {} bytes",
            s.len()
        )));
    }
    Ok(s)
}

/// The caller's deadline from its grpc-timeout header (None: no deadline, or unreadable).
pub fn grpc_timeout(md: &tonic::metadata::MetadataMap) -> Option<std::time::Duration> {
    parse_grpc_timeout(md.get("grpc-timeout")?.to_str().ok()?)
}

/// A grpc-timeout header's value ("10S", "250m"...) as a duration (None: unreadable).
pub fn parse_grpc_timeout(v: &str) -> Option<std::time::Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    use std::time::Duration as D;
    Some(match unit {
        "H" => D::from_secs(n.saturating_mul(3600)),
        "M" => D::from_secs(n.saturating_mul(60)),
        "S" => D::from_secs(n),
        "m" => D::from_millis(n),
        "u" => D::from_micros(n),
        "n" => D::from_nanos(n),
        _ => return None,
    })
}

/// Property tests: whatever a client sends, conversion never panics, and either yields values
/// within their documented bounds or an INVALID_ARGUMENT (RESOURCE_EXHAUSTED only for a grid
/// over its size limit).
#[cfg(test)]
mod props {
    use super::*;
    use crate::autotune::jobs::TuneRequest;
    use crate::grpc::status::ErrorCode;
    use crate::model::{
        SearchParams, DEFAULT_CONFIG_EF_CONSTRUCTION, DEFAULT_CONFIG_M, MAX_EF_SEARCH, MAX_K,
        TRIAL_EF_CONSTRUCTION, TRIAL_EF_SEARCH, TRIAL_M,
    };
    use proptest::prelude::*;
    use tonic::Code;

    /// Names: mostly near the rules (allowed characters, lengths around 64), sometimes anything.
    fn any_name() -> impl Strategy<Value = String> {
        prop_oneof![
            "[A-Za-z0-9_.-]{0,70}",
            "[A-Za-z0-9_. /é\\x00-]{0,70}",
            any::<String>(),
        ]
    }

    fn any_u32() -> impl Strategy<Value = u32> {
        prop_oneof![0u32..3000, any::<u32>()]
    }

    fn any_config() -> impl Strategy<Value = pb::HnswConfig> {
        (any_u32(), any_u32(), any_u32(), any::<Option<u64>>()).prop_map(
            |(m, ef_construction, ef_search, seed)| pb::HnswConfig {
                m,
                ef_construction,
                ef_search,
                seed,
            },
        )
    }

    fn name_ok(n: &Name) -> bool {
        let s = n.as_str();
        (1..=64).contains(&s.len())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    }

    fn trial_ok(c: &HnswConfig) -> bool {
        TRIAL_M.contains(&c.m)
            && TRIAL_EF_CONSTRUCTION.contains(&c.ef_construction)
            && TRIAL_EF_SEARCH.contains(&c.ef_search)
    }

    fn invalid<T>(r: &Result<T>) -> bool {
        matches!(r, Err(e) if e.code() == Code::InvalidArgument && !e.to_string().is_empty())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn names(s in any_name()) {
            let r = name("name", &s);
            match &r {
                Ok(n) => prop_assert!(name_ok(n) && n.as_str() == s),
                Err(_) => prop_assert!(invalid(&r)),
            }
        }

        #[test]
        fn create_index(name in any_name(), dimension in any_u32(), metric in -2i32..6, config in proptest::option::of(any_config())) {
            let r = NewIndex::try_from(pb::CreateIndexRequest { name, dimension, metric, default_config: config, engine: String::new() });
            match &r {
                Ok(n) => {
                    prop_assert!(name_ok(&n.name));
                    prop_assert!((1..=MAX_DIMENSION).contains(&n.dimension));
                    let c = &n.default_config;
                    prop_assert!(DEFAULT_CONFIG_M.contains(&c.m));
                    prop_assert!(DEFAULT_CONFIG_EF_CONSTRUCTION.contains(&c.ef_construction));
                    prop_assert!((1..=MAX_EF_SEARCH).contains(&c.ef_search));
                }
                Err(_) => prop_assert!(invalid(&r)),
            }
        }

        #[test]
        fn trial_configs(config in proptest::option::of(any_config())) {
            let r = trial_config("config.", config);
            match &r {
                Ok(c) => prop_assert!(trial_ok(c)),
                Err(_) => prop_assert!(invalid(&r)),
            }
        }

        #[test]
        fn search_params(k in any_u32(), ef in proptest::option::of(any_u32())) {
            let r = SearchParams::parse(k, ef);
            match &r {
                Ok(p) => {
                    prop_assert!((1..=MAX_K).contains(&(p.k as u32)));
                }
                Err(_) => prop_assert!(invalid(&r)),
            }
        }

        #[test]
        fn page_tokens(raw in prop_oneof![any::<String>(), "v1:[A-Za-z0-9_. -]{0,70}".prop_map(|s| page_token_encode(&s)), "[A-Za-z0-9_-]{0,40}"]) {
            let r = page_token_decode(&raw);
            prop_assert!(r.is_ok() || invalid(&r));
            let r = page_after(&raw);
            match &r {
                Ok(Some(n)) => prop_assert!(name_ok(n)),
                Ok(None) => prop_assert!(raw.is_empty()),
                Err(_) => prop_assert!(invalid(&r)),
            }
        }

        #[test]
        fn page_sizes(n in any_u32()) {
            let r = page_size(n);
            match &r {
                Ok(s) => prop_assert!((1..=1000).contains(s)),
                Err(_) => prop_assert!(invalid(&r)),
            }
        }

        #[test]
        fn profiles(name in any_name(), entries in proptest::collection::vec((any_name(), proptest::option::of(any_config())), 0..6)) {
            let r = Profile::try_from(pb::Profile {
                name,
                indexes: entries.into_iter().map(|(index_name, default_config)| pb::ProfileIndex { index_name, default_config }).collect(),
            });
            match &r {
                Ok(p) => {
                    prop_assert!(name_ok(&p.name));
                    let mut seen = std::collections::HashSet::new();
                    for pi in &p.indexes {
                        prop_assert!(name_ok(&pi.index));
                        prop_assert!(seen.insert(pi.index.clone()), "an index twice");
                    }
                }
                Err(_) => prop_assert!(invalid(&r)),
            }
        }

        #[test]
        fn autotune_requests(
            index in any_name(),
            harness in any_name(),
            min_recall in proptest::option::of(prop_oneof![-1.0f64..2.0, any::<f64>()]),
            grid in proptest::collection::vec(any_config(), 0..4),
            objective in -1i32..4,
            target_recall in proptest::option::of(prop_oneof![-1.0f64..2.0, any::<f64>()]),
            strategy in -1i32..4,
            budget in proptest::option::of((any::<u32>(), any::<u32>())),
            seed in proptest::option::of(any::<u64>()),
            adaptive_m in proptest::collection::vec(prop_oneof![0u32..200, any::<u32>()], 0..10),
            adaptive_ef_construction in proptest::collection::vec(prop_oneof![0u32..500, any::<u32>()], 0..10),
        ) {
            let r = TuneRequest::try_from(pb::AutotuneRequest {
                index_name: index,
                harness,
                min_recall,
                grid,
                activate: false,
                requested_by: String::new(),
                objective,
                target_recall,
                strategy,
                budget: budget.map(|(max_trials, max_seconds)| pb::AdaptiveBudget { max_trials, max_seconds }),
                seed,
                adaptive_m,
                adaptive_ef_construction,
                adaptive_sample_points: None,
                adaptive_confirm: 0,
            });
            match &r {
                Ok(t) => {
                    prop_assert!(name_ok(&t.index) && name_ok(&t.harness));
                    prop_assert!((0.0..=1.0).contains(&t.min_recall));
                    match &t.adaptive {
                        None => prop_assert!(!t.grid.is_empty() && t.grid.iter().all(trial_ok)),
                        Some(plan) => {
                            prop_assert!(t.grid.is_empty());
                            prop_assert!((0.0..=1.0).contains(&plan.target));
                            prop_assert!(!plan.m.is_empty() && plan.m.iter().all(|m| (2..=128).contains(m)));
                            prop_assert!(!plan.ef_construction.is_empty());
                            prop_assert!(plan.ef_construction.windows(2).all(|w| w[0] < w[1]));
                            prop_assert!(plan.max_trials >= 1);
                        }
                    }
                }
                Err(_) => prop_assert!(invalid(&r)),
            }
        }
    }

    #[test]
    fn a_grid_over_its_limit_is_resource_exhausted() {
        let r = TuneRequest::try_from(pb::AutotuneRequest {
            index_name: "i".into(),
            harness: "h".into(),
            grid: vec![pb::HnswConfig::default(); 1001],
            ..Default::default()
        });
        assert!(matches!(r, Err(e) if e.code() == Code::ResourceExhausted));
    }
}
