//! Reads byte extents of one file into caller memory: io_uring (O_DIRECT) on a dedicated thread,
//! or a `pread` thread pool. Knows nothing of experts; no byte of a batch is written after `wait`
//! on its ticket returns, and the page cache is bypassed whenever `direct()` is true.
//!
//! The caller owns the memory (`AlignedBuf` or anything ALIGN-aligned): `submit` queues a batch of
//! [`ReadOp`]s and returns a [`Ticket`] at once; `wait` blocks until every op of that batch has
//! completed (or failed) and reports the first error. Batches may be waited in any order.
//!
//! Extents past the end of the file: an op may run past the file's last byte only up to the next
//! ALIGN boundary (what [`align_extent`] produces for a range that ends at EOF); those bytes read
//! as zero. A read that ends early anywhere before the file's length at open (the file was
//! truncated under us) is a [`IoError::ShortRead`].

mod error;
mod pread;
mod shared;
mod uring;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub use error::IoError;
use shared::{Job, Shared};

/// Alignment of file offsets, lengths and destination addresses under O_DIRECT.
pub const ALIGN: usize = 4096;

/// Largest single read handed to the kernel (io_uring's `len` is a u32; pread caps near 2 GiB).
const MAX_CHUNK: usize = 1 << 30;

/// The ALIGN-aligned superset of the byte range `[offset, offset + len)`:
/// `(aligned file offset, aligned length, pad = offset - aligned offset)`.
/// The wanted bytes are `buf[pad .. pad + len]` of a buffer filled from the aligned extent.
pub fn align_extent(offset: u64, len: u64) -> (u64, usize, usize) {
    let a = ALIGN as u64;
    let start = offset / a * a;
    let end = offset.saturating_add(len).div_ceil(a) * a;
    (start, (end - start) as usize, (offset - start) as usize)
}

/// A zeroed heap buffer whose address is ALIGN-aligned; its allocation is rounded up to a whole
/// number of ALIGN blocks (at least one), so an O_DIRECT read of `align_up(len)` bytes fits.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    layout: std::alloc::Layout,
}

// SAFETY: AlignedBuf uniquely owns its allocation (like Vec<u8>); &self gives only shared reads.
unsafe impl Send for AlignedBuf {}
// SAFETY: as above; no interior mutability.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes at an ALIGN-aligned address.
    pub fn new(len: usize) -> Result<AlignedBuf, IoError> {
        let cap = len.max(1).checked_next_multiple_of(ALIGN).ok_or(IoError::Alloc { len })?;
        let layout = std::alloc::Layout::from_size_align(cap, ALIGN).map_err(|_| IoError::Alloc { len })?;
        // SAFETY: layout has non-zero size (cap >= ALIGN).
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(raw).ok_or(IoError::Alloc { len })?;
        Ok(AlignedBuf { ptr, len, layout })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes allocated: `len` rounded up to a multiple of ALIGN (at least ALIGN).
    pub fn capacity(&self) -> usize {
        self.layout.size()
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for `capacity() >= len` initialized (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was returned by alloc_zeroed with exactly this layout and is freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf").field("ptr", &self.ptr).field("len", &self.len).finish()
    }
}

/// One read: `len` bytes at `file_offset` into `dst`. Under O_DIRECT all three must be
/// ALIGN-aligned (`len` a multiple of ALIGN); a violation fails the batch before any I/O.
#[derive(Clone, Copy, Debug)]
pub struct ReadOp {
    pub file_offset: u64,
    pub len: usize,
    pub dst: *mut u8,
}

// SAFETY: a ReadOp is only a description; the pointer is dereferenced (written) only by the
// service's I/O thread(s) after `IoService::submit`, whose caller promised (`# Safety`) that `dst`
// is valid for `len` bytes and untouched by anyone else until `wait` on its ticket returns.
unsafe impl Send for ReadOp {}

/// Which reader to use. `Auto` tries io_uring and falls back to `pread`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum IoBackend {
    #[default]
    Auto,
    Uring,
    Pread,
}

#[derive(Clone, Debug)]
pub struct IoConfig {
    pub backend: IoBackend,
    /// io_uring reads kept in flight (default 32; values below 1 are raised to 1).
    pub queue_depth: usize,
    /// Open with O_DIRECT (default). Falls back to buffered reads, with a warning, only when the
    /// filesystem refuses O_DIRECT.
    pub direct: bool,
    /// Threads of the pread backend (default 4).
    pub pread_threads: usize,
}

impl Default for IoConfig {
    fn default() -> Self {
        IoConfig { backend: IoBackend::Auto, queue_depth: 32, direct: true, pread_threads: 4 }
    }
}

/// Knobs that are not part of the stable configuration (benchmarks, experiments).
#[derive(Clone, Copy, Debug, Default)]
pub struct IoTuning {
    /// Split every op into reads of at most this many bytes (multiple of ALIGN); 0 = no split.
    /// Measured here (benches/io_read.rs): no gain from splitting 1–3 MiB reads, so off.
    pub split_bytes: usize,
}

/// How soon a batch should be read: urgent batches are taken before any queued background
/// one (reads already in flight finish first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Urgency {
    #[default]
    Urgent,
    Background,
}

/// Identifies a submitted batch until `wait` consumes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ticket(u64);

/// Cumulative counters since open.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct IoStats {
    /// Bytes of ops that completed successfully.
    pub bytes: u64,
    /// Ops completed (successfully or not).
    pub ops: u64,
    /// Batches whose every op has completed.
    pub batches: u64,
    /// Wall seconds during which at least one read was in flight.
    pub busy_s: f64,
    /// Ops that failed (including ops rejected by validation).
    pub errors: u64,
}

enum Engine {
    Uring(uring::UringThread),
    Pread(pread::PreadPool),
}

/// Reads on a dedicated io_uring thread or a small pread pool, overlapping the caller's compute.
/// Dropping it waits for every in-flight op, then stops the thread(s).
pub struct IoService {
    shared: Arc<Shared>,
    next_ticket: AtomicU64,
    engine: Engine,
}

impl IoService {
    /// Opens `path` and starts the reader. `Auto` probes io_uring and falls back to pread,
    /// logging why.
    pub fn open(path: &Path, cfg: IoConfig) -> Result<IoService, IoError> {
        IoService::open_tuned(path, cfg, IoTuning::default())
    }

    pub fn open_tuned(path: &Path, cfg: IoConfig, tuning: IoTuning) -> Result<IoService, IoError> {
        let (file, direct) = open_file(path, cfg.direct)?;
        let file_len = file.metadata().map_err(|source| IoError::Open { path: path.to_path_buf(), source })?.len();
        let split = match tuning.split_bytes {
            0 => MAX_CHUNK,
            n => n.next_multiple_of(ALIGN).min(MAX_CHUNK),
        };
        let shared = Arc::new(Shared::new(path.to_path_buf(), file, file_len, direct, split));
        let qd = cfg.queue_depth.max(1);
        let engine = match cfg.backend {
            IoBackend::Pread => Engine::Pread(pread::PreadPool::start(&shared, cfg.pread_threads)?),
            IoBackend::Uring => Engine::Uring(uring::UringThread::start(&shared, qd)?),
            IoBackend::Auto => match uring::UringThread::start(&shared, qd) {
                Ok(t) => Engine::Uring(t),
                Err(e) => {
                    tracing::info!("io_uring unavailable ({e}); reading with pread threads");
                    Engine::Pread(pread::PreadPool::start(&shared, cfg.pread_threads)?)
                }
            },
        };
        Ok(IoService { shared, next_ticket: AtomicU64::new(0), engine })
    }

    /// The backend actually in use: `Uring` or `Pread`, never `Auto`.
    pub fn backend(&self) -> IoBackend {
        match self.engine {
            Engine::Uring(_) => IoBackend::Uring,
            Engine::Pread(_) => IoBackend::Pread,
        }
    }

    /// Whether reads bypass the page cache (O_DIRECT).
    pub fn direct(&self) -> bool {
        self.shared.direct
    }

    /// File length at open.
    pub fn file_len(&self) -> u64 {
        self.shared.file_len
    }

    /// Queues a batch and returns at once. An invalid op (misaligned under O_DIRECT, or past the
    /// aligned end of the file) fails the whole batch before any of its I/O is issued.
    ///
    /// # Safety
    /// Every `dst` must be valid for writes of `len` bytes and must not be read or written by
    /// anyone else (nor overlap another op's `dst`) until `wait` on the returned ticket has
    /// returned — or, if it is never waited, until the service has been dropped.
    pub unsafe fn submit(&self, ops: Vec<ReadOp>) -> Ticket {
        // SAFETY: the caller's promise, passed on.
        unsafe { self.submit_with(ops, Urgency::Urgent) }
    }

    /// `submit` at the given urgency.
    ///
    /// # Safety
    /// As for [`IoService::submit`].
    pub unsafe fn submit_with(&self, ops: Vec<ReadOp>, urgency: Urgency) -> Ticket {
        // SAFETY: the caller's promise, passed on.
        unsafe { self.submit_then(ops, urgency, None) }
    }

    /// `submit_with`, and `then` runs on the I/O thread once every op succeeded, before the batch
    /// is `finished` (e.g. rearranging the bytes just read, off the caller's thread); not at all
    /// if an op fails or the batch is cancelled. A panic in it fails the batch.
    ///
    /// # Safety
    /// As for [`IoService::submit`]; `then` may touch the ops' buffers (nobody else does until
    /// the batch finishes).
    pub unsafe fn submit_then(
        &self,
        ops: Vec<ReadOp>,
        urgency: Urgency,
        then: Option<Box<dyn FnOnce() + Send>>,
    ) -> Ticket {
        let id = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        let invalid = ops.iter().find_map(|op| self.shared.validate(op).err());
        if let Some(err) = invalid {
            self.shared.register_failed(id, ops.len() as u64, err);
            return Ticket(id);
        }
        let jobs: Vec<Job> = ops.into_iter().filter(|op| op.len > 0).map(|op| Job { op, batch: id }).collect();
        self.shared.register(id, jobs.len(), then);
        if !jobs.is_empty() {
            let sent = match &self.engine {
                Engine::Uring(t) => t.send(jobs, urgency),
                Engine::Pread(p) => p.send(jobs, urgency),
            };
            if !sent {
                self.shared.fail_batch(id, IoError::ServiceGone { path: self.shared.path.clone() });
            }
        }
        Ticket(id)
    }

    /// Whether the batch is done, without blocking or consuming it: `None` while reads are in
    /// flight, `Some(true)` once every op succeeded (its bytes are all in place), `Some(false)`
    /// if one failed (then `wait` reports why).
    pub fn finished(&self, t: Ticket) -> Option<bool> {
        self.shared.finished(t.0)
    }

    /// Blocks until every op of the batch is done; the first failure of the batch, if any.
    /// The service stays usable after a failed batch. Each ticket can be waited once.
    pub fn wait(&self, t: Ticket) -> Result<(), IoError> {
        self.shared.wait(t.0)
    }

    /// Drop the batch's reads that have not started (those in flight complete); the batch then
    /// finishes with `IoError::Cancelled`, or normally if all had started. Its memory stays
    /// the caller's promise until `finished` says it is done.
    pub fn cancel(&self, t: Ticket) {
        self.shared.cancel(t.0);
    }

    /// Read the batch's queued reads before other background ones, as if urgent (io_uring; the
    /// pread threads take jobs in order).
    pub fn promote(&self, t: Ticket) {
        if let Engine::Uring(u) = &self.engine {
            u.promote(t.0);
        }
    }

    /// Convenience: reads the byte range `[offset, offset + len)` through its aligned superset
    /// and waits. Returns the buffer and the pad where the wanted bytes start.
    pub fn read_range(&self, offset: u64, len: u64) -> Result<(AlignedBuf, usize), IoError> {
        let (aoff, alen, pad) = align_extent(offset, len);
        let mut buf = AlignedBuf::new(alen)?;
        let op = ReadOp { file_offset: aoff, len: alen, dst: buf.as_mut_ptr() };
        // SAFETY: buf lives on this frame, is used by nobody else, and is only read after wait.
        let t = unsafe { self.submit(vec![op]) };
        self.wait(t)?;
        Ok((buf, pad))
    }

    pub fn stats(&self) -> IoStats {
        self.shared.stats()
    }
}

impl Drop for IoService {
    fn drop(&mut self) {
        // Each engine's shutdown drains its queue and in-flight ops before joining, so no write
        // lands in memory the caller frees after this returns.
        match &mut self.engine {
            Engine::Uring(t) => t.shutdown(),
            Engine::Pread(p) => p.shutdown(),
        }
    }
}

/// Opens read-only, with O_DIRECT when asked; falls back to buffered if the filesystem refuses.
fn open_file(path: &Path, direct: bool) -> Result<(File, bool), IoError> {
    let open_err = |source| IoError::Open { path: path.to_path_buf(), source };
    if direct {
        match OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path) {
            Ok(f) => return Ok((f, true)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!("{}: filesystem refuses O_DIRECT ({e}); reading through the page cache", path.display());
            }
            Err(e) => return Err(open_err(e)),
        }
    }
    let f = OpenOptions::new().read(true).open(path).map_err(open_err)?;
    Ok((f, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn align_extent_cases() {
        // (offset, len) -> (aligned offset, aligned len, pad)
        #[allow(clippy::type_complexity)]
        let cases: &[((u64, u64), (u64, usize, usize))] = &[
            ((0, 0), (0, 0, 0)),
            ((0, 1), (0, 4096, 0)),
            ((0, 4096), (0, 4096, 0)),
            ((1, 4095), (0, 4096, 1)),
            ((1, 4096), (0, 8192, 1)),
            ((4095, 2), (0, 8192, 4095)),
            ((8192, 4096), (8192, 4096, 0)),
            ((10_000, 5_000), (8192, 8192, 1808)),
            ((1 << 40, 3 << 20), (1 << 40, 3 << 20, 0)),
        ];
        for &((off, len), want) in cases {
            let got = align_extent(off, len);
            assert_eq!(got, want, "align_extent({off}, {len})");
            let (a, l, p) = got;
            assert_eq!(a % ALIGN as u64, 0);
            assert_eq!(l % ALIGN, 0);
            assert!(a + p as u64 == off && p as u64 + len <= l as u64);
        }
    }

    #[test]
    fn aligned_buf_is_aligned_and_zeroed() {
        for len in [0, 1, 4095, 4096, 4097, 3 << 20] {
            let mut b = AlignedBuf::new(len).expect("alloc");
            assert_eq!(b.as_ptr() as usize % ALIGN, 0);
            assert_eq!(b.len(), len);
            assert!(b.capacity() >= len.max(1) && b.capacity().is_multiple_of(ALIGN));
            assert!(b.as_slice().iter().all(|&x| x == 0));
            b.as_mut_slice().fill(7);
            assert!(b.as_slice().iter().all(|&x| x == 7));
        }
        assert!(matches!(AlignedBuf::new(usize::MAX), Err(IoError::Alloc { .. })));
    }
}
