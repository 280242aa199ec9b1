//! AutotuneService: harnesses, trials, and the streamed autotune job.

use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::convert::{self, name, next_page, page_size, page_token_decode, timestamp};
use super::Core;
use crate::autotune::adaptive::{self, Plan};
use crate::autotune::harness::{Harness, QuerySpec, DEFAULT_SEED};
use crate::autotune::jobs::{
    default_grid, Event, JobRecord, JobState, TuneRequest, DEFAULT_MIN_RECALL,
};
use crate::autotune::select::{pareto_front, Objective};
use crate::error::Error;
use crate::model::{Name, TRIAL_EF_CONSTRUCTION, TRIAL_M};
use crate::pb;
use crate::pb::autotune_service_server::AutotuneService;

pub struct AutotuneApi {
    core: Arc<Core>,
}

impl AutotuneApi {
    pub fn new(core: Arc<Core>) -> Self {
        AutotuneApi { core }
    }
}

type R<T> = Result<Response<T>, Status>;

fn harness_to(h: &Harness) -> pb::Harness {
    pb::Harness {
        index_name: h.index.to_string(),
        name: h.name.to_string(),
        k: h.k,
        query_count: h.queries.len() as u32,
        seed: h.seed,
        create_time: timestamp(h.create_time_ms),
    }
}

fn job_to(j: JobRecord) -> pb::Job {
    pb::Job {
        id: j.id,
        index_name: j.index.to_string(),
        harness: j.harness.to_string(),
        state: match j.state {
            JobState::Running => pb::JobState::Running,
            JobState::Succeeded => pb::JobState::Succeeded,
            JobState::Failed => pb::JobState::Failed,
            JobState::Cancelled => pb::JobState::Cancelled,
        } as i32,
        trials_done: j.trials_done,
        trials_total: j.trials_total,
        start_time: timestamp(j.start_time_ms),
        end_time: j.end_time_ms.and_then(timestamp),
        requested_by: j.requested_by,
        graphs_built: j.graphs_built,
        reason: j.reason,
        node_id: j.node_id,
    }
}

fn optional_name(field: &str, s: &str) -> Result<Option<Name>, Error> {
    if s.is_empty() {
        Ok(None)
    } else {
        name(field, s).map(Some)
    }
}

impl TryFrom<pb::AutotuneRequest> for TuneRequest {
    type Error = Error;
    fn try_from(r: pb::AutotuneRequest) -> Result<Self, Error> {
        let index = name("index_name", &r.index_name)?;
        let harness = name("harness", &r.harness)?;
        let min_recall = r.min_recall.unwrap_or(DEFAULT_MIN_RECALL);
        if !(0.0..=1.0).contains(&min_recall) {
            return Err(Error::out_of_range("min_recall", "[0, 1]", min_recall));
        }
        let has_grid = !r.grid.is_empty();
        let grid = if r.grid.is_empty() {
            default_grid()
        } else {
            if r.grid.len() > 1000 {
                return Err(Error::Limit(format!(
                    "grid has {} configs; at most 1000 are allowed",
                    r.grid.len()
                )));
            }
            r.grid
                .iter()
                .copied()
                .enumerate()
                .map(|(i, c)| convert::trial_config(&format!("grid[{i}]."), Some(c)))
                .collect::<Result<Vec<_>, _>>()?
        };
        let objective = match pb::Objective::try_from(r.objective) {
            Ok(pb::Objective::Unspecified) | Ok(pb::Objective::MaxRecall) => {
                if r.target_recall.is_some() {
                    return Err(Error::invalid(
                        "target_recall is only for objective OBJECTIVE_TARGET_RECALL",
                    ));
                }
                Objective::MaxRecall
            }
            Ok(pb::Objective::TargetRecall) => {
                let t = r.target_recall.ok_or_else(|| {
                    Error::invalid(
                        "objective OBJECTIVE_TARGET_RECALL needs target_recall in [0, 1]",
                    )
                })?;
                if !(0.0..=1.0).contains(&t) {
                    return Err(Error::out_of_range("target_recall", "[0, 1]", t));
                }
                Objective::TargetRecall(t)
            }
            Err(_) => {
                return Err(Error::invalid(format!(
                    "objective {} is unknown: use OBJECTIVE_MAX_RECALL or OBJECTIVE_TARGET_RECALL",
                    r.objective
                )))
            }
        };
        let requested_by = if r.requested_by.is_empty() {
            "autotune".to_string()
        } else {
            convert::text("requested_by", &r.requested_by, convert::MAX_WHO_BYTES)?.to_string()
        };
        let adaptive_fields = r.budget.is_some()
            || r.seed.is_some()
            || r.adaptive_sample_points.is_some()
            || r.adaptive_confirm != 0
            || !r.adaptive_m.is_empty()
            || !r.adaptive_ef_construction.is_empty();
        let (grid, adaptive) = match pb::Strategy::try_from(r.strategy) {
            Ok(pb::Strategy::Unspecified) | Ok(pb::Strategy::Grid) => {
                if adaptive_fields {
                    return Err(Error::invalid(
                        "budget, seed, adaptive_m, adaptive_ef_construction, adaptive_sample_points \
                         and adaptive_confirm are only for strategy STRATEGY_ADAPTIVE",
                    ));
                }
                (grid, None)
            }
            Ok(pb::Strategy::Adaptive) => {
                let Objective::TargetRecall(target) = objective else {
                    return Err(Error::invalid(
                        "strategy STRATEGY_ADAPTIVE needs objective OBJECTIVE_TARGET_RECALL with \
                         target_recall: it looks for the cheapest config that reaches a recall",
                    ));
                };
                if has_grid {
                    return Err(Error::invalid(
                        "grid is only for strategy STRATEGY_GRID; STRATEGY_ADAPTIVE explores \
                         adaptive_m x adaptive_ef_construction itself",
                    ));
                }
                (Vec::new(), Some(adaptive_plan(target, &r)?))
            }
            Err(_) => {
                return Err(Error::invalid(format!(
                    "strategy {} is unknown: use STRATEGY_GRID or STRATEGY_ADAPTIVE",
                    r.strategy
                )))
            }
        };
        Ok(TuneRequest {
            index,
            harness,
            min_recall,
            grid,
            activate: r.activate,
            requested_by,
            objective,
            adaptive,
            index_uid: None,
        })
    }
}

/// The ADAPTIVE fields of a request as a plan (width is set by the job from the cores).
fn adaptive_plan(target: f64, r: &pb::AutotuneRequest) -> Result<Plan, Error> {
    let list = |field: &str,
                given: &[u32],
                default: &[u32],
                range: std::ops::RangeInclusive<u32>|
     -> Result<Vec<u32>, Error> {
        if given.len() > 8 {
            return Err(Error::Limit(format!(
                "{field} has {} values; at most 8 are allowed",
                given.len()
            )));
        }
        let mut v = Vec::new();
        for (i, &x) in given.iter().enumerate() {
            let x = crate::model::in_range(&format!("{field}[{i}]"), x, range.clone())?;
            if !v.contains(&x) {
                v.push(x);
            }
        }
        Ok(if v.is_empty() { default.to_vec() } else { v })
    };
    let m = list("adaptive_m", &r.adaptive_m, &adaptive::DEFAULT_M, TRIAL_M)?;
    let mut ef_construction = list(
        "adaptive_ef_construction",
        &r.adaptive_ef_construction,
        &adaptive::DEFAULT_EF_CONSTRUCTION,
        TRIAL_EF_CONSTRUCTION,
    )?;
    ef_construction.sort_unstable();
    let budget = r.budget.unwrap_or_default();
    if budget.max_trials > 10_000 {
        return Err(Error::out_of_range(
            "budget.max_trials",
            "[0, 10000] (0: 40)",
            budget.max_trials,
        ));
    }
    Ok(Plan {
        target,
        m,
        ef_construction,
        max_trials: if budget.max_trials == 0 {
            adaptive::DEFAULT_MAX_TRIALS
        } else {
            budget.max_trials
        },
        max_time: (budget.max_seconds > 0)
            .then(|| std::time::Duration::from_secs(u64::from(budget.max_seconds))),
        seed: r.seed.unwrap_or(DEFAULT_SEED),
        width: 1,
        sample_points: match r.adaptive_sample_points {
            Some(n) if n > 0 && n < adaptive::MIN_SAMPLE_POINTS => {
                return Err(Error::out_of_range(
                    "adaptive_sample_points",
                    format!("0 (off) or at least {}", adaptive::MIN_SAMPLE_POINTS),
                    n,
                ))
            }
            n => n,
        },
        confirm: match r.adaptive_confirm {
            0 => adaptive::DEFAULT_CONFIRM,
            n if n <= adaptive::MAX_CONFIRM => n,
            n => {
                return Err(Error::out_of_range(
                    "adaptive_confirm",
                    format!(
                        "[0, {}] (0: {})",
                        adaptive::MAX_CONFIRM,
                        adaptive::DEFAULT_CONFIRM
                    ),
                    n,
                ))
            }
        },
    })
}

#[tonic::async_trait]
impl AutotuneService for AutotuneApi {
    #[tracing::instrument(skip_all, fields(index = %req.get_ref().index_name))]
    async fn set_refresh_policy(
        &self,
        req: Request<pb::SetRefreshPolicyRequest>,
    ) -> R<pb::SetRefreshPolicyResponse> {
        let req = req.into_inner();
        let index = name("index_name", &req.index_name)?;
        let policy = convert::refresh_policy_from(req.policy)?;
        let saved = self.core.app()?.refresh.set_policy(&index, policy).await?;
        Ok(Response::new(pb::SetRefreshPolicyResponse {
            policy: Some(match saved {
                Some(p) => convert::refresh_policy_to(&p),
                None => pb::RefreshPolicy {
                    mode: pb::RefreshMode::Manual as i32,
                    ..Default::default()
                },
            }),
        }))
    }

    #[tracing::instrument(skip_all, fields(index = %req.get_ref().index_name, harness = %req.get_ref().name))]
    async fn create_harness(
        &self,
        req: Request<pb::CreateHarnessRequest>,
    ) -> R<pb::CreateHarnessResponse> {
        let req = req.into_inner();
        let index = name("index_name", &req.index_name)?;
        let hname = name("name", &req.name)?;
        let spec = match req.queries {
            Some(pb::create_harness_request::Queries::Sampled(s)) => QuerySpec::Sampled {
                count: s.query_count,
                seed: s.seed.unwrap_or(DEFAULT_SEED),
            },
            Some(pb::create_harness_request::Queries::Explicit(e)) => {
                QuerySpec::Explicit(e.queries.into_iter().map(|q| q.vector).collect())
            }
            None => {
                return Err(Error::invalid(
                    "queries is required: sampled {query_count, seed} or explicit {queries}",
                )
                .into())
            }
        };
        let h = self
            .core
            .app()?
            .lab
            .create_harness(&index, hname, req.k, spec)
            .await?;
        Ok(Response::new(pb::CreateHarnessResponse {
            harness: Some(harness_to(&h)),
        }))
    }

    async fn get_harness(&self, req: Request<pb::GetHarnessRequest>) -> R<pb::GetHarnessResponse> {
        let index = name("index_name", &req.get_ref().index_name)?;
        let hname = name("name", &req.get_ref().name)?;
        let h = self
            .core
            .app()?
            .lab
            .get_harness_synced(&index, &hname)
            .await?;
        Ok(Response::new(pb::GetHarnessResponse {
            harness: Some(harness_to(&h)),
        }))
    }

    async fn list_harnesses(
        &self,
        req: Request<pb::ListHarnessesRequest>,
    ) -> R<pb::ListHarnessesResponse> {
        let index = name("index_name", &req.get_ref().index_name)?;
        let hs = self.core.app()?.lab.list_harnesses(&index)?;
        Ok(Response::new(pb::ListHarnessesResponse {
            harnesses: hs.iter().map(harness_to).collect(),
        }))
    }

    async fn delete_harness(
        &self,
        req: Request<pb::DeleteHarnessRequest>,
    ) -> R<pb::DeleteHarnessResponse> {
        let index = name("index_name", &req.get_ref().index_name)?;
        let hname = name("name", &req.get_ref().name)?;
        self.core.app()?.lab.delete_harness(&index, &hname).await?;
        Ok(Response::new(pb::DeleteHarnessResponse {}))
    }

    #[tracing::instrument(skip_all, fields(index = %req.get_ref().index_name, harness = %req.get_ref().harness))]
    async fn run_trial(&self, req: Request<pb::RunTrialRequest>) -> R<pb::RunTrialResponse> {
        let req = req.into_inner();
        let index = name("index_name", &req.index_name)?;
        let harness = name("harness", &req.harness)?;
        let config = convert::trial_config("config.", req.config)?;
        let trial = self
            .core
            .app()?
            .lab
            .run_trial(&index, &harness, config)
            .await?;
        Ok(Response::new(pb::RunTrialResponse {
            trial: Some(trial.into()),
        }))
    }

    async fn get_trial(&self, req: Request<pb::GetTrialRequest>) -> R<pb::GetTrialResponse> {
        let t = self
            .core
            .app()?
            .lab
            .get_trial_synced(req.get_ref().id)
            .await?;
        Ok(Response::new(pb::GetTrialResponse {
            trial: Some(t.into()),
        }))
    }

    async fn list_trials(&self, req: Request<pb::ListTrialsRequest>) -> R<pb::ListTrialsResponse> {
        let req = req.into_inner();
        let index = optional_name("index_name", &req.index_name)?;
        let harness = optional_name("harness", &req.harness)?;
        let limit = page_size(req.page_size)?;
        let before = page_token_decode(&req.page_token)?
            .map(|s| {
                s.parse::<u64>().map_err(|_| {
                    Error::invalid(format!(
                        "page_token {:?} is not a token this server issued",
                        req.page_token
                    ))
                })
            })
            .transpose()?;
        let mut trials = self.core.app()?.lab.list_trials(
            index.as_ref(),
            harness.as_ref(),
            before,
            limit + 1,
        )?;
        let next_page_token = next_page(&mut trials, limit, |t| t.id.to_string());
        Ok(Response::new(pb::ListTrialsResponse {
            trials: trials.into_iter().map(Into::into).collect(),
            next_page_token,
        }))
    }

    type AutotuneStream = ReceiverStream<Result<pb::AutotuneResponse, Status>>;

    #[tracing::instrument(skip_all, fields(index = %req.get_ref().index_name, harness = %req.get_ref().harness))]
    async fn autotune(&self, req: Request<pb::AutotuneRequest>) -> R<Self::AutotuneStream> {
        let tune = TuneRequest::try_from(req.into_inner())?;
        let (mut events, token) = self.core.app()?.start_tune(tune).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        // The forwarder: the job never waits for the client (its events queue up, a handful per
        // trial); the client going away cancels the job. It ends with the job's events.
        self.core.tasks.spawn(async move {
            loop {
                let event = tokio::select! {
                    _ = tx.closed() => {
                        token.cancel();
                        return;
                    }
                    e = events.recv() => match e {
                        Some(e) => e,
                        None => return,
                    },
                };
                let msg = match event {
                    Event::Started {
                        job_id,
                        grid,
                        adaptive,
                    } => Ok(pb::AutotuneResponse {
                        event: Some(pb::autotune_response::Event::Started(pb::AutotuneStarted {
                            job_id,
                            grid: grid.iter().map(convert::config_to).collect(),
                            strategy: if adaptive {
                                pb::Strategy::Adaptive
                            } else {
                                pb::Strategy::Grid
                            } as i32,
                        })),
                    }),
                    Event::Trial(t) => Ok(pb::AutotuneResponse {
                        event: Some(pb::autotune_response::Event::Trial((*t).into())),
                    }),
                    Event::Finished(o) => Ok(pb::AutotuneResponse {
                        event: Some(pb::autotune_response::Event::Finished(
                            pb::AutotuneFinished {
                                job_id: o.job_id,
                                promoted: o.promotion.is_some(),
                                generation: o
                                    .generation
                                    .as_ref()
                                    .zip(o.winner.as_ref())
                                    .map(|(g, w)| convert::generation_to(&w.index, g)),
                                winner: o.winner.map(Into::into),
                                promotion: o.promotion.map(Into::into),
                                reason: o.reason,
                                pareto_front: o.pareto_front.into_iter().map(Into::into).collect(),
                            },
                        )),
                    }),
                    Event::Progress { job_id, activities } => Ok(pb::AutotuneResponse {
                        event: Some(pb::autotune_response::Event::Progress(
                            pb::AutotuneProgress {
                                job_id,
                                activities: activities.iter().map(convert::progress_to).collect(),
                            },
                        )),
                    }),
                    Event::Ended(e) => Err(e.into()),
                };
                tokio::select! {
                    _ = tx.closed() => {
                        token.cancel();
                        return;
                    }
                    sent = tx.send(msg) => if sent.is_err() {
                        token.cancel();
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn list_jobs(&self, req: Request<pb::ListJobsRequest>) -> R<pb::ListJobsResponse> {
        let index = optional_name("index_name", &req.get_ref().index_name)?;
        let jobs = self.core.app()?.jobs.list(index.as_ref()).await?;
        Ok(Response::new(pb::ListJobsResponse {
            jobs: jobs.into_iter().map(job_to).collect(),
        }))
    }

    async fn get_pareto_front(
        &self,
        req: Request<pb::GetParetoFrontRequest>,
    ) -> R<pb::GetParetoFrontResponse> {
        let index = name("index_name", &req.get_ref().index_name)?;
        let harness = name("harness", &req.get_ref().harness)?;
        let lab = &self.core.app()?.lab;
        lab.catalog().handle(&index)?;
        let mut trials = lab.all_trials(&index, &harness)?;
        if !req.get_ref().include_sample_trials {
            trials.retain(|t| t.is_full());
        }
        Ok(Response::new(pb::GetParetoFrontResponse {
            trials: pareto_front(&trials).into_iter().map(Into::into).collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(job = %req.get_ref().id))]
    async fn cancel_job(&self, req: Request<pb::CancelJobRequest>) -> R<pb::CancelJobResponse> {
        let id = &req.get_ref().id;
        if id.is_empty() {
            return Err(
                Error::invalid("id is required: a job id such as job-3 (see ListJobs)").into(),
            );
        }
        convert::text("id", id, convert::MAX_JOB_ID_BYTES)?;
        let job = self.core.app()?.jobs.cancel(id).await?;
        Ok(Response::new(pb::CancelJobResponse {
            job: Some(job_to(job)),
        }))
    }
}
