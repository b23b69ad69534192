//! CPU implementations of the op graph's non-matmul ops: norms, rope (YaRN included), GLUs,
//! residual add, soft-cap, MoE routing and attention (with sinks) over an f16 KV cache.
//!
//! All activations are f32 row-major `[rows, cols]`. Reductions accumulate in f32 (attention scores
//! and softmax too), matching what the GPU kernels do.

use half::f16;
use pshard_model::graph::{Activation, RopeYarn, Routing, SWIGLU_OAI_ALPHA, SWIGLU_OAI_LIMIT};
use pshard_model::spec::Gating;
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
    /// YaRN's per-pair mix and magnitude.
    pub yarn: Option<RopeYarn>,
}

impl Rope<'_> {
    /// Per pair: the angle per unit of position (positions are not pre-scaled).
    fn angle_rates(&self) -> Vec<f32> {
        (0..self.n_dims / 2)
            .map(|i| {
                let mut f = self.base.powf(-2.0 * i as f32 / self.n_dims as f32);
                if let Some(ff) = self.freq_factors {
                    f /= ff[i];
                }
                match self.yarn {
                    Some(y) => f * y.angle_factor(i, self.pos_scale),
                    None => f * self.pos_scale,
                }
            })
            .collect()
    }

    /// `(sin, cos)` of each pair at `pos`, times YaRN's magnitude.
    fn table(&self, rates: &[f32], pos: u32) -> Vec<(f32, f32)> {
        Self::table_at(rates, pos as f32, self.yarn.map_or(1.0, |y| y.mscale))
    }

    /// `(sin, cos)` of each pair at `pos` (any real, negative turns back), times `magnitude`.
    fn table_at(rates: &[f32], pos: f32, magnitude: f32) -> Vec<(f32, f32)> {
        rates
            .iter()
            .map(|f| {
                let (s, c) = (pos * f).sin_cos();
                (s * magnitude, c * magnitude)
            })
            .collect()
    }

    /// Rotates the first `n_dims` values of one head by `table`.
    fn rotate(&self, head: &mut [f32], table: &[(f32, f32)]) {
        let half = self.n_dims / 2;
        for (i, &(s, c)) in table.iter().enumerate() {
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

/// Rope of `n_heads` heads per row taken from `src` (head `h` at `h·src_stride + src_off`) into
/// `dst` (at `h·dst_stride + dst_off`), `n_dims` values each; rows of `src` and `dst` are
/// `positions.len()` long. Multi-head latent attention ropes its key and query parts this way.
#[allow(clippy::too_many_arguments)]
pub fn rope_heads(
    src: &[f32],
    (src_stride, src_off): (usize, usize),
    dst: &mut [f32],
    (dst_stride, dst_off): (usize, usize),
    n_heads: usize,
    positions: &[u32],
    r: &Rope,
) {
    let n = positions.len().max(1);
    let (sc, dc) = (src.len() / n, dst.len() / n);
    let rates = r.angle_rates();
    for (t, &pos) in positions.iter().enumerate() {
        let table = r.table(&rates, pos);
        for h in 0..n_heads {
            let d = &mut dst[t * dc + h * dst_stride + dst_off..][..r.n_dims];
            d.copy_from_slice(&src[t * sc + h * src_stride + src_off..][..r.n_dims]);
            r.rotate(d, &table);
        }
    }
}

/// Applies rope in place to `x` (`positions.len()` rows of heads of `head_dim`).
pub fn rope(x: &mut [f32], head_dim: usize, positions: &[u32], r: &Rope) {
    let cols = x.len() / positions.len().max(1);
    // Per-pair angle rates, computed once per call.
    let rates = r.angle_rates();
    let rotate_row = |(row, &pos): (&mut [f32], &u32)| {
        let table = r.table(&rates, pos);
        for head in row.chunks_mut(head_dim) {
            r.rotate(head, &table);
        }
    };
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
/// with rotary embeddings: in each head of `head_dim` values, the `rope.n_dims` from `rope_off`
/// on; latent attention's one head ropes after its latent), copied as is otherwise (V, or K
/// without rope). The angles are the forward rope's (frequency factors, position scale, YaRN's
/// per-pair mix) but not YaRN's magnitude: the cached K already carries it, and a rotation by
/// the difference of two positions' angles keeps magnitudes. The rotation is computed in f32
/// from the stored f16 and rounded back to f16, as the CUDA `kv_shift` kernel does.
pub fn kv_shift(
    cells: &mut [f16],
    cols: usize,
    (head_dim, rope_off): (usize, usize),
    rope: Option<&Rope>,
    delta: i64,
    runs: &[ShiftRun],
) {
    let table = rope
        .map(|r| Rope::table_at(&r.angle_rates(), delta as f32, 1.0))
        .unwrap_or_default();
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
                for head in buf.chunks_mut(head_dim) {
                    r.rotate(&mut head[rope_off..], &table);
                }
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

/// gpt-oss's clamped SwiGLU of one (gate, up) pair (see [`Activation::SwigluOai`]).
#[inline]
pub fn swiglu_oai(gate: f32, up: f32) -> f32 {
    let g = gate.min(SWIGLU_OAI_LIMIT);
    let u = up.clamp(-SWIGLU_OAI_LIMIT, SWIGLU_OAI_LIMIT);
    g / (1.0 + (-SWIGLU_OAI_ALPHA * g).exp()) * (u + 1.0)
}

/// `out = act(gate, up)` elementwise.
pub fn glu(gate: &[f32], up: &[f32], out: &mut [f32], act: Activation) {
    let f = |((o, g), u): ((&mut f32, &f32), &f32)| {
        *o = match act {
            Activation::Silu => silu(*g) * u,
            Activation::GeluTanh => gelu_tanh(*g) * u,
            Activation::SwigluOai => swiglu_oai(*g, *u),
        };
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

/// MoE routing of one token as llama.cpp's `build_moe_ffn` does it: gated values (softmax,
/// sigmoid, or the raw logits when the softmax comes after the top k), `select_bias` added for
/// choosing only, the group limit, the `ids.len()` best (ties → lower id) — or the `forced`
/// experts —, their gated values as weights (softmaxed among themselves for
/// [`Gating::SoftmaxAfterTopK`]), renormalised (sum clamped at 2⁻¹⁴ as llama.cpp does) and scaled
/// when `r` says so.
pub fn route(
    logits: &[f32],
    r: &Routing,
    select_bias: Option<&[f32]>,
    forced: Option<&[u32]>,
    ids: &mut [u32],
    weights: &mut [f32],
) {
    let mut probs = logits.to_vec();
    match r.gating {
        Gating::Softmax => softmax(&mut probs),
        Gating::Sigmoid => probs
            .iter_mut()
            .for_each(|v| *v = 1.0 / (1.0 + (-*v).exp())),
        Gating::SoftmaxAfterTopK => {}
    }
    match forced {
        Some(f) => ids.copy_from_slice(f),
        None => {
            let mut sel = probs.clone();
            if let Some(b) = select_bias {
                sel.iter_mut().zip(b).for_each(|(s, b)| *s += b);
            }
            let (groups, used) = r.groups;
            if groups > 1 {
                limit_groups(&mut sel, groups, used);
            }
            let mut order: Vec<u32> = (0..sel.len() as u32).collect();
            order.sort_by(|&a, &b| sel[b as usize].total_cmp(&sel[a as usize]).then(a.cmp(&b)));
            ids.copy_from_slice(&order[..ids.len()]);
        }
    }
    for (w, &e) in weights.iter_mut().zip(ids.iter()) {
        *w = probs[e as usize];
    }
    if r.gating == Gating::SoftmaxAfterTopK {
        softmax(weights);
    }
    if r.normalize {
        let s: f32 = weights.iter().sum::<f32>().max(6.103_515_6e-5);
        weights.iter_mut().for_each(|w| *w /= s);
    }
    if r.scale != 1.0 {
        weights.iter_mut().for_each(|w| *w *= r.scale);
    }
}

/// Group-limited routing: each of `groups` consecutive expert groups scores the sum of its two
/// best values; all but the `used` best groups (ties → lower group) are masked to −∞.
fn limit_groups(sel: &mut [f32], groups: usize, used: usize) {
    let per = sel.len() / groups;
    let score = |g: &[f32]| {
        let mut top = [f32::NEG_INFINITY; 2];
        for &v in g {
            if v > top[0] {
                top = [v, top[0]];
            } else if v > top[1] {
                top[1] = v;
            }
        }
        if per < 2 {
            top[0]
        } else {
            top[0] + top[1]
        }
    };
    let scores: Vec<f32> = sel.chunks(per).map(score).collect();
    let mut order: Vec<usize> = (0..groups).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    for &g in &order[used..] {
        sel[g * per..(g + 1) * per]
            .iter_mut()
            .for_each(|v| *v = f32::NEG_INFINITY);
    }
}

/// One layer's KV cache as the attention kernel sees it: `cells` slots of K rows (`k_row` f16
/// values, head `h` at `h · head_dim_k`) and of V rows (`v_row` values, head `h` at
/// `h · head_dim_v`; V not transposed). Position `p` lives in slot `p % cells`. Latent attention
/// passes the K rows as V too (its values are the first `head_dim_v` of each K row).
pub struct KvView<'a> {
    /// Keys, `cells × k_row`.
    pub k: &'a [f16],
    /// Values, `cells × v_row`.
    pub v: &'a [f16],
    /// Slots.
    pub cells: usize,
    /// f16 values per K slot.
    pub k_row: usize,
    /// f16 values per V slot.
    pub v_row: usize,
}

/// Attention shape and masking parameters.
#[derive(Clone, Copy, Debug)]
pub struct AttnParams<'a> {
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
    /// Per query head, a logit that joins the softmax's denominator without a value.
    pub sinks: Option<&'a [f32]>,
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
                finish_pair(part, 1, group, dv, sinks_of(p, kh), o);
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
            finish_pair(
                &parts[lo * stride..hi * stride],
                hi - lo,
                group,
                dv,
                sinks_of(p, idx % p.n_head_kv),
                o,
            );
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

/// The sinks of kv head `kh`'s query heads.
fn sinks_of<'a>(p: &AttnParams<'a>, kh: usize) -> Option<&'a [f32]> {
    let group = p.n_head / p.n_head_kv;
    p.sinks.map(|s| &s[kh * group..][..group])
}

/// Merges `n` span partials of one (token, kv head) pair — per query head of the group:
/// `[max, sum, unnormalised o[dv]]` — into the normalised output `o` (`group × dv`); each
/// head's sink (if any) joins the denominator.
fn finish_pair(
    parts: &[f32],
    n: usize,
    group: usize,
    dv: usize,
    sinks: Option<&[f32]>,
    o: &mut [f32],
) {
    let stride = group * (dv + 2);
    for g in 0..group {
        let at = |c: usize| &parts[c * stride + g * (dv + 2)..][..dv + 2];
        let sink = sinks.map(|s| s[g]);
        let m = (0..n)
            .map(|c| at(c)[0])
            .chain(sink)
            .fold(f32::NEG_INFINITY, f32::max);
        let og = &mut o[g * dv..][..dv];
        og.iter_mut().for_each(|v| *v = 0.0);
        let mut l = sink.map_or(0.0, |s| (s - m).exp());
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
    let (kk, vv) = (kv.k_row, kv.v_row);
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
            yarn: None,
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

    /// A K row roped at position 40 and shifted by -18 equals the row roped at 22 (up to f16
    /// rounding) for YaRN with a magnitude (applied once, by the forward rope) and for latent
    /// attention's row (latent untouched, rope part after it); the latent and the unrotated
    /// tail of a partial rope are copied exactly.
    #[test]
    fn kv_shift_turns_k_to_its_new_position() {
        let yarn = RopeYarn {
            low: 2.0,
            high: 9.0,
            ext_factor: 1.0,
            mscale: 1.35,
        };
        // (pairing, head width, rotated dims, offset, YaRN).
        for (pairing, head, n_dims, off, y) in [
            (RopePairing::Neox, 32, 32, 0, Some(yarn)),
            (RopePairing::Adjacent, 32, 16, 0, Some(yarn)),
            (RopePairing::Neox, 32, 16, 0, None),
            (RopePairing::Adjacent, 48, 16, 32, Some(yarn)),
        ] {
            let r = Rope {
                pairing,
                n_dims,
                base: 10000.0,
                pos_scale: 0.25,
                freq_factors: None,
                yarn: y,
            };
            let cols = 2 * head;
            let x: Vec<f32> = (0..cols)
                .map(|i| ((i * 37 % 17) as f32 - 8.0) / 4.0)
                .collect();
            let roped_at = |pos: u32| {
                let mut v = x.clone();
                for h in v.chunks_mut(head) {
                    let mut part = h[off..off + n_dims].to_vec();
                    rope(&mut part, n_dims, &[pos], &r);
                    h[off..off + n_dims].copy_from_slice(&part);
                }
                v
            };
            // Cells 0 and 1: cell 1 (position 40) moves to cell 0.
            let mut cells: Vec<f16> = [vec![0f32; cols], roped_at(40)]
                .concat()
                .into_iter()
                .map(f16::from_f32)
                .collect();
            let runs = [ShiftRun {
                moves: vec![(1, 0)],
                cyclic: false,
            }];
            kv_shift(&mut cells, cols, (head, off), Some(&r), -18, &runs);
            let want = roped_at(22);
            let got: Vec<f32> = cells[..cols].iter().map(|v| v.to_f32()).collect();
            let far = roped_at(40);
            for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                let in_rope = (off..off + n_dims).contains(&(j % head));
                if in_rope {
                    assert!(
                        (g - w).abs() < 1e-2,
                        "{pairing:?} {off}: col {j}: {g} vs {w}"
                    );
                } else {
                    assert_eq!(*g, f16::from_f32(*w).to_f32(), "{pairing:?} col {j} copied");
                }
            }
            let moved: f32 = far.iter().zip(&want).map(|(a, b)| (a - b).abs()).sum();
            assert!(
                moved > 1.0,
                "{pairing:?} {off}: positions 40 and 22 too alike"
            );
        }
    }

    fn routing(gating: Gating, normalize: bool, scale: f32, groups: (usize, usize)) -> Routing {
        Routing {
            n_expert: 4,
            n_used: 2,
            gating,
            normalize,
            scale,
            groups,
        }
    }

    #[test]
    fn route_picks_top_k_and_renormalises() {
        let mut ids = [0u32; 2];
        let mut w = [0f32; 2];
        let r = routing(Gating::Softmax, true, 1.0, (0, 0));
        route(&[0.0, 3.0, 1.0, 2.9], &r, None, None, &mut ids, &mut w);
        assert_eq!(ids, [1, 3]);
        assert!((w[0] + w[1] - 1.0).abs() < 1e-6 && w[0] > w[1]);
    }

    #[test]
    fn route_gatings_bias_groups_and_scale() {
        let logits = [0.0f32, 3.0, 1.0, 2.9];
        let (mut ids, mut w) = ([0u32; 2], [0f32; 2]);
        // Softmax after top-k: the two best logits, softmaxed between themselves.
        let r = routing(Gating::SoftmaxAfterTopK, false, 1.0, (0, 0));
        route(&logits, &r, None, None, &mut ids, &mut w);
        assert_eq!(ids, [1, 3]);
        let e = (0.1f32).exp();
        assert!((w[0] - e / (e + 1.0)).abs() < 1e-6 && (w[1] - 1.0 / (e + 1.0)).abs() < 1e-6);
        // Sigmoid with a selection bias that lifts expert 2 (σ(1) + 0.5) above 1 (σ(3)) and 3;
        // the weights stay unbiased.
        let r = routing(Gating::Sigmoid, false, 2.5, (0, 0));
        route(
            &logits,
            &r,
            Some(&[0.0, 0.0, 0.5, 0.0]),
            None,
            &mut ids,
            &mut w,
        );
        assert_eq!(ids, [2, 1]);
        let sig = |x: f32| 1.0 / (1.0 + (-x).exp());
        assert!((w[0] - 2.5 * sig(1.0)).abs() < 1e-6 && (w[1] - 2.5 * sig(3.0)).abs() < 1e-6);
        // Two groups of two, one used: group {0, 1} scores 3.0, {2, 3} 3.9 → experts 3 and 2.
        let r = routing(Gating::SoftmaxAfterTopK, false, 1.0, (2, 1));
        route(&logits, &r, None, None, &mut ids, &mut w);
        assert_eq!(ids, [3, 2]);
    }

    #[test]
    fn swiglu_oai_clamps() {
        // Below the limit: g·σ(1.702 g)·(u + 1).
        let want = 0.5 / (1.0 + (-1.702f32 * 0.5).exp()) * 1.25;
        assert!((swiglu_oai(0.5, 0.25) - want).abs() < 1e-7);
        // Gate clamped from above only, up on both sides.
        let g = 7.0 / (1.0 + (-1.702f32 * 7.0).exp());
        assert!((swiglu_oai(9.0, -20.0) - g * -6.0).abs() < 1e-5);
        assert!(swiglu_oai(-30.0, 1.0).abs() < 1e-9);
    }

    #[test]
    fn yarn_rope_mixes_and_scales() {
        // Pairs below `low` keep their frequency, above `high` take pos_scale; all scaled by mscale.
        let y = RopeYarn {
            low: 1.0,
            high: 3.0,
            ext_factor: 1.0,
            mscale: 1.5,
        };
        let r = Rope {
            pairing: RopePairing::Adjacent,
            n_dims: 8,
            base: 10.0,
            pos_scale: 0.25,
            freq_factors: None,
            yarn: Some(y),
        };
        let mut x = vec![1.0f32, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0];
        rope(&mut x, 8, &[3], &r);
        for (i, mix) in [(0usize, 1.0f32), (1, 1.0), (2, 0.25 * 0.5 + 0.5), (3, 0.25)] {
            let theta = 3.0 * 10f32.powf(-2.0 * i as f32 / 8.0) * mix;
            assert!((x[2 * i] - 1.5 * theta.cos()).abs() < 1e-5, "pair {i}");
            assert!((x[2 * i + 1] - 1.5 * theta.sin()).abs() < 1e-5, "pair {i}");
        }
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
                    let kr = &kv.k[slot * kv.k_row + kh * dk..][..dk];
                    let s: f64 = (0..dk)
                        .map(|d| q[h * dk + d] as f64 * kr[d].to_f64())
                        .sum::<f64>()
                        * p.scale as f64;
                    p.softcap.map_or(s, |c| c as f64 * (s / c as f64).tanh())
                })
                .collect();
            let sink = p.sinks.map(|s| s[h] as f64);
            let m = sc
                .iter()
                .copied()
                .chain(sink)
                .fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = sc.iter().map(|s| (s - m).exp()).collect();
            let l: f64 = e.iter().sum::<f64>() + sink.map_or(0.0, |s| (s - m).exp());
            for (i, j) in (first..=pos).enumerate() {
                let slot = j % kv.cells;
                let vr = &kv.v[slot * kv.v_row + kh * dv..][..dv];
                for d in 0..dv {
                    out[h * dv + d] += e[i] / l * vr[d].to_f64();
                }
            }
        }
        out
    }

    /// Checks `attention` against [`naive_attention`] on one decode row, a few rows and 40 rows.
    fn check_attention(
        kv: &KvView,
        p: &AttnParams,
        r: &mut impl FnMut(usize) -> Vec<f32>,
        what: &str,
    ) {
        // One decode row (split into spans of ATTN_SPLIT_KEYS), a few rows (split), and 40
        // rows (≥ ATTN_SPLIT_BELOW_PAIRS pairs: one task per pair).
        let (dk, dv) = (p.head_dim_k, p.head_dim_v);
        for positions in [
            vec![1099u32],
            vec![0, 255, 256, 257, 700],
            (1060..1100).collect(),
        ] {
            let q = r(positions.len() * p.n_head * dk);
            let mut out = vec![0f32; positions.len() * p.n_head * dv];
            attention(&q, &positions, kv, p, &mut out);
            for (t, &pos) in positions.iter().enumerate() {
                let want = naive_attention(
                    &q[t * p.n_head * dk..][..p.n_head * dk],
                    pos as usize,
                    kv,
                    p,
                );
                for (i, w) in want.iter().enumerate() {
                    let got = out[t * p.n_head * dv + i] as f64;
                    assert!(
                        (got - w).abs() <= 1e-5 * (1.0 + w.abs()),
                        "{what} pos {pos} [{i}]: {got} vs {w}"
                    );
                }
            }
        }
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
            k_row: n_head_kv * dk,
            v_row: n_head_kv * dv,
        };
        let sinks: Vec<f32> = r(n_head).into_iter().map(|x| 3.0 * x).collect();
        for (portable, window, softcap, sinks) in [
            (false, None, None, None),
            (false, Some(300), Some(2.0), None),
            (false, Some(2000), None, Some(&sinks[..])),
            (true, None, Some(2.0), Some(&sinks[..])),
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
                sinks,
            };
            let what = format!(
                "seed {seed} portable {portable} window {window:?} sinks {}",
                sinks.is_some()
            );
            check_attention(&kv, &p, &mut r, &what);
        }
        PORTABLE_ATTENTION.store(false, std::sync::atomic::Ordering::Relaxed);
        // Latent attention: one KV head whose values are the first 24 of each 40-value K row.
        let kv = KvView {
            k: &k[..cells * dk],
            v: &k[..cells * dk],
            cells,
            k_row: dk,
            v_row: dk,
        };
        let p = AttnParams {
            n_head: 4,
            n_head_kv: 1,
            head_dim_k: dk,
            head_dim_v: dv,
            window: None,
            scale: 0.3,
            softcap: None,
            sinks: None,
        };
        check_attention(&kv, &p, &mut r, &format!("seed {seed} values inside K"));
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
            k_row: 1,
            v_row: 1,
        };
        let p = AttnParams {
            n_head: 2,
            n_head_kv: 1,
            head_dim_k: 1,
            head_dim_v: 1,
            window: Some(2),
            scale: 1.0,
            softcap: None,
            sinks: None,
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
