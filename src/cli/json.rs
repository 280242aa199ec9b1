//! The prost types as JSON with the proto field names (snake_case): u64 as numbers, enums by
//! their proto names, timestamps in RFC 3339, unset messages as null.

use serde_json::{json, Value};
use vectord::pb;

pub fn timestamp(t: &Option<prost_types::Timestamp>) -> Value {
    t.as_ref()
        .map_or(Value::Null, |t| Value::String(t.to_string()))
}

fn opt<T>(v: &Option<T>, f: impl Fn(&T) -> Value) -> Value {
    v.as_ref().map_or(Value::Null, f)
}

pub fn metric_name(m: i32) -> &'static str {
    pb::Metric::try_from(m).map_or("METRIC_UNKNOWN", |m| m.as_str_name())
}

pub fn config(c: &pb::HnswConfig) -> Value {
    json!({
        "m": c.m,
        "ef_construction": c.ef_construction,
        "ef_search": c.ef_search,
        "seed": c.seed,
    })
}

pub fn generation(g: &pb::Generation) -> Value {
    json!({
        "index_name": g.index_name,
        "number": g.number,
        "config": opt(&g.config, config),
        "config_source": pb::ConfigSource::try_from(g.config_source)
            .map_or("CONFIG_SOURCE_UNKNOWN", |s| s.as_str_name()),
        "point_count": g.point_count,
        "build_millis": g.build_millis,
        "activate_time": timestamp(&g.activate_time),
        "profile": g.profile,
        "trial_id": g.trial_id,
    })
}

pub fn index(i: &pb::Index) -> Value {
    json!({
        "name": i.name,
        "dimension": i.dimension,
        "metric": metric_name(i.metric),
        "default_config": opt(&i.default_config, config),
        "point_count": i.point_count,
        "active_generation": opt(&i.active_generation, generation),
        "create_time": timestamp(&i.create_time),
        "refresh_policy": opt(&i.refresh_policy, refresh_policy),
        "refresh_status": opt(&i.refresh_status, refresh_status),
        "build_progress": opt(&i.build_progress, progress),
        "findability_check": opt(&i.findability_check, findability_check),
    })
}

pub fn findability_check(c: &pb::FindabilityCheck) -> Value {
    json!({
        "running": c.running,
        "passes": c.passes,
        "points_linked": c.points_linked,
        "last_pass_missed": c.last_pass_missed,
        "last_pass_time": timestamp(&c.last_pass_time),
        "unchecked_points": c.unchecked_points,
    })
}

pub fn refresh_policy(p: &pb::RefreshPolicy) -> Value {
    json!({
        "mode": pb::RefreshMode::try_from(p.mode).map_or("REFRESH_MODE_UNSPECIFIED", |m| m.as_str_name()),
        "change_threshold": p.change_threshold,
        "harness": p.harness,
        "recall_floor": p.recall_floor,
        "activate": p.activate,
        "target_recall": p.target_recall,
        "adaptive": p.adaptive,
        "min_recall": p.min_recall,
    })
}

pub fn refresh_status(s: &pb::RefreshStatus) -> Value {
    json!({
        "points_changed_since_tune": s.points_changed_since_tune,
        "last_probe_recall": s.last_probe_recall,
        "last_probe_time": timestamp(&s.last_probe_time),
        "last_trigger": s.last_trigger,
        "last_job_id": s.last_job_id,
    })
}

pub fn trial(t: &pb::Trial) -> Value {
    json!({
        "id": t.id,
        "index_name": t.index_name,
        "harness": t.harness,
        "config": opt(&t.config, config),
        "k": t.k,
        "recall": t.recall,
        "p50_micros": t.p50_micros,
        "p95_micros": t.p95_micros,
        "p99_micros": t.p99_micros,
        "qps": t.qps,
        "build_millis": t.build_millis,
        "point_count": t.point_count,
        "memory_bytes": t.memory_bytes,
        "create_time": timestamp(&t.create_time),
        "source": t.source,
        "mean_distance_evals": t.mean_distance_evals,
        "fidelity": pb::Fidelity::try_from(t.fidelity)
            .map_or("FIDELITY_UNKNOWN", |f| f.as_str_name()),
    })
}

pub fn promotion(p: &pb::Promotion) -> Value {
    json!({
        "index_name": p.index_name,
        "trial_id": p.trial_id,
        "config": opt(&p.config, config),
        "promoted_by": p.promoted_by,
        "note": p.note,
        "promote_time": timestamp(&p.promote_time),
        "recall": p.recall,
        "p50_micros": p.p50_micros,
    })
}

pub fn opt_promotion(p: &Option<pb::Promotion>) -> Value {
    opt(p, promotion)
}

pub fn harness(h: &pb::Harness) -> Value {
    json!({
        "index_name": h.index_name,
        "name": h.name,
        "k": h.k,
        "query_count": h.query_count,
        "seed": h.seed,
        "create_time": timestamp(&h.create_time),
    })
}

pub fn job_state_name(s: i32) -> &'static str {
    pb::JobState::try_from(s).map_or("JOB_STATE_UNKNOWN", |s| s.as_str_name())
}

pub fn job(j: &pb::Job) -> Value {
    json!({
        "id": j.id,
        "index_name": j.index_name,
        "harness": j.harness,
        "state": job_state_name(j.state),
        "trials_done": j.trials_done,
        "trials_total": j.trials_total,
        "start_time": timestamp(&j.start_time),
        "end_time": timestamp(&j.end_time),
        "requested_by": j.requested_by,
        "graphs_built": j.graphs_built,
        "reason": j.reason,
    })
}

pub fn profile(p: &pb::Profile) -> Value {
    json!({
        "name": p.name,
        "indexes": p.indexes.iter().map(|i| json!({
            "index_name": i.index_name,
            "default_config": opt(&i.default_config, config),
        })).collect::<Vec<_>>(),
    })
}

pub fn neighbor(n: &pb::Neighbor) -> Value {
    json!({ "id": n.id, "distance": n.distance })
}

/// One autotune stream event, flattened: `{"event": "started" | "trial" | "finished", ...}`.
pub fn autotune_event(e: &pb::autotune_response::Event) -> Value {
    use pb::autotune_response::Event;
    match e {
        Event::Started(s) => json!({
            "event": "started",
            "job_id": s.job_id,
            "grid": s.grid.iter().map(config).collect::<Vec<_>>(),
            "strategy": pb::Strategy::try_from(s.strategy)
                .map_or("STRATEGY_UNSPECIFIED", |x| x.as_str_name()),
        }),
        Event::Trial(t) => {
            let mut v = trial(t);
            if let Value::Object(map) = &mut v {
                map.insert("event".into(), "trial".into());
            }
            v
        }
        Event::Progress(p) => json!({
            "event": "progress",
            "job_id": p.job_id,
            "activities": p.activities.iter().map(progress).collect::<Vec<_>>(),
        }),
        Event::Finished(f) => json!({
            "event": "finished",
            "job_id": f.job_id,
            "winner": opt(&f.winner, trial),
            "promoted": f.promoted,
            "promotion": opt(&f.promotion, promotion),
            "generation": opt(&f.generation, generation),
            "reason": f.reason,
            "pareto_front": f.pareto_front.iter().map(trial).collect::<Vec<_>>(),
        }),
    }
}

/// One piece of long work (`Progress`), with the proto field names; `remaining_millis` is null
/// while unknown.
pub fn progress(p: &pb::Progress) -> Value {
    json!({
        "phase": pb::ProgressPhase::try_from(p.phase)
            .map_or("PROGRESS_PHASE_UNSPECIFIED", |x| x.as_str_name()),
        "config": opt(&p.config, config),
        "done": p.done,
        "total": p.total,
        "start_time": timestamp(&p.start_time),
        "remaining_millis": p.remaining_millis,
    })
}
