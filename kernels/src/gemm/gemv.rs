//! The decode path of the int8 GEMM: 1 to [`MAX_TOKENS`] tokens with AVX-512 VNNI (or AVX2, for
//! the types of [`Kind::avx2`]: `gemm::gemv_avx2`), row-wise, the same bits as
//! [`super::dot_converted`] at the memory roof.
//!
//! For so few tokens the GEMM's interleaved tile would be read by too few of them: the
//! transposition of 16 rows' bytes costs more than the products (two sequences decoded slower
//! together than one alone). Here each weight row is dotted straight from
//! its file blocks instead, 128 elements (a *step*) at a time: the row's levels as unsigned bytes
//! in one or two 512-bit vectors (nibbles masked, 2-bit groups shifted out, third, fifth or sixth
//! bits merged, Q8_0 offset by 128, IQ4_NL/IQ4_XS/MXFP4 nibbles looked up in their table) and
//! `vpdpbusd` with the activations, which are rearranged once per call to match (see
//! [`Kind::split`]). Every quantized type of the CPU engine has a decoder ([`Kind::of`]). Each 128-bit lane of an accumulator then holds four partial sums of one
//! sub-block; four rows' accumulators are summed lane-wise and transposed (two unpack-add levels)
//! into one sum per (row, sub-block), four row quads into one vector of 16 rows per sub-block.
//! The offset's contribution `−offset · Σa` seeds each sub-block's first lane, so the sums are
//! exactly `Σ (u − offset) · a`. Per chunk of [`CHUNK`] columns the 16 rows' f32 steps then run
//! in the fixed order, one row per lane: `fma(f32(I), scale · d, acc)` (+ `fma(min, sa, acc)`)
//! per sub-block, ascending — the bits of every other path.
//!
//! Rows are read as 16 sequential streams, each step of each row prefetched into L2 about
//! [`PREFETCH`] bytes ahead (near a row's end, the next group's row at the step that far into
//! it), so the loads of the next blocks overlap the products. The hardware prefetchers do not
//! follow 16 interleaved rows of a few hundred bytes: the 262144 × 640 Q8_0 output head of
//! gemma3 streamed at 5–8 GB/s with prefetches into L1 that left each row's first line out, at
//! 11–15 GB/s with these (gemv bench, 2 threads, loaded machine, back to back).

use pshard_model::ggml_type::GgmlType;

use super::{Converter, GemmActs};
use crate::matmul::{KernelError, QuantizedActs};
use crate::quant::SimdLevel;

/// Elements per step: one 512-bit vector of levels per half.
pub(crate) const STEP: usize = 128;

/// Columns whose sub-block sums are kept before the f32 steps run over them: one K-quant
/// super-block (512 was no faster and zeroed twice the sums per group of 16 rows, which showed
/// on short rows).
pub(crate) const CHUNK: usize = 256;

/// The sub-blocks of a Q4_K/Q5_K step in the lanes 0..4 of its vectors: a 128-bit-lane shuffle
/// with an immediate gathers their nibbles in this order, where 0, 1, 2, 3 would need a
/// two-source permute per vector. Its own inverse: lane `l` holds sub-block `NIBBLE_LANES[l]`.
pub(crate) const NIBBLE_LANES: [usize; 4] = [0, 2, 1, 3];

/// The most tokens the decode path takes at once: each row step's levels are decoded once and
/// dotted with every token, so a few sequences decoding together read the weights once.
pub(crate) const MAX_TOKENS: usize = 4;

/// How far ahead each row is prefetched, in bytes.
pub(crate) const PREFETCH: usize = 768;

/// A weight type's row decoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Q4_0, Q4_1: nibbles.
    Legacy4,
    /// Q5_0, Q5_1: nibbles and a 32-bit word of fifth bits.
    Legacy5,
    /// Q8_0: 32 signed bytes.
    Legacy8,
    /// Q4_K: super-blocks of 8 sub-blocks of 32, nibbles.
    K4,
    /// Q5_K: Q4_K with fifth bits.
    K5,
    /// Q6_K: 16 sub-blocks of 16, nibbles and two high bits.
    K6,
    /// Q2_K: 16 sub-blocks of 16, 2-bit groups.
    K2,
    /// Q3_K: 16 sub-blocks of 16, 2-bit groups and a high-bit mask.
    K3,
    /// IQ4_NL: Q4_0's blocks, levels through the codebook.
    Iq4Nl,
    /// MXFP4: blocks of 32 (E8M0 scale byte), levels through the doubled E2M1 table.
    Mxfp4,
    /// IQ4_XS: super-blocks of eight runs of 32, levels through the codebook.
    Iq4Xs,
}

impl Kind {
    /// The decoder of `ty`, if it has one.
    pub(crate) fn of(ty: GgmlType) -> Option<Kind> {
        Some(match ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 => Kind::Legacy4,
            GgmlType::Q5_0 | GgmlType::Q5_1 => Kind::Legacy5,
            GgmlType::Q8_0 => Kind::Legacy8,
            GgmlType::Q4_K => Kind::K4,
            GgmlType::Q5_K => Kind::K5,
            GgmlType::Q2_K => Kind::K2,
            GgmlType::Q3_K => Kind::K3,
            GgmlType::Q6_K => Kind::K6,
            GgmlType::IQ4_NL => Kind::Iq4Nl,
            GgmlType::MXFP4 => Kind::Mxfp4,
            GgmlType::IQ4_XS => Kind::Iq4Xs,
            _ => return None,
        })
    }

    /// The activations' order within a step: `true` (types with sub-blocks of 32) — the first
    /// 64 bytes hold the first 16 elements of each of the step's four sub-blocks, the last 64
    /// bytes their last 16 (so both halves of a sub-block meet in one lane); `false` (sub-blocks
    /// of 16) — element order, each lane one sub-block.
    pub(crate) fn split(self) -> bool {
        !matches!(self, Kind::K2 | Kind::K3 | Kind::K6)
    }

    /// Whether the AVX2 kernel decodes the type (the others take the GEMM's 8-row tiles there).
    pub(crate) fn avx2(self) -> bool {
        matches!(
            self,
            Kind::Legacy4 | Kind::Legacy5 | Kind::Legacy8 | Kind::K4 | Kind::K5 | Kind::K6
        )
    }

    /// The lane of a step's sub-block `j` in the split order: Q4_K and Q5_K hold their
    /// sub-blocks in the order [`NIBBLE_LANES`]; the others (and Q6_K's element order) keep `j`.
    pub(crate) fn lane(self, j: usize) -> usize {
        match self {
            Kind::K4 | Kind::K5 => NIBBLE_LANES[j],
            _ => j,
        }
    }
}

/// Up to [`MAX_TOKENS`] tokens' activations in the decode layout: the GEMM's conversion
/// ([`GemmActs`]: block scales, scaled sums) plus per token the values rearranged per step
/// ([`Kind::split`], zero-padded to whole steps) and per step the seeds of its one (sub-blocks
/// of 32) or two accumulators.
#[derive(Default)]
pub(crate) struct GemvActs {
    /// The GEMM's conversion of the token (its `d` and `sa` are read per sub-block).
    pub base: GemmActs,
    /// Per token `steps × 128` values in the step order.
    pub q: Vec<i8>,
    /// Per token `steps × 32` seeds: per accumulator and lane, `−offset · Σa` of the lane's
    /// sub-block in its first dword, zero elsewhere.
    pub seed: Vec<i32>,
}

thread_local! {
    /// Buffers of dropped [`GemvActs`], reused by the next call on this thread (a small model's
    /// decode step runs hundreds of matmuls: one allocation each would show).
    static SPARE: std::cell::RefCell<Vec<GemvActs>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl GemvActs {
    /// Converts the rows of `x` (1 to [`MAX_TOKENS`]) for weights of `conv` (decoded by `d`'s
    /// kind). The AVX2 kernel reads the seeds per sub-block from the GEMM's conversion
    /// ([`GemmActs::seed`]) instead of [`GemvActs::seed`], which stays empty.
    pub(crate) fn new(
        x: &QuantizedActs,
        conv: &Converter,
        d: Decode,
    ) -> Result<GemvActs, KernelError> {
        let kind = d.kind;
        let wide = d.width == Width::Vnni;
        let mut g = SPARE.with(|s| s.borrow_mut().pop()).unwrap_or_default();
        g.base.fill(x, conv, !wide)?;
        let (cols, n) = (g.base.cols, g.base.n_rows);
        let steps = cols.div_ceil(STEP);
        super::zeroed(&mut g.q, n * steps * STEP);
        super::zeroed(&mut g.seed, if wide { n * steps * 32 } else { 0 });
        let per = conv.sub();
        let o = conv.offset as i32;
        for t in 0..n {
            let q = &mut g.q[t * steps * STEP..(t + 1) * steps * STEP];
            let seed = if wide {
                &mut g.seed[t * steps * 32..(t + 1) * steps * 32]
            } else {
                &mut []
            };
            for (s, a) in g.base.q[t * cols..(t + 1) * cols]
                .chunks_exact(per)
                .enumerate()
            {
                let (k, j) = (s * per / STEP, (s * per % STEP) / per);
                let at = k * STEP;
                let sum = || -o * a.iter().map(|&v| v as i32).sum::<i32>();
                if kind.split() {
                    // Sub-block j of the step: first half to its lane of the first vector, second
                    // half to that lane of the second.
                    let l = kind.lane(j);
                    q[at + 16 * l..at + 16 * l + 16].copy_from_slice(&a[..16]);
                    q[at + 64 + 16 * l..at + 64 + 16 * l + 16].copy_from_slice(&a[16..]);
                    if wide {
                        seed[32 * k + 4 * l] = sum();
                    }
                } else {
                    // Sub-block j (of 16) in element order: accumulator j / 4, lane j % 4.
                    q[at + 16 * j..at + 16 * j + 16].copy_from_slice(a);
                    if wide {
                        seed[32 * k + 16 * (j / 4) + 4 * (j % 4)] = sum();
                    }
                }
            }
        }
        Ok(g)
    }

    /// Gives the buffers to the next call on this thread (leaving this value empty).
    pub(crate) fn recycle(&mut self) {
        let g = std::mem::take(self);
        SPARE.with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < 4 {
                s.push(g);
            }
        });
    }
}

/// Which kernel of the decode path runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Width {
    /// AVX-512 VNNI, 16 rows per group (`gemm::gemv_x86`).
    Vnni,
    /// AVX2, 8 rows per group (`gemm::gemv_avx2`).
    Avx2,
}

impl Width {
    /// Rows per group.
    pub(crate) fn rows(self) -> usize {
        match self {
            Width::Vnni => 16,
            Width::Avx2 => 8,
        }
    }
}

/// The decode path's plan for one matmul: the row decoder and the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Decode {
    /// The weight type's row decoder.
    pub kind: Kind,
    /// The kernel.
    pub width: Width,
}

/// The decode path for weights of `conv` with activations `x`, where it applies: 1 to
/// [`MAX_TOKENS`] tokens and a type with a row decoder; AVX-512 VNNI at `level` on this CPU, or
/// else AVX2 (at `level` AVX2 or better) for the types its kernel decodes ([`Kind::avx2`]).
pub(crate) fn applies(conv: &Converter, x: &QuantizedActs, level: SimdLevel) -> Option<Decode> {
    let kind = Kind::of(conv.ty)?;
    if !(1..=MAX_TOKENS).contains(&x.n_rows) {
        return None;
    }
    let width = if level == SimdLevel::Avx512 && SimdLevel::Avx512.available() {
        Width::Vnni
    } else if level != SimdLevel::Scalar && SimdLevel::Avx2.available() && kind.avx2() {
        Width::Avx2
    } else {
        return None;
    };
    Some(Decode { kind, width })
}

/// Where the next rows' bytes are prefetched while step `k` of `steps` (`step_bytes` each) is
/// computed, `ahead` steps on: `(false, off)` — the group's own rows at `off`; past the rows'
/// end, `(true, off)` — the next group's rows at the step that far into them (rows of fewer
/// steps: the same step), so every step of every row is prefetched, a row's first lines included.
pub(crate) fn prefetch_at(
    k: usize,
    steps: usize,
    ahead: usize,
    step_bytes: usize,
) -> (bool, usize) {
    if k + ahead < steps {
        (false, (k + ahead) * step_bytes)
    } else {
        (true, (k + ahead - steps).min(k) * step_bytes)
    }
}

/// The outputs of rows `r0 .. r0 + outs[0].len()` of the matrix `data` (row `r` at `r · wrb`)
/// for `T` tokens into `outs[token]`, a group of `R` rows at a time: `f(p, next, o)` computes
/// the group whose row pointers are `p` (a short last group repeats its last row) into `o[token]`,
/// `next` the next group's rows (or these again at the matrix's end), for prefetching. The
/// pointers are formed with wrapping arithmetic and lie in `data` when the rows do.
pub(crate) fn for_groups<const R: usize, const T: usize>(
    data: &[u8],
    wrb: usize,
    r0: usize,
    outs: &mut [&mut [f32]],
    mut f: impl FnMut(&[*const u8; R], &[*const u8; R], &mut [[f32; R]; T]),
) {
    let base = data.as_ptr();
    let n_rows = data.len() / wrb;
    let len = outs[0].len();
    let mut i = 0;
    while i < len {
        let nr = (len - i).min(R);
        let last = r0 + i + nr - 1;
        let p: [*const u8; R] =
            std::array::from_fn(|k| base.wrapping_add((r0 + i + k).min(last) * wrb));
        let next: [*const u8; R] = std::array::from_fn(|k| {
            let r = r0 + i + R + k;
            if r < n_rows {
                base.wrapping_add(r * wrb)
            } else {
                p[k]
            }
        });
        let mut o = [[0f32; R]; T];
        f(&p, &next, &mut o);
        for (out, o) in outs.iter_mut().zip(&o) {
            out[i..i + nr].copy_from_slice(&o[..nr]);
        }
        i += nr;
    }
}

/// Where a type keeps its fields for the row decoders: bytes per block (legacy) or super-block,
/// the offsets of the quants and of the high bits.
#[derive(Clone, Copy)]
pub(crate) struct Geo {
    /// Bytes per block or super-block.
    pub bytes: usize,
    /// Offset of the quants.
    pub qs: usize,
    /// Offset of the high bits (types with them).
    pub qh: usize,
}

impl Geo {
    /// The geometry of `conv.ty`, decoded by `kind`.
    pub(crate) fn of(conv: &Converter, kind: Kind) -> Geo {
        use crate::quant::kquants::{q2k, q3k, q4k, q5k, q6k};
        use crate::quant::{legacy, lut4};
        let geo = |bytes, qs, qh| Geo { bytes, qs, qh };
        match kind {
            Kind::Legacy4 | Kind::Legacy5 | Kind::Legacy8 => {
                let l = legacy::layout(conv.ty);
                geo(l.bytes, l.qs, l.qh.unwrap_or(0))
            }
            Kind::K2 => geo(q2k::BLOCK_BYTES, 16, 0),
            Kind::K3 => geo(q3k::BLOCK_BYTES, 32, 0),
            Kind::K4 => geo(q4k::BLOCK_BYTES, 16, 0),
            Kind::K5 => geo(q5k::BLOCK_BYTES, 48, 16),
            Kind::K6 => geo(q6k::BLOCK_BYTES, 0, 128),
            Kind::Iq4Nl => geo(lut4::IQ4_NL_BYTES, 2, 0),
            Kind::Mxfp4 => geo(lut4::MXFP4_BYTES, 1, 0),
            Kind::Iq4Xs => geo(lut4::IQ4_XS_BYTES, 8, 0),
        }
    }
}

/// Outputs of rows `r0 .. r0 + outs[0].len()` of the `rows × cols` matrix `data` (row `r` at
/// `r · wrb`) of type `conv.ty` for each token `t` of `acts` (built for `d`) into `outs[t]`.
///
/// # Panics
/// If the rows lie outside `data`, the shapes disagree, the token counts differ or exceed
/// [`MAX_TOKENS`], the activations were built for another kernel, or the CPU lacks the kernel's
/// features.
pub(crate) fn rows(
    conv: &Converter,
    d: Decode,
    acts: &GemvActs,
    data: &[u8],
    wrb: usize,
    r0: usize,
    outs: &mut [&mut [f32]],
) {
    let (cols, n) = (acts.base.cols, acts.base.n_rows);
    let (bs, bb) = (conv.ty.block_size() as usize, conv.ty.type_size() as usize);
    assert!(
        cols.is_multiple_of(bs) && cols / bs * bb == wrb,
        "gemv: {} rows of {cols} elements are not {wrb} bytes",
        conv.ty
    );
    assert!(
        (1..=MAX_TOKENS).contains(&n) && outs.len() == n,
        "gemv: {} outputs for {n} tokens (1 to {MAX_TOKENS})",
        outs.len()
    );
    let len = outs[0].len();
    assert!(
        outs.iter().all(|o| o.len() == len),
        "gemv: outputs of different lengths"
    );
    assert!(
        (r0 + len) * wrb <= data.len(),
        "gemv: rows {r0}..{} outside the matrix",
        r0 + len
    );
    let steps = cols.div_ceil(STEP);
    assert_eq!(acts.q.len(), n * steps * STEP, "gemv: activation layout");
    let seeds = conv.offset == 0
        || match d.width {
            Width::Vnni => acts.seed.len() == n * steps * 32,
            Width::Avx2 => acts.base.seed.len() == n * acts.base.subs,
        };
    assert!(seeds, "gemv: activations built for another kernel");
    #[cfg(target_arch = "x86_64")]
    match d.width {
        Width::Vnni => {
            assert!(SimdLevel::Avx512.available(), "gemv needs AVX-512 VNNI");
            // SAFETY: AVX-512 VNNI asserted above; rows r0 .. r0 + len lie in `data` with `wrb`
            // bytes (`cols` elements of the type) each; the activations hold `n` tokens of `cols`
            // elements in the layout of `kind` with this kernel's seeds (asserted above, built by
            // GemvActs::new), one output each.
            unsafe { super::gemv_x86::rows(conv, d.kind, acts, data, wrb, r0, outs) }
        }
        Width::Avx2 => {
            assert!(
                SimdLevel::Avx2.available() && d.kind.avx2(),
                "gemv: no AVX2 kernel for {:?} on this CPU",
                d.kind
            );
            // SAFETY: as above, with AVX2/FMA/F16C and a kind the AVX2 kernel decodes.
            unsafe { super::gemv_avx2::rows(conv, d.kind, acts, data, wrb, r0, outs) }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (d, acts);
        panic!("the decode path has no kernel on this architecture");
    }
}
