//! CPU implementations of the op graph's non-matmul ops: norms, rope, GLU, residual add, soft-cap,
//! softmax/top-k routing and attention over an f16 KV cache.
//!
//! All activations are f32 row-major `[rows, cols]`. Reductions accumulate in f32 (attention scores
//! and softmax too), matching what the GPU kernels do.

use half::f16;
use rayon::prelude::*;

/// Rows at or above which the row-wise ops go parallel (below, thread hand-off costs more).
const PAR_ROWS: usize = 16;

/// `out[r] = x[r] / rms(x[r]) · weight`, for rows of `weight.len()` values.
pub fn rms_norm(x: &[f32], weight: &[f32], out: &mut [f32], eps: f32) {
    let cols = weight.len();
    let norm_row = |(xr, or): (&[f32], &mut [f32])| {
        let ss: f32 = xr.iter().map(|v| v * v).sum();
        let inv = 1.0 / (ss / cols as f32 + eps).sqrt();
        for ((o, v), w) in or.iter_mut().zip(xr).zip(weight) {
            *o = v * inv * w;
        }
    };
    if x.len() / cols >= PAR_ROWS {
        x.par_chunks(cols)
            .zip(out.par_chunks_mut(cols))
            .for_each(norm_row);
    } else {
        x.chunks(cols).zip(out.chunks_mut(cols)).for_each(norm_row);
    }
}

/// In-place RMS norm of a row.
pub fn rms_norm_inplace(x: &mut [f32], weight: &[f32], eps: f32) {
    let ss: f32 = x.iter().map(|v| v * v).sum();
    let inv = 1.0 / (ss / x.len() as f32 + eps).sqrt();
    for (v, w) in x.iter_mut().zip(weight) {
        *v *= inv * w;
    }
}

/// RMS norm of every `weight.len()`-wide head slice of `x`, in place (q/k norm).
pub fn head_rms_norm(x: &mut [f32], weight: &[f32], eps: f32) {
    x.chunks_mut(weight.len())
        .for_each(|h| rms_norm_inplace(h, weight, eps));
}

/// How rotary embedding pairs dimensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopePairing {
    /// (2i, 2i+1)
    Adjacent,
    /// (i, i + n_dims/2)
    Neox,
}

/// Rotary embedding parameters.
#[derive(Clone, Copy, Debug)]
pub struct Rope<'a> {
    /// Pairing mode.
    pub pairing: RopePairing,
    /// Rotated dimensions per head.
    pub n_dims: usize,
    /// Frequency base.
    pub base: f32,
    /// Positions are multiplied by this.
    pub pos_scale: f32,
    /// Per-pair frequency divisors (llama3), `n_dims / 2` long.
    pub freq_factors: Option<&'a [f32]>,
}

impl Rope<'_> {
    /// Per-pair inverse frequencies: `base^(-2i/n_dims) / freq_factors[i]`.
    fn inv_freq(&self) -> Vec<f32> {
        let half = self.n_dims / 2;
        (0..half)
            .map(|i| {
                let f = self.base.powf(-2.0 * i as f32 / self.n_dims as f32);
                match self.freq_factors {
                    Some(ff) => f / ff[i],
                    None => f,
                }
            })
            .collect()
    }

    /// Rotates every head of one row by the angles of (unscaled) position `pos`, which may be
    /// negative (a rotation back).
    fn rotate_row(&self, row: &mut [f32], head_dim: usize, pos: f32, inv_freq: &[f32]) {
        let half = self.n_dims / 2;
        let p = pos * self.pos_scale;
        let sin_cos: Vec<(f32, f32)> = inv_freq.iter().map(|f| (p * f).sin_cos()).collect();
        for head in row.chunks_mut(head_dim) {
            for (i, &(s, c)) in sin_cos.iter().enumerate() {
                let (a, b) = match self.pairing {
                    RopePairing::Adjacent => (2 * i, 2 * i + 1),
                    RopePairing::Neox => (i, i + half),
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * c - x1 * s;
                head[b] = x0 * s + x1 * c;
            }
        }
    }
}

/// Applies rope in place to `x` (`positions.len()` rows of heads of `head_dim`).
pub fn rope(x: &mut [f32], head_dim: usize, positions: &[u32], r: &Rope) {
    let cols = x.len() / positions.len().max(1);
    // Per-pair inverse frequencies, computed once per call.
    let inv_freq = r.inv_freq();
    let rotate_row =
        |(row, &pos): (&mut [f32], &u32)| r.rotate_row(row, head_dim, pos as f32, &inv_freq);
    if positions.len() >= PAR_ROWS {
        x.par_chunks_mut(cols)
            .zip(positions.par_iter())
            .for_each(rotate_row);
    } else {
        x.chunks_mut(cols)
            .zip(positions.iter())
            .for_each(rotate_row);
    }
}

/// One ordered run of KV cell moves of a context shift. Moves run in order; runs touch disjoint
/// cells, so they may run in parallel. A cyclic run's first move overwrites its last move's
/// source: that source is read before anything is written (a single self-move rotates a cell in
/// place).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShiftRun {
    /// (source cell, destination cell), in the order they run.
    pub moves: Vec<(u32, u32)>,
    /// Whether the run is a cycle (see above).
    pub cyclic: bool,
}

/// Moves cells of one sequence's KV rows (`cells` is `n_cells × cols` f16) as `runs` say, each
/// moved row rotated by the rope angles of `delta` positions when `rope` is given (K of a layer
/// with rotary embeddings; heads of `head_dim`), copied as is otherwise (V, or K without rope).
/// The rotation is computed in f32 from the stored f16 and rounded back to f16, as the CUDA
/// `kv_shift` kernel does.
pub fn kv_shift(
    cells: &mut [f16],
    cols: usize,
    head_dim: usize,
    rope: Option<&Rope>,
    delta: i64,
    runs: &[ShiftRun],
) {
    let inv_freq = rope.map(|r| r.inv_freq()).unwrap_or_default();
    let row = |c: u32| c as usize * cols..(c as usize + 1) * cols;
    let mut buf = vec![0f32; cols];
    for run in runs {
        let Some(&(last_src, _)) = run.moves.last() else {
            continue;
        };
        let saved: Option<Vec<f16>> = run.cyclic.then(|| cells[row(last_src)].to_vec());
        for (i, &(src, dst)) in run.moves.iter().enumerate() {
            let from: &[f16] = match &saved {
                Some(v) if i + 1 == run.moves.len() => v,
                _ => &cells[row(src)],
            };
            for (b, v) in buf.iter_mut().zip(from) {
                *b = v.to_f32();
            }
            if let Some(r) = rope {
                r.rotate_row(&mut buf, head_dim, delta as f32, &inv_freq);
            }
            for (o, b) in cells[row(dst)].iter_mut().zip(&buf) {
                *o = f16::from_f32(*b);
            }
        }
    }
}

/// SiLU.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// GELU, tanh approximation.
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)).tanh())
}

/// `out = act(gate) · up` elementwise; `gelu` picks GELU-tanh, else SiLU.
pub fn glu(gate: &[f32], up: &[f32], out: &mut [f32], gelu: bool) {
    let f = |((o, g), u): ((&mut f32, &f32), &f32)| {
        *o = if gelu { gelu_tanh(*g) } else { silu(*g) } * u;
    };
    if out.len() >= 1 << 16 {
        out.par_iter_mut()
            .zip(gate.par_iter())
            .zip(up.par_iter())
            .for_each(f);
    } else {
        out.iter_mut().zip(gate).zip(up).for_each(f);
    }
}

/// `a += b` elementwise.
pub fn add_inplace(a: &mut [f32], b: &[f32]) {
    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
}

/// `x = cap · tanh(x / cap)`.
pub fn softcap(x: &mut [f32], cap: f32) {
    x.iter_mut().for_each(|v| *v = cap * (*v / cap).tanh());
}

/// Numerically stable softmax in place.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= inv);
}

/// MoE routing of one token: softmax over `logits`, the `ids.len()` largest (ties → lower id), with
/// their probabilities optionally renormalised to sum to 1.
pub fn route_top_k(logits: &[f32], ids: &mut [u32], weights: &mut [f32], normalize: bool) {
    let mut probs = logits.to_vec();
    softmax(&mut probs);
    let mut order: Vec<u32> = (0..probs.len() as u32).collect();
    order.sort_by(|&a, &b| {
        probs[b as usize]
            .total_cmp(&probs[a as usize])
            .then(a.cmp(&b))
    });
    for (k, &e) in order.iter().take(ids.len()).enumerate() {
        ids[k] = e;
        weights[k] = probs[e as usize];
    }
    if normalize {
        let s: f32 = weights.iter().sum();
        weights.iter_mut().for_each(|w| *w /= s);
    }
}

/// MoE routing of one token with the experts given (`ids`): their softmax probabilities, optionally
/// renormalised. Tests use it to force a reference's expert choice.
pub fn route_forced(logits: &[f32], ids: &[u32], weights: &mut [f32], normalize: bool) {
    let mut probs = logits.to_vec();
    softmax(&mut probs);
    for (w, &e) in weights.iter_mut().zip(ids) {
        *w = probs[e as usize];
    }
    if normalize {
        let s: f32 = weights.iter().sum();
        weights.iter_mut().for_each(|w| *w /= s);
    }
}

/// One layer's KV cache as the attention kernel sees it: `cells` slots of `n_head_kv · head_dim`
/// f16 values for K and for V (V not transposed). Position `p` lives in slot `p % cells`.
pub struct KvView<'a> {
    /// Keys, `cells × kv_k_cols`.
    pub k: &'a [f16],
    /// Values, `cells × kv_v_cols`.
    pub v: &'a [f16],
    /// Slots.
    pub cells: usize,
}

/// Attention shape and masking parameters.
#[derive(Clone, Copy, Debug)]
pub struct AttnParams {
    /// Query heads.
    pub n_head: usize,
    /// KV heads.
    pub n_head_kv: usize,
    /// Key head dimension.
    pub head_dim_k: usize,
    /// Value head dimension.
    pub head_dim_v: usize,
    /// Keys at positions `p - window < j ≤ p` only.
    pub window: Option<usize>,
    /// Score scale.
    pub scale: f32,
    /// Score soft-cap.
    pub softcap: Option<f32>,
}

/// Keys per task when attention splits one (token, kv head) pair over several tasks.
const ATTN_SPLIT_KEYS: usize = 256;
/// Below this many (token, kv head) pairs the keys are split too (decode and short batches), so
/// every thread has work; the split depends only on the shapes, never on the thread count, so
/// results do not change with `-t`.
const ATTN_SPLIT_BELOW_PAIRS: usize = 64;

/// Causal attention of `q` (rows at `positions`) over the cache, which already holds every position
/// `≤` each row's own. Writes `out` (`rows × n_head · head_dim_v`).
///
/// Work is split over (token, kv head, key span) tasks; each task widens every cache row of its
/// span from f16 once (run-time-detected F16C via `half`'s slice conversion) for all query heads of
/// the GQA group, keeps its own running max, and the spans are merged with the usual log-sum-exp
/// rescaling. QK, softmax and PV all accumulate in f32.
pub fn attention(q: &[f32], positions: &[u32], kv: &KvView, p: &AttnParams, out: &mut [f32]) {
    let group = p.n_head / p.n_head_kv;
    let dv = p.head_dim_v;
    let pairs = positions.len() * p.n_head_kv;
    let span_of = |t: usize| {
        let pos = positions[t] as usize;
        let first = match p.window {
            Some(w) => (pos + 1).saturating_sub(w),
            None => 0,
        };
        (first, pos + 1)
    };
    if pairs >= ATTN_SPLIT_BELOW_PAIRS {
        // Enough pairs: one task per pair, normalised straight into the output.
        out.par_chunks_mut(group * dv).enumerate().for_each_init(
            || (AttnScratch::new(p), vec![0f32; group * (dv + 2)]),
            |(scratch, part), (idx, o)| {
                let (t, kh) = (idx / p.n_head_kv, idx % p.n_head_kv);
                let (a, b) = span_of(t);
                attend_span(q, t, kh, a, b, kv, p, scratch, part);
                finish_pair(part, 1, group, dv, o);
            },
        );
        return;
    }
    // Few pairs (decode): split each pair's keys into spans of ATTN_SPLIT_KEYS.
    let mut tasks = Vec::new(); // (pair, first key, end key)
    let mut first_task = Vec::with_capacity(pairs + 1);
    for idx in 0..pairs {
        first_task.push(tasks.len());
        let (a, b) = span_of(idx / p.n_head_kv);
        let mut j = a;
        while j < b {
            let e = (j + ATTN_SPLIT_KEYS).min(b);
            tasks.push((idx, j, e));
            j = e;
        }
    }
    first_task.push(tasks.len());
    let stride = group * (dv + 2);
    let mut parts = vec![0f32; tasks.len() * stride];
    parts
        .par_chunks_mut(stride)
        .zip(tasks.par_iter())
        .for_each_init(
            || AttnScratch::new(p),
            |scratch, (part, &(idx, a, b))| {
                let (t, kh) = (idx / p.n_head_kv, idx % p.n_head_kv);
                attend_span(q, t, kh, a, b, kv, p, scratch, part);
            },
        );
    out.par_chunks_mut(group * dv)
        .enumerate()
        .for_each(|(idx, o)| {
            let (lo, hi) = (first_task[idx], first_task[idx + 1]);
            finish_pair(&parts[lo * stride..hi * stride], hi - lo, group, dv, o);
        });
}

/// Tests set this to run the portable span body on CPUs that have AVX2 too.
static PORTABLE_ATTENTION: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Per-thread buffers of [`attend_span`].
struct AttnScratch {
    row: Vec<f32>,
    scores: Vec<f32>,
}

impl AttnScratch {
    fn new(p: &AttnParams) -> Self {
        AttnScratch {
            row: vec![0f32; p.head_dim_k.max(p.head_dim_v)],
            scores: Vec::new(),
        }
    }
}

/// Merges `n` span partials of one (token, kv head) pair — per query head of the group:
/// `[max, sum, unnormalised o[dv]]` — into the normalised output `o` (`group × dv`).
fn finish_pair(parts: &[f32], n: usize, group: usize, dv: usize, o: &mut [f32]) {
    let stride = group * (dv + 2);
    for g in 0..group {
        let at = |c: usize| &parts[c * stride + g * (dv + 2)..][..dv + 2];
        let m = (0..n).map(|c| at(c)[0]).fold(f32::NEG_INFINITY, f32::max);
        let og = &mut o[g * dv..][..dv];
        og.iter_mut().for_each(|v| *v = 0.0);
        let mut l = 0f32;
        for c in 0..n {
            let pc = at(c);
            if pc[1] == 0.0 {
                continue;
            }
            let w = (pc[0] - m).exp();
            l += pc[1] * w;
            for (a, b) in og.iter_mut().zip(&pc[2..]) {
                *a += w * b;
            }
        }
        let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
        og.iter_mut().for_each(|v| *v *= inv);
    }
}

/// Attention of token `t`'s query heads of kv head `kh` over keys `[a, b)`: writes per query head
/// `[max score, Σ exp(s − max), Σ exp(s − max)·v]` into `part` (`group × (dv + 2)`).
#[allow(clippy::too_many_arguments)]
fn attend_span(
    q: &[f32],
    t: usize,
    kh: usize,
    a: usize,
    b: usize,
    kv: &KvView,
    p: &AttnParams,
    scratch: &mut AttnScratch,
    part: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && !PORTABLE_ATTENTION.load(std::sync::atomic::Ordering::Relaxed)
    {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above), the only requirement of the
        // target-feature function; its body is the same safe code as the portable path.
        unsafe { attend_span_avx2(q, t, kh, a, b, kv, p, scratch, part) };
        return;
    }
    attend_span_body(q, t, kh, a, b, kv, p, scratch, part);
}

/// [`attend_span_body`] compiled for AVX2 + FMA so its f32 loops use 256-bit vectors.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn attend_span_avx2(
    q: &[f32],
    t: usize,
    kh: usize,
    a: usize,
    b: usize,
    kv: &KvView,
    p: &AttnParams,
    scratch: &mut AttnScratch,
    part: &mut [f32],
) {
    attend_span_body(q, t, kh, a, b, kv, p, scratch, part);
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_span_body(
    q: &[f32],
    t: usize,
    kh: usize,
    a: usize,
    b: usize,
    kv: &KvView,
    p: &AttnParams,
    scratch: &mut AttnScratch,
    part: &mut [f32],
) {
    use half::slice::HalfFloatSliceExt;
    let (dk, dv) = (p.head_dim_k, p.head_dim_v);
    let group = p.n_head / p.n_head_kv;
    let (kk, vv) = (p.n_head_kv * dk, p.n_head_kv * dv);
    let len = b - a;
    let qg = &q[t * p.n_head * dk + kh * group * dk..][..group * dk];
    let AttnScratch { row, scores } = scratch;
    scores.clear();
    scores.resize(group * len, 0.0);
    let krow = &mut row[..dk];
    for (i, j) in (a..b).enumerate() {
        let slot = j % kv.cells;
        kv.k[slot * kk + kh * dk..][..dk].convert_to_f32_slice(krow);
        for g in 0..group {
            let s = dot_f32(&qg[g * dk..][..dk], krow) * p.scale;
            scores[g * len + i] = match p.softcap {
                Some(c) => c * (s / c).tanh(),
                None => s,
            };
        }
    }
    for g in 0..group {
        let sc = &mut scores[g * len..][..len];
        let m = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut l = 0f32;
        for v in sc.iter_mut() {
            *v = (*v - m).exp();
            l += *v;
        }
        let pg = &mut part[g * (dv + 2)..][..dv + 2];
        pg[0] = m;
        pg[1] = if len == 0 { 0.0 } else { l };
        pg[2..].iter_mut().for_each(|v| *v = 0.0);
    }
    let vrow = &mut row[..dv];
    for (i, j) in (a..b).enumerate() {
        let slot = j % kv.cells;
        kv.v[slot * vv + kh * dv..][..dv].convert_to_f32_slice(vrow);
        for g in 0..group {
            let w = scores[g * len + i];
            for (o, x) in part[g * (dv + 2) + 2..][..dv].iter_mut().zip(vrow.iter()) {
                *o += w * x;
            }
        }
    }
}

/// f32 dot product in 8 independent lanes so the compiler vectorises it.
#[inline(always)]
fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, ar) = a.split_at(a.len() / 8 * 8);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_unit_rows() {
        let x = [3.0f32, 4.0, 0.0, 0.0];
        let w = [1.0f32, 2.0, 1.0, 1.0];
        let mut out = [0.0f32; 4];
        rms_norm(&x, &w, &mut out, 0.0);
        // rms = sqrt(25/4) = 2.5
        assert!((out[0] - 1.2).abs() < 1e-6 && (out[1] - 3.2).abs() < 1e-6);
    }

    #[test]
    fn rope_modes_rotate_the_right_pairs() {
        // One head of 4 dims, position 1, base such that pair 0 angle = 1 rad.
        let r = Rope {
            pairing: RopePairing::Adjacent,
            n_dims: 4,
            base: 10000.0,
            pos_scale: 1.0,
            freq_factors: None,
        };
        let mut x = vec![1.0f32, 0.0, 1.0, 0.0];
        rope(&mut x, 4, &[1], &r);
        assert!((x[0] - 1f32.cos()).abs() < 1e-6 && (x[1] - 1f32.sin()).abs() < 1e-6);
        let f1 = 10000f32.powf(-0.5);
        assert!((x[2] - f1.cos()).abs() < 1e-6 && (x[3] - f1.sin()).abs() < 1e-6);
        let r = Rope {
            pairing: RopePairing::Neox,
            ..r
        };
        let mut y = vec![1.0f32, 1.0, 0.0, 0.0];
        rope(&mut y, 4, &[1], &r);
        assert!((y[0] - 1f32.cos()).abs() < 1e-6 && (y[2] - 1f32.sin()).abs() < 1e-6);
        assert!((y[1] - f1.cos()).abs() < 1e-6 && (y[3] - f1.sin()).abs() < 1e-6);
    }

    #[test]
    fn route_picks_top_k_and_renormalises() {
        let mut ids = [0u32; 2];
        let mut w = [0f32; 2];
        route_top_k(&[0.0, 3.0, 1.0, 2.9], &mut ids, &mut w, true);
        assert_eq!(ids, [1, 3]);
        assert!((w[0] + w[1] - 1.0).abs() < 1e-6 && w[0] > w[1]);
    }

    /// f64 attention of one row, for the split/unsplit comparison below.
    fn naive_attention(q: &[f32], pos: usize, kv: &KvView, p: &AttnParams) -> Vec<f64> {
        let (dk, dv) = (p.head_dim_k, p.head_dim_v);
        let group = p.n_head / p.n_head_kv;
        let first = p.window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let mut out = vec![0f64; p.n_head * dv];
        for h in 0..p.n_head {
            let kh = h / group;
            let sc: Vec<f64> = (first..=pos)
                .map(|j| {
                    let slot = j % kv.cells;
                    let kr = &kv.k[(slot * p.n_head_kv + kh) * dk..][..dk];
                    let s: f64 = (0..dk)
                        .map(|d| q[h * dk + d] as f64 * kr[d].to_f64())
                        .sum::<f64>()
                        * p.scale as f64;
                    p.softcap.map_or(s, |c| c as f64 * (s / c as f64).tanh())
                })
                .collect();
            let m = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = sc.iter().map(|s| (s - m).exp()).collect();
            let l: f64 = e.iter().sum();
            for (i, j) in (first..=pos).enumerate() {
                let slot = j % kv.cells;
                let vr = &kv.v[(slot * p.n_head_kv + kh) * dv..][..dv];
                for d in 0..dv {
                    out[h * dv + d] += e[i] / l * vr[d].to_f64();
                }
            }
        }
        out
    }

    #[test]
    fn attention_split_spans_match_f64() {
        use rand::{Rng, SeedableRng};
        let seed = std::env::var("PSHARD_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random::<u64>);
        eprintln!("attention_split_spans_match_f64: PSHARD_SEED={seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (n_head, n_head_kv, dk, dv, cells) = (6, 2, 40, 24, 1100);
        let mut r = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect() };
        let k: Vec<f16> = r(cells * n_head_kv * dk)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        let v: Vec<f16> = r(cells * n_head_kv * dv)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        let kv = KvView {
            k: &k,
            v: &v,
            cells,
        };
        for (portable, window, softcap) in [
            (false, None, None),
            (false, Some(300), Some(2.0)),
            (false, Some(2000), None),
            (true, None, Some(2.0)),
        ] {
            PORTABLE_ATTENTION.store(portable, std::sync::atomic::Ordering::Relaxed);
            let p = AttnParams {
                n_head,
                n_head_kv,
                head_dim_k: dk,
                head_dim_v: dv,
                window,
                scale: 0.7,
                softcap,
            };
            // One decode row (split into spans of ATTN_SPLIT_KEYS), a few rows (split), and 40
            // rows (≥ ATTN_SPLIT_BELOW_PAIRS pairs: one task per pair).
            for positions in [
                vec![1099u32],
                vec![0, 255, 256, 257, 700],
                (1060..1100).collect(),
            ] {
                let q = r(positions.len() * n_head * dk);
                let mut out = vec![0f32; positions.len() * n_head * dv];
                attention(&q, &positions, &kv, &p, &mut out);
                for (t, &pos) in positions.iter().enumerate() {
                    let want = naive_attention(
                        &q[t * n_head * dk..][..n_head * dk],
                        pos as usize,
                        &kv,
                        &p,
                    );
                    for (i, w) in want.iter().enumerate() {
                        let got = out[t * n_head * dv + i] as f64;
                        assert!(
                            (got - w).abs() <= 1e-5 * (1.0 + w.abs()),
                            "seed {seed} portable {portable} window {window:?} pos {pos} [{i}]: {got} vs {w}"
                        );
                    }
                }
            }
        }
        PORTABLE_ATTENTION.store(false, std::sync::atomic::Ordering::Relaxed);
    }

    #[test]
    fn attention_window_and_gqa() {
        // 2 query heads sharing 1 kv head of dim 1; values = position; window 2.
        let cells = 8;
        let k: Vec<f16> = vec![f16::from_f32(0.0); cells];
        let v: Vec<f16> = (0..cells).map(|j| f16::from_f32(j as f32)).collect();
        let kv = KvView {
            k: &k,
            v: &v,
            cells,
        };
        let p = AttnParams {
            n_head: 2,
            n_head_kv: 1,
            head_dim_k: 1,
            head_dim_v: 1,
            window: Some(2),
            scale: 1.0,
            softcap: None,
        };
        let q = vec![1.0f32, 1.0];
        let mut out = vec![0f32; 2];
        attention(&q, &[5], &kv, &p, &mut out);
        // Equal scores over positions 4 and 5 → mean 4.5 for both heads.
        assert!((out[0] - 4.5).abs() < 1e-6 && (out[1] - 4.5).abs() < 1e-6);
        let p = AttnParams { window: None, ..p };
        attention(&q, &[3], &kv, &p, &mut out);
        assert!((out[0] - 1.5).abs() < 1e-6);
    }
}
