//! x86-64 dot products for the legacy types: AVX2 (+FMA, F16C) with `vpmaddubsw`, and AVX-512
//! VNNI (`vpdpbusd`, with AVX-512 BW/VL for byte masks).
//!
//! Each block becomes 32 weight bytes in register order element 0..31 (low nibbles in the low
//! 128-bit lane, high nibbles in the high lane, matching the activation bytes), multiplied with the
//! 32 activation bytes into eight i32 partial sums, converted to f32 and accumulated with the
//! block's scale `d_w d_a`. Two blocks per iteration go to two accumulators to hide FMA latency.
//!
//! The public wrappers are plain `fn`s so they fit [`DotFn`]; each re-checks the (cached) feature
//! flags, so calling one on a CPU without the features falls back to scalar instead of executing
//! unsupported instructions.

use std::arch::x86_64::*;

use pshard_model::ggml_type::GgmlType;

use crate::quant::DotFn;

/// AVX2, FMA and F16C (Haswell and later).
pub(crate) fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// AVX-512 F/BW/VL/DQ with VNNI (Ice Lake, Sapphire Rapids, Zen 4 and later), plus the AVX2 set.
pub(super) fn has_vnni() -> bool {
    has_avx2()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512dq")
        && is_x86_feature_detected!("avx512vnni")
}

/// The SIMD dot variants this CPU supports for `ty`, best first.
pub(super) fn variants(ty: GgmlType) -> Vec<(DotFn, &'static str)> {
    let mut v: Vec<(DotFn, &'static str)> = Vec::new();
    if has_vnni() {
        let f: DotFn = match ty {
            GgmlType::Q4_0 => dot_q4_0_vnni,
            GgmlType::Q4_1 => dot_q4_1_vnni,
            GgmlType::Q5_0 => dot_q5_0_vnni,
            GgmlType::Q5_1 => dot_q5_1_vnni,
            _ => dot_q8_0_vnni,
        };
        v.push((f, "avx512vnni"));
    }
    if has_avx2() {
        let f: DotFn = match ty {
            GgmlType::Q4_0 => dot_q4_0_avx2,
            GgmlType::Q4_1 => dot_q4_1_avx2,
            GgmlType::Q5_0 => dot_q5_0_avx2,
            GgmlType::Q5_1 => dot_q5_1_avx2,
            _ => dot_q8_0_avx2,
        };
        v.push((f, "avx2"));
    }
    v
}

/// `b[off..off + N]` as an array (offsets are constants, so the check folds away).
#[inline]
fn arr<const N: usize>(b: &[u8], off: usize) -> &[u8; N] {
    b[off..off + N]
        .try_into()
        .expect("block field within its block")
}

#[inline]
fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(*arr::<2>(b, off))
}

#[inline]
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(*arr::<4>(b, off))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn load16(b: &[u8; 16]) -> __m128i {
    // SAFETY: `b` is 16 readable bytes; the load is unaligned.
    unsafe { _mm_loadu_si128(b.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn load32(b: &[u8; 32]) -> __m256i {
    // SAFETY: `b` is 32 readable bytes; the load is unaligned.
    unsafe { _mm256_loadu_si256(b.as_ptr().cast()) }
}

/// 16 bytes of nibbles → 32 bytes 0..=15: low nibbles (elements 0..16) in the low lane, high
/// nibbles (elements 16..32) in the high lane.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn nibbles(qs: &[u8; 16]) -> __m256i {
    let x = load16(qs);
    let v = _mm256_set_m128i(_mm_srli_epi16(x, 4), x);
    _mm256_and_si256(v, _mm256_set1_epi8(0x0F))
}

/// Bit `j` of `qh` → byte `j` = 0x10 if set, else 0 (AVX2: spread the 4 bytes, test one bit each).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn high_bits_avx2(qh: u32) -> __m256i {
    let v = _mm256_set1_epi32(qh as i32);
    let spread = _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3,
        3, 3,
    );
    let bytes = _mm256_shuffle_epi8(v, spread);
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// `a * b` of two f16 given as bits (one F16C conversion for both).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn f16_mul(a: u16, b: u16) -> f32 {
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128((a as u32 | (b as u32) << 16) as i32));
    _mm_cvtss_f32(_mm_mul_ss(v, _mm_movehdup_ps(v)))
}

/// Signed bytes × signed bytes → eight i32 sums of four products. `|w| <= 128` and `|a| <= 127`,
/// so the i16 pair sums of `vpmaddubsw` cannot saturate.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn mul_ss(w: __m256i, a: __m256i) -> __m256i {
    let aw = _mm256_sign_epi8(w, w);
    let sa = _mm256_sign_epi8(a, w);
    _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sa), _mm256_set1_epi16(1))
}

/// Unsigned bytes (<= 31) × signed bytes → eight i32 sums of four products.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn mul_us(u: __m256i, a: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, a), _mm256_set1_epi16(1))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Generates a checked wrapper and the `#[target_feature]` loop for one type and variant. `$block`
/// maps one weight block `$w: &[u8; WB]` and activation block `$a: &[u8; AB]` to
/// `(i32x8 products, d_w d_a, minimum term)`; the minimum term is `-0.0` (folds away) for
/// types without a minimum.
macro_rules! dot_fn {
    ($name:ident, $imp:ident, $feat:literal, $has:ident, $scalar:path, $wb:literal, $ab:literal,
     |$w:ident, $a:ident| $block:expr) => {
        pub(super) fn $name(w: &[u8], a: &[u8], n: usize) -> f32 {
            if !$has() {
                return $scalar(w, a, n);
            }
            // SAFETY: the CPU features `$imp` is compiled for were detected just above.
            unsafe { $imp(w, a, n) }
        }

        #[target_feature(enable = $feat)]
        fn $imp(w: &[u8], a: &[u8], n: usize) -> f32 {
            assert!(
                n.is_multiple_of(32),
                "dot length {n} is not a whole number of blocks"
            );
            let nb = n / 32;
            let mut wp = w[..nb * $wb].chunks_exact(2 * $wb);
            let mut ap = a[..nb * $ab].chunks_exact(2 * $ab);
            let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let (mut m0, mut m1) = (0f32, 0f32);
            for (w2, a2) in (&mut wp).zip(&mut ap) {
                let (p, s, m) = {
                    let $w: &[u8; $wb] = arr(w2, 0);
                    let $a: &[u8; $ab] = arr(a2, 0);
                    $block
                };
                acc0 = _mm256_fmadd_ps(_mm256_set1_ps(s), _mm256_cvtepi32_ps(p), acc0);
                m0 += m;
                let (p, s, m) = {
                    let $w: &[u8; $wb] = arr(w2, $wb);
                    let $a: &[u8; $ab] = arr(a2, $ab);
                    $block
                };
                acc1 = _mm256_fmadd_ps(_mm256_set1_ps(s), _mm256_cvtepi32_ps(p), acc1);
                m1 += m;
            }
            let (wr, ar) = (wp.remainder(), ap.remainder());
            if !wr.is_empty() {
                let (p, s, m) = {
                    let $w: &[u8; $wb] = arr(wr, 0);
                    let $a: &[u8; $ab] = arr(ar, 0);
                    $block
                };
                acc0 = _mm256_fmadd_ps(_mm256_set1_ps(s), _mm256_cvtepi32_ps(p), acc0);
                m0 += m;
            }
            hsum(_mm256_add_ps(acc0, acc1)) + (m0 + m1)
        }
    };
}

dot_fn!(
    dot_q4_0_avx2,
    dot_q4_0_avx2_imp,
    "avx2,fma,f16c",
    has_avx2,
    super::dot_q4_0_scalar,
    18,
    34,
    |w, a| {
        let q = _mm256_sub_epi8(nibbles(arr(w, 2)), _mm256_set1_epi8(8));
        (
            mul_ss(q, load32(arr(a, 2))),
            f16_mul(u16_at(w, 0), u16_at(a, 0)),
            -0.0,
        )
    }
);

dot_fn!(
    dot_q4_1_avx2,
    dot_q4_1_avx2_imp,
    "avx2,fma,f16c",
    has_avx2,
    super::dot_q4_1_scalar,
    20,
    36,
    |w, a| {
        let p = mul_us(nibbles(arr(w, 4)), load32(arr(a, 4)));
        (
            p,
            f16_mul(u16_at(w, 0), u16_at(a, 0)),
            f16_mul(u16_at(w, 2), u16_at(a, 2)),
        )
    }
);

dot_fn!(
    dot_q5_0_avx2,
    dot_q5_0_avx2_imp,
    "avx2,fma,f16c",
    has_avx2,
    super::dot_q5_0_scalar,
    22,
    34,
    |w, a| {
        let q = _mm256_or_si256(nibbles(arr(w, 6)), high_bits_avx2(u32_at(w, 2)));
        let q = _mm256_sub_epi8(q, _mm256_set1_epi8(16));
        (
            mul_ss(q, load32(arr(a, 2))),
            f16_mul(u16_at(w, 0), u16_at(a, 0)),
            -0.0,
        )
    }
);

dot_fn!(
    dot_q5_1_avx2,
    dot_q5_1_avx2_imp,
    "avx2,fma,f16c",
    has_avx2,
    super::dot_q5_1_scalar,
    24,
    36,
    |w, a| {
        let q = _mm256_or_si256(nibbles(arr(w, 8)), high_bits_avx2(u32_at(w, 4)));
        let p = mul_us(q, load32(arr(a, 4)));
        (
            p,
            f16_mul(u16_at(w, 0), u16_at(a, 0)),
            f16_mul(u16_at(w, 2), u16_at(a, 2)),
        )
    }
);

dot_fn!(
    dot_q8_0_avx2,
    dot_q8_0_avx2_imp,
    "avx2,fma,f16c",
    has_avx2,
    super::dot_q8_0_scalar,
    34,
    34,
    |w, a| {
        (
            mul_ss(load32(arr(w, 2)), load32(arr(a, 2))),
            f16_mul(u16_at(w, 0), u16_at(a, 0)),
            -0.0,
        )
    }
);

// AVX-512 VNNI: `vpdpbusd` multiplies unsigned weight bytes with signed activation bytes and sums
// groups of four straight into i32. Offsets of the symmetric types (8, 16) are removed with a
// second `vpdpbusd` of the offset against the activations: Σ (q - o) a = Σ q a - Σ o a.

dot_fn!(
    dot_q4_0_vnni,
    dot_q4_0_vnni_imp,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni",
    has_vnni,
    super::dot_q4_0_scalar,
    18,
    34,
    |w, a| {
        let av = load32(arr(a, 2));
        let z = _mm256_setzero_si256();
        let p = _mm256_sub_epi32(
            _mm256_dpbusd_epi32(z, nibbles(arr(w, 2)), av),
            _mm256_dpbusd_epi32(z, _mm256_set1_epi8(8), av),
        );
        (p, f16_mul(u16_at(w, 0), u16_at(a, 0)), -0.0)
    }
);

dot_fn!(
    dot_q4_1_vnni,
    dot_q4_1_vnni_imp,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni",
    has_vnni,
    super::dot_q4_1_scalar,
    20,
    36,
    |w, a| {
        let p = _mm256_dpbusd_epi32(
            _mm256_setzero_si256(),
            nibbles(arr(w, 4)),
            load32(arr(a, 4)),
        );
        (
            p,
            f16_mul(u16_at(w, 0), u16_at(a, 0)),
            f16_mul(u16_at(w, 2), u16_at(a, 2)),
        )
    }
);

dot_fn!(
    dot_q5_0_vnni,
    dot_q5_0_vnni_imp,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni",
    has_vnni,
    super::dot_q5_0_scalar,
    22,
    34,
    |w, a| {
        let q = _mm256_or_si256(
            nibbles(arr(w, 6)),
            _mm256_maskz_set1_epi8(u32_at(w, 2), 0x10),
        );
        let av = load32(arr(a, 2));
        let z = _mm256_setzero_si256();
        let p = _mm256_sub_epi32(
            _mm256_dpbusd_epi32(z, q, av),
            _mm256_dpbusd_epi32(z, _mm256_set1_epi8(16), av),
        );
        (p, f16_mul(u16_at(w, 0), u16_at(a, 0)), -0.0)
    }
);

dot_fn!(
    dot_q5_1_vnni,
    dot_q5_1_vnni_imp,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni",
    has_vnni,
    super::dot_q5_1_scalar,
    24,
    36,
    |w, a| {
        let q = _mm256_or_si256(
            nibbles(arr(w, 8)),
            _mm256_maskz_set1_epi8(u32_at(w, 4), 0x10),
        );
        let p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), q, load32(arr(a, 4)));
        (
            p,
            f16_mul(u16_at(w, 0), u16_at(a, 0)),
            f16_mul(u16_at(w, 2), u16_at(a, 2)),
        )
    }
);

dot_fn!(
    dot_q8_0_vnni,
    dot_q8_0_vnni_imp,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni",
    has_vnni,
    super::dot_q8_0_scalar,
    34,
    34,
    |w, a| {
        let wv = load32(arr(w, 2));
        let p = _mm256_dpbusd_epi32(
            _mm256_setzero_si256(),
            _mm256_abs_epi8(wv),
            _mm256_sign_epi8(load32(arr(a, 2)), wv),
        );
        (p, f16_mul(u16_at(w, 0), u16_at(a, 0)), -0.0)
    }
);
