//! A request fuzzer against the real `vectord` binary, for a bounded time (VECTORD_FUZZ_SECS,
//! default 60). Ignored by the normal `cargo test`; CI runs it with
//! `cargo test --test it fuzz:: -- --ignored`. See docs/fuzzing.md.
//!
//! Before the run it writes a fixed set of points (two indexes), a harness, two trials and two
//! promotions (current + history), and remembers them. During the run several tasks send
//! proptest-generated requests to every RPC of every service (IndexService, AutotuneService,
//! PromotionService, health, reflection v1 and v1alpha): valid-ish and invalid values, server
//! streams dropped after N messages, client streams cut mid-way, a valid frame of one method's
//! message sent to another method, garbage gRPC frames (random bodies, wrong length prefixes,
//! compressed flags, oversize prefixes, stalled bodies, odd headers) and garbage bytes on raw
//! TCP connections. Any answer is fine except: the server dying, a call not answered within
//! `CALL_BOUND`, or INTERNAL/UNKNOWN from vectord itself (a panic or a bug; the only INTERNALs
//! allowed are those the gRPC spec has the library send for a body that does not parse, and only
//! for requests the fuzzer made malformed on purpose). After the run the server must be
//! SERVING, its RSS within `RSS_BOUND`, the fixed data intact, its stderr free of panics, and a
//! SIGTERM must stop it cleanly.
//!
//! The fuzzer never changes the fixed data through the API: calls that delete or change
//! points, promotions, harnesses or refresh policies draw their index names from a set without
//! the fixed indexes (reads, trials, new harnesses and profile activations may name them;
//! a profile names a fixed index only with that index's own default config, since a weak drawn
//! config may legitimately build a graph in which some points are unreachable).
//!
//! Each task draws its requests from a proptest `TestRunner` seeded by (seed, task number), so a
//! seed replays the same request sequence per task (the interleaving of the tasks, and so the
//! server's state, varies). Set VECTORD_FUZZ_SEED to replay; the seed is printed at the start
//! and in every failure.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::child::{Vectord, DEADLINE};
use futures_util::StreamExt as _;
use parking_lot::Mutex;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::strategy::ValueTree as _;
use proptest::test_runner::{Config as PtConfig, RngAlgorithm, TestRng, TestRunner};
use prost::bytes::{Buf as _, BufMut as _, Bytes};
use prost::Message as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1 as refl;
use vectord::pb;
use vectord::pb::autotune_service_client::AutotuneServiceClient;
use vectord::pb::index_service_client::IndexServiceClient;
use vectord::pb::promotion_service_client::PromotionServiceClient;

/// Longest any fuzz call may go without an answer (the call itself carries a 20 s grpc-timeout)
/// before it counts as a hang. Generous: two shared cores, a debug build, several tasks.
const CALL_BOUND: Duration = Duration::from_secs(60);
/// The grpc-timeout every fuzz call carries.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a deliberately stalled request (a client stream or body that never ends) is held
/// open before the fuzzer drops it.
const STALL: Duration = Duration::from_millis(300);
/// The RSS (now and peak) the server may have after the run. sled's page cache is 64 MB by
/// default (`--store-cache-mb`); everything else the run can make the server hold is small: a
/// few MB of fixed data, the fuzzer's own indexes (at most a few thousand upserts of at most
/// 32 points of at most 4,097 floats, most far smaller), and the in-flight requests of a few
/// tasks (each at most about 1 MB). Measured: 54-65 MiB after 20 s runs (2026-12-02). A leak
/// or an unbounded answer (issue 22's 2.5 GB SearchBatch) goes past it.
const RSS_BOUND_KB: u64 = 512 * 1024;

const ADMIN: &str = "fuzz-admin-key-0123456789";
const READER: &str = "fuzz-reader-key-0123456789";

const FIXED: [&str; 2] = ["fixed-l2", "fixed-cos"];
const SCRATCH: [&str; 3] = ["scratch-a", "scratch-b", "scratch-c"];
/// Names the fuzzer creates and deletes (so creates, writes and deletes meet).
const CYCLED: [&str; 4] = ["fuzz-0", "fuzz-1", "fuzz-2", "fuzz-3"];
const FIXED_HARNESS: &str = "fixed-h";
/// The ids of the fixed points; write strategies never produce them.
const FIXED_ID0: u64 = 7_000_000_000;
const FIXED_N: u64 = 200;

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{name}={v:?}: {e}")),
        Err(_) => default,
    }
}

// ---------------------------------------------------------------------------------------------
// A codec that sends and receives message bodies as bytes, so any method can be called with any
// bytes (its own message, another method's, garbage).

#[derive(Clone, Copy, Default)]
struct RawCodec;

struct RawEncoder;
struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

// ---------------------------------------------------------------------------------------------
// The methods and their request generators.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Unary,
    ServerStream,
    ClientStream,
    Bidi,
}

struct Method {
    path: &'static str,
    kind: Kind,
}

/// One encoded request message and how it reads (for failure reports).
#[derive(Clone)]
struct Msg {
    text: String,
    bytes: Bytes,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&clip(&self.text, 1500))
    }
}

fn clip(s: &str, n: usize) -> String {
    if s.len() <= n {
        return s.to_string();
    }
    let mut end = n;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes in all)", &s[..end], s.len())
}

fn msg<M: prost::Message + std::fmt::Debug>(m: M) -> Msg {
    Msg {
        text: format!("{m:?}"),
        bytes: Bytes::from(m.encode_to_vec()),
    }
}

type S<T> = SBoxedStrategy<T>;

fn text() -> S<String> {
    prop_oneof![
        6 => "[a-z0-9_.-]{0,12}",
        1 => Just(String::new()),
        1 => "\\PC{0,80}",
        1 => (65usize..300).prop_map(|n| "x".repeat(n)),
        1 => (1_000usize..100_000).prop_map(|n| "é".repeat(n)),
    ]
    .sboxed()
}

/// Index names: fixed ones only when `with_fixed`; never a fixed one otherwise.
fn index_name(with_fixed: bool) -> S<String> {
    let mut pool: Vec<String> = SCRATCH
        .iter()
        .chain(&CYCLED)
        .map(|s| s.to_string())
        .collect();
    if with_fixed {
        pool.extend(FIXED.iter().map(|s| s.to_string()));
    }
    prop_oneof![
        8 => select(pool),
        2 => "[A-Za-z0-9_.-]{1,64}",
        1 => text(),
    ]
    .prop_filter("a fixed index", move |n| {
        with_fixed || !FIXED.contains(&n.as_str())
    })
    .sboxed()
}

fn harness_name() -> S<String> {
    prop_oneof![
        6 => select(vec!["h".to_string(), FIXED_HARNESS.to_string(), "h1".to_string()]),
        1 => "[A-Za-z0-9_.-]{1,64}",
        1 => text(),
    ]
    .sboxed()
}

fn profile_name() -> S<String> {
    prop_oneof![
        4 => select(vec!["p0".to_string(), "p1".to_string(), "p2".to_string()]),
        1 => "[A-Za-z0-9_.-]{1,64}",
        1 => text(),
    ]
    .sboxed()
}

fn small_u32() -> S<u32> {
    prop_oneof![
        6 => 0u32..50,
        1 => 50u32..2000,
        1 => select(vec![1000u32, 1001, 4096, 4097, 10_000, 10_001, 65_536, u32::MAX]),
        1 => any::<u32>(),
    ]
    .sboxed()
}

fn k() -> S<u32> {
    prop_oneof![
        6 => 1u32..20,
        1 => select(vec![0u32, 1000, 1001, u32::MAX]),
        1 => any::<u32>(),
    ]
    .sboxed()
}

fn ef() -> S<Option<u32>> {
    prop::option::of(prop_oneof![
        4 => 1u32..300,
        1 => select(vec![0u32, 10_000, 10_001, u32::MAX]),
        1 => any::<u32>(),
    ])
    .sboxed()
}

fn enum_i32() -> S<i32> {
    prop_oneof![8 => 0i32..4, 1 => select(vec![-1i32, 4, 99, i32::MAX, i32::MIN]), 1 => any::<i32>()]
        .sboxed()
}

fn recall() -> S<f64> {
    prop_oneof![
        6 => 0.0f64..=1.0,
        1 => select(vec![f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -1.0, 1.5, -0.0, 1e300]),
        1 => proptest::num::f64::ANY,
    ]
    .sboxed()
}

fn seed() -> S<Option<u64>> {
    prop::option::of(prop_oneof![0u64..100, any::<u64>()]).sboxed()
}

fn config() -> S<pb::HnswConfig> {
    let m = prop_oneof![
        4 => 2u32..33,
        1 => select(vec![0u32, 1, 128, 129, u32::MAX]),
        1 => any::<u32>(),
    ];
    let efc = prop_oneof![4 => 10u32..200, 1 => select(vec![0u32, 9, 400, 401, u32::MAX])];
    let efs = prop_oneof![4 => 10u32..200, 1 => select(vec![0u32, 9, 200, 201, u32::MAX])];
    (m, efc, efs, seed())
        .prop_map(|(m, ef_construction, ef_search, seed)| pb::HnswConfig {
            m,
            ef_construction,
            ef_search,
            seed,
        })
        .sboxed()
}

fn float() -> S<f32> {
    prop_oneof![
        1 => select(vec![
            f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, f32::MIN,
            f32::MIN_POSITIVE, 1e-45, 0.0, -0.0, 1e30,
        ]),
        1 => proptest::num::f32::ANY,
    ]
    .sboxed()
}

fn dim() -> S<usize> {
    prop_oneof![
        12 => select(vec![4usize, 8, 16]),
        1 => 0usize..4,
        1 => 17usize..64,
        1 => select(vec![4096usize, 4097]),
    ]
    .sboxed()
}

/// A vector of `d` floats: mostly in [-1, 1), sometimes with NaN, infinities, extremes, zeros.
fn vector_of(d: usize) -> S<Vec<f32>> {
    prop_oneof![
        4 => prop::collection::vec(-1.0f32..1.0, d),
        1 => prop::collection::vec(prop_oneof![8 => -1.0f32..1.0, 1 => float()], d),
        1 => Just(vec![0.0; d]),
    ]
    .sboxed()
}

fn vector() -> S<Vec<f32>> {
    dim().prop_flat_map(vector_of).sboxed()
}

/// Ids a write may use: never a fixed point's.
fn write_id() -> S<u64> {
    prop_oneof![4 => 0u64..500, 1 => select(vec![0u64, u64::MAX]), 1 => any::<u64>()]
        .prop_map(|id| {
            if (FIXED_ID0..FIXED_ID0 + FIXED_N).contains(&id) {
                id + FIXED_N
            } else {
                id
            }
        })
        .sboxed()
}

fn read_id() -> S<u64> {
    prop_oneof![2 => write_id(), 1 => FIXED_ID0..FIXED_ID0 + FIXED_N + 2].sboxed()
}

/// Points of one dimension (mostly), at most `n`.
fn points(n: usize) -> S<Vec<pb::Point>> {
    dim()
        .prop_flat_map(move |d| {
            let point = (write_id(), prop_oneof![8 => vector_of(d), 1 => vector()])
                .prop_map(|(id, vector)| pb::Point { id, vector });
            prop::collection::vec(point, 0..n)
        })
        .sboxed()
}

fn queries(n: usize) -> S<Vec<pb::QueryVector>> {
    dim()
        .prop_flat_map(move |d| {
            prop::collection::vec(
                prop_oneof![8 => vector_of(d), 1 => vector()]
                    .prop_map(|vector| pb::QueryVector { vector }),
                0..n,
            )
        })
        .sboxed()
}

fn page_token() -> S<String> {
    prop_oneof![3 => Just(String::new()), 1 => "[A-Za-z0-9+/=_-]{1,40}", 1 => text()].sboxed()
}

fn one<M: prost::Message + std::fmt::Debug + 'static>(
    s: impl Strategy<Value = M> + Send + Sync + 'static,
) -> S<Vec<Msg>> {
    s.prop_map(|m| vec![msg(m)]).sboxed()
}

/// Every method the server has, with a generator of its requests (one message for unary and
/// server-streaming methods, a sequence for client-streaming and bidi ones).
fn methods() -> Vec<(Method, S<Vec<Msg>>)> {
    let m = |path, kind| Method { path, kind };
    use Kind::*;
    vec![
        (
            m("/vectord.v1.IndexService/CreateIndex", Unary),
            one(
                (
                    prop_oneof![2 => select(CYCLED.iter().map(|s| s.to_string()).collect::<Vec<_>>()), 1 => index_name(true)],
                    prop_oneof![4 => select(vec![4u32, 8, 16]), 1 => small_u32()],
                    enum_i32(),
                    prop::option::of(config()),
                )
                    .prop_map(|(name, dimension, metric, default_config)| {
                        pb::CreateIndexRequest {
                            name,
                            dimension,
                            metric,
                            default_config,
                            engine: String::new(),
                        }
                    }),
            ),
        ),
        (
            m("/vectord.v1.IndexService/GetIndex", Unary),
            one(index_name(true).prop_map(|name| pb::GetIndexRequest { name })),
        ),
        (
            m("/vectord.v1.IndexService/ListIndexes", Unary),
            one((small_u32(), page_token()).prop_map(|(page_size, page_token)| {
                pb::ListIndexesRequest {
                    page_size,
                    page_token,
                }
            })),
        ),
        (
            m("/vectord.v1.IndexService/DeleteIndex", Unary),
            // The scratch indexes stay (the sane generators write to them); CYCLED ones come and go.
            one(index_name(false)
                .prop_filter("a scratch index", |n| !SCRATCH.contains(&n.as_str()))
                .prop_map(|name| pb::DeleteIndexRequest { name })),
        ),
        (
            m("/vectord.v1.IndexService/UpsertPoints", Unary),
            one((index_name(false), points(32)).prop_map(|(index_name, points)| {
                pb::UpsertPointsRequest { index_name, points, ..Default::default() }
            })),
        ),
        (
            m("/vectord.v1.IndexService/ImportPoints", ClientStream),
            (index_name(false), prop::collection::vec((index_name(false), points(16)), 0..5))
                .prop_map(|(first, rest)| {
                    rest.into_iter()
                        .enumerate()
                        .map(|(i, (name, points))| {
                            msg(pb::ImportPointsRequest {
                                // Later messages' names are ignored by the server; the first
                                // one's never names a fixed index.
                                index_name: if i == 0 { first.clone() } else { name },
                                points,
                                ..Default::default()
                            })
                        })
                        .collect()
                })
                .sboxed(),
        ),
        (
            m("/vectord.v1.IndexService/DeletePoints", Unary),
            one(
                (
                    index_name(false),
                    prop_oneof![
                        8 => prop::collection::vec(write_id(), 0..64),
                        1 => (1000u64..20_000).prop_map(|n| (0..n).collect()),
                    ],
                )
                    .prop_map(|(index_name, ids)| pb::DeletePointsRequest { index_name, ids, ..Default::default() }),
            ),
        ),
        (
            m("/vectord.v1.IndexService/Search", Unary),
            one((index_name(true), vector(), k(), ef()).prop_map(
                |(index_name, vector, k, ef_search)| pb::SearchRequest {
                    index_name,
                    vector,
                    k,
                    ef_search,
                    ..Default::default()
                },
            )),
        ),
        (
            m("/vectord.v1.IndexService/GetPoint", Unary),
            one((index_name(true), read_id())
                .prop_map(|(index_name, id)| pb::GetPointRequest { index_name, id })),
        ),
        (
            m("/vectord.v1.IndexService/SearchBatch", Unary),
            one((index_name(true), queries(64), k(), ef()).prop_map(
                |(index_name, queries, k, ef_search)| pb::SearchBatchRequest {
                    index_name,
                    queries,
                    k,
                    ef_search,
                    ..Default::default()
                },
            )),
        ),
        (
            m("/vectord.v1.IndexService/PutProfile", Unary),
            one(
                prop::option::of((
                    profile_name(),
                    prop::collection::vec(
                        (index_name(true), prop::option::of(config())).prop_map(
                            // A fixed index only ever gets its own default config: activating
                            // a drawn one (m 2, ef_construction 10) may leave a graph whose
                            // parts no search reaches, a legitimate answer of a weak config
                            // that the fixed-data check would take for lost points.
                            |(index_name, default_config)| pb::ProfileIndex {
                                default_config: default_config
                                    .filter(|_| !FIXED.contains(&index_name.as_str())),
                                index_name,
                            },
                        ),
                        0..4,
                    ),
                ))
                .prop_map(|p| pb::PutProfileRequest {
                    profile: p.map(|(name, indexes)| pb::Profile { name, indexes }),
                }),
            ),
        ),
        (
            m("/vectord.v1.IndexService/GetProfile", Unary),
            one(profile_name().prop_map(|name| pb::GetProfileRequest { name })),
        ),
        (
            m("/vectord.v1.IndexService/ListProfiles", Unary),
            one((small_u32(), page_token()).prop_map(|(page_size, page_token)| {
                pb::ListProfilesRequest {
                    page_size,
                    page_token,
                }
            })),
        ),
        (
            m("/vectord.v1.IndexService/DeleteProfile", Unary),
            one(profile_name().prop_map(|name| pb::DeleteProfileRequest { name })),
        ),
        (
            m("/vectord.v1.IndexService/ActivateProfile", Unary),
            one(profile_name().prop_map(|name| pb::ActivateProfileRequest { name })),
        ),
        (
            m("/vectord.v1.AutotuneService/CreateHarness", Unary),
            one(
                (
                    index_name(true),
                    harness_name(),
                    k(),
                    prop_oneof![
                        1 => Just(None),
                        3 => (small_u32(), seed()).prop_map(|(query_count, seed)| Some(
                            pb::create_harness_request::Queries::Sampled(pb::SampledQueries {
                                query_count,
                                seed,
                            })
                        )),
                        3 => queries(32).prop_map(|queries| Some(
                            pb::create_harness_request::Queries::Explicit(pb::ExplicitQueries {
                                queries,
                            })
                        )),
                    ],
                )
                    .prop_map(|(index_name, name, k, queries)| {
                        // A harness named like the fixed one may only be made elsewhere.
                        let name = if FIXED.contains(&index_name.as_str()) && name == FIXED_HARNESS {
                            format!("{name}-2")
                        } else {
                            name
                        };
                        pb::CreateHarnessRequest {
                            index_name,
                            name,
                            k,
                            queries,
                        }
                    }),
            ),
        ),
        (
            m("/vectord.v1.AutotuneService/GetHarness", Unary),
            one((index_name(true), harness_name())
                .prop_map(|(index_name, name)| pb::GetHarnessRequest { index_name, name })),
        ),
        (
            m("/vectord.v1.AutotuneService/ListHarnesses", Unary),
            one(index_name(true).prop_map(|index_name| pb::ListHarnessesRequest { index_name })),
        ),
        (
            m("/vectord.v1.AutotuneService/DeleteHarness", Unary),
            one((index_name(false), harness_name())
                .prop_filter("a scratch index's harness h", |(i, h)| {
                    !(SCRATCH.contains(&i.as_str()) && h == "h")
                })
                .prop_map(|(index_name, name)| pb::DeleteHarnessRequest { index_name, name })),
        ),
        (
            m("/vectord.v1.AutotuneService/RunTrial", Unary),
            one(
                (index_name(true), harness_name(), prop::option::of(config())).prop_map(
                    |(index_name, harness, config)| pb::RunTrialRequest {
                        index_name,
                        harness,
                        config,
                    },
                ),
            ),
        ),
        (
            m("/vectord.v1.AutotuneService/GetTrial", Unary),
            one(prop_oneof![4 => 0u64..64, 1 => any::<u64>()].prop_map(|id| pb::GetTrialRequest { id })),
        ),
        (
            m("/vectord.v1.AutotuneService/ListTrials", Unary),
            one(
                (
                    prop_oneof![1 => Just(String::new()), 3 => index_name(true)],
                    prop_oneof![1 => Just(String::new()), 3 => harness_name()],
                    small_u32(),
                    page_token(),
                )
                    .prop_map(|(index_name, harness, page_size, page_token)| {
                        pb::ListTrialsRequest {
                            index_name,
                            harness,
                            page_size,
                            page_token,
                        }
                    }),
            ),
        ),
        (
            m("/vectord.v1.AutotuneService/Autotune", ServerStream),
            one(
                (
                    (index_name(false), harness_name(), prop::option::of(recall())),
                    prop::collection::vec(config(), 0..4),
                    (any::<bool>(), text(), enum_i32(), prop::option::of(recall()), enum_i32()),
                    (
                        prop::option::of((0u32..12, 0u32..5).prop_map(
                            |(max_trials, max_seconds)| pb::AdaptiveBudget {
                                max_trials,
                                max_seconds,
                            },
                        )),
                        seed(),
                        prop::collection::vec(small_u32(), 0..4),
                        prop::collection::vec(small_u32(), 0..4),
                    ),
                )
                    .prop_map(
                        |(
                            (index_name, harness, min_recall),
                            grid,
                            (activate, requested_by, objective, target_recall, strategy),
                            (budget, seed, adaptive_m, adaptive_ef_construction),
                        )| pb::AutotuneRequest {
                            index_name,
                            harness,
                            min_recall,
                            grid,
                            activate,
                            requested_by,
                            objective,
                            target_recall,
                            strategy,
                            budget,
                            seed,
                            adaptive_m,
                            adaptive_ef_construction,
                            adaptive_sample_points: None,
                            adaptive_confirm: 0,
                        },
                    ),
            ),
        ),
        (
            m("/vectord.v1.AutotuneService/ListJobs", Unary),
            one(prop_oneof![1 => Just(String::new()), 2 => index_name(true)]
                .prop_map(|index_name| pb::ListJobsRequest { index_name })),
        ),
        (
            m("/vectord.v1.AutotuneService/CancelJob", Unary),
            one(prop_oneof![3 => "job-[0-9]{1,3}", 1 => text()].prop_map(|id| pb::CancelJobRequest { id })),
        ),
        (
            m("/vectord.v1.AutotuneService/GetParetoFront", Unary),
            one((index_name(true), harness_name()).prop_map(|(index_name, harness)| {
                pb::GetParetoFrontRequest {
                    index_name,
                    harness,
                    include_sample_trials: false,
                }
            })),
        ),
        (
            m("/vectord.v1.AutotuneService/SetRefreshPolicy", Unary),
            one(
                (
                    index_name(false),
                    prop::option::of((
                        (enum_i32(), prop_oneof![3 => 0.0f64..150.0, 1 => recall()], harness_name()),
                        (
                            prop::option::of(recall()),
                            any::<bool>(),
                            prop::option::of(recall()),
                            any::<bool>(),
                            prop::option::of(recall()),
                        ),
                    )),
                )
                    .prop_map(|(index_name, policy)| pb::SetRefreshPolicyRequest {
                        index_name,
                        policy: policy.map(
                            |(
                                (mode, change_threshold, harness),
                                (recall_floor, activate, target_recall, adaptive, min_recall),
                            )| pb::RefreshPolicy {
                                mode,
                                change_threshold,
                                harness,
                                recall_floor,
                                activate,
                                target_recall,
                                adaptive,
                                min_recall,
                            },
                        ),
                    }),
            ),
        ),
        (
            m("/vectord.v1.PromotionService/Promote", Unary),
            one(
                (index_name(false), prop_oneof![4 => 0u64..64, 1 => any::<u64>()], text(), text())
                    .prop_map(|(index_name, trial_id, promoted_by, note)| {
                        pb::PromoteRequest {
                            index_name,
                            trial_id,
                            promoted_by,
                            note,
                        }
                    }),
            ),
        ),
        (
            m("/vectord.v1.PromotionService/Rollback", Unary),
            one(index_name(false).prop_map(|index_name| pb::RollbackRequest { index_name })),
        ),
        (
            m("/vectord.v1.PromotionService/GetPromoted", Unary),
            one(index_name(true).prop_map(|index_name| pb::GetPromotedRequest { index_name })),
        ),
        (
            m("/vectord.v1.ClusterService/ListNodes", Unary),
            one(Just(pb::ListNodesRequest {})),
        ),
        (
            m("/vectord.v1.ClusterService/FetchIndexState", ServerStream),
            one(
                (index_name(true), any::<u64>(), any::<bool>()).prop_map(
                    |(index_name, cluster_uid, with_graph)| pb::FetchIndexStateRequest {
                        index_name,
                        cluster_uid,
                        with_graph,
                    },
                ),
            ),
        ),
        (
            m("/grpc.health.v1.Health/Check", Unary),
            one(health_service().prop_map(|service| HealthCheckRequest { service })),
        ),
        (
            m("/grpc.health.v1.Health/Watch", ServerStream),
            one(health_service().prop_map(|service| HealthCheckRequest { service })),
        ),
        (
            m("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", Bidi),
            reflection_requests(),
        ),
        (
            m("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", Bidi),
            // The v1alpha messages are the v1 messages on the wire.
            reflection_requests(),
        ),
    ]
    .into_iter()
    .map(|(method, wild)| match sane(method.path) {
        Some(sane) => (method, prop_oneof![wild, sane].sboxed()),
        None => (method, wild),
    })
    .collect()
}

/// Requests that are mostly valid and name existing data (the scratch indexes with their
/// dimensions, the fixed ones for reads), so that the paths behind validation run too.
fn sane(path: &str) -> Option<S<Vec<Msg>>> {
    let scratch = || {
        select(vec![
            (SCRATCH[0], 4usize),
            (SCRATCH[1], 8),
            (SCRATCH[2], 16),
        ])
    };
    let readable = || {
        select(vec![
            (SCRATCH[0], 4usize),
            (SCRATCH[1], 8),
            (SCRATCH[2], 16),
            (FIXED[0], 8),
            (FIXED[1], 16),
        ])
    };
    let clean = |d: usize| prop::collection::vec(-1.0f32..1.0, d);
    let good_config = || {
        (2u32..33, 10u32..120, 10u32..120, seed()).prop_map(
            |(m, ef_construction, ef_search, seed)| pb::HnswConfig {
                m,
                ef_construction,
                ef_search,
                seed,
            },
        )
    };
    let sane_points = move |d: usize, n: usize| {
        prop::collection::vec(
            (write_id(), clean(d)).prop_map(|(id, vector)| pb::Point { id, vector }),
            1..n,
        )
    };
    let name = |s: &str| s.rsplit('/').next().unwrap_or("").to_string();
    let g: S<Vec<Msg>> = match name(path).as_str() {
        "UpsertPoints" => one(scratch().prop_flat_map(move |(n, d)| {
            sane_points(d, 32).prop_map(move |points| pb::UpsertPointsRequest {
                index_name: n.to_string(),
                points,
                ..Default::default()
            })
        })),
        "ImportPoints" => scratch()
            .prop_flat_map(move |(n, d)| {
                prop::collection::vec(sane_points(d, 16), 1..4).prop_map(move |batches| {
                    batches
                        .into_iter()
                        .map(|points| {
                            msg(pb::ImportPointsRequest {
                                index_name: n.to_string(),
                                points,
                                ..Default::default()
                            })
                        })
                        .collect()
                })
            })
            .sboxed(),
        "Search" => one(readable().prop_flat_map(move |(n, d)| {
            (clean(d), 1u32..20, prop::option::of(10u32..300)).prop_map(
                move |(vector, k, ef_search)| pb::SearchRequest {
                    index_name: n.to_string(),
                    vector,
                    k,
                    ef_search,
                    ..Default::default()
                },
            )
        })),
        "SearchBatch" => one(readable().prop_flat_map(move |(n, d)| {
            (
                prop::collection::vec(
                    clean(d).prop_map(|vector| pb::QueryVector { vector }),
                    1..16,
                ),
                1u32..20,
                prop::option::of(10u32..300),
            )
                .prop_map(move |(queries, k, ef_search)| pb::SearchBatchRequest {
                    index_name: n.to_string(),
                    queries,
                    k,
                    ef_search,
                    ..Default::default()
                })
        })),
        "GetPoint" => one(prop_oneof![
            (select(FIXED.to_vec()), FIXED_ID0..FIXED_ID0 + FIXED_N),
            (select(SCRATCH.to_vec()), 0u64..120),
        ]
        .prop_map(|(n, id)| pb::GetPointRequest {
            index_name: n.to_string(),
            id,
        })),
        "CreateHarness" => one((
            select(SCRATCH.iter().chain(&FIXED).copied().collect::<Vec<_>>()),
            "h[0-9]{1,2}",
            1u32..10,
            1u32..40,
        )
            .prop_map(|(n, name, k, query_count)| pb::CreateHarnessRequest {
                index_name: n.to_string(),
                name,
                k,
                queries: Some(pb::create_harness_request::Queries::Sampled(
                    pb::SampledQueries {
                        query_count,
                        seed: Some(3),
                    },
                )),
            })),
        "RunTrial" => one((
            prop_oneof![
                scratch().prop_map(|(n, _)| (n, "h")),
                Just((FIXED[0], FIXED_HARNESS)),
            ],
            good_config(),
        )
            .prop_map(|((n, h), config)| pb::RunTrialRequest {
                index_name: n.to_string(),
                harness: h.to_string(),
                config: Some(config),
            })),
        "Autotune" => one(prop_oneof![
            // STRATEGY_GRID (or unspecified), either objective.
            (
                scratch(),
                prop::option::of(0.0f64..=1.0),
                prop::collection::vec(good_config(), 0..3),
                any::<bool>(),
                prop_oneof![
                    (0i32..2).prop_map(|o| (o, None)),
                    (0.0f64..=1.0).prop_map(|t| (2, Some(t))),
                ],
                0i32..2,
            )
                .prop_map(
                    |((n, _), min_recall, grid, activate, (objective, target_recall), strategy)| {
                        pb::AutotuneRequest {
                            index_name: n.to_string(),
                            harness: "h".into(),
                            min_recall,
                            grid,
                            activate,
                            requested_by: "fuzz".into(),
                            objective,
                            target_recall,
                            strategy,
                            ..Default::default()
                        }
                    }
                ),
            // STRATEGY_ADAPTIVE: needs OBJECTIVE_TARGET_RECALL.
            (
                scratch(),
                0.0f64..=1.0,
                any::<bool>(),
                (1u32..6, 0u32..3),
                prop::collection::vec(select(vec![4u32, 8, 16]), 0..3),
                prop::collection::vec(select(vec![20u32, 40, 80]), 0..3),
            )
                .prop_map(
                    |(
                        (n, _),
                        target,
                        activate,
                        (max_trials, max_seconds),
                        adaptive_m,
                        adaptive_ef_construction,
                    )| {
                        pb::AutotuneRequest {
                            index_name: n.to_string(),
                            harness: "h".into(),
                            min_recall: Some(0.5),
                            activate,
                            requested_by: "fuzz".into(),
                            objective: pb::Objective::TargetRecall as i32,
                            target_recall: Some(target),
                            strategy: pb::Strategy::Adaptive as i32,
                            budget: Some(pb::AdaptiveBudget {
                                max_trials,
                                max_seconds,
                            }),
                            seed: Some(1),
                            adaptive_m,
                            adaptive_ef_construction,
                            ..Default::default()
                        }
                    }
                ),
        ]),
        "Promote" => {
            one(
                (scratch(), 1u64..400).prop_map(|((n, _), trial_id)| pb::PromoteRequest {
                    index_name: n.to_string(),
                    trial_id,
                    promoted_by: "fuzz".into(),
                    note: "sane".into(),
                }),
            )
        }
        "SetRefreshPolicy" => one((
            scratch(),
            0.01f64..100.0,
            prop::option::of(0.0f64..=1.0),
            any::<bool>(),
        )
            .prop_map(|((n, _), change_threshold, recall_floor, activate)| {
                pb::SetRefreshPolicyRequest {
                    index_name: n.to_string(),
                    policy: Some(pb::RefreshPolicy {
                        mode: pb::RefreshMode::OnAppend as i32,
                        change_threshold,
                        harness: "h".into(),
                        recall_floor,
                        activate,
                        target_recall: None,
                        adaptive: false,
                        min_recall: Some(0.5),
                    }),
                }
            })),
        "PutProfile" => one((
            select(vec!["p0", "p1", "p2"]),
            prop::collection::vec(
                (readable(), prop::option::of(good_config())).prop_map(
                    |((n, _), default_config)| pb::ProfileIndex {
                        index_name: n.to_string(),
                        default_config,
                    },
                ),
                1..4,
            ),
        )
            .prop_map(|(name, indexes)| pb::PutProfileRequest {
                profile: Some(pb::Profile {
                    name: name.into(),
                    indexes,
                }),
            })),
        _ => return None,
    };
    Some(g)
}

fn health_service() -> S<String> {
    prop_oneof![
        3 => select(vectord::server::HEALTH_SERVICES.iter().map(|s| s.to_string()).collect::<Vec<_>>()),
        1 => text(),
    ]
    .sboxed()
}

fn reflection_requests() -> S<Vec<Msg>> {
    use refl::server_reflection_request::MessageRequest as R;
    let symbol = prop_oneof![
        2 => select(vec![
            "vectord.v1.IndexService".to_string(),
            "vectord.v1.SearchRequest".to_string(),
            "grpc.health.v1.Health".to_string(),
            "vectord.v1.IndexService.Search".to_string(),
        ]),
        1 => text(),
    ];
    let file = prop_oneof![
        2 => select(vec![
            "vectord/v1/index.proto".to_string(),
            "google/protobuf/timestamp.proto".to_string(),
        ]),
        1 => text(),
    ];
    let request = prop_oneof![
        1 => Just(None),
        2 => text().prop_map(|s| Some(R::ListServices(s))),
        2 => file.prop_map(|s| Some(R::FileByFilename(s))),
        2 => symbol.clone().prop_map(|s| Some(R::FileContainingSymbol(s))),
        1 => (symbol.clone(), any::<i32>()).prop_map(|(containing_type, extension_number)| Some(
            R::FileContainingExtension(refl::ExtensionRequest { containing_type, extension_number })
        )),
        1 => symbol.prop_map(|s| Some(R::AllExtensionNumbersOfType(s))),
    ];
    prop::collection::vec(
        (text(), request).prop_map(|(host, message_request)| {
            msg(refl::ServerReflectionRequest {
                host,
                message_request,
            })
        }),
        0..4,
    )
    .sboxed()
}

// ---------------------------------------------------------------------------------------------
// Operations.

#[derive(Clone, Debug)]
enum Auth {
    None,
    Admin,
    Reader,
    Other(String),
}

impl Auth {
    fn header(&self) -> Option<String> {
        match self {
            Auth::None => None,
            Auth::Admin => Some(format!("Bearer {ADMIN}")),
            Auth::Reader => Some(format!("Bearer {READER}")),
            Auth::Other(s) => Some(s.clone()),
        }
    }
}

fn auth(keys: bool) -> S<Auth> {
    if !keys {
        return Just(Auth::None).sboxed();
    }
    prop_oneof![
        6 => Just(Auth::Admin),
        2 => Just(Auth::Reader),
        1 => Just(Auth::None),
        1 => "(Bearer )?[!-~]{0,40}".prop_map(Auth::Other),
    ]
    .sboxed()
}

/// How much of a server stream to read before dropping it (None: to its end).
type Cut = Option<usize>;

#[derive(Clone, Debug)]
enum Op {
    /// A call of `method` with `msgs`; `foreign` names the method whose messages they are when
    /// that is another method (a wrong type on the wire).
    Call {
        method: usize,
        foreign: Option<usize>,
        msgs: Vec<Msg>,
        /// Server stream: drop after this many messages. Client stream / bidi: Some means the
        /// request stream never ends and the call is dropped after `STALL`.
        cut: Cut,
        auth: Auth,
    },
    /// A raw HTTP/2 request: `body` as the gRPC body, as is.
    Raw {
        path: String,
        headers: Vec<(&'static str, String)>,
        body: Vec<u8>,
        /// The body never ends: the request is dropped after `STALL`.
        stall: bool,
        auth: Auth,
    },
    /// A fresh TCP connection that gets `bytes` and is dropped.
    Tcp { bytes: Vec<u8> },
}

fn frame(flag: u8, declared: u32, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(5 + body.len());
    f.push(flag);
    f.extend_from_slice(&declared.to_be_bytes());
    f.extend_from_slice(body);
    f
}

/// A gRPC body that is wrong in one way or another.
fn garbage_body(messages: Vec<Msg>) -> S<Vec<u8>> {
    let message = messages
        .first()
        .map(|m| m.bytes.to_vec())
        .unwrap_or_default();
    let payload = prop_oneof![
        2 => prop::collection::vec(any::<u8>(), 0..256),
        2 => Just(message),
    ]
    .sboxed();
    let p = payload.clone();
    prop_oneof![
        // No framing at all.
        2 => prop::collection::vec(any::<u8>(), 0..300),
        // A well-framed payload (a message of some method, or random bytes).
        2 => p.clone().prop_map(|b| frame(0, b.len() as u32, &b)),
        // The length prefix says more or less than follows.
        2 => (p.clone(), -8i64..64).prop_map(|(b, d)| {
            let declared = (b.len() as i64 + d).clamp(0, u32::MAX as i64) as u32;
            frame(0, declared, &b)
        }),
        // The compressed flag (or an undefined flag) without a grpc-encoding.
        2 => (p.clone(), 1u8..=255).prop_map(|(b, flag)| frame(flag, b.len() as u32, &b)),
        // An oversize length prefix with a short body.
        2 => (p.clone(), select(vec![u32::MAX, 64 * 1024 * 1024 + 1, 64 * 1024 * 1024, 4 * 1024 * 1024 + 1]))
            .prop_map(|(b, declared)| frame(0, declared, &b)),
        // Two or more frames for a unary method.
        1 => prop::collection::vec(p.clone(), 2..4).prop_map(|bs| {
            bs.iter().flat_map(|b| frame(0, b.len() as u32, b)).collect()
        }),
        // Only part of a header.
        1 => prop::collection::vec(any::<u8>(), 0..5),
    ]
    .sboxed()
}

/// A raw request to one of `targets` (a path and the messages its body is made from).
fn raw_op(targets: S<(String, Vec<Msg>)>, keys: bool) -> S<Op> {
    let content_type = prop_oneof![
        6 => Just(Some("application/grpc".to_string())),
        1 => Just(Some("application/grpc+proto".to_string())),
        1 => Just(Some("application/json".to_string())),
        1 => Just(None),
        1 => "[a-z/+.-]{0,30}".prop_map(Some),
    ];
    let encoding = prop_oneof![
        6 => Just(None),
        1 => select(vec!["gzip", "identity", "deflate", "zstd", "br"]).prop_map(|s| Some(s.to_string())),
        1 => "[a-z0-9-]{0,12}".prop_map(Some),
    ];
    let timeout = prop_oneof![
        4 => Just(None),
        1 => select(vec!["1S", "100m", "0n", "99999999H", "5", "S", "-1S", "1000000000000000000n"])
            .prop_map(|s| Some(s.to_string())),
    ];
    let target = targets.prop_flat_map(|(path, msgs)| (Just(path), garbage_body(msgs)));
    (
        target,
        content_type,
        encoding,
        timeout,
        prop::bool::weighted(0.2),
        auth(keys),
    )
        .prop_map(|((path, body), ct, enc, timeout, stall, auth)| {
            let mut headers = vec![("te", "trailers".to_string())];
            if let Some(ct) = ct {
                headers.push(("content-type", ct));
            }
            if let Some(e) = enc {
                headers.push(("grpc-encoding", e));
            }
            if let Some(t) = timeout {
                headers.push(("grpc-timeout", t));
            }
            Op::Raw {
                path,
                headers,
                body,
                stall,
                auth,
            }
        })
        .sboxed()
}

fn tcp_op() -> S<Op> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    prop_oneof![
        2 => prop::collection::vec(any::<u8>(), 0..512),
        2 => prop::collection::vec(any::<u8>(), 0..512).prop_map(|b| [PREFACE, &b].concat()),
        1 => Just(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        // A SETTINGS frame, then a HEADERS frame with a random block.
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(|block| {
            let mut b = PREFACE.to_vec();
            b.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
            let len = block.len() as u32;
            b.extend_from_slice(&len.to_be_bytes()[1..]);
            b.extend_from_slice(&[1, 4 | 1, 0, 0, 0, 1]);
            b.extend_from_slice(&block);
            b
        }),
    ]
    .prop_map(|bytes| Op::Tcp { bytes })
    .sboxed()
}

/// The methods that delete or change what the index they name holds: the fixed data is safe as
/// long as none of them is ever called with a fixed index's name. Their own generators never
/// name one; a wrong-type or raw request to one of them takes its message from one of them too
/// (another method's message could carry a fixed name in the same field).
const PROTECTED: [&str; 9] = [
    "/vectord.v1.IndexService/DeleteIndex",
    "/vectord.v1.IndexService/UpsertPoints",
    "/vectord.v1.IndexService/ImportPoints",
    "/vectord.v1.IndexService/DeletePoints",
    "/vectord.v1.AutotuneService/DeleteHarness",
    "/vectord.v1.AutotuneService/Autotune",
    "/vectord.v1.AutotuneService/SetRefreshPolicy",
    "/vectord.v1.PromotionService/Promote",
    "/vectord.v1.PromotionService/Rollback",
];

fn op_strategy(keys: bool) -> S<Op> {
    let table = methods();
    let n = table.len();
    let kinds: Vec<Kind> = table.iter().map(|(m, _)| m.kind).collect();
    let gens: Vec<S<Vec<Msg>>> = table.iter().map(|(_, g)| g.clone()).collect();
    let paths: Vec<&'static str> = table.iter().map(|(m, _)| m.path).collect();
    let protected: Vec<bool> = paths.iter().map(|p| PROTECTED.contains(p)).collect();
    let safe: Vec<usize> = (0..n).filter(|&i| protected[i]).collect();
    assert_eq!(
        safe.len(),
        PROTECTED.len(),
        "every protected method is in the table"
    );
    // The method whose messages go to `target` when `other` was drawn for it.
    // DeleteIndex and DeleteHarness get only their own messages: another protected method's
    // message names a scratch index (and harness "h") in the same fields, which the sane
    // generators need to stay.
    let own_only: Vec<bool> = paths
        .iter()
        .map(|p| p.ends_with("/DeleteIndex") || p.ends_with("/DeleteHarness"))
        .collect();
    let source = Arc::new(move |target: Option<usize>, other: usize| match target {
        Some(t) if own_only[t] => t,
        Some(t) if protected[t] && !protected[other] => safe[other % safe.len()],
        _ => other,
    });
    let targets = {
        let (gens, gens2, source, paths) =
            (gens.clone(), gens.clone(), source.clone(), paths.clone());
        prop_oneof![
            6 => (0..n, 0..n).prop_flat_map(move |(t, o)| {
                let path = paths[t].to_string();
                gens[source(Some(t), o)].clone().prop_map(move |m| (path.clone(), m))
            }),
            1 => ("/vectord\\.v1\\.(IndexService|AutotuneService|PromotionService)/[A-Za-z]{0,12}", 0..n)
                .prop_flat_map({
                    let gens = gens2.clone();
                    move |(p, o)| gens[o].clone().prop_map(move |m| (p.clone(), m))
                }),
            1 => ("/[A-Za-z0-9._/-]{0,40}", 0..n)
                .prop_flat_map(move |(p, o)| gens2[o].clone().prop_map(move |m| (p.clone(), m))),
        ]
        .sboxed()
    };
    let call = {
        let gens = gens.clone();
        let kinds = kinds.clone();
        (
            0..n,
            prop::bool::weighted(0.1),
            0..n,
            0usize..5,
            prop::bool::weighted(0.3),
            auth(keys),
        )
            .prop_flat_map(move |(method, wrong, other, cut_n, cut, auth)| {
                let from = if wrong {
                    source(Some(method), other)
                } else {
                    method
                };
                let kind = kinds[method];
                let cut = match kind {
                    Kind::Unary => None,
                    // Watch never ends by itself: always dropped after its first message.
                    Kind::ServerStream if paths_is_watch(method) => Some(1),
                    _ if cut => Some(cut_n),
                    _ => None,
                };
                gens[from].clone().prop_map(move |msgs| Op::Call {
                    method,
                    foreign: (from != method).then_some(from),
                    msgs,
                    cut,
                    auth: auth.clone(),
                })
            })
    };
    prop_oneof![
        16 => call,
        3 => raw_op(targets, keys),
        1 => tcp_op(),
    ]
    .sboxed()
}

fn paths_is_watch(method: usize) -> bool {
    // Index 31 in `methods()`: checked by `watch_index_is_right` below.
    method == WATCH
}

const WATCH: usize = 33;

// ---------------------------------------------------------------------------------------------
// Running an operation and judging the answer.

/// What the fuzzer learnt from one operation.
#[derive(Debug)]
enum Outcome {
    /// Any answer the server may give (a code name or "ok"), for the summary.
    Fine(String),
    /// Fine, with a detail kept (the first of each kind) for the summary.
    Noted(String, String),
    /// A failure: the server's INTERNAL/UNKNOWN, a hang, or the like.
    Bad(String),
}

/// INTERNAL answers the gRPC library itself sends for a body that does not parse (the gRPC
/// status-code spec: "Error parsing request proto | INTERNAL | Server"), or is framed wrongly
/// (tonic's codec). Accepted only for requests the fuzzer made malformed on purpose.
const LIBRARY_INTERNAL: [&str; 6] = [
    "failed to decode Protobuf message",
    "protocol error: received message with compressed-flag but no grpc-encoding",
    "protocol error: received message with invalid compression flag",
    "Unexpected EOF decoding stream",
    "Missing request message",
    "Error decompressing",
];

fn judge_code(code: Code, message: &str, malformed: bool) -> Outcome {
    match code {
        Code::Internal | Code::Unknown => {
            if malformed && LIBRARY_INTERNAL.iter().any(|p| message.contains(p)) {
                Outcome::Fine(format!("{code:?}(library)"))
            } else {
                Outcome::Bad(format!("answered {code:?}: {message}"))
            }
        }
        c => Outcome::Fine(format!("{c:?}")),
    }
}

/// A status from a typed call: the server's own answer, or the client's transport error.
fn judge_status(s: &Status, malformed: bool) -> Outcome {
    if let Some(source) = std::error::Error::source(s) {
        return judge_transport(&format!("{}: {source:?}", s.message()));
    }
    judge_code(s.code(), s.message(), malformed)
}

/// A transport error on the client's side: a stream reset or a connection closed by the server
/// is its right (h2's flood protections, garbage it refuses); an HTTP/2 error that the client's
/// own h2 library raised means the server sent something the client could not accept (as the
/// over-long grpc-message headers did).
fn judge_transport(debug: &str) -> Outcome {
    if debug.contains(", Library)") {
        Outcome::Bad(format!(
            "the client's HTTP/2 library refused the server's answer: {}",
            clip(debug, 500)
        ))
    } else {
        Outcome::Noted("transport".into(), clip(debug, 300))
    }
}

fn request<T>(m: T, auth: &Auth, timeout: bool) -> Request<T> {
    let mut r = Request::new(m);
    if timeout {
        r.set_timeout(CALL_TIMEOUT);
    }
    if let Some(h) = auth.header() {
        if let Ok(v) = h.parse() {
            r.metadata_mut().insert("authorization", v);
        }
    }
    r
}

async fn bounded<T>(what: &str, f: impl std::future::Future<Output = T>) -> Result<T, Outcome> {
    tokio::time::timeout(CALL_BOUND, f)
        .await
        .map_err(|_| Outcome::Bad(format!("hang: {what} not answered within {CALL_BOUND:?}")))
}

async fn run_call(ch: &Channel, addr: SocketAddr, method: &Method, op: &Op) -> Outcome {
    let Op::Call {
        foreign,
        msgs,
        cut,
        auth,
        ..
    } = op
    else {
        unreachable!()
    };
    let malformed = foreign.is_some();
    let path = http::uri::PathAndQuery::from_static(method.path);
    let mut grpc = tonic::client::Grpc::new(ch.clone())
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(usize::MAX);
    if let Err(e) = bounded("channel ready", grpc.ready()).await {
        return e;
    }
    let bytes: Vec<Bytes> = msgs.iter().map(|m| m.bytes.clone()).collect();
    let first = bytes.first().cloned().unwrap_or_default();
    match method.kind {
        Kind::Unary => match bounded(
            "unary call",
            grpc.unary(request(first, auth, true), path, RawCodec),
        )
        .await
        {
            Err(e) => e,
            Ok(Ok(_)) => Outcome::Fine("OK".into()),
            Ok(Err(s)) => judge_status(&s, malformed),
        },
        Kind::ServerStream => {
            let r = match bounded(
                "stream start",
                grpc.server_streaming(request(first, auth, true), path, RawCodec),
            )
            .await
            {
                Err(e) => return e,
                Ok(Err(s)) => return judge_status(&s, malformed),
                Ok(Ok(r)) => r,
            };
            read_stream(r.into_inner(), *cut, malformed).await
        }
        Kind::ClientStream | Kind::Bidi => {
            let items = futures_util::stream::iter(bytes);
            if cut.is_some() {
                // The request stream stops after its messages without ending; the fuzzer leaves
                // the call after STALL, and resets the stream. Sent raw (tonic's client cannot
                // cut a request stream).
                let framed: Vec<u8> = msgs
                    .iter()
                    .flat_map(|m| frame(0, m.bytes.len() as u32, &m.bytes))
                    .collect();
                let headers = [
                    ("te", "trailers".to_string()),
                    ("content-type", "application/grpc".to_string()),
                ];
                return send_raw(
                    ch,
                    addr,
                    method.path,
                    &headers,
                    framed.into(),
                    true,
                    auth,
                    malformed,
                )
                .await;
            }
            if method.kind == Kind::Bidi {
                let r = match bounded(
                    "bidi start",
                    grpc.streaming(request(items, auth, true), path, RawCodec),
                )
                .await
                {
                    Err(e) => return e,
                    Ok(Err(s)) => return judge_status(&s, malformed),
                    Ok(Ok(r)) => r,
                };
                read_stream(r.into_inner(), None, malformed).await
            } else {
                match bounded(
                    "client stream",
                    grpc.client_streaming(request(items, auth, true), path, RawCodec),
                )
                .await
                {
                    Err(e) => e,
                    Ok(Ok(_)) => Outcome::Fine("OK".into()),
                    Ok(Err(s)) => judge_status(&s, malformed),
                }
            }
        }
    }
}

async fn read_stream(mut s: tonic::Streaming<Bytes>, cut: Cut, malformed: bool) -> Outcome {
    let mut n = 0usize;
    loop {
        if cut.is_some_and(|c| n >= c) {
            return Outcome::Fine("cut".into());
        }
        match bounded("stream message", s.message()).await {
            Err(e) => return e,
            Ok(Ok(Some(_))) => n += 1,
            Ok(Ok(None)) => return Outcome::Fine("OK".into()),
            Ok(Err(st)) => return judge_status(&st, malformed),
        }
    }
}

async fn run_raw(ch: &Channel, addr: SocketAddr, op: &Op) -> Outcome {
    let Op::Raw {
        path,
        headers,
        body,
        stall,
        auth,
    } = op
    else {
        unreachable!()
    };
    send_raw(
        ch,
        addr,
        path,
        headers,
        Bytes::from(body.clone()),
        *stall,
        auth,
        true,
    )
    .await
}

/// Sends `body` as the request body to `path` and judges the answer: its grpc-status (in the
/// headers or the trailers), or its first response message. With `stall` the body does not end:
/// the request is left after `STALL`, and the body fails (so the client resets the stream)
/// a little later.
#[allow(clippy::too_many_arguments)]
async fn send_raw(
    ch: &Channel,
    addr: SocketAddr,
    path: &str,
    headers: &[(&'static str, String)],
    body: Bytes,
    stall: bool,
    auth: &Auth,
    malformed: bool,
) -> Outcome {
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;
    let uri = match http::Uri::try_from(format!("http://{addr}{path}")) {
        Ok(u) => u,
        Err(_) => return Outcome::Fine("unsendable".into()),
    };
    let mut req = http::Request::builder().method("POST").uri(uri);
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    if let Some(h) = auth.header() {
        req = req.header("authorization", h);
    }
    let body = if stall {
        let first = futures_util::stream::iter([Ok(http_body::Frame::data(body))]);
        let fail = futures_util::stream::once(async {
            tokio::time::sleep(STALL * 2).await;
            Err(std::io::Error::other("the fuzzer cuts this request"))
        });
        tonic::body::Body::new(http_body_util::StreamBody::new(first.chain(fail)))
    } else {
        tonic::body::Body::new(http_body_util::Full::new(body))
    };
    let req = match req.body(body) {
        Ok(r) => r,
        Err(_) => return Outcome::Fine("unsendable".into()),
    };
    let exchange = async {
        let resp = ch
            .clone()
            .oneshot(req)
            .await
            .map_err(|e| format!("{e:?}"))?;
        let (parts, mut body) = resp.into_parts();
        if let Some(s) = grpc_status(&parts.headers) {
            return Ok(Some(s));
        }
        // The first message or the trailers, whichever comes first: a server stream (Watch)
        // may never end.
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("{e:?}"))?;
            if let Some(t) = frame.trailers_ref() {
                return Ok(grpc_status(t));
            }
            if frame.data_ref().is_some_and(|d| !d.is_empty()) {
                return Ok(Some((Code::Ok, "a response message".into())));
            }
        }
        Ok::<_, String>(None)
    };
    let limit = if stall { STALL } else { CALL_BOUND };
    match tokio::time::timeout(limit, exchange).await {
        Err(_) if stall => Outcome::Fine("cut".into()),
        Err(_) => Outcome::Bad(format!("hang: raw request not answered within {limit:?}")),
        Ok(Err(e)) => judge_transport(&e),
        Ok(Ok(Some((code, message)))) => judge_code(code, &message, malformed),
        Ok(Ok(None)) => Outcome::Fine("no grpc-status".into()),
    }
}

fn grpc_status(h: &http::HeaderMap) -> Option<(Code, String)> {
    let code = h.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    let message = h
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .map(percent_decode)
        .unwrap_or_default();
    Some((Code::from_i32(code), message))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn run_tcp(addr: SocketAddr, bytes: &[u8]) -> Outcome {
    let mut s = match tokio::time::timeout(CALL_BOUND, tokio::net::TcpStream::connect(addr)).await {
        Err(_) => {
            return Outcome::Bad(format!(
                "hang: TCP connect not accepted within {CALL_BOUND:?}"
            ))
        }
        Ok(Err(e)) => return Outcome::Fine(format!("tcp connect: {}", e.kind())),
        Ok(Ok(s)) => s,
    };
    let _ = s.write_all(bytes).await;
    let mut buf = [0u8; 4096];
    // Whatever the server answers (or not) within STALL; then the connection is dropped.
    let _ = tokio::time::timeout(STALL, s.read(&mut buf)).await;
    Outcome::Fine("tcp".into())
}

// ---------------------------------------------------------------------------------------------
// The child process and its checks.

fn alive(pid: u32) -> bool {
    // Field 3 of /proc/<pid>/stat is the state; Z (zombie) or X (dead) means it exited.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => match stat.rsplit_once(')') {
            Some((_, rest)) => !matches!(rest.trim_start().chars().next(), Some('Z' | 'X')),
            None => true,
        },
        Err(_) => false,
    }
}

fn status_kb(pid: u32, field: &str) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/<pid>/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

async fn channel(addr: SocketAddr) -> Channel {
    tokio::time::timeout(
        DEADLINE,
        Channel::from_shared(format!("http://{addr}"))
            .expect("url")
            .connect(),
    )
    .await
    .expect("connect in time")
    .expect("connect")
}

fn authed<T>(m: T, keys: bool) -> Request<T> {
    request(m, if keys { &Auth::Admin } else { &Auth::None }, false)
}

/// The data written before the run, as the server acknowledged it.
struct Fixed {
    points: BTreeMap<&'static str, Vec<pb::Point>>,
    harness: pb::Harness,
    trials: Vec<pb::Trial>,
    promoted: pb::GetPromotedResponse,
}

fn xorshift(seed: &mut u64) -> f32 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    (*seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
}

async fn write_fixed(addr: SocketAddr, keys: bool) -> Fixed {
    let ch = channel(addr).await;
    let mut index = IndexServiceClient::new(ch.clone());
    let mut autotune = AutotuneServiceClient::new(ch.clone());
    let mut promotion = PromotionServiceClient::new(ch);
    let mut g = 0x5EED_u64;
    let mut points = BTreeMap::new();
    for (name, dim, metric) in [
        (FIXED[0], 8usize, pb::Metric::L2),
        (FIXED[1], 16, pb::Metric::Cosine),
    ] {
        index
            .create_index(authed(
                pb::CreateIndexRequest {
                    name: name.into(),
                    dimension: dim as u32,
                    metric: metric as i32,
                    default_config: None,
                    engine: String::new(),
                },
                keys,
            ))
            .await
            .expect("create a fixed index");
        let ps: Vec<pb::Point> = (0..FIXED_N)
            .map(|i| pb::Point {
                id: FIXED_ID0 + i,
                vector: (0..dim).map(|_| xorshift(&mut g)).collect(),
            })
            .collect();
        index
            .upsert_points(authed(
                pb::UpsertPointsRequest {
                    index_name: name.into(),
                    points: ps.clone(),
                    ..Default::default()
                },
                keys,
            ))
            .await
            .expect("upsert the fixed points");
        points.insert(name, ps);
    }
    for (name, dim, metric) in [
        (SCRATCH[0], 4u32, pb::Metric::L2),
        (SCRATCH[1], 8, pb::Metric::Cosine),
        (SCRATCH[2], 16, pb::Metric::Dot),
    ] {
        index
            .create_index(authed(
                pb::CreateIndexRequest {
                    name: name.into(),
                    dimension: dim,
                    metric: metric as i32,
                    default_config: None,
                    engine: String::new(),
                },
                keys,
            ))
            .await
            .expect("create a scratch index");
        let ps: Vec<pb::Point> = (0..100)
            .map(|i| pb::Point {
                id: i,
                vector: (0..dim).map(|_| xorshift(&mut g)).collect(),
            })
            .collect();
        index
            .upsert_points(authed(
                pb::UpsertPointsRequest {
                    index_name: name.into(),
                    points: ps,
                    ..Default::default()
                },
                keys,
            ))
            .await
            .expect("upsert scratch points");
        autotune
            .create_harness(authed(
                crate::common::harness_request(name, "h", 5, 10, Some(1)),
                keys,
            ))
            .await
            .expect("create a scratch harness");
    }
    let harness = autotune
        .create_harness(authed(
            crate::common::harness_request(FIXED[0], FIXED_HARNESS, 5, 20, Some(7)),
            keys,
        ))
        .await
        .expect("create the fixed harness")
        .into_inner()
        .harness
        .expect("harness");
    let mut trials = Vec::new();
    for (m, efc, efs) in [(8, 40, 30), (16, 80, 60)] {
        let t = autotune
            .run_trial(authed(
                pb::RunTrialRequest {
                    index_name: FIXED[0].into(),
                    harness: FIXED_HARNESS.into(),
                    config: Some(pb::HnswConfig {
                        m,
                        ef_construction: efc,
                        ef_search: efs,
                        seed: Some(42),
                    }),
                },
                keys,
            ))
            .await
            .expect("run a fixed trial")
            .into_inner()
            .trial
            .expect("trial");
        promotion
            .promote(authed(
                pb::PromoteRequest {
                    index_name: FIXED[0].into(),
                    trial_id: t.id,
                    promoted_by: "fuzz".into(),
                    note: format!("fixed {}", t.id),
                },
                keys,
            ))
            .await
            .expect("promote a fixed trial");
        trials.push(t);
    }
    let promoted = promotion
        .get_promoted(authed(
            pb::GetPromotedRequest {
                index_name: FIXED[0].into(),
            },
            keys,
        ))
        .await
        .expect("get promoted")
        .into_inner();
    assert_eq!(
        promoted.current.as_ref().map(|p| p.trial_id),
        Some(trials[1].id)
    );
    assert_eq!(promoted.history.len(), 1);
    Fixed {
        points,
        harness,
        trials,
        promoted,
    }
}

/// Checks that the fixed data is as it was written. Returns the problems found.
async fn verify_fixed(addr: SocketAddr, keys: bool, fixed: &Fixed) -> Vec<String> {
    let ch = channel(addr).await;
    let mut index = IndexServiceClient::new(ch.clone());
    let mut autotune = AutotuneServiceClient::new(ch.clone());
    let mut promotion = PromotionServiceClient::new(ch);
    let mut problems = Vec::new();
    for (name, ps) in &fixed.points {
        let cosine = *name == FIXED[1];
        for p in ps {
            match index
                .get_point(authed(
                    pb::GetPointRequest {
                        index_name: name.to_string(),
                        id: p.id,
                    },
                    keys,
                ))
                .await
            {
                Ok(r) => {
                    let got = r.into_inner().point.map(|p| p.vector).unwrap_or_default();
                    let want = if cosine {
                        let n = p.vector.iter().map(|x| x * x).sum::<f32>().sqrt();
                        p.vector.iter().map(|x| x / n).collect()
                    } else {
                        p.vector.clone()
                    };
                    let same = got.len() == want.len()
                        && got.iter().zip(&want).all(|(a, b)| (a - b).abs() <= 1e-5);
                    if !same {
                        problems.push(format!(
                            "{name} point {}: vector {got:?}, wrote {want:?}",
                            p.id
                        ));
                    }
                }
                Err(e) => problems.push(format!(
                    "{name} point {}: GetPoint {:?}: {}",
                    p.id,
                    e.code(),
                    e.message()
                )),
            }
            match index
                .search(authed(
                    pb::SearchRequest {
                        index_name: name.to_string(),
                        vector: p.vector.clone(),
                        k: 5,
                        ef_search: Some(400),
                        ..Default::default()
                    },
                    keys,
                ))
                .await
            {
                Ok(r) => {
                    let n = r.into_inner().neighbors;
                    // First, or tied with the first (an exact duplicate the fuzzer wrote).
                    let found = n.iter().any(|h| h.id == p.id)
                        && n.first().is_some_and(|f| {
                            f.id == p.id
                                || n.iter().any(|h| h.id == p.id && h.distance <= f.distance)
                        });
                    if !found {
                        problems.push(format!(
                            "{name} point {}: Search by its vector found {n:?}",
                            p.id
                        ));
                    }
                }
                Err(e) => problems.push(format!(
                    "{name} point {}: Search {:?}: {}",
                    p.id,
                    e.code(),
                    e.message()
                )),
            }
            if problems.len() > 20 {
                return problems;
            }
        }
    }
    match autotune
        .get_harness(authed(
            pb::GetHarnessRequest {
                index_name: FIXED[0].into(),
                name: FIXED_HARNESS.into(),
            },
            keys,
        ))
        .await
    {
        Ok(r) if r.get_ref().harness.as_ref() == Some(&fixed.harness) => {}
        Ok(r) => problems.push(format!(
            "harness now {:?}, was {:?}",
            r.into_inner().harness,
            fixed.harness
        )),
        Err(e) => problems.push(format!("GetHarness {:?}: {}", e.code(), e.message())),
    }
    for t in &fixed.trials {
        match autotune
            .get_trial(authed(pb::GetTrialRequest { id: t.id }, keys))
            .await
        {
            Ok(r) if r.get_ref().trial.as_ref() == Some(t) => {}
            Ok(r) => problems.push(format!(
                "trial {} now {:?}, was {t:?}",
                t.id,
                r.into_inner().trial
            )),
            Err(e) => problems.push(format!(
                "GetTrial {}: {:?}: {}",
                t.id,
                e.code(),
                e.message()
            )),
        }
    }
    match promotion
        .get_promoted(authed(
            pb::GetPromotedRequest {
                index_name: FIXED[0].into(),
            },
            keys,
        ))
        .await
    {
        Ok(r) if r.get_ref() == &fixed.promoted => {}
        Ok(r) => problems.push(format!(
            "promotions now {:?}, were {:?}",
            r.into_inner(),
            fixed.promoted
        )),
        Err(e) => problems.push(format!("GetPromoted {:?}: {}", e.code(), e.message())),
    }
    problems
}

async fn serving(addr: SocketAddr) -> Result<(), String> {
    let ch = channel(addr).await;
    let r = tokio::time::timeout(
        DEADLINE,
        HealthClient::new(ch).check(HealthCheckRequest {
            service: String::new(),
        }),
    )
    .await
    .map_err(|_| "health check not answered".to_string())?
    .map_err(|e| format!("health check: {e}"))?;
    if r.get_ref().status == ServingStatus::Serving as i32 {
        Ok(())
    } else {
        Err(format!("health says {:?}", r.get_ref().status))
    }
}

// ---------------------------------------------------------------------------------------------
// The run.

#[derive(Default)]
struct Report {
    ops: u64,
    outcomes: BTreeMap<String, u64>,
    samples: BTreeMap<String, String>,
    failures: Vec<String>,
}

async fn fuzz_task(
    task: u64,
    seed: u64,
    keys: bool,
    addr: SocketAddr,
    pid: u32,
    until: Instant,
    report: Arc<Mutex<Report>>,
) {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes[8..16].copy_from_slice(&task.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        PtConfig::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    );
    let table = methods();
    let strategy = op_strategy(keys);
    let ch = channel(addr).await;
    let mut n = 0u64;
    while Instant::now() < until {
        if report.lock().failures.len() >= 10 {
            return;
        }
        let op = strategy
            .new_tree(&mut runner)
            .expect("generate a request")
            .current();
        let outcome = match &op {
            Op::Call { method, .. } => run_call(&ch, addr, &table[*method].0, &op).await,
            Op::Raw { .. } => run_raw(&ch, addr, &op).await,
            Op::Tcp { bytes } => run_tcp(addr, bytes).await,
        };
        let kind = match &op {
            Op::Call {
                method, foreign, ..
            } => {
                let name = table[*method].0.path.rsplit('/').next().unwrap_or("?");
                if foreign.is_some() {
                    format!("{name}(wrong type)")
                } else {
                    name.to_string()
                }
            }
            Op::Raw { .. } => "raw".into(),
            Op::Tcp { .. } => "tcp".into(),
        };
        let mut r = report.lock();
        r.ops += 1;
        match outcome {
            Outcome::Fine(code) => *r.outcomes.entry(format!("{kind} {code}")).or_default() += 1,
            Outcome::Noted(code, detail) => {
                *r.outcomes.entry(format!("{kind} {code}")).or_default() += 1;
                r.samples.entry(code).or_insert(detail);
            }
            Outcome::Bad(what) => {
                let describe = match &op {
                    Op::Call {
                        method,
                        foreign,
                        msgs,
                        cut,
                        auth,
                    } => format!(
                        "{} (messages of {}), cut {cut:?}, auth {auth:?}: {msgs:?}",
                        table[*method].0.path,
                        foreign.map(|f| table[f].0.path).unwrap_or("itself"),
                    ),
                    other => clip(&format!("{other:?}"), 1500),
                };
                r.failures.push(format!(
                    "seed {seed} task {task} request #{n}: {what}\n    request: {describe}"
                ));
            }
        }
        drop(r);
        n += 1;
        if !alive(pid) {
            report.lock().failures.push(format!(
                "seed {seed} task {task} request #{n}: the server died (last request {})",
                clip(&format!("{op:?}"), 1500)
            ));
            return;
        }
    }
}

async fn fuzz(keys: bool) {
    let secs = env_u64("VECTORD_FUZZ_SECS", 60);
    let tasks = env_u64("VECTORD_FUZZ_TASKS", 3).max(1);
    let seed = env_u64(
        "VECTORD_FUZZ_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    );
    let what = if keys { "fuzz (API keys on)" } else { "fuzz" };
    eprintln!("{what}: seed {seed} (VECTORD_FUZZ_SEED={seed} replays it), {secs} s, {tasks} tasks");

    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().to_str().expect("utf-8 temp dir").to_string();
    let mut args = vec!["--addr", "127.0.0.1:0", "--data-dir", dir.as_str()];
    if keys {
        args.extend(["--api-key", ADMIN, "--read-only-api-key", READER]);
    }
    let mut server = Vectord::spawn(
        if keys {
            "fuzzed vectord (keys)"
        } else {
            "fuzzed vectord"
        },
        &args,
        &[],
    );
    let addr = server.wait_listening().await;
    server.wait_serving(addr).await;
    let pid = server.pid;

    let fixed = write_fixed(addr, keys).await;

    let report = Arc::new(Mutex::new(Report::default()));
    let until = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|t| tokio::spawn(fuzz_task(t, seed, keys, addr, pid, until, report.clone())))
        .collect();
    for h in handles {
        if let Err(e) = h.await {
            report
                .lock()
                .failures
                .push(format!("seed {seed}: a fuzz task panicked: {e}"));
        }
    }
    let elapsed = started.elapsed();

    let mut problems = std::mem::take(&mut report.lock().failures);
    if !alive(pid) {
        problems.push("the server is not running after the run".into());
    } else {
        if let Err(e) = serving(addr).await {
            problems.push(format!("not SERVING after the run: {e}"));
        }
        let (rss, peak) = (status_kb(pid, "VmRSS:"), status_kb(pid, "VmHWM:"));
        eprintln!(
            "{what}: RSS after the run {} MiB, peak {} MiB",
            rss / 1024,
            peak / 1024
        );
        if rss > RSS_BOUND_KB || peak > RSS_BOUND_KB {
            problems.push(format!(
                "RSS {rss} kB (peak {peak} kB) is over the bound of {RSS_BOUND_KB} kB"
            ));
        }
        problems.extend(verify_fixed(addr, keys, &fixed).await);
    }
    {
        let r = report.lock();
        let mut summary = String::new();
        let _ = writeln!(
            summary,
            "{what}: {} requests in {:.1} s; answers by request kind:",
            r.ops,
            elapsed.as_secs_f64()
        );
        for (k, v) in &r.outcomes {
            let _ = writeln!(summary, "  {v:6}  {k}");
        }
        for (k, v) in &r.samples {
            let _ = writeln!(summary, "  first {k}: {v}");
        }
        eprintln!("{summary}");
    }
    if alive(pid) {
        let t = Instant::now();
        server.signal("TERM");
        let status = server.wait_exit().await;
        eprintln!(
            "{what}: SIGTERM to exit took {:.1} s",
            t.elapsed().as_secs_f64()
        );
        if !status.success() {
            problems.push(format!("SIGTERM after the run: exit {status}"));
        }
    }
    let log = server.log();
    if let Some(l) = log.lines().find(|l| l.contains("panicked")) {
        problems.push(format!("the server's stderr has a panic: {l}"));
    }
    if !problems.is_empty() {
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        panic!(
            "{what} (seed {seed}; replay with VECTORD_FUZZ_SEED={seed}) found {} problem(s):\n{}\n\
             last lines of the server's stderr:\n{}",
            problems.len(),
            problems.join("\n"),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
}

#[test]
fn watch_index_is_right() {
    assert_eq!(methods()[WATCH].0.path, "/grpc.health.v1.Health/Watch");
    // Every vectord RPC in the descriptor set is fuzzed.
    let fds = prost_types::FileDescriptorSet::decode(vectord::pb::FILE_DESCRIPTOR_SET)
        .expect("descriptor set");
    let paths: Vec<&str> = methods().iter().map(|(m, _)| m.path).collect();
    for file in fds.file {
        for service in &file.service {
            for method in &service.method {
                let path = format!("/{}.{}/{}", file.package(), service.name(), method.name());
                assert!(paths.contains(&path.as_str()), "{path} is not fuzzed");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "bounded-time fuzzer (VECTORD_FUZZ_SECS, default 60); CI runs it with --ignored"]
async fn fuzz_requests() {
    fuzz(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "bounded-time fuzzer (VECTORD_FUZZ_SECS, default 60); CI runs it with --ignored"]
async fn fuzz_requests_with_api_keys() {
    fuzz(true).await;
}
