//! `vectord import`: read and check the whole file, then stream batches through ImportPoints.

use std::process::ExitCode;

use serde_json::json;
use vectord::pb;

use super::error::CliError;
use super::files::{self, Expect, Format};
use super::progress::Bars;
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
    // On a terminal (with --json too: the bar is on stderr): a bar of the points handed to
    // the stream, their rate and the time left at it; nothing otherwise.
    let mut bars = Bars::new(false);
    let progress = bars.counter("import", "import", total as u64);
    let mut first = Some(a.index.clone());
    let mut sent = 0usize;
    let mut rest = points.into_iter();
    let batches = std::iter::from_fn(move || {
        let batch: Vec<pb::Point> = rest.by_ref().take(batch_size).collect();
        if batch.is_empty() {
            if let Some(p) = &progress {
                p.finish_and_clear();
            }
            return None;
        }
        sent += batch.len();
        if let Some(p) = &progress {
            p.set_position(sent as u64);
        }
        Some(pb::ImportPointsRequest {
            index_name: first.take().unwrap_or_default(),
            points: batch,
            ..Default::default()
        })
    });
    let r = ctx
        .call_long(ctx.index().import_points(tokio_stream::iter(batches)))
        .await;
    bars.clear();
    let r = r?;
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
