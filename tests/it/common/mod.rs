//! Test support: a real server on 127.0.0.1:0 over a temp dir, reached through the generated
//! clients. Readiness is awaited through health's Watch stream, never by sleeping.
#![allow(dead_code)]

pub mod child;
pub mod engines;
pub mod load;
pub mod tls;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use vectord::config::Config;
use vectord::pb;
use vectord::pb::autotune_service_client::AutotuneServiceClient;
use vectord::pb::index_service_client::IndexServiceClient;
use vectord::pb::promotion_service_client::PromotionServiceClient;

pub struct TestServer {
    pub addr: std::net::SocketAddr,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<vectord::error::Result<()>>>,
}

impl TestServer {
    /// A server over a fresh temp dir.
    pub async fn start() -> Self {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().to_path_buf();
        let mut s = Self::start_in(&dir, Config::for_tests(&dir)).await;
        s._tmp = Some(tmp);
        s
    }

    /// A server over a fresh temp dir with the test config as `edit` changes it.
    pub async fn start_with(edit: impl FnOnce(&mut Config)) -> Self {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().to_path_buf();
        let mut config = Config::for_tests(&dir);
        edit(&mut config);
        let mut s = Self::start_in(&dir, config).await;
        s._tmp = Some(tmp);
        s
    }

    /// A server whose autotune jobs on `indexes` wait RUNNING, before their first trial, until
    /// the returned gate opens or they are cancelled: a job caught running without a slow grid.
    pub async fn start_gated(indexes: &[&str]) -> (Self, vectord::autotune::jobs::JobGate) {
        let gate = vectord::autotune::jobs::JobGate::closed(indexes.iter().copied());
        let s = Self::start_with(|c| c.job_gate = Some(gate.clone())).await;
        (s, gate)
    }

    /// A server over `dir` with `config`, ready (health SERVING) when this returns.
    pub async fn start_in(dir: &Path, config: Config) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        Self::start_on(listener, dir, config).await
    }

    /// A server on `listener` (bound by the caller, who may need its address in `config`,
    /// e.g. a cluster node's advertise address), over `dir` with `config`, ready when this
    /// returns.
    pub async fn start_on(listener: tokio::net::TcpListener, dir: &Path, config: Config) -> Self {
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(vectord::server::run(listener, config, async move {
            let _ = stopped.await;
        }));
        let mut s = TestServer {
            addr,
            dir: dir.to_path_buf(),
            _tmp: None,
            stop: Some(stop),
            task: None,
        };
        // A server that fails to start drops its listener (a connect is then reset): say why
        // it failed rather than how the connect did.
        if let Err(e) = s.try_wait_serving().await {
            let ended = tokio::time::timeout(Duration::from_secs(30), task).await;
            panic!("the server did not become SERVING ({e}); its task: {ended:?}");
        }
        s.task = Some(task);
        s
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .expect("url")
            .connect()
            .await
            .expect("connect")
    }

    pub async fn wait_serving(&self) {
        if let Err(e) = self.try_wait_serving().await {
            panic!("{e}");
        }
    }

    async fn try_wait_serving(&self) -> Result<(), String> {
        let channel = Channel::from_shared(self.url())
            .map_err(|e| format!("url: {e}"))?
            .connect()
            .await
            .map_err(|e| format!("connect: {e:?}"))?;
        let mut stream = HealthClient::new(channel)
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map_err(|e| format!("health watch: {e}"))?
            .into_inner();
        while let Some(msg) = stream
            .message()
            .await
            .map_err(|e| format!("health stream: {e}"))?
        {
            if msg.status == ServingStatus::Serving as i32 {
                return Ok(());
            }
        }
        Err("health stream ended before SERVING".into())
    }

    pub async fn index(&self) -> IndexServiceClient<Channel> {
        IndexServiceClient::new(self.channel().await)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }

    pub async fn promotion(&self) -> PromotionServiceClient<Channel> {
        PromotionServiceClient::new(self.channel().await)
    }

    pub async fn autotune(&self) -> AutotuneServiceClient<Channel> {
        AutotuneServiceClient::new(self.channel().await)
    }

    /// GetIndex of `name` (panics if the call fails).
    pub async fn get_index(&self, name: &str) -> pb::Index {
        index_of(self.channel().await, name).await
    }

    /// GetPromoted of `index` (panics if the call fails).
    pub async fn promoted(&self, index: &str) -> pb::GetPromotedResponse {
        promoted_of(self.channel().await, index).await
    }

    /// ListJobs of `index` (panics if the call fails).
    pub async fn jobs(&self, index: &str) -> Vec<pb::Job> {
        jobs_of(self.channel().await, index).await
    }

    /// Stops the server (graceful) and waits for it; the data dir stays.
    pub async fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("server task").expect("server result");
        }
    }

    /// Stops the server and starts a new one on the same data dir.
    pub async fn restart(self) -> Self {
        self.restart_with(|_| {}).await
    }

    /// Stops the server and starts a new one on the same data dir, with the test config as
    /// `edit` changes it.
    pub async fn restart_with(mut self, edit: impl FnOnce(&mut Config)) -> Self {
        // `run` returns once every tracked task has ended and the store is closed (no blocking
        // call holds it any more), so the data dir is free at once.
        self.stop().await;
        let tmp = self._tmp.take();
        let mut config = Config::for_tests(&self.dir);
        edit(&mut config);
        let mut s = Self::start_in(&self.dir, config).await;
        s._tmp = tmp;
        s
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// A small deterministic generator (xorshift) so tests need no data files.
pub struct Gen(u64);

impl Gen {
    pub fn new(seed: u64) -> Self {
        Gen(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// Uniform in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    pub fn vector(&mut self, dim: usize) -> Vec<f32> {
        (0..dim).map(|_| self.f32()).collect()
    }
    pub fn unit_vector(&mut self, dim: usize) -> Vec<f32> {
        let mut v = self.vector(dim);
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= n);
        v
    }
}

pub fn points(g: &mut Gen, ids: std::ops::Range<u64>, dim: usize) -> Vec<pb::Point> {
    ids.map(|id| pb::Point {
        id,
        vector: g.vector(dim),
    })
    .collect()
}

/// The vector (`dim` coordinates) of write `version` of `id`: unique, and its first two
/// coordinates name the write, so a stored vector says which write left it.
pub fn versioned(id: u64, version: u64, dim: usize) -> Vec<f32> {
    let mut v = Gen::new(id * 1_000_003 + version).vector(dim);
    v[0] = id as f32;
    v[1] = version as f32;
    v
}

/// The stored vector of `id` in `index` (GetPoint), None when absent.
pub async fn stored(c: &mut IndexServiceClient<Channel>, index: &str, id: u64) -> Option<Vec<f32>> {
    match c
        .get_point(pb::GetPointRequest {
            index_name: index.into(),
            id,
        })
        .await
    {
        Ok(r) => Some(r.into_inner().point.expect("point").vector),
        Err(s) if s.code() == tonic::Code::NotFound => None,
        Err(s) => panic!("GetPoint {id}: {s:?}"),
    }
}

/// Per id (each owned by one writer of a kill test): the state its last acknowledged write
/// left (Some(None): deleted; None: never written) and the write in flight when the server
/// died, if any. States are [`versioned`] versions.
#[derive(Clone, Copy, Default)]
pub struct IdLedger {
    pub acked: Option<Option<u64>>,
    pub in_flight: Option<Option<u64>>,
}

impl IdLedger {
    /// The last acknowledged state (None: deleted or never written).
    pub fn acked_state(&self) -> Option<u64> {
        self.acked.unwrap_or(None)
    }

    /// Whether `stored` (the version found after a restart, None if absent) is what the last
    /// acknowledged write left or what the write in flight would have.
    pub fn allows(&self, stored: Option<u64>) -> bool {
        stored == self.acked_state() || self.in_flight == Some(stored)
    }
}

pub async fn create_index(
    c: &mut IndexServiceClient<Channel>,
    name: &str,
    dim: u32,
    metric: pb::Metric,
) -> pb::Index {
    c.create_index(pb::CreateIndexRequest {
        name: name.into(),
        dimension: dim,
        metric: metric as i32,
        default_config: None,
        engine: String::new(),
    })
    .await
    .expect("create index")
    .into_inner()
    .index
    .expect("index")
}

pub async fn upsert(
    c: &mut IndexServiceClient<Channel>,
    name: &str,
    points: Vec<pb::Point>,
) -> pb::UpsertPointsResponse {
    c.upsert_points(pb::UpsertPointsRequest {
        index_name: name.into(),
        points,
        ..Default::default()
    })
    .await
    .expect("upsert")
    .into_inner()
}

pub async fn search(
    c: &mut IndexServiceClient<Channel>,
    name: &str,
    vector: Vec<f32>,
    k: u32,
    ef: Option<u32>,
) -> pb::SearchResponse {
    c.search(pb::SearchRequest {
        index_name: name.into(),
        vector,
        k,
        ef_search: ef,
        ..Default::default()
    })
    .await
    .expect("search")
    .into_inner()
}

/// The exact `k` nearest ids of `q` among `points` under `metric`: the library's own ground
/// truth (`autotune::harness::ground_truth`, the one the trials' recall is measured against),
/// so the tests and the server agree on distances and on ties (smaller id first). Cosine
/// vectors are normalised first, as the server stores them.
/// PutProfile of `name` over `indexes` (index name, default config).
pub async fn put_profile(
    c: &mut IndexServiceClient<Channel>,
    name: &str,
    indexes: &[(&str, Option<pb::HnswConfig>)],
) {
    c.put_profile(pb::PutProfileRequest {
        profile: Some(pb::Profile {
            name: name.into(),
            indexes: indexes
                .iter()
                .map(|(index, config)| pb::ProfileIndex {
                    index_name: (*index).into(),
                    default_config: *config,
                })
                .collect(),
        }),
    })
    .await
    .expect("put profile");
}

/// ActivateProfile of `name`: the generation it made for the profile's first index.
pub async fn activate(c: &mut IndexServiceClient<Channel>, name: &str) -> pb::Generation {
    c.activate_profile(pb::ActivateProfileRequest { name: name.into() })
        .await
        .expect("activate")
        .into_inner()
        .generations
        .remove(0)
}

pub fn exact_top_k(metric: pb::Metric, points: &[pb::Point], q: &[f32], k: usize) -> Vec<u64> {
    use vectord::autotune::harness::{ground_truth, Query};
    use vectord::model::{normalize, Point};
    let metric = vectord::grpc::convert::metric_from(metric as i32).expect("a metric");
    let prepared = |v: &[f32]| {
        let mut v = v.to_vec();
        if metric == vectord::model::Metric::Cosine {
            normalize("vector", &mut v).expect("a non-zero vector");
        }
        v
    };
    let points: Vec<Point> = points
        .iter()
        .map(|p| Point {
            id: p.id,
            vector: prepared(&p.vector),
        })
        .collect();
    let query = Query {
        vector: prepared(q),
        exclude: None,
    };
    ground_truth(metric, &points, &[query], k)
        .pop()
        .expect("one answer per query")
}

/// A CreateHarness request for `query_count` queries sampled from the index's points.
pub fn harness_request(
    index: &str,
    name: &str,
    k: u32,
    query_count: u32,
    seed: Option<u64>,
) -> pb::CreateHarnessRequest {
    pb::CreateHarnessRequest {
        index_name: index.into(),
        name: name.into(),
        k,
        queries: Some(pb::create_harness_request::Queries::Sampled(
            pb::SampledQueries { query_count, seed },
        )),
    }
}

/// SetRefreshPolicy of `index` through `s`: the policy as stored.
pub async fn set_policy(
    s: &TestServer,
    index: &str,
    policy: Option<pb::RefreshPolicy>,
) -> Result<pb::RefreshPolicy, tonic::Status> {
    s.autotune()
        .await
        .set_refresh_policy(pb::SetRefreshPolicyRequest {
            index_name: index.into(),
            policy,
        })
        .await
        .map(|r| r.into_inner().policy.expect("policy"))
}

/// An ON_APPEND policy at `threshold` over harness "h", any recall accepted.
pub fn on_append(threshold: f64) -> pb::RefreshPolicy {
    pb::RefreshPolicy {
        mode: pb::RefreshMode::OnAppend as i32,
        change_threshold: threshold,
        harness: "h".into(),
        min_recall: Some(0.0),
        ..Default::default()
    }
}

/// How often `eventually` looks again.
pub const POLL: Duration = Duration::from_millis(20);

/// Polls `probe` (every `POLL`) until it returns `Some`, and returns that value; panics naming
/// `what` if `timeout` passes first. For state the server reaches on its own (a job's end, a
/// refresh probe) and that no stream announces; prefer a stream or a gate where there is one.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {timeout:?}: {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

pub fn code_of<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> tonic::Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => s.code(),
    }
}

/// Searches `index` for `point`'s vector in a loop until `stop` turns true (and more than `min`
/// searches ran), asserting every search succeeds and finds the point itself first. Returns the
/// number of searches and the generations that answered them.
pub fn spawn_searcher(
    mut c: IndexServiceClient<Channel>,
    index: &str,
    point: &pb::Point,
    min: u64,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<(u64, std::collections::BTreeSet<u64>)> {
    let (index, id, q) = (index.to_string(), point.id, point.vector.clone());
    tokio::spawn(async move {
        let (mut ok, mut generations) = (0u64, std::collections::BTreeSet::new());
        loop {
            let r = c
                .search(pb::SearchRequest {
                    index_name: index.clone(),
                    vector: q.clone(),
                    k: 3,
                    ef_search: None,
                    ..Default::default()
                })
                .await
                .expect("a search failed while generations were swapped")
                .into_inner();
            assert_eq!(r.neighbors[0].id, id);
            generations.insert(r.generation);
            ok += 1;
            if *stop.borrow_and_update() && ok > min {
                return (ok, generations);
            }
        }
    })
}

/// The events of an Autotune stream until it ends, and the status it ended with, if an
/// error; progress events are dropped.
pub async fn collect(
    mut stream: tonic::Streaming<pb::AutotuneResponse>,
) -> (Vec<pb::autotune_response::Event>, Option<tonic::Status>) {
    let mut events = Vec::new();
    loop {
        match stream.message().await {
            // Progress comes as the job runs, more of it on a slower machine: the events
            // checked here are the others (progress.rs tests progress).
            Ok(Some(pb::AutotuneResponse {
                event: Some(pb::autotune_response::Event::Progress(_)),
            })) => {}
            Ok(Some(m)) => events.push(m.event.expect("event")),
            Ok(None) => return (events, None),
            Err(s) => return (events, Some(s)),
        }
    }
}

/// GetIndex of `name` through `ch` (panics if the call fails).
pub async fn index_of(ch: Channel, name: &str) -> pb::Index {
    IndexServiceClient::new(ch)
        .get_index(pb::GetIndexRequest { name: name.into() })
        .await
        .expect("get index")
        .into_inner()
        .index
        .expect("index")
}

/// GetPromoted of `index` through `ch` (panics if the call fails).
pub async fn promoted_of(ch: Channel, index: &str) -> pb::GetPromotedResponse {
    PromotionServiceClient::new(ch)
        .get_promoted(pb::GetPromotedRequest {
            index_name: index.into(),
        })
        .await
        .expect("get promoted")
        .into_inner()
}

/// An Autotune stream's first event, which must be `Started` (panics otherwise).
pub async fn job_started(
    stream: &mut tonic::Streaming<pb::AutotuneResponse>,
) -> pb::AutotuneStarted {
    match stream.message().await {
        Ok(Some(pb::AutotuneResponse {
            event: Some(pb::autotune_response::Event::Started(st)),
        })) => st,
        other => panic!("the first event is Started, not {other:?}"),
    }
}

/// Job `id` of `index` as the server behind `ch` first lists it ended, asked again as soon as
/// each answer comes (no pause: these tests are about what a client may do at that very
/// moment). Panics if the job is not listed, or still running after `within`.
pub async fn first_listed_ended(ch: &Channel, index: &str, id: &str, within: Duration) -> pb::Job {
    let deadline = std::time::Instant::now() + within;
    loop {
        let j = jobs_of(ch.clone(), index)
            .await
            .into_iter()
            .find(|j| j.id == id)
            .unwrap_or_else(|| panic!("job {id} is listed"));
        if j.state != pb::JobState::Running as i32 {
            return j;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "job {id} still running after {within:?}"
        );
    }
}

/// ListJobs of `index` through `ch` (panics if the call fails).
pub async fn jobs_of(ch: Channel, index: &str) -> Vec<pb::Job> {
    AutotuneServiceClient::new(ch)
        .list_jobs(pb::ListJobsRequest {
            index_name: index.into(),
        })
        .await
        .expect("list jobs")
        .into_inner()
        .jobs
}

/// TARGET_RECALL's winner rule as the contract states it: of the trials that reached the target
/// (`reached`: each one's p50 in µs and mean distance computations per query), the winner's p50
/// is within 5% of the lowest, and no trial within those 5% needs fewer distance computations.
pub fn assert_target_recall_winner(reached: &[(f64, f64)], winner: (f64, f64), context: &str) {
    let lowest = reached.iter().map(|t| t.0).fold(f64::INFINITY, f64::min);
    assert!(lowest.is_finite(), "no trial reached the target: {context}");
    assert!(
        winner.0 <= lowest * 1.05,
        "the winner's p50 {} is not within 5% of the lowest {lowest}: {context}",
        winner.0
    );
    assert!(
        reached
            .iter()
            .filter(|t| t.0 <= lowest * 1.05)
            .all(|t| t.1 >= winner.1),
        "a tied trial needs fewer distance computations than the winner: {context}"
    );
}
