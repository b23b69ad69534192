//! A submission thread: one OS thread that owns some state (the GPU engine: its CUDA context,
//! streams, weights and programs) and runs the jobs sent to it, in order.
//!
//! Issuing GPU work costs host time (a few µs per kernel launch, more for a graph's first
//! capture). With the GPU's state on its own thread, the thread that asks for the work gets a
//! [`Pending`] back at once and is free for CPU steps (tokenizing, sampling, CPU-placed layers of
//! a hybrid plan) while the launches are issued and the GPU runs; in turn, nothing the CPU side
//! does delays the issuing. CUDA contexts are current per thread, so creating the state on the
//! thread that uses it (see [`SubmitThread::spawn`]) keeps every CUDA call on one thread.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::thread::JoinHandle;

/// A job as queued: runs with the state, or (after a panic) is answered with the panic without
/// running; returns the panic it raised, if any.
type Job<S> = Box<dyn FnOnce(Result<&mut S, &SubmitError>) -> Option<SubmitError> + Send>;

/// Why a job gave no result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// An earlier or this job panicked; the state may be inconsistent, so the thread refuses
    /// further work.
    #[error("the {thread} thread stopped after a panic: {message}")]
    Panicked {
        /// Thread name.
        thread: String,
        /// The panic's message.
        message: String,
    },
    /// The thread is gone (its state failed to build, or it was shut down).
    #[error("the {0} thread is not running")]
    Gone(String),
}

/// The result of a submitted job, to be collected later.
#[must_use = "a job's result is only known through its Pending"]
pub struct Pending<R> {
    rx: mpsc::Receiver<Result<R, SubmitError>>,
    thread: String,
}

impl<R> Pending<R> {
    /// Waits for the job and returns its result.
    pub fn wait(self) -> Result<R, SubmitError> {
        match self.rx.recv() {
            Ok(r) => r,
            Err(_) => Err(SubmitError::Gone(self.thread)),
        }
    }

    /// The result if the job has finished, else `Ok(None)` without waiting.
    pub fn try_take(&mut self) -> Result<Option<R>, SubmitError> {
        match self.rx.try_recv() {
            Ok(r) => r.map(Some),
            Err(mpsc::TryRecvError::Empty) => Ok(None),
            Err(mpsc::TryRecvError::Disconnected) => Err(SubmitError::Gone(self.thread.clone())),
        }
    }
}

/// One thread owning a state of type `S` and running submitted jobs on it in submission order.
/// Dropping it lets the queued jobs finish, then drops the state on its thread and joins.
pub struct SubmitThread<S> {
    tx: Option<mpsc::Sender<Job<S>>>,
    handle: Option<JoinHandle<()>>,
    name: String,
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

impl<S: 'static> SubmitThread<S> {
    /// Starts thread `name` and builds its state there with `init`; returns once `init` has
    /// finished, with its error if it failed. `S` need not be `Send`: it never leaves the thread.
    pub fn spawn<E, F>(name: &str, init: F) -> Result<SubmitThread<S>, E>
    where
        E: Send + 'static + From<SubmitError>,
        F: FnOnce() -> Result<S, E> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel::<Job<S>>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), E>>();
        let thread_name = name.to_string();
        let handle = std::thread::Builder::new()
            .name(format!("pshard-{name}"))
            .spawn(move || {
                let state = match catch_unwind(AssertUnwindSafe(init)) {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                    Err(p) => {
                        let _ = ready_tx.send(Err(E::from(SubmitError::Panicked {
                            thread: thread_name,
                            message: panic_message(p.as_ref()),
                        })));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                run_jobs(state, rx);
            })
            .map_err(|e| E::from(SubmitError::Gone(format!("{name} ({e})"))))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(SubmitThread {
                tx: Some(tx),
                handle: Some(handle),
                name: name.to_string(),
            }),
            Ok(Err(e)) => {
                let _ = handle.join();
                Err(e)
            }
            Err(_) => {
                let _ = handle.join();
                Err(E::from(SubmitError::Gone(name.to_string())))
            }
        }
    }

    /// Queues `job`; returns at once. Jobs run one at a time in submission order. A job that
    /// panics is reported through its [`Pending`], and every later job is refused with
    /// [`SubmitError::Panicked`].
    pub fn submit<R, F>(&self, job: F) -> Pending<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut S) -> R + Send + 'static,
    {
        let (rtx, rrx) = mpsc::channel();
        let thread = self.name.clone();
        let boxed: Job<S> = Box::new(move |state| match state {
            Err(poison) => {
                let _ = rtx.send(Err(poison.clone()));
                None
            }
            Ok(s) => match catch_unwind(AssertUnwindSafe(|| job(s))) {
                Ok(r) => {
                    let _ = rtx.send(Ok(r));
                    None
                }
                Err(p) => {
                    let e = SubmitError::Panicked {
                        thread,
                        message: panic_message(p.as_ref()),
                    };
                    let _ = rtx.send(Err(e.clone()));
                    Some(e)
                }
            },
        });
        if let Some(tx) = &self.tx {
            // A send error means the thread is gone; the dropped reply sender reports it.
            let _ = tx.send(boxed);
        }
        Pending {
            rx: rrx,
            thread: self.name.clone(),
        }
    }

    /// Runs `job` on the thread and waits for its result.
    pub fn call<R, F>(&self, job: F) -> Result<R, SubmitError>
    where
        R: Send + 'static,
        F: FnOnce(&mut S) -> R + Send + 'static,
    {
        self.submit(job).wait()
    }

    /// The thread's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// The thread's loop: runs jobs until every sender is gone; after a panic, answers each later
/// job with that panic instead of running it on a state that may be inconsistent.
fn run_jobs<S>(mut state: S, rx: mpsc::Receiver<Job<S>>) {
    let mut poisoned: Option<SubmitError> = None;
    while let Ok(job) = rx.recv() {
        match &poisoned {
            Some(e) => {
                job(Err(e));
            }
            None => poisoned = job(Ok(&mut state)),
        }
    }
}

impl<S> Drop for SubmitThread<S> {
    fn drop(&mut self) {
        // Closing the channel ends the loop once the queued jobs have run.
        self.tx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier};

    #[derive(Debug, PartialEq)]
    enum TestError {
        Init(String),
        Submit(SubmitError),
    }
    impl From<SubmitError> for TestError {
        fn from(e: SubmitError) -> Self {
            TestError::Submit(e)
        }
    }

    fn counter() -> SubmitThread<Vec<u32>> {
        SubmitThread::spawn::<TestError, _>("test", || Ok(Vec::new())).unwrap()
    }

    #[test]
    fn jobs_run_in_submission_order_on_one_thread() {
        let t = counter();
        let caller = std::thread::current().id();
        let pending: Vec<_> = (0..100u32)
            .map(|i| {
                t.submit(move |v: &mut Vec<u32>| {
                    v.push(i);
                    (v.len(), std::thread::current().id())
                })
            })
            .collect();
        let mut ids = Vec::new();
        for (i, p) in pending.into_iter().enumerate() {
            let (len, id) = p.wait().unwrap();
            assert_eq!(len, i + 1, "job {i} saw the state of another order");
            ids.push(id);
        }
        assert!(ids.iter().all(|&id| id == ids[0] && id != caller));
        assert_eq!(t.call(|v| v.clone()).unwrap(), (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn submit_returns_before_the_job_runs() {
        // The job blocks until the caller, after submit has returned, reaches the barrier: if
        // submit waited for the job this would deadlock (the test would hang, not pass).
        let t = counter();
        let gate = Arc::new(Barrier::new(2));
        let g = gate.clone();
        let mut p = t.submit(move |v: &mut Vec<u32>| {
            g.wait();
            v.push(7);
            v.len()
        });
        // Not finished: it is parked on the barrier.
        assert_eq!(p.try_take().unwrap(), None);
        // CPU work on the caller's thread meanwhile.
        let cpu: u64 = (0..1000u64).sum();
        gate.wait();
        assert_eq!(p.wait().unwrap(), 1);
        assert_eq!(cpu, 499_500);
    }

    #[test]
    fn init_errors_and_panics_are_returned() {
        let e = SubmitThread::<u8>::spawn::<TestError, _>("bad", || {
            Err(TestError::Init("no device".into()))
        })
        .err()
        .unwrap();
        assert_eq!(e, TestError::Init("no device".into()));
        let e = SubmitThread::<u8>::spawn::<TestError, _>("boom", || panic!("init exploded"))
            .err()
            .unwrap();
        match e {
            TestError::Submit(SubmitError::Panicked { thread, message }) => {
                assert_eq!(thread, "boom");
                assert!(message.contains("init exploded"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_panicking_job_poisons_the_thread() {
        let t = counter();
        t.call(|v| v.push(1)).unwrap();
        let r = t.call(|_: &mut Vec<u32>| -> u32 { panic!("kernel failed") });
        let expected = SubmitError::Panicked {
            thread: "test".into(),
            message: "kernel failed".into(),
        };
        assert_eq!(r, Err(expected.clone()));
        // Later jobs are refused, not run on a possibly inconsistent state.
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let r2 = ran.clone();
        let r = t.call(move |v| {
            r2.store(true, std::sync::atomic::Ordering::SeqCst);
            v.len()
        });
        assert_eq!(r, Err(expected));
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[test]
    fn drop_finishes_queued_jobs() {
        let done = Arc::new(std::sync::atomic::AtomicU32::new(0));
        {
            let t = counter();
            for _ in 0..10 {
                let d = done.clone();
                let _ = t.submit(move |_| {
                    d.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                });
            }
        }
        assert_eq!(done.load(std::sync::atomic::Ordering::SeqCst), 10);
    }
}
