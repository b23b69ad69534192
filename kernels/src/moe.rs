//! The MoE expert FFN on the CPU: every routed expert of a batch in one parallel job per stage.
//!
//! Tokens are grouped by expert, so each active expert's matrices are read once per batch. The
//! gate and up matrices of all active experts are one pool job (tasks of (expert, matrix, row
//! range) claimed dynamically: a decode token's 8 experts keep every thread streaming), the GLU and
//! the down projection's input quantization one job over experts, the down matrices one job, and
//! the weighted sum per token last (experts in id order, as a sequential loop would add them).

use std::ops::Range;
use std::sync::OnceLock;

use crate::gemm::GemmActs;

use crate::matmul::{quantize_acts_into, ActPrecision, ExactJob, KernelError, QuantizedActs};
use crate::matmul::{RowsJob, WeightMatrix};
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
    fn align(&self) -> usize {
        match self {
            Job::Quantized(j) => j.align(),
            Job::Exact(j) => j.align(),
        }
    }

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

/// Per active expert: its tokens and weights, the inputs and outputs of its three matmuls.
struct Active {
    e: usize,
    toks: Vec<usize>,
    wts: Vec<f32>,
    gate_in: Option<Input>,
    up_in: Option<Input>,
    /// The GEMM's conversion of `gate_in`, shared by the gate and up jobs where their weights
    /// take the same one.
    gate_acts: OnceLock<GemmActs>,
    down_in: Option<Input>,
    g: Vec<f32>,
    u: Vec<f32>,
    d: Vec<f32>,
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

/// Jobs from which [`build_jobs`] builds them on the pool: a decode token's 8 experts (16 and 8
/// jobs) stay on the calling thread, without one more pool job per stage.
const PARALLEL_BUILD_MIN_JOBS: usize = 32;

/// Builds `n` jobs with `make` (`make(i)` is job `i`), from [`PARALLEL_BUILD_MIN_JOBS`] claimed
/// by the pool's threads: each converts its input for its kernel, which at a few tokens per expert
/// and ~250 jobs a layer took ~5% of a 64-token MoE prefill on the calling thread alone (building
/// them on both of the dev VM's threads: the MoE op 4% faster, pp64 with uniform routes 42.2 and
/// 45.3 → 47.4 and 46.4 t/s, alternating runs). The first error in index order is returned.
fn build_jobs<'a>(
    n: usize,
    make: impl Fn(usize) -> Result<Job<'a>, KernelError> + Sync,
) -> Result<Vec<Job<'a>>, KernelError> {
    if n < PARALLEL_BUILD_MIN_JOBS {
        return (0..n).map(make).collect();
    }
    let mut slots: Vec<Option<Result<Job<'a>, KernelError>>> = (0..n).map(|_| None).collect();
    {
        let s = SharedSlice::new(&mut slots);
        pool::for_each_dynamic(n, |i| {
            // SAFETY: each index is claimed by one participant, which writes only its own slot.
            unsafe { s.range_mut(i..i + 1)[0] = Some(make(i)) };
        });
    }
    slots
        .into_iter()
        .map(|j| j.expect("every slot is filled by the pool"))
        .collect()
}

/// Runs `job` over row ranges of `jobs` (one per (expert, matrix)): tasks of about `threads × 4`
/// in all, each `(job index, rows)`, writing `outs(job index)` (`m × stride`, row `r` of token `i`
/// at `i * stride + r`).
fn run_rows(jobs: &[(Job, usize, usize, SharedSlice<f32>)]) {
    let total: usize = jobs.iter().map(|(_, rows, _, _)| rows).sum();
    let want = (pool::threads() * 4).max(1);
    let mut tasks: Vec<(usize, Range<usize>)> = Vec::new();
    for (ji, (job, rows, _, _)) in jobs.iter().enumerate() {
        let a = job.align();
        let chunk = (total.div_ceil(want)).div_ceil(a).max(1) * a;
        let mut r = 0;
        while r < *rows {
            let e = (r + chunk).min(*rows);
            tasks.push((ji, r..e));
            r = e;
        }
    }
    pool::for_each_dynamic(tasks.len(), |ti| {
        let (ji, r) = (tasks[ti].0, tasks[ti].1.clone());
        let (job, _, stride, out) = &jobs[ji];
        let m = out.len() / stride;
        let mut outs: Vec<&mut [f32]> = (0..m)
            // SAFETY: each task owns rows `r` of its job's output; tasks of one job have disjoint
            // row ranges and jobs distinct buffers.
            .map(|i| unsafe { out.range_mut(i * stride + r.start..i * stride + r.end) })
            .collect();
        job.compute(r.start, &mut outs);
    });
}

/// The MoE FFN of a batch: `out[t] = Σ_k weight(t,k) · down_e(act(gate_e(x_t)) · up_e(x_t))` over
/// token `t`'s routed experts `e = ids[t, k]` (`act`: the GLU's activation). `x` and `out` are
/// `n_tok × cols`; every expert's matrices have the same shape and types. Matmuls follow
/// `precision` as [`crate::matmul::matmul`] / [`crate::matmul::matmul_exact`] do; each token's
/// sum adds its experts in id order.
#[allow(clippy::too_many_arguments)]
pub fn moe_ffn(
    experts: &[ExpertFfn],
    x: &[f32],
    n_tok: usize,
    routes: MoeRoutes,
    act: pshard_model::graph::Activation,
    precision: ActPrecision,
    out: &mut [f32],
    mut trace: Option<MoeTrace>,
) -> Result<(), KernelError> {
    let mismatch = |what: String| KernelError::ShapeMismatch { what };
    let Some(first) = experts.first() else {
        return Err(mismatch("MoE FFN without experts".into()));
    };
    let (cols, ff) = (first.gate.cols, first.gate.rows);
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
    let mut by_expert: Vec<(Vec<usize>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); experts.len()];
    for t in 0..n_tok {
        for k in 0..n_used {
            let e = routes.ids[t * n_used + k] as usize;
            let slot = by_expert.get_mut(e).ok_or_else(|| {
                mismatch(format!(
                    "token {t} routed to expert {e} of {}",
                    experts.len()
                ))
            })?;
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
        let ex = &experts[e];
        check_matrix(&ex.gate, ff, cols, "gate", e)?;
        check_matrix(&ex.up, ff, cols, "up", e)?;
        check_matrix(&ex.down, cols, ff, "down", e)?;
        let m = toks.len();
        let gate_in = input(gf, ge, &toks);
        let up_in = if gf == uf && ge == ue {
            None
        } else {
            Some(input(uf, ue, &toks))
        };
        active.push(Active {
            e,
            gate_in: Some(gate_in),
            up_in,
            gate_acts: OnceLock::new(),
            down_in: None,
            g: vec![0f32; m * ff],
            u: vec![0f32; m * ff],
            d: vec![0f32; m * cols],
            toks,
            wts,
        });
    }

    // Gate and up of every active expert: the jobs (each converts its expert's activations for
    // its kernel) built in parallel, then run as one job.
    {
        let mut outs: Vec<Vec<f32>> = active
            .iter_mut()
            .flat_map(|a| [std::mem::take(&mut a.g), std::mem::take(&mut a.u)])
            .collect();
        // One token: every expert's input is that token's row, so all share one conversion.
        let one = OnceLock::new();
        let built = build_jobs(2 * active.len(), |i| {
            let a = &active[i / 2];
            let gi = a.gate_in.as_ref().expect("set above");
            let slot = if n_tok == 1 { &one } else { &a.gate_acts };
            if i % 2 == 0 {
                gi.job(experts[a.e].gate, level, Some(slot))
            } else {
                match &a.up_in {
                    Some(ui) => ui.job(experts[a.e].up, level, None),
                    None => gi.job(experts[a.e].up, level, Some(slot)),
                }
            }
        })?;
        let jobs: Vec<_> = built
            .into_iter()
            .zip(outs.iter_mut())
            .map(|(job, o)| (job, ff, ff, SharedSlice::new(o)))
            .collect();
        run_rows(&jobs);
        drop(jobs);
        for (a, gu) in active.iter_mut().zip(outs.chunks_exact_mut(2)) {
            a.g = std::mem::take(&mut gu[0]);
            a.u = std::mem::take(&mut gu[1]);
        }
    }

    // GLU and the down projection's input, per expert.
    {
        let acts = SharedSlice::new(&mut active);
        let down_exact = de;
        pool::for_each_dynamic(acts.len(), |i| {
            // SAFETY: each expert index is claimed by one participant.
            let a = unsafe { &mut acts.range_mut(i..i + 1)[0] };
            let m = a.toks.len();
            let mut h = vec![0f32; m * ff];
            crate::ops::glu(&a.g, &a.u, &mut h, act);
            a.down_in = Some(match (df, down_exact) {
                (Some(f), false) => {
                    let mut q = QuantizedActs::empty(f);
                    quantize_acts_into(f, &h, m, ff, &mut q)
                        .expect("shapes checked: ff is the down matrix's width");
                    Input::Quantized(q)
                }
                _ => Input::Exact(h),
            });
        });
    }

    // Down of every active expert, built and run as gate and up are.
    {
        let mut outs: Vec<Vec<f32>> = active
            .iter_mut()
            .map(|a| std::mem::take(&mut a.d))
            .collect();
        let built = build_jobs(active.len(), |i| {
            let a = &active[i];
            let di = a.down_in.as_ref().expect("set above");
            di.job(experts[a.e].down, level, None)
        })?;
        let jobs: Vec<_> = built
            .into_iter()
            .zip(outs.iter_mut())
            .map(|(job, o)| (job, cols, cols, SharedSlice::new(o)))
            .collect();
        run_rows(&jobs);
        drop(jobs);
        for (a, d) in active.iter_mut().zip(outs) {
            a.d = d;
        }
    }

    if let Some(tr) = trace.as_mut() {
        for a in &active {
            let gi = a.gate_in.as_ref().expect("set above");
            let ui = a.up_in.as_ref().unwrap_or(gi);
            for (which, inp) in [
                (MoeInput::Gate, gi),
                (MoeInput::Up, ui),
                (MoeInput::Down, a.down_in.as_ref().expect("set above")),
            ] {
                if let Input::Quantized(q) = inp {
                    if q.format != ActFormat::F32 {
                        tr(which, a.e, &a.toks, q);
                    }
                }
            }
        }
    }

    // Weighted sums, experts in id order per token.
    let mut per_tok: Vec<Vec<(usize, usize, f32)>> = vec![Vec::new(); n_tok];
    for (ai, a) in active.iter().enumerate() {
        for (i, (&t, &w)) in a.toks.iter().zip(&a.wts).enumerate() {
            per_tok[t].push((ai, i, w));
        }
    }
    let o = SharedSlice::new(&mut out[..n_tok * cols]);
    let sum_token = |t: usize| {
        // SAFETY: each token's output row is written by one participant.
        let row = unsafe { o.range_mut(t * cols..(t + 1) * cols) };
        row.iter_mut().for_each(|v| *v = 0.0);
        for &(ai, i, w) in &per_tok[t] {
            for (acc, v) in row.iter_mut().zip(&active[ai].d[i * cols..(i + 1) * cols]) {
                *acc += w * v;
            }
        }
    };
    if n_tok * cols >= 1 << 16 {
        pool::for_range(n_tok, 1, |r| r.for_each(sum_token));
    } else {
        (0..n_tok).for_each(sum_token);
    }
    Ok(())
}
