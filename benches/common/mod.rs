//! Shared setup of the gRPC benches: a real in-process server over a temp dir, the real data
//! imported into a cosine index through ImportPoints, and a sampled harness.

use std::error::Error;
use std::path::PathBuf;
use std::time::Instant;

use tonic::transport::Channel;
use vectord::pb;
use vectord::pb::autotune_service_client::AutotuneServiceClient;
use vectord::pb::index_service_client::IndexServiceClient;

pub type BoxResult<T> = Result<T, Box<dyn Error>>;

pub const DEFAULT_DATA: &str = "../shared/data/words_minilm_30k.fvecs";
pub const INDEX: &str = "words";

pub struct Bench {
    pub channel: Channel,
    pub points: usize,
    pub dimension: u32,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<vectord::error::Result<()>>>,
    _tmp: tempfile::TempDir,
}

impl Bench {
    pub fn tune(&self) -> AutotuneServiceClient<Channel> {
        AutotuneServiceClient::new(self.channel.clone())
    }

    pub async fn stop(mut self) -> BoxResult<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.server.take() {
            t.await??;
        }
        Ok(())
    }
}

/// Starts the server, imports the data (`VECTORD_BENCH_DATA`, capped by `VECTORD_BENCH_N`) and
/// creates a sampled harness `harness` of `queries` queries (seed 42). None when the data file
/// is missing (the bench says so and succeeds).
pub async fn setup(what: &str, harness: &str, queries: u32) -> BoxResult<Option<Bench>> {
    let path = std::env::var_os("VECTORD_BENCH_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA));
    if !path.exists() {
        println!(
            "{what} bench skipped: {} not found (set VECTORD_BENCH_DATA)",
            path.display()
        );
        return Ok(None);
    }
    let limit = std::env::var("VECTORD_BENCH_N")
        .ok()
        .and_then(|n| n.parse().ok());
    let (dimension, vectors) = vectord::dataset::read_fvecs(&path, limit)?;
    let n = vectors.len();
    println!("data: {} ({n} x {dimension})", path.display());
    setup_vectors(vectors, dimension, pb::Metric::Cosine, harness, queries)
        .await
        .map(Some)
}

/// `n` clustered `dim`-d points (seeded): 1,000 Gaussian clusters of spread 0.1 around uniform
/// centres in [-1, 1]^dim, the shape of real embeddings rather than uniform noise.
#[allow(dead_code)] // the adaptive bench's
pub fn clustered(n: usize, dim: usize, seed: u64) -> Vec<Vec<f32>> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let centres: Vec<Vec<f32>> = (0..1000)
        .map(|_| (0..dim).map(|_| rng.gen_range(-1.0f32..1.0)).collect())
        .collect();
    (0..n)
        .map(|_| {
            let c = &centres[rng.gen_range(0..centres.len())];
            c.iter()
                .map(|x| {
                    // Sum of uniforms: close enough to a Gaussian, no extra crate.
                    let g: f32 = (0..4).map(|_| rng.gen_range(-0.5f32..0.5)).sum();
                    x + 0.1 * g
                })
                .collect()
        })
        .collect()
}

/// Starts the server, imports `vectors` into the index [`INDEX`] under `metric` and creates a
/// sampled harness `harness` of `queries` queries (seed 42).
pub async fn setup_vectors(
    vectors: Vec<Vec<f32>>,
    dimension: u32,
    metric: pb::Metric,
    harness: &str,
    queries: u32,
) -> BoxResult<Bench> {
    let n = vectors.len();

    let tmp = tempfile::tempdir()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(vectord::server::run(
        listener,
        vectord::config::Config::new(tmp.path()),
        async move {
            let _ = stopped.await;
        },
    ));
    let url = format!("http://{addr}");
    let channel = tonic::transport::Channel::from_shared(url)?
        .connect()
        .await?;
    // Wait for SERVING (startup recovery done) on health's Watch stream.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let mut watch = health
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner();
    while let Some(s) = watch.message().await? {
        if s.status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
            break;
        }
    }
    let mut index = IndexServiceClient::new(channel.clone()).max_encoding_message_size(usize::MAX);
    index
        .create_index(pb::CreateIndexRequest {
            name: INDEX.into(),
            dimension,
            metric: metric as i32,
            default_config: None,
            engine: String::new(),
        })
        .await?;
    let started = Instant::now();
    let batches: Vec<pb::ImportPointsRequest> = vectors
        .chunks(1000)
        .enumerate()
        .map(|(b, chunk)| pb::ImportPointsRequest {
            index_name: if b == 0 { INDEX.into() } else { String::new() },
            points: chunk
                .iter()
                .enumerate()
                .map(|(i, v)| pb::Point {
                    id: (b * 1000 + i) as u64,
                    vector: v.clone(),
                })
                .collect(),
            ..Default::default()
        })
        .collect();
    let imported = index
        .import_points(tokio_stream::iter(batches))
        .await?
        .into_inner();
    println!(
        "import: {} points in {:.1} s (includes the serving graph's inserts)",
        imported.point_count,
        started.elapsed().as_secs_f64()
    );
    AutotuneServiceClient::new(channel.clone())
        .create_harness(pb::CreateHarnessRequest {
            index_name: INDEX.into(),
            name: harness.into(),
            k: 10,
            queries: Some(pb::create_harness_request::Queries::Sampled(
                pb::SampledQueries {
                    query_count: queries,
                    seed: Some(42),
                },
            )),
        })
        .await?;
    Ok(Bench {
        channel,
        points: n,
        dimension,
        stop: Some(stop),
        server: Some(server),
        _tmp: tmp,
    })
}

/// Runs an autotune to its end: its trials and the finished event.
#[allow(dead_code)] // the autotune bench's
pub async fn autotune(
    tune: &mut AutotuneServiceClient<Channel>,
    req: pb::AutotuneRequest,
    on_trial: impl Fn(&pb::Trial),
) -> BoxResult<(Vec<pb::Trial>, Option<pb::AutotuneFinished>)> {
    let mut stream = tune.autotune(req).await?.into_inner();
    let mut trials = Vec::new();
    let mut finished = None;
    while let Some(msg) = stream.message().await? {
        match msg.event {
            Some(pb::autotune_response::Event::Trial(t)) => {
                on_trial(&t);
                trials.push(t);
            }
            Some(pb::autotune_response::Event::Finished(f)) => finished = Some(f),
            _ => {}
        }
    }
    Ok((trials, finished))
}
