//! The MoE expert FFN on the CPU: every routed expert of a batch in one parallel job per stage.
//!
//! Tokens are grouped by expert, so each active expert's matrices are read once per batch. The
//! gate and up matrices of all active experts are one pool job (tasks of (matrix, row range)
//! claimed dynamically: a decode token's 8 experts keep every thread streaming) whose last task
//! per expert applies the GLU and quantizes the down projection's input; the down matrices are
//! the second job, whose last task per chunk of output rows adds that chunk's weighted sums
//! (experts in id order, as a sequential loop would add them). Between the two only the error
//! check runs on the calling thread alone, so the other threads do not wait on serial steps
//! (building a decode token's 16 gate/up matmuls on the calling thread took 4.6 µs a layer on
//! the dev VM).

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use crate::gemm::{packed, GemmActs};

use crate::matmul::{quantize_acts_into, ActPrecision, ExactJob, KernelError, QuantizedActs};
use crate::matmul::{token_rows, RowsJob, WeightMatrix};
use crate::pool::{self, SharedSlice};
use crate::quant::{self, ActFormat};

/// One expert's FFN matrices: gate and up (`ff × cols`), down (`cols × ff`).
#[derive(Clone, Copy, Debug)]
pub struct ExpertFfn<'a> {
    /// Gate projection.
    pub gate: WeightMatrix<'a>,
    /// Up projection.
    pub up: WeightMatrix<'a>,
    /// Down projection.
    pub down: WeightMatrix<'a>,
}

/// A layer's experts, asked for only the ones a batch routes to.
#[derive(Clone, Copy)]
pub enum Experts<'f, 'w> {
    /// Every expert's matrices, indexed by id.
    Slice(&'f [ExpertFfn<'w>]),
    /// `n` experts, expert `e`'s matrices from `get(e)` (a decode token routes to a few of
    /// many: no view is made of the others).
    Lookup {
        /// Experts.
        n: usize,
        /// Expert `e`'s matrices.
        get: &'f (dyn Fn(usize) -> ExpertFfn<'w> + Sync),
    },
}

impl<'w> Experts<'_, 'w> {
    /// Number of experts.
    pub fn len(&self) -> usize {
        match self {
            Experts::Slice(s) => s.len(),
            Experts::Lookup { n, .. } => *n,
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Expert `e`'s matrices (`e < len()`).
    fn get(&self, e: usize) -> ExpertFfn<'w> {
        match self {
            Experts::Slice(s) => s[e],
            Experts::Lookup { get, .. } => get(e),
        }
    }
}

/// Each token's routed experts: `ids[t * n_used + k]` with weight `weights[t * n_used + k]`.
#[derive(Clone, Copy, Debug)]
pub struct MoeRoutes<'a> {
    /// Expert ids.
    pub ids: &'a [u32],
    /// Their weights.
    pub weights: &'a [f32],
    /// Experts per token.
    pub n_used: usize,
}

/// Which matrix of an expert an activation record is the input of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoeInput {
    /// The gate projection.
    Gate,
    /// The up projection.
    Up,
    /// The down projection.
    Down,
}

/// Called after the job with every quantized matmul input: (matrix, expert, the batch's token
/// index of each row, the rows as multiplied). Not called for the exact path or F32 formats.
pub type MoeTrace<'t> = &'t mut dyn FnMut(MoeInput, usize, &[usize], &QuantizedActs);

/// One matmul of the job: quantized or exact.
enum Job<'a> {
    /// Boxed: a quantized job is several times the size of an exact one.
    Quantized(Box<RowsJob<'a>>),
    Exact(ExactJob<'a>),
}

impl Job<'_> {
    fn compute(&self, r0: usize, outs: &mut [&mut [f32]]) {
        match self {
            Job::Quantized(j) => j.compute(r0, outs),
            Job::Exact(j) => j.compute(r0, outs),
        }
    }
}

/// The input of one matmul: rounded to the weight type's partner format, or f32 (exact path).
enum Input {
    Quantized(QuantizedActs),
    Exact(Vec<f32>),
}

impl Input {
    /// The matmul of `w` with this input, kernels of SIMD level `level` at most; with `slot`,
    /// sharing the GEMM's conversion of the input with the other jobs given that slot (which
    /// must all have inputs of the same values).
    fn job<'a>(
        &'a self,
        w: WeightMatrix<'a>,
        level: quant::SimdLevel,
        slot: Option<&'a OnceLock<GemmActs>>,
    ) -> Result<Job<'a>, KernelError> {
        let k = quant::kernel(w.ty).ok_or(KernelError::UnsupportedType(w.ty))?;
        Ok(match self {
            Input::Quantized(q) => Job::Quantized(Box::new(match slot {
                Some(slot) => RowsJob::new_shared(k, level, w, q, slot)?,
                None => RowsJob::new(k, level, w, q)?,
            })),
            Input::Exact(x) => Job::Exact(ExactJob::new(w, x, x.len() / w.cols.max(1))?),
        })
    }
}

/// Per active expert: its matrices, tokens and weights, and the inputs of its three matmuls.
struct Active<'w> {
    e: usize,
    ffn: ExpertFfn<'w>,
    toks: Vec<usize>,
    wts: Vec<f32>,
    gate_in: Input,
    /// `None`: the up projection takes `gate_in`.
    up_in: Option<Input>,
    /// The GEMM's conversion of `gate_in`, shared by the gate and up jobs where their weights
    /// take the same one.
    gate_acts: OnceLock<GemmActs>,
    /// Set by the expert's last gate/up task.
    down_in: OnceLock<Input>,
}

/// Whether matmuls with `w` take the exact path under `precision` (float weights take f32
/// activations either way).
fn exact(precision: ActPrecision, w: &WeightMatrix) -> Result<bool, KernelError> {
    let k = quant::kernel(w.ty).ok_or(KernelError::UnsupportedType(w.ty))?;
    Ok(precision == ActPrecision::Exact && k.act != ActFormat::F32)
}

/// Rows `toks` of the already quantized batch `q`, as their own buffer.
fn gather(q: &QuantizedActs, toks: &[usize]) -> QuantizedActs {
    let mut data = Vec::with_capacity(toks.len() * q.row_bytes);
    for &t in toks {
        data.extend_from_slice(&q.data[t * q.row_bytes..(t + 1) * q.row_bytes]);
    }
    QuantizedActs {
        format: q.format,
        data,
        row_bytes: q.row_bytes,
        n_rows: toks.len(),
        cols: q.cols,
    }
}

/// Rows `toks` of `x` (`cols` wide).
fn gather_f32(x: &[f32], cols: usize, toks: &[usize]) -> Vec<f32> {
    toks.iter()
        .flat_map(|&t| x[t * cols..(t + 1) * cols].iter().copied())
        .collect()
}

/// Checks one matrix's shape.
fn check_matrix(
    w: &WeightMatrix,
    rows: usize,
    cols: usize,
    what: &str,
    e: usize,
) -> Result<(), KernelError> {
    if w.rows != rows || w.cols != cols {
        return Err(KernelError::ShapeMismatch {
            what: format!(
                "expert {e} {what} is {}x{}, expected {rows}x{cols}",
                w.rows, w.cols
            ),
        });
    }
    Ok(())
}

/// A stage's tasks: each job's rows cut into chunks of whole 16-row tiles (every engine's
/// alignment divides 16), about `threads × 4` tasks in all, each of about the same work (rows ×
/// tokens): an expert that a prefill routes many tokens to gets as many more tasks, so the
/// synthetic qwen3-30b-a3b, whose routers send most of a batch to a few experts, does not wait
/// on one thread per busy expert. Tasks go job by job.
struct Split {
    /// Per job, its rows per task.
    chunk: Vec<usize>,
    /// Per job, its first task; then the number of tasks.
    first: Vec<usize>,
}

impl Split {
    /// Jobs of `rows` rows each, with the token counts `tokens`.
    fn new(rows: usize, tokens: &[usize]) -> Split {
        let total: usize = tokens.iter().map(|&m| m.max(1) * rows).sum();
        let per_task = total.div_ceil((pool::threads() * 4).max(1)).max(1);
        let mut chunk = Vec::with_capacity(tokens.len());
        let mut first = Vec::with_capacity(tokens.len() + 1);
        let mut n = 0;
        for &m in tokens {
            let c = per_task.div_ceil(m.max(1)).div_ceil(packed::ROWS).max(1) * packed::ROWS;
            chunk.push(c);
            first.push(n);
            n += rows.div_ceil(c);
        }
        first.push(n);
        Split { chunk, first }
    }

    /// The number of tasks.
    fn tasks(&self) -> usize {
        self.first[self.chunk.len()]
    }

    /// Tasks of job `j`.
    fn of_job(&self, j: usize) -> usize {
        self.first[j + 1] - self.first[j]
    }

    /// Task `t`: its job, its chunk index in the job and its rows (of `rows`).
    fn task(&self, t: usize, rows: usize) -> (usize, usize, Range<usize>) {
        let j = self.first.partition_point(|&f| f <= t) - 1;
        let (c, size) = (t - self.first[j], self.chunk[j]);
        (j, c, c * size..((c + 1) * size).min(rows))
    }
}

/// Computes output rows `r` of `job` into `out` (`m` tokens, row `r` of token `i` at
/// `i * stride + r`).
///
/// # Safety
/// No other participant may touch rows `r` of `out` meanwhile.
unsafe fn compute_rows(job: &Job, r: Range<usize>, out: &SharedSlice<f32>, stride: usize) {
    // SAFETY: the caller owns rows `r` of every token's output.
    let mut outs = unsafe { token_rows(out, out.len() / stride, stride, r.clone()) };
    job.compute(r.start, &mut outs);
}

thread_local! {
    /// The calling thread's buffer for the matmuls' outputs of [`moe_ffn`].
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Values of [`SCRATCH`] kept after a call (64 MiB: a decode step needs 115 KiB on a
/// qwen3-30b-a3b layer, a 512-token prefill 58 MiB; a bigger one's are freed), so a prefill's
/// layers reuse one buffer. A buffer that is too small is replaced by a zeroed allocation, whose
/// pages the tasks first touch in parallel, not grown: growing writes every value on the calling
/// thread while the pool waits (25–44 ms for 58 MiB on the dev VM; with it a 16-core host ran
/// the MoE FFN of a 512-token prefill 55% slower).
const SCRATCH_KEEP: usize = 16 << 20;

/// Multiply-adds of a down chunk's weighted sums up to which the chunk's last task adds them
/// (decode: 8 experts × 256 rows); bigger batches add in a parallel pass of their own.
const FUSED_SUM_MAX: usize = 1 << 15;

/// The MoE FFN of a batch: `out[t] = Σ_k weight(t,k) · down_e(act(gate_e(x_t)) · up_e(x_t))` over
/// token `t`'s routed experts `e = ids[t, k]` (`act`: the GLU's activation). `x` and `out` are
/// `n_tok × cols`; every expert's matrices have the same shape and types. Matmuls follow
/// `precision` as [`crate::matmul::matmul`] / [`crate::matmul::matmul_exact`] do; each token's
/// sum adds its experts in id order.
///
/// Two pool jobs: the gate and up rows of every routed expert, then the down rows. Each matmul
/// is built by the first task that needs it. An expert's last gate/up task applies its GLU and
/// prepares its down input and matmul; a chunk of output rows' last down task adds the chunk's
/// weighted sums (for small batches; bigger ones add in a pass of their own).
#[allow(clippy::too_many_arguments)]
pub fn moe_ffn(
    experts: Experts,
    x: &[f32],
    n_tok: usize,
    routes: MoeRoutes,
    act: pshard_model::graph::Activation,
    precision: ActPrecision,
    out: &mut [f32],
    mut trace: Option<MoeTrace>,
) -> Result<(), KernelError> {
    let mismatch = |what: String| KernelError::ShapeMismatch { what };
    let n_expert = experts.len();
    if n_expert == 0 {
        return Err(mismatch("MoE FFN without experts".into()));
    }
    let first = experts.get(0);
    let (cols, ff) = (first.gate.cols, first.gate.rows);
    if cols == 0 || ff == 0 {
        return Err(mismatch(format!(
            "MoE experts of {ff} x {cols}: an empty matrix"
        )));
    }
    if x.len() != n_tok * cols || out.len() < n_tok * cols {
        return Err(mismatch(format!(
            "MoE FFN of {n_tok} tokens x {cols}: input holds {}, output {}",
            x.len(),
            out.len()
        )));
    }
    let n_used = routes.n_used;
    if routes.ids.len() != n_tok * n_used || routes.weights.len() != n_tok * n_used {
        return Err(mismatch(format!(
            "MoE routes: {} ids and {} weights for {n_tok} tokens x {n_used}",
            routes.ids.len(),
            routes.weights.len()
        )));
    }
    let mut by_expert: Vec<(Vec<usize>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); n_expert];
    for t in 0..n_tok {
        for k in 0..n_used {
            let e = routes.ids[t * n_used + k] as usize;
            let slot = by_expert
                .get_mut(e)
                .ok_or_else(|| mismatch(format!("token {t} routed to expert {e} of {n_expert}")))?;
            slot.0.push(t);
            slot.1.push(routes.weights[t * n_used + k]);
        }
    }
    let level = quant::simd_cap();
    let (ge, ue, de) = (
        exact(precision, &first.gate)?,
        exact(precision, &first.up)?,
        exact(precision, &first.down)?,
    );
    let fmt = |w: &WeightMatrix| quant::kernel(w.ty).map(|k| k.act);
    let (gf, uf, df) = (fmt(&first.gate), fmt(&first.up), fmt(&first.down));
    // The batch's rows rounded once per format, then gathered per expert.
    let mut quantized: Vec<QuantizedActs> = Vec::new();
    for (f, ex) in [(gf, ge), (uf, ue)] {
        if let (Some(f), false) = (f, ex) {
            if !quantized.iter().any(|q| q.format == f) {
                let mut q = QuantizedActs::empty(f);
                quantize_acts_into(f, x, n_tok, cols, &mut q)?;
                quantized.push(q);
            }
        }
    }
    let input = |f: Option<ActFormat>, ex: bool, toks: &[usize]| -> Input {
        match (f, ex) {
            (Some(f), false) => Input::Quantized(gather(
                quantized
                    .iter()
                    .find(|q| q.format == f)
                    .expect("quantized above"),
                toks,
            )),
            _ => Input::Exact(gather_f32(x, cols, toks)),
        }
    };
    let mut active: Vec<Active> = Vec::new();
    for (e, (toks, wts)) in by_expert.into_iter().enumerate() {
        if toks.is_empty() {
            continue;
        }
        let ffn = if e == 0 { first } else { experts.get(e) };
        check_matrix(&ffn.gate, ff, cols, "gate", e)?;
        check_matrix(&ffn.up, ff, cols, "up", e)?;
        check_matrix(&ffn.down, cols, ff, "down", e)?;
        let gate_in = input(gf, ge, &toks);
        let up_in = (gf != uf || ge != ue).then(|| input(uf, ue, &toks));
        active.push(Active {
            e,
            ffn,
            gate_in,
            up_in,
            gate_acts: OnceLock::new(),
            down_in: OnceLock::new(),
            toks,
            wts,
        });
    }
    let na = active.len();
    // The matmuls' outputs: per expert its gate, up and down rows, in a buffer kept between
    // calls (every value is written before it is read).
    let mut scratch = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    let need: usize = active.iter().map(|a| a.toks.len() * (2 * ff + cols)).sum();
    if scratch.len() < need {
        // Zeroed pages from the allocator, first touched by the tasks that write them.
        scratch = vec![0.0; need];
    }
    let (mut gu, mut d) = (Vec::with_capacity(2 * na), Vec::with_capacity(na));
    {
        let mut rest = &mut scratch[..need];
        for a in &active {
            let m = a.toks.len();
            let (g, r) = rest.split_at_mut(m * ff);
            let (u, r) = r.split_at_mut(m * ff);
            let (dk, r) = r.split_at_mut(m * cols);
            gu.extend([SharedSlice::new(g), SharedSlice::new(u)]);
            d.push(SharedSlice::new(dk));
            rest = r;
        }
    }
    type Built<'j> = OnceLock<Result<Job<'j>, KernelError>>;

    // Gate and up of every active expert (job `2k` and `2k + 1` of expert `k`), built by the
    // first task that needs them. Tasks go job by job: consecutive tasks read on where the last
    // one stopped.
    // One token: every expert's input is that token's row, so all share one conversion.
    let one = OnceLock::new();
    let gate_up: Vec<Built> = (0..2 * na).map(|_| OnceLock::new()).collect();
    let down: Vec<Built> = (0..na).map(|_| OnceLock::new()).collect();
    {
        let tokens: Vec<usize> = active.iter().flat_map(|a| [a.toks.len(); 2]).collect();
        let split = Split::new(ff, &tokens);
        let left: Vec<AtomicUsize> = (0..na)
            .map(|k| AtomicUsize::new(split.of_job(2 * k) + split.of_job(2 * k + 1)))
            .collect();
        let (active, gate_up, down, views) = (&active, &gate_up, &down, &gu);
        pool::for_each_dynamic(split.tasks(), |t| {
            let (ji, _, r) = split.task(t, ff);
            let (k, a) = (ji / 2, &active[ji / 2]);
            let job = gate_up[ji].get_or_init(|| {
                let slot = if n_tok == 1 { &one } else { &a.gate_acts };
                match (ji % 2, &a.up_in) {
                    (0, _) => a.gate_in.job(a.ffn.gate, level, Some(slot)),
                    (_, Some(ui)) => ui.job(a.ffn.up, level, None),
                    (_, None) => a.gate_in.job(a.ffn.up, level, Some(slot)),
                }
            });
            if let Ok(job) = job {
                // SAFETY: task `t` alone computes rows `r` of job `ji`.
                unsafe { compute_rows(job, r, &views[ji], ff) };
            }
            if left[k].fetch_sub(1, Ordering::AcqRel) != 1 {
                return;
            }
            // The expert's last gate/up task: its GLU, the down projection's input and matmul.
            let (Some(Ok(_)), Some(Ok(_))) = (gate_up[2 * k].get(), gate_up[2 * k + 1].get())
            else {
                return;
            };
            let m = a.toks.len();
            // SAFETY: every task of the expert's gate and up has finished (the counter, with
            // acquire ordering), and nothing else touches their outputs now.
            let (g, u) = unsafe {
                (
                    &*views[2 * k].range_mut(0..m * ff),
                    &*views[2 * k + 1].range_mut(0..m * ff),
                )
            };
            let mut h = vec![0f32; m * ff];
            crate::ops::glu(g, u, &mut h, act);
            let made = match (df, de) {
                (Some(f), false) => {
                    let mut q = QuantizedActs::empty(f);
                    quantize_acts_into(f, &h, m, ff, &mut q).map(|()| Input::Quantized(q))
                }
                _ => Ok(Input::Exact(h)),
            };
            let built = made.and_then(|i| a.down_in.get_or_init(|| i).job(a.ffn.down, level, None));
            let _ = down[k].set(built);
        });
    }
    for b in gate_up.iter().chain(&down) {
        if let Some(Err(e)) = b.get() {
            return Err(e.clone());
        }
    }

    // Down of every active expert, and the weighted sums, experts in id order per token.
    let mut per_tok: Vec<Vec<(usize, usize, f32)>> = vec![Vec::new(); n_tok];
    for (k, a) in active.iter().enumerate() {
        for (i, (&t, &w)) in a.toks.iter().zip(&a.wts).enumerate() {
            per_tok[t].push((k, i, w));
        }
    }
    let o = SharedSlice::new(&mut out[..n_tok * cols]);
    let views = &d;
    // Rows `r` of token `t`'s output.
    let sum = |t: usize, r: Range<usize>| {
        // SAFETY: each (token, rows) part of the output is summed by one participant, after
        // every down task of those rows finished.
        let row = unsafe { o.range_mut(t * cols + r.start..t * cols + r.end) };
        row.iter_mut().for_each(|v| *v = 0.0);
        for &(k, i, w) in &per_tok[t] {
            // SAFETY: as above: the down outputs of these rows are final and not written.
            let dv = unsafe { &*views[k].range_mut(i * cols + r.start..i * cols + r.end) };
            for (acc, v) in row.iter_mut().zip(dv) {
                *acc += w * v;
            }
        }
    };
    // Small batches: chunks of equal rows, each chunk's sums added by its last task; bigger
    // ones: chunks of equal work, and the sums in a pass of their own.
    let even = Split::new(cols, &vec![1; na]);
    let fused = n_tok * n_used * even.chunk.first().copied().unwrap_or(0) <= FUSED_SUM_MAX;
    let split = if fused {
        even
    } else {
        let tokens: Vec<usize> = active.iter().map(|a| a.toks.len()).collect();
        Split::new(cols, &tokens)
    };
    {
        let chunks = if fused && na > 0 { split.of_job(0) } else { 0 };
        let left: Vec<AtomicUsize> = (0..chunks).map(|_| AtomicUsize::new(na)).collect();
        pool::for_each_dynamic(split.tasks(), |t| {
            let (k, c, r) = split.task(t, cols);
            let Some(Ok(job)) = down[k].get() else {
                unreachable!("every down matmul was built (errors returned above)")
            };
            // SAFETY: task `t` alone computes rows `r` of expert `k`'s down output.
            unsafe { compute_rows(job, r.clone(), &views[k], cols) };
            if fused && left[c].fetch_sub(1, Ordering::AcqRel) == 1 {
                (0..n_tok).for_each(|t| sum(t, r.clone()));
            }
        });
    }
    if !fused {
        if n_tok * cols >= 1 << 16 {
            pool::for_range(n_tok, 1, |r| r.for_each(|t| sum(t, 0..cols)));
        } else {
            (0..n_tok).for_each(|t| sum(t, 0..cols));
        }
    }

    drop((gu, d));
    if scratch.len() <= SCRATCH_KEEP {
        SCRATCH.with(|s| *s.borrow_mut() = scratch);
    }

    if let Some(tr) = trace.as_mut() {
        for a in &active {
            let ui = a.up_in.as_ref().unwrap_or(&a.gate_in);
            let di = a.down_in.get().expect("set with the down matmul");
            for (which, inp) in [
                (MoeInput::Gate, &a.gate_in),
                (MoeInput::Up, ui),
                (MoeInput::Down, di),
            ] {
                if let Input::Quantized(q) = inp {
                    if q.format != ActFormat::F32 {
                        tr(which, a.e, &a.toks, q);
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every job's rows are covered once, in order, by whole tiles; a job with 40 times the
    /// tokens gets more tasks than a job with one; equal token counts give equal chunks.
    #[test]
    fn split_covers_each_job_once_and_follows_the_work() {
        for tokens in [vec![1, 1, 1], vec![40, 1, 1, 3], vec![300, 2], vec![7]] {
            let rows = 768;
            let s = Split::new(rows, &tokens);
            let mut next = vec![0usize; tokens.len()];
            for t in 0..s.tasks() {
                let (j, c, r) = s.task(t, rows);
                assert_eq!(r.start, next[j], "{tokens:?} task {t}");
                assert_eq!(c, t - s.first[j]);
                assert!(r.start % packed::ROWS == 0 && r.end > r.start);
                next[j] = r.end;
            }
            assert!(next.iter().all(|&n| n == rows), "{tokens:?}: {next:?}");
            let (heavy, light) = (s.of_job(0), s.of_job(tokens.len() - 1));
            if tokens[0] >= 40 * tokens[tokens.len() - 1] && pool::threads() > 1 {
                assert!(heavy > light, "{tokens:?}: {heavy} tasks vs {light}");
            }
            if tokens.iter().all(|&m| m == tokens[0]) {
                assert!(s.chunk.iter().all(|&c| c == s.chunk[0]));
            }
        }
    }
}
