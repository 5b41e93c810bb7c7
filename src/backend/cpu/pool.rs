//! A persistent pool of compute threads for the CPU kernels. A forward pass issues many small
//! jobs (tens per token on a small model), so a hand-off must cost no more than an atomic store
//! and a cache-line transfer: workers spin between jobs, and sleep only when no job came for
//! `IDLE_SPIN` and nobody holds the pool [`Hot`]. Waking a sleeping worker goes through the
//! kernel and, on a VM, through the hypervisor: measured here at up to 4 ms a token when workers
//! slept between a generation's jobs.
//!
//! A job whose work any subset of threads can finish (`for_chunks`, `for_each_affine`: threads
//! claim items from shared cursors) does not wait for a worker that has not started it: the
//! caller closes the job once its own share is done and waits only for workers that joined in.
//! On a shared VM a vCPU can be descheduled for milliseconds; without this, every job waits for
//! it.
//! Invariant: `run` returns only after every thread that runs the job has finished it (and no
//! thread starts it afterwards), so jobs may borrow.

use std::cell::UnsafeCell;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;

type Job = dyn Fn(usize) + Sync;

/// How long an idle worker keeps spinning for the next job before it sleeps (unless held hot).
/// Longer than any gap between the jobs of one token (sampling, routing, norms), short enough
/// that an idle server does not burn a core.
const IDLE_SPIN: Duration = Duration::from_millis(2);

/// Spins between looks at the clock.
const SPINS_PER_CHECK: u32 = 256;

struct Shared {
    /// Bumped by `run` to publish a job; workers spin on it (its own cache line).
    epoch: CachePadded<AtomicU64>,
    /// Workers that finished the current job (its own cache line: written by every worker).
    done: CachePadded<AtomicUsize>,
    /// For a shareable job: `CLOSED` once the caller stops waiting for latecomers, plus the
    /// number of workers that joined before that.
    joined: CachePadded<AtomicUsize>,
    /// Whether the current job may be finished by any subset of the threads.
    shareable: AtomicBool,
    /// The current job, valid while `epoch` is newer than a worker's last seen value and until
    /// `done` reaches the worker count.
    job: UnsafeCell<Option<*const Job>>,
    quit: AtomicBool,
    /// Holders of [`Hot`]: while non-zero, workers never sleep.
    hot: AtomicUsize,
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

/// Keeps the pool's workers spinning (never sleeping) while it lives: hold it across a run of
/// jobs whose gaps may exceed `IDLE_SPIN` (a generation: sampling, streaming, the next token).
pub struct Hot(Arc<Shared>);

impl Drop for Hot {
    fn drop(&mut self) {
        self.0.hot.fetch_sub(1, Ordering::Release);
    }
}

impl ThreadPool {
    /// A pool of `n_threads` threads in all: the calling thread plus `n_threads - 1` workers.
    pub fn new(n_threads: usize) -> ThreadPool {
        let n_threads = n_threads.max(1);
        let shared = Arc::new(Shared {
            epoch: CachePadded::new(AtomicU64::new(0)),
            done: CachePadded::new(AtomicUsize::new(0)),
            joined: CachePadded::new(AtomicUsize::new(0)),
            shareable: AtomicBool::new(false),
            job: UnsafeCell::new(None),
            quit: AtomicBool::new(false),
            hot: AtomicUsize::new(0),
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

    /// Keep the workers awake until the guard drops (see [`Hot`]); wakes sleeping ones now, so
    /// the first job does not pay for it.
    pub fn hot(&self) -> Hot {
        self.shared.hot.fetch_add(1, Ordering::SeqCst);
        if self.shared.sleepers.load(Ordering::SeqCst) > 0 {
            let _l = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        Hot(Arc::clone(&self.shared))
    }

    /// Run `f(thread_index)` once on every thread of the pool (index 0 is the caller) and wait.
    pub fn run(&self, f: &(dyn Fn(usize) + Sync)) {
        self.dispatch(f, false);
    }

    /// Run `f(thread_index)` on the caller and on every worker that picks it up before the
    /// caller's own call returns; `f` must finish whatever work is left whoever calls it (threads
    /// claim items from shared cursors), so a worker the host has descheduled is not waited for.
    fn run_shared(&self, f: &(dyn Fn(usize) + Sync)) {
        self.dispatch(f, true);
    }

    fn dispatch(&self, f: &(dyn Fn(usize) + Sync), shareable: bool) {
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
        self.shared.joined.store(0, Ordering::Relaxed);
        self.shared.shareable.store(shareable, Ordering::Relaxed);
        // SeqCst on both sides of this store→load / store→load pair (here and in `worker`) so a
        // worker going to sleep either sees the new epoch or is seen as a sleeper.
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        if self.shared.sleepers.load(Ordering::SeqCst) > 0 {
            let _l = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        f(0);
        let n = if shareable {
            // No worker starts the job after this: wait for those that did.
            self.shared.joined.fetch_or(CLOSED, Ordering::AcqRel) & !CLOSED
        } else {
            self.workers.len()
        };
        let mut spins = 0u32;
        while self.shared.done.load(Ordering::Acquire) < n {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(4096) {
                // A worker descheduled by the host: let it have the core.
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
        self.run_shared(&|_| loop {
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
        let cursors: Vec<CachePadded<AtomicUsize>> =
            (0..nt).map(|t| CachePadded::new(AtomicUsize::new(n * t / nt))).collect();
        self.run_shared(&|ti| {
            for k in 0..nt {
                let t = (ti + k) % nt;
                loop {
                    let i = cursors[t].fetch_add(1, Ordering::Relaxed);
                    if i >= ends[t] {
                        break;
                    }
                    f(i);
                }
            }
        });
    }
}

fn worker(shared: &Shared, idx: usize) {
    let mut seen = 0u64;
    loop {
        let mut spins = 0u32;
        let mut idle_since: Option<Instant> = None;
        loop {
            if shared.quit.load(Ordering::Acquire) {
                return;
            }
            if shared.epoch.load(Ordering::Acquire) != seen {
                break;
            }
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(SPINS_PER_CHECK) || shared.hot.load(Ordering::Relaxed) > 0 {
                continue;
            }
            let since = *idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() < IDLE_SPIN {
                continue;
            }
            let guard = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            shared.sleepers.fetch_add(1, Ordering::SeqCst);
            let guard = shared
                .wake
                .wait_while(guard, |_| {
                    shared.epoch.load(Ordering::SeqCst) == seen
                        && !shared.quit.load(Ordering::Acquire)
                        && shared.hot.load(Ordering::SeqCst) == 0
                })
                .unwrap_or_else(|e| e.into_inner());
            shared.sleepers.fetch_sub(1, Ordering::AcqRel);
            drop(guard);
            idle_since = None;
        }
        seen = shared.epoch.load(Ordering::Acquire);
        if shared.shareable.load(Ordering::Relaxed) && !join(shared) {
            // The caller finished this job without us and returned: never touch it.
            continue;
        }
        // SAFETY: the epoch we observed was published after `job` was written, and the caller
        // keeps the closure alive until we bump `done` (for a shareable job, until every worker
        // that joined has: see `join`).
        if let Some(job) = unsafe { *shared.job.get() } {
            // SAFETY: see above.
            unsafe { (*job)(idx) };
        }
        shared.done.fetch_add(1, Ordering::Release);
    }
}

/// Marks a shareable job closed in `Shared::joined`.
const CLOSED: usize = 1 << (usize::BITS - 1);

/// Join the current shareable job unless the caller has closed it.
fn join(shared: &Shared) -> bool {
    let mut s = shared.joined.load(Ordering::Acquire);
    loop {
        if s & CLOSED != 0 {
            return false;
        }
        match shared.joined.compare_exchange_weak(s, s + 1, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return true,
            Err(now) => s = now,
        }
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
    fn sleeping_workers_wake_up_and_hot_ones_never_sleep() {
        let pool = ThreadPool::new(2);
        let sleepers = || pool.shared.sleepers.load(Ordering::SeqCst);
        // However slowly the host schedules it, an idle worker ends up asleep.
        let t0 = Instant::now();
        while sleepers() != 1 {
            assert!(t0.elapsed() < Duration::from_secs(60), "an idle worker never slept");
            std::thread::sleep(IDLE_SPIN);
        }
        let hits = AtomicUsize::new(0);
        pool.run(&|_| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 2);
        let hot = pool.hot();
        let t0 = Instant::now();
        while sleepers() != 0 {
            assert!(t0.elapsed() < Duration::from_secs(60), "holding the pool hot did not wake its worker");
            std::thread::sleep(IDLE_SPIN);
        }
        // A hot worker never reaches the sleeping branch, however long nothing comes.
        std::thread::sleep(IDLE_SPIN * 10);
        assert_eq!(sleepers(), 0, "a hot worker went to sleep");
        drop(hot);
        pool.run(&|_| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 4);
    }
}
