//! The io_uring reader: one thread owns the ring, keeps up to `queue_depth` reads in flight,
//! refills as completions arrive, resubmits short reads and EAGAIN/EINTR. New batches wake it
//! through an eventfd polled inside the ring, so a batch never waits for an unrelated completion.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use io_uring::{opcode, types, IoUring};

use super::shared::{Chunk, GoneGuard, Job, Next, Shared};
use super::{IoError, Urgency};

/// user_data of the eventfd poll; read slots use their index.
const WAKE: u64 = u64::MAX;

enum Msg {
    Batch(Vec<Job>, Urgency),
    /// Move a batch's queued background reads ahead of the other background ones.
    Promote(u64),
    Shutdown,
}

pub(super) struct UringThread {
    tx: Sender<Msg>,
    wake: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl UringThread {
    /// Creates the ring (the probe: fails where io_uring is not permitted), checks it completes
    /// a no-op, and starts the thread.
    pub fn start(shared: &Arc<Shared>, queue_depth: usize) -> Result<UringThread, IoError> {
        let uring_err = |source| IoError::Uring { path: shared.path.clone(), source };
        let entries = u32::try_from(queue_depth + 1).unwrap_or(u32::MAX).next_power_of_two();
        let mut ring = IoUring::new(entries).map_err(uring_err)?;
        probe_nop(&mut ring).map_err(uring_err)?;
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked below.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(uring_err(std::io::Error::last_os_error()));
        }
        // SAFETY: efd is a freshly created descriptor owned by nobody else.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(efd) });
        let (tx, rx) = crossbeam_channel::unbounded();
        let (sh, wk) = (Arc::clone(shared), Arc::clone(&wake));
        let thread = std::thread::Builder::new()
            .name("moerun-uring".into())
            .spawn(move || {
                let _guard = GoneGuard(&sh);
                Reader::new(&sh, ring, wk.as_raw_fd(), queue_depth).run(&rx);
            })
            .map_err(|source| IoError::Thread { path: shared.path.clone(), source })?;
        Ok(UringThread { tx, wake, thread: Some(thread) })
    }

    /// Queues a batch and wakes the thread; false if the thread is gone.
    pub fn send(&self, jobs: Vec<Job>, urgency: Urgency) -> bool {
        let ok = self.tx.send(Msg::Batch(jobs, urgency)).is_ok();
        self.kick();
        ok
    }

    /// Asks the thread to take batch `id`'s queued reads as urgent.
    pub fn promote(&self, id: u64) {
        if self.tx.send(Msg::Promote(id)).is_ok() {
            self.kick();
        }
    }

    fn kick(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own. A failure (counter
        // saturated: a wake-up is already pending) is harmless.
        unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Lets the thread finish every queued and in-flight read, then joins it.
    pub fn shutdown(&mut self) {
        let _ = self.tx.send(Msg::Shutdown);
        self.kick();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn probe_nop(ring: &mut IoUring) -> std::io::Result<()> {
    let nop = opcode::Nop::new().build().user_data(WAKE);
    // SAFETY: a no-op references no memory.
    unsafe { ring.submission().push(&nop) }.map_err(|_| std::io::Error::other("submission queue full"))?;
    ring.submit_and_wait(1)?;
    let cqe = ring.completion().next();
    match cqe.map(|c| c.result()) {
        Some(r) if r >= 0 => Ok(()),
        Some(r) => Err(std::io::Error::from_raw_os_error(-r)),
        None => Err(std::io::Error::other("no completion for a no-op")),
    }
}

/// An op being read: its chunks in flight or queued, and its first error.
struct OpState {
    job: Job,
    chunks_left: usize,
    error: Option<IoError>,
}

/// One chunk of an op (index into `ops`), `done` bytes of it read so far.
#[derive(Clone, Copy)]
struct Piece {
    op: usize,
    chunk: Chunk,
    done: usize,
}

struct Reader<'a> {
    shared: &'a Shared,
    ring: IoUring,
    fd: RawFd,
    wake_fd: RawFd,
    wake_armed: bool,
    /// Op table (slab) and its free indices.
    ops: Vec<Option<OpState>>,
    free_ops: Vec<usize>,
    /// In-flight pieces by slot (user_data), and free slots.
    slots: Vec<Option<Piece>>,
    free_slots: Vec<usize>,
    /// Queued pieces: urgent ones, then background ones (a resubmitted remainder goes first).
    pending: VecDeque<Piece>,
    background: VecDeque<Piece>,
    in_flight: usize,
    shutting_down: bool,
}

impl<'a> Reader<'a> {
    fn new(shared: &'a Shared, ring: IoUring, wake_fd: RawFd, qd: usize) -> Reader<'a> {
        Reader {
            shared,
            ring,
            fd: shared.file.as_raw_fd(),
            wake_fd,
            wake_armed: false,
            ops: Vec::new(),
            free_ops: Vec::new(),
            slots: vec![None; qd],
            free_slots: (0..qd).rev().collect(),
            pending: VecDeque::new(),
            background: VecDeque::new(),
            in_flight: 0,
            shutting_down: false,
        }
    }

    fn run(mut self, rx: &Receiver<Msg>) {
        loop {
            if self.in_flight == 0 && self.pending.is_empty() && self.background.is_empty() {
                if self.shutting_down {
                    break;
                }
                // Idle: block on the queue rather than the ring.
                match rx.recv() {
                    Ok(msg) => self.take(msg),
                    Err(_) => self.shutting_down = true,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(msg) => self.take(msg),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        self.shutting_down = true;
                        break;
                    }
                }
            }
            self.fill();
            if self.in_flight == 0 {
                continue;
            }
            if !self.wake_armed && !self.shutting_down {
                self.arm_wake();
            }
            self.submit_and_wait();
            self.reap();
        }
    }

    fn take(&mut self, msg: Msg) {
        match msg {
            Msg::Shutdown => self.shutting_down = true,
            Msg::Promote(id) => {
                let ops = &self.ops;
                let of_batch = |p: &Piece| ops[p.op].as_ref().is_some_and(|s| s.job.batch == id);
                let (mine, rest): (VecDeque<Piece>, VecDeque<Piece>) = self.background.drain(..).partition(of_batch);
                self.background = rest;
                self.pending.extend(mine);
            }
            Msg::Batch(jobs, urgency) => {
                for job in jobs {
                    let chunks: Vec<Chunk> = self.shared.chunks(&job.op).collect();
                    let state = OpState { job, chunks_left: chunks.len(), error: None };
                    let op = match self.free_ops.pop() {
                        Some(i) => {
                            self.ops[i] = Some(state);
                            i
                        }
                        None => {
                            self.ops.push(Some(state));
                            self.ops.len() - 1
                        }
                    };
                    let queue = if urgency == Urgency::Urgent { &mut self.pending } else { &mut self.background };
                    queue.extend(chunks.into_iter().map(|chunk| Piece { op, chunk, done: 0 }));
                }
            }
        }
    }

    /// Pushes queued pieces into free slots until the ring holds `qd` reads.
    fn fill(&mut self) {
        while !self.free_slots.is_empty() {
            let Some(piece) = self.pending.pop_front().or_else(|| self.background.pop_front()) else {
                break;
            };
            // A cancelled batch's pieces not started yet are dropped (only a fresh piece: a
            // resubmitted remainder has already written part of its chunk).
            let batch = self.ops[piece.op].as_ref().map(|s| s.job.batch);
            if piece.done == 0 && batch.is_some_and(|b| self.shared.is_cancelled(b)) {
                self.chunk_done(piece.op, Some(self.shared.cancelled_error()));
                continue;
            }
            let Some(slot) = self.free_slots.pop() else {
                break;
            };
            let remaining = piece.chunk.len - piece.done;
            let sqe = opcode::Read::new(
                types::Fd(self.fd),
                piece.chunk.dst.wrapping_add(piece.done),
                remaining as u32, // chunk.len <= MAX_CHUNK < 2^32
            )
            .offset(piece.chunk.offset + piece.done as u64)
            .build()
            .user_data(slot as u64);
            // SAFETY: the destination [dst+done, dst+len) lies in the op's buffer, which by
            // IoService::submit's contract stays valid and untouched until its batch completes;
            // the batch cannot complete before this read's completion is reaped.
            if unsafe { self.ring.submission().push(&sqe) }.is_err() {
                // Cannot happen (ring entries > qd); keep the piece for the next round.
                self.free_slots.push(slot);
                self.pending.push_front(piece);
                break;
            }
            self.slots[slot] = Some(piece);
            if self.in_flight == 0 {
                self.shared.busy_enter();
            }
            self.in_flight += 1;
        }
    }

    fn arm_wake(&mut self) {
        let poll = opcode::PollAdd::new(types::Fd(self.wake_fd), libc::POLLIN as u32).build().user_data(WAKE);
        // SAFETY: a poll references no memory of ours.
        if unsafe { self.ring.submission().push(&poll) }.is_ok() {
            self.wake_armed = true;
        }
    }

    fn submit_and_wait(&mut self) {
        let mut hard_errors = 0u32;
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => return,
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // Completion queue busy: reaping frees room.
                    Some(libc::EBUSY) | Some(libc::EAGAIN) => return,
                    _ => {
                        // Reads already in the kernel will still complete into caller memory,
                        // so we must keep waiting for them; back off and log.
                        hard_errors += 1;
                        if hard_errors.is_power_of_two() {
                            tracing::error!("{}: io_uring_enter: {e}", self.shared.path.display());
                        }
                        std::thread::sleep(std::time::Duration::from_millis(1));
                        if !self.ring.completion().is_empty() {
                            return;
                        }
                    }
                },
            }
        }
    }

    fn reap(&mut self) {
        let cqes: Vec<(u64, i32)> = self.ring.completion().map(|c| (c.user_data(), c.result())).collect();
        for (ud, res) in cqes {
            if ud == WAKE {
                self.wake_armed = false;
                let mut v = 0u64;
                // SAFETY: reads 8 bytes into a live u64 from our non-blocking eventfd;
                // EAGAIN (already drained) is fine.
                unsafe { libc::read(self.wake_fd, (&mut v as *mut u64).cast(), 8) };
                continue;
            }
            let slot = ud as usize;
            let Some(mut piece) = self.slots.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            self.free_slots.push(slot);
            self.in_flight -= 1;
            if self.in_flight == 0 {
                self.shared.busy_exit();
            }
            let Some(op) = self.ops[piece.op].as_ref().map(|s| s.job.op) else {
                continue;
            };
            let outcome = if res < 0 {
                match -res {
                    libc::EAGAIN | libc::EINTR => Next::Again,
                    errno => Next::Fail(self.shared.read_error(&op, std::io::Error::from_raw_os_error(errno))),
                }
            } else {
                piece.done += res as usize;
                self.shared.after_read(&op, &piece.chunk, piece.done, res as usize)
            };
            match outcome {
                // Resubmit the remainder ahead of other queued work.
                Next::Again => self.pending.push_front(piece),
                Next::Done => self.chunk_done(piece.op, None),
                Next::Fail(e) => self.chunk_done(piece.op, Some(e)),
            }
        }
    }

    fn chunk_done(&mut self, op: usize, error: Option<IoError>) {
        let Some(state) = self.ops[op].as_mut() else {
            return;
        };
        if let Some(e) = error {
            state.error.get_or_insert(e);
        }
        state.chunks_left -= 1;
        if state.chunks_left == 0 {
            if let Some(state) = self.ops[op].take() {
                self.free_ops.push(op);
                let result = state.error.map_or(Ok(()), Err);
                self.shared.finish_op(state.job.batch, state.job.op.len, result);
            }
        }
    }
}
