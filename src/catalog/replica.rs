//! Cluster replicas: installing a copy from a peer, and the copy a peer asks of this node.

use super::*;

impl Catalog {
    /// Installs a cluster replica's copy from a peer (`cluster/catchup.rs`) in place of
    /// `old`: the points the catch-up staged under `staged_uid` ([`Store::stage_points`],
    /// `point_count` of them) holding the index's write log up to `applied.sequence`. Builds
    /// their graph (off the async runtime, with `old`'s generation settings), then under the
    /// old replica's writer lock switches the store's record to the staged uid in one
    /// transaction ([`Store::switch_replica`], flushed: the commit point), swaps the new handle
    /// in and retires the old one (its tasks end, its data is removed). Until the switch,
    /// nothing of the copy is visible; a crash before it leaves an orphan uid swept at start.
    pub async fn replace_replica(
        &self,
        old: &Arc<IndexHandle>,
        staged_uid: u64,
        point_count: u64,
        points_changed: u64,
        applied: crate::store::Applied,
        graph: Option<PeerGraph>,
    ) -> Result<(Arc<IndexHandle>, bool)> {
        let name = old.meta.name.clone();
        let mut meta = old.meta.clone();
        meta.uid = staged_uid;
        let mut generation = old.active().meta.clone();
        generation.point_count = point_count;
        let counts = Counts {
            // Past the old replica's: versions (harnesses' ground truth) never repeat.
            data_version: old.data_version() + 1,
            point_count,
            // The peer's (the same on every node at the same sequence: refresh policies'
            // ON_APPEND counts compare it across nodes); a peer that sends none, the copy's.
            points_changed: points_changed.max(point_count),
        };
        let (store, memory, halt) = (self.store.clone(), self.memory.clone(), self.stop.clone());
        let (kind, m, gm) = (old.engine, meta.clone(), generation.clone());
        let (gen, from_peer) = tokio::task::spawn_blocking(move || -> Result<(Generation, bool)> {
            let points = store.load_points(staged_uid)?;
            if points.len() as u64 != point_count {
                return Err(Error::Unavailable(format!(
                    "the copy of index {} holds {} points, {point_count} expected",
                    m.name,
                    points.len()
                )));
            }
            if let Some(g) = graph {
                let loaded = g.load(kind, &memory, (m.metric, m.dimension), &gm, &points);
                if let Err(e) = std::fs::remove_file(&g.path) {
                    tracing::debug!(file = %g.path.display(), error = %e, "removing the peer's graph file (swept at the next start)");
                }
                match loaded {
                    Ok(gen) => return Ok((gen, true)),
                    Err(e) => {
                        tracing::warn!(index = %m.name, error = %e, "cannot use the peer's graph: building one from the copy")
                    }
                }
            }
            let gen = Generation::build(kind, &memory, m.metric, m.dimension, gm, points, &|| {
                halt.is_cancelled()
            })?;
            Ok((gen, false))
        })
        .await??;
        gen.mark(counts.data_version);
        let rec = IndexRecord {
            meta: meta.clone(),
            generation,
            snapshot: None,
        };
        let _ddl = self.ddl.lock().await;
        if !self
            .indexes
            .read()
            .get(&name)
            .is_some_and(|h| Arc::ptr_eq(h, old))
        {
            return Err(Error::Unavailable(format!(
                "index {name} changed while its copy was fetched: not installed"
            )));
        }
        let w = old.writer.lock().await;
        old.check_live()?;
        {
            let store = self.store.clone();
            let (rec, old_uid) = (rec.clone(), old.meta.uid);
            tokio::task::spawn_blocking(move || {
                store.switch_replica(&rec, old_uid, counts, applied)
            })
            .await??;
        }
        self.store.flush().await?;
        old.deleted.store(true, Ordering::Release);
        drop(w);
        let handle = IndexHandle::start(
            meta,
            gen,
            counts,
            HandleStart {
                snapshot_mark: 0,
                store: self.store.clone(),
                options: &self.writes,
                applied: Some(applied),
                tasks: &self.tasks,
            },
        );
        self.indexes.write().insert(name.clone(), handle.clone());
        self.added.notify_waiters();
        old.snap_poke.notify_one();
        handle.request_snapshot("the replica was copied from a peer");
        let (store, old_uid) = (self.store.clone(), old.meta.uid);
        tokio::task::spawn_blocking(move || -> Result<()> {
            store.remove_uid_data(old_uid)?;
            snapshots::remove_all(&store, old_uid);
            Ok(())
        })
        .await??;
        let graph = if from_peer {
            "the peer's, loaded"
        } else {
            "built here"
        };
        tracing::info!(index = %name, points = point_count, sequence = applied.sequence, graph, "installed the replica copied from a peer");
        Ok((handle, from_peer))
    }
}

impl Catalog {
    /// A cluster replica's points at one applied write-log sequence, for a peer's catch-up
    /// (`FetchIndexState`), copied into an unnamed temp file in the data dir (so a copy of a
    /// big index is not held in memory while it is sent, and the store is not read for as long
    /// as the transfer takes): read without the writer lock, the store's applied record checked
    /// around the scan; when logged writes keep racing it, read under the writer lock (the
    /// index's apply waits for the scan, not for the transfer). UNAVAILABLE when the replica
    /// has applied nothing yet, or the copy cannot be written (the data dir's disk is full).
    ///
    /// `with_graph`: also the graph (see [`GraphCopy`]) when the index's active generation has a
    /// snapshot whose change log since reaches the copy (else none, logged).
    pub async fn replica_state(
        &self,
        name: &Name,
        cluster_uid: u64,
        with_graph: bool,
    ) -> Result<ReplicaCopy> {
        let handle = self.handle(name)?;
        handle.check_live()?;
        if handle.cluster_uid != Some(cluster_uid) {
            return Err(Error::not_found(
                "index incarnation",
                format!("{name} (cluster uid {cluster_uid})"),
            ));
        }
        let (store, uid) = (self.store.clone(), handle.meta.uid);
        let dimension = handle.meta.dimension as usize;
        // The snapshot file is opened first: a later snapshot may replace (delete) it, and an
        // open file stays readable. Whether it still fits is checked after the copy.
        let snapshot = if with_graph {
            let (store, n) = (store.clone(), name.to_string());
            tokio::task::spawn_blocking(move || open_snapshot(&store, &n, uid)).await?
        } else {
            None
        };
        let file = CopyFile::create(store.dir())?;
        // One scan into `file`, checked against the applied record, up to `tries` times.
        // Under the writer lock no logged write can move the record: one try is enough.
        let copy = |mut file: CopyFile, tries: usize| {
            let store = store.clone();
            tokio::task::spawn_blocking(move || -> Result<_> {
                let cell = std::cell::RefCell::new(&mut file);
                let read = store.visit_points_at_applied(
                    uid,
                    dimension,
                    tries,
                    || cell.borrow_mut().restart(),
                    |id, v| cell.borrow_mut().push(id, v),
                )?;
                Ok((file, read))
            })
        };
        let (file, read) = copy(file, 3).await??;
        let (file, (count, applied, counts)) = match read {
            Some(read) => (file, read),
            None => {
                let _w = handle.writer.lock().await;
                handle.check_live()?;
                let (file, read) = copy(file, 1).await??;
                let read = read.ok_or_else(|| {
                    Error::Internal(format!("replica {name} has no applied record"))
                })?;
                (file, read)
            }
        };
        if applied.cluster_uid != cluster_uid {
            return Err(Error::not_found(
                "index incarnation",
                format!("{name} (cluster uid {cluster_uid})"),
            ));
        }
        if applied.sequence == 0 {
            return Err(Error::Unavailable(format!(
                "index {name} has applied nothing of its write log on this node yet"
            )));
        }
        let graph = match snapshot {
            Some(snap) => {
                let (store, upto, n) = (store.clone(), counts.data_version, name.to_string());
                tokio::task::spawn_blocking(move || graph_for_copy(&store, &n, uid, snap, upto))
                    .await?
            }
            None => None,
        };
        Ok(ReplicaCopy {
            points: file.finish(dimension)?,
            point_count: count,
            applied,
            points_changed: counts.points_changed,
            graph,
        })
    }
}

/// A replica's points at one applied write-log sequence ([`Catalog::replica_state`]).
pub struct ReplicaCopy {
    /// The points, read back in chunks.
    pub points: CopyReader,
    pub point_count: u64,
    pub applied: crate::store::Applied,
    /// The index's `points_changed` at `applied`.
    pub points_changed: u64,
    /// With `with_graph`, when there is one that fits.
    pub graph: Option<GraphCopy>,
}

/// A replica's graph for a peer: its active generation's snapshot file (written at write
/// number `seq`) and the ids written between it and the copy. That graph with those ids
/// upserted from the copy (deleted when the copy lacks them) is the copy's graph.
pub struct GraphCopy {
    pub file: std::fs::File,
    pub size: u64,
    pub seq: u64,
    /// The sender's local uid (the file's header names it).
    pub source_uid: u64,
    pub config: HnswConfig,
    pub touched: Vec<u64>,
}

/// A peer's graph received for a replica's copy ([`GraphCopy`] on the peer), in a temp file of
/// the snapshot directory (named for the staged uid: swept at start if a crash leaves it).
pub struct PeerGraph {
    pub path: std::path::PathBuf,
    pub seq: u64,
    pub source_uid: u64,
    pub config: HnswConfig,
    pub touched: Vec<u64>,
}

impl PeerGraph {
    /// The copy's graph: the peer's snapshot with the touched ids upserted from the copy's
    /// `points` (in id order), or deleted when the copy lacks them. Errors when the file is
    /// not a snapshot this node can load (another engine, config, format, a checksum) or the
    /// result's live points are not the copy's. Blocking.
    pub(super) fn load(
        &self,
        kind: EngineKind,
        memory: &EngineMemory,
        (metric, dimension): (Metric, u32),
        generation: &GenerationMeta,
        points: &[Point],
    ) -> Result<Generation> {
        if self.config != generation.config {
            return Err(Error::Precondition(format!(
                "the peer's graph has config {}, this node serves {}",
                self.config, generation.config
            )));
        }
        let mut gen = Generation::load(
            &self.path,
            self.source_uid,
            self.seq,
            metric,
            dimension,
            kind,
            memory,
        )?;
        if gen.meta.config != generation.config {
            return Err(Error::Corrupt(format!(
                "the peer's snapshot holds config {}, it announced {}",
                gen.meta.config, self.config
            )));
        }
        gen.meta = generation.clone();
        let mut upserts = Vec::new();
        let mut deletes = Vec::new();
        for id in &self.touched {
            match points.binary_search_by_key(id, |p| p.id) {
                Ok(i) => upserts.push(points[i].clone()),
                Err(_) => deletes.push(*id),
            }
        }
        snapshots::apply_catch_up(&gen, &upserts, &deletes);
        let live = gen.live_count() as u64;
        if live != points.len() as u64 {
            return Err(Error::Corrupt(format!(
                "the peer's graph holds {live} live points after its {} writes since, the copy {}",
                self.touched.len(),
                points.len()
            )));
        }
        Ok(gen)
    }
}

/// The graph of a copy at write number `upto`: `snap` (opened before the copy) with the ids
/// its change log says were written since. A snapshot recorded meanwhile trims that log: then
/// the newer snapshot is used if it is not past the copy (a few tries), else none (logged).
/// Blocking.
fn graph_for_copy(
    store: &Store,
    name: &str,
    uid: u64,
    mut snap: GraphCopy,
    upto: u64,
) -> Option<GraphCopy> {
    for _ in 0..3 {
        if snap.seq > upto {
            break;
        }
        match snapshots::touched(store, uid, snap.seq, upto) {
            Ok(touched) => return Some(GraphCopy { touched, ..snap }),
            Err(_) => snap = open_snapshot(store, name, uid)?,
        }
    }
    tracing::info!(index = name, "the index's snapshot does not fit the copy (a newer one was written meanwhile): sending the points only");
    None
}

/// The index's recorded snapshot, opened (its `touched` empty): None (logged) when it has
/// none, or it cannot be opened. Blocking.
fn open_snapshot(store: &Store, name: &str, uid: u64) -> Option<GraphCopy> {
    let rec = match store.get_index(name) {
        Ok(Some(rec)) if rec.meta.uid == uid => rec,
        _ => return None,
    };
    let Some(snap) = rec.snapshot else {
        tracing::info!(
            index = name,
            "the index has no snapshot: sending the points only"
        );
        return None;
    };
    let path = crate::index::snapshot::dir(store.dir()).join(&snap.file);
    let opened = std::fs::File::open(&path).and_then(|f| Ok((f.metadata()?.len(), f)));
    match opened {
        Ok((size, file)) => Some(GraphCopy {
            file,
            size,
            seq: snap.seq,
            source_uid: uid,
            config: rec.generation.config,
            touched: Vec::new(),
        }),
        Err(e) => {
            tracing::info!(index = name, file = %path.display(), error = %e, "cannot open the index's snapshot: sending the points only");
            None
        }
    }
}

/// The file a replica's copy is written to: each point as its id (u64, little-endian) then
/// its vector's stored bytes (f32, little-endian). Unnamed (`tempfile::tempfile_in`: the
/// kernel frees it when it is closed, a crash leaves nothing to sweep).
pub(super) struct CopyFile(std::io::BufWriter<std::fs::File>);

fn copy_failed(e: std::io::Error) -> Error {
    Error::Unavailable(format!(
        "writing a copy of the index for a peer failed: {e}"
    ))
}

impl CopyFile {
    pub(super) fn create(dir: &std::path::Path) -> Result<Self> {
        let file = tempfile::tempfile_in(dir).map_err(copy_failed)?;
        Ok(Self(std::io::BufWriter::with_capacity(1 << 20, file)))
    }

    /// Empties the file (a read that raced a write starts again).
    pub(super) fn restart(&mut self) -> Result<()> {
        use std::io::{Seek, Write};
        self.0.flush().map_err(copy_failed)?;
        let f = self.0.get_mut();
        f.set_len(0).map_err(copy_failed)?;
        f.rewind().map_err(copy_failed)?;
        Ok(())
    }

    pub(super) fn push(&mut self, id: u64, vector: &[u8]) -> Result<()> {
        use std::io::Write;
        self.0.write_all(&id.to_le_bytes()).map_err(copy_failed)?;
        self.0.write_all(vector).map_err(copy_failed)
    }

    pub(super) fn finish(self, dimension: usize) -> Result<CopyReader> {
        use std::io::Seek;
        let mut f = self
            .0
            .into_inner()
            .map_err(|e| copy_failed(e.into_error()))?;
        f.rewind().map_err(copy_failed)?;
        Ok(CopyReader {
            file: std::io::BufReader::with_capacity(1 << 20, f),
            dimension,
        })
    }
}

/// Reads a [`ReplicaCopy`]'s points back, a chunk at a time (blocking: call it off the async
/// runtime).
pub struct CopyReader {
    file: std::io::BufReader<std::fs::File>,
    dimension: usize,
}

impl CopyReader {
    /// The next at most `max` points (fewer only at the end of the copy).
    pub fn next_chunk(&mut self, max: usize) -> Result<Vec<Point>> {
        use std::io::Read;
        let mut out: Vec<Point> = Vec::with_capacity(max.min(1 << 16));
        let mut id = [0u8; 8];
        let mut bytes = vec![0u8; 4 * self.dimension];
        while out.len() < max {
            match self.file.read_exact(&mut id) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(copy_failed(e)),
            }
            self.file.read_exact(&mut bytes).map_err(copy_failed)?;
            out.push(Point {
                id: u64::from_le_bytes(id),
                vector: crate::store::decode_vector(&bytes)?,
            });
        }
        Ok(out)
    }

    /// The dimension of the copy's vectors.
    pub fn dimension(&self) -> usize {
        self.dimension
    }
}
