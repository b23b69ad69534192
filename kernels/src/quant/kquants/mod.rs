//! K-quant weight formats (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) and their activation partner Q8_K.
//!
//! All K-quants use super-blocks of [`QK_K`] = 256 elements split into sub-blocks of 16 or 32
//! elements, each with a small integer scale (and, for Q2_K/Q4_K/Q5_K, a minimum) relative to f16
//! super-block scales. Matmuls convert a block exactly into unsigned levels with one f32 scale
//! (`d · sc`) and minimum (`−dmin · m`) per sub-block ([`int8_converter`], portable and AVX2) and
//! compute in the one order of [`crate::gemm`]: per sub-block the integer sum of levels times
//! Q8_K activation quants, one f32 multiply-add with its scale, one with its minimum times the
//! activation block's scaled 16-element sums (`bsums`).

use std::sync::OnceLock;

use pshard_model::ggml_type::GgmlType;

use super::{ActFormat, DotFn, QuantKernel};
use crate::gemm::Converter;

mod fit;
pub mod q2k;
pub mod q3k;
pub mod q4k;
pub mod q5k;
pub mod q6k;
pub mod q8k;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;

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
    /// x86-64 AVX-512 F/BW/VL with VNNI (plus the AVX2 set).
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

/// The per-type functions.
struct TypeFns {
    dequantize_row: fn(&[u8], &mut [f32]),
    quantize_row: fn(&[f32], &mut [u8]),
    dot: DotFn,
}

/// The reference dot of `ty` (the matmul's arithmetic for one output, portable).
fn dot_ref(ty: GgmlType, w: &[u8], a: &[u8], n: usize) -> f32 {
    let conv = int8_converter(ty).expect("a K-quant weight type");
    crate::gemm::dot_row(&conv, ActFormat::Q8K, w, a, n)
}

macro_rules! ref_dot_fn {
    ($name:ident, $ty:expr) => {
        fn $name(w: &[u8], a: &[u8], n: usize) -> f32 {
            dot_ref($ty, w, a, n)
        }
    };
}
ref_dot_fn!(dot_q2k, GgmlType::Q2_K);
ref_dot_fn!(dot_q3k, GgmlType::Q3_K);
ref_dot_fn!(dot_q4k, GgmlType::Q4_K);
ref_dot_fn!(dot_q5k, GgmlType::Q5_K);
ref_dot_fn!(dot_q6k, GgmlType::Q6_K);

fn type_fns(ty: GgmlType) -> Option<TypeFns> {
    let fns = |dequantize_row, quantize_row, dot| TypeFns {
        dequantize_row,
        quantize_row,
        dot,
    };
    Some(match ty {
        GgmlType::Q2_K => fns(q2k::dequantize_row, q2k::quantize_row, dot_q2k),
        GgmlType::Q3_K => fns(q3k::dequantize_row, q3k::quantize_row, dot_q3k),
        GgmlType::Q4_K => fns(q4k::dequantize_row, q4k::quantize_row, dot_q4k),
        GgmlType::Q5_K => fns(q5k::dequantize_row, q5k::quantize_row, dot_q5k),
        GgmlType::Q6_K => fns(q6k::dequantize_row, q6k::quantize_row, dot_q6k),
        _ => return None,
    })
}

/// The kernel of a K-quant type: its dot is the portable reference of the matmul's arithmetic
/// (matmuls run the int8 GEMM, [`crate::gemm`]); `None` if `ty` is not one of Q2_K..Q6_K or
/// `variant` is not `Scalar` (the only dot).
pub fn kernel_variant(ty: GgmlType, variant: Variant) -> Option<QuantKernel> {
    let fns = type_fns(ty)?;
    if variant != Variant::Scalar {
        return None;
    }
    Some(QuantKernel {
        ty,
        act: ActFormat::Q8K,
        dequantize_row: fns.dequantize_row,
        quantize_row: fns.quantize_row,
        dot: fns.dot,
        dot_variant: variant.name(),
    })
}

/// The kernels of `ty` (one: the reference dot); empty if `ty` is not a K-quant weight type.
pub fn kernel_variants(ty: GgmlType) -> Vec<QuantKernel> {
    kernel_variant(ty, Variant::Scalar).into_iter().collect()
}

/// The kernel of a K-quant type.
///
/// # Panics
/// If `ty` is not Q2_K, Q3_K, Q4_K, Q5_K or Q6_K (the quant module dispatches only those here).
pub fn kernel(ty: GgmlType) -> QuantKernel {
    scalar_kernel(ty)
}

/// The portable scalar kernel of a K-quant type.
///
/// # Panics
/// If `ty` is not Q2_K, Q3_K, Q4_K, Q5_K or Q6_K.
pub fn scalar_kernel(ty: GgmlType) -> QuantKernel {
    kernel_variant(ty, Variant::Scalar)
        .unwrap_or_else(|| panic!("{} is not a K-quant weight type", ty.name()))
}

/// The int8 GEMM's converter of a K-quant type (see [`crate::gemm::Converter`]).
pub(crate) fn int8_converter(ty: GgmlType) -> Option<Converter> {
    let (sub16, min, offset, max, row): (bool, bool, u8, u8, crate::gemm::ConvertFn) = match ty {
        GgmlType::Q2_K => (true, true, 0, 3, q2k::convert),
        GgmlType::Q3_K => (true, false, 4, 7, q3k::convert),
        GgmlType::Q4_K => (false, true, 0, 15, q4k::convert),
        GgmlType::Q5_K => (false, true, 0, 31, q5k::convert),
        GgmlType::Q6_K => (true, false, 32, 63, q6k::convert),
        _ => return None,
    };
    #[cfg(target_arch = "x86_64")]
    let (fast, tile16, tile16_packed) =
        (x86::converter(ty), x86::tile16(ty), x86::tile16_packed(ty));
    #[cfg(not(target_arch = "x86_64"))]
    let (fast, tile16, tile16_packed) = (None, None, None);
    Some(Converter {
        ty,
        sub16,
        min,
        offset,
        max,
        row,
        fast,
        tile16,
        tile16_packed,
    })
}

/// The GEMM factors of a Q4_K/Q5_K block: per sub-block of 32 the scale `d · sc` and the
/// minimum `−dmin · m`.
fn k4_factors(b: &[u8], scales: &mut [f32], mins: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (sc, mn) = unpack_scales_mins_k4(&b[4..16]);
    for j in 0..8 {
        scales[j] = d * sc[j] as f32;
        mins[j] = -dmin * mn[j] as f32;
    }
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

/// Unpacks the 12-byte Q4_K/Q5_K scale field into 8 six-bit scales and 8 six-bit mins.
///
/// Layout: bytes 0..4 hold scales 0..3 in their low 6 bits, bytes 4..8 mins 0..3; scales and mins
/// 4..7 keep their low 4 bits in bytes 8..12 (scale low nibble, min high nibble) and their top 2
/// bits in the top 2 bits of bytes 0..4 (scales) and 4..8 (mins).
#[inline]
pub(crate) fn unpack_scales_mins_k4(s: &[u8]) -> ([u8; 8], [u8; 8]) {
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
pub(crate) fn pack_scales_mins_k4(sc: &[u8; 8], mn: &[u8; 8], out: &mut [u8]) {
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
