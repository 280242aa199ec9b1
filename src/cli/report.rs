//! `vectord report`: the trial journal of one index and harness as a recall-vs-p50 scatter (SVG)
//! with the Pareto front (GetParetoFront: recall × p50 × memory) highlighted and the promoted
//! config marked, plus a text summary of the front.
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

const WIDTH: f64 = 820.0;
const HEIGHT: f64 = 520.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 200.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
const FRONT_COLOUR: &str = "#d95f02";
const TRIAL_COLOUR: &str = "#7f8c9a";
const PROMOTED_COLOUR: &str = "#1b9e77";

/// The scatter as a standalone SVG document. Every trial is a `<circle class="trial">` with
/// `data-trial-id`; front trials also have class `front`; the promoted trial gets a ring
/// `<circle class="promoted">`.
pub fn render_svg(p: &Plot) -> String {
    let xs = Axis::new(p.trials.iter().map(|t| t.p50_micros), false);
    let ys = Axis::new(p.trials.iter().map(|t| t.recall), true);
    let (pw, ph) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let x = |v: f64| LEFT + xs.frac(v) * pw;
    let y = |v: f64| TOP + (1.0 - ys.frac(v)) * ph;
    let in_front = |id: u64| p.front.iter().any(|t| t.id == id);

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

    // The front's recall-vs-p50 envelope: front trials by p50, each more accurate than all
    // faster ones (the front is 3-D, so some front trials sit below it: they win on memory).
    let mut front: Vec<&pb::Trial> = p.front.iter().collect();
    front.sort_by(|a, b| a.p50_micros.total_cmp(&b.p50_micros));
    let mut envelope = Vec::new();
    let mut best = f64::NEG_INFINITY;
    for t in front {
        if t.recall > best {
            best = t.recall;
            envelope.push(format!("{:.1},{:.1}", x(t.p50_micros), y(t.recall)));
        }
    }
    if envelope.len() > 1 {
        let _ = writeln!(
            s,
            r#"<polyline class="front-line" points="{}" fill="none" stroke="{FRONT_COLOUR}" stroke-width="1.5" stroke-dasharray="5 3"/>"#,
            envelope.join(" ")
        );
    }

    // Dominated trials first, so front points are drawn on top.
    let mut order: Vec<&pb::Trial> = p.trials.iter().collect();
    order.sort_by_key(|t| in_front(t.id));
    for t in order {
        let front = in_front(t.id);
        let c = t.config.unwrap_or_default();
        let _ = writeln!(
            s,
            r#"<circle class="trial{cls}" data-trial-id="{id}" cx="{cx:.1}" cy="{cy:.1}" r="{r}" fill="{fill}" fill-opacity="{op}"><title>trial {id}: m {m}, ef_construction {ec}, ef_search {es} · recall {rc:.4}, p50 {p50:.1} µs, {mem:.1} MB{tag}</title></circle>"#,
            cls = if front { " front" } else { "" },
            id = t.id,
            cx = x(t.p50_micros),
            cy = y(t.recall),
            r = if front { 5.5 } else { 4.0 },
            fill = if front { FRONT_COLOUR } else { TRIAL_COLOUR },
            op = if front { 1.0 } else { 0.6 },
            m = c.m,
            ec = c.ef_construction,
            es = c.ef_search,
            rc = t.recall,
            p50 = t.p50_micros,
            mem = t.memory_bytes as f64 / 1e6,
            tag = if front { " · on the Pareto front" } else { "" },
        );
    }
    if let Some(t) = p
        .promoted
        .and_then(|id| p.trials.iter().find(|t| t.id == id))
    {
        let (cx, cy) = (x(t.p50_micros), y(t.recall));
        let _ = writeln!(
            s,
            r#"<circle class="promoted" data-trial-id="{id}" cx="{cx:.1}" cy="{cy:.1}" r="10" fill="none" stroke="{PROMOTED_COLOUR}" stroke-width="2.5"/><text class="promoted-label" x="{lx:.1}" y="{ly:.1}" fill="{PROMOTED_COLOUR}">promoted #{id}</text>"#,
            id = t.id,
            lx = cx + 12.0,
            ly = cy - 10.0,
        );
    }

    // Legend.
    let lx = WIDTH - RIGHT + 20.0;
    let _ = writeln!(
        s,
        r#"<g class="legend">
<circle cx="{lx}" cy="{y1}" r="4" fill="{TRIAL_COLOUR}" fill-opacity="0.6"/><text x="{tx}" y="{t1}">trial</text>
<circle cx="{lx}" cy="{y2}" r="5.5" fill="{FRONT_COLOUR}"/><text x="{tx}" y="{t2}">Pareto front ({nf})</text>
<text x="{tx}" y="{t2b}" font-size="10">recall × p50 × memory</text>
<circle cx="{lx}" cy="{y3}" r="10" fill="none" stroke="{PROMOTED_COLOUR}" stroke-width="2.5"/><text x="{tx}" y="{t3}">promoted</text>
</g>
</svg>"#,
        y1 = TOP + 10.0,
        t1 = TOP + 14.0,
        y2 = TOP + 34.0,
        t2 = TOP + 38.0,
        t2b = TOP + 52.0,
        y3 = TOP + 76.0,
        t3 = TOP + 80.0,
        tx = lx + 16.0,
        nf = p.front.len(),
    );
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

    #[test]
    fn svg_marks_front_and_promoted_and_escapes() {
        let trials = [
            trial(1, 0.9, 100.0),
            trial(2, 0.95, 200.0),
            trial(3, 0.85, 300.0),
        ];
        let front = [trials[0].clone(), trials[1].clone()];
        let s = render_svg(&Plot {
            title: "a<b & c".into(),
            k: 10,
            trials: &trials,
            front: &front,
            promoted: Some(2),
        });
        assert!(s.contains("a&lt;b &amp; c"));
        assert_eq!(s.matches(r#"class="trial front""#).count(), 2);
        assert_eq!(s.matches(r#"class="trial""#).count(), 1);
        assert!(s.contains(r#"class="promoted" data-trial-id="2""#));
        assert!(s.contains(r#"<polyline class="front-line""#));
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
