//! One thin handler per subcommand: build the request, call, print.

use std::process::ExitCode;

use serde_json::{json, Value};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use vectord::pb;

use super::error::CliError;
use super::files::{self, Format};
use super::{
    json as j, out, ClientCommand, Ctx, HarnessCommand, IndexCommand, JobsCommand, MetricArg,
    ProfileCommand, SearchArgs, TrialCommand,
};

type Res = Result<ExitCode, CliError>;

pub async fn dispatch(ctx: &Ctx, cmd: ClientCommand) -> Res {
    match cmd {
        ClientCommand::Health => health(ctx).await,
        ClientCommand::Index(c) => index(ctx, c).await,
        ClientCommand::Search(a) => search(ctx, a).await,
        ClientCommand::Import(a) => super::import::run(ctx, a).await,
        ClientCommand::Harness(c) => harness(ctx, c).await,
        ClientCommand::Trial(c) => trial(ctx, c).await,
        ClientCommand::Autotune(a) => super::autotune::run(ctx, a).await,
        ClientCommand::Promote(a) => {
            let r = ctx
                .call(ctx.promotion().promote(pb::PromoteRequest {
                    index_name: a.index,
                    trial_id: a.trial,
                    promoted_by: a.by.unwrap_or_default(),
                    note: a.note.unwrap_or_default(),
                }))
                .await?;
            print_promotion_change(ctx, "promoted", &r.current, r.history_depth);
            ok()
        }
        ClientCommand::Rollback(a) => {
            let r = ctx
                .call(ctx.promotion().rollback(pb::RollbackRequest {
                    index_name: a.index.clone(),
                }))
                .await?;
            if r.current.is_none() && !ctx.json {
                out::line(&format!(
                    "rolled back {}: nothing is promoted now (history depth {})",
                    a.index, r.history_depth
                ));
            } else {
                print_promotion_change(ctx, "rolled back to", &r.current, r.history_depth);
            }
            ok()
        }
        ClientCommand::Promoted(a) => promoted(ctx, a.index).await,
        ClientCommand::Profile(c) => profile(ctx, c).await,
        ClientCommand::Jobs(c) => jobs(ctx, c).await,
        ClientCommand::Report(a) => super::report::run(ctx, a).await,
        ClientCommand::Refresh(a) => refresh(ctx, a).await,
    }
}

fn ok() -> Res {
    Ok(ExitCode::SUCCESS)
}

async fn health(ctx: &Ctx) -> Res {
    let r = ctx
        .call(HealthClient::new(ctx.chan()).check(HealthCheckRequest {
            service: String::new(),
        }))
        .await?;
    let status = ServingStatus::try_from(r.status).unwrap_or(ServingStatus::Unknown);
    if ctx.json {
        out::json(&json!({ "status": status.as_str_name() }));
    }
    if status != ServingStatus::Serving {
        return Err(CliError::unavailable(format!(
            "the server is {}",
            status.as_str_name()
        )));
    }
    if !ctx.json {
        out::line("SERVING");
    }
    ok()
}

fn print_index(ctx: &Ctx, i: &Option<pb::Index>) {
    let Some(i) = i else { return };
    if ctx.json {
        out::json(&json!({ "index": j::index(i) }));
        return;
    }
    out::line(&format!("index       {}", i.name));
    out::line(&format!("dimension   {}", i.dimension));
    out::line(&format!("metric      {}", out::metric(i.metric)));
    out::line(&format!("points      {}", i.point_count));
    out::line(&format!("default     {}", out::config(&i.default_config)));
    if let Some(g) = &i.active_generation {
        let source =
            pb::ConfigSource::try_from(g.config_source).map_or("unknown".to_string(), |s| {
                s.as_str_name()
                    .trim_start_matches("CONFIG_SOURCE_")
                    .to_ascii_lowercase()
            });
        out::line(&format!(
            "generation  {} ({}, {source}{})",
            g.number,
            out::config(&g.config),
            if g.profile.is_empty() {
                String::new()
            } else {
                format!(", profile {}", g.profile)
            }
        ));
    }
    out::line(&format!("created     {}", out::timestamp(&i.create_time)));
    if let Some(p) = &i.refresh_policy {
        let mut s = format!(
            "refresh     on append: {} of the points changed, harness {}",
            p.change_threshold, p.harness
        );
        if let Some(f) = p.recall_floor {
            s.push_str(&format!(", recall floor {f}"));
        }
        out::line(&s);
    }
    if let Some(st) = &i.refresh_status {
        out::line(&format!(
            "            {} points changed since the last tune; last probe recall {}; last: {}",
            st.points_changed_since_tune,
            st.last_probe_recall
                .map_or("-".to_string(), |r| format!("{r:.4}")),
            if st.last_trigger.is_empty() {
                "-"
            } else {
                &st.last_trigger
            }
        ));
    }
}

async fn refresh(ctx: &Ctx, a: super::RefreshArgs) -> Res {
    let policy = if a.manual {
        pb::RefreshPolicy {
            mode: pb::RefreshMode::Manual as i32,
            ..Default::default()
        }
    } else {
        pb::RefreshPolicy {
            mode: pb::RefreshMode::OnAppend as i32,
            change_threshold: a.on_append.unwrap_or(0.0),
            harness: a.harness.unwrap_or_default(),
            recall_floor: a.recall_floor,
            activate: a.activate,
            target_recall: a.target_recall,
            adaptive: a.adaptive,
            min_recall: a.min_recall,
        }
    };
    let r = ctx
        .call(
            ctx.autotune()
                .set_refresh_policy(pb::SetRefreshPolicyRequest {
                    index_name: a.index.clone(),
                    policy: Some(policy),
                }),
        )
        .await?;
    let p = r.policy.unwrap_or_default();
    if ctx.json {
        out::json(&json!({ "policy": j::refresh_policy(&p) }));
    } else if p.mode == pb::RefreshMode::OnAppend as i32 {
        out::line(&format!(
            "{}: re-tuned when {} of its points changed (harness {}){}",
            a.index,
            p.change_threshold,
            p.harness,
            p.recall_floor.map_or(String::new(), |f| format!(
                " or when the probe's recall is under {f}"
            ))
        ));
    } else {
        out::line(&format!("{}: tuned only when asked (manual)", a.index));
    }
    ok()
}

async fn index(ctx: &Ctx, cmd: IndexCommand) -> Res {
    match cmd {
        IndexCommand::Create {
            name,
            dim,
            metric,
            m,
            ef_construction,
            ef_search,
            seed,
        } => {
            let metric = match metric {
                MetricArg::L2 => pb::Metric::L2,
                MetricArg::Cosine => pb::Metric::Cosine,
                MetricArg::Dot => pb::Metric::Dot,
            };
            let default_config =
                (m.is_some() || ef_construction.is_some() || ef_search.is_some() || seed.is_some())
                    .then(|| pb::HnswConfig {
                        m: m.unwrap_or(0),
                        ef_construction: ef_construction.unwrap_or(0),
                        ef_search: ef_search.unwrap_or(0),
                        seed,
                    });
            let r = ctx
                .call(ctx.index().create_index(pb::CreateIndexRequest {
                    name,
                    dimension: dim,
                    metric: metric as i32,
                    default_config,
                    engine: String::new(),
                }))
                .await?;
            print_index(ctx, &r.index);
        }
        IndexCommand::Get { name } => {
            let r = ctx
                .call(ctx.index().get_index(pb::GetIndexRequest { name }))
                .await?;
            print_index(ctx, &r.index);
        }
        IndexCommand::List => {
            let mut indexes = Vec::new();
            let mut page_token = String::new();
            loop {
                let r = ctx
                    .call(ctx.index().list_indexes(pb::ListIndexesRequest {
                        page_size: 1000,
                        page_token,
                    }))
                    .await?;
                indexes.extend(r.indexes);
                if r.next_page_token.is_empty() {
                    break;
                }
                page_token = r.next_page_token;
            }
            if ctx.json {
                let v: Vec<Value> = indexes.iter().map(j::index).collect();
                out::json(&json!({ "indexes": v }));
            } else {
                let rows: Vec<Vec<String>> = indexes
                    .iter()
                    .map(|i| {
                        let g = i.active_generation.as_ref();
                        vec![
                            i.name.clone(),
                            i.dimension.to_string(),
                            out::metric(i.metric),
                            i.point_count.to_string(),
                            g.map_or("-".into(), |g| g.number.to_string()),
                            out::config_short(&g.and_then(|g| g.config)),
                        ]
                    })
                    .collect();
                out::table(
                    &[
                        "NAME",
                        "DIM",
                        "METRIC",
                        "POINTS",
                        "GENERATION",
                        "M/EF_C/EF_S",
                    ],
                    &rows,
                );
            }
        }
        IndexCommand::Delete { name } => {
            ctx.call(
                ctx.index()
                    .delete_index(pb::DeleteIndexRequest { name: name.clone() }),
            )
            .await?;
            if ctx.json {
                out::json(&json!({}));
            } else {
                out::line(&format!("deleted index {name}"));
            }
        }
    }
    ok()
}

async fn search(ctx: &Ctx, a: SearchArgs) -> Res {
    let vector = match a.id {
        Some(id) => {
            let got = ctx
                .call(ctx.index().get_point(pb::GetPointRequest {
                    index_name: a.index.clone(),
                    id,
                }))
                .await?;
            got.point.map(|p| p.vector).unwrap_or_default()
        }
        None => a.vector,
    };
    let r = ctx
        .call(ctx.index().search(pb::SearchRequest {
            index_name: a.index,
            vector,
            k: a.k,
            ef_search: a.ef_search,
            ..Default::default()
        }))
        .await?;
    if ctx.json {
        let n: Vec<Value> = r.neighbors.iter().map(j::neighbor).collect();
        out::json(&json!({ "neighbors": n, "generation": r.generation }));
    } else {
        let rows: Vec<Vec<String>> = r
            .neighbors
            .iter()
            .enumerate()
            .map(|(i, n)| {
                vec![
                    (i + 1).to_string(),
                    n.id.to_string(),
                    format!("{:.6}", n.distance),
                ]
            })
            .collect();
        out::table(&["RANK", "ID", "DISTANCE"], &rows);
        out::line(&format!("(generation {})", r.generation));
    }
    ok()
}

fn print_harness(ctx: &Ctx, h: &Option<pb::Harness>) {
    let Some(h) = h else { return };
    if ctx.json {
        out::json(&json!({ "harness": j::harness(h) }));
    } else {
        out::line(&format!(
            "created harness {} on {}: {} queries, k {}{}",
            h.name,
            h.index_name,
            h.query_count,
            h.k,
            h.seed
                .map_or(String::new(), |s| format!(", sampled with seed {s}"))
        ));
    }
}

async fn harness(ctx: &Ctx, cmd: HarnessCommand) -> Res {
    match cmd {
        HarnessCommand::Create {
            index,
            name,
            sample,
            seed,
            queries,
            k,
        } => {
            let queries = match (sample, queries) {
                (Some(query_count), _) => {
                    pb::create_harness_request::Queries::Sampled(pb::SampledQueries {
                        query_count,
                        seed,
                    })
                }
                (None, Some(path)) => {
                    let format = Format::detect(&path)?;
                    let points = files::read_points(&path, format, 0, None)?;
                    pb::create_harness_request::Queries::Explicit(pb::ExplicitQueries {
                        queries: points
                            .into_iter()
                            .map(|p| pb::QueryVector { vector: p.vector })
                            .collect(),
                    })
                }
                (None, None) => {
                    return Err(CliError::invalid("give --sample N or --queries FILE"));
                }
            };
            let r = ctx
                .call_long(ctx.autotune().create_harness(pb::CreateHarnessRequest {
                    index_name: index,
                    name,
                    k,
                    queries: Some(queries),
                }))
                .await?;
            print_harness(ctx, &r.harness);
        }
        HarnessCommand::List { index } => {
            let r = ctx
                .call(
                    ctx.autotune()
                        .list_harnesses(pb::ListHarnessesRequest { index_name: index }),
                )
                .await?;
            if ctx.json {
                let v: Vec<Value> = r.harnesses.iter().map(j::harness).collect();
                out::json(&json!({ "harnesses": v }));
            } else {
                let rows: Vec<Vec<String>> = r
                    .harnesses
                    .iter()
                    .map(|h| {
                        vec![
                            h.name.clone(),
                            h.k.to_string(),
                            h.query_count.to_string(),
                            h.seed.map_or("-".into(), |s| s.to_string()),
                            out::timestamp(&h.create_time),
                        ]
                    })
                    .collect();
                out::table(&["NAME", "K", "QUERIES", "SEED", "CREATED"], &rows);
            }
        }
        HarnessCommand::Delete { index, name } => {
            ctx.call(ctx.autotune().delete_harness(pb::DeleteHarnessRequest {
                index_name: index.clone(),
                name: name.clone(),
            }))
            .await?;
            if ctx.json {
                out::json(&json!({}));
            } else {
                out::line(&format!("deleted harness {name} of {index}"));
            }
        }
    }
    ok()
}

/// The columns of a trial row, shared with autotune's live table.
pub const TRIAL_HEADERS: [&str; 10] = [
    "ID", "M", "EF_C", "EF_S", "RECALL", "P50_US", "P95_US", "QPS", "BUILD_MS", "SOURCE",
];

pub fn trial_row(t: &pb::Trial) -> Vec<String> {
    let c = t.config.unwrap_or_default();
    vec![
        t.id.to_string(),
        c.m.to_string(),
        c.ef_construction.to_string(),
        c.ef_search.to_string(),
        format!("{:.4}", t.recall),
        format!("{:.1}", t.p50_micros),
        format!("{:.1}", t.p95_micros),
        format!("{:.0}", t.qps),
        t.build_millis.to_string(),
        t.source.clone(),
    ]
}

fn print_trial(ctx: &Ctx, t: &Option<pb::Trial>) {
    let Some(t) = t else { return };
    if ctx.json {
        out::json(&json!({ "trial": j::trial(t) }));
        return;
    }
    out::line(&format!("trial       {}", t.id));
    out::line(&format!(
        "index       {} (harness {}, k {})",
        t.index_name, t.harness, t.k
    ));
    out::line(&format!("config      {}", out::config(&t.config)));
    out::line(&format!("recall      {:.4}", t.recall));
    out::line(&format!(
        "latency     p50 {:.1} us, p95 {:.1} us, p99 {:.1} us",
        t.p50_micros, t.p95_micros, t.p99_micros
    ));
    out::line(&format!("qps         {:.0} (one thread)", t.qps));
    out::line(&format!(
        "build       {} ms, {} points, {} bytes",
        t.build_millis, t.point_count, t.memory_bytes
    ));
    out::line(&format!("source      {}", t.source));
    out::line(&format!("created     {}", out::timestamp(&t.create_time)));
}

async fn trial(ctx: &Ctx, cmd: TrialCommand) -> Res {
    match cmd {
        TrialCommand::Run {
            index,
            harness,
            m,
            ef_construction,
            ef_search,
            seed,
        } => {
            let r = ctx
                .call_long(ctx.autotune().run_trial(pb::RunTrialRequest {
                    index_name: index,
                    harness,
                    config: Some(pb::HnswConfig {
                        m,
                        ef_construction,
                        ef_search,
                        seed,
                    }),
                }))
                .await?;
            print_trial(ctx, &r.trial);
        }
        TrialCommand::Get { id } => {
            let r = ctx
                .call(ctx.autotune().get_trial(pb::GetTrialRequest { id }))
                .await?;
            print_trial(ctx, &r.trial);
        }
        TrialCommand::List {
            index,
            harness,
            limit,
        } => {
            let (trials, next) = list_trials_page(ctx, index, harness, limit).await?;
            if ctx.json {
                let v: Vec<Value> = trials.iter().map(j::trial).collect();
                out::json(&json!({ "trials": v, "next_page_token": next }));
            } else {
                let rows: Vec<Vec<String>> = trials.iter().map(trial_row).collect();
                out::table(&TRIAL_HEADERS, &rows);
                if !next.is_empty() {
                    out::line(&format!("(more than {limit}; raise --limit to see more)"));
                }
            }
        }
    }
    ok()
}

/// Up to `limit` trials of the journal, newest first, following pages; with the token of the
/// page after them (empty at the end).
async fn list_trials_page(
    ctx: &Ctx,
    index: Option<String>,
    harness: Option<String>,
    limit: u32,
) -> Result<(Vec<pb::Trial>, String), CliError> {
    let mut trials = Vec::new();
    let mut page_token = String::new();
    let mut next = String::new();
    while trials.len() < limit as usize {
        let r = ctx
            .call(ctx.autotune().list_trials(pb::ListTrialsRequest {
                index_name: index.clone().unwrap_or_default(),
                harness: harness.clone().unwrap_or_default(),
                page_size: (limit as usize - trials.len()).min(1000) as u32,
                page_token,
            }))
            .await?;
        trials.extend(r.trials);
        next = r.next_page_token;
        if next.is_empty() {
            break;
        }
        page_token = next.clone();
    }
    trials.truncate(limit as usize);
    Ok((trials, next))
}

/// Up to `limit` trials of the journal, newest first.
pub async fn list_trials(
    ctx: &Ctx,
    index: Option<String>,
    harness: Option<String>,
    limit: u32,
) -> Result<Vec<pb::Trial>, CliError> {
    Ok(list_trials_page(ctx, index, harness, limit).await?.0)
}

fn print_promotion_change(ctx: &Ctx, verb: &str, p: &Option<pb::Promotion>, depth: u32) {
    if ctx.json {
        out::json(&json!({ "current": j::opt_promotion(p), "history_depth": depth }));
        return;
    }
    if let Some(p) = p {
        out::line(&format!(
            "{verb} trial {} on {}: {} (recall {:.4}, p50 {:.1} us) by {}; history depth {depth}",
            p.trial_id,
            p.index_name,
            out::config(&p.config),
            p.recall,
            p.p50_micros,
            if p.promoted_by.is_empty() {
                "-"
            } else {
                &p.promoted_by
            },
        ));
    }
}

fn promotion_row(p: &pb::Promotion) -> Vec<String> {
    vec![
        p.trial_id.to_string(),
        out::config_short(&p.config),
        format!("{:.4}", p.recall),
        format!("{:.1}", p.p50_micros),
        p.promoted_by.clone(),
        out::timestamp(&p.promote_time),
        p.note.clone(),
    ]
}

async fn promoted(ctx: &Ctx, index: String) -> Res {
    let r = ctx
        .call(ctx.promotion().get_promoted(pb::GetPromotedRequest {
            index_name: index.clone(),
        }))
        .await?;
    if ctx.json {
        let h: Vec<Value> = r.history.iter().map(j::promotion).collect();
        out::json(&json!({ "current": j::opt_promotion(&r.current), "history": h }));
        return ok();
    }
    match &r.current {
        None => out::line(&format!("{index}: nothing promoted")),
        Some(_) => {
            let mut rows: Vec<Vec<String>> = Vec::new();
            if let Some(p) = &r.current {
                let mut row = vec!["current".to_string()];
                row.extend(promotion_row(p));
                rows.push(row);
            }
            for (i, p) in r.history.iter().enumerate() {
                let mut row = vec![format!("-{}", i + 1)];
                row.extend(promotion_row(p));
                rows.push(row);
            }
            out::table(
                &[
                    "",
                    "TRIAL",
                    "M/EF_C/EF_S",
                    "RECALL",
                    "P50_US",
                    "BY",
                    "WHEN",
                    "NOTE",
                ],
                &rows,
            );
        }
    }
    ok()
}

fn print_profile(ctx: &Ctx, p: &Option<pb::Profile>) {
    let Some(p) = p else { return };
    if ctx.json {
        out::json(&json!({ "profile": j::profile(p) }));
        return;
    }
    out::line(&format!("profile {}", p.name));
    let rows: Vec<Vec<String>> = p
        .indexes
        .iter()
        .map(|i| vec![i.index_name.clone(), out::config_short(&i.default_config)])
        .collect();
    out::table(&["INDEX", "DEFAULT M/EF_C/EF_S"], &rows);
}

async fn profile(ctx: &Ctx, cmd: ProfileCommand) -> Res {
    match cmd {
        ProfileCommand::Put { name, indexes } => {
            let profile = pb::Profile {
                name,
                indexes: indexes
                    .into_iter()
                    .map(|(index_name, c)| pb::ProfileIndex {
                        index_name,
                        default_config: c.map(|(m, ef_construction, ef_search)| pb::HnswConfig {
                            m,
                            ef_construction,
                            ef_search,
                            seed: None,
                        }),
                    })
                    .collect(),
            };
            let r = ctx
                .call(ctx.index().put_profile(pb::PutProfileRequest {
                    profile: Some(profile),
                }))
                .await?;
            print_profile(ctx, &r.profile);
        }
        ProfileCommand::Get { name } => {
            let r = ctx
                .call(ctx.index().get_profile(pb::GetProfileRequest { name }))
                .await?;
            print_profile(ctx, &r.profile);
        }
        ProfileCommand::List => {
            let mut profiles = Vec::new();
            let mut page_token = String::new();
            loop {
                let r = ctx
                    .call(ctx.index().list_profiles(pb::ListProfilesRequest {
                        page_size: 1000,
                        page_token,
                    }))
                    .await?;
                profiles.extend(r.profiles);
                if r.next_page_token.is_empty() {
                    break;
                }
                page_token = r.next_page_token;
            }
            if ctx.json {
                let v: Vec<Value> = profiles.iter().map(j::profile).collect();
                out::json(&json!({ "profiles": v }));
            } else {
                let rows: Vec<Vec<String>> = profiles
                    .iter()
                    .map(|p| {
                        let names: Vec<&str> =
                            p.indexes.iter().map(|i| i.index_name.as_str()).collect();
                        vec![p.name.clone(), names.join(", ")]
                    })
                    .collect();
                out::table(&["NAME", "INDEXES"], &rows);
            }
        }
        ProfileCommand::Delete { name } => {
            ctx.call(
                ctx.index()
                    .delete_profile(pb::DeleteProfileRequest { name: name.clone() }),
            )
            .await?;
            if ctx.json {
                out::json(&json!({}));
            } else {
                out::line(&format!("deleted profile {name}"));
            }
        }
        ProfileCommand::Activate { name } => {
            let mut client = ctx.index();
            let call = ctx.call_long(
                client.activate_profile(pb::ActivateProfileRequest { name: name.clone() }),
            );
            let r = super::progress::follow_activation(ctx, &name, call).await?;
            if ctx.json {
                let v: Vec<Value> = r.generations.iter().map(j::generation).collect();
                out::json(&json!({ "generations": v }));
            } else {
                let rows: Vec<Vec<String>> = r
                    .generations
                    .iter()
                    .map(|g| {
                        vec![
                            g.index_name.clone(),
                            g.number.to_string(),
                            out::config_short(&g.config),
                            pb::ConfigSource::try_from(g.config_source).map_or(
                                "unknown".into(),
                                |s| {
                                    s.as_str_name()
                                        .trim_start_matches("CONFIG_SOURCE_")
                                        .to_ascii_lowercase()
                                },
                            ),
                            g.point_count.to_string(),
                            g.build_millis.to_string(),
                        ]
                    })
                    .collect();
                out::table(
                    &[
                        "INDEX",
                        "GENERATION",
                        "M/EF_C/EF_S",
                        "SOURCE",
                        "POINTS",
                        "BUILD_MS",
                    ],
                    &rows,
                );
            }
        }
    }
    ok()
}

async fn jobs(ctx: &Ctx, cmd: JobsCommand) -> Res {
    match cmd {
        JobsCommand::List { index } => {
            let r = ctx
                .call(ctx.autotune().list_jobs(pb::ListJobsRequest {
                    index_name: index.unwrap_or_default(),
                }))
                .await?;
            if ctx.json {
                let v: Vec<Value> = r.jobs.iter().map(j::job).collect();
                out::json(&json!({ "jobs": v }));
            } else {
                let rows: Vec<Vec<String>> = r
                    .jobs
                    .iter()
                    .map(|jb| {
                        vec![
                            jb.id.clone(),
                            jb.index_name.clone(),
                            jb.harness.clone(),
                            j::job_state_name(jb.state)
                                .trim_start_matches("JOB_STATE_")
                                .to_ascii_lowercase(),
                            format!("{}/{}", jb.trials_done, jb.trials_total),
                            jb.requested_by.clone(),
                            out::timestamp(&jb.start_time),
                            jb.reason.clone(),
                        ]
                    })
                    .collect();
                out::table(
                    &[
                        "ID", "INDEX", "HARNESS", "STATE", "TRIALS", "BY", "STARTED", "REASON",
                    ],
                    &rows,
                );
            }
        }
        JobsCommand::Cancel { id } => {
            let r = ctx
                .call(
                    ctx.autotune()
                        .cancel_job(pb::CancelJobRequest { id: id.clone() }),
                )
                .await?;
            if ctx.json {
                out::json(&json!({ "job": r.job.as_ref().map_or(Value::Null, j::job) }));
            } else {
                out::line(&format!("cancelled job {id}"));
            }
        }
    }
    ok()
}
