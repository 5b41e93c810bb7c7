//! State shared by the submitting side and the I/O thread(s): batch bookkeeping, statistics and
//! the rules every backend applies to a read's outcome (EOF tail, short reads).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::PathBuf;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

use super::{IoError, IoStats, ReadOp, ALIGN};

/// One op of one batch, as queued to a backend.
pub(super) struct Job {
    pub op: ReadOp,
    pub batch: u64,
}

/// The two queues every reader takes jobs from, urgent first.
pub(super) struct Queues<T> {
    pub urgent: crossbeam_channel::Receiver<T>,
    pub background: crossbeam_channel::Receiver<T>,
}

impl<T> Queues<T> {
    /// The next message, urgent first; blocks while both are empty; `None` once both are closed
    /// and drained.
    pub fn recv(&self) -> Option<T> {
        if let Ok(m) = self.urgent.try_recv() {
            return Some(m);
        }
        crossbeam_channel::select_biased! {
            recv(self.urgent) -> m => match m {
                Ok(m) => Some(m),
                Err(_) => self.background.recv().ok(),
            },
            recv(self.background) -> m => match m {
                Ok(m) => Some(m),
                Err(_) => self.urgent.recv().ok(),
            },
        }
    }
}

/// A kernel-sized piece of a job: `len` bytes at `offset` into `dst`.
#[derive(Clone, Copy)]
pub(super) struct Chunk {
    pub offset: u64,
    pub len: usize,
    pub dst: *mut u8,
}

/// What to do after a read of a chunk returned.
pub(super) enum Next {
    /// The chunk is complete (possibly zero-filled past EOF).
    Done,
    /// Read again at `offset + done`.
    Again,
    Fail(IoError),
}

struct Batch {
    remaining: usize,
    error: Option<IoError>,
    /// Runs on the I/O thread once every op succeeded, before the batch counts as finished.
    then: Option<Then>,
}

/// A batch's completion step (see [`super::IoService::submit_then`]).
pub(super) type Then = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct State {
    batches: HashMap<u64, Batch>,
    stats: IoStats,
    active: usize,
    busy_since: Option<Instant>,
    gone: bool,
    /// Batches whose ops not yet started are to be dropped (`IoService::cancel`).
    cancelled: HashSet<u64>,
}

pub(super) struct Shared {
    pub path: PathBuf,
    pub file: File,
    /// File length at open; reads short of it are errors, bytes past it read as zero.
    pub file_len: u64,
    pub direct: bool,
    /// Largest read handed to the kernel at once.
    pub split: usize,
    state: Mutex<State>,
    done: Condvar,
}

impl Shared {
    pub fn new(path: PathBuf, file: File, file_len: u64, direct: bool, split: usize) -> Shared {
        Shared { path, file, file_len, direct, split, state: Mutex::new(State::default()), done: Condvar::new() }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State half-updated in a way that matters
        // more than losing the I/O outright; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks alignment (under O_DIRECT) and range before any I/O is issued.
    pub fn validate(&self, op: &ReadOp) -> Result<(), IoError> {
        let a = ALIGN as u64;
        if op.len == 0 {
            return Ok(());
        }
        if self.direct
            && !(op.file_offset.is_multiple_of(a)
                && op.len.is_multiple_of(ALIGN)
                && (op.dst as usize).is_multiple_of(ALIGN))
        {
            return Err(IoError::Misaligned {
                path: self.path.clone(),
                offset: op.file_offset,
                len: op.len,
                dst: op.dst as usize,
                align: ALIGN,
            });
        }
        let end = op.file_offset.checked_add(op.len as u64);
        let limit = self.file_len.div_ceil(a) * a;
        if op.dst.is_null() || end.is_none_or(|e| e > limit) {
            return Err(IoError::OutOfRange {
                path: self.path.clone(),
                offset: op.file_offset,
                len: op.len,
                file_len: self.file_len,
                align: ALIGN,
            });
        }
        Ok(())
    }

    /// The kernel-sized pieces of an op.
    pub fn chunks(&self, op: &ReadOp) -> impl Iterator<Item = Chunk> + '_ {
        let op = *op;
        (0..op.len).step_by(self.split).map(move |at| Chunk {
            offset: op.file_offset + at as u64,
            len: self.split.min(op.len - at),
            // Stays inside the caller's buffer: at < op.len.
            dst: op.dst.wrapping_add(at),
        })
    }

    /// After a read of `chunk` returned `last` bytes, bringing the total to `done`.
    pub fn after_read(&self, op: &ReadOp, chunk: &Chunk, done: usize, last: usize) -> Next {
        if done >= chunk.len {
            return Next::Done;
        }
        let pos = chunk.offset + done as u64;
        if pos >= self.file_len {
            // The aligned tail past EOF (validate() allowed at most up to the next ALIGN
            // boundary): zero it so the buffer never shows stale bytes.
            // SAFETY: done < chunk.len, and chunk.dst is valid for chunk.len bytes by the submit
            // contract; nobody else touches them until the batch completes.
            unsafe { std::ptr::write_bytes(chunk.dst.add(done), 0, chunk.len - done) };
            return Next::Done;
        }
        if last == 0 || (self.direct && !done.is_multiple_of(ALIGN)) {
            return Next::Fail(IoError::ShortRead {
                path: self.path.clone(),
                offset: op.file_offset,
                len: op.len,
                got: (chunk.offset - op.file_offset) as usize + done,
            });
        }
        Next::Again
    }

    pub fn read_error(&self, op: &ReadOp, source: std::io::Error) -> IoError {
        IoError::Read { path: self.path.clone(), offset: op.file_offset, len: op.len, source }
    }

    pub fn register(&self, id: u64, n_ops: usize, then: Option<Then>) {
        let then = match (n_ops, then) {
            // Nothing to read: the step runs now.
            (0, Some(t)) => {
                t();
                None
            }
            (_, t) => t,
        };
        let mut st = self.lock();
        if n_ops == 0 {
            st.stats.batches += 1;
        }
        st.batches.insert(id, Batch { remaining: n_ops, error: None, then });
    }

    /// A batch rejected before any I/O.
    pub fn register_failed(&self, id: u64, n_ops: u64, err: IoError) {
        let mut st = self.lock();
        st.stats.batches += 1;
        st.stats.ops += n_ops;
        st.stats.errors += n_ops;
        st.batches.insert(id, Batch { remaining: 0, error: Some(err), then: None });
        drop(st);
        self.done.notify_all();
    }

    /// A registered batch whose ops never reached a backend.
    pub fn fail_batch(&self, id: u64, err: IoError) {
        let mut st = self.lock();
        if let Some(b) = st.batches.get_mut(&id) {
            let n = std::mem::take(&mut b.remaining) as u64;
            b.error.get_or_insert(err);
            st.stats.ops += n;
            st.stats.errors += n;
            st.stats.batches += 1;
        }
        drop(st);
        self.done.notify_all();
    }

    /// One op of batch `id` has finished (all its chunks), with this outcome.
    pub fn finish_op(&self, id: u64, len: usize, result: Result<(), IoError>) {
        let mut st = self.lock();
        st.stats.ops += 1;
        match &result {
            Ok(()) => st.stats.bytes += len as u64,
            Err(_) => st.stats.errors += 1,
        }
        // The last op of a batch that succeeded runs its completion step first, outside the lock.
        let then = match st.batches.get_mut(&id) {
            Some(b) => {
                if let Err(e) = result {
                    b.error.get_or_insert(e);
                }
                if b.remaining <= 1 && b.error.is_none() {
                    b.then.take()
                } else {
                    None
                }
            }
            None => None,
        };
        if let Some(t) = then {
            drop(st);
            let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(t)).is_ok();
            st = self.lock();
            if !ok {
                let err = IoError::Completion { path: self.path.clone() };
                if let Some(b) = st.batches.get_mut(&id) {
                    b.error.get_or_insert(err);
                }
            }
        }
        let mut complete = false;
        if let Some(b) = st.batches.get_mut(&id) {
            b.remaining = b.remaining.saturating_sub(1);
            complete = b.remaining == 0;
        }
        if complete {
            st.stats.batches += 1;
            st.cancelled.remove(&id);
            drop(st);
            self.done.notify_all();
        }
    }

    /// Drop the ops of batch `id` that have not started; the batch then fails with
    /// `IoError::Cancelled` unless every op had already started.
    pub fn cancel(&self, id: u64) {
        let mut st = self.lock();
        if st.batches.get(&id).is_some_and(|b| b.remaining > 0) {
            st.cancelled.insert(id);
        }
    }

    /// Whether an op of batch `id` about to start should be dropped instead.
    pub fn is_cancelled(&self, id: u64) -> bool {
        self.lock().cancelled.contains(&id)
    }

    /// The error a dropped op finishes with.
    pub fn cancelled_error(&self) -> IoError {
        IoError::Cancelled { path: self.path.clone() }
    }

    /// Whether batch `id` has finished: `None` while ops are in flight, else whether every op
    /// succeeded (an unknown batch counts as failed). Does not consume the batch.
    pub fn finished(&self, id: u64) -> Option<bool> {
        let st = self.lock();
        match st.batches.get(&id) {
            None => Some(false),
            Some(b) if b.remaining == 0 => Some(b.error.is_none()),
            Some(_) if st.gone => Some(false),
            Some(_) => None,
        }
    }

    pub fn wait(&self, id: u64) -> Result<(), IoError> {
        let mut st = self.lock();
        loop {
            match st.batches.get(&id) {
                None => return Err(IoError::UnknownTicket { path: self.path.clone(), ticket: id }),
                Some(b) if b.remaining == 0 => {
                    let b = st.batches.remove(&id);
                    return b.and_then(|b| b.error).map_or(Ok(()), Err);
                }
                Some(_) if st.gone => {
                    return Err(IoError::ServiceGone { path: self.path.clone() });
                }
                Some(_) => st = self.done.wait(st).unwrap_or_else(|e| e.into_inner()),
            }
        }
    }

    /// A reader started reading (busy time runs while any reader is active).
    pub fn busy_enter(&self) {
        let mut st = self.lock();
        if st.active == 0 {
            st.busy_since = Some(Instant::now());
        }
        st.active += 1;
    }

    pub fn busy_exit(&self) {
        let mut st = self.lock();
        st.active = st.active.saturating_sub(1);
        if st.active == 0 {
            if let Some(t) = st.busy_since.take() {
                st.stats.busy_s += t.elapsed().as_secs_f64();
            }
        }
    }

    pub fn stats(&self) -> IoStats {
        let st = self.lock();
        let mut s = st.stats;
        if let Some(t) = st.busy_since {
            s.busy_s += t.elapsed().as_secs_f64();
        }
        s
    }

    /// A reader thread ended (normally or by panic): waiters must not block forever.
    pub fn mark_gone(&self) {
        self.lock().gone = true;
        self.done.notify_all();
    }
}

/// Marks the service gone when a reader thread exits, even by unwinding.
pub(super) struct GoneGuard<'a>(pub &'a Shared);

impl Drop for GoneGuard<'_> {
    fn drop(&mut self) {
        self.0.mark_gone();
    }
}
