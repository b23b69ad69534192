//! Continuous batching over the engine's sequences (slots), on a thread of its own that owns the
//! [`Engine`].
//!
//! Each step assembles one evaluation: the next token of every decoding sequence, then chunks of
//! waiting prompts until the step budget is full (prompts in arrival order). The batch's token
//! count picks the engine's tier. A new request takes the free slot whose cached tokens share the
//! longest prefix with its prompt; the slot is truncated to that prefix and only the rest is
//! evaluated. A request whose event receiver is dropped (client gone, stop string found, Ctrl-C)
//! is cancelled at the next step and its slot freed; what its sequence had evaluated stays cached
//! for the next request.
//!
//! Results do not depend on what shares a batch as long as the engine's arithmetic is batch
//! invariant (tested on the CPU lane in `runtime/tests/batch_invariance.rs`).

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use pshard_runtime::engine::Engine;
use pshard_runtime::sampler::{Sampler, SamplerParams};
use pshard_runtime::session::{shift_discard, truncate_prompt};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-generation token (it is reported in [`Done::stop_token`], not as a token).
    Stop,
    /// `max_tokens` generated, or the context is full (and no context shift was asked for or
    /// possible).
    Length,
}

impl Finish {
    /// The OpenAI `finish_reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// The end of a generation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Done {
    /// Why it ended.
    pub finish: Finish,
    /// The end-of-generation token that ended it, if one did.
    pub stop_token: Option<u32>,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Of those, tokens reused from the slot's cache (not evaluated).
    pub cached_tokens: usize,
    /// Tokens generated (sent as [`Event::Token`]).
    pub completion_tokens: usize,
    /// Context shifts made while generating.
    pub context_shifts: usize,
}

/// What a request's receiver gets, in order: `Started`, tokens, then `Done` or `Error`.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The request has a slot; `cached` prompt tokens were reused from its cache.
    Started {
        /// The slot (sequence) it runs in.
        slot: usize,
        /// Prompt tokens reused.
        cached: usize,
        /// Prompt tokens cut from the middle to fit the context ([`Request::context_shift`]).
        truncated: usize,
    },
    /// One generated token.
    Token(u32),
    /// Finished.
    Done(Done),
    /// Failed (the engine returned an error or panicked).
    Error(String),
}

/// One generation request.
pub struct Request {
    /// Prompt tokens (at least one).
    pub prompt: Vec<u32>,
    /// Tokens to generate at most (at least one).
    pub max_tokens: usize,
    /// Sampling.
    pub sampler: SamplerParams,
    /// Tokens that end the generation (end-of-generation ids), not sent as tokens.
    pub stop_tokens: Vec<u32>,
    /// Positions a context shift keeps (llama.cpp's `--context-shift`; see
    /// [`pshard_runtime::session::ContextShift::keep_for`]): a sequence whose context fills
    /// discards the older half of the rest and goes on, and a prompt too long for the context is
    /// cut to its first `keep` tokens and its last ones
    /// ([`pshard_runtime::session::truncate_prompt`]). `None`: generation ends at a full
    /// context and a prompt too long is refused.
    pub context_shift: Option<usize>,
}

/// Why a request was not queued.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The waiting queue is full.
    #[error("the server is busy: {0} requests are waiting already")]
    QueueFull(usize),
    /// The prompt does not fit the context with room for one generated token.
    #[error(
        "the prompt has {prompt} tokens but a sequence holds {n_ctx} (one is needed to generate)"
    )]
    TooLong {
        /// Prompt tokens.
        prompt: usize,
        /// Context per sequence.
        n_ctx: usize,
    },
    /// Empty prompt or `max_tokens` of 0.
    #[error("{0}")]
    Invalid(String),
    /// The scheduler has stopped.
    #[error("the scheduler has stopped")]
    Stopped,
}

/// Counters and gauges the scheduler keeps (read by `/metrics`).
#[derive(Default, Debug)]
pub struct Stats {
    /// Requests accepted into the queue.
    pub requests: AtomicU64,
    /// Requests that ended: done, cancelled or failed.
    pub finished: AtomicU64,
    /// Requests cancelled before their end (their receiver was dropped).
    pub cancelled: AtomicU64,
    /// Prompt tokens evaluated.
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens reused from a slot's cache.
    pub cached_tokens: AtomicU64,
    /// Tokens generated.
    pub generated_tokens: AtomicU64,
    /// Engine evaluations.
    pub steps: AtomicU64,
    /// Context shifts made.
    pub context_shifts: AtomicU64,
    /// Nanoseconds spent in evaluations.
    pub busy_ns: AtomicU64,
    /// Requests submitted and not yet in a slot.
    pub waiting: AtomicUsize,
    /// Slots running a request.
    pub busy: AtomicUsize,
    /// Generated tokens per second over the last few seconds of steps (f64 bits).
    pub gen_tps_bits: AtomicU64,
    /// Prompt tokens per second over the last few seconds of steps (f64 bits).
    pub prompt_tps_bits: AtomicU64,
    /// Device memory measured (bytes; 0 without a device).
    pub vram_bytes: AtomicU64,
}

impl Stats {
    /// Generated tokens per second, recently.
    pub fn gen_tps(&self) -> f64 {
        f64::from_bits(self.gen_tps_bits.load(Ordering::Relaxed))
    }
    /// Prompt tokens per second, recently.
    pub fn prompt_tps(&self) -> f64 {
        f64::from_bits(self.prompt_tps_bits.load(Ordering::Relaxed))
    }
}

/// Fixed facts about the engine the scheduler runs.
#[derive(Clone, Debug)]
pub struct EngineInfo {
    /// Sequences (slots).
    pub n_seq: usize,
    /// Context per sequence.
    pub n_ctx: usize,
    /// Vocabulary size.
    pub n_vocab: usize,
    /// Most tokens one evaluation carries.
    pub step_tokens: usize,
    /// KV cache bytes.
    pub kv_bytes: usize,
}

enum Cmd {
    /// A request, the prompt tokens cut to fit the context, its events.
    Submit(Box<Request>, usize, UnboundedSender<Event>),
}

/// A handle to the scheduler thread (cheap to clone).
#[derive(Clone)]
pub struct Scheduler {
    tx: mpsc::Sender<Cmd>,
    /// Counters.
    pub stats: Arc<Stats>,
    /// The engine's shape.
    pub info: EngineInfo,
    max_queue: usize,
}

impl Scheduler {
    /// Starts the scheduler thread over `engine`; at most `max_queue` requests wait for a slot.
    pub fn spawn(engine: Engine, max_queue: usize) -> Scheduler {
        let stats = Arc::new(Stats::default());
        let tiers = engine.tiers();
        // The ubatch the tiers cut their longest prompt into: at most the largest tier's tokens
        // (which also sizes the sliding-window rings), and no fewer than the slots.
        let step_tokens = tiers
            .prompt_ubatch(tiers.max_batch())
            .max(engine.n_seq())
            .min(tiers.max_batch());
        let info = EngineInfo {
            n_seq: engine.n_seq(),
            n_ctx: engine.n_ctx(),
            n_vocab: engine.model.spec.hparams.n_vocab,
            step_tokens,
            kv_bytes: engine.kv_bytes(),
        };
        let (tx, rx) = mpsc::channel();
        let st = stats.clone();
        let inf = info.clone();
        std::thread::Builder::new()
            .name("pshard-scheduler".into())
            .spawn(move || Worker::new(engine, inf, st).run(rx))
            .expect("spawning the scheduler thread");
        Scheduler {
            tx,
            stats,
            info,
            max_queue,
        }
    }

    /// Queues a request; its events arrive on the returned receiver. Dropping the receiver
    /// cancels the request.
    pub fn submit(&self, mut req: Request) -> Result<UnboundedReceiver<Event>, SubmitError> {
        if req.prompt.is_empty() {
            return Err(SubmitError::Invalid("the prompt is empty".into()));
        }
        if req.max_tokens == 0 {
            return Err(SubmitError::Invalid("max_tokens must be at least 1".into()));
        }
        if let Some(&t) = req
            .prompt
            .iter()
            .find(|&&t| t as usize >= self.info.n_vocab)
        {
            return Err(SubmitError::Invalid(format!(
                "token {t} is outside the vocabulary ({} tokens)",
                self.info.n_vocab
            )));
        }
        let n_prompt = req.prompt.len();
        if n_prompt >= self.info.n_ctx {
            match req
                .context_shift
                .and_then(|k| truncate_prompt(&req.prompt, self.info.n_ctx, k))
            {
                Some(p) => req.prompt = p,
                None => {
                    return Err(SubmitError::TooLong {
                        prompt: n_prompt,
                        n_ctx: self.info.n_ctx,
                    })
                }
            }
        }
        let truncated = n_prompt - req.prompt.len();
        // Reserve a place in the queue (released when the request takes a slot).
        let q = &self.stats.waiting;
        let mut cur = q.load(Ordering::Relaxed);
        loop {
            if cur >= self.max_queue {
                return Err(SubmitError::QueueFull(cur));
            }
            match q.compare_exchange(cur, cur + 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        let (etx, erx) = tokio::sync::mpsc::unbounded_channel();
        if self
            .tx
            .send(Cmd::Submit(Box::new(req), truncated, etx))
            .is_err()
        {
            q.fetch_sub(1, Ordering::AcqRel);
            return Err(SubmitError::Stopped);
        }
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        Ok(erx)
    }
}

/// A request in a slot.
struct Job {
    req: Box<Request>,
    events: UnboundedSender<Event>,
    sampler: Sampler,
    /// Prompt tokens in the KV so far.
    prompt_done: usize,
    cached: usize,
    /// Prompt and generated tokens (the penalties' history).
    history: Vec<u32>,
    generated: usize,
    /// Context shifts made.
    shifts: usize,
    /// A sampled token still to evaluate.
    pending: Option<u32>,
}

impl Job {
    /// Its `Done` event.
    fn done(&self, finish: Finish, stop_token: Option<u32>) -> Event {
        Event::Done(Done {
            finish,
            stop_token,
            prompt_tokens: self.req.prompt.len(),
            cached_tokens: self.cached,
            completion_tokens: self.generated,
            context_shifts: self.shifts,
        })
    }
}

struct Slot {
    /// The tokens whose KV the slot's sequence holds (`engine.seq_len(slot)` of them).
    cached: Vec<u32>,
    job: Option<Job>,
    /// When it last finished a job (least recently used slots are taken first).
    last_used: u64,
}

struct Worker {
    engine: Engine,
    info: EngineInfo,
    stats: Arc<Stats>,
    slots: Vec<Slot>,
    waiting: VecDeque<(Box<Request>, usize, UnboundedSender<Event>)>,
    clock: u64,
    /// Rotates which decode rows go first when they exceed a step.
    rr: usize,
    recent: VecDeque<(Instant, usize, usize)>,
}

/// The message a panic carried.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

/// The length of the common prefix of two token lists.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl Worker {
    fn new(engine: Engine, info: EngineInfo, stats: Arc<Stats>) -> Worker {
        let slots = (0..info.n_seq)
            .map(|_| Slot {
                cached: Vec::new(),
                job: None,
                last_used: 0,
            })
            .collect();
        Worker {
            engine,
            info,
            stats,
            slots,
            waiting: VecDeque::new(),
            clock: 0,
            rr: 0,
            recent: VecDeque::new(),
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Cmd>) {
        loop {
            let idle = self.slots.iter().all(|s| s.job.is_none()) && self.waiting.is_empty();
            if idle {
                match rx.recv() {
                    Ok(c) => self.take(c),
                    Err(_) => return,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(c) => self.take(c),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        if self.slots.iter().all(|s| s.job.is_none()) && self.waiting.is_empty() {
                            return;
                        }
                        break;
                    }
                }
            }
            self.drop_cancelled();
            self.admit();
            if self.slots.iter().any(|s| s.job.is_some()) {
                if let Err(msg) = self.guarded_step() {
                    self.fail_all(&msg);
                }
            }
        }
    }

    fn take(&mut self, c: Cmd) {
        match c {
            Cmd::Submit(req, truncated, events) => self.waiting.push_back((req, truncated, events)),
        }
    }

    /// Requests whose receiver is gone: waiting ones leave the queue, running ones free their slot.
    fn drop_cancelled(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|(_, _, ev)| !ev.is_closed());
        let gone = before - self.waiting.len();
        if gone > 0 {
            self.stats.waiting.fetch_sub(gone, Ordering::AcqRel);
            self.stats
                .finished
                .fetch_add(gone as u64, Ordering::Relaxed);
            self.stats
                .cancelled
                .fetch_add(gone as u64, Ordering::Relaxed);
        }
        for i in 0..self.slots.len() {
            if self.slots[i]
                .job
                .as_ref()
                .is_some_and(|j| j.events.is_closed())
            {
                self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                self.release(i);
            }
        }
    }

    /// Frees slot `i` (its cache stays), then sends its job's last event: the counters are
    /// settled before the client can see the end (a client reading the metrics right after its
    /// response saw its sequence still busy when the event went first).
    fn end_job(&mut self, i: usize, last: Event) {
        let events = self.slots[i].job.as_ref().map(|j| j.events.clone());
        self.release(i);
        if let Some(e) = events {
            let _ = e.send(last);
        }
    }

    /// Frees slot `i` (its cache stays).
    fn release(&mut self, i: usize) {
        if self.slots[i].job.take().is_some() {
            self.clock += 1;
            self.slots[i].last_used = self.clock;
            self.stats.busy.fetch_sub(1, Ordering::AcqRel);
            self.stats.finished.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Moves waiting requests into free slots, each into the one caching most of its prompt.
    fn admit(&mut self) {
        while let Some((req, truncated, events)) = self.waiting.pop_front() {
            let free = self
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.job.is_none())
                .map(|(i, s)| (i, common_prefix(&s.cached, &req.prompt), s.last_used))
                .max_by(|a, b| a.1.cmp(&b.1).then(b.2.cmp(&a.2)));
            let Some((i, mut reuse, _)) = free else {
                self.waiting.push_front((req, truncated, events));
                return;
            };
            self.stats.waiting.fetch_sub(1, Ordering::AcqRel);
            // The last prompt token is always evaluated: its logits pick the first token.
            reuse = reuse.min(req.prompt.len() - 1);
            if self.engine.truncate_seq(i, reuse).is_err() {
                reuse = 0;
                self.engine.reset_seq(i);
            }
            let slot = &mut self.slots[i];
            slot.cached.truncate(reuse);
            self.stats
                .cached_tokens
                .fetch_add(reuse as u64, Ordering::Relaxed);
            let _ = events.send(Event::Started {
                slot: i,
                cached: reuse,
                truncated,
            });
            slot.job = Some(Job {
                sampler: Sampler::new(req.sampler.clone()),
                history: req.prompt.clone(),
                events,
                prompt_done: reuse,
                cached: reuse,
                generated: 0,
                shifts: 0,
                pending: None,
                req,
            });
            self.stats.busy.fetch_add(1, Ordering::AcqRel);
        }
    }

    fn guarded_step(&mut self) -> Result<(), String> {
        match catch_unwind(AssertUnwindSafe(|| self.step())) {
            Ok(r) => r,
            Err(p) => Err(format!("the engine panicked: {}", panic_message(&*p))),
        }
    }

    /// Every running request fails with `msg`; every sequence is forgotten (its cells may be
    /// half written).
    fn fail_all(&mut self, msg: &str) {
        for i in 0..self.slots.len() {
            self.end_job(i, Event::Error(msg.to_string()));
            self.slots[i].cached.clear();
            self.engine.reset_seq(i);
        }
    }

    /// One evaluation: decode rows, then prompt chunks, up to the step budget.
    fn step(&mut self) -> Result<(), String> {
        let budget = self.info.step_tokens.max(1);
        let mut tokens = Vec::new();
        let mut seqs = Vec::new();
        // (slot, row) of each logit row wanted.
        let mut want: Vec<(usize, usize)> = Vec::new();
        let n = self.slots.len();
        let start = self.rr % n;
        self.rr = self.rr.wrapping_add(1);
        for k in 0..n {
            let i = (start + k) % n;
            if tokens.len() >= budget {
                break;
            }
            if let Some(t) = self.slots[i].job.as_ref().and_then(|j| j.pending) {
                want.push((i, tokens.len()));
                tokens.push(t);
                seqs.push(i as u32);
            }
        }
        let mut prompt_rows = 0;
        let mut order: Vec<usize> = (0..n)
            .filter(|&i| {
                self.slots[i]
                    .job
                    .as_ref()
                    .is_some_and(|j| j.pending.is_none() && j.prompt_done < j.req.prompt.len())
            })
            .collect();
        // Prompts that started earlier (fewer left) go first: they finish sooner.
        order.sort_by_key(|&i| {
            let j = self.slots[i].job.as_ref().expect("filtered");
            j.req.prompt.len() - j.prompt_done
        });
        let mut chunks: Vec<(usize, usize)> = Vec::new();
        for i in order {
            let room = budget.saturating_sub(tokens.len());
            if room == 0 {
                break;
            }
            let j = self.slots[i].job.as_ref().expect("filtered");
            let left = j.req.prompt.len() - j.prompt_done;
            let take = left.min(room);
            tokens.extend_from_slice(&j.req.prompt[j.prompt_done..j.prompt_done + take]);
            seqs.extend(std::iter::repeat_n(i as u32, take));
            if take == left {
                want.push((i, tokens.len() - 1));
            }
            chunks.push((i, take));
            prompt_rows += take;
        }
        if tokens.is_empty() {
            return Ok(());
        }
        let mut rows: Vec<usize> = want.iter().map(|w| w.1).collect();
        if rows.is_empty() {
            // Only prompt chunks that do not finish their prompt: an evaluation still computes
            // one row of logits (the graph needs one); it is discarded.
            rows.push(tokens.len() - 1);
        }
        let t0 = Instant::now();
        let result = self.engine.eval_batch(&tokens, &seqs, &rows);
        let dt = t0.elapsed();
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                // The rows' sequences are in an unknown state: their requests fail and they are
                // forgotten; other slots go on.
                let mut hit: Vec<usize> = seqs.iter().map(|&s| s as usize).collect();
                hit.dedup();
                for i in hit {
                    self.end_job(i, Event::Error(format!("evaluation failed: {e}")));
                    self.slots[i].cached.clear();
                    self.engine.reset_seq(i);
                }
                return Ok(());
            }
        };
        // Bookkeeping of what the sequences now hold.
        for (&t, &s) in tokens.iter().zip(&seqs) {
            self.slots[s as usize].cached.push(t);
        }
        for (i, take) in chunks {
            if let Some(j) = self.slots[i].job.as_mut() {
                j.prompt_done += take;
            }
        }
        let n_vocab = self.info.n_vocab;
        let decode_rows = want.len();
        let mut generated = 0;
        for (k, (i, _)) in want.into_iter().enumerate() {
            let row = &logits[k * n_vocab..(k + 1) * n_vocab];
            let seq_len = self.engine.seq_len(i);
            let Some(j) = self.slots[i].job.as_mut() else {
                continue;
            };
            j.pending = None;
            let tok = j.sampler.sample(row, &j.history);
            j.history.push(tok);
            // A full sequence with a context shift goes on after the shift (below).
            let mut shift = None;
            let end = if j.req.stop_tokens.contains(&tok) {
                Some(j.done(Finish::Stop, Some(tok)))
            } else {
                j.generated += 1;
                generated += 1;
                let _ = j.events.send(Event::Token(tok));
                let full = seq_len >= self.info.n_ctx;
                let keep = j.req.context_shift.map(|k| k.min(seq_len));
                if j.generated >= j.req.max_tokens {
                    Some(j.done(Finish::Length, None))
                } else if !full {
                    j.pending = Some(tok);
                    None
                } else if let Some(k) = keep.filter(|&k| shift_discard(seq_len, k) > 0) {
                    j.pending = Some(tok);
                    shift = Some(k);
                    None
                } else {
                    Some(j.done(Finish::Length, None))
                }
            };
            if let Some(ev) = end {
                self.end_job(i, ev);
            } else if let Some(keep) = shift {
                self.shift(i, keep, seq_len);
            }
        }
        let _ = decode_rows;
        self.account(dt, prompt_rows, generated);
        Ok(())
    }

    /// Context shift of slot `i`, full at `len` positions: its first `keep` stay, the older half
    /// of the rest goes. A shift the engine refuses (a sliding-window ring that no longer holds
    /// a kept position) ends the request as a full context does.
    fn shift(&mut self, i: usize, keep: usize, len: usize) {
        let discard = shift_discard(len, keep);
        match self.engine.shift_seq(i, keep, discard) {
            Ok(()) => {
                let slot = &mut self.slots[i];
                slot.cached.drain(keep..keep + discard);
                if let Some(j) = slot.job.as_mut() {
                    j.shifts += 1;
                }
                self.stats.context_shifts.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                let ev = self.slots[i]
                    .job
                    .as_ref()
                    .map(|j| j.done(Finish::Length, None));
                if let Some(ev) = ev {
                    self.end_job(i, ev);
                }
            }
        }
    }

    fn account(&mut self, dt: Duration, prompt: usize, generated: usize) {
        let s = &self.stats;
        s.steps.fetch_add(1, Ordering::Relaxed);
        s.busy_ns.fetch_add(dt.as_nanos() as u64, Ordering::Relaxed);
        s.prompt_tokens.fetch_add(prompt as u64, Ordering::Relaxed);
        s.generated_tokens
            .fetch_add(generated as u64, Ordering::Relaxed);
        if let Some(b) = self.engine.device_measured_bytes() {
            s.vram_bytes.store(b, Ordering::Relaxed);
        }
        // Rates over the last 10 s of steps.
        let now = Instant::now();
        self.recent.push_back((now, prompt, generated));
        while self
            .recent
            .front()
            .is_some_and(|(t, _, _)| now.duration_since(*t) > Duration::from_secs(10))
        {
            self.recent.pop_front();
        }
        let span = self
            .recent
            .front()
            .map_or(0.0, |(t, _, _)| now.duration_since(*t).as_secs_f64())
            + dt.as_secs_f64();
        let (p, g) = self
            .recent
            .iter()
            .fold((0, 0), |a, (_, p, g)| (a.0 + p, a.1 + g));
        s.gen_tps_bits
            .store((g as f64 / span.max(1e-9)).to_bits(), Ordering::Relaxed);
        s.prompt_tps_bits
            .store((p as f64 / span.max(1e-9)).to_bits(), Ordering::Relaxed);
    }
}
