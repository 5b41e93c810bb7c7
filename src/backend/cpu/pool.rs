//! A persistent pool of compute threads for the CPU kernels. Workers spin briefly between jobs
//! (a decode step issues many small jobs) and sleep on a condition variable when idle.
//! Invariant: `run` returns only after every thread has finished the job, so jobs may borrow.

use std::cell::UnsafeCell;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

type Job = dyn Fn(usize) + Sync;

/// How long a worker spins for the next job before it sleeps.
const SPIN_ITERS: u32 = 1 << 12;

struct Shared {
    epoch: AtomicU64,
    /// The current job, valid while `epoch` is odd-numbered-newer than a worker's last seen value
    /// and until `done` reaches the worker count.
    job: UnsafeCell<Option<*const Job>>,
    done: AtomicUsize,
    quit: AtomicBool,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the thread holding `ThreadPool::caller` before it publishes a
// new epoch (Release) and read by workers only after they observe that epoch (Acquire); it is
// never written while any worker may read it, because `run` waits for all of them first.
unsafe impl Sync for Shared {}
// SAFETY: as above; the raw job pointer is only dereferenced under that protocol.
unsafe impl Send for Shared {}

/// A fixed set of threads that run one job at a time, each call with its thread index.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    caller: Mutex<()>,
}

impl ThreadPool {
    /// A pool of `n_threads` threads in all: the calling thread plus `n_threads - 1` workers.
    pub fn new(n_threads: usize) -> ThreadPool {
        let n_threads = n_threads.max(1);
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            done: AtomicUsize::new(0),
            quit: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let workers = (1..n_threads)
            .map(|idx| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("moerun-cpu-{idx}"))
                    .spawn(move || worker(&shared, idx))
                    .expect("failed to spawn a compute thread")
            })
            .collect();
        ThreadPool { shared, workers, caller: Mutex::new(()) }
    }

    pub fn n_threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Run `f(thread_index)` once on every thread of the pool (index 0 is the caller) and wait.
    pub fn run(&self, f: &(dyn Fn(usize) + Sync)) {
        if self.workers.is_empty() {
            f(0);
            return;
        }
        let _guard = self.caller.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: erase the borrow's lifetime; workers use the pointer only until `done` reaches
        // the worker count, and we do not return before that.
        let ptr: *const Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static Job>(f) };
        // SAFETY: no worker reads `job` now: all finished the previous job (we waited for it).
        unsafe { *self.shared.job.get() = Some(ptr) };
        self.shared.done.store(0, Ordering::Relaxed);
        // SeqCst on both sides of this store→load / store→load pair (here and in `worker`) so a
        // worker going to sleep either sees the new epoch or is seen as a sleeper.
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        if self.shared.sleepers.load(Ordering::SeqCst) > 0 {
            let _l = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        f(0);
        let n = self.workers.len();
        let mut spins = 0u32;
        while self.shared.done.load(Ordering::Acquire) < n {
            spins = spins.wrapping_add(1);
            if spins % 1024 == 0 {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// Split `0..n` into chunks of `chunk` items handed out dynamically to the threads.
    pub fn for_chunks(&self, n: usize, chunk: usize, f: &(dyn Fn(Range<usize>) + Sync)) {
        let chunk = chunk.max(1);
        if self.workers.is_empty() || n <= chunk {
            if n > 0 {
                f(0..n);
            }
            return;
        }
        let next = AtomicUsize::new(0);
        self.run(&|_| loop {
            let start = next.fetch_add(chunk, Ordering::Relaxed);
            if start >= n {
                break;
            }
            f(start..(start + chunk).min(n));
        });
    }

    /// Split `0..n` into one contiguous range per thread, each walked front to back one item at
    /// a time; a thread that finishes its range takes the remaining items of the others'. Each
    /// thread streams through its own stretch of memory (the hardware prefetcher keeps up), and
    /// a thread slowed by the host still gets help at the end.
    pub fn for_each_affine(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        let nt = self.n_threads();
        if nt == 1 || n <= 1 {
            (0..n).for_each(f);
            return;
        }
        let ends: Vec<usize> = (1..=nt).map(|t| n * t / nt).collect();
        let cursors: Vec<PaddedCursor> = (0..nt).map(|t| PaddedCursor(AtomicUsize::new(n * t / nt))).collect();
        self.run(&|ti| {
            for k in 0..nt {
                let t = (ti + k) % nt;
                loop {
                    let i = cursors[t].0.fetch_add(1, Ordering::Relaxed);
                    if i >= ends[t] {
                        break;
                    }
                    f(i);
                }
            }
        });
    }
}

/// A cursor on its own cache line, so threads claiming from their own ranges do not contend.
#[repr(align(128))]
struct PaddedCursor(AtomicUsize);

fn worker(shared: &Shared, idx: usize) {
    let mut seen = 0u64;
    loop {
        let mut spins = 0u32;
        loop {
            if shared.quit.load(Ordering::Acquire) {
                return;
            }
            if shared.epoch.load(Ordering::Acquire) != seen {
                break;
            }
            if spins < SPIN_ITERS {
                spins += 1;
                std::hint::spin_loop();
            } else {
                let guard = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
                shared.sleepers.fetch_add(1, Ordering::SeqCst);
                let guard = shared
                    .wake
                    .wait_while(guard, |_| {
                        shared.epoch.load(Ordering::SeqCst) == seen && !shared.quit.load(Ordering::Acquire)
                    })
                    .unwrap_or_else(|e| e.into_inner());
                shared.sleepers.fetch_sub(1, Ordering::AcqRel);
                drop(guard);
            }
        }
        seen = shared.epoch.load(Ordering::Acquire);
        // SAFETY: the epoch we observed was published after `job` was written, and the caller
        // keeps the closure alive until we bump `done`.
        if let Some(job) = unsafe { *shared.job.get() } {
            // SAFETY: see above.
            unsafe { (*job)(idx) };
        }
        shared.done.fetch_add(1, Ordering::Release);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.quit.store(true, Ordering::Release);
        {
            let _l = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_runs_every_job() {
        let pool = ThreadPool::new(3);
        for _ in 0..1000 {
            let hits = AtomicUsize::new(0);
            pool.run(&|_| {
                hits.fetch_add(1, Ordering::Relaxed);
            });
            assert_eq!(hits.load(Ordering::Relaxed), 3);
        }
    }

    #[test]
    fn chunks_cover_the_range_once() {
        let pool = ThreadPool::new(2);
        let seen: Vec<AtomicUsize> = (0..1001).map(|_| AtomicUsize::new(0)).collect();
        pool.for_chunks(1001, 7, &|r| {
            for i in r {
                seen[i].fetch_add(1, Ordering::Relaxed);
            }
        });
        assert!(seen.iter().all(|s| s.load(Ordering::Relaxed) == 1));
    }

    #[test]
    fn affine_items_run_once() {
        for n_threads in [1, 2, 3] {
            let pool = ThreadPool::new(n_threads);
            for n in [0, 1, 2, 5, 1001] {
                let seen: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                pool.for_each_affine(n, &|i| {
                    seen[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(seen.iter().all(|s| s.load(Ordering::Relaxed) == 1), "{n_threads} threads, {n} items");
            }
        }
    }

    #[test]
    fn sleeping_workers_wake_up() {
        let pool = ThreadPool::new(2);
        std::thread::sleep(std::time::Duration::from_millis(50));
        let hits = AtomicUsize::new(0);
        pool.run(&|_| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 2);
    }
}
