//! K-quant weight formats (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) and their activation partner Q8_K.
//!
//! All K-quants use super-blocks of [`QK_K`] = 256 elements split into sub-blocks of 16 or 32
//! elements, each with a small integer scale (and, for Q2_K/Q4_K/Q5_K, a minimum) relative to f16
//! super-block scales. Dot products multiply the integer weight quants with Q8_K activation
//! quants, apply the sub-block scales in integer arithmetic and handle the minimum terms through
//! the activation block's 16-element sums (`bsums`), so a block costs one or two float
//! multiply-adds.
//!
//! Each type has a portable scalar dot and an AVX2 (+FMA, F16C) variant; Q4_K, Q5_K and Q6_K
//! also have AVX-512 (BW, VL, VNNI) variants and register tiles ([`tiles`]: 4 rows × 4 tokens, for
//! batched matmuls). The best available variant is picked once per process. The SIMD dots
//! prefetch weight blocks a few blocks ahead: decode streams every weight byte exactly once.

use std::sync::OnceLock;

use pshard_model::ggml_type::GgmlType;

use super::legacy::TileFn;
use super::{ActFormat, DotFn, QuantKernel};

mod fit;
pub mod q2k;
pub mod q3k;
pub mod q4k;
pub mod q5k;
pub mod q6k;
pub mod q8k;
#[cfg(target_arch = "x86_64")]
mod simd;
#[cfg(target_arch = "x86_64")]
mod tile;

pub use q8k::{dequantize_row_q8k, quantize_row_q8k};

/// Elements per K-quant super-block.
pub const QK_K: usize = 256;

/// An implementation level of the dot products (slowest first: the discriminants order them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Variant {
    /// Portable Rust, any CPU.
    Scalar,
    /// x86-64 AVX2 with FMA and F16C.
    Avx2,
    /// x86-64 AVX-512 F/BW/VL with VNNI (plus the AVX2 set). Q2_K and Q3_K have none: with
    /// 512-bit operations on two ports it measured no faster than their AVX2 variants.
    Avx512,
}

impl Variant {
    /// All variants, slowest first.
    pub const ALL: [Variant; 3] = [Variant::Scalar, Variant::Avx2, Variant::Avx512];

    /// Short name used in [`QuantKernel::dot_variant`].
    pub fn name(self) -> &'static str {
        match self {
            Variant::Scalar => "scalar",
            Variant::Avx2 => "avx2",
            Variant::Avx512 => "avx512vnni",
        }
    }

    /// Whether this CPU can run the variant (detected once, then cached).
    pub fn available(self) -> bool {
        let (avx2, avx512) = *cpu_features();
        match self {
            Variant::Scalar => true,
            Variant::Avx2 => avx2,
            Variant::Avx512 => avx512,
        }
    }
}

/// (AVX2 set, AVX-512 set) availability, detected on first use.
fn cpu_features() -> &'static (bool, bool) {
    static FEATURES: OnceLock<(bool, bool)> = OnceLock::new();
    FEATURES.get_or_init(detect_features)
}

#[cfg(target_arch = "x86_64")]
fn detect_features() -> (bool, bool) {
    let avx2 = is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c");
    let avx512 = avx2
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni");
    (avx2, avx512)
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_features() -> (bool, bool) {
    (false, false)
}

/// The per-type functions, with the dot variants the type implements.
struct TypeFns {
    dequantize_row: fn(&[u8], &mut [f32]),
    quantize_row: fn(&[f32], &mut [u8]),
    scalar: DotFn,
    avx2: Option<DotFn>,
    avx512: Option<DotFn>,
}

fn type_fns(ty: GgmlType) -> Option<TypeFns> {
    #[cfg(target_arch = "x86_64")]
    macro_rules! x86 {
        ($f:expr) => {
            Some($f as DotFn)
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    macro_rules! x86 {
        ($f:expr) => {
            None
        };
    }
    let fns = match ty {
        GgmlType::Q2_K => TypeFns {
            dequantize_row: q2k::dequantize_row,
            quantize_row: q2k::quantize_row,
            scalar: q2k::dot_scalar,
            avx2: x86!(q2k::dot_avx2),
            avx512: None,
        },
        GgmlType::Q3_K => TypeFns {
            dequantize_row: q3k::dequantize_row,
            quantize_row: q3k::quantize_row,
            scalar: q3k::dot_scalar,
            avx2: x86!(q3k::dot_avx2),
            avx512: None,
        },
        GgmlType::Q4_K => TypeFns {
            dequantize_row: q4k::dequantize_row,
            quantize_row: q4k::quantize_row,
            scalar: q4k::dot_scalar,
            avx2: x86!(q4k::dot_avx2),
            avx512: x86!(q4k::dot_avx512),
        },
        GgmlType::Q5_K => TypeFns {
            dequantize_row: q5k::dequantize_row,
            quantize_row: q5k::quantize_row,
            scalar: q5k::dot_scalar,
            avx2: x86!(q5k::dot_avx2),
            avx512: x86!(q5k::dot_avx512),
        },
        GgmlType::Q6_K => TypeFns {
            dequantize_row: q6k::dequantize_row,
            quantize_row: q6k::quantize_row,
            scalar: q6k::dot_scalar,
            avx2: x86!(q6k::dot_avx2),
            avx512: x86!(q6k::dot_avx512),
        },
        _ => return None,
    };
    Some(fns)
}

/// The kernel of a K-quant type using dot variant `variant`; `None` if `ty` is not one of
/// Q2_K..Q6_K, the type has no such variant, or this CPU cannot run it.
pub fn kernel_variant(ty: GgmlType, variant: Variant) -> Option<QuantKernel> {
    let fns = type_fns(ty)?;
    if !variant.available() {
        return None;
    }
    let dot = match variant {
        Variant::Scalar => Some(fns.scalar),
        Variant::Avx2 => fns.avx2,
        Variant::Avx512 => fns.avx512,
    }?;
    Some(QuantKernel {
        ty,
        act: ActFormat::Q8K,
        dequantize_row: fns.dequantize_row,
        quantize_row: fns.quantize_row,
        dot,
        dot_variant: variant.name(),
    })
}

/// Every kernel variant of `ty` this CPU can run, slowest (scalar) first; empty if `ty` is not a
/// K-quant weight type.
pub fn kernel_variants(ty: GgmlType) -> Vec<QuantKernel> {
    Variant::ALL
        .iter()
        .filter_map(|&v| kernel_variant(ty, v))
        .collect()
}

/// The kernel of a K-quant type with the fastest dot variant this CPU supports.
///
/// # Panics
/// If `ty` is not Q2_K, Q3_K, Q4_K, Q5_K or Q6_K (the quant module dispatches only those here).
pub fn kernel(ty: GgmlType) -> QuantKernel {
    kernel_variants(ty)
        .pop()
        .unwrap_or_else(|| panic!("{} is not a K-quant weight type", ty.name()))
}

/// The portable scalar kernel of a K-quant type.
///
/// # Panics
/// If `ty` is not Q2_K, Q3_K, Q4_K, Q5_K or Q6_K.
pub fn scalar_kernel(ty: GgmlType) -> QuantKernel {
    kernel_variant(ty, Variant::Scalar)
        .unwrap_or_else(|| panic!("{} is not a K-quant weight type", ty.name()))
}

/// Register-tile kernels for `ty` on this CPU, if it has them: (`TILE` × `TILE` tokens, `TILE`
/// rows × 1 token), with the same contract (`TileFn`) as the legacy types' tiles. Present for Q4_K, Q5_K
/// and Q6_K with AVX-512 VNNI.
pub fn tiles(ty: GgmlType) -> Option<(TileFn, TileFn)> {
    #[cfg(target_arch = "x86_64")]
    {
        tile::tiles(ty)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = ty;
        None
    }
}

/// The int8 GEMM's converter of a K-quant type (see [`crate::gemm::Converter`]); Q2_K has none
/// (its per-16 minima would need per-16 activation sums) and takes the row dots.
pub(crate) fn int8_converter(ty: GgmlType) -> Option<crate::gemm::Converter> {
    let (sub16, min, row): (bool, bool, crate::gemm::ConvertFn) = match ty {
        GgmlType::Q3_K => (true, false, q3k::to_int8),
        GgmlType::Q4_K => (false, true, q4k::to_int8),
        GgmlType::Q5_K => (false, true, q5k::to_int8),
        GgmlType::Q6_K => (true, false, q6k::to_int8),
        _ => return None,
    };
    Some(crate::gemm::Converter { sub16, min, row })
}

/// Checks the arguments of a dot product and returns the number of blocks.
///
/// # Panics
/// If `n` is not a multiple of [`QK_K`] or a row is shorter than `n` elements need (callers
/// validate shapes when a model loads, so this is a programming error).
fn check_dot_args(w: &[u8], a: &[u8], n: usize, block_bytes: usize, name: &str) -> usize {
    assert!(
        n.is_multiple_of(QK_K),
        "{name} dot: n = {n} is not a multiple of {QK_K}"
    );
    let nb = n / QK_K;
    assert!(
        w.len() >= nb * block_bytes,
        "{name} dot: weight row has {} bytes, {n} elements need {}",
        w.len(),
        nb * block_bytes
    );
    assert!(
        a.len() >= nb * q8k::BLOCK_BYTES,
        "{name} dot: Q8_K activation row has {} bytes, {n} elements need {}",
        a.len(),
        nb * q8k::BLOCK_BYTES
    );
    nb
}

/// Checks the arguments of a row conversion and returns the number of blocks.
///
/// # Panics
/// If `elems` is not a multiple of [`QK_K`] or the block buffer is too short.
fn check_row_args(blocks_len: usize, elems: usize, block_bytes: usize, name: &str) -> usize {
    assert!(
        elems.is_multiple_of(QK_K),
        "{name}: {elems} elements is not a multiple of {QK_K}"
    );
    let nb = elems / QK_K;
    assert!(
        blocks_len >= nb * block_bytes,
        "{name}: {blocks_len} bytes of blocks, {elems} elements need {}",
        nb * block_bytes
    );
    nb
}

/// Reads a little-endian f16 at `b[0..2]` as f32.
#[inline]
fn f16_at(b: &[u8], off: usize) -> f32 {
    half::f16::from_le_bytes([b[off], b[off + 1]]).to_f32()
}

/// Writes `v` as a little-endian f16 at `b[off..off + 2]` and returns the stored value as f32.
#[inline]
fn put_f16(b: &mut [u8], off: usize, v: f32) -> f32 {
    let h = half::f16::from_f32(v);
    b[off..off + 2].copy_from_slice(&h.to_le_bytes());
    h.to_f32()
}

/// The 16 sums of 16 consecutive Q8_K quants of one block.
#[inline]
fn act_bsums(ab: &[u8]) -> [i32; 16] {
    let mut s = [0i32; 16];
    for (k, v) in s.iter_mut().enumerate() {
        let o = q8k::BSUMS + 2 * k;
        *v = i16::from_le_bytes([ab[o], ab[o + 1]]) as i32;
    }
    s
}

/// Unpacks the 12-byte Q4_K/Q5_K scale field into 8 six-bit scales and 8 six-bit mins.
///
/// Layout: bytes 0..4 hold scales 0..3 in their low 6 bits, bytes 4..8 mins 0..3; scales and mins
/// 4..7 keep their low 4 bits in bytes 8..12 (scale low nibble, min high nibble) and their top 2
/// bits in the top 2 bits of bytes 0..4 (scales) and 4..8 (mins).
#[inline]
fn unpack_scales_mins_k4(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let w = |i: usize| u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]);
    let (b0, b1, b2) = (w(0), w(1), w(2));
    let sc_lo = b0 & 0x3f3f_3f3f;
    let mn_lo = b1 & 0x3f3f_3f3f;
    let sc_hi = (b2 & 0x0f0f_0f0f) | (((b0 >> 6) & 0x0303_0303) << 4);
    let mn_hi = ((b2 >> 4) & 0x0f0f_0f0f) | (((b1 >> 6) & 0x0303_0303) << 4);
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    sc[..4].copy_from_slice(&sc_lo.to_le_bytes());
    sc[4..].copy_from_slice(&sc_hi.to_le_bytes());
    mn[..4].copy_from_slice(&mn_lo.to_le_bytes());
    mn[4..].copy_from_slice(&mn_hi.to_le_bytes());
    (sc, mn)
}

/// Packs 8 scales and 8 mins (each < 64) into the 12-byte Q4_K/Q5_K scale field.
fn pack_scales_mins_k4(sc: &[u8; 8], mn: &[u8; 8], out: &mut [u8]) {
    for j in 0..4 {
        out[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
        out[j + 4] = (mn[j] & 63) | ((mn[j + 4] >> 4) << 6);
        out[j + 8] = (sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4);
    }
}

/// Rounds to the nearest integer (ties to even) without a libm call; inputs are clamped to
/// ±2^22 first, which every caller clamps further anyway.
#[inline]
fn nearest_i32(v: f32) -> i32 {
    // Adding 1.5·2^23 puts the rounded integer in the low mantissa bits.
    let f = v.clamp(-4_194_303.0, 4_194_303.0) + 12_582_912.0;
    (f.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rounds_like_round_ties_even() {
        for &v in &[
            0.0f32, 0.4, 0.5, 1.5, 2.5, -0.5, -1.5, -2.49, 3.7, -127.6, 1e9, -1e9,
        ] {
            let want = v.clamp(-4_194_303.0, 4_194_303.0).round_ties_even() as i32;
            assert_eq!(nearest_i32(v), want, "v = {v}");
        }
    }

    #[test]
    fn k4_scale_packing_round_trips() {
        let sc = [0u8, 1, 17, 63, 32, 15, 48, 5];
        let mn = [63u8, 2, 0, 31, 16, 47, 1, 60];
        let mut b = [0u8; 12];
        pack_scales_mins_k4(&sc, &mn, &mut b);
        assert_eq!(unpack_scales_mins_k4(&b), (sc, mn));
    }
}
