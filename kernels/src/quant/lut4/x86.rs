//! x86-64 converters of the lookup-table types (AVX2 + F16C): nibbles become codebook levels
//! plus 128 with one byte shuffle (`vpshufb`, the biased 16-entry table in both 128-bit lanes),
//! bit for bit the portable converter's output.
//!
//! The public wrappers are plain `fn`s so they fit [`ConvertFn`]; each re-checks the (cached)
//! feature flags, so calling one on a CPU without the features falls back to the portable
//! converter instead of executing unsupported instructions.

use std::arch::x86_64::*;

use pshard_model::ggml_type::GgmlType;

use super::super::legacy::x86::{f16c, has_avx2, load16, nibbles, store32};
use super::{check_row, convert_with, e8m0_half, geometry_or_panic, iq4xs_scale, FP4, NL, RUN};
use crate::gemm::ConvertFn;

/// The SIMD converter of `ty` if this CPU runs it.
pub(super) fn converter(ty: GgmlType) -> Option<ConvertFn> {
    if !has_avx2() {
        return None;
    }
    Some(match ty {
        GgmlType::IQ4_NL => convert_iq4_nl,
        GgmlType::IQ4_XS => convert_iq4_xs,
        GgmlType::MXFP4 => convert_mxfp4,
        _ => return None,
    })
}

/// The codebook plus 128 (wrapping) as 16 bytes.
fn biased(table: &[i8; 16]) -> [u8; 16] {
    table.map(|v| (v as u8) ^ 0x80)
}

/// The blocks of `src` covering `u` as the portable converter writes them.
#[target_feature(enable = "avx2,fma,f16c")]
fn convert_avx2(ty: GgmlType, src: &[u8], u: &mut [u8], scales: &mut [f32]) {
    let g = geometry_or_panic(ty);
    let nb = check_row(&g, src.len(), u.len(), "convert");
    let table = if ty == GgmlType::MXFP4 { &FP4 } else { &NL };
    let tab = _mm256_broadcastsi128_si256(load16(&biased(table)));
    let runs = g.qk / RUN;
    for (i, b) in src[..nb * g.bytes].chunks_exact(g.bytes).enumerate() {
        let (first, d) = match ty {
            GgmlType::IQ4_NL => (2, f16c(b, 0)),
            GgmlType::MXFP4 => (1, e8m0_half(b[0])),
            _ => (8, f16c(b, 0)),
        };
        for j in 0..runs {
            let qs: &[u8; 16] = b[first + 16 * j..first + 16 * j + 16]
                .try_into()
                .expect("16 nibble bytes");
            let v = _mm256_shuffle_epi8(tab, nibbles(qs));
            store32(&mut u[i * g.qk + RUN * j..], v);
            scales[i * runs + j] = if ty == GgmlType::IQ4_XS {
                d * iq4xs_scale(b, j) as f32
            } else {
                d
            };
        }
    }
}

macro_rules! convert_fn {
    ($name:ident, $ty:expr) => {
        fn $name(src: &[u8], u: &mut [u8], scales: &mut [f32], _mins: &mut [f32]) {
            if !has_avx2() {
                return convert_with($ty, src, u, scales);
            }
            // SAFETY: AVX2, FMA and F16C were detected just above.
            unsafe { convert_avx2($ty, src, u, scales) }
        }
    };
}
convert_fn!(convert_iq4_nl, GgmlType::IQ4_NL);
convert_fn!(convert_iq4_xs, GgmlType::IQ4_XS);
convert_fn!(convert_mxfp4, GgmlType::MXFP4);
