//! The findability check (docs/scale.md, "Every point can be found"): in the time an index's
//! indexer has nothing to link, passes over the active graph search for each live point by its
//! own vector at the index's ef_search, as a search of the index runs it, and give each point
//! that search does not find first a link from a point the search expanded
//! ([`Generation::check_found`]). HNSW graphs leave a share of such points however they are
//! built (a few in a hundred of points unlike the rest of the data, at m 16); a check's link
//! does not remove another (unless every list the search expanded is full), so one pass leaves
//! the graph finding nearly every point, and a second, run when the first linked any, the rest.
//!
//! # Invariants
//! - Linking has priority: a step of a pass runs only when the fresh segment is empty, and a
//!   write arriving during a step stops it after its current point (the pass resumes where it
//!   stopped once the writes are linked).
//! - A step runs on the check's own threads (a rayon pool, one a core, shared by every index)
//!   at the lowest CPU priority (`SCHED_IDLE`, and nice 19): searches, linking and gRPC take
//!   the cores first; each thread checks its own [`CHECK_IDS`] ids. It holds no lock while it
//!   searches, and the linker's lock only while it adds a link (so a snapshot never copies a
//!   list being changed).
//! - A pass starts when points were linked since the last pass began: at once when they are
//!   at least [`CHECK_SHARE`] (10 %) of the graph (and for every new generation: a start, an
//!   activation, a compaction), else once no point has been linked for [`CHECK_AFTER`]. So
//!   steady writes cost about 10 searches per point written (up to 60 with follow-ups), and a
//!   trickle of writes does not make it search the whole graph again and again.
//! - A pass that linked points is followed by another, up to [`MAX_FOLLOW_UPS`]: a link can
//!   turn another point's search (rarely); a pass that links none ends the series. Only a
//!   series whose last pass linked none leaves the graph's points checked: a series cut off at
//!   the bound counts the points its last pass linked as unchecked, and another series runs
//!   [`CHECK_AFTER`] later, or with the next points linked (by the rules above).
//! - Engines that cannot add links (hnsw_rs) are never checked.
//! - A pass's links reach disk with the index's next snapshot: a series of passes that linked
//!   points, or left every point of the graph checked, asks for one
//!   ([`IndexCheck::series_to_save`]). A snapshot whose points had all been checked when it was
//!   copied ([`IndexCheck::checked_through`]) is recorded as checked, and a start that loads it
//!   counts only the points linked after as unchecked, so a restart does not check the whole
//!   graph again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use tokio::sync::oneshot;

use crate::index::generation::CheckStep;
use crate::index::Generation;

/// Internal ids each thread of a step of a pass checks (at most 256 searches: up to about
/// 25-60 ms of a core at ef_search 64-200).
pub const CHECK_IDS: usize = 256;

/// Points linked since the last pass began, as a share of the graph, that start a pass at once
/// (one in ten: a pass searches for every point of the graph).
pub const CHECK_SHARE: u64 = 10;

/// Fewer points than that start a pass once no point has been linked for this long.
pub const CHECK_AFTER: Duration = Duration::from_secs(300);

/// Passes that follow a pass that linked points (without new writes). On the hard graph of
/// `index::native::tests::a_series_of_checks_leaves_every_point_found_first` (m 8, ef_search
/// 8) every series ended within 3 follow-ups: 100 seeds on one thread, and 200 runs with
/// inserts and checks on 2 threads.
pub const MAX_FOLLOW_UPS: u32 = 5;

/// An index's check counters (GetIndex's `findability_check`, the metrics).
#[derive(Default)]
pub struct IndexCheck {
    running: AtomicBool,
    passes: AtomicU64,
    points_linked: AtomicU64,
    last_pass_missed: AtomicU64,
    last_ms: AtomicU64,
    unchecked: AtomicU64,
    /// The generation the check follows, and how many of its first points the check has
    /// checked, every one (a pass series ended with none linked after its last pass began, or
    /// the generation was loaded from a checked snapshot); 0: not known.
    checked: parking_lot::Mutex<(Weak<Generation>, usize)>,
    /// Pass series whose end asks for a snapshot ([`IndexCheck::series_to_save`]).
    series_to_save: AtomicU64,
}

/// A copy of an index's check counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckStats {
    /// A pass is in progress.
    pub running: bool,
    /// Passes completed since the server started.
    pub passes: u64,
    /// Points a pass linked so that a search finds them, since the server started.
    pub points_linked: u64,
    /// Points the last completed pass could not make found first.
    pub last_pass_missed: u64,
    /// When the last pass completed (ms since the epoch; 0: none since start).
    pub last_ms: u64,
    /// Points linked into the active graph since the last pass began.
    pub unchecked: u64,
}

impl IndexCheck {
    /// How many of `gen`'s first points the check has checked whole (so a snapshot of exactly
    /// those points is recorded as checked); None if not known for `gen`.
    pub fn checked_through(&self, gen: &Arc<Generation>) -> Option<usize> {
        let checked = self.checked.lock();
        (Weak::ptr_eq(&checked.0, &Arc::downgrade(gen)) && checked.1 > 0).then_some(checked.1)
    }

    /// Pass series, since the server started, whose end asks for a snapshot: they linked points
    /// (which reach disk with the next snapshot), or left every point checked (which a
    /// snapshot then records).
    pub fn series_to_save(&self) -> u64 {
        self.series_to_save.load(Ordering::Acquire)
    }

    fn set_checked(&self, gen: &Arc<Generation>, points: usize) {
        *self.checked.lock() = (Arc::downgrade(gen), points);
    }

    pub fn stats(&self) -> CheckStats {
        CheckStats {
            running: self.running.load(Ordering::Acquire),
            passes: self.passes.load(Ordering::Acquire),
            points_linked: self.points_linked.load(Ordering::Acquire),
            last_pass_missed: self.last_pass_missed.load(Ordering::Acquire),
            last_ms: self.last_ms.load(Ordering::Acquire),
            unchecked: self.unchecked.load(Ordering::Acquire),
        }
    }
}

/// The indexer's check state for one index (its own task's; the counters it shows are in
/// [`IndexCheck`]).
pub(super) struct Checker {
    /// The generation it follows (a new one starts over; weak, so its address is not reused
    /// while followed).
    generation: Weak<Generation>,
    /// Points linked since the last pass began.
    unchecked: u64,
    /// The running pass: the internal id its next step starts from.
    cursor: Option<usize>,
    /// The running pass's links and misses so far.
    linked: u64,
    missed: u64,
    /// The running series' links (its passes so far).
    series_linked: u64,
    /// Passes run since the last new points (follow-ups).
    follow_ups: u32,
    /// When the indexer last linked points.
    last_linked: Instant,
    /// A series of passes cut off at [`MAX_FOLLOW_UPS`]: no pass for what it left before then
    /// (unless points are linked meanwhile).
    retry_at: Option<Instant>,
}

impl Checker {
    pub(super) fn new() -> Self {
        Checker {
            generation: Weak::new(),
            unchecked: 0,
            cursor: None,
            linked: 0,
            missed: 0,
            series_linked: 0,
            follow_ups: 0,
            last_linked: Instant::now(),
            retry_at: None,
        }
    }

    /// Follows the active generation `gen`: a new one is checked whole (if its engine can
    /// link: [`Generation::checks_found`]), but for the points of a checked snapshot it was
    /// loaded from ([`Generation::loaded_checked`]).
    pub(super) fn follow(&mut self, gen: &Arc<Generation>, shown: &IndexCheck) {
        if !Weak::ptr_eq(&self.generation, &Arc::downgrade(gen)) {
            self.generation = Arc::downgrade(gen);
            self.cursor = None;
            self.follow_ups = 0;
            self.series_linked = 0;
            self.retry_at = None;
            let (unchecked, checked) = if gen.checks_found() {
                let loaded = gen.loaded_checked().unwrap_or(0);
                (gen.linked_count().saturating_sub(loaded) as u64, loaded)
            } else {
                (0, 0)
            };
            self.unchecked = unchecked;
            shown.set_checked(gen, checked);
            shown.running.store(false, Ordering::Release);
            shown.unchecked.store(self.unchecked, Ordering::Release);
        }
    }

    /// Gives up the running pass and what is unchecked (a step could not run); points
    /// linked later start a pass again.
    pub(super) fn abandon(&mut self, shown: &IndexCheck) {
        self.cursor = None;
        self.unchecked = 0;
        shown.running.store(false, Ordering::Release);
        shown.unchecked.store(0, Ordering::Release);
    }

    /// Counts points the indexer linked into `gen`.
    pub(super) fn linked(&mut self, gen: &Generation, n: usize, shown: &IndexCheck) {
        if !gen.checks_found() {
            return;
        }
        self.unchecked += n as u64;
        self.follow_ups = 0;
        self.last_linked = Instant::now();
        self.retry_at = None;
        shown.unchecked.store(self.unchecked, Ordering::Release);
    }

    /// When a pass is due on `gen`: now (Some(None)), at a time (Some(Some(t))), or never
    /// without new points (None).
    pub(super) fn due(&self, gen: &Generation) -> Option<Option<Instant>> {
        if self.cursor.is_some() {
            return Some(None);
        }
        if self.unchecked == 0 {
            return None;
        }
        if let Some(at) = self.retry_at.filter(|&at| at > Instant::now()) {
            return Some(Some(at));
        }
        if self.unchecked.saturating_mul(CHECK_SHARE) >= gen.linked_count() as u64 {
            return Some(None);
        }
        let at = self.last_linked + CHECK_AFTER;
        Some((at > Instant::now()).then_some(at))
    }

    /// Where the next step starts, beginning a pass if none runs.
    pub(super) fn begin(&mut self, shown: &IndexCheck) -> usize {
        if self.cursor.is_none() {
            self.cursor = Some(0);
            self.unchecked = 0;
            self.linked = 0;
            self.missed = 0;
            shown.unchecked.store(0, Ordering::Release);
            shown.running.store(true, Ordering::Release);
        }
        self.cursor.unwrap_or(0)
    }

    /// Records a step's outcome over `gen`; at the end of a pass, starts a follow-up if it
    /// linked points. True when a series of passes ended that asks for a snapshot
    /// ([`IndexCheck::series_to_save`]).
    pub(super) fn stepped(
        &mut self,
        step: CheckStep,
        gen: &Arc<Generation>,
        shown: &IndexCheck,
    ) -> bool {
        self.linked += step.linked as u64;
        self.missed += step.missed as u64;
        if step.linked > 0 {
            // A link may turn another point's search: checked again only once a pass links
            // none.
            shown.set_checked(gen, 0);
        }
        shown
            .points_linked
            .fetch_add(step.linked as u64, Ordering::AcqRel);
        if !step.done {
            self.cursor = Some(step.next);
            return false;
        }
        shown.passes.fetch_add(1, Ordering::AcqRel);
        shown.last_pass_missed.store(self.missed, Ordering::Release);
        shown
            .last_ms
            .store(crate::model::now_millis(), Ordering::Release);
        self.cursor = None;
        self.series_linked += self.linked;
        if self.linked > 0 && self.follow_ups < MAX_FOLLOW_UPS {
            self.follow_ups += 1;
            self.begin(shown);
            return false;
        }
        shown.running.store(false, Ordering::Release);
        // No point linked since the last pass began (the indexer counts a batch it links
        // before any step runs again), and the last pass changed no list: the graph's points
        // so far are all checked. (A pass cut off at the bound of follow-ups may have turned
        // another point's search.)
        let all_checked = self.unchecked == 0 && self.linked == 0;
        if self.linked > 0 {
            // Cut off at the bound: another series, after CHECK_AFTER (or once points are
            // linked), however many it leaves.
            self.unchecked += self.linked;
            self.follow_ups = 0;
            self.retry_at = Some(Instant::now() + CHECK_AFTER);
            shown.unchecked.store(self.unchecked, Ordering::Release);
        }
        if all_checked {
            shown.set_checked(gen, gen.linked_count());
        }
        let save = std::mem::take(&mut self.series_linked) > 0 || all_checked;
        if save {
            shown.series_to_save.fetch_add(1, Ordering::AcqRel);
        }
        save
    }
}

/// The threads steps run on: one a core, at the lowest priority from their start (a rayon pool,
/// so a step starts no thread). None if it could not be made.
fn pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .thread_name(|_| "vectord-check".into())
            .start_handler(|_| lowest_priority())
            .build()
            .map_err(|e| tracing::warn!("findability check: no threads: {e}"))
            .ok()
    })
    .as_ref()
}

/// Runs one step of a pass over `gen` from internal id `from`: on each thread of the check's
/// pool (one a core, lowest priority), its own [`CHECK_IDS`] ids; `stop` ends each part after
/// its current point. None if the pool could not be made.
pub(super) async fn step(
    gen: Arc<Generation>,
    from: usize,
    stop: Arc<AtomicBool>,
) -> Option<CheckStep> {
    let pool = pool()?;
    let (tx, rx) = oneshot::channel();
    // One job reads the id map once; its parts run on the pool's threads.
    pool.spawn(move || {
        let view = gen.check_view();
        let stop = || stop.load(Ordering::Acquire);
        let parts: Vec<(usize, CheckStep)> = (0..rayon::current_num_threads().max(1))
            .into_par_iter()
            .map(|t| {
                let start = from + t * CHECK_IDS;
                (
                    start,
                    gen.check_found(&view, start, start + CHECK_IDS, &stop),
                )
            })
            .collect();
        let _ = tx.send(parts);
    });
    let parts = rx.await.ok()?;
    // The step resumes from the first part that did not finish (the parts after it are
    // checked again then); when all finished, after the last.
    let mut merged = CheckStep {
        next: from,
        ..CheckStep::default()
    };
    let mut stopped_at: Option<usize> = None;
    for (start, part) in parts {
        merged.checked += part.checked;
        merged.linked += part.linked;
        merged.missed += part.missed;
        merged.next = merged.next.max(part.next);
        merged.done |= part.done;
        if !part.done && part.next < start + CHECK_IDS {
            stopped_at = Some(stopped_at.map_or(part.next, |s| s.min(part.next)));
        }
    }
    if let Some(at) = stopped_at {
        merged.next = at;
        merged.done = false;
    }
    Some(merged)
}

/// Gives the calling thread the lowest CPU priority: Linux's `SCHED_IDLE` policy (it runs only
/// on a core nothing else wants, and a waking thread of any other policy preempts it at once),
/// and nice 19 should the policy be refused. Nice 19 alone is not enough: under the kernel's
/// fair scheduler a nice-19 thread keeps a core for its slice (milliseconds) once it has it, so
/// the threads of a search batch, each waiting on the slowest, lost about half their
/// throughput to a pass (bench `scale`, `VECTORD_SCALE_PHASES=qps`: 0.49-0.66x at 300k).
/// Lowering a thread's priority needs no privilege. A no-op elsewhere.
fn lowest_priority() {
    low_priority();
    #[cfg(target_os = "linux")]
    // SAFETY: sched_setscheduler with this thread's id changes only this thread's policy;
    // `param` outlives the call.
    unsafe {
        let tid = libc::gettid();
        let param = libc::sched_param { sched_priority: 0 };
        if libc::sched_setscheduler(tid, libc::SCHED_IDLE, &param) != 0 {
            tracing::debug!(
                error = %std::io::Error::last_os_error(),
                "findability check: SCHED_IDLE refused; the check's threads run at nice 19"
            );
        }
    }
}

/// Gives the calling thread nice 19, where the scheduler gives it about a seventieth of a core
/// against a thread at nice 0: for work that nothing waits for but that must still end on a
/// busy node (a background snapshot's file, after its copies). The thread cannot get its
/// priority back without privileges: only for a thread that ends with the work.
pub(super) fn low_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority with this thread's id changes only this thread's nice value.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::engine::{EngineKind, EngineMemory};
    use crate::model::{GenerationMeta, HnswConfig, Metric, Point};

    fn generation(kind: EngineKind, n: u64) -> Arc<Generation> {
        Arc::new(built(kind, n))
    }

    fn built(kind: EngineKind, n: u64) -> Generation {
        let meta = GenerationMeta {
            config: HnswConfig {
                m: 8,
                ef_construction: 32,
                ef_search: 16,
                seed: None,
            },
            ..super::super::tests::first_meta()
        };
        let points = (0..n)
            .map(|id| Point {
                id,
                vector: vec![id as f32, (id % 7) as f32],
            })
            .collect();
        Generation::build(
            kind,
            &EngineMemory::IN_RAM,
            Metric::L2,
            2,
            meta,
            points,
            &|| false,
        )
        .expect("build")
    }

    /// A pass is due on `gen` about [`CHECK_AFTER`] from now, not at once or never.
    fn assert_due_later(c: &Checker, gen: &Generation, what: &str) {
        match c.due(gen) {
            Some(Some(at)) => assert!(at > Instant::now() + CHECK_AFTER / 2, "{what}"),
            other => panic!("{what}: expected a pass later, got {other:?}"),
        }
    }

    fn done(linked: usize) -> CheckStep {
        CheckStep {
            next: 1000,
            checked: 1000,
            linked,
            missed: 0,
            done: true,
        }
    }

    /// When passes start: a new generation at once; a pass that linked points is followed by
    /// another, up to [`MAX_FOLLOW_UPS`] (a series cut off there runs again later); then fewer
    /// new points than 10 % of the graph wait until none has been linked for [`CHECK_AFTER`],
    /// 10 % or more start one at once; an engine that cannot link is never checked.
    #[test]
    fn passes_start_by_the_rules() {
        let shown = IndexCheck::default();
        let gen = generation(EngineKind::NativeI8, 1000);
        let mut c = Checker::new();
        c.follow(&gen, &shown);
        assert_eq!(shown.stats().unchecked, 1000);
        assert_eq!(c.due(&gen), Some(None), "a new generation: at once");
        assert_eq!(c.begin(&shown), 0);
        assert!(shown.stats().running);
        // A step part way, then the end of a pass that linked points: a follow-up starts.
        let ended = c.stepped(
            CheckStep {
                next: 512,
                checked: 512,
                linked: 3,
                missed: 0,
                done: false,
            },
            &gen,
            &shown,
        );
        assert!(!ended);
        assert_eq!(c.begin(&shown), 512, "the pass goes on where it was");
        assert!(
            !c.stepped(done(1), &gen, &shown),
            "a follow-up, not the series' end"
        );
        let s = shown.stats();
        assert_eq!((s.passes, s.points_linked, s.running), (1, 4, true));
        assert_eq!(
            shown.checked_through(&gen),
            None,
            "not checked before a series ends"
        );
        assert_eq!(c.begin(&shown), 0, "a follow-up pass from the start");
        assert!(!c.stepped(done(2), &gen, &shown));
        // The series ends with a pass that linked none: its links are for the next snapshot,
        // and the graph's points are all checked.
        assert!(c.stepped(done(0), &gen, &shown));
        let s = shown.stats();
        assert_eq!((s.passes, s.running, s.unchecked), (3, false, 0));
        assert_eq!(shown.series_to_save(), 1);
        assert_eq!(shown.checked_through(&gen), Some(1000));
        assert_eq!(c.due(&gen), None, "nothing new: no pass");
        // 50 new points of 1,000: after CHECK_AFTER; 100 or more: at once.
        c.linked(&gen, 50, &shown);
        assert_eq!(shown.stats().unchecked, 50);
        assert_due_later(&c, &gen, "50 new points of 1,000");
        c.linked(&gen, 50, &shown);
        assert_eq!(c.due(&gen), Some(None));
        c.begin(&shown);
        // Points linked while the pass runs: checked by none yet, so what is checked stays,
        // and a series without links that leaves points unchecked asks for no snapshot.
        c.linked(&gen, 5, &shown);
        assert!(!c.stepped(done(0), &gen, &shown), "a series without links");
        let s = shown.stats();
        assert_eq!((s.passes, s.running, s.unchecked), (4, false, 5));
        assert_eq!(shown.series_to_save(), 1);
        assert_eq!(shown.checked_through(&gen), Some(1000));
        // One without links that leaves every point checked asks for one (to record that).
        c.begin(&shown);
        assert!(c.stepped(done(0), &gen, &shown));
        assert_eq!(shown.series_to_save(), 2);
        // A series whose every pass links points ends after MAX_FOLLOW_UPS follow-ups, its
        // graph not checked: the last pass's links count as unchecked, for a series later.
        c.linked(&gen, 100, &shown);
        c.begin(&shown);
        for _ in 0..MAX_FOLLOW_UPS {
            assert!(!c.stepped(done(3), &gen, &shown));
            assert_eq!(shown.checked_through(&gen), None);
        }
        assert!(
            c.stepped(done(3), &gen, &shown),
            "its links are for a snapshot"
        );
        let s = shown.stats();
        assert_eq!((s.passes, s.running, s.unchecked), (11, false, 3));
        assert_eq!(shown.checked_through(&gen), None);
        assert_eq!(shown.series_to_save(), 3);
        assert_due_later(&c, &gen, "a series cut off");
        // Or sooner, with points linked by the usual rules; that series has its own
        // follow-ups, and ends checked when a pass links none.
        c.linked(&gen, 100, &shown);
        assert_eq!(c.due(&gen), Some(None));
        c.begin(&shown);
        assert!(!c.stepped(done(1), &gen, &shown), "a follow-up");
        assert!(c.stepped(done(0), &gen, &shown));
        assert_eq!(shown.checked_through(&gen), Some(1000));
        // A new generation starts over.
        let next = generation(EngineKind::NativeI8, 300);
        c.follow(&next, &shown);
        assert_eq!((c.due(&next), shown.stats().unchecked), (Some(None), 300));
        assert_eq!(shown.checked_through(&gen), None);
        assert_eq!(shown.checked_through(&next), None);
        // One loaded from a checked snapshot: only the points linked after it are unchecked.
        let mut loaded = built(EngineKind::NativeI8, 400);
        loaded.mark_loaded_checked();
        let loaded = Arc::new(loaded);
        c.follow(&loaded, &shown);
        assert_eq!((c.due(&loaded), shown.stats().unchecked), (None, 0));
        assert_eq!(shown.checked_through(&loaded), Some(400));
        // hnsw_rs: never.
        let other = generation(EngineKind::HnswRs, 300);
        c.follow(&other, &shown);
        c.linked(&other, 300, &shown);
        assert_eq!(c.due(&other), None);
    }

    /// A step over a real generation reaches its end and checks every point.
    #[tokio::test]
    async fn a_step_checks_every_point() {
        let gen = generation(EngineKind::NativeI8, 700);
        let mut from = 0;
        let mut checked = 0;
        loop {
            let s = step(gen.clone(), from, Arc::new(AtomicBool::new(false)))
                .await
                .expect("threads");
            checked += s.checked;
            from = s.next;
            if s.done {
                break;
            }
        }
        assert_eq!(checked, 700);
        // A stopped step resumes where it stopped.
        let s = step(gen.clone(), 0, Arc::new(AtomicBool::new(true)))
            .await
            .expect("threads");
        assert_eq!((s.next, s.checked, s.done), (0, 0, false));
        // The steps' threads run at the lowest priority: SCHED_IDLE, and nice 19.
        #[cfg(target_os = "linux")]
        {
            let (nice, policy) = pool().expect("pool").install(|| {
                // SAFETY: getpriority and sched_getscheduler read this thread's nice value
                // and policy.
                unsafe {
                    let tid = libc::gettid();
                    (
                        libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t),
                        libc::sched_getscheduler(tid),
                    )
                }
            });
            assert_eq!((nice, policy), (19, libc::SCHED_IDLE));
        }
    }
}
