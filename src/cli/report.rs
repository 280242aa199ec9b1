//! `vectord report`: the trial journal of one index and harness as a recall-vs-p50 scatter (SVG)
//! and a text summary of its Pareto front (GetParetoFront: recall × p50 × memory).
//!
//! The plot has two axes, so the front it highlights is the one it can show: the trials no
//! other trial beats on both recall and p50. Memory is the third dimension, drawn as marker
//! area (the legend says so and gives the range); a trial on the recall × p50 × memory front
//! only because it uses less memory is outlined, not filled, so a slower, less accurate config
//! never looks like a recommendation. The promoted trial is ringed.
//!
//! The SVG is written by hand (a few dozen elements): a plotting crate would need a font
//! backend to measure labels, which a server image should not carry for one chart.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use serde_json::{json, Value};
use tonic::Code;
use vectord::pb;

use super::commands::{list_trials, trial_row, TRIAL_HEADERS};
use super::error::CliError;
use super::{json as j, out, Ctx};

/// Journal entries read for one report at most.
const MAX_TRIALS: u32 = 100_000;

#[derive(Args, Debug)]
pub struct ReportArgs {
    #[arg(long)]
    pub index: String,
    /// The harness whose trials to plot. Default: the promoted trial's harness, else the harness
    /// with the most trials.
    #[arg(long)]
    pub harness: Option<String>,
    /// Write the recall-vs-p50 scatter here (SVG).
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
}

pub async fn run(ctx: &Ctx, a: ReportArgs) -> Result<ExitCode, CliError> {
    let promoted = ctx
        .call(ctx.promotion().get_promoted(pb::GetPromotedRequest {
            index_name: a.index.clone(),
        }))
        .await?
        .current;
    let all = list_trials(ctx, Some(a.index.clone()), a.harness.clone(), MAX_TRIALS).await?;
    let harness = match a.harness {
        Some(h) => h,
        None => default_harness(&all, promoted.as_ref()).ok_or_else(|| {
            CliError::new(
                Code::FailedPrecondition,
                format!(
                    "index {:?} has no trials in the journal: run `vectord trial run` or \
                     `vectord autotune` first",
                    a.index
                ),
            )
        })?,
    };
    let trials: Vec<pb::Trial> = all.into_iter().filter(|t| t.harness == harness).collect();
    if trials.is_empty() {
        return Err(CliError::new(
            Code::FailedPrecondition,
            format!(
                "no trials of index {:?} on harness {harness:?} in the journal",
                a.index
            ),
        ));
    }
    let front = ctx
        .call(ctx.autotune().get_pareto_front(pb::GetParetoFrontRequest {
            index_name: a.index.clone(),
            harness: harness.clone(),
            include_sample_trials: false,
        }))
        .await?
        .trials;
    let promoted_id = promoted
        .as_ref()
        .filter(|p| trials.iter().any(|t| t.id == p.trial_id))
        .map(|p| p.trial_id);

    if let Some(path) = &a.svg {
        let svg = render_svg(&Plot {
            title: format!("{} · harness {}", a.index, harness),
            k: trials[0].k,
            trials: &trials,
            front: &front,
            promoted: promoted_id,
        });
        std::fs::write(path, svg).map_err(|e| {
            CliError::new(
                Code::Unknown,
                format!("cannot write {}: {e}", path.display()),
            )
        })?;
    }

    if ctx.json {
        let f: Vec<Value> = front.iter().map(j::trial).collect();
        out::json(&json!({
            "index_name": a.index,
            "harness": harness,
            "trial_count": trials.len(),
            "pareto_front": f,
            "promoted_trial_id": promoted_id,
            "svg": a.svg.as_ref().map(|p| p.display().to_string()),
        }));
        return Ok(ExitCode::SUCCESS);
    }
    out::line(&format!(
        "index {}, harness {}: {} trials, {} on the Pareto front (recall × p50 × memory):",
        a.index,
        harness,
        trials.len(),
        front.len()
    ));
    let mut headers = vec![""];
    headers.extend(TRIAL_HEADERS);
    headers.push("MEMORY_MB");
    let rows: Vec<Vec<String>> = front
        .iter()
        .map(|t| {
            let mark = if Some(t.id) == promoted_id { "*" } else { "" };
            let mut row = vec![mark.to_string()];
            row.extend(trial_row(t));
            row.push(format!("{:.1}", t.memory_bytes as f64 / 1e6));
            row
        })
        .collect();
    out::table(&headers, &rows);
    match (&promoted, promoted_id) {
        (Some(p), Some(id)) if front.iter().any(|t| t.id == id) => out::line(&format!(
            "* promoted: trial {id} ({}), on the front",
            out::config(&p.config)
        )),
        (Some(p), Some(id)) => out::line(&format!(
            "promoted: trial {id} ({}), not on the front: another trial is as good on recall, \
             p50 and memory and better on one",
            out::config(&p.config)
        )),
        (Some(p), None) => out::line(&format!(
            "promoted: trial {} ({}), measured on another harness",
            p.trial_id,
            out::config(&p.config)
        )),
        (None, _) => out::line("nothing promoted"),
    }
    if let Some(path) = &a.svg {
        out::line(&format!("wrote {}", path.display()));
    }
    Ok(ExitCode::SUCCESS)
}

/// The promoted trial's harness when it is in the journal, else the harness with the most
/// trials (ties: the name first in order).
fn default_harness(trials: &[pb::Trial], promoted: Option<&pb::Promotion>) -> Option<String> {
    if let Some(t) = promoted.and_then(|p| trials.iter().find(|t| t.id == p.trial_id)) {
        return Some(t.harness.clone());
    }
    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
    for t in trials {
        *counts.entry(&t.harness).or_default() += 1;
    }
    let mut best: Option<(&str, usize)> = None;
    for (h, n) in counts {
        if best.is_none_or(|(_, b)| n > b) {
            best = Some((h, n));
        }
    }
    best.map(|(h, _)| h.to_string())
}

pub struct Plot<'a> {
    pub title: String,
    pub k: u32,
    pub trials: &'a [pb::Trial],
    pub front: &'a [pb::Trial],
    pub promoted: Option<u64>,
}

const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 520.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 270.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
const FRONT_COLOUR: &str = "#d95f02";
const TRIAL_COLOUR: &str = "#7f8c9a";
const PROMOTED_COLOUR: &str = "#1b9e77";
/// Marker radius of the trial with the most memory; marker area is proportional to memory, down
/// to a smallest radius that stays visible.
const R_MAX: f64 = 11.0;
const R_MIN: f64 = 3.0;

/// The ids of the trials that no other trial beats on recall (higher) and p50 (lower) at once:
/// the recall × p50 Pareto front, the one a recall-vs-p50 plot can show.
pub fn recall_p50_front(trials: &[pb::Trial]) -> Vec<u64> {
    trials
        .iter()
        .filter(|t| {
            !trials.iter().any(|u| {
                u.recall >= t.recall
                    && u.p50_micros <= t.p50_micros
                    && (u.recall > t.recall || u.p50_micros < t.p50_micros)
            })
        })
        .map(|t| t.id)
        .collect()
}

/// Marker radius for a trial's memory: area proportional to memory, R_MAX for the most memory
/// of the plot (so a trial with half of it has half the area), never under R_MIN.
struct MemoryScale {
    lo: f64,
    hi: f64,
}

impl MemoryScale {
    fn new(trials: &[pb::Trial]) -> Self {
        let (lo, hi) = trials
            .iter()
            .map(|t| t.memory_bytes as f64)
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            });
        MemoryScale { lo, hi }
    }

    fn spread(&self) -> bool {
        self.lo.is_finite() && self.hi > self.lo
    }

    fn radius(&self, memory_bytes: u64) -> f64 {
        if !self.hi.is_finite() || self.hi <= 0.0 {
            // No memory figures (trials journaled without one): one size.
            return (R_MIN + R_MAX) / 2.0;
        }
        (R_MAX * (memory_bytes as f64 / self.hi).clamp(0.0, 1.0).sqrt()).max(R_MIN)
    }
}

/// The scatter as a standalone SVG document. Every trial is a `<circle class="trial">` with
/// `data-trial-id` and `data-memory-bytes`, its radius growing with its memory; trials on the
/// recall × p50 front also have class `front`; trials of `p.front` (recall × p50 × memory) that
/// are not on it have class `memory-front`; the promoted trial gets a ring
/// `<circle class="promoted">`.
pub fn render_svg(p: &Plot) -> String {
    let xs = Axis::new(p.trials.iter().map(|t| t.p50_micros), false);
    let ys = Axis::new(p.trials.iter().map(|t| t.recall), true);
    let (pw, ph) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let x = |v: f64| LEFT + xs.frac(v) * pw;
    let y = |v: f64| TOP + (1.0 - ys.frac(v)) * ph;
    let front_ids = recall_p50_front(p.trials);
    let in_front = |id: u64| front_ids.contains(&id);
    let memory_only = |id: u64| !in_front(id) && p.front.iter().any(|t| t.id == id);
    let mem = MemoryScale::new(p.trials);

    let mut s = String::new();
    let _ = write!(
        s,
        r##"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">
<title>{title}: recall@{k} vs p50 latency</title>
<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>
<text x="{tx}" y="28" text-anchor="middle" font-size="16">{title}: recall@{k} vs p50 latency ({n} trials)</text>
<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>
"##,
        title = xml_escape(&p.title),
        k = p.k,
        tx = LEFT + pw / 2.0,
        n = p.trials.len(),
    );
    for v in xs.ticks() {
        let px = x(v);
        let _ = writeln!(
            s,
            r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{b}" stroke="#e5e5e5"/><text x="{px:.1}" y="{ty}" text-anchor="middle">{label}</text>"##,
            b = TOP + ph,
            ty = TOP + ph + 18.0,
            label = xs.label(v),
        );
    }
    for v in ys.ticks() {
        let py = y(v);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{py:.1}" x2="{r}" y2="{py:.1}" stroke="#e5e5e5"/><text x="{tx}" y="{ty:.1}" text-anchor="end">{label}</text>"##,
            r = LEFT + pw,
            tx = LEFT - 8.0,
            ty = py + 4.0,
            label = ys.label(v),
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{cx}" y="{by}" text-anchor="middle">p50 latency per query (µs, one thread)</text>
<text transform="translate(22 {cy}) rotate(-90)" text-anchor="middle">recall@{k}</text>"#,
        cx = LEFT + pw / 2.0,
        by = HEIGHT - 16.0,
        cy = TOP + ph / 2.0,
        k = p.k,
    );

    // The recall × p50 front as a line: its trials by p50 (each more accurate than every
    // faster one).
    let mut front: Vec<&pb::Trial> = p.trials.iter().filter(|t| in_front(t.id)).collect();
    front.sort_by(|a, b| {
        a.p50_micros
            .total_cmp(&b.p50_micros)
            .then(a.recall.total_cmp(&b.recall))
    });
    let envelope: Vec<String> = front
        .iter()
        .map(|t| format!("{:.1},{:.1}", x(t.p50_micros), y(t.recall)))
        .collect();
    if envelope.len() > 1 {
        let _ = writeln!(
            s,
            r#"<polyline class="front-line" points="{}" fill="none" stroke="{FRONT_COLOUR}" stroke-width="1.5" stroke-dasharray="5 3"/>"#,
            envelope.join(" ")
        );
    }

    // Dominated trials first, then the memory-only ones, then the front, so front points are
    // drawn on top; within a group the larger markers first, so none hides a smaller one.
    let mut order: Vec<&pb::Trial> = p.trials.iter().collect();
    order.sort_by(|a, b| {
        let rank = |t: &pb::Trial| (in_front(t.id), memory_only(t.id));
        rank(a)
            .cmp(&rank(b))
            .then(b.memory_bytes.cmp(&a.memory_bytes))
    });
    for t in order {
        let front = in_front(t.id);
        let mem_only = memory_only(t.id);
        let c = t.config.unwrap_or_default();
        let (cls, fill, op, stroke, tag) = if front {
            (
                " front",
                FRONT_COLOUR,
                0.85,
                r#" stroke="white" stroke-width="1""#,
                " · on the recall × p50 front",
            )
        } else if mem_only {
            (
                " memory-front",
                TRIAL_COLOUR,
                0.35,
                r##" stroke="#d95f02" stroke-width="1.5" stroke-dasharray="2 2""##,
                " · off the recall × p50 front; on the recall × p50 × memory front by its memory",
            )
        } else {
            (
                "",
                TRIAL_COLOUR,
                0.5,
                r#" stroke="white" stroke-width="0.5""#,
                "",
            )
        };
        let _ = writeln!(
            s,
            r#"<circle class="trial{cls}" data-trial-id="{id}" data-memory-bytes="{bytes}" cx="{cx:.1}" cy="{cy:.1}" r="{r:.2}" fill="{fill}" fill-opacity="{op}"{stroke}><title>trial {id}: m {m}, ef_construction {ec}, ef_search {es} · recall {rc:.4}, p50 {p50:.1} µs, {mb:.2} MB{tag}</title></circle>"#,
            id = t.id,
            bytes = t.memory_bytes,
            cx = x(t.p50_micros),
            cy = y(t.recall),
            r = mem.radius(t.memory_bytes),
            m = c.m,
            ec = c.ef_construction,
            es = c.ef_search,
            rc = t.recall,
            p50 = t.p50_micros,
            mb = t.memory_bytes as f64 / 1e6,
        );
    }
    if let Some(t) = p
        .promoted
        .and_then(|id| p.trials.iter().find(|t| t.id == id))
    {
        let (cx, cy) = (x(t.p50_micros), y(t.recall));
        let r = mem.radius(t.memory_bytes) + 4.5;
        let _ = writeln!(
            s,
            r#"<circle class="promoted" data-trial-id="{id}" cx="{cx:.1}" cy="{cy:.1}" r="{r:.2}" fill="none" stroke="{PROMOTED_COLOUR}" stroke-width="2.5"/><text class="promoted-label" x="{lx:.1}" y="{ly:.1}" fill="{PROMOTED_COLOUR}">promoted #{id}</text>"#,
            id = t.id,
            lx = cx + r + 2.0,
            ly = cy - r,
        );
    }

    // Legend: what colour, outline and size mean.
    let lx = WIDTH - RIGHT + 20.0;
    let tx = lx + 18.0;
    let n_front = p.trials.iter().filter(|t| in_front(t.id)).count();
    let n_mem = p.trials.iter().filter(|t| memory_only(t.id)).count();
    let mid = (R_MIN + R_MAX) / 2.0;
    let _ = writeln!(
        s,
        r##"<g class="legend">
<circle cx="{lx}" cy="{y1}" r="{mid}" fill="{TRIAL_COLOUR}" fill-opacity="0.5"/><text x="{tx}" y="{t1}">trial</text>
<circle cx="{lx}" cy="{y2}" r="{mid}" fill="{FRONT_COLOUR}" fill-opacity="0.85"/><text x="{tx}" y="{t2}">recall × p50 front ({n_front})</text>
<text x="{tx}" y="{t2b}" font-size="10">no trial has higher recall and lower p50</text>
<circle cx="{lx}" cy="{y3}" r="{mid}" fill="{TRIAL_COLOUR}" fill-opacity="0.35" stroke="{FRONT_COLOUR}" stroke-width="1.5" stroke-dasharray="2 2"/><text x="{tx}" y="{t3}">front only by memory ({n_mem})</text>
<text x="{tx}" y="{t3b}" font-size="10">dominated on recall × p50; less memory</text>
<circle cx="{lx}" cy="{y4}" r="{mid}" fill="none" stroke="{PROMOTED_COLOUR}" stroke-width="2.5"/><text x="{tx}" y="{t4}">promoted</text>
<text class="memory-legend" x="{lx0}" y="{t5}">marker area ∝ memory</text>"##,
        lx0 = lx - R_MAX,
        y1 = TOP + 10.0,
        t1 = TOP + 14.0,
        y2 = TOP + 36.0,
        t2 = TOP + 40.0,
        t2b = TOP + 53.0,
        y3 = TOP + 76.0,
        t3 = TOP + 80.0,
        t3b = TOP + 93.0,
        y4 = TOP + 116.0,
        t4 = TOP + 120.0,
        t5 = TOP + 150.0,
    );
    if mem.spread() {
        let _ = writeln!(
            s,
            r##"<circle class="memory-min" cx="{lx}" cy="{ya}" r="{rlo:.2}" fill="none" stroke="#333"/><text x="{tx}" y="{ta}">{lo:.2} MB (least)</text>
<circle class="memory-max" cx="{lx}" cy="{yb}" r="{R_MAX}" fill="none" stroke="#333"/><text x="{tx}" y="{tb}">{hi:.2} MB (most)</text>"##,
            ya = TOP + 170.0,
            ta = TOP + 174.0,
            yb = TOP + 196.0,
            tb = TOP + 200.0,
            rlo = mem.radius(mem.lo as u64),
            lo = mem.lo / 1e6,
            hi = mem.hi / 1e6,
        );
    } else {
        let _ = writeln!(
            s,
            r##"<text x="{lx0}" y="{ta}" font-size="10">every trial: {v:.2} MB</text>"##,
            lx0 = lx - R_MAX,
            ta = TOP + 170.0,
            v = if mem.lo.is_finite() {
                mem.lo / 1e6
            } else {
                0.0
            },
        );
    }
    s.push_str("</g>\n</svg>");
    s
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A linear axis over the data with 5% padding and "nice" ticks (1, 2, 5 × 10^n).
struct Axis {
    lo: f64,
    hi: f64,
    step: f64,
}

impl Axis {
    fn new(values: impl Iterator<Item = f64>, unit_interval: bool) -> Self {
        let (mut lo, mut hi) = values
            .filter(|v| v.is_finite())
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            });
        if !lo.is_finite() {
            (lo, hi) = (0.0, 1.0);
        }
        let span = (hi - lo).max(if unit_interval {
            0.02
        } else {
            hi.abs() * 0.1 + 1.0
        });
        lo -= span * 0.08;
        hi += span * 0.08;
        if unit_interval {
            hi = hi.min(1.0 + span * 0.02);
        }
        lo = lo.max(0.0);
        let raw = (hi - lo) / 6.0;
        let mag = 10f64.powf(raw.log10().floor());
        let step = [1.0, 2.0, 5.0, 10.0]
            .into_iter()
            .map(|m| m * mag)
            .find(|s| *s >= raw)
            .unwrap_or(10.0 * mag);
        Axis { lo, hi, step }
    }

    fn frac(&self, v: f64) -> f64 {
        ((v - self.lo) / (self.hi - self.lo)).clamp(0.0, 1.0)
    }

    fn ticks(&self) -> Vec<f64> {
        let first = (self.lo / self.step).ceil() as i64;
        let last = (self.hi / self.step).floor() as i64;
        (first..=last).map(|i| i as f64 * self.step).collect()
    }

    fn label(&self, v: f64) -> String {
        let decimals = (-self.step.log10().floor()).max(0.0) as usize;
        format!("{v:.decimals$}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trial(id: u64, recall: f64, p50: f64) -> pb::Trial {
        pb::Trial {
            id,
            harness: "h".into(),
            k: 10,
            recall,
            p50_micros: p50,
            config: Some(pb::HnswConfig {
                m: 16,
                ef_construction: 100,
                ef_search: id as u32,
                seed: None,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn axis_ticks_are_nice_and_inside() {
        let a = Axis::new([0.81, 0.97].into_iter(), true);
        let t = a.ticks();
        assert!(t.len() >= 3, "{t:?}");
        assert!(t.iter().all(|v| *v >= a.lo && *v <= a.hi));
        assert_eq!(a.label(0.9), "0.90");
        let a = Axis::new([120.0, 2400.0].into_iter(), false);
        assert!(a.ticks().iter().all(|v| (v / a.step).fract() == 0.0));
        // One trial: still a usable range.
        let a = Axis::new([300.0].into_iter(), false);
        assert!(a.hi > a.lo && !a.ticks().is_empty());
    }

    fn with_memory(mut t: pb::Trial, bytes: u64) -> pb::Trial {
        t.memory_bytes = bytes;
        t
    }

    /// (class words, radius) of each trial's circle, by trial id.
    fn circles(svg: &str) -> std::collections::BTreeMap<u64, (Vec<String>, f64)> {
        let doc = roxmltree::Document::parse(svg).expect("the SVG is well-formed XML");
        doc.descendants()
            .filter(|n| n.has_tag_name("circle"))
            .filter(|n| {
                n.attribute("class")
                    .is_some_and(|c| c.split(' ').any(|w| w == "trial"))
            })
            .map(|n| {
                let id = n
                    .attribute("data-trial-id")
                    .expect("id")
                    .parse()
                    .expect("u64");
                let classes = n
                    .attribute("class")
                    .unwrap_or_default()
                    .split(' ')
                    .map(str::to_string)
                    .collect();
                let r = n.attribute("r").expect("r").parse().expect("f64");
                (id, (classes, r))
            })
            .collect()
    }

    #[test]
    fn the_front_is_recall_by_p50_and_memory_is_size() {
        // 1 and 2 are the recall × p50 front. 3 is dominated by 2 (lower recall, twice the
        // p50) but uses the least memory, so it is on the recall × p50 × memory front that
        // GetParetoFront returns. 4 is dominated on everything.
        let trials = [
            with_memory(trial(1, 0.90, 100.0), 2_000_000),
            with_memory(trial(2, 0.95, 200.0), 3_000_000),
            with_memory(trial(3, 0.93, 400.0), 1_000_000),
            with_memory(trial(4, 0.85, 300.0), 5_000_000),
        ];
        assert_eq!(recall_p50_front(&trials), vec![1, 2]);
        let front_3d = [trials[0].clone(), trials[1].clone(), trials[2].clone()];
        let s = render_svg(&Plot {
            title: "a<b & c".into(),
            k: 10,
            trials: &trials,
            front: &front_3d,
            promoted: Some(2),
        });
        assert!(s.contains("a&lt;b &amp; c"));
        let c = circles(&s);
        let has = |id: u64, class: &str| c[&id].0.iter().any(|w| w == class);
        assert_eq!(c.len(), 4, "every trial is plotted once");
        assert!(has(1, "front") && has(2, "front"));
        assert!(
            !has(3, "front"),
            "a memory-only point is not drawn as the front"
        );
        assert!(has(3, "memory-front"));
        assert!(!has(4, "front") && !has(4, "memory-front"));
        assert!(!has(1, "memory-front") && !has(2, "memory-front"));
        // Area follows memory: 3 (1 MB) < 1 (2 MB) < 2 (3 MB) < 4 (5 MB), and in proportion.
        let r = |id: u64| c[&id].1;
        assert!(r(3) < r(1) && r(1) < r(2) && r(2) < r(4), "{c:?}");
        assert!((r(4) - R_MAX).abs() < 0.01);
        for (id, mb) in [(1, 2.0), (2, 3.0), (3, 1.0)] {
            let area = (r(id) / r(4)).powi(2);
            assert!((area - mb / 5.0).abs() < 0.01, "trial {id}: area {area}");
        }
        // The legend says what the front is and that size is memory, with its range.
        assert!(s.contains("recall × p50 front (2)"), "{s}");
        assert!(s.contains("front only by memory (1)"));
        assert!(s.contains("marker area ∝ memory"));
        assert!(s.contains("1.00 MB (least)") && s.contains("5.00 MB (most)"));
        assert!(s.contains(r#"class="promoted" data-trial-id="2""#));
        assert!(s.contains(r#"<polyline class="front-line""#));
    }

    #[test]
    fn ties_stay_on_the_front_and_equal_memory_is_one_size() {
        // Trials without a memory figure (0): one size for all.
        let trials = [
            trial(1, 0.9, 100.0),
            trial(2, 0.9, 100.0),
            trial(3, 0.9, 150.0),
        ];
        assert_eq!(recall_p50_front(&trials), vec![1, 2]);
        let s = render_svg(&Plot {
            title: "t".into(),
            k: 10,
            trials: &trials,
            front: &[],
            promoted: None,
        });
        let c = circles(&s);
        assert!(c
            .values()
            .all(|(_, r)| (*r - (R_MIN + R_MAX) / 2.0).abs() < 0.01));
        assert!(s.contains("every trial: 0.00 MB"));
        assert!(!s.contains(r#"class="promoted""#));
    }

    #[test]
    fn default_harness_prefers_the_promoted_trials() {
        let mut a = trial(1, 0.9, 1.0);
        a.harness = "a".into();
        let mut b = trial(2, 0.9, 1.0);
        b.harness = "b".into();
        let mut b2 = trial(3, 0.9, 1.0);
        b2.harness = "b".into();
        let all = [a, b, b2];
        assert_eq!(default_harness(&all, None).as_deref(), Some("b"));
        let p = pb::Promotion {
            trial_id: 1,
            ..Default::default()
        };
        assert_eq!(default_harness(&all, Some(&p)).as_deref(), Some("a"));
        assert_eq!(default_harness(&[], None), None);
    }
}
