//! The engine: a model, its KV cache and one program per batch shape, evaluating token sequences in
//! ubatches. Generation and perplexity sessions are built on [`Engine::eval`].

use std::collections::HashMap;

use std::sync::Arc;

use pshard_kernels::matmul::ActPrecision;

use crate::cpu::{BatchInput, CpuRunner, ExecError, RouteOverride};
use crate::kv::{KvCache, KvError};
use crate::model::Model;
use crate::program::Program;
use crate::submit::{Pending, SubmitError, SubmitThread};

/// Why an evaluation failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The context is full.
    #[error(transparent)]
    Kv(#[from] KvError),
    /// Execution failed.
    #[error(transparent)]
    Exec(#[from] ExecError),
    /// The graph could not be built.
    #[error(transparent)]
    Graph(#[from] pshard_model::arch::GraphError),
    /// Nothing to evaluate.
    #[error("no tokens to evaluate")]
    Empty,
    /// The GPU backend failed.
    #[error(transparent)]
    Gpu(#[from] crate::gpu::GpuError),
    /// The GPU's submission thread failed.
    #[error(transparent)]
    Submit(#[from] SubmitError),
}

/// Which rows of an evaluation produce logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token (generation).
    Last,
    /// Every token (perplexity).
    All,
}

/// Model + KV cache + programs, on the CPU or on one GPU.
pub struct Engine {
    /// The loaded model (shared with the GPU's submission thread when running on one).
    pub model: Arc<Model>,
    kv: KvCache,
    runners: HashMap<(usize, usize), CpuRunner>,
    ubatch: usize,
    n_past: usize,
    route_override: Option<Arc<RouteOverride>>,
    precision: ActPrecision,
    trace: bool,
    gpu: Option<GpuSide>,
}

/// The GPU engine on its own submission thread (see [`crate::submit`]), with the facts that do
/// not change kept here so asking for them costs no round trip.
struct GpuSide {
    thread: SubmitThread<crate::gpu::GpuEngine>,
    n_ctx: usize,
    kv_bytes: usize,
}

/// The logits of an evaluation submitted to the GPU's thread ([`Engine::submit_eval`]).
pub type PendingLogits = Pending<Result<Vec<f32>, crate::gpu::GpuError>>;

impl Engine {
    /// An engine with a context of `n_ctx` positions evaluating at most `ubatch` tokens per step.
    pub fn new(model: Model, n_ctx: usize, ubatch: usize) -> Engine {
        let ubatch = ubatch.clamp(1, n_ctx.max(1));
        let kv = KvCache::new(&model.spec, n_ctx, ubatch);
        Engine {
            model: Arc::new(model),
            kv,
            runners: HashMap::new(),
            ubatch,
            n_past: 0,
            route_override: None,
            precision: ActPrecision::Quantized,
            trace: false,
            gpu: None,
        }
    }

    /// An engine that runs every op on a GPU: weights uploaded once, KV cache in VRAM. The GPU
    /// engine (CUDA context, streams, weights, programs) lives on its own submission thread, so
    /// issuing GPU work never waits for CPU work on the caller's thread, nor the reverse.
    pub fn with_gpu(
        model: Model,
        n_ctx: usize,
        ubatch: usize,
        opts: &crate::gpu::GpuOptions,
    ) -> Result<Engine, EngineError> {
        // The CPU side keeps no KV: every evaluation goes to the GPU.
        let mut e = Engine::new(model, 1, 1);
        let model = e.model.clone();
        let opts = opts.clone();
        let thread = SubmitThread::spawn("gpu", move || {
            crate::gpu::GpuEngine::new(&model, n_ctx, ubatch, &opts)
        })?;
        let (n_ctx, kv_bytes) = thread.call(|g| (g.n_ctx(), g.kv_bytes() as usize))?;
        e.gpu = Some(GpuSide {
            thread,
            n_ctx,
            kv_bytes,
        });
        Ok(e)
    }

    /// The GPU's report (device, NVRTC cache, VRAM per region), when running on one.
    pub fn gpu_report(&self) -> Option<String> {
        let g = self.gpu.as_ref()?;
        Some(match g.thread.call(|g| g.report()) {
            Ok(r) => r,
            Err(e) => format!("gpu: {e}"),
        })
    }

    /// Seconds spent per op kind over all programs so far, largest first.
    pub fn op_seconds(&self) -> Vec<(&'static str, f64)> {
        let mut total = std::collections::BTreeMap::new();
        for r in self.runners.values() {
            for (k, v) in r.op_seconds() {
                *total.entry(*k).or_insert(0.0) += v;
            }
        }
        let mut v: Vec<_> = total.into_iter().collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v
    }

    /// Forces MoE expert choices (see [`RouteOverride`]); `None` routes normally.
    pub fn set_route_override(&mut self, f: Option<Arc<RouteOverride>>) {
        self.route_override = f;
    }

    /// Exact-activation mode of the CPU engine (off by default). When on, every matmul with
    /// quantized weights takes its f32 activations as they are and dequantizes the weight rows to
    /// f32 on the fly ([`ActPrecision::Exact`]); when off, activations are rounded per block to
    /// the weight type's 8-bit partner format (Q8_0 / Q8_1 / Q8_K) and dotted in integers, as
    /// llama.cpp does — faster, but that rounding costs a few 1e-3 relative error per matmul
    /// (~3.5e-3 measured on the tiny synthetic models), more through deep random stacks. The exact
    /// mode is an oracle: for tests against the f64 reference and for checking other backends
    /// (e.g. the GPU's f16-activation GEMMs) without the 8-bit rounding in the comparison.
    /// Float weights (F32/F16/BF16) use f32 activations either way. Takes effect from the next
    /// evaluation; the KV cache is kept. On a GPU ([`Engine::with_gpu`]) the GPU engine's own
    /// exact mode is switched (`GpuEngine::set_exact_activations`), queued behind earlier work;
    /// a CUDA error while it frees the old programs is not returned here (such an error leaves
    /// the context unusable, and the next evaluation reports it).
    pub fn set_exact_activations(&mut self, on: bool) {
        self.precision = if on {
            ActPrecision::Exact
        } else {
            ActPrecision::Quantized
        };
        for r in self.runners.values_mut() {
            r.set_act_precision(self.precision);
        }
        if let Some(g) = &self.gpu {
            let _ = g.thread.submit(move |g| g.set_exact_activations(on));
        }
    }

    /// Starts (`true`) or stops recording the rounded activations of every quantized matmul of
    /// the CPU path, keyed by (weight, expert, position) — a test aid: a reference that follows
    /// the engine's rounding decisions cannot drift from it through a value that rounds the other
    /// way. Starting discards what was recorded.
    pub fn set_act_trace(&mut self, on: bool) {
        self.trace = on;
        for r in self.runners.values_mut() {
            r.set_act_trace(on);
        }
    }

    /// Takes the activations recorded since [`Engine::set_act_trace`]`(true)`.
    pub fn take_act_trace(&mut self) -> crate::cpu::ActTrace {
        let mut all = crate::cpu::ActTrace::new();
        for r in self.runners.values_mut() {
            all.extend(r.take_act_trace());
        }
        all
    }

    /// Whether exact-activation mode is on (see [`Engine::set_exact_activations`]).
    pub fn exact_activations(&self) -> bool {
        self.precision == ActPrecision::Exact
    }

    /// Forgets the sequence (positions restart at 0).
    pub fn reset(&mut self) {
        self.n_past = 0;
        if let Some(g) = &self.gpu {
            // Queued behind earlier work; a failure shows in the next evaluation.
            let _ = g.thread.submit(|g| g.reset());
        }
    }

    /// Positions evaluated so far.
    pub fn n_past(&self) -> usize {
        match &self.gpu {
            Some(g) => g.thread.call(|g| g.n_past()).unwrap_or(0),
            None => self.n_past,
        }
    }

    /// Context size.
    pub fn n_ctx(&self) -> usize {
        match &self.gpu {
            Some(g) => g.n_ctx,
            None => self.kv.n_ctx(),
        }
    }

    /// Bytes of the KV cache.
    pub fn kv_bytes(&self) -> usize {
        match &self.gpu {
            Some(g) => g.kv_bytes,
            None => self.kv.bytes(),
        }
    }

    /// On a GPU engine: queues the evaluation of `tokens` on the GPU's submission thread and
    /// returns at once, so the caller can do CPU work while the launches are issued and the GPU
    /// runs; [`Pending::wait`] gives the logits (as [`Engine::eval`] would). Evaluations run in
    /// submission order. On a CPU engine this is an error (use [`Engine::eval`]).
    pub fn submit_eval(&self, tokens: &[u32], which: Logits) -> Result<PendingLogits, EngineError> {
        let g = self.gpu.as_ref().ok_or_else(|| {
            EngineError::Gpu(crate::gpu::GpuError::Unsupported(
                "submit_eval needs an engine running on a GPU".into(),
            ))
        })?;
        if tokens.is_empty() {
            return Err(EngineError::Empty);
        }
        let model = self.model.clone();
        let tokens = tokens.to_vec();
        Ok(g.thread.submit(move |g| g.eval(&model, &tokens, which)))
    }

    /// Evaluates `tokens` after the current sequence; returns logits of the last token (`Last`) or of
    /// every token (`All`, row-major `tokens.len() × n_vocab`).
    pub fn eval(&mut self, tokens: &[u32], which: Logits) -> Result<Vec<f32>, EngineError> {
        if tokens.is_empty() {
            return Err(EngineError::Empty);
        }
        if self.gpu.is_some() {
            return Ok(self.submit_eval(tokens, which)?.wait()??);
        }
        self.kv.check(self.n_past, tokens.len())?;
        let n_vocab = self.model.spec.hparams.n_vocab;
        let mut all = Vec::new();
        let chunks: Vec<&[u32]> = tokens.chunks(self.ubatch).collect();
        let n_chunks = chunks.len();
        let mut last = Vec::new();
        for (ci, chunk) in chunks.into_iter().enumerate() {
            let n = chunk.len();
            let positions: Vec<u32> = (self.n_past..self.n_past + n).map(|p| p as u32).collect();
            let logit_rows: Vec<usize> = match which {
                Logits::All => (0..n).collect(),
                Logits::Last if ci + 1 == n_chunks => vec![n - 1],
                // Intermediate prompt chunks still need one row for the graph's output head; it is
                // cheap (one row) and discarded.
                Logits::Last => vec![n - 1],
            };
            let key = (n, logit_rows.len());
            if !self.runners.contains_key(&key) {
                let program = Program::for_cpu(&self.model.spec, n, logit_rows.len())?;
                let mut runner = CpuRunner::new(program);
                runner.set_act_precision(self.precision);
                runner.set_act_trace(self.trace);
                self.runners.insert(key, runner);
            }
            let runner = self.runners.get_mut(&key).expect("inserted above");
            let input = BatchInput {
                tokens: chunk,
                positions: &positions,
                logit_rows: &logit_rows,
                route_override: self.route_override.as_deref(),
            };
            let logits = runner.run(&self.model, &mut self.kv, input)?;
            self.n_past += n;
            match which {
                Logits::All => all.extend_from_slice(logits),
                Logits::Last => {
                    last.clear();
                    last.extend_from_slice(&logits[..n_vocab]);
                }
            }
        }
        Ok(if which == Logits::All { all } else { last })
    }
}
