//! `vectord import`: read and check the whole file, then stream batches through ImportPoints.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Instant;

use serde_json::json;
use vectord::pb;

use super::error::CliError;
use super::files::{self, Expect, Format};
use super::{out, Ctx, ImportArgs};

pub async fn run(ctx: &Ctx, a: ImportArgs) -> Result<ExitCode, CliError> {
    let format = match a.format {
        Some(f) => f,
        None => Format::detect(&a.file)?,
    };
    let index = ctx
        .call(ctx.index().get_index(pb::GetIndexRequest {
            name: a.index.clone(),
        }))
        .await?
        .index
        .ok_or_else(|| CliError::new(tonic::Code::Internal, "GetIndex answered no index"))?;
    let expect = Expect {
        dimension: index.dimension,
        cosine: index.metric == pb::Metric::Cosine as i32,
    };
    let path = a.file.clone();
    let start_id = a.start_id;
    // Parsing a large file is CPU work: keep it off the async workers.
    let points = tokio::task::spawn_blocking(move || {
        files::read_points(&path, format, start_id, Some(expect))
    })
    .await
    .map_err(|e| CliError::new(tonic::Code::Internal, format!("reading the file: {e}")))??;

    let total = points.len();
    let batch_size = a.batch_size as usize;
    let progress = std::io::stderr()
        .is_terminal()
        .then(|| Progress::new(total));
    let mut first = Some(a.index.clone());
    let mut sent = 0usize;
    let mut rest = points.into_iter();
    let batches = std::iter::from_fn(move || {
        let batch: Vec<pb::Point> = rest.by_ref().take(batch_size).collect();
        if batch.is_empty() {
            if let Some(p) = &progress {
                p.done();
            }
            return None;
        }
        sent += batch.len();
        if let Some(p) = &progress {
            p.show(sent);
        }
        Some(pb::ImportPointsRequest {
            index_name: first.take().unwrap_or_default(),
            points: batch,
            ..Default::default()
        })
    });
    let r = ctx
        .call_long(ctx.index().import_points(tokio_stream::iter(batches)))
        .await?;
    if ctx.json {
        out::json(&json!({
            "upserted_count": r.upserted_count,
            "point_count": r.point_count,
        }));
    } else {
        out::line(&format!(
            "imported {} points into {} (point count {})",
            r.upserted_count, a.index, r.point_count
        ));
    }
    Ok(ExitCode::SUCCESS)
}

/// A one-line progress report on a terminal's stderr: points handed to the stream, points/s
/// and the time left at that rate.
struct Progress {
    total: usize,
    start: Instant,
}

impl Progress {
    fn new(total: usize) -> Self {
        Progress {
            total,
            start: Instant::now(),
        }
    }

    fn show(&self, sent: usize) {
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        let rate = sent as f64 / secs;
        let eta = (self.total - sent.min(self.total)) as f64 / rate.max(1e-9);
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[K{sent}/{} points  {rate:.0} points/s  ETA {eta:.0} s",
            self.total
        );
        let _ = err.flush();
    }

    fn done(&self) {
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[K");
        let _ = err.flush();
    }
}
