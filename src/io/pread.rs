//! The fallback reader: a few threads each doing blocking `pread` of whole ops. Same semantics
//! as the io_uring thread (validation, EOF tail, short reads) through `Shared`.

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::Sender;

use super::shared::{GoneGuard, Job, Next, Queues, Shared};
use super::{IoError, Urgency};

pub(super) struct PreadPool {
    /// (urgent, background) queues.
    tx: Option<(Sender<Job>, Sender<Job>)>,
    threads: Vec<JoinHandle<()>>,
}

impl PreadPool {
    pub fn start(shared: &Arc<Shared>, n_threads: usize) -> Result<PreadPool, IoError> {
        let (urgent_tx, urgent) = crossbeam_channel::unbounded::<Job>();
        let (background_tx, background) = crossbeam_channel::unbounded::<Job>();
        let mut pool = PreadPool { tx: Some((urgent_tx, background_tx)), threads: Vec::new() };
        for i in 0..n_threads.max(1) {
            let sh = Arc::clone(shared);
            let q = Queues { urgent: urgent.clone(), background: background.clone() };
            let spawned = std::thread::Builder::new().name(format!("moerun-pread-{i}")).spawn(move || worker(&sh, &q));
            match spawned {
                Ok(h) => pool.threads.push(h),
                Err(source) => {
                    pool.shutdown();
                    return Err(IoError::Thread { path: shared.path.clone(), source });
                }
            }
        }
        Ok(pool)
    }

    /// Queues the jobs; false if the workers are gone.
    pub fn send(&self, jobs: Vec<Job>, urgency: Urgency) -> bool {
        let Some((urgent, background)) = &self.tx else { return false };
        let tx = if urgency == Urgency::Urgent { urgent } else { background };
        jobs.into_iter().all(|job| tx.send(job).is_ok())
    }

    /// Closes the queue; workers finish every queued job, then exit and are joined.
    pub fn shutdown(&mut self) {
        self.tx = None;
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

fn worker(shared: &Shared, queues: &Queues<Job>) {
    let _guard = GoneGuard(shared);
    // `None`: both queues closed and drained.
    while let Some(job) = queues.recv() {
        if shared.is_cancelled(job.batch) {
            shared.finish_op(job.batch, job.op.len, Err(shared.cancelled_error()));
            continue;
        }
        shared.busy_enter();
        let result = shared.chunks(&job.op).try_for_each(|chunk| read_chunk(shared, &job, chunk));
        shared.busy_exit();
        shared.finish_op(job.batch, job.op.len, result);
    }
}

fn read_chunk(shared: &Shared, job: &Job, chunk: super::shared::Chunk) -> Result<(), IoError> {
    // SAFETY: by IoService::submit's contract chunk.dst (inside job.op.dst) is valid for
    // chunk.len bytes and nobody else reads or writes them until the batch completes.
    let buf = unsafe { std::slice::from_raw_parts_mut(chunk.dst, chunk.len) };
    let mut done = 0usize;
    loop {
        let last = match shared.file.read_at(&mut buf[done..], chunk.offset + done as u64) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::Interrupted) => continue,
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
            Err(e) => return Err(shared.read_error(&job.op, e)),
        };
        done += last;
        match shared.after_read(&job.op, &chunk, done, last) {
            Next::Done => return Ok(()),
            Next::Again => {}
            Next::Fail(e) => return Err(e),
        }
    }
}
