//! Snapshot files: a built generation written to disk, so a restart loads its graph instead of
//! rebuilding it.
//!
//! A file is `<data dir>/snapshots/<uid>-<generation>-<sequence>.snap`: the index's uid, the
//! generation's number and the index's write sequence (its data version) the graph covers.
//! Layout, little-endian:
//!
//! ```text
//! magic "VECDSNAP" | format version u32 | uid u64 | sequence u64 | live points u64
//! | engine u8 | metric u8 | dimension u32 | generation meta (u32 length + JSON)
//! | id map (u64 n, n user ids u64, n live flags u8) | engine blob (u64 length + bytes)
//! | CRC-32 (crc32fast) of every byte before it
//! ```
//!
//! Files are written to `<name>.tmp`, fsynced, renamed and the directory fsynced, so a file
//! with the final name is always complete; a `.tmp` left by a crash is swept at the next start.
//! A reader checks the magic, the version, the length, the checksum and the uid and sequence it
//! expects, and reports any mismatch as an error: the caller then rebuilds from the store,
//! which stays the source of truth.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub const MAGIC: &[u8; 8] = b"VECDSNAP";
/// Bumped whenever the layout changes; a file of another version is not read (the index is
/// rebuilt and a new file written).
pub const VERSION: u32 = 1;

/// The directory of an index's snapshot files.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("snapshots")
}

/// The file name of a generation's snapshot.
pub fn file_name(uid: u64, generation: u64, seq: u64) -> String {
    format!("{uid}-{generation}-{seq}.snap")
}

/// The uid a snapshot file (or its temp file) belongs to, from its name.
pub fn uid_of(name: &str) -> Option<u64> {
    name.split('-').next()?.parse().ok()
}

/// A writer that checksums what it writes.
pub struct Enc<W: Write> {
    out: W,
    crc: crc32fast::Hasher,
}

impl<W: Write> Enc<W> {
    pub fn new(out: W) -> Self {
        Enc {
            out,
            crc: crc32fast::Hasher::new(),
        }
    }
    pub fn bytes(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.crc.update(b);
        self.out.write_all(b)
    }
    pub fn u8(&mut self, v: u8) -> std::io::Result<()> {
        self.bytes(&[v])
    }
    pub fn u32(&mut self, v: u32) -> std::io::Result<()> {
        self.bytes(&v.to_le_bytes())
    }
    pub fn u64(&mut self, v: u64) -> std::io::Result<()> {
        self.bytes(&v.to_le_bytes())
    }
    /// Writes the checksum of everything written so far and returns the writer.
    pub fn finish(mut self) -> std::io::Result<W> {
        let crc = self.crc.clone().finalize();
        self.out.write_all(&crc.to_le_bytes())?;
        Ok(self.out)
    }
}

impl<W: Write> Write for Enc<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.out.write(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// A reader over a snapshot's bytes: every read is bounds-checked and a short file is an error,
/// never a panic.
pub struct Dec<'a> {
    buf: &'a [u8],
    at: usize,
}

fn short() -> Error {
    Error::Corrupt("the snapshot ends early".into())
}

impl<'a> Dec<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Dec { buf, at: 0 }
    }
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).ok_or_else(short)?;
        let b = self.buf.get(self.at..end).ok_or_else(short)?;
        self.at = end;
        Ok(b)
    }
    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.bytes(1)?[0])
    }
    pub fn u32(&mut self) -> Result<u32> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn u64(&mut self) -> Result<u64> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    /// A count read from the file, checked against what the rest of the file could hold (`each`
    /// bytes per item), so a corrupt count cannot ask for a huge allocation.
    pub fn count(&mut self, each: usize) -> Result<usize> {
        let n = self.u64()?;
        let left = (self.buf.len() - self.at) as u64;
        if n.saturating_mul(each.max(1) as u64) > left {
            return Err(Error::Corrupt(format!(
                "the snapshot claims {n} items, more than its {left} remaining bytes hold"
            )));
        }
        Ok(n as usize)
    }
    pub fn done(&self) -> bool {
        self.at == self.buf.len()
    }
}

/// What a snapshot file says about itself, checked against what the store expects.
pub struct Header {
    pub uid: u64,
    pub seq: u64,
    pub live: u64,
}

/// Writes `body` (which writes through the checksumming encoder after the header) to
/// `dir/name`: temp file, fsync, rename, fsync of the directory.
pub fn write(
    dir: &Path,
    name: &str,
    header: &Header,
    pause: Option<std::time::Duration>,
    body: impl FnOnce(&mut Enc<std::io::BufWriter<std::fs::File>>) -> std::io::Result<()>,
) -> Result<()> {
    let io = |what: &str, e: std::io::Error| {
        Error::Internal(format!(
            "writing snapshot {}: {what}: {e}",
            dir.join(name).display()
        ))
    };
    std::fs::create_dir_all(dir).map_err(|e| io("creating the directory", e))?;
    let tmp = dir.join(format!("{name}.tmp"));
    let file = std::fs::File::create(&tmp).map_err(|e| io("creating the temp file", e))?;
    let mut enc = Enc::new(std::io::BufWriter::with_capacity(1 << 20, file));
    let written = (|| {
        enc.bytes(MAGIC)?;
        enc.u32(VERSION)?;
        enc.u64(header.uid)?;
        enc.u64(header.seq)?;
        enc.u64(header.live)?;
        body(&mut enc)?;
        let mut out = enc.finish()?;
        out.flush()?;
        // Tests only (`TestPauses::snapshot_write`): a crash test kills the server here.
        if let Some(d) = pause {
            tracing::warn!(ms = d.as_millis() as u64, file = %tmp.display(), "test hook: pausing mid-snapshot");
            std::thread::sleep(d);
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io("writing", e));
    }
    std::fs::rename(&tmp, dir.join(name)).map_err(|e| io("renaming", e))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("syncing the directory", e))?;
    Ok(())
}

/// Reads `path` whole (one sequential read), checks magic, version, length and checksum, and
/// returns the header and a decoder positioned at the body (without the checksum).
pub fn read(path: &Path) -> Result<(Header, Vec<u8>)> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::Corrupt(format!("reading snapshot {}: {e}", path.display())))?;
    let bad = |what: String| Error::Corrupt(format!("snapshot {}: {what}", path.display()));
    if bytes.len() < MAGIC.len() + 4 + 24 + 4 {
        return Err(bad(format!("{} bytes is too short", bytes.len())));
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        return Err(bad("not a vectord snapshot (bad magic)".into()));
    }
    let (body, tail) = bytes.split_at(bytes.len() - 4);
    let mut d = Dec::new(&body[MAGIC.len()..]);
    let version = d.u32()?;
    if version != VERSION {
        return Err(bad(format!(
            "format version {version}; this vectord reads version {VERSION}"
        )));
    }
    let stored = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(bad(format!(
            "checksum mismatch (stored {stored:08x}, computed {computed:08x}): truncated or corrupt"
        )));
    }
    let header = Header {
        uid: d.u64()?,
        seq: d.u64()?,
        live: d.u64()?,
    };
    let start = MAGIC.len() + 4 + 24;
    let mut bytes = bytes;
    bytes.truncate(bytes.len() - 4);
    bytes.drain(..start);
    Ok((header, bytes))
}

/// Removes the files (snapshots and temp files) in the snapshot directory that `keep` rejects,
/// only those of `uid` when given. Failures are logged: a file left over is swept later.
pub fn prune(data_dir: &Path, uid: Option<u64>, keep: &dyn Fn(&str) -> bool) -> usize {
    let dir = dir(data_dir);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if uid.is_some() && uid_of(name) != uid {
            continue;
        }
        if keep(name) {
            continue;
        }
        match std::fs::remove_file(entry.path()) {
            Ok(()) => removed += 1,
            Err(e) => {
                tracing::warn!(file = %entry.path().display(), error = %e, "cannot remove an old snapshot")
            }
        }
    }
    removed
}
