//! Raw memory: the cell arrays a graph lives in and every `unsafe` block of the engine.
//!
//! # Invariants
//! - A [`Cells`] owns its memory: an allocation made by [`huge_cells`] (freed on drop with the
//!   same layout) or a shared mapping of an unlinked temp file made by [`mapped_cells`] (unmapped
//!   on drop). Every cell is initialised before the array is handed out: `huge_cells` writes
//!   each one, and a mapped file's fresh blocks read as zeros.
//! - A mapped file is this process's alone: created without a name (or unlinked at once), its
//!   only descriptor closed once mapped, its blocks reserved before the mapping is used (Linux:
//!   so a store to it never meets a full disk, which would be a SIGBUS), and never truncated.
//!   So the mapping stays valid for as long as its `Cells`, and its contents change only
//!   through it. Its cells are written and read like heap cells (the invariant below), through
//!   the same atomics: a mapping changes where the bytes live, not who may touch them when.
//! - A node's vector cells (in [`Segment::level0`] after its links, and in [`Segment::full`])
//!   are written once (relaxed atomic stores) by the thread that claimed the node
//!   ([`Segment::claimed`]) and before the node's id is published with a `Release` store into a
//!   link list or the entry point. Readers reach a node only through an id loaded with
//!   `Acquire`, so [`as_f32`], [`as_u16`] and [`as_i8`], which view cells as plain numbers, are
//!   only ever applied to cells no one writes any more. Nothing outside `native` can call them.
//! - Link slots are never viewed as plain numbers: they are read and written as atomics.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32};
use std::sync::OnceLock;

use parking_lot::Mutex;

#[cfg(doc)]
use super::Storage;
use super::EMPTY;

/// One segment of nodes.
pub(super) struct Segment {
    /// Per node, `stride` cells: its `m0` level-0 link slots, then the vector searches compare
    /// with (f32 bits, two halves per cell with [`Storage::Half`], or four 8-bit codes per cell
    /// with [`Storage::Int8`]). Without a count or a scale in it, a row of a usual shape is a
    /// whole number of cache lines (128-d 8-bit codes and M 16: 128 bytes of links, 128 of
    /// codes), so a distance reads two lines where a row laid out as hnswlib's (count, links,
    /// scale, codes: 264 bytes) had it read three. The node's vector cells are written once,
    /// before the node is published (module docs).
    pub(super) level0: Cells,
    /// Per node, `meta` cells: its level-0 link count (stored after the slots it counts, with
    /// `Release`), then with [`Storage::Int8`] its codes' scale (written once, before the node
    /// is published). A search reads a node's count when it expands it and its scale when it
    /// measures it: 4 or 8 bytes a node, so for 200k nodes 0.8-1.6 MB, mostly in the caches.
    pub(super) meta: Cells,
    /// With [`Storage::Half`] and [`Storage::Int8`], per node its `dim` float vector (f32 bits),
    /// for exact distances; empty otherwise. Written once, before the node is published. In a
    /// mapped file ([`mapped_cells`]) when the engine maps its float vectors, so the kernel may
    /// evict those pages (they are read only to re-rank a search's last candidates and while
    /// inserting) and they count as the process's file-backed memory, not its anonymous memory.
    pub(super) full: Cells,
    /// Per node, levels 1..=level of `(1 + m)` slots each; set before the node is published.
    pub(super) upper: Box<[OnceLock<Box<[AtomicU32]>>]>,
    /// Held by whoever rewrites a node's link lists. It guards how many of the node's first
    /// level-0 slots are known to be a neighbour-heuristic fixpoint (`hnsw::Native::link_back`):
    /// 0 for a new or loaded node, set by a prune, lowered by whoever replaces a slot in it.
    pub(super) locks: Box<[Mutex<u8>]>,
    /// Set by the insert that owns the node's slot.
    pub(super) claimed: Box<[AtomicBool]>,
}

impl Segment {
    /// A segment of `len` nodes; `full_dim` float cells per node in `full`, in a mapped temp
    /// file in `map_dir` if given (in the heap if that file cannot be made: logged).
    pub(super) fn new(
        len: usize,
        cells: usize,
        m0: usize,
        meta: usize,
        full_dim: usize,
        map_dir: Option<&Path>,
    ) -> Self {
        let stride = m0 + cells;
        let n_full = len * full_dim;
        let full = match map_dir.filter(|_| n_full > 0) {
            Some(dir) => mapped_cells(n_full, dir).unwrap_or_else(|e| {
                tracing::warn!(
                    dir = %dir.display(),
                    bytes = n_full * 4,
                    error = %e,
                    "cannot map float vectors to a file: keeping them in memory"
                );
                huge_cells(n_full, |_| 0)
            }),
            None => huge_cells(n_full, |_| 0),
        };
        let level0 = huge_cells(len * stride, |i| if i % stride < m0 { EMPTY } else { 0 });
        Segment {
            level0,
            meta: huge_cells(len * meta, |_| 0),
            full,
            upper: (0..len).map(|_| OnceLock::new()).collect(),
            locks: (0..len).map(|_| Mutex::new(0)).collect(),
            claimed: (0..len).map(|_| AtomicBool::new(false)).collect(),
        }
    }
}

/// A cache line (x86-64, and the usual size elsewhere).
pub(super) const CACHE_LINE: usize = 64;

/// A huge page (x86-64 Linux transparent huge pages).
pub(super) const HUGE_PAGE: usize = 2 << 20;

/// A fixed array of cells that owns its memory: [`huge_cells`] lays large ones out on huge-page
/// boundaries, which a `Box<[AtomicU32]>` cannot free, and [`mapped_cells`] puts them in a
/// mapped file.
pub(super) struct Cells {
    ptr: std::ptr::NonNull<AtomicU32>,
    len: usize,
    owner: Owner,
}

/// What a [`Cells`]' memory is and how it is given back.
enum Owner {
    /// From the global allocator with this layout (size 0: nothing was allocated).
    Heap(std::alloc::Layout),
    /// A shared mapping of an unlinked temp file (module invariants); unmapped when dropped.
    Mapped(#[allow(dead_code)] memmap2::MmapMut),
}

// SAFETY: `Cells` owns its memory, like a `Box<[AtomicU32]>` (a heap allocation or a mapping no
// one else uses), and `AtomicU32` is Send and Sync.
unsafe impl Send for Cells {}
unsafe impl Sync for Cells {}

impl Cells {
    /// Whether the cells are in a mapped file.
    #[cfg(test)]
    pub(super) fn is_mapped(&self) -> bool {
        matches!(self.owner, Owner::Mapped(_))
    }

    /// Tests: writes mapped cells back to their file and has the kernel evict their pages at
    /// once, as memory pressure would (`MADV_PAGEOUT`); returns how many of their pages are
    /// still resident (`mincore`), or None for cells in the heap.
    #[cfg(all(test, target_os = "linux"))]
    pub(super) fn evict(&self) -> std::io::Result<Option<usize>> {
        let Owner::Mapped(map) = &self.owner else {
            return Ok(None);
        };
        map.flush()?;
        let pages = map.len().div_ceil(4096);
        let mut resident = vec![0u8; pages];
        // SAFETY: the range is exactly this mapping, which `self` owns. MADV_PAGEOUT only asks
        // the kernel to reclaim its pages now (written back above, so clean): their contents
        // stay the file's and come back on the next access. mincore writes one byte per page
        // of the range into `resident`, which has that many.
        let rc = unsafe {
            let addr = map.as_ptr() as *mut libc::c_void;
            if libc::madvise(addr, map.len(), libc::MADV_PAGEOUT) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::mincore(addr, map.len(), resident.as_mut_ptr())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Some(resident.iter().filter(|&&b| b & 1 == 1).count()))
    }
}

impl std::ops::Deref for Cells {
    type Target = [AtomicU32];

    fn deref(&self) -> &[AtomicU32] {
        // SAFETY: `ptr` points to `len` initialised cells owned by `self` (or dangles, aligned,
        // with `len` 0).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Cells {
    fn drop(&mut self) {
        match &self.owner {
            Owner::Heap(layout) if layout.size() > 0 => {
                // SAFETY: allocated in `huge_cells` with this layout; AtomicU32 needs no drop.
                unsafe { std::alloc::dealloc(self.ptr.as_ptr().cast(), *layout) }
            }
            // A mapping unmaps itself when dropped (after this), which frees the unlinked
            // file's blocks.
            Owner::Heap(_) | Owner::Mapped(_) => {}
        }
    }
}

/// `n` zeroed cells in a shared mapping of a temp file of their size created in `dir`, with no
/// name left behind ([`tempfile::tempfile_in`]: `O_TMPFILE` where the file system has it, else
/// a random name unlinked at once). Its pages are file-backed: the kernel writes them back and
/// may evict them under memory pressure, reading them back on the next access, so they count
/// as the process's file memory (`RssFile`), not its anonymous memory. The file's blocks are
/// reserved first (`posix_fallocate`): a store into a hole of a full file system would kill the
/// process with SIGBUS; a full disk is an error here instead.
pub(super) fn mapped_cells(n: usize, dir: &Path) -> std::io::Result<Cells> {
    let bytes = n
        .checked_mul(std::mem::size_of::<AtomicU32>())
        .ok_or_else(|| std::io::Error::other(format!("capacity overflow: {n} cells")))?;
    if bytes == 0 {
        return Ok(Cells {
            ptr: std::ptr::NonNull::dangling(),
            len: 0,
            owner: Owner::Heap(std::alloc::Layout::new::<[AtomicU32; 0]>()),
        });
    }
    let file = tempfile::tempfile_in(dir)?;
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let len = libc::off_t::try_from(bytes)
            .map_err(|_| std::io::Error::other(format!("{bytes} bytes is too large a file")))?;
        // SAFETY: a plain system call on a descriptor this function owns; it touches no memory
        // of ours.
        let err = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
        if err != 0 {
            return Err(std::io::Error::from_raw_os_error(err));
        }
    }
    // Elsewhere the file is only sized: its blocks are allocated as the cells are written.
    #[cfg(not(target_os = "linux"))]
    file.set_len(bytes as u64)?;
    // SAFETY: the file is this process's alone (module invariants): it has no name, nothing
    // else has a descriptor to it, and nothing truncates it, so the mapping stays valid for the
    // life of the returned `Cells` (which owns it) and its contents change only through it.
    let mut map = unsafe { memmap2::MmapOptions::new().len(bytes).map_mut(&file) }?;
    // The mapping keeps the file alive; its blocks are freed with the mapping.
    drop(file);
    // Reads after an eviction come one vector at a time, from all over the file: read-ahead
    // would only fetch pages no one asked for. Advice only: failure changes nothing.
    let _ = map.advise(memmap2::Advice::Random);
    let Some(ptr) = std::ptr::NonNull::new(map.as_mut_ptr().cast::<AtomicU32>()) else {
        return Err(std::io::Error::other("a mapping at address 0"));
    };
    // `mmap` returns page-aligned memory, aligned for AtomicU32; the file's fresh blocks read
    // as zeros, a valid AtomicU32 each, so every cell is initialised.
    Ok(Cells {
        ptr,
        len: n,
        owner: Owner::Mapped(map),
    })
}

/// `n` cells set by `init`. From 2 MiB up they start on a 2 MiB boundary and the kernel is asked
/// to back them with transparent huge pages (Linux): a search reads vectors at random places all
/// over the graph, and with 4 KiB pages nearly every one of those reads also misses the TLB.
/// Aligned, every whole 2 MiB of the array can be one huge page; unaligned, an array under 4 MiB
/// (the segments a graph filled by small upserts grows) usually holds no aligned 2 MiB at all.
/// Smaller ones start on a cache line, so a node's row of a whole number of lines is read as
/// that many lines.
pub(super) fn huge_cells(n: usize, init: impl Fn(usize) -> u32) -> Cells {
    let bytes = n.saturating_mul(std::mem::size_of::<AtomicU32>());
    let huge = cfg!(target_os = "linux") && bytes >= HUGE_PAGE;
    let align = if huge { HUGE_PAGE } else { CACHE_LINE };
    let Ok(layout) = std::alloc::Layout::from_size_align(bytes, align) else {
        panic!("capacity overflow: {n} cells");
    };
    if bytes == 0 {
        return Cells {
            ptr: std::ptr::NonNull::dangling(),
            len: 0,
            owner: Owner::Heap(layout),
        };
    }
    // SAFETY: the layout has a non-zero size.
    let raw = unsafe { std::alloc::alloc(layout) }.cast::<AtomicU32>();
    let Some(ptr) = std::ptr::NonNull::new(raw) else {
        std::alloc::handle_alloc_error(layout);
    };
    #[cfg(target_os = "linux")]
    if huge {
        // SAFETY: the range is this allocation's own (it starts on a page boundary, being
        // 2 MiB-aligned, and madvise takes whole pages: those wholly inside). MADV_HUGEPAGE is
        // advice about how to back it and changes none of its contents; failure (a kernel
        // without THP, or THP disabled) just leaves 4 KiB pages.
        unsafe {
            libc::madvise(
                ptr.as_ptr().cast(),
                bytes / 4096 * 4096,
                libc::MADV_HUGEPAGE,
            );
        }
    }
    for i in 0..n {
        // SAFETY: `i < n`, within the allocation; each cell is written once before any read.
        unsafe { ptr.as_ptr().add(i).write(AtomicU32::new(init(i))) };
    }
    Cells {
        ptr,
        len: n,
        owner: Owner::Heap(layout),
    }
}

/// Gives the C allocator's free memory back to the kernel (glibc's `malloc_trim`; nothing
/// elsewhere). glibc keeps the chunks freed by big temporary work (an import's messages and
/// fresh vectors, a rebuild's points read from the store, a snapshot's encoding) in its arenas,
/// resident: after importing 100k x 128 points, 72 MB of the server's 226 MB of anonymous
/// memory was such free memory. The server calls this after such work (background snapshots,
/// the start's recovery), which is rare enough for its cost (a walk of the arenas) not to
/// matter.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim returns free memory of glibc's own arenas to the kernel, under each
    // arena's lock; it moves and touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Prefetches every cache line of `cells`.
#[inline(always)]
pub(super) fn prefetch_cells(cells: &[AtomicU32]) {
    for line in cache_lines(cells) {
        prefetch(line as *const f32);
    }
}

/// The addresses of the cache lines `cells` occupies: from the line holding the first cell to
/// the line holding the last. A slice that does not start on a line boundary spans one line
/// more than its length in lines.
#[inline(always)]
pub(super) fn cache_lines(cells: &[AtomicU32]) -> impl Iterator<Item = usize> {
    let first = cells.as_ptr() as usize & !(CACHE_LINE - 1);
    let end = cells.last().map(|c| c as *const AtomicU32 as usize);
    (0..)
        .map(move |i| first + CACHE_LINE * i)
        .take_while(move |&line| end.is_some_and(|end| line <= end))
}

#[inline(always)]
pub(super) fn prefetch(p: *const f32) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: a prefetch is a hint: it never faults, whatever the address, and SSE (which
        // provides it) is part of the x86-64 baseline.
        #[allow(unused_unsafe)]
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// `cells` read as the `f32`s whose bits they hold (the module's invariants: only a published
/// node's vector cells, which no one writes any more).
#[inline(always)]
pub(super) fn as_f32(cells: &[AtomicU32]) -> &[f32] {
    // SAFETY: AtomicU32 has the size and alignment of u32 and f32, so the cells can be read as
    // floats. A node's vector cells are stored once, by the thread that claimed the node and
    // before the node's id is published with a Release store; readers reach the node only
    // through an id loaded with Acquire, so no read of these cells races a write.
    unsafe { std::slice::from_raw_parts(cells.as_ptr() as *const f32, cells.len()) }
}

/// The first `n` (at most two per cell) half floats packed in `cells` (as [`as_f32`]).
#[inline(always)]
pub(super) fn as_u16(cells: &[AtomicU32], n: usize) -> &[u16] {
    // SAFETY: as in `as_f32`: two u16 fit one AtomicU32 (alignment 4 >= 2) and the cells are
    // written once before the node is published; at most `cells.len() * 2` halves are read, so
    // the slice is in bounds.
    unsafe { std::slice::from_raw_parts(cells.as_ptr() as *const u16, n.min(cells.len() * 2)) }
}

/// The first `n` (at most four per cell) 8-bit codes packed in `cells` (as [`as_f32`]).
#[inline(always)]
pub(super) fn as_i8(cells: &[AtomicU32], n: usize) -> &[i8] {
    // SAFETY: as in `as_f32`: four i8 fit one AtomicU32 and the cells are written once before
    // the node is published; at most `cells.len() * 4` codes are read, so the slice is in
    // bounds.
    unsafe { std::slice::from_raw_parts(cells.as_ptr() as *const i8, n.min(cells.len() * 4)) }
}
