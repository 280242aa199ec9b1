//! Persisted generations: the catalog's side of snapshot files (the file format is
//! `index::snapshot`'s).
//!
//! Invariants:
//! - An index record names a snapshot file only once the file is complete and durable (written,
//!   fsynced, renamed, directory fsynced), and the record is written in one sled write with the
//!   generation it holds, so a crash leaves either the old generation and its file or the new
//!   ones.
//! - The file holds the generation as it was at write sequence `seq` (the index's data version);
//!   every later acknowledged write is in the store's change log, which is trimmed only up to the
//!   recorded snapshot's sequence. A start loads the file and replays the log; if anything
//!   disagrees (file missing, short, corrupt, of another format version or engine; a gap in the
//!   log; a live-point count unlike the store's) it logs why and rebuilds from the store, which
//!   stays the source of truth.
//! - Files of an index other than the recorded one are removed once the record moves on,
//!   except files of a newer generation (one being built or awaiting its record): disk use per
//!   index is the active snapshot plus the one being written. Files of deleted indexes and temp
//!   files left by a crash are swept at start.
//! - A snapshot of the same generation at the same sequence (nothing written since: only the
//!   findability check's links are new) has the recorded file's name and replaces it by the
//!   rename: either file is the generation at that sequence, so a crash on either side of the
//!   rename or of the record's write leaves a valid pair. The record's `checked` only says
//!   whether a start checks the loaded graph again.

use std::collections::HashSet;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::index::engine::{EngineKind, EngineMemory};
use crate::index::snapshot;
use crate::index::Generation;
use crate::model::Point;
use crate::store::{Change, Counts, IndexRecord, SnapshotRef, Store};

/// A generation is snapshotted again in the background once the points upserted and deleted
/// since its last snapshot reach this share of its points (and at least
/// [`RESNAPSHOT_MIN_CHANGES`]), so the change log a start replays stays a bounded share of the
/// index: an index filled by upserts alone, never activated, gets snapshots as it grows (at
/// 1.25x, 1.56x, ... its size, so about 5x its final size is written in all).
pub const RESNAPSHOT_SHARE: f64 = 0.25;
pub const RESNAPSHOT_MIN_CHANGES: u64 = 10_000;

/// Whether `changed` points changed since the last snapshot of a generation of `points` points
/// call for a new one.
pub fn resnapshot_due(changed: u64, points: u64) -> bool {
    changed >= RESNAPSHOT_MIN_CHANGES.max((points as f64 * RESNAPSHOT_SHARE) as u64)
}

/// Default of `--snapshot-idle-secs`: an index whose writes have stopped for this long, with
/// changes since its snapshot, is snapshotted in the background.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(5);

/// A background snapshot that is not due to [`resnapshot_due`] (an import's end, writes gone
/// quiet, a start's replay) starts no sooner than this after the index's previous background
/// snapshot ended, nor sooner than [`SPACING_PER_SNAPSHOT_TIME`] times that snapshot's duration:
/// an index that takes a small write every few seconds spends at most about a tenth of its
/// time writing snapshots.
pub const MIN_SPACING: Duration = Duration::from_secs(30);
pub const SPACING_PER_SNAPSHOT_TIME: u32 = 10;

/// A start that replayed at least this many points ([`replay_calls_for_snapshot`]), and a
/// shutdown with at least this many points changed since the snapshot, write a new snapshot
/// (after SERVING, or before the process exits), so the next start does not replay them again.
pub const REPLAY_SNAPSHOT_MIN_POINTS: u64 = 1_000;

/// Whether a start that replayed `replayed` points of an index of `points` points (or a
/// shutdown with that many points changed since the snapshot) should write a snapshot: at
/// least [`REPLAY_SNAPSHOT_MIN_POINTS`] and at least 1% of the index (a snapshot writes the
/// whole index; replaying a point costs about what inserting it in a build does).
pub fn replay_calls_for_snapshot(replayed: u64, points: u64) -> bool {
    replayed >= REPLAY_SNAPSHOT_MIN_POINTS && replayed.saturating_mul(100) >= points
}

/// What the background snapshot policy knows of one index when it decides.
#[derive(Clone, Copy, Debug)]
pub struct SnapshotState {
    /// Points upserted and deleted since the active generation's snapshot.
    pub changed: u64,
    /// Live points.
    pub points: u64,
    /// An import ended, or a start replayed enough ([`replay_calls_for_snapshot`]), since the
    /// last snapshot: snapshot without waiting for writes to stop.
    pub requested: bool,
    /// Since the index's last acknowledged write.
    pub since_write: Duration,
    /// Since the index's last background snapshot ended, and how long it took; None if none
    /// ran since the server started.
    pub last: Option<(Duration, Duration)>,
    /// `--snapshot-idle-secs` (None: writes going quiet never call for a snapshot).
    pub idle: Option<Duration>,
    /// A series of the findability check's passes ended since the last snapshot, having linked
    /// points (links no file holds) or checked every point (which no record says).
    pub check_done: bool,
}

/// When to snapshot an index in the background: `Some(ZERO)` now, `Some(wait)` not before
/// `wait` from now (decide again then, or at the next write), None not until something
/// changes. The rules, in order:
/// 1. nothing changed since the snapshot: None, unless a series of the findability check's
///    passes ended (`check_done`): then now, spaced ([`MIN_SPACING`]) from the previous
///    background snapshot;
/// 2. the changes reach [`resnapshot_due`]'s share: now;
/// 3. an import ended or a start replayed enough (`requested`): now, spaced likewise;
/// 4. writes stopped `idle` ago: then, spaced likewise; None without `idle`.
pub fn next_snapshot(s: SnapshotState) -> Option<Duration> {
    if s.changed == 0 && !s.check_done {
        return None;
    }
    if resnapshot_due(s.changed, s.points) {
        return Some(Duration::ZERO);
    }
    let spaced = s.last.map_or(Duration::ZERO, |(since, took)| {
        MIN_SPACING
            .max(took.saturating_mul(SPACING_PER_SNAPSHOT_TIME))
            .saturating_sub(since)
    });
    if s.requested || s.changed == 0 {
        return Some(spaced);
    }
    let quiet = s.idle?.saturating_sub(s.since_write);
    Some(quiet.max(spaced))
}

/// How a start got an index's generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restored {
    /// Loaded from its snapshot file, with this many logged writes replayed, touching this
    /// many points.
    Snapshot { replayed: usize, points: u64 },
    /// Rebuilt from the store's points.
    Rebuilt,
}

/// Writes `gen` (not yet published, so nothing writes to it) as the snapshot of index `uid` at
/// write sequence `seq`, under generation number `number`. Blocking. None (logged) when the
/// engine cannot snapshot or the write fails: the generation is then rebuilt at start.
pub fn save(
    store: &Store,
    gen: &Generation,
    uid: u64,
    number: u64,
    seq: u64,
    pause: Option<std::time::Duration>,
) -> Option<SnapshotRef> {
    if !gen.can_save() {
        tracing::debug!(engine = %gen.kind, "engine without snapshots: this generation is rebuilt at start");
        return None;
    }
    let started = std::time::Instant::now();
    let file = snapshot::file_name(uid, number, seq);
    match gen.save(&snapshot::dir(store.dir()), &file, uid, seq, pause) {
        Ok(()) => {
            tracing::info!(
                file,
                millis = started.elapsed().as_millis() as u64,
                "wrote generation snapshot"
            );
            Some(SnapshotRef {
                file,
                seq,
                checked: false,
            })
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot write a generation snapshot: it will be rebuilt at start");
            None
        }
    }
}

/// The generation number in a snapshot file's name.
fn generation_of(name: &str) -> Option<u64> {
    name.split('-').nth(1)?.parse().ok()
}

/// After `rec` is durable: removes the index's other snapshot files (but not those of newer
/// generations, still being written or recorded) and trims its change log up to the recorded
/// sequence. Blocking; failures are logged (leftovers are swept later).
pub fn after_recorded(store: &Store, rec: &IndexRecord, seq: u64) {
    let number = rec.generation.number;
    let keep = rec.snapshot.as_ref().map(|s| s.file.as_str());
    snapshot::prune(store.dir(), Some(rec.meta.uid), &|name| {
        Some(name) == keep || generation_of(name).is_some_and(|g| g > number)
    });
    if let Err(e) = store.trim_changes(rec.meta.uid, seq) {
        tracing::warn!(index = %rec.meta.name, error = %e, "cannot trim the change log");
    }
}

/// Removes every snapshot file of an index (deleted). Blocking.
pub fn remove_all(store: &Store, uid: u64) {
    snapshot::prune(store.dir(), Some(uid), &|_| false);
}

/// Removes snapshot files that no record names: of deleted indexes, of generations that never
/// became active, and temp files of writes a crash interrupted. Blocking.
pub fn sweep(store: &Store, records: &[IndexRecord]) -> usize {
    let named: HashSet<&str> = records
        .iter()
        .filter_map(|r| r.snapshot.as_ref().map(|s| s.file.as_str()))
        .collect();
    snapshot::prune(store.dir(), None, &|name| named.contains(name))
}

/// The index's generation at start: its snapshot plus the logged writes after it, or (logged
/// why) a rebuild from the store's points, which then writes a snapshot and records it. `kind`
/// is the index's engine: a snapshot of another engine is rebuilt. Blocking.
pub fn restore(
    store: &Store,
    rec: &mut IndexRecord,
    kind: EngineKind,
    memory: &EngineMemory,
    cancelled: &dyn Fn() -> bool,
    pause: Option<std::time::Duration>,
) -> Result<(Generation, Counts, Restored)> {
    let counts = store.counts(rec.meta.uid)?;
    if let Some(snap) = rec.snapshot.clone() {
        match load(store, rec, &snap, counts, kind, memory, cancelled) {
            Ok((gen, replayed, points)) => {
                return Ok((gen, counts, Restored::Snapshot { replayed, points }))
            }
            Err(e @ Error::Cancelled(_)) => return Err(e),
            Err(e) => tracing::warn!(
                index = %rec.meta.name,
                file = snap.file,
                error = %e,
                "cannot use the generation's snapshot: rebuilding it from the store"
            ),
        }
    }
    let points = store.load_points(rec.meta.uid)?;
    let gen = Generation::build(
        kind,
        memory,
        rec.meta.metric,
        rec.meta.dimension,
        rec.generation.clone(),
        points,
        cancelled,
    )?;
    // The store's points are the generation at the current data version.
    let seq = counts.data_version;
    let old = rec.snapshot.take();
    rec.snapshot = save(store, &gen, rec.meta.uid, rec.generation.number, seq, pause);
    if rec.snapshot != old {
        store.put_index(rec)?;
        store.flush_blocking()?;
    }
    after_recorded(store, rec, seq);
    Ok((gen, counts, Restored::Rebuilt))
}

/// Loads the recorded snapshot and replays the change log after it; checks the result against
/// the store's counts.
fn load(
    store: &Store,
    rec: &IndexRecord,
    snap: &SnapshotRef,
    counts: Counts,
    kind: EngineKind,
    memory: &EngineMemory,
    cancelled: &dyn Fn() -> bool,
) -> Result<(Generation, usize, u64)> {
    let uid = rec.meta.uid;
    let path = snapshot::dir(store.dir()).join(&snap.file);
    let mut gen = Generation::load(
        &path,
        uid,
        snap.seq,
        rec.meta.metric,
        rec.meta.dimension,
        kind,
        memory,
    )?;
    if gen.meta.config != rec.generation.config {
        return Err(Error::Corrupt(format!(
            "the snapshot's config ({}) is not the recorded generation's ({})",
            gen.meta.config, rec.generation.config
        )));
    }
    gen.meta = rec.generation.clone();
    if snap.checked {
        gen.mark_loaded_checked();
    }
    let (replayed, points) = replay(store, &gen, uid, snap.seq, counts, cancelled)?;
    let live = gen.live_count() as u64;
    if live != counts.point_count {
        return Err(Error::Corrupt(format!(
            "{live} live points after replaying the change log, the store holds {}",
            counts.point_count
        )));
    }
    Ok((gen, replayed, points))
}

/// What the logged writes after `after`, up to `upto`, did to the index, as the store holds it
/// now: the points they touched that are stored (with their current vectors) and the ids they
/// touched that are gone. Applied to a graph of the points at `after`, they give the graph of
/// the points at `upto` (when the store is at `upto`: read it under the writer lock). Errors
/// when the log does not run without a gap from `after` to `upto` (trimmed past `after` by a
/// later snapshot). Blocking.
pub fn catch_up(
    store: &Store,
    uid: u64,
    after: u64,
    upto: u64,
) -> Result<(Vec<Point>, Vec<u64>, usize)> {
    let touched = touched(store, uid, after, upto)?;
    let mut upserts = Vec::new();
    let mut deletes = Vec::new();
    for id in touched {
        match store.get_point(uid, id)? {
            Some(vector) => upserts.push(Point { id, vector }),
            None => deletes.push(id),
        }
    }
    Ok((upserts, deletes, (upto - after) as usize))
}

/// The ids the logged writes after `after`, up to `upto`, touched (upserted or deleted), each
/// once. Errors when the log does not run without a gap from `after` to `upto`. Blocking.
pub fn touched(store: &Store, uid: u64, after: u64, upto: u64) -> Result<Vec<u64>> {
    let changes = store.changes_since(uid, after)?;
    let mut at = after;
    let mut seen = HashSet::new();
    let mut touched = Vec::new();
    for (seq, change) in &changes {
        if *seq > upto {
            break;
        }
        if *seq != at + 1 {
            return Err(Error::Corrupt(format!(
                "the change log jumps from write {at} to write {seq}"
            )));
        }
        at = *seq;
        let (Change::Upsert(ids) | Change::Delete(ids)) = change;
        touched.extend(ids.iter().copied().filter(|id| seen.insert(*id)));
    }
    if at != upto {
        return Err(Error::Corrupt(format!(
            "the change log ends at write {at}, the store is at write {upto}"
        )));
    }
    Ok(touched)
}

/// Applies [`catch_up`] to `gen`: a graph of the points at `after`.
pub fn apply_catch_up(gen: &Generation, upserts: &[Point], deletes: &[u64]) {
    gen.delete(deletes);
    if !upserts.is_empty() {
        gen.upsert(upserts);
    }
}

/// Applies the logged writes after `after` to `gen`: each id they touched gets its stored
/// vector, or is deleted if the store no longer has it. Checks that the log runs without a gap
/// from `after` to the store's data version. The points are inserted the way a build inserts
/// them ([`Generation::upsert_batch`]: in chunks on every core, stopping at `cancelled`).
fn replay(
    store: &Store,
    gen: &Generation,
    uid: u64,
    after: u64,
    counts: Counts,
    cancelled: &dyn Fn() -> bool,
) -> Result<(usize, u64)> {
    let (upserts, deletes, writes) = catch_up(store, uid, after, counts.data_version)?;
    let points = (upserts.len() + deletes.len()) as u64;
    gen.delete(&deletes);
    gen.upsert_batch(&upserts, cancelled)?;
    Ok((writes, points))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> SnapshotState {
        SnapshotState {
            changed: 10,
            points: 100_000,
            requested: false,
            since_write: Duration::ZERO,
            last: None,
            idle: Some(DEFAULT_IDLE),
            check_done: false,
        }
    }

    #[test]
    fn the_snapshot_rules() {
        let s = |f: &dyn Fn(&mut SnapshotState)| {
            let mut st = state();
            f(&mut st);
            next_snapshot(st)
        };
        let secs = Duration::from_secs;
        // 1. Nothing changed: never, whatever else holds, unless a series of the findability
        // check's passes ended: then now, spaced from the previous background snapshot;
        // with writes too, as the other rules say.
        assert_eq!(s(&|x| (x.changed, x.requested) = (0, true)), None);
        assert_eq!(s(&|x| x.idle = None), None);
        let links = |x: &mut SnapshotState| (x.changed, x.idle, x.check_done) = (0, None, true);
        assert_eq!(s(&links), Some(Duration::ZERO));
        assert_eq!(
            s(&|x| {
                links(x);
                x.last = Some((secs(10), secs(1)));
            }),
            Some(secs(20))
        );
        assert_eq!(s(&|x| x.check_done = true), Some(DEFAULT_IDLE));
        // 2. A quarter of the index changed: now, even while writes go on and right after
        // another snapshot.
        assert_eq!(
            s(&|x| (x.changed, x.last) = (25_000, Some((secs(1), secs(1))))),
            Some(Duration::ZERO)
        );
        // 3. An import ended: now, or once spaced from the previous background snapshot (30 s,
        // or 10x its duration when longer).
        assert_eq!(s(&|x| x.requested = true), Some(Duration::ZERO));
        assert_eq!(
            s(&|x| (x.requested, x.last) = (true, Some((secs(10), secs(1))))),
            Some(secs(20))
        );
        assert_eq!(
            s(&|x| (x.requested, x.last) = (true, Some((secs(10), secs(5))))),
            Some(secs(40))
        );
        assert_eq!(
            s(&|x| (x.requested, x.last) = (true, Some((secs(60), secs(1))))),
            Some(Duration::ZERO)
        );
        // 4. Writes stopped: once they have been quiet for the idle time, spaced likewise;
        // never with the idle rule off.
        assert_eq!(s(&|_| {}), Some(DEFAULT_IDLE));
        assert_eq!(s(&|x| x.since_write = secs(2)), Some(secs(3)));
        assert_eq!(s(&|x| x.since_write = secs(9)), Some(Duration::ZERO));
        assert_eq!(
            s(&|x| (x.since_write, x.last) = (secs(9), Some((secs(20), secs(1))))),
            Some(secs(10))
        );
        assert_eq!(s(&|x| x.idle = None), None);
        // A start's replay and a shutdown call for a snapshot past 1,000 points and 1%.
        assert!(!replay_calls_for_snapshot(999, 1_000));
        assert!(replay_calls_for_snapshot(1_000, 100_000));
        assert!(!replay_calls_for_snapshot(1_000, 100_001));
        assert!(replay_calls_for_snapshot(21_000, 100_000));
    }
}
