//! The CPU lane's persistent worker pool: one job at a time, run by the calling thread and
//! `threads() - 1` workers that stay hot between jobs.
//!
//! A job is a number of tasks and a closure called once per task. The caller publishes the job by
//! bumping an epoch counter; workers spin on that counter for [`SPIN`] after their last job and
//! only then park on a condition variable, so the ops of one layer (matmuls, norms, rope, GLU,
//! attention) follow each other without a wake-up per op. Everyone, the caller included, claims
//! tasks from one atomic counter, and the caller waits only for tasks others have claimed: a
//! worker that is descheduled (more runnable threads than cores, as on a shared machine) never
//! holds up an op — the caller takes its share. Measured on the 2-core dev VM under load ~10:
//! with a fixed share per worker, every op waited for the other thread to be scheduled (SmolLM2
//! tg16 7.3 t/s against rayon's 41.7); with claimed tasks it no longer does.
//!
//! Work is split into tasks by [`for_range`] (contiguous parts of a range, a few per thread) or
//! [`for_each_dynamic`] (one task per item, for items of uneven cost).
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
const SPIN: Duration = Duration::from_micros(100);

/// Tasks per thread when a range is split ([`for_range`]): enough for the caller to absorb the
/// share of a worker that is not running, few enough to keep each task's rows contiguous.
const TASKS_PER_THREAD: usize = 4;

/// A job's task body: called with the task index.
type JobFn<'a> = dyn Fn(usize) + Sync + 'a;

/// State shared by the caller and the workers of one pool.
struct Shared {
    /// Bumped once per job; workers look for work when it changes.
    epoch: AtomicU64,
    /// The current job (lifetime erased): written by the caller while `closed` is set and no
    /// worker is `inside`, read by workers after they entered and saw `closed` clear.
    job: UnsafeCell<Option<*const JobFn<'static>>>,
    /// Tasks of the current job.
    n_tasks: AtomicUsize,
    /// Next unclaimed task.
    next: AtomicUsize,
    /// Tasks finished.
    done: AtomicUsize,
    /// Set when the current job is over (or none is published).
    closed: AtomicBool,
    /// Workers that entered the current job and have not left it.
    inside: AtomicUsize,
    /// Workers parked on `cv` (the caller only takes the lock to notify when this is non-zero).
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    cv: Condvar,
    shutdown: AtomicBool,
    /// The payload of a panic in a task.
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

// SAFETY: `job` is written only by the thread holding the pool's submit lock while `closed` is
// set and `inside` is zero, and read only by workers that incremented `inside` and then saw
// `closed` clear (SeqCst on both sides orders these); the pointee is `Sync`. Every other field is
// a sync primitive.
unsafe impl Sync for Shared {}
// SAFETY: as above; the raw pointer is only dereferenced under that protocol.
unsafe impl Send for Shared {}

impl Shared {
    /// Claims and runs tasks of the current job until none is left.
    fn work(&self, f: &JobFn) {
        let n = self.n_tasks.load(Ordering::Relaxed);
        loop {
            let t = self.next.fetch_add(1, Ordering::Relaxed);
            if t >= n {
                break;
            }
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| f(t))) {
                *self.panic.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
            }
            self.done.fetch_add(1, Ordering::Release);
        }
    }
}

/// Spins on `cond` briefly, then yields the CPU between checks (the awaited thread may need it).
fn wait_until(cond: impl Fn() -> bool) {
    let mut spins = 0u32;
    while !cond() {
        spins = spins.wrapping_add(1);
        if spins < 1 << 12 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

/// A started pool: shared state and the worker threads (indices `1..threads`).
struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Participants (workers + caller) asked for when started.
    requested: usize,
}

impl Pool {
    fn start(threads: usize) -> Pool {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            n_tasks: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            closed: AtomicBool::new(true),
            inside: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            cv: Condvar::new(),
            shutdown: AtomicBool::new(false),
            panic: Mutex::new(None),
        });
        // A worker that could not be spawned shrinks the pool instead of failing the engine
        // (the caller claims its tasks).
        let workers = (1..threads)
            .filter_map(|i| {
                let s = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("pshard-cpu-{i}"))
                    .spawn(move || worker(s))
                    .ok()
            })
            .collect::<Vec<_>>();
        Pool {
            shared,
            workers,
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

    /// Runs `f(t)` for every `t in 0..n_tasks`, the calling thread claiming tasks too.
    fn run(&self, n_tasks: usize, f: &JobFn) {
        let s = &*self.shared;
        // SAFETY: lifetime erasure only; workers dereference the pointer only between entering
        // (inside + 1, closed clear) and leaving (inside − 1), and this function does not return
        // before the job is closed and no worker is inside, so `f` outlives every use.
        let ptr: *const JobFn<'static> = unsafe { std::mem::transmute(f as *const JobFn) };
        // SAFETY: we hold the submit lock; the previous job is closed and no worker is inside
        // (the previous call waited for that), so nobody reads `job` while it is written.
        unsafe { *s.job.get() = Some(ptr) };
        s.n_tasks.store(n_tasks, Ordering::Relaxed);
        s.next.store(0, Ordering::Relaxed);
        s.done.store(0, Ordering::Relaxed);
        s.closed.store(false, Ordering::SeqCst);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.cv.notify_all();
        }
        with_in_job(|| s.work(f));
        // Tasks others claimed; a worker that has not shown up has claimed none.
        wait_until(|| s.done.load(Ordering::Acquire) >= n_tasks);
        s.closed.store(true, Ordering::SeqCst);
        wait_until(|| s.inside.load(Ordering::SeqCst) == 0);
        // SAFETY: closed and nobody inside: no worker reads `job` any more.
        unsafe { *s.job.get() = None };
        let p = s.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(p) = p {
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

fn worker(s: Arc<Shared>) {
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
        s.inside.fetch_add(1, Ordering::SeqCst);
        if !s.closed.load(Ordering::SeqCst) {
            // SAFETY: entered (inside + 1) and saw the job open: the caller neither rewrites
            // `job` nor returns (dropping the closure) until we leave.
            let job = unsafe { *s.job.get() };
            if let Some(job) = job {
                // SAFETY: see above: the closure is alive and `Sync`.
                s.work(unsafe { &*job });
            }
        }
        s.inside.fetch_sub(1, Ordering::SeqCst);
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

/// Runs `f(i, n)` once for every `i in 0..n`, `n = threads()`, as one pool job (each call a task:
/// any participant may run any `i`; 1 when called from inside a job, or while another thread's job
/// holds the pool: then everything runs on the calling thread). Returns when all have finished; a
/// panic in any of them is re-raised here.
pub fn run(f: impl Fn(usize, usize) + Sync) {
    let n = threads();
    run_tasks(n, &|i| f(i, n));
}

/// Runs `f(t)` for every `t in 0..n_tasks` as one pool job.
fn run_tasks(n_tasks: usize, f: &JobFn) {
    if n_tasks == 0 {
        return;
    }
    let n = threads();
    if n <= 1 || n_tasks == 1 || IN_JOB.with(|c| c.get()) {
        with_in_job(|| (0..n_tasks).for_each(f));
        return;
    }
    let mut g = match global().try_lock() {
        Ok(g) => g,
        Err(TryLockError::Poisoned(e)) => e.into_inner(),
        Err(TryLockError::WouldBlock) => {
            with_in_job(|| (0..n_tasks).for_each(f));
            return;
        }
    };
    if g.as_ref().is_none_or(|p| p.requested != n) {
        *g = Some(Pool::start(n));
    }
    g.as_ref().expect("started above").run(n_tasks, f);
}

/// The `i`-th of `n` near-equal parts of `0..len`, boundaries at multiples of `align` (except
/// `len` itself).
pub fn part(len: usize, align: usize, i: usize, n: usize) -> Range<usize> {
    let align = align.max(1);
    let units = len.div_ceil(align);
    let at = |k: usize| (units * k / n * align).min(len);
    at(i)..at(i + 1)
}

/// Calls `f(range)` for contiguous parts of `0..len` (boundaries at multiples of `align`), about
/// [`TASKS_PER_THREAD`] per thread, as one pool job. Runs on the calling thread alone when `len`
/// is at most `align` (one part).
pub fn for_range(len: usize, align: usize, f: impl Fn(Range<usize>) + Sync) {
    let units = len.div_ceil(align.max(1));
    let tasks = units.min(threads() * TASKS_PER_THREAD);
    if tasks <= 1 {
        if len > 0 {
            f(0..len);
        }
        return;
    }
    run_tasks(tasks, &|t| {
        let r = part(len, align, t, tasks);
        if !r.is_empty() {
            f(r);
        }
    });
}

/// Calls `f(task)` for every `task in 0..n_tasks`, one pool task each (for tasks of uneven
/// cost). Order of calls is unspecified.
pub fn for_each_dynamic(n_tasks: usize, f: impl Fn(usize) + Sync) {
    run_tasks(n_tasks, &f);
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
                    assert!(r.start.is_multiple_of(4) || r.start == len);
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
