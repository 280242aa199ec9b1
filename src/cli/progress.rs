//! Progress bars on a terminal's stderr (indicatif): the builds and measurements of an
//! autotune job, an activation's builds, an import. Drawn only when stderr is a terminal and
//! `--json` is not given; otherwise every call here does nothing, so piped output and logs
//! stay as they were.
//!
//! Lines printed while bars are drawn go through [`Bars::println`], which lifts the bars, prints
//! the line to stdout and draws them again below it.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::Duration;

use serde_json::json;

use indicatif::{HumanDuration, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use vectord::pb;

use super::error::CliError;
use super::{json as j, out, Ctx};

/// How often `profile activate` reads the building indexes' progress (GetIndex).
const POLL_EVERY: Duration = Duration::from_millis(500);

/// Bars keyed by the work they show, drawn on stderr when it is a terminal.
pub struct Bars {
    multi: MultiProgress,
    /// Whether anything is drawn at all.
    live: bool,
    bars: HashMap<String, ProgressBar>,
}

fn style(counted: bool) -> ProgressStyle {
    let template = if counted {
        "{prefix:<32} [{bar:30}] {percent:>3}% {human_pos}/{human_len} {msg}"
    } else {
        "{prefix:<32} {spinner} {msg}"
    };
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// `build 16/200`, `measure 16/200/64`, `ground truth`: which work a bar shows.
fn label(p: &pb::Progress) -> String {
    let phase = match pb::ProgressPhase::try_from(p.phase) {
        Ok(pb::ProgressPhase::Load) => "load points",
        Ok(pb::ProgressPhase::Build) => "build",
        Ok(pb::ProgressPhase::GroundTruth) => "ground truth",
        Ok(pb::ProgressPhase::Measure) => "measure",
        Ok(pb::ProgressPhase::Snapshot) => "snapshot",
        Ok(pb::ProgressPhase::Replay) => "replay writes",
        _ => "working",
    };
    match (&p.config, pb::ProgressPhase::try_from(p.phase)) {
        (Some(c), Ok(pb::ProgressPhase::Measure)) => {
            format!("{phase} {}/{}/{}", c.m, c.ef_construction, c.ef_search)
        }
        (Some(c), _) => format!("{phase} m {} ef_c {}", c.m, c.ef_construction),
        (None, _) => phase.to_string(),
    }
}

/// The identity of one piece of work across events: its config and start time (its phase
/// changes as it goes).
fn key(prefix: &str, p: &pb::Progress) -> String {
    let c = p.config.as_ref().map(|c| {
        (
            c.m,
            c.ef_construction,
            c.ef_search,
            c.seed.unwrap_or(u64::MAX),
        )
    });
    let t = p.start_time.as_ref().map(|t| (t.seconds, t.nanos));
    format!("{prefix}{c:?}{t:?}")
}

impl Bars {
    /// Bars that draw only when stderr is a terminal and `json` is false.
    pub fn new(json: bool) -> Self {
        let live = !json && std::io::stderr().is_terminal();
        let target = if live {
            ProgressDrawTarget::stderr_with_hz(4)
        } else {
            ProgressDrawTarget::hidden()
        };
        Bars {
            multi: MultiProgress::with_draw_target(target),
            live,
            bars: HashMap::new(),
        }
    }

    /// Whether bars are drawn.
    pub fn live(&self) -> bool {
        self.live
    }

    /// Shows exactly `work` (from one progress event), labelled with `prefix` (e.g. an index
    /// name): bars of work no longer listed are removed.
    pub fn show(&mut self, prefix: &str, work: &[pb::Progress]) {
        if !self.live {
            return;
        }
        let keys: Vec<String> = work.iter().map(|p| key(prefix, p)).collect();
        self.bars.retain(|k, bar| {
            let keep = !k.starts_with(prefix) || keys.contains(k);
            if !keep {
                bar.finish_and_clear();
            }
            keep
        });
        for (k, p) in keys.into_iter().zip(work) {
            let bar = self.bars.entry(k).or_insert_with(|| {
                let bar = self.multi.add(ProgressBar::new(p.total));
                bar.enable_steady_tick(Duration::from_millis(250));
                bar
            });
            bar.set_style(style(p.total > 0));
            bar.set_prefix(format!("{prefix}{}", label(p)));
            bar.set_length(p.total);
            bar.set_position(p.done);
            bar.set_message(match p.remaining_millis {
                Some(ms) => format!("ETA {}", HumanDuration(Duration::from_millis(ms))),
                None => String::new(),
            });
        }
    }

    /// A counted bar of our own (e.g. points sent by an import), by key.
    pub fn counter(&mut self, key: &str, label: &str, total: u64) -> Option<ProgressBar> {
        if !self.live {
            return None;
        }
        let bar = self.bars.entry(key.to_string()).or_insert_with(|| {
            let bar = self.multi.add(ProgressBar::new(total));
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:<12} [{bar:30}] {human_pos}/{human_len} {per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_prefix(label.to_string());
            bar
        });
        Some(bar.clone())
    }

    /// Prints a line to stdout with the bars lifted out of the way.
    pub fn println(&self, line: &str) {
        if self.live {
            self.multi.suspend(|| out::line(line));
        } else {
            out::line(line);
        }
    }

    /// Removes every bar.
    pub fn clear(&mut self) {
        for (_, bar) in self.bars.drain() {
            bar.finish_and_clear();
        }
        let _ = self.multi.clear();
    }
}

impl Drop for Bars {
    fn drop(&mut self) {
        self.clear();
    }
}

/// Waits for an ActivateProfile call, showing the builds it runs: every [`POLL_EVERY`] the
/// profile's indexes are read (GetIndex) and each one's `build_progress` is drawn as a bar on a
/// terminal, or with `--json` printed as one line `{"event":"progress","index_name":…,
/// "progress":{…}}` (at most two a second, and none for an activation that ends sooner).
/// Progress is best effort: a failed read is skipped, and a server that does not report it
/// just shows none.
pub async fn follow_activation<T>(
    ctx: &Ctx,
    profile: &str,
    call: impl std::future::Future<Output = Result<T, CliError>>,
) -> Result<T, CliError> {
    let mut bars = Bars::new(ctx.json);
    if !ctx.json && !bars.live() {
        return call.await;
    }
    let mut call = std::pin::pin!(call);
    let mut every = tokio::time::interval(POLL_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    let mut indexes: Option<Vec<String>> = None;
    loop {
        tokio::select! {
            r = &mut call => {
                bars.clear();
                return r;
            }
            _ = every.tick() => {}
        }
        if indexes.is_none() {
            let got = ctx
                .call(ctx.index().get_profile(pb::GetProfileRequest {
                    name: profile.to_string(),
                }))
                .await;
            indexes = Some(match got {
                Ok(r) => r
                    .profile
                    .map(|p| p.indexes.into_iter().map(|i| i.index_name).collect())
                    .unwrap_or_default(),
                Err(_) => Vec::new(),
            });
        }
        for name in indexes.iter().flatten() {
            let got = ctx
                .call(
                    ctx.index()
                        .get_index(pb::GetIndexRequest { name: name.clone() }),
                )
                .await;
            let Ok(Some(index)) = got.map(|r| r.index) else {
                continue;
            };
            let work: Vec<pb::Progress> = index.build_progress.into_iter().collect();
            if ctx.json {
                for p in &work {
                    out::json(&json!({
                        "event": "progress",
                        "index_name": name,
                        "progress": j::progress(p),
                    }));
                }
            } else {
                bars.show(&format!("{name}: "), &work);
            }
        }
    }
}
