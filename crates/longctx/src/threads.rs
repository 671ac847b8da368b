//! A small fork-join pool for the forward pass.
//!
//! Hand-written rather than rayon because a decoded token runs ~150 parallel regions of a few
//! microseconds each; waking workers through a general work-stealing scheduler costs a visible
//! share of that (candle#3134 measured multi-threaded decode slower than single-threaded). Here
//! workers spin briefly on an epoch counter between regions, then park so an idle engine uses no
//! CPU.

use std::cell::UnsafeCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle, Thread};

/// Spins before a waiting thread starts yielding its core: covers the serial work between two
/// regions of one forward pass (a few microseconds) on an otherwise idle machine.
const SPIN_LIMIT: u32 = 20_000;
/// Yields before a worker parks. Yielding keeps wake-up cheap when the machine is oversubscribed
/// (parallel tests, a benchmark beside a build), where spinning would steal the time slice of the
/// very thread being waited for; parking afterwards makes an idle engine use no CPU.
const YIELD_LIMIT: u32 = 2_000;

type Job = dyn Fn(usize, usize) + Sync;

struct Shared {
    /// Set by `run` before the epoch is bumped; read by workers after they observe the bump.
    job: UnsafeCell<*const Job>,
    epoch: AtomicU64,
    remaining: AtomicUsize,
    panicked: AtomicBool,
    shutdown: AtomicBool,
    sleeping: Vec<AtomicBool>,
}

// SAFETY: `job` is written only by the thread inside `run` while no worker reads it (all workers
// have finished the previous epoch), and read by workers only between the epoch bump and their
// decrement of `remaining`, during which `run` keeps the pointee alive and does not write.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

/// A fixed set of threads that run one closure on every thread at once.
///
/// Threads that share a pool (a server's sessions) take turns: one region runs at a time.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<(JoinHandle<()>, Thread)>,
    /// Held by the caller whose region is running: `Shared` has room for one job at a time.
    running: Mutex<()>,
}

impl ThreadPool {
    /// A pool of `n` threads in all: the caller's thread and `n - 1` workers.
    pub fn new(n: usize) -> Self {
        let n = n.max(1);
        let noop: &Job = &|_, _| {};
        let shared = Arc::new(Shared {
            job: UnsafeCell::new(noop as *const Job),
            epoch: AtomicU64::new(0),
            remaining: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            sleeping: (0..n).map(|_| AtomicBool::new(false)).collect(),
        });
        let workers = (1..n)
            .map(|index| {
                let shared = shared.clone();
                let handle = thread::Builder::new()
                    .name(format!("longctx-{index}"))
                    .spawn(move || worker_loop(&shared, index, n))
                    .unwrap_or_else(|e| panic!("cannot start a worker thread: {e}"));
                let thread = handle.thread().clone();
                (handle, thread)
            })
            .collect();
        Self {
            shared,
            workers,
            running: Mutex::new(()),
        }
    }

    /// Threads in the pool, the caller's included.
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `job(thread_index, n_threads)` on every thread and returns when all have finished.
    pub fn run(&self, job: &(dyn Fn(usize, usize) + Sync)) {
        let n = self.threads();
        if n == 1 {
            job(0, 1);
            return;
        }
        // A panicking job leaves nothing half done: its region was waited for before it unwound.
        let _turn = self
            .running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // SAFETY: see `Shared`; the lifetime is erased because we wait below for every worker
        // to finish with the pointer before returning.
        unsafe {
            *self.shared.job.get() =
                std::mem::transmute::<*const (dyn Fn(usize, usize) + Sync + '_), *const Job>(job);
        }
        self.shared.remaining.store(n - 1, Ordering::SeqCst);
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        for (index, (_, thread)) in self.workers.iter().enumerate() {
            if self.shared.sleeping[index + 1].load(Ordering::SeqCst) {
                thread.unpark();
            }
        }
        let mine = catch_unwind(AssertUnwindSafe(|| job(0, n)));
        let mut spins = 0u32;
        while self.shared.remaining.load(Ordering::Acquire) != 0 {
            if spins < SPIN_LIMIT {
                spins += 1;
                std::hint::spin_loop();
            } else {
                thread::yield_now();
            }
        }
        if let Err(payload) = mine {
            std::panic::resume_unwind(payload);
        }
        if self.shared.panicked.swap(false, Ordering::SeqCst) {
            panic!("a longctx worker thread panicked");
        }
    }

    /// Splits `0..len` into one contiguous range per thread and runs `job` on each.
    pub fn for_ranges(&self, len: usize, job: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
        self.run(&|index, n| {
            let range = split_range(len, index, n);
            if !range.is_empty() {
                job(range);
            }
        });
    }
}

/// The `index`-th of `n` near-equal contiguous parts of `0..len`.
pub fn split_range(len: usize, index: usize, n: usize) -> std::ops::Range<usize> {
    let base = len / n;
    let extra = len % n;
    let start = index * base + index.min(extra);
    let end = start + base + usize::from(index < extra);
    start..end
}

fn worker_loop(shared: &Shared, index: usize, n: usize) {
    let mut seen = 0u64;
    loop {
        let mut spins = 0u32;
        loop {
            let epoch = shared.epoch.load(Ordering::Acquire);
            if epoch != seen {
                seen = epoch;
                break;
            }
            if shared.shutdown.load(Ordering::Acquire) {
                return;
            }
            spins += 1;
            if spins < SPIN_LIMIT {
                std::hint::spin_loop();
                continue;
            }
            if spins < SPIN_LIMIT + YIELD_LIMIT {
                thread::yield_now();
                continue;
            }
            shared.sleeping[index].store(true, Ordering::SeqCst);
            if shared.epoch.load(Ordering::SeqCst) == seen
                && !shared.shutdown.load(Ordering::SeqCst)
            {
                thread::park();
            }
            shared.sleeping[index].store(false, Ordering::SeqCst);
            spins = 0;
        }
        // SAFETY: see `Shared`.
        let job = unsafe { &**shared.job.get() };
        if catch_unwind(AssertUnwindSafe(|| job(index, n))).is_err() {
            shared.panicked.store(true, Ordering::SeqCst);
        }
        shared.remaining.fetch_sub(1, Ordering::Release);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        for (handle, thread) in self.workers.drain(..) {
            thread.unpark();
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn every_index_runs_once_per_call() {
        let pool = ThreadPool::new(3);
        let hits: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
        for _ in 0..1000 {
            pool.run(&|i, n| {
                assert_eq!(n, 3);
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
        }
        for h in &hits {
            assert_eq!(h.load(Ordering::Relaxed), 1000);
        }
    }

    #[test]
    fn ranges_cover_everything_once() {
        for len in [0, 1, 2, 7, 100] {
            for n in 1..5 {
                let mut covered = vec![0; len];
                for i in 0..n {
                    for j in split_range(len, i, n) {
                        covered[j] += 1;
                    }
                }
                assert!(covered.iter().all(|&c| c == 1), "len {len} n {n}");
            }
        }
    }

    #[test]
    fn threads_sharing_a_pool_take_turns() {
        let pool = ThreadPool::new(3);
        let hits: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..500 {
                        pool.run(&|i, _| {
                            hits[i].fetch_add(1, Ordering::Relaxed);
                        });
                    }
                });
            }
        });
        for h in &hits {
            assert_eq!(h.load(Ordering::Relaxed), 2000);
        }
    }

    #[test]
    fn workers_wake_after_parking() {
        let pool = ThreadPool::new(2);
        let count = AtomicUsize::new(0);
        pool.run(&|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        pool.run(&|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 4);
    }
}
