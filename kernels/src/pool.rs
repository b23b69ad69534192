//! The CPU lane's persistent worker pool: one job at a time, run by the calling thread and
//! `threads() - 1` workers that stay hot between jobs.
//!
//! A job is a closure called once per participant with its index (`0` is the caller). The caller
//! publishes the job by bumping an epoch counter; workers spin on that counter for [`SPIN`] after
//! their last job and only then park on a condition variable, so the ops of one layer (matmuls,
//! norms, rope, GLU, attention) follow each other without a wake-up per op. The caller waits for
//! the others by spinning on a counter of pending participants. Work is split statically
//! ([`for_range`]: participant `i` takes the `i`-th of `n` equal parts) or claimed from an atomic
//! counter ([`for_each_dynamic`], for tasks of uneven cost).
//!
//! Jobs never nest: a job that calls into the pool (or a second thread that finds the pool busy,
//! e.g. tests running in parallel) runs its work inline on its own thread, with the same results —
//! every kernel's output is independent of how its work is split.

use std::cell::{Cell, UnsafeCell};
use std::ops::Range;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks. Longer than the gap between two ops of a layer
/// (a few µs of caller-side work: quantizing a row, routing), far shorter than a token.
const SPIN: Duration = Duration::from_micros(200);

/// A job: called with the participant index.
type JobFn<'a> = dyn Fn(usize) + Sync + 'a;

/// State shared by the caller and the workers of one pool.
struct Shared {
    /// Bumped once per job; workers run the job when it changes.
    epoch: AtomicU64,
    /// The current job (lifetime erased): written by the caller before the epoch is bumped, read
    /// by workers after they see the new epoch, valid until `pending` reaches zero.
    job: UnsafeCell<Option<*const JobFn<'static>>>,
    /// Participants of the current job (the caller included).
    active: AtomicUsize,
    /// Workers that have not finished the current job.
    pending: AtomicUsize,
    /// Workers parked on `cv` (the caller only takes the lock to notify when this is non-zero).
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    cv: Condvar,
    shutdown: AtomicBool,
    /// The payload of a panic in a worker's part of the current job.
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

// SAFETY: `job` is written only by the thread holding the pool's submit lock, before the epoch
// store (Release) that publishes it, and read by workers only after the matching Acquire load; the
// pointee is `Sync`. Every other field is a sync primitive.
unsafe impl Sync for Shared {}
// SAFETY: as above; the raw pointer is only dereferenced under that protocol.
unsafe impl Send for Shared {}

/// A started pool: shared state and the worker threads (indices `1..threads`).
struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Participants (workers + caller) actually running.
    threads: usize,
    /// Participants asked for when started.
    requested: usize,
}

impl Pool {
    fn start(threads: usize) -> Pool {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            active: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            cv: Condvar::new(),
            shutdown: AtomicBool::new(false),
            panic: Mutex::new(None),
        });
        let workers = (1..threads)
            .filter_map(|i| {
                let s = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("pshard-cpu-{i}"))
                    .spawn(move || worker(s, i))
                    .ok()
            })
            .collect::<Vec<_>>();
        // A worker that could not be spawned shrinks the pool instead of failing the engine.
        let running = workers.len() + 1;
        Pool {
            shared,
            workers,
            threads: running,
            requested: threads,
        }
    }

    fn stop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let _g = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.cv.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }

    /// Runs `f(i)` for `i in 0..n` (`n <= threads`), `f(0)` on the calling thread.
    fn run(&self, n: usize, f: &JobFn) {
        let s = &*self.shared;
        // SAFETY: lifetime erasure only; the pointer is dereferenced by workers strictly before
        // they decrement `pending`, and this function does not return before `pending` is zero,
        // so `f` outlives every use.
        let ptr: *const JobFn<'static> = unsafe { std::mem::transmute(f as *const JobFn) };
        // SAFETY: we hold the submit lock and every worker is idle (pending was zero when the
        // last job returned), so nobody reads `job` while it is written.
        unsafe { *s.job.get() = Some(ptr) };
        s.active.store(n, Ordering::Relaxed);
        s.pending.store(self.threads - 1, Ordering::Relaxed);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.cv.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| with_in_job(|| f(0))));
        let mut spins = 0u32;
        while s.pending.load(Ordering::Acquire) != 0 {
            spins = spins.wrapping_add(1);
            if spins < 1 << 14 {
                std::hint::spin_loop();
            } else {
                // A descheduled worker (more runnable threads than cores): let it run.
                std::thread::yield_now();
            }
        }
        let theirs = s.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Err(p) = mine {
            resume_unwind(p);
        }
        if let Some(p) = theirs {
            resume_unwind(p);
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.stop();
    }
}

thread_local! {
    /// Whether this thread is running part of a pool job (nested calls then run inline).
    static IN_JOB: Cell<bool> = const { Cell::new(false) };
}

fn with_in_job<R>(f: impl FnOnce() -> R) -> R {
    let was = IN_JOB.with(|c| c.replace(true));
    let r = f();
    IN_JOB.with(|c| c.set(was));
    r
}

fn worker(s: Arc<Shared>, index: usize) {
    IN_JOB.with(|c| c.set(true));
    let mut seen = 0u64;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen {
                seen = e;
                break;
            }
            if s.shutdown.load(Ordering::Relaxed) {
                return;
            }
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) && start.elapsed() > SPIN {
                let mut g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                s.sleepers.fetch_add(1, Ordering::SeqCst);
                while s.epoch.load(Ordering::SeqCst) == seen && !s.shutdown.load(Ordering::SeqCst) {
                    g = s.cv.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                s.sleepers.fetch_sub(1, Ordering::SeqCst);
            }
        }
        if index < s.active.load(Ordering::Relaxed) {
            // SAFETY: the epoch load (Acquire) above synchronises with the caller's store after
            // it wrote `job`; the caller keeps the closure alive until `pending` reaches zero.
            let job = unsafe { *s.job.get() };
            if let Some(job) = job {
                // SAFETY: see above: the closure is alive and `Sync`.
                let f = unsafe { &*job };
                if let Err(p) = catch_unwind(AssertUnwindSafe(|| f(index))) {
                    *s.panic.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
                }
            }
        }
        s.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The process-wide pool (started on first use with every core).
fn global() -> &'static Mutex<Option<Pool>> {
    static POOL: OnceLock<Mutex<Option<Pool>>> = OnceLock::new();
    POOL.get_or_init(|| Mutex::new(None))
}

/// Threads the pool is (or will be) started with.
static THREADS: AtomicUsize = AtomicUsize::new(0);

/// The number of CPU cores this process may use.
pub fn available_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// What [`set_threads`] did with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThreadCount {
    /// Threads asked for (0 = all cores).
    pub requested: usize,
    /// Threads the pool runs with: the request, capped at [`available_cores`].
    pub used: usize,
}

impl ThreadCount {
    /// A note for the user when the request was capped, e.g. "-t 2000 is more than the 2 cores
    /// this machine has: using 2 threads".
    pub fn capped_note(&self) -> Option<String> {
        (self.requested > self.used).then(|| {
            format!(
                "{} threads requested, more than the {} CPU cores this process may use: using {}",
                self.requested,
                available_cores(),
                self.used
            )
        })
    }
}

/// Sets the pool's thread count (the caller included): `0` means all cores, more than the cores
/// is capped at them (more threads than cores only adds descheduled workers that the others wait
/// for). Restarts the pool if it runs with another count; waits for a running job to finish.
pub fn set_threads(requested: usize) -> ThreadCount {
    let cores = available_cores();
    let used = if requested == 0 {
        cores
    } else {
        requested.min(cores)
    };
    let mut g = global().lock().unwrap_or_else(|e| e.into_inner());
    THREADS.store(used, Ordering::SeqCst);
    if g.as_ref().is_some_and(|p| p.requested != used) {
        *g = None;
    }
    ThreadCount { requested, used }
}

/// Threads a job is split over (the caller included).
pub fn threads() -> usize {
    match THREADS.load(Ordering::Relaxed) {
        0 => available_cores(),
        n => n,
    }
}

/// Runs `f(i, n)` once for every participant `i in 0..n` of a pool job, `n = threads()` (or 1
/// when called from inside a job, or while another thread's job holds the pool: the work then
/// runs on the calling thread, `f(i, n)` for every `i` in turn). Returns when all have finished;
/// a panic in any participant is re-raised here.
pub fn run(f: impl Fn(usize, usize) + Sync) {
    let n = threads();
    if n <= 1 || IN_JOB.with(|c| c.get()) {
        for i in 0..n.max(1) {
            with_in_job(|| f(i, n.max(1)));
        }
        return;
    }
    let mut g = match global().try_lock() {
        Ok(g) => g,
        Err(TryLockError::Poisoned(e)) => e.into_inner(),
        Err(TryLockError::WouldBlock) => {
            for i in 0..n {
                with_in_job(|| f(i, n));
            }
            return;
        }
    };
    if g.as_ref().is_none_or(|p| p.requested != n) {
        *g = Some(Pool::start(n));
    }
    let pool = g.as_ref().expect("started above");
    let m = pool.threads.min(n);
    if m < n {
        // Fewer workers than asked (spawn failed): still call every index.
        pool.run(m, &|i| {
            let mut k = i;
            while k < n {
                f(k, n);
                k += m;
            }
        });
    } else {
        pool.run(n, &|i| f(i, n));
    }
}

/// The `i`-th of `n` near-equal parts of `0..len`, boundaries at multiples of `align` (except
/// `len` itself).
pub fn part(len: usize, align: usize, i: usize, n: usize) -> Range<usize> {
    let align = align.max(1);
    let units = len.div_ceil(align);
    let at = |k: usize| (units * k / n * align).min(len);
    at(i)..at(i + 1)
}

/// Static partition: calls `f(range)` for each participant's part of `0..len` (parts aligned to
/// `align`; empty parts are skipped). Runs on the calling thread alone when `len` is at most
/// `align` (one part).
pub fn for_range(len: usize, align: usize, f: impl Fn(Range<usize>) + Sync) {
    if len <= align.max(1) {
        if len > 0 {
            f(0..len);
        }
        return;
    }
    run(|i, n| {
        let r = part(len, align, i, n);
        if !r.is_empty() {
            f(r);
        }
    });
}

/// Dynamic partition: calls `f(task)` for every `task in 0..n_tasks`, participants claiming tasks
/// from a shared counter (for tasks of uneven cost). Order of calls is unspecified.
pub fn for_each_dynamic(n_tasks: usize, f: impl Fn(usize) + Sync) {
    for_each_dynamic_init(n_tasks, || (), |_, t| f(t));
}

/// [`for_each_dynamic`] with per-participant state: each participant calls `init()` once (if it
/// gets a task) and passes its state to every `f(&mut state, task)` it runs.
pub fn for_each_dynamic_init<S>(
    n_tasks: usize,
    init: impl Fn() -> S + Sync,
    f: impl Fn(&mut S, usize) + Sync,
) {
    if n_tasks <= 1 {
        if n_tasks == 1 {
            f(&mut init(), 0);
        }
        return;
    }
    let next = AtomicUsize::new(0);
    run(|_, _| {
        let mut state = None;
        loop {
            let t = next.fetch_add(1, Ordering::Relaxed);
            if t >= n_tasks {
                break;
            }
            f(state.get_or_insert_with(&init), t);
        }
    });
}

/// A raw view of a mutable slice that pool participants write disjoint parts of.
///
/// Participants of a job get `&self` only; each must touch a range no other participant touches
/// (the partition functions above hand out disjoint ranges).
pub struct SharedSlice<'a, T> {
    ptr: *mut T,
    len: usize,
    _life: std::marker::PhantomData<&'a mut [T]>,
}

// SAFETY: a SharedSlice only hands out sub-slices through the unsafe `range_mut`, whose caller
// promises disjointness; with that, sharing it between threads is sharing `&mut` to disjoint
// parts of a `Send` slice.
unsafe impl<T: Send> Sync for SharedSlice<'_, T> {}
// SAFETY: as above.
unsafe impl<T: Send> Send for SharedSlice<'_, T> {}

impl<'a, T> SharedSlice<'a, T> {
    /// Wraps `s` for the duration of a job.
    pub fn new(s: &'a mut [T]) -> Self {
        SharedSlice {
            ptr: s.as_mut_ptr(),
            len: s.len(),
            _life: std::marker::PhantomData,
        }
    }

    /// Length of the slice.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the slice is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The elements `r` of the slice, mutably.
    ///
    /// # Safety
    /// No other live reference (from any thread) may overlap `r` while the result lives.
    ///
    /// # Panics
    /// If `r` is out of bounds.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn range_mut(&self, r: Range<usize>) -> &mut [T] {
        assert!(
            r.start <= r.end && r.end <= self.len,
            "range {r:?} out of {}",
            self.len
        );
        // SAFETY: in bounds (checked); disjointness is the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(r.start), r.end - r.start) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_and_align() {
        for len in [0usize, 1, 5, 64, 1000, 1027] {
            for n in 1..6 {
                let mut end = 0;
                for i in 0..n {
                    let r = part(len, 4, i, n);
                    assert_eq!(r.start, end, "len {len} n {n} part {i}");
                    assert!(r.start % 4 == 0 || r.start == len);
                    end = r.end;
                }
                assert_eq!(end, len);
            }
        }
    }

    #[test]
    fn every_task_runs_once_and_panics_propagate() {
        let counts: Vec<AtomicUsize> = (0..1000).map(|_| AtomicUsize::new(0)).collect();
        for _ in 0..50 {
            for_each_dynamic(counts.len(), |t| {
                counts[t].fetch_add(1, Ordering::Relaxed);
            });
        }
        assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 50));
        let sum = AtomicUsize::new(0);
        for_range(1000, 8, |r| {
            sum.fetch_add(r.len(), Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 1000);
        let r = catch_unwind(|| {
            run(|i, n| {
                if i + 1 == n {
                    panic!("participant {i} fails");
                }
            })
        });
        assert!(r.is_err());
        // The pool still works after a panic.
        let sum = AtomicUsize::new(0);
        run(|_, _| {
            sum.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), threads());
    }

    #[test]
    fn nested_jobs_run_inline() {
        let sum = AtomicUsize::new(0);
        run(|_, _| {
            for_range(100, 1, |r| {
                sum.fetch_add(r.len(), Ordering::Relaxed);
            });
        });
        assert_eq!(sum.load(Ordering::Relaxed), 100 * threads());
    }

    #[test]
    fn thread_count_is_capped_at_the_cores() {
        let t = set_threads(100_000);
        assert_eq!(t.used, available_cores());
        assert!(t.capped_note().is_some());
        let t = set_threads(0);
        assert_eq!(t.used, available_cores());
        assert_eq!(t.capped_note(), None);
    }
}
