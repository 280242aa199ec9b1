//! `vectord autotune`: start the stream, print a row per trial as it arrives, then the outcome.
//! On a terminal, the job's builds and measurements in flight are progress bars on stderr;
//! with `--json` every event, progress included, is one JSON line.
//! Ctrl-C cancels the job (CancelJob with the started event's id) and exits 130.

use std::cell::OnceCell;
use std::process::ExitCode;

use vectord::pb;
use vectord::pb::autotune_response::Event;

use super::commands::{trial_row, TRIAL_HEADERS};
use super::error::{CliError, EXIT_INTERRUPTED};
use super::progress::Bars;
use super::{json as j, out, AutotuneArgs, Ctx};

/// Widths of the live table's columns (rows are printed one at a time, so they are fixed).
const WIDTHS: [usize; 10] = [6, 4, 5, 5, 7, 9, 9, 8, 9, 0];

fn row(cells: &[String]) -> String {
    let mut s = String::new();
    for (i, (c, w)) in cells.iter().zip(WIDTHS).enumerate() {
        if i > 0 {
            s.push_str("  ");
        }
        s.push_str(&format!("{c:<w$}"));
    }
    s.trim_end().to_string()
}

pub async fn run(ctx: &Ctx, a: AutotuneArgs) -> Result<ExitCode, CliError> {
    let request = pb::AutotuneRequest {
        index_name: a.index,
        harness: a.harness,
        min_recall: a.min_recall,
        grid: a
            .grid
            .iter()
            .map(|&(ef_construction, ef_search, m)| pb::HnswConfig {
                m,
                ef_construction,
                ef_search,
                seed: Some(a.seed),
            })
            .collect(),
        activate: a.activate,
        requested_by: a.requested_by.unwrap_or_default(),
        objective: if a.target_recall.is_some() {
            pb::Objective::TargetRecall as i32
        } else {
            pb::Objective::Unspecified as i32
        },
        target_recall: a.target_recall,
        strategy: if a.adaptive {
            pb::Strategy::Adaptive as i32
        } else {
            pb::Strategy::Unspecified as i32
        },
        budget: (a.max_trials.is_some() || a.max_seconds.is_some()).then(|| pb::AdaptiveBudget {
            max_trials: a.max_trials.unwrap_or(0),
            max_seconds: a.max_seconds.unwrap_or(0),
        }),
        seed: a.adaptive.then_some(a.seed),
        adaptive_m: a.adaptive_m,
        adaptive_ef_construction: a.adaptive_ef_construction,
        adaptive_sample_points: a.sample_points,
        adaptive_confirm: a.confirm.unwrap_or(0),
    };
    let job_id = OnceCell::new();
    let body = std::pin::pin!(deadline(ctx, follow(ctx, request, &job_id)));
    let interrupted = async {
        // If the handler cannot be installed, never report an interrupt.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        r = body => return r.map(|()| ExitCode::SUCCESS),
        () = interrupted => {}
    }
    // Cancel while the stream is still open, so the job is stopped by CancelJob (which answers
    // once the job is recorded CANCELLED); the stream is dropped after.
    match job_id.get() {
        Some(id) => {
            let r = ctx
                .call(
                    ctx.autotune()
                        .cancel_job(pb::CancelJobRequest { id: id.clone() }),
                )
                .await;
            match r {
                Ok(_) => eprintln!("interrupted: cancelled autotune job {id}"),
                Err(e) => eprintln!(
                    "interrupted: could not cancel autotune job {id} ({}: {}); closing the stream",
                    super::error::code_name(e.code),
                    e.message
                ),
            }
        }
        None => eprintln!("interrupted before the job started"),
    }
    Ok(ExitCode::from(EXIT_INTERRUPTED))
}

async fn deadline(
    ctx: &Ctx,
    body: impl std::future::Future<Output = Result<(), CliError>>,
) -> Result<(), CliError> {
    match ctx.timeout {
        None => body.await,
        Some(d) => tokio::time::timeout(d, body).await.map_err(|_| {
            CliError::new(
                tonic::Code::DeadlineExceeded,
                format!(
                    "autotune did not finish within {} s (the job is cancelled with the stream)",
                    d.as_secs_f64()
                ),
            )
        })?,
    }
}

/// Reads the stream to its end, printing each event; records the job id as soon as it is known.
async fn follow(
    ctx: &Ctx,
    request: pb::AutotuneRequest,
    job_id: &OnceCell<String>,
) -> Result<(), CliError> {
    let mut stream = ctx.autotune().autotune(request).await?.into_inner();
    let mut bars = Bars::new(ctx.json);
    while let Some(msg) = stream.message().await? {
        let Some(event) = msg.event else { continue };
        if ctx.json {
            out::json(&j::autotune_event(&event));
        }
        match event {
            Event::Started(s) => {
                let _ = job_id.set(s.job_id.clone());
                if !ctx.json {
                    if s.strategy == pb::Strategy::Adaptive as i32 {
                        bars.println(&format!(
                            "autotune job {}: adaptive (configs chosen as trials finish)",
                            s.job_id
                        ));
                    } else {
                        bars.println(&format!(
                            "autotune job {}: {} configs",
                            s.job_id,
                            s.grid.len()
                        ));
                    }
                    let headers: Vec<String> =
                        TRIAL_HEADERS.iter().map(|h| h.to_string()).collect();
                    bars.println(&row(&headers));
                }
            }
            Event::Trial(t) => {
                if !ctx.json {
                    bars.println(&row(&trial_row(&t)));
                }
            }
            Event::Progress(p) => bars.show("", &p.activities),
            Event::Finished(f) => {
                bars.clear();
                if !ctx.json {
                    print_finished(&f);
                }
            }
        }
    }
    Ok(())
}

fn print_finished(f: &pb::AutotuneFinished) {
    match &f.winner {
        Some(w) => out::line(&format!(
            "winner: trial {} ({}) recall {:.4}, p50 {:.1} us",
            w.id,
            out::config(&w.config),
            w.recall,
            w.p50_micros
        )),
        None => out::line("winner: none (no trial finished)"),
    }
    if f.promoted {
        let by = f
            .promotion
            .as_ref()
            .map_or(String::new(), |p| format!(" by {}", p.promoted_by));
        out::line(&format!("promoted{by}"));
    } else {
        out::line(&format!("not promoted: {}", f.reason));
    }
    if let Some(g) = &f.generation {
        out::line(&format!(
            "activated generation {} of {} ({} points, built in {} ms)",
            g.number, g.index_name, g.point_count, g.build_millis
        ));
    }
}
