//! The ADAPTIVE autotune strategy: successive halving over construction effort.
//!
//! Building a graph is the expensive step of a trial; ef_search is a search-time knob, so one
//! graph answers for every ef_search. The search therefore has two loops:
//! - **Inner, per graph:** the smallest ef_search on a fixed ladder whose recall reaches the
//!   target, found by binary search (recall grows with ef_search), starting from a hint when a
//!   cheaper graph of the same m already found one. The graph's *cost* is the mean number of
//!   distance computations per query at that ef_search: the work of a search, which — unlike
//!   a latency — does not depend on the machine's load, so every decision below is the same
//!   for the same seed and data.
//! - **Outer, over (m, ef_construction):** successive halving (Jamieson & Talwalkar, 2016;
//!   Hyperband, Li et al., 2017) with ef_construction as the resource. Rung 1 builds one graph
//!   per m at the cheapest ef_construction. The best graphs (as many as there are cores, so a
//!   rung's builds run side by side) are rebuilt at the next ef_construction, and a graph goes
//!   on climbing only while that lowers its cost by at least [`MIN_GAIN`].
//!
//! Budget: never more than `max_trials` trials; no build starts that the measured build times
//! predict would end after `max_seconds` (build time grows about linearly with
//! ef_construction), and no trial starts after it.
//!
//! **Multi-fidelity** (issue 23 §1): on a big index the search above runs on a seeded sample of
//! the points (the job gives it a harness whose ground truth is over the sample), and
//! [`confirm`] then builds only the best few graphs of the sample on all the points. The rule
//! that carries the ranking over is the cost: graphs that reached the target on the sample,
//! least distance computations first (cost ranks graphs far more stably across N than p50, and
//! recall at a fixed ef_search drops as N grows, so the ef_search found on the sample is a
//! starting point, not the answer). The graphs confirmed are the best, then the best of each
//! other m (a small m's recall drifts most with N), then the next best. On all the points each
//! confirmed graph's smallest ef_search is searched for again starting at the sample's: one
//! step down to check it, or up by 1, 2, 4… steps while it misses, then binary search.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::trial::Trial;
use crate::error::{Error, Result};
use crate::model::HnswConfig;

/// The ef_search values tried, within the trial bounds.
pub const EF_LADDER: [u32; 18] = [
    10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 100, 128, 160, 200, 256, 320, 400, 512,
];
// Every rung of the ladder is a config a trial may run (the contract's bound).
const _: () = assert!(EF_LADDER[EF_LADDER.len() - 1] == *crate::model::TRIAL_EF_SEARCH.end());
pub const DEFAULT_M: [u32; 3] = [8, 16, 32];
pub const DEFAULT_EF_CONSTRUCTION: [u32; 3] = [40, 100, 200];
pub const DEFAULT_MAX_TRIALS: u32 = 40;
/// A rebuild at the next ef_construction must cut the cost by this fraction to climb further.
pub const MIN_GAIN: f64 = 0.03;
/// Multi-fidelity by default: on for an index of at least this many points...
pub const AUTO_SAMPLE_MIN_POINTS: usize = 50_000;
/// ...with a sample of this share of them...
pub const AUTO_SAMPLE_SHARE: f64 = 0.1;
/// ...and at least this many points.
pub const AUTO_SAMPLE_FLOOR: usize = 20_000;
/// The smallest sample a request may ask for.
pub const MIN_SAMPLE_POINTS: u32 = 1_000;
/// Graphs of the sample phase confirmed on all the points, by default and at most.
pub const DEFAULT_CONFIRM: u32 = 2;
pub const MAX_CONFIRM: u32 = 8;
/// Trials set aside for each confirmed graph out of `max_trials` (the ef_search search around
/// the sample's takes 2 or 3 when the sample's is close, 5 or 6 when the full data needs many
/// times it).
pub const TRIALS_PER_CONFIRM: u32 = 6;

#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The recall to reach (the objective's target).
    pub target: f64,
    /// m values, in the order they were given (ties go to the earlier).
    pub m: Vec<u32>,
    /// ef_construction rungs, ascending.
    pub ef_construction: Vec<u32>,
    pub max_trials: u32,
    pub max_time: Option<Duration>,
    pub seed: u64,
    /// Graphs built side by side in a rung after the first.
    pub width: usize,
    /// Multi-fidelity's sample size: None automatic, Some(0) off (see [`Plan::sample_size`]).
    pub sample_points: Option<u32>,
    /// Graphs of the sample phase confirmed on all the points.
    pub confirm: u32,
}

impl Plan {
    /// The size of multi-fidelity's sample for an index of `n` points; None: no sample phase,
    /// every trial on all the points.
    pub fn sample_size(&self, n: usize) -> Option<usize> {
        let s = match self.sample_points {
            Some(0) => return None,
            Some(s) => s as usize,
            None if n >= AUTO_SAMPLE_MIN_POINTS => {
                ((n as f64 * AUTO_SAMPLE_SHARE) as usize).max(AUTO_SAMPLE_FLOOR)
            }
            None => return None,
        };
        (s < n).then_some(s)
    }
}

/// A graph the search measured: its (m, ef_construction), the smallest ladder ef_search that
/// reached the target on it (if any), its cost there and its build time.
#[derive(Clone, Debug, PartialEq)]
pub struct Ranked {
    pub m: u32,
    pub ef_construction: u32,
    score: Score,
    pub built: Duration,
}

impl Ranked {
    /// The smallest ladder ef_search that reached the target, if one did.
    pub fn ef_search(&self) -> Option<u32> {
        self.score.ef_at.map(|i| EF_LADDER[i])
    }
    /// Mean distance computations per query there (infinite when none reached it).
    pub fn cost(&self) -> f64 {
        self.score.cost
    }
}

/// What ADAPTIVE needs from a job: start builds (they run concurrently) and run trials.
pub trait Evaluator {
    type Graph: Send + Sync + 'static;
    /// Starts building a graph; the task yields it with its build time. A build should stop
    /// early (with an error) once `stop` is cancelled.
    fn spawn_build(
        &self,
        config: HnswConfig,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<Result<(Arc<Self::Graph>, Duration)>>;
    /// Measures one config on a built graph, journals and streams it.
    fn trial(
        &self,
        graph: &Arc<Self::Graph>,
        config: HnswConfig,
    ) -> impl Future<Output = Result<Trial>> + Send;
}

/// How good a graph is for the target: reached (with its cost) beats not reached (by recall).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Score {
    /// Index into EF_LADDER of the smallest ef_search that reached the target.
    ef_at: Option<usize>,
    /// Mean distance computations per query there.
    cost: f64,
    best_recall: f64,
}

impl Score {
    /// Whether `self` is clearly better than `old` (the rung-climbing rule).
    fn improves_on(&self, old: &Score) -> bool {
        match (self.ef_at.is_some(), old.ef_at.is_some()) {
            (true, true) => self.cost < old.cost * (1.0 - MIN_GAIN),
            (true, false) => true,
            (false, true) => false,
            (false, false) => self.best_recall > old.best_recall + 0.005,
        }
    }

    /// Sort key: reached first, then cheaper, then higher recall.
    fn key(&self) -> (bool, f64, f64) {
        (self.ef_at.is_none(), self.cost, -self.best_recall)
    }
}

struct Run<'a, E: Evaluator> {
    plan: &'a Plan,
    eval: &'a E,
    started: Instant,
    trials: u32,
    /// Every graph measured, in the order measured.
    measured: Vec<Ranked>,
}

impl<E: Evaluator> Run<'_, E> {
    fn out_of_time(&self, extra: Duration) -> bool {
        self.plan
            .max_time
            .is_some_and(|t| self.started.elapsed() + extra > t)
    }

    fn trials_left(&self) -> u32 {
        self.plan.max_trials.saturating_sub(self.trials)
    }

    /// Binary search for the smallest ladder ef_search reaching the target, spending at most
    /// `allowance` trials.
    async fn find_ef(
        &mut self,
        graph: &Arc<E::Graph>,
        m: u32,
        ef_construction: u32,
        hint: Option<usize>,
        allowance: u32,
    ) -> Result<Score> {
        let start = hint.unwrap_or((EF_LADDER.len() - 1) / 2);
        self.search_ladder(graph, m, ef_construction, start, 0, allowance)
            .await
    }
}

impl<E: Evaluator> Run<'_, E> {
    /// The smallest ladder ef_search reaching the target on a graph where about `hint` reached
    /// it on a sample: probes `hint`; while it passes, the step below (at most one step, then
    /// binary search below); while it misses, up by 1, 2, 4… steps until one passes, then
    /// binary search in between (recall at a fixed ef_search drops as N grows, at 1M points
    /// to several ladder steps above the sample's).
    async fn find_ef_near(
        &mut self,
        graph: &Arc<E::Graph>,
        m: u32,
        ef_construction: u32,
        hint: Option<usize>,
        allowance: u32,
    ) -> Result<Score> {
        match hint {
            None => {
                self.find_ef(graph, m, ef_construction, None, allowance)
                    .await
            }
            Some(hint) => {
                self.search_ladder(graph, m, ef_construction, hint, 2, allowance)
                    .await
            }
        }
    }

    /// The search both of the above run: trials at ladder steps from `start`; with
    /// `neighbour_steps`, the first ones after passes move one step down (that many at most),
    /// and misses before any pass gallop up (1, 2, 4… steps); the rest halve the interval still
    /// open, until it is empty or the allowance, the job's trials or its time run out.
    async fn search_ladder(
        &mut self,
        graph: &Arc<E::Graph>,
        m: u32,
        ef_construction: u32,
        start: usize,
        neighbour_steps: u32,
        mut allowance: u32,
    ) -> Result<Score> {
        let (mut lo, mut hi) = (0usize, EF_LADDER.len() - 1);
        let mut score = Score {
            ef_at: None,
            cost: f64::INFINITY,
            best_recall: 0.0,
        };
        let mut next = start.min(hi);
        let mut steps = 0;
        let mut climb = 0u32;
        while lo <= hi
            && allowance > 0
            && self.trials_left() > 0
            && !self.out_of_time(Duration::ZERO)
        {
            let config = HnswConfig {
                m,
                ef_construction,
                ef_search: EF_LADDER[next],
                seed: Some(self.plan.seed),
            };
            let t = self.eval.trial(graph, config).await?;
            self.trials += 1;
            allowance -= 1;
            steps += 1;
            score.best_recall = score.best_recall.max(t.recall);
            let passed = t.recall >= self.plan.target;
            if passed {
                score.ef_at = Some(next);
                score.cost = t.mean_distance_evals;
                if next == 0 {
                    break;
                }
                hi = next - 1;
            } else {
                lo = next + 1;
            }
            let bisect = lo + hi.saturating_sub(lo) / 2;
            next = if passed {
                if steps <= neighbour_steps {
                    hi
                } else {
                    bisect
                }
            } else if neighbour_steps > 0 && score.ef_at.is_none() {
                let up = next + (1usize << climb.min(16));
                climb += 1;
                up.min(hi)
            } else {
                bisect
            };
        }
        Ok(score)
    }
}

/// Runs the plan; returns when the search converged or the budget ran out, with every graph
/// it measured, best first (reached the target, then least cost, then highest recall; ties in
/// the order measured).
pub async fn run<E: Evaluator>(plan: &Plan, eval: &E) -> Result<Vec<Ranked>> {
    run_from(plan, eval, Instant::now()).await
}

/// [`run`] with the budget's clock started at `started`.
pub async fn run_from<E: Evaluator>(
    plan: &Plan,
    eval: &E,
    started: Instant,
) -> Result<Vec<Ranked>> {
    if plan.m.is_empty() || plan.ef_construction.is_empty() {
        return Err(Error::Internal("adaptive plan with an empty space".into()));
    }
    let mut run = Run {
        plan,
        eval,
        started,
        trials: 0,
        measured: Vec::new(),
    };
    // (m, score, build time of its last graph), one per m still in the race.
    let mut alive: Vec<(u32, Score, Duration)> = Vec::new();
    let mut prev_ef = plan.ef_construction[0];
    for (rung, &ef_construction) in plan.ef_construction.iter().enumerate() {
        let candidates: Vec<(u32, Option<Score>, Duration)> = if rung == 0 {
            plan.m.iter().map(|&m| (m, None, Duration::ZERO)).collect()
        } else {
            alive.sort_by(|a, b| {
                a.1.key()
                    .partial_cmp(&b.1.key())
                    .unwrap_or(std::cmp::Ordering::Equal)
            });
            alive
                .iter()
                .take(plan.width.max(1))
                .filter(|(_, _, built)| {
                    // Build time grows about linearly with ef_construction.
                    let predicted =
                        built.mul_f64(f64::from(ef_construction) / f64::from(prev_ef.max(1)));
                    !run.out_of_time(predicted)
                })
                .map(|&(m, s, b)| (m, Some(s), b))
                .collect()
        };
        // At least one trial per graph, or don't build it.
        let n = (candidates.len() as u32).min(run.trials_left()) as usize;
        if n == 0 || run.out_of_time(Duration::ZERO) {
            break;
        }
        // Builds that will not be measured stop: when the budget runs out below, and when a
        // build or trial fails (the guard cancels on every way out), so none outlives the job.
        let stop = CancellationToken::new();
        let _stop_on_exit = stop.clone().drop_guard();
        let builds: Vec<_> = candidates[..n]
            .iter()
            .map(|&(m, _, _)| {
                eval.spawn_build(
                    HnswConfig {
                        m,
                        ef_construction,
                        ef_search: EF_LADDER[0],
                        seed: Some(plan.seed),
                    },
                    stop.clone(),
                )
            })
            .collect();
        let mut next_alive = Vec::new();
        let mut handles = builds.into_iter();
        for (i, &(m, old, _)) in candidates[..n].iter().enumerate() {
            let Some(h) = handles.next() else { break };
            let (graph, built) = match h.await {
                Ok(r) => r?,
                Err(e) => return Err(Error::Internal(format!("a build task failed: {e}"))),
            };
            // Split what is left evenly among this rung's remaining graphs.
            let allowance = (run.trials_left() / (n - i) as u32).max(1);
            let hint = old.and_then(|s| s.ef_at);
            let score = run
                .find_ef(&graph, m, ef_construction, hint, allowance)
                .await?;
            let keep = match old {
                None => true,
                Some(old) => score.improves_on(&old),
            };
            tracing::debug!(m, ef_construction, ?score, keep, "adaptive: graph measured");
            run.measured.push(Ranked {
                m,
                ef_construction,
                score,
                built,
            });
            if keep {
                next_alive.push((m, score, built));
            }
        }
        // Stop builds that will not be measured (the budget ran out); none outlives the job.
        stop.cancel();
        for h in handles {
            let _ = h.await;
        }
        if next_alive.is_empty() {
            break;
        }
        alive = next_alive;
        prev_ef = ef_construction;
    }
    let mut ranked = run.measured;
    ranked.sort_by(|a, b| {
        a.score
            .key()
            .partial_cmp(&b.score.key())
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    Ok(ranked)
}

/// Multi-fidelity's second phase: builds the first `n` graphs of `ranked` (the sample phase's
/// ranking) on all the points and finds each one's smallest ladder ef_search reaching the target
/// there, starting at the sample's. `scale` (all points over the sample's) predicts a full
/// build's time from the sample's; no build starts that would end after `max_time` counted from
/// `started`, and no trial starts after it or beyond `max_trials` (this phase's own).
pub async fn confirm<E: Evaluator>(
    plan: &Plan,
    eval: &E,
    ranked: &[Ranked],
    n: usize,
    scale: f64,
    started: Instant,
) -> Result<()> {
    let mut run = Run {
        plan,
        eval,
        started,
        trials: 0,
        measured: Vec::new(),
    };
    // Graphs that reached the target on the sample, if any did; else the closest.
    let reached = ranked.iter().filter(|r| r.score.ef_at.is_some()).count();
    let pool = if reached > 0 {
        &ranked[..reached]
    } else {
        ranked
    };
    // The best one, then the best of each other m, then the next best: recall at a fixed
    // config drifts with N more for some m than for others (a small m's most), so the graphs
    // confirmed hedge across m rather than take two of one.
    let want = n.min(run.trials_left() as usize);
    let mut picked: Vec<&Ranked> = Vec::with_capacity(want);
    for r in pool {
        if picked.len() < want && picked.iter().all(|p| p.m != r.m) {
            picked.push(r);
        }
    }
    for r in pool {
        if picked.len() < want && !picked.iter().any(|p| std::ptr::eq(*p, r)) {
            picked.push(r);
        }
    }
    let chosen: Vec<&Ranked> = picked
        .into_iter()
        .filter(|r| !run.out_of_time(r.built.mul_f64(scale)))
        .collect();
    if chosen.is_empty() {
        return Ok(());
    }
    // A failed build or trial stops the other builds (the guard cancels on every way out).
    let stop = CancellationToken::new();
    let _stop_on_exit = stop.clone().drop_guard();
    let builds: Vec<_> = chosen
        .iter()
        .map(|r| {
            eval.spawn_build(
                HnswConfig {
                    m: r.m,
                    ef_construction: r.ef_construction,
                    ef_search: EF_LADDER[0],
                    seed: Some(plan.seed),
                },
                stop.clone(),
            )
        })
        .collect();
    // Every graph is built before any is measured: a trial measured while another graph
    // still builds on the other cores gets a slower p50 than one measured after, and the
    // winner is picked by p50 (on the 30k words, one config measured 49.6 µs beside a build
    // and 39.8 µs alone).
    let mut graphs = Vec::with_capacity(builds.len());
    for h in builds {
        match h.await {
            Ok(r) => graphs.push(r?.0),
            Err(e) => return Err(Error::Internal(format!("a build task failed: {e}"))),
        }
    }
    let total = chosen.len();
    for (i, (r, graph)) in chosen.into_iter().zip(graphs).enumerate() {
        if run.trials_left() == 0 || run.out_of_time(Duration::ZERO) {
            break;
        }
        let allowance = (run.trials_left() / (total - i) as u32).max(1);
        let score = run
            .find_ef_near(&graph, r.m, r.ef_construction, r.score.ef_at, allowance)
            .await?;
        tracing::debug!(
            m = r.m,
            ef_construction = r.ef_construction,
            ?score,
            "multi-fidelity: graph confirmed on all points"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Name;
    use parking_lot::Mutex;

    /// A synthetic landscape: recall grows with ef_search, m and ef_construction; cost grows
    /// with ef_search and m.
    struct Fake {
        log: Mutex<Vec<HnswConfig>>,
        builds: Mutex<Vec<(u32, u32)>>,
        /// Recall at ef_search e is the easy landscape's at e / hard (more points: lower).
        hard: u32,
    }

    fn fake(hard: u32) -> Fake {
        Fake {
            log: Mutex::new(Vec::new()),
            builds: Mutex::new(Vec::new()),
            hard,
        }
    }

    fn recall(c: &HnswConfig) -> f64 {
        recall_at(c, 1)
    }

    fn recall_at(c: &HnswConfig, hard: u32) -> f64 {
        let q = f64::from(c.m).ln() * f64::from(c.ef_construction).ln();
        1.0 - 1.0 / (1.0 + f64::from(c.ef_search) / f64::from(hard) * q / 60.0)
    }

    impl Evaluator for Fake {
        type Graph = (u32, u32);
        fn spawn_build(
            &self,
            c: HnswConfig,
            _stop: CancellationToken,
        ) -> tokio::task::JoinHandle<Result<(Arc<(u32, u32)>, Duration)>> {
            self.builds.lock().push((c.m, c.ef_construction));
            tokio::spawn(async move {
                Ok((
                    Arc::new((c.m, c.ef_construction)),
                    Duration::from_millis(u64::from(c.ef_construction)),
                ))
            })
        }
        async fn trial(&self, g: &Arc<(u32, u32)>, c: HnswConfig) -> Result<Trial> {
            assert_eq!((g.0, g.1), (c.m, c.ef_construction));
            self.log.lock().push(c);
            Ok(Trial {
                id: self.log.lock().len() as u64,
                index: Name::parse("i", "i")?,
                harness: Name::parse("h", "h")?,
                config: c,
                k: 10,
                recall: recall_at(&c, self.hard),
                p50_micros: 1.0,
                p95_micros: 1.0,
                p99_micros: 1.0,
                qps: 1.0,
                build_millis: 1,
                point_count: 1,
                memory_bytes: 1,
                create_time_ms: 0,
                source: String::new(),
                mean_distance_evals: f64::from(c.ef_search) * f64::from(c.m).sqrt(),
                fidelity: Default::default(),
                node_id: String::new(),
            })
        }
    }

    fn plan(max_trials: u32) -> Plan {
        Plan {
            target: 0.95,
            m: DEFAULT_M.to_vec(),
            ef_construction: DEFAULT_EF_CONSTRUCTION.to_vec(),
            max_trials,
            max_time: None,
            seed: 7,
            width: 2,
            sample_points: Some(0),
            confirm: DEFAULT_CONFIRM,
        }
    }

    async fn go(p: &Plan) -> (Vec<HnswConfig>, Vec<(u32, u32)>) {
        let f = fake(1);
        run(p, &f).await.expect("run");
        let log = f.log.lock().clone();
        let builds = f.builds.lock().clone();
        (log, builds)
    }

    #[tokio::test]
    async fn finds_the_smallest_ef_and_climbs_rungs_deterministically() {
        let p = plan(40);
        let (log, builds) = go(&p).await;
        assert_eq!(go(&p).await.0, log, "same plan, same trials");
        assert!(log.iter().all(|c| c.seed == Some(7)));
        // Rung 1 builds every m at the cheapest ef_construction, then at most 2 per rung.
        assert_eq!(&builds[..3], &[(8, 40), (16, 40), (32, 40)]);
        assert!(builds.len() <= 3 + 2 + 2, "{builds:?}");
        // For every graph measured, the smallest ladder ef_search reaching the target was found
        // (the one below it was measured and missed, or it is the ladder's first).
        for &(m, ec) in &builds {
            let on: Vec<&HnswConfig> = log
                .iter()
                .filter(|c| c.m == m && c.ef_construction == ec)
                .collect();
            let reached: Vec<u32> = on
                .iter()
                .filter(|c| recall(c) >= 0.95)
                .map(|c| c.ef_search)
                .collect();
            let Some(&best) = reached.iter().min() else {
                continue;
            };
            let below = EF_LADDER
                .iter()
                .position(|&e| e == best)
                .expect("on ladder");
            let truth = EF_LADDER
                .iter()
                .copied()
                .find(|&e| {
                    recall(&HnswConfig {
                        m,
                        ef_construction: ec,
                        ef_search: e,
                        seed: None,
                    }) >= 0.95
                })
                .expect("reachable");
            assert_eq!(best, truth, "m {m} ec {ec}: {on:?} (ladder index {below})");
        }
    }

    #[tokio::test]
    async fn never_exceeds_its_trial_budget() {
        for max in [1, 2, 5, 9, 17] {
            let (log, builds) = go(&plan(max)).await;
            assert!(log.len() as u32 <= max, "{max}: {}", log.len());
            assert!(!log.is_empty());
            // No graph is built without a trial to measure it.
            assert!(builds.len() as u32 <= max, "{max}: {builds:?}");
        }
    }

    #[tokio::test]
    async fn a_time_budget_of_zero_runs_nothing() {
        let mut p = plan(40);
        p.max_time = Some(Duration::ZERO);
        let (log, builds) = go(&p).await;
        assert!(log.is_empty() && builds.is_empty());
    }

    /// The smallest ladder ef_search reaching the target on a (m, ef_construction) graph.
    fn truth(m: u32, ec: u32) -> Option<u32> {
        truth_at(m, ec, 1)
    }

    /// The ef_search values `log` probed on graph (m, ec), and the smallest of them that reached
    /// the target on a landscape `hard` times the easy one's.
    fn probed(log: &[HnswConfig], m: u32, ec: u32, hard: u32) -> (Vec<u32>, Option<u32>) {
        let on: Vec<u32> = log
            .iter()
            .filter(|c| c.m == m && c.ef_construction == ec)
            .map(|c| c.ef_search)
            .collect();
        let found = on
            .iter()
            .copied()
            .filter(|&e| {
                let c = HnswConfig {
                    m,
                    ef_construction: ec,
                    ef_search: e,
                    seed: None,
                };
                recall_at(&c, hard) >= 0.95
            })
            .min();
        (on, found)
    }

    fn truth_at(m: u32, ec: u32, hard: u32) -> Option<u32> {
        EF_LADDER.iter().copied().find(|&e| {
            let c = HnswConfig {
                m,
                ef_construction: ec,
                ef_search: e,
                seed: None,
            };
            recall_at(&c, hard) >= 0.95
        })
    }

    /// On all the points recall needs several times the sample's ef_search (it drops as N
    /// grows): the confirm phase climbs from the hint by 1, 2, 4… steps and still finds each
    /// graph's smallest passing ef_search within its trials; and it confirms the best graph of
    /// another m before a second graph of the best one's m.
    #[tokio::test]
    async fn confirm_climbs_far_above_the_hint_and_hedges_across_m() {
        let p = plan(40);
        let ranked = run(&p, &fake(1)).await.expect("run");
        let first = ranked[0].clone();
        let twin = ranked
            .iter()
            .find(|r| r.m == first.m && r.ef_construction != first.ef_construction)
            .cloned()
            .expect("two graphs of the best m");
        let other = ranked
            .iter()
            .find(|r| r.m != first.m && r.ef_search().is_some())
            .cloned()
            .expect("a graph of another m");
        // A ranking with the twin second (as when the sample's cheapest graphs share an m).
        let mut order = vec![first.clone(), twin.clone()];
        order.extend(
            ranked
                .iter()
                .filter(|r| **r != first && **r != twin)
                .cloned(),
        );
        let full = fake(4);
        confirm(&p, &full, &order, 2, 10.0, Instant::now())
            .await
            .expect("confirm");
        let builds = full.builds.lock().clone();
        assert_eq!(
            builds,
            [
                (first.m, first.ef_construction),
                (other.m, other.ef_construction)
            ]
        );
        let log = full.log.lock().clone();
        for &(m, ec) in &builds {
            let (on, found) = probed(&log, m, ec, 4);
            assert_eq!(found, truth_at(m, ec, 4), "m {m} ec {ec}: {on:?}");
            assert!(found.is_some(), "reachable on the ladder: m {m} ec {ec}");
            assert!(
                on.len() as u32 <= TRIALS_PER_CONFIRM,
                "m {m} ec {ec}: {on:?}"
            );
        }
    }

    /// Multi-fidelity's second phase builds exactly the `n` best graphs of the ranking (best
    /// first), finds each one's smallest ef_search from the hint in a few trials, and keeps its
    /// own trial budget.
    #[tokio::test]
    async fn confirm_builds_the_best_ranked_graphs_and_finds_their_ef_search() {
        let f = fake(1);
        let p = plan(40);
        let ranked = run(&p, &f).await.expect("run");
        assert!(ranked.len() >= 3);
        assert!(ranked
            .windows(2)
            .all(|w| w[0].cost() <= w[1].cost() || w[1].ef_search().is_none()));
        let f2 = fake(1);
        confirm(&p, &f2, &ranked, 2, 10.0, Instant::now())
            .await
            .expect("confirm");
        let builds = f2.builds.lock().clone();
        let best: Vec<(u32, u32)> = ranked[..2]
            .iter()
            .map(|r| (r.m, r.ef_construction))
            .collect();
        assert_eq!(builds, best);
        let log = f2.log.lock().clone();
        for &(m, ec) in &builds {
            let (on, found) = probed(&log, m, ec, 1);
            assert_eq!(found, truth(m, ec), "m {m} ec {ec}: {on:?}");
            // From the sample's hint (the same landscape here): the hint and the step below.
            assert!(on.len() <= 2, "m {m} ec {ec}: {on:?}");
        }
        // Its own budget.
        let f3 = fake(1);
        let mut small = plan(1);
        small.max_trials = 1;
        confirm(&small, &f3, &ranked, 2, 10.0, Instant::now())
            .await
            .expect("confirm");
        assert_eq!(f3.log.lock().len(), 1);
        assert_eq!(
            f3.builds.lock().len(),
            1,
            "no graph built without a trial for it"
        );
    }

    #[test]
    fn sample_size_is_automatic_for_big_indexes_and_off_when_asked() {
        let mut p = plan(40);
        p.sample_points = None;
        assert_eq!(p.sample_size(10_000), None);
        assert_eq!(p.sample_size(100_000), Some(20_000));
        assert_eq!(p.sample_size(1_000_000), Some(100_000));
        p.sample_points = Some(0);
        assert_eq!(p.sample_size(1_000_000), None);
        p.sample_points = Some(5_000);
        assert_eq!(
            p.sample_size(3_000),
            None,
            "a sample as big as the index is no sample"
        );
        assert_eq!(p.sample_size(30_000), Some(5_000));
    }
}
