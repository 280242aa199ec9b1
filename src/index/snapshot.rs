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
//! | id map (u64 n, n user ids u64, n live flags u8) | the engine's graph (`native/persist.rs`)
//! | CRC-32 (crc32fast) of every byte before it
//! ```
//!
//! Files are written to `<name>.tmp`, fsynced, renamed and the directory fsynced, so a file
//! with the final name is always complete; a `.tmp` left by a crash is swept at the next start.
//! A reader checks the magic, the version, the length, the checksum and the uid and sequence it
//! expects, and reports any mismatch as an error: the caller then rebuilds from the store,
//! which stays the source of truth. A file is decoded as it is read (one pass, never whole in
//! memory) and its checksum checked at the end ([`Dec::finish`]): until then the decoded graph
//! is not used, and every count in it is bounded by the bytes left, so a corrupt file cannot
//! cost more memory than about twice what a good one of its size does.

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

/// A reader of a snapshot's bytes, from a file ([`read`], one sequential pass through a 1 MiB
/// buffer, so loading never holds the whole file in memory) or from memory ([`Dec::new`]):
/// every read is bounds-checked against the length it was given and a short input is an
/// error, never a panic. It checksums what it reads; [`Dec::finish`] checks that against the
/// file's checksum.
pub struct Dec<'a> {
    src: Box<dyn std::io::Read + 'a>,
    /// Bytes left before the checksum (for [`Dec::new`], before the end).
    left: u64,
    buf: Vec<u8>,
    crc: crc32fast::Hasher,
}

fn short() -> Error {
    Error::Corrupt("the snapshot ends early".into())
}

impl<'a> Dec<'a> {
    /// A reader of `buf`, all of it body (no checksum after it).
    pub fn new(buf: &'a [u8]) -> Self {
        Self::of(Box::new(buf), buf.len() as u64)
    }
    fn of(src: Box<dyn std::io::Read + 'a>, left: u64) -> Self {
        Dec {
            src,
            left,
            buf: Vec::new(),
            crc: crc32fast::Hasher::new(),
        }
    }
    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&[u8]> {
        if n as u64 > self.left {
            return Err(short());
        }
        self.buf.clear();
        self.buf.resize(n, 0);
        self.src
            .read_exact(&mut self.buf)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => short(),
                _ => Error::Corrupt(format!("reading the snapshot: {e}")),
            })?;
        self.crc.update(&self.buf);
        self.left -= n as u64;
        Ok(&self.buf)
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
        self.check_room(n, each)?;
        Ok(n as usize)
    }
    /// Whether `n` items of `each` bytes fit in what is left.
    pub fn check_room(&self, n: u64, each: usize) -> Result<()> {
        let left = self.left;
        if n.saturating_mul(each.max(1) as u64) > left {
            return Err(Error::Corrupt(format!(
                "the snapshot claims {n} items, more than its {left} remaining bytes hold"
            )));
        }
        Ok(())
    }
    /// Checks that every byte before the checksum was read and that the checksum is that of
    /// every byte read: a file's decoded content is used only after this.
    pub fn finish(mut self) -> Result<()> {
        if self.left != 0 {
            return Err(Error::Corrupt(format!(
                "{} bytes after the graph",
                self.left
            )));
        }
        let mut tail = [0u8; 4];
        self.src.read_exact(&mut tail).map_err(|_| short())?;
        let stored = u32::from_le_bytes(tail);
        let computed = self.crc.finalize();
        if stored != computed {
            return Err(Error::Corrupt(format!(
                "checksum mismatch (stored {stored:08x}, computed {computed:08x}): truncated or corrupt"
            )));
        }
        Ok(())
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

/// Opens `path` and checks magic, version and length; returns the header and a reader
/// positioned at the body. The body is read as it is decoded, in one sequential pass, and the
/// checksum is checked at the end ([`Dec::finish`]): nothing decoded may be used before that.
pub fn read(path: &Path) -> Result<(Header, Dec<'static>)> {
    let cannot =
        |e: std::io::Error| Error::Corrupt(format!("reading snapshot {}: {e}", path.display()));
    let file = std::fs::File::open(path).map_err(cannot)?;
    let len = file.metadata().map_err(cannot)?.len();
    let bad = |what: String| Error::Corrupt(format!("snapshot {}: {what}", path.display()));
    if len < (MAGIC.len() + 4 + 24 + 4) as u64 {
        return Err(bad(format!("{len} bytes is too short")));
    }
    let mut d = Dec::of(
        Box::new(std::io::BufReader::with_capacity(1 << 20, file)),
        len - 4,
    );
    if d.bytes(MAGIC.len())? != MAGIC {
        return Err(bad("not a vectord snapshot (bad magic)".into()));
    }
    let version = d.u32()?;
    if version != VERSION {
        return Err(bad(format!(
            "format version {version}; this vectord reads version {VERSION}"
        )));
    }
    let header = Header {
        uid: d.u64()?,
        seq: d.u64()?,
        live: d.u64()?,
    };
    Ok((header, d))
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
