//! Causal attention with sinks over an f16 or Q8_0 KV cache: the task split (decode spans,
//! prefill tiles), the online softmax per span and the SIMD body that gives the same bits at
//! every level.

use std::ops::Range;

use super::act::exp_reduce;
use super::simd_level;
use crate::kv::KvType;
use crate::pool::{self, SharedSlice};

/// One layer's KV cache as the attention kernel sees it: `cells` slots of K rows (`k_row` values
/// in `ty`, head `h` at value `h · head_dim_k`) and of V rows (`v_row` values, head `h` at
/// `h · head_dim_v`; V not transposed). Position `p` lives in slot `p % cells`. Latent attention
/// passes the K rows as V too (its values are the first `head_dim_v` of each K row). With a
/// blocked type every head slice is whole blocks ([`KvType::check_dims`]).
pub struct KvView<'a> {
    /// Keys, `cells` rows of `ty.row_bytes(k_row)` bytes.
    pub k: &'a [u8],
    /// Values, `cells` rows of `ty.row_bytes(v_row)` bytes.
    pub v: &'a [u8],
    /// The rows' element type.
    pub ty: KvType,
    /// Slots.
    pub cells: usize,
    /// Values per K slot.
    pub k_row: usize,
    /// Values per V slot.
    pub v_row: usize,
}

impl KvView<'_> {
    /// Widens values `first..first + dst.len()` of slot `slot`'s K row into `dst`.
    #[inline(always)]
    pub fn load_k(&self, slot: usize, first: usize, dst: &mut [f32]) {
        let t = self.ty;
        let at = slot * t.row_bytes(self.k_row) + t.row_bytes(first);
        t.load(&self.k[at..][..t.row_bytes(dst.len())], dst);
    }

    /// Widens values `first..first + dst.len()` of slot `slot`'s V row into `dst`.
    #[inline(always)]
    pub fn load_v(&self, slot: usize, first: usize, dst: &mut [f32]) {
        let t = self.ty;
        let at = slot * t.row_bytes(self.v_row) + t.row_bytes(first);
        t.load(&self.v[at..][..t.row_bytes(dst.len())], dst);
    }
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

/// Keys per span: a row's keys are attended span by span (spans at multiples of this many
/// positions) and the spans' partial results merged in order — decode splits one row's spans over
/// tasks, prefill walks them in one task, with the same arithmetic.
const ATTN_SPAN: usize = 256;
/// Below this many (token, kv head) pairs each span is its own task (decode and short batches),
/// so every thread has work; how work is split never changes a row's arithmetic.
const ATTN_SPLIT_BELOW_PAIRS: usize = 64;

/// Causal attention of `q` (rows at `positions`) over the cache, which already holds every position
/// `≤` each row's own. Writes `out` (`rows × n_head · head_dim_v`).
///
/// **One arithmetic per row.** A query row's keys `[a, b)` (causal, within the window) are taken
/// in spans of [`ATTN_SPAN`] positions and, within a span, blocks of [`ATTN_BK`] positions, both
/// at fixed multiples of the absolute position. Per span an online softmax over its blocks gives
/// a partial result (running max, sum of exponentials, unnormalised output); the spans' partials
/// are merged in ascending order ([`merge_partial`]) and normalised. Every step depends only on
/// the row's own query, positions and the cache, so a row's result does not depend on the other
/// rows of the batch or on how the work is split: prefill runs tiles of [`ATTN_BQ`] tokens × one
/// kv head (each K/V block widened to f32 once for the whole tile), decode runs one task per
/// (token, kv head, span) and merges after. QK, softmax and PV accumulate in f32.
pub fn attention(q: &[f32], positions: &[u32], kv: &KvView, p: &AttnParams, out: &mut [f32]) {
    let group = p.n_head / p.n_head_kv;
    let dv = p.head_dim_v;
    let pairs = positions.len() * p.n_head_kv;
    if pairs >= ATTN_SPLIT_BELOW_PAIRS {
        // Enough pairs (prefill): tiles of ATTN_BQ tokens × one kv head, every span in one task.
        let n_tok = positions.len();
        let blocks = n_tok.div_ceil(ATTN_BQ);
        let o = SharedSlice::new(out);
        pool::for_each_dynamic(blocks * p.n_head_kv, |task| {
            // Last tiles first: a batch's later tokens (higher positions) have the most keys, so
            // the small tiles even out the threads' ends.
            let (blk, kh) = (blocks - 1 - task / p.n_head_kv, task % p.n_head_kv);
            let toks = blk * ATTN_BQ..((blk + 1) * ATTN_BQ).min(n_tok);
            TileScratch::with(p, |scratch| {
                attend_tile(q, positions, toks, kh, kv, p, scratch, &o)
            });
        });
        return;
    }
    // Few pairs (decode): one task per (pair, span), each split into parts of the pair's query
    // heads while there are fewer tasks than threads (qwen3's 4 kv heads at a short context
    // were 4 tasks for 16 threads). Every part widens the span's K/V blocks itself.
    let mut tasks = Vec::new(); // (pair, span start)
    let mut first_task = Vec::with_capacity(pairs + 1);
    for idx in 0..pairs {
        first_task.push(tasks.len());
        let (a, b) = key_range(positions[idx / p.n_head_kv], p);
        let mut j = a / ATTN_SPAN * ATTN_SPAN;
        while j < b {
            tasks.push((idx, j));
            j += ATTN_SPAN;
        }
    }
    first_task.push(tasks.len());
    let head_parts = (pool::threads() / tasks.len().max(1)).clamp(1, group.div_ceil(2));
    let stride = group * (dv + 2);
    let mut parts = vec![0f32; tasks.len() * stride];
    let ps = SharedSlice::new(&mut parts);
    pool::for_each_dynamic(tasks.len() * head_parts, |i| {
        let ((idx, j), hp) = (tasks[i / head_parts], i % head_parts);
        let (t, kh) = (idx / p.n_head_kv, idx % p.n_head_kv);
        let heads = pool::part(group, 2, hp, head_parts);
        TileScratch::with(p, |scratch| {
            let part = SpanPart {
                toks: t..t + 1,
                kh,
                span: j,
                heads: heads.clone(),
            };
            span_partials(q, positions, kv, p, scratch, &part);
            let rec = i / head_parts * stride;
            // SAFETY: each task index is claimed by one participant; a (pair, span) record's
            // head parts own disjoint head slots of it.
            let part =
                unsafe { ps.range_mut(rec + heads.start * (dv + 2)..rec + heads.end * (dv + 2)) };
            for (g, pg) in heads.zip(part.chunks_exact_mut(dv + 2)) {
                pg[0] = scratch.m[g];
                pg[1] = scratch.l[g];
                pg[2..].copy_from_slice(&scratch.o[g * dv..(g + 1) * dv]);
            }
        });
    });
    let mut ro = vec![0f32; dv];
    for (idx, o) in out.chunks_mut(group * dv).enumerate().take(pairs) {
        let sinks = sinks_of(p, idx % p.n_head_kv);
        for (g, og) in o.chunks_exact_mut(dv).enumerate() {
            let (mut rm, mut rl) = (f32::NEG_INFINITY, 0f32);
            for c in first_task[idx]..first_task[idx + 1] {
                let pc = &parts[c * stride + g * (dv + 2)..][..dv + 2];
                merge_partial(&mut rm, &mut rl, &mut ro, pc[0], pc[1], &pc[2..]);
            }
            normalise(rm, rl, sinks.map(|s| s[g]), &ro, og);
        }
    }
}

/// The keys `[a, b)` of a query at `pos`: causal, within the window.
fn key_range(pos: u32, p: &AttnParams) -> (usize, usize) {
    let pos = pos as usize;
    let first = match p.window {
        Some(w) => (pos + 1).saturating_sub(w),
        None => 0,
    };
    (first, pos + 1)
}

/// The sinks of kv head `kh`'s query heads.
fn sinks_of<'a>(p: &AttnParams<'a>, kh: usize) -> Option<&'a [f32]> {
    let group = p.n_head / p.n_head_kv;
    p.sinks.map(|s| &s[kh * group..][..group])
}

/// Merges one span's partial result (`m`, `l`, unnormalised `o`) into a row's running result
/// (`rm`, `rl`, `ro`): the first span is taken as it is, later ones rescaled to the larger max.
/// Spans without keys (`l = 0`) are skipped.
#[inline]
fn merge_partial(rm: &mut f32, rl: &mut f32, ro: &mut [f32], m: f32, l: f32, o: &[f32]) {
    if l == 0.0 {
        return;
    }
    if *rl == 0.0 {
        (*rm, *rl) = (m, l);
        ro.copy_from_slice(o);
        return;
    }
    let mx = rm.max(m);
    let (alpha, beta) = ((*rm - mx).exp(), (m - mx).exp());
    *rl = *rl * alpha + l * beta;
    for (r, &x) in ro.iter_mut().zip(o) {
        *r = *r * alpha + x * beta;
    }
    *rm = mx;
}

/// `out = o / l` (zero without keys), a sink logit added to the denominator.
#[inline]
fn normalise(m: f32, l: f32, sink: Option<f32>, o: &[f32], out: &mut [f32]) {
    // A sink joins the denominator at the row's own max: exp(sink − m) (no keys: l = 0, and the
    // output is 0 whatever the sink).
    let l = match sink {
        Some(s) if l > 0.0 => l + (s - m).exp(),
        _ => l,
    };
    let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
    for (d, &v) in out.iter_mut().zip(o) {
        *d = v * inv;
    }
}

/// Query tokens per attention tile (prefill): each key/value row is widened to f32 once per
/// tile of this many tokens (× the GQA group's heads) instead of once per token.
const ATTN_BQ: usize = 16;
/// Keys per block of a span: scores of one query row for a block are 64 f32 (four 512-bit
/// accumulators). The block's K (transposed) and V, widened to f32, take `64 · head_dim · 4`
/// bytes each: in L1 up to head dim 64, in L2 beyond (gemma3's 256: 64 KiB each).
const ATTN_BK: usize = 64;

/// Per-thread buffers of the attention tasks, kept by each thread from call to call
/// ([`TileScratch::with`]): allocating them zeroed per call showed as page faults in decode.
/// Every value is written before it is read within a task, so stale contents are harmless.
#[derive(Default)]
struct TileScratch {
    /// K block transposed: `kt[d * ATTN_BK + i]` = element `d` of key `i`.
    kt: Vec<f32>,
    /// V block: `vb[i * dv + d]`.
    vb: Vec<f32>,
    /// 16 K rows (`krow[z * dk + d]`), widened before they are transposed into `kt`.
    krow: Vec<f32>,
    /// One span's running max, sum and unnormalised output per query row of the tile.
    m: Vec<f32>,
    l: Vec<f32>,
    o: Vec<f32>,
    /// The merged result of the spans so far per query row (prefill tiles).
    rm: Vec<f32>,
    rl: Vec<f32>,
    ro: Vec<f32>,
}

thread_local! {
    static TILE_SCRATCH: std::cell::RefCell<TileScratch> =
        std::cell::RefCell::new(TileScratch::default());
}

impl TileScratch {
    /// Runs `f` with this thread's buffers, sized for `p` (grown when too small, never shrunk).
    fn with<R>(p: &AttnParams, f: impl FnOnce(&mut TileScratch) -> R) -> R {
        TILE_SCRATCH.with(|s| {
            let s = &mut *s.borrow_mut();
            let rows = ATTN_BQ * (p.n_head / p.n_head_kv);
            let grow = |v: &mut Vec<f32>, n: usize| {
                if v.len() < n {
                    v.resize(n, 0.0);
                }
            };
            grow(&mut s.kt, p.head_dim_k * ATTN_BK);
            grow(&mut s.vb, ATTN_BK * p.head_dim_v);
            grow(&mut s.krow, 16 * p.head_dim_k);
            for v in [&mut s.m, &mut s.l, &mut s.rm, &mut s.rl] {
                grow(v, rows);
            }
            grow(&mut s.o, rows * p.head_dim_v);
            grow(&mut s.ro, rows * p.head_dim_v);
            f(s)
        })
    }
}

/// `e^x` for `x ≤ 0` to ~1e-7 relative (0 below −87): range reduction to `2^n · e^r`, `|r| ≤
/// ln2/2`, degree-6 Taylor polynomial. Branch-free, so loops over it vectorise.
#[inline(always)]
fn exp_neg(x: f32) -> f32 {
    let (n, poly) = exp_reduce(x.max(-87.0));
    let scale = f32::from_bits(((n + 127).max(0) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        poly * scale
    }
}

/// Attention of tokens `toks` (a tile) for the query heads of kv head `kh` over their key ranges,
/// span by span ([`span_partials`], merged per row in order); writes the normalised outputs of
/// those heads into `out`.
#[allow(clippy::too_many_arguments)]
fn attend_tile(
    q: &[f32],
    positions: &[u32],
    toks: Range<usize>,
    kh: usize,
    kv: &KvView,
    p: &AttnParams,
    scratch: &mut TileScratch,
    out: &SharedSlice<f32>,
) {
    let dv = p.head_dim_v;
    let group = p.n_head / p.n_head_kv;
    let rows = toks.len() * group;
    let lo = toks.clone().map(|t| key_range(positions[t], p).0).min();
    let hi = toks.clone().map(|t| key_range(positions[t], p).1).max();
    let (Some(lo), Some(hi)) = (lo, hi) else {
        return;
    };
    scratch.rl[..rows].fill(0.0);
    let mut j = lo / ATTN_SPAN * ATTN_SPAN;
    while j < hi {
        let part = SpanPart {
            toks: toks.clone(),
            kh,
            span: j,
            heads: 0..group,
        };
        span_partials(q, positions, kv, p, scratch, &part);
        let TileScratch {
            m,
            l,
            o,
            rm,
            rl,
            ro,
            ..
        } = scratch;
        for r in 0..rows {
            let ro = &mut ro[r * dv..(r + 1) * dv];
            merge_partial(
                &mut rm[r],
                &mut rl[r],
                ro,
                m[r],
                l[r],
                &o[r * dv..(r + 1) * dv],
            );
        }
        j += ATTN_SPAN;
    }
    let sinks = sinks_of(p, kh);
    for (ti, t) in toks.enumerate() {
        let base = t * p.n_head * dv + kh * group * dv;
        // SAFETY: each (token tile, kv head) task owns these heads of these tokens.
        let dst = unsafe { out.range_mut(base..base + group * dv) };
        for (g, dg) in dst.chunks_exact_mut(dv).enumerate() {
            let r = ti * group + g;
            normalise(
                scratch.rm[r],
                scratch.rl[r],
                sinks.map(|s| s[g]),
                &scratch.ro[r * dv..(r + 1) * dv],
                dg,
            );
        }
    }
}

/// What one span task computes: tokens `toks`, query heads `heads` of the group of kv head
/// `kh`, keys of the span starting at `span` (a multiple of [`ATTN_SPAN`]).
#[derive(Clone, Debug)]
struct SpanPart {
    toks: Range<usize>,
    kh: usize,
    span: usize,
    heads: Range<usize>,
}

/// One span's partial results (`scratch.m`, `l`, `o` per query row `ti · group + g`) for the
/// tokens and query heads of `part` (other rows are left as they are): keys of its span within
/// each row's key range, blocks of [`ATTN_BK`] at multiples of their size, online softmax. Rows
/// without keys in the span get `l = 0`.
fn span_partials(
    q: &[f32],
    positions: &[u32],
    kv: &KvView,
    p: &AttnParams,
    scratch: &mut TileScratch,
    part: &SpanPart,
) {
    #[cfg(target_arch = "x86_64")]
    match attention_level() {
        crate::quant::SimdLevel::Avx512 => {
            // SAFETY: the CPU has AVX-512F, AVX2 and FMA (attention_level checked), the only
            // requirement of the target-feature function; its body is the same safe code as the
            // portable path.
            unsafe { span_partials_avx512(q, positions, kv, p, scratch, part) };
            return;
        }
        crate::quant::SimdLevel::Avx2 => {
            // SAFETY: as above, for AVX2 and FMA.
            unsafe { span_partials_avx2(q, positions, kv, p, scratch, part) };
            return;
        }
        crate::quant::SimdLevel::Scalar => {}
    }
    span_partials_body::<2>(q, positions, kv, p, scratch, part);
}

/// [`span_partials_body`] compiled for AVX-512: four heads of a token share each K and V load
/// (16 of the 32 vector registers hold their accumulators): gemma3's pp512 attention 1.15× faster
/// than with two (`cargo bench -p pshard-kernels --bench attention`, 10.6 → 9.2 ms, one thread).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn span_partials_avx512(
    q: &[f32],
    positions: &[u32],
    kv: &KvView,
    p: &AttnParams,
    scratch: &mut TileScratch,
    part: &SpanPart,
) {
    span_partials_body::<4>(q, positions, kv, p, scratch, part);
}

/// [`span_partials_body`] compiled for AVX2 + FMA: two heads at a time (four heads' accumulators
/// alone would take 32 registers; AVX2 has 16).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn span_partials_avx2(
    q: &[f32],
    positions: &[u32],
    kv: &KvView,
    p: &AttnParams,
    scratch: &mut TileScratch,
    part: &SpanPart,
) {
    span_partials_body::<2>(q, positions, kv, p, scratch, part);
}

/// One kv head's K or V slices as the attention body widens them, slot by slot.
trait HeadRows {
    /// Widens slot `slot`'s slice into `dst`.
    fn load(&self, slot: usize, dst: &mut [f32]);
}

/// f16 rows of `row` values, the head's slice from value `off` on.
struct F16Rows<'a> {
    rows: &'a [half::f16],
    row: usize,
    off: usize,
}

impl HeadRows for F16Rows<'_> {
    #[inline(always)]
    fn load(&self, slot: usize, dst: &mut [f32]) {
        let src = &self.rows[slot * self.row + self.off..][..dst.len()];
        for (d, h) in dst.iter_mut().zip(src) {
            *d = f16_to_f32(h.to_bits());
        }
    }
}

/// The f16 with bits `h` as f32, exactly (NaNs stay NaNs): integer shifts and one multiply by a
/// power of two, so loops over it vectorise at every SIMD level (the `half` crate's slice
/// conversion is an out-of-line call per row: a tenth of gemma3's attention).
#[inline(always)]
fn f16_to_f32(h: u16) -> f32 {
    let sign = (h as u32 & 0x8000) << 16;
    let mag = h as u32 & 0x7fff;
    // Exponent and mantissa moved into f32's places are the value times 2^-112 (subnormals
    // included: the product is exact); scaled back by 2^112.
    let finite = f32::from_bits(mag << 13) * f32::from_bits(0x7780_0000);
    let bits = if mag >= 0x7c00 {
        0x7f80_0000 | ((mag & 0x3ff) << 13)
    } else {
        finite.to_bits()
    };
    f32::from_bits(bits | sign)
}

/// Rows of any KV type as bytes: `stride` bytes per slot, the head's `len` bytes from `off` on.
struct ByteRows<'a> {
    ty: KvType,
    rows: &'a [u8],
    stride: usize,
    off: usize,
    len: usize,
}

impl HeadRows for ByteRows<'_> {
    #[inline(always)]
    fn load(&self, slot: usize, dst: &mut [f32]) {
        self.ty
            .load(&self.rows[slot * self.stride + self.off..][..self.len], dst);
    }
}

/// The body of [`span_partials`]: the same operations at every SIMD level (fused multiply-adds
/// where the scores and outputs accumulate — a library call on the portable path — and the
/// polynomial [`exp_neg`]), so every level gives the same bits. The K/V rows are read through a
/// [`HeadRows`] picked once per call: f16 slices as they lie, or bytes of any type (Q8_0; f16
/// bytes not 2-aligned), so the f16 cache's per-key loop is the plain f16 one.
#[inline(always)]
fn span_partials_body<const MAX_R: usize>(
    q: &[f32],
    positions: &[u32],
    kv: &KvView,
    p: &AttnParams,
    scratch: &mut TileScratch,
    part: &SpanPart,
) {
    let (dk, dv, kh) = (p.head_dim_k, p.head_dim_v, part.kh);
    let f16s = (
        bytemuck::try_cast_slice::<u8, half::f16>(kv.k),
        bytemuck::try_cast_slice::<u8, half::f16>(kv.v),
    );
    if let (KvType::F16, (Ok(k), Ok(v))) = (kv.ty, f16s) {
        let k = F16Rows {
            rows: k,
            row: kv.k_row,
            off: kh * dk,
        };
        let v = F16Rows {
            rows: v,
            row: kv.v_row,
            off: kh * dv,
        };
        span_rows::<MAX_R>(q, positions, (&k, &v), kv.cells, p, scratch, part);
        return;
    }
    let ty = kv.ty;
    let rows = |rows, row, head: usize| ByteRows {
        ty,
        rows,
        stride: ty.row_bytes(row),
        off: ty.row_bytes(kh * head),
        len: ty.row_bytes(head),
    };
    let (k, v) = (rows(kv.k, kv.k_row, dk), rows(kv.v, kv.v_row, dv));
    span_rows::<MAX_R>(q, positions, (&k, &v), kv.cells, p, scratch, part);
}

/// [`span_partials_body`] over K and V rows read through `kr` and `vr` (`cells` slots).
#[inline(always)]
fn span_rows<const MAX_R: usize>(
    q: &[f32],
    positions: &[u32],
    (kr, vr): (&impl HeadRows, &impl HeadRows),
    cells: usize,
    p: &AttnParams,
    scratch: &mut TileScratch,
    part: &SpanPart,
) {
    const BK: usize = ATTN_BK;
    let SpanPart {
        toks,
        kh,
        span,
        heads,
    } = part.clone();
    let (dk, dv) = (p.head_dim_k, p.head_dim_v);
    let group = p.n_head / p.n_head_kv;
    let range = |t: usize| {
        let (a, b) = key_range(positions[t], p);
        (a.max(span), b.min(span + ATTN_SPAN))
    };
    let rows = toks.len() * group;
    let TileScratch {
        kt,
        vb,
        krow,
        m,
        l,
        o,
        ..
    } = scratch;
    m[..rows].fill(f32::NEG_INFINITY);
    l[..rows].fill(0.0);
    o[..rows * dv].fill(0.0);
    let lo = toks.clone().map(|t| range(t).0).min().unwrap_or(0);
    let hi = toks.clone().map(|t| range(t).1).max().unwrap_or(0);
    let mut j0 = lo / BK * BK;
    while j0 < hi {
        let j1 = (j0 + BK).min(hi);
        // Keys in groups of 16: the group's K rows widened into `krow`, then written to `kt` a
        // 64-byte line per dimension (key by key, each value went to its own line: 13% of
        // gemma3's attention). Keys of a group outside `lo..hi` keep stale values in `kt`, which
        // every row masks.
        let (i0, i1) = (j0.max(lo) - j0, j1 - j0);
        for g0 in (i0 / 16 * 16..i1).step_by(16) {
            for i in g0.max(i0)..(g0 + 16).min(i1) {
                let slot = (j0 + i) % cells;
                kr.load(slot, &mut krow[(i - g0) * dk..][..dk]);
                vr.load(slot, &mut vb[i * dv..][..dv]);
            }
            for d in 0..dk {
                let line: &mut [f32; 16] = (&mut kt[d * BK + g0..][..16]).try_into().expect("16");
                for (z, x) in line.iter_mut().enumerate() {
                    *x = krow[z * dk + d];
                }
            }
        }
        for (ti, t) in toks.clone().enumerate() {
            let (a, b) = range(t);
            let (a, b) = (a.max(j0) - j0, b.min(j1).saturating_sub(j0));
            if a >= b {
                continue;
            }
            // Up to MAX_R heads of the token at a time share each K and V load; each head's
            // arithmetic is its own, so the bits are those of one head at a time.
            let qrow = |g: usize| &q[t * p.n_head * dk + (kh * group + g) * dk..][..dk];
            let mut g = heads.start;
            while g < heads.end {
                let r0 = ti * group + g;
                let parts = (&mut m[..], &mut l[..], &mut o[..]);
                let kv = (&kt[..], &vb[..]);
                let n = (heads.end - g).min(MAX_R);
                match n {
                    4 => rows_block([0, 1, 2, 3].map(|k| qrow(g + k)), r0, (a, b), kv, parts, p),
                    3 => rows_block([0, 1, 2].map(|k| qrow(g + k)), r0, (a, b), kv, parts, p),
                    2 => rows_block([qrow(g), qrow(g + 1)], r0, (a, b), kv, parts, p),
                    _ => rows_block([qrow(g)], r0, (a, b), kv, parts, p),
                }
                g += n;
            }
        }
        j0 = j1;
    }
}

/// `acc[c][z] += x · v[16c + z]` for the 64 lanes, as fused multiply-adds.
#[inline(always)]
fn fma64(acc: &mut [[f32; 16]; 4], x: f32, v: &[f32; 64]) {
    for (c, ac) in acc.iter_mut().enumerate() {
        for z in 0..16 {
            ac[z] = x.mul_add(v[16 * c + z], ac[z]);
        }
    }
}

/// [`fma64`] of `v` into one to four rows' accumulators, row `k` with `x(k)`. The rows are written
/// out: a loop over them kept the accumulators in memory (attention 2.6× slower).
#[inline(always)]
fn fma64_rows<const R: usize>(
    acc: &mut [[[f32; 16]; 4]; R],
    v: &[f32; 64],
    x: impl Fn(usize) -> f32,
) {
    match &mut acc[..] {
        [a0] => fma64(a0, x(0), v),
        [a0, a1] => {
            fma64(a0, x(0), v);
            fma64(a1, x(1), v);
        }
        [a0, a1, a2] => {
            fma64(a0, x(0), v);
            fma64(a1, x(1), v);
            fma64(a2, x(2), v);
        }
        [a0, a1, a2, a3] => {
            fma64(a0, x(0), v);
            fma64(a1, x(1), v);
            fma64(a2, x(2), v);
            fma64(a3, x(3), v);
        }
        _ => unreachable!("one to four rows"),
    }
}

/// One key block of [`span_rows`] for `R` query rows of one token (`qrows`, rows `r0 .. r0 + R`
/// of the tile's running max `m`, sum `l` and output `o`), keys `a..b` of the block valid: scores
/// over the transposed K block `kt`, the online-softmax step, `o += Σ p_i · v_i` over the block's V
/// rows `vb`. The rows share every K and V load (register blocking); each row's scores and outputs
/// are the same fused multiply-adds in the same order as for one row alone.
#[inline(always)]
fn rows_block<const R: usize>(
    qrows: [&[f32]; R],
    r0: usize,
    (a, b): (usize, usize),
    (kt, vb): (&[f32], &[f32]),
    (m, l, o): (&mut [f32], &mut [f32], &mut [f32]),
    p: &AttnParams,
) {
    const BK: usize = ATTN_BK;
    let dv = p.head_dim_v;
    // Scores: four independent 16-key accumulators per row (FMA latency) over the transposed K.
    let mut acc = [[[0f32; 16]; 4]; R];
    let dk = p.head_dim_k;
    let qr: [&[f32]; R] = qrows.map(|q| &q[..dk]);
    for d in 0..dk {
        let k64: &[f32; BK] = kt[d * BK..][..BK].try_into().expect("BK keys");
        fma64_rows(&mut acc, k64, |k| qr[k][d]);
    }
    let mut s = [[0f32; BK]; R];
    for k in 0..R {
        let s = &mut s[k];
        for (sc, ac) in s.chunks_exact_mut(16).zip(&acc[k]) {
            sc.copy_from_slice(ac);
        }
        // Scale (and cap); keys outside a..b masked to −inf (scores of keys not loaded
        // for this block are never used); lane-wise max.
        if let Some(c) = p.softcap {
            for v in &mut s[a..b] {
                *v = c * (*v * p.scale / c).tanh();
            }
        } else {
            s[a..b].iter_mut().for_each(|v| *v *= p.scale);
        }
        s[..a].fill(f32::NEG_INFINITY);
        s[b..].fill(f32::NEG_INFINITY);
        let mut mx = [f32::NEG_INFINITY; 16];
        for sc in s.chunks_exact(16) {
            for z in 0..16 {
                mx[z] = mx[z].max(sc[z]);
            }
        }
        let mb = mx.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let r = r0 + k;
        let m_new = m[r].max(mb);
        let orow = &mut o[r * dv..][..dv];
        if m[r] != m_new {
            let alpha = (m[r] - m_new).exp();
            l[r] *= alpha;
            orow.iter_mut().for_each(|v| *v *= alpha);
            m[r] = m_new;
        }
        let mut sums = [0f32; 16];
        for sc in s.chunks_exact_mut(16) {
            for z in 0..16 {
                sc[z] = exp_neg(sc[z] - m_new);
                sums[z] += sc[z];
            }
        }
        l[r] += sums.iter().sum::<f32>();
    }
    // o += Σ_i p_i · v_i: 64 output lanes per row (four independent accumulators) held across
    // the keys, each V load serving every row.
    let mut c0 = 0;
    while c0 + 64 <= dv {
        let mut acc = [[[0f32; 16]; 4]; R];
        for (k, ar) in acc.iter_mut().enumerate() {
            for (c, ac) in ar.iter_mut().enumerate() {
                ac.copy_from_slice(&o[(r0 + k) * dv + c0 + 16 * c..][..16]);
            }
        }
        for i in a..b {
            let v64: &[f32; 64] = vb[i * dv + c0..][..64].try_into().expect("64");
            fma64_rows(&mut acc, v64, |k| s[k][i]);
        }
        for (k, ar) in acc.iter().enumerate() {
            for (c, ac) in ar.iter().enumerate() {
                o[(r0 + k) * dv + c0 + 16 * c..][..16].copy_from_slice(ac);
            }
        }
        c0 += 64;
    }
    for (k, sr) in s.iter().enumerate() {
        let orow = &mut o[(r0 + k) * dv..][..dv];
        for i in a..b {
            let vrow = &vb[i * dv..][c0..dv];
            for (ov, &x) in orow[c0..].iter_mut().zip(vrow) {
                *ov = sr[i].mul_add(x, *ov);
            }
        }
    }
}

/// Tests cap the attention bodies' SIMD level with this (0: no cap, 1: portable, 2: AVX2 at
/// most), below what the CPU has; `PSHARD_CPU_SIMD` ([`crate::quant::simd_cap`]) caps it too.
static ATTENTION_CAP: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// The SIMD level the attention bodies may use: [`simd_level`], capped by [`ATTENTION_CAP`].
fn attention_level() -> crate::quant::SimdLevel {
    use crate::quant::SimdLevel;
    let level = simd_level();
    match ATTENTION_CAP.load(std::sync::atomic::Ordering::Relaxed) {
        1 => SimdLevel::Scalar,
        2 if level == SimdLevel::Avx512 => SimdLevel::Avx2,
        _ => level,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    /// A seeded generator for test `name` (fresh seed per run, printed; `PSHARD_SEED` replays).
    fn test_rng(name: &str) -> rand::rngs::StdRng {
        use rand::SeedableRng;
        let seed = std::env::var("PSHARD_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random::<u64>);
        eprintln!("{name}: PSHARD_SEED={seed}");
        rand::rngs::StdRng::seed_from_u64(seed)
    }

    /// A random K and V cache in `ty` of `cells` cells (`kv_dims` = (kv heads, K dim, V dim)),
    /// values in `−amp..amp`, as row bytes.
    fn random_cache(
        rng: &mut rand::rngs::StdRng,
        ty: KvType,
        cells: usize,
        (n_head_kv, dk, dv): (usize, usize, usize),
        amp: f32,
    ) -> (Vec<u8>, Vec<u8>) {
        use rand::Rng;
        let mut r = |row: usize| -> Vec<u8> {
            let x: Vec<f32> = (0..cells * row).map(|_| rng.gen_range(-amp..amp)).collect();
            let rb = ty.row_bytes(row);
            let mut out = vec![0u8; cells * rb];
            for (xr, o) in x.chunks(row).zip(out.chunks_mut(rb)) {
                ty.store(xr, o);
            }
            out
        };
        (r(n_head_kv * dk), r(n_head_kv * dv))
    }

    /// The view of a cache from [`random_cache`] with the same `kv_dims`.
    fn cache_view<'a>(
        (k, v): (&'a [u8], &'a [u8]),
        ty: KvType,
        cells: usize,
        (n_head_kv, dk, dv): (usize, usize, usize),
    ) -> KvView<'a> {
        KvView {
            k,
            v,
            ty,
            cells,
            k_row: n_head_kv * dk,
            v_row: n_head_kv * dv,
        }
    }

    /// Every f16 bit pattern widens to `half`'s value (NaNs to NaNs of the same sign).
    #[test]
    fn f16_to_f32_is_exact_for_every_f16() {
        for h in 0..=u16::MAX {
            let want = f16::from_bits(h).to_f32();
            let got = f16_to_f32(h);
            if want.is_nan() {
                assert!(got.is_nan() && got.is_sign_negative() == want.is_sign_negative());
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "f16 bits {h:#06x}");
            }
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
                    let mut kr = vec![0f32; dk];
                    kv.load_k(j % kv.cells, kh * dk, &mut kr);
                    let s: f64 = (0..dk)
                        .map(|d| q[h * dk + d] as f64 * kr[d] as f64)
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
                let mut vr = vec![0f32; dv];
                kv.load_v(j % kv.cells, kh * dv, &mut vr);
                for d in 0..dv {
                    out[h * dv + d] += e[i] / l * vr[d] as f64;
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
        // One decode row (one task per span of ATTN_SPAN), a few rows (likewise), and 40 rows
        // (≥ ATTN_SPLIT_BELOW_PAIRS pairs: tiles of tokens).
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
    fn exp_neg_matches_exp() {
        let mut x = 0f32;
        while x > -90.0 {
            let (got, want) = (exp_neg(x) as f64, (x as f64).exp());
            let tol = if x < -87.0 { 1e-37 } else { 4e-7 * want };
            assert!((got - want).abs() <= tol, "exp({x}) = {got}, want {want}");
            x -= 0.0137;
        }
        assert_eq!(exp_neg(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_neg(0.0), 1.0);
    }

    #[test]
    fn attention_split_spans_match_f64() {
        use rand::Rng;
        let mut rng = test_rng("attention_split_spans_match_f64");
        let (n_head, n_head_kv, cells) = (6, 2, 1100);
        // Q8_0 rows are read back dequantized, so the f64 reference (which reads them the same
        // way) checks the same arithmetic.
        for (ty, dk, dv) in [(KvType::F16, 40, 24), (KvType::Q8_0, 64, 32)] {
            let (k, v) = random_cache(&mut rng, ty, cells, (n_head_kv, dk, dv), 1.0);
            let mut r =
                |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect() };
            let kv = cache_view((&k, &v), ty, cells, (n_head_kv, dk, dv));
            // Caps: 0 the CPU's best, 2 AVX2 at most, 1 portable.
            let sinks: Vec<f32> = r(n_head).into_iter().map(|x| 3.0 * x).collect();
            for (cap, window, softcap, sinks) in [
                (0u8, None, None, None),
                (0, Some(300), Some(2.0), None),
                (0, Some(2000), None, Some(&sinks[..])),
                (2, None, None, Some(&sinks[..])),
                (2, Some(300), Some(2.0), None),
                (1, None, Some(2.0), Some(&sinks[..])),
            ] {
                ATTENTION_CAP.store(cap, std::sync::atomic::Ordering::Relaxed);
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
                    "{ty:?} cap {cap} window {window:?} sinks {}",
                    sinks.is_some()
                );
                check_attention(&kv, &p, &mut r, &what);
            }
        }
        ATTENTION_CAP.store(0, std::sync::atomic::Ordering::Relaxed);
    }

    /// A row's output is the same bits alone (decode tasks per span), inside batches of other
    /// rows (tiles of tokens, the row at other positions of a tile, other tiles' key ranges) and
    /// at every SIMD level, with and without a window and soft-cap.
    #[test]
    fn attention_rows_do_not_depend_on_the_batch_or_level() {
        use rand::Rng;
        let mut rng = test_rng("attention_rows_do_not_depend_on_the_batch_or_level");
        let (n_head, n_head_kv, cells) = (6, 2, 1100);
        for (ty, dk, dv) in [(KvType::F16, 72, 80), (KvType::Q8_0, 96, 64)] {
            let (k, v) = random_cache(&mut rng, ty, cells, (n_head_kv, dk, dv), 2.0);
            let mut r =
                |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-2.0..2.0)).collect() };
            let kv = cache_view((&k, &v), ty, cells, (n_head_kv, dk, dv));
            let queries = r(64 * n_head * dk);
            let sinks: Vec<f32> = r(n_head).into_iter().map(|x| 3.0 * x).collect();
            let positions: Vec<u32> = (0..64u32)
                .map(|i| match i % 4 {
                    0 => i * 17,
                    1 => 1099 - i,
                    2 => 255 + i,
                    _ => 500 + 3 * i,
                })
                .collect();
            let (qw, ow) = (n_head * dk, n_head * dv);
            for (window, softcap, sinks) in [
                (None, None, None),
                (Some(300), Some(3.0), Some(&sinks[..])),
                (Some(70), None, None),
            ] {
                let p = AttnParams {
                    n_head,
                    n_head_kv,
                    head_dim_k: dk,
                    head_dim_v: dv,
                    window,
                    scale: 0.3,
                    softcap,
                    sinks,
                };
                let run = |rows: &[usize], cap: u8| -> Vec<f32> {
                    ATTENTION_CAP.store(cap, std::sync::atomic::Ordering::Relaxed);
                    let q: Vec<f32> = rows
                        .iter()
                        .flat_map(|&i| queries[i * qw..(i + 1) * qw].iter().copied())
                        .collect();
                    let pos: Vec<u32> = rows.iter().map(|&i| positions[i]).collect();
                    let mut out = vec![f32::NAN; rows.len() * ow];
                    attention(&q, &pos, &kv, &p, &mut out);
                    out
                };
                let alone: Vec<Vec<f32>> = (0..64).map(|i| run(&[i], 0)).collect();
                let all: Vec<usize> = (0..64).collect();
                let shifted: Vec<usize> = (0..64).map(|i| (i * 7 + 3) % 64).collect();
                for (rows, cap) in [
                    (all.clone(), 0u8),
                    (shifted.clone(), 0),
                    (all[5..40].to_vec(), 0),
                    (all[..3].to_vec(), 0),
                    (shifted.clone(), 2),
                    (all.clone(), 1),
                ] {
                    let out = run(&rows, cap);
                    for (j, &i) in rows.iter().enumerate() {
                        let got: Vec<u32> = out[j * ow..(j + 1) * ow]
                            .iter()
                            .map(|x| x.to_bits())
                            .collect();
                        let want: Vec<u32> = alone[i].iter().map(|x| x.to_bits()).collect();
                        assert_eq!(
                        got,
                        want,
                        "{ty:?} window {window:?}: row {i} (pos {}) at {j} of {} rows, cap {cap}",
                        positions[i],
                        rows.len()
                    );
                    }
                }
            }
        }
        ATTENTION_CAP.store(0, std::sync::atomic::Ordering::Relaxed);
    }

    /// Latent attention: one KV head whose values are the first `dv` of each K row (f16:
    /// 24 of 40; Q8_0: 64 of 96).
    #[test]
    fn attention_values_inside_k() {
        use rand::Rng;
        let mut rng = test_rng("attention_values_inside_k");
        let cells = 1100;
        for (ty, dk, dv) in [(KvType::F16, 40, 24), (KvType::Q8_0, 96, 64)] {
            let (k, _) = random_cache(&mut rng, ty, cells, (1, dk, dv), 2.0);
            let mut r =
                |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-2.0..2.0)).collect() };
            // V rows inside K: the same bytes, K's row size.
            let kv = cache_view((&k, &k), ty, cells, (1, dk, dk));
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
            check_attention(&kv, &p, &mut r, &format!("{ty:?} values inside K"));
        }
    }

    /// A decode row with fewer (kv head, span) tasks than threads is split into parts of its
    /// query heads: the same bits as one task per (kv head, span), at every thread count. Needs
    /// two threads or more to split (CI has 2: one kv head, one span, 2 parts).
    #[test]
    fn decode_head_parts_match_whole_groups() {
        use rand::Rng;
        let mut rng = test_rng("decode_head_parts_match_whole_groups");
        let (n_head, n_head_kv, cells, dk) = (9, 1, 600, 64);
        for ty in [KvType::F16, KvType::Q8_0] {
            let (k, v) = random_cache(&mut rng, ty, cells, (n_head_kv, dk, dk), 2.0);
            let kv = cache_view((&k, &v), ty, cells, (n_head_kv, dk, dk));
            let q: Vec<f32> = (0..n_head * dk).map(|_| rng.gen_range(-2.0..2.0)).collect();
            let p = AttnParams {
                n_head,
                n_head_kv,
                head_dim_k: dk,
                head_dim_v: dk,
                window: None,
                scale: 0.2,
                softcap: None,
                sinks: None,
            };
            for pos in [40u32, 300, 599] {
                let run = |threads: usize| {
                    crate::pool::set_threads(threads);
                    let mut out = vec![f32::NAN; n_head * dk];
                    attention(&q, &[pos], &kv, &p, &mut out);
                    out.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
                };
                let whole = run(1);
                for threads in [2, 3, 16] {
                    assert_eq!(run(threads), whole, "{ty:?} pos {pos} threads {threads}");
                }
            }
        }
        crate::pool::set_threads(0);
    }

    #[test]
    fn attention_window_and_gqa() {
        // 2 query heads sharing 1 kv head of dim 1; values = position; window 2.
        let cells = 8;
        let k: Vec<f16> = vec![f16::from_f32(0.0); cells];
        let v: Vec<f16> = (0..cells).map(|j| f16::from_f32(j as f32)).collect();
        let kv = KvView {
            k: bytemuck::cast_slice(&k),
            v: bytemuck::cast_slice(&v),
            ty: KvType::F16,
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
