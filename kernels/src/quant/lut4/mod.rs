//! The 4-bit lookup-table types IQ4_NL, IQ4_XS and MXFP4 (GGUF block layouts): each weight is a
//! 4-bit index into a fixed table of 16 signed integers, times a block or sub-block scale.
//!
//! | type   | id | elems | bytes | layout                                                        | value                   | partner |
//! |--------|----|-------|-------|---------------------------------------------------------------|-------------------------|---------|
//! | IQ4_NL | 20 | 32    | 18    | f16 `d`, 16 B nibbles                                         | `d · NL[q]`             | Q8_0    |
//! | IQ4_XS | 23 | 256   | 136   | f16 `d`, u16 `scales_h`, 4 B `scales_l`, 128 B nibbles         | `d · (ls_j − 32) · NL[q]` | Q8_K  |
//! | MXFP4  | 39 | 32    | 17    | u8 `e` (E8M0 exponent), 16 B nibbles                          | `2^(e − 128) · FP4[q]`  | Q8_0    |
//!
//! Nibbles (all three, per run of 32 elements over 16 bytes `qs`): element `j < 16` is the low
//! nibble of `qs[j]`, element `j + 16` its high nibble. IQ4_XS has eight such runs (sub-blocks
//! `j = 0..8`, `qs` at byte `8 + 16 j`), each with a 6-bit scale `ls_j`: low 4 bits in
//! `scales_l[j / 2]` (low nibble for even `j`, high for odd), top 2 bits at bits `2j..2j+2` of
//! `scales_h` (little-endian).
//!
//! [`NL`] is the IQ4_NL codebook; [`FP4`] the E2M1 values doubled (so they are integers), which is
//! why the MXFP4 scale is half the E8M0 value `2^(e − 127)`. The partner formats are those
//! llama.cpp pairs with these types (its `vec_dot_type`), so results agree with its CPU backend.
//!
//! Every block is exactly `scale × i8` per run of 32 ([`unpack`]): dequantization and the int8
//! GEMM's converter ([`int8_converter`]: levels + 128 as unsigned bytes, offset 128) start from
//! that one decoder; matmuls compute in the one order of [`crate::gemm`].

use pshard_model::ggml_type::GgmlType;

use super::act::{f16_at, QK8};
use super::kquants::QK_K;
use super::{ActFormat, DotFn, QuantKernel};
use crate::gemm::Converter;

mod quantize;
#[cfg(target_arch = "x86_64")]
mod x86;

/// The IQ4_NL (and IQ4_XS) codebook: index `q` (0..16) → level.
pub const NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// The E2M1 (FP4) values ×2 as MXFP4 stores them: index `q` → level (`q ≥ 8` is the negative of
/// `q − 8`; E2M1 magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6).
pub const FP4: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// Bytes per IQ4_NL block.
pub const IQ4_NL_BYTES: usize = 18;
/// Bytes per IQ4_XS block.
pub const IQ4_XS_BYTES: usize = 136;
/// Bytes per MXFP4 block.
pub const MXFP4_BYTES: usize = 17;

/// Elements per scaled run: every scale of these types covers 32 elements.
pub const RUN: usize = 32;

/// The types of this module.
pub const TYPES: [GgmlType; 3] = [GgmlType::IQ4_NL, GgmlType::IQ4_XS, GgmlType::MXFP4];

/// `2^(e − 128)`: the MXFP4 block scale (half the E8M0 value, because [`FP4`] is doubled). Exact
/// for every `e` (0 and 1 are subnormal f32).
#[inline]
pub fn e8m0_half(e: u8) -> f32 {
    let bits = if e < 2 {
        0x0020_0000u32 << e
    } else {
        (e as u32 - 1) << 23
    };
    f32::from_bits(bits)
}

/// Geometry of one of this module's types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Elements per block.
    pub qk: usize,
    /// Bytes per block.
    pub bytes: usize,
    /// The codebook.
    pub table: &'static [i8; 16],
    /// The activation partner format.
    pub act: ActFormat,
}

/// The geometry of `ty`, or `None` if it is not one of [`TYPES`].
pub fn geometry(ty: GgmlType) -> Option<Geometry> {
    Some(match ty {
        GgmlType::IQ4_NL => Geometry {
            qk: QK8,
            bytes: IQ4_NL_BYTES,
            table: &NL,
            act: ActFormat::Q8_0,
        },
        GgmlType::IQ4_XS => Geometry {
            qk: QK_K,
            bytes: IQ4_XS_BYTES,
            table: &NL,
            act: ActFormat::Q8K,
        },
        GgmlType::MXFP4 => Geometry {
            qk: QK8,
            bytes: MXFP4_BYTES,
            table: &FP4,
            act: ActFormat::Q8_0,
        },
        _ => return None,
    })
}

fn geometry_or_panic(ty: GgmlType) -> Geometry {
    geometry(ty).unwrap_or_else(|| panic!("lookup-table kernels do not handle {ty}"))
}

/// The signed 6-bit scale `ls_j − 32` (−32..=31) of IQ4_XS sub-block `j` (0..8) of block `b`.
#[inline]
pub fn iq4xs_scale(b: &[u8], j: usize) -> i32 {
    let lo = (b[4 + j / 2] >> (4 * (j % 2))) & 0x0F;
    let hi = (u16::from_le_bytes([b[2], b[3]]) >> (2 * j)) & 3;
    (lo as i32 | (hi as i32) << 4) - 32
}

/// Decodes 16 nibble bytes through `table` into 32 levels (low nibbles first).
#[inline]
fn run_levels(qs: &[u8], table: &[i8; 16], q: &mut [i8]) {
    for j in 0..16 {
        q[j] = table[(qs[j] & 0x0F) as usize];
        q[j + 16] = table[(qs[j] >> 4) as usize];
    }
}

/// Decodes one block of `ty` exactly into int8 levels and one f32 scale per run of [`RUN`]
/// elements: element `i` is `scales[i / 32] · q[i]`, with no rounding (the scales are the f16 or
/// E8M0 values, times the integer sub-block scale for IQ4_XS). This is the single decoder of the
/// module: dequantization and the int8 GEMM's converter build on it.
///
/// # Panics
/// If `ty` is not one of [`TYPES`], or `block`, `q` or `scales` are shorter than one block needs
/// (`bytes`, `qk` and `qk / 32`).
pub fn unpack(ty: GgmlType, block: &[u8], q: &mut [i8], scales: &mut [f32]) {
    let g = geometry_or_panic(ty);
    let b = &block[..g.bytes];
    match ty {
        GgmlType::IQ4_NL => {
            scales[0] = f16_at(b);
            run_levels(&b[2..18], &NL, &mut q[..RUN]);
        }
        GgmlType::MXFP4 => {
            scales[0] = e8m0_half(b[0]);
            run_levels(&b[1..17], &FP4, &mut q[..RUN]);
        }
        _ => {
            let d = f16_at(b);
            for j in 0..QK_K / RUN {
                scales[j] = d * iq4xs_scale(b, j) as f32;
                run_levels(
                    &b[8 + 16 * j..24 + 16 * j],
                    &NL,
                    &mut q[RUN * j..RUN * (j + 1)],
                );
            }
        }
    }
}

/// Checks a row conversion's lengths; returns the number of blocks.
fn check_row(g: &Geometry, bytes_len: usize, elems: usize, what: &str) -> usize {
    assert!(
        elems.is_multiple_of(g.qk),
        "{what}: {elems} elements is not a whole number of {}-element blocks",
        g.qk
    );
    let nb = elems / g.qk;
    assert!(
        bytes_len >= nb * g.bytes,
        "{what}: {bytes_len} bytes of blocks, {elems} elements need {}",
        nb * g.bytes
    );
    nb
}

/// Dequantizes `dst.len()` elements (whole blocks) of `ty` from `src`.
fn dequantize_with(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    let g = geometry_or_panic(ty);
    let nb = check_row(&g, src.len(), dst.len(), "dequantize");
    let mut q = [0i8; QK_K];
    let mut s = [0f32; QK_K / RUN];
    for (b, y) in src[..nb * g.bytes]
        .chunks_exact(g.bytes)
        .zip(dst.chunks_exact_mut(g.qk))
    {
        unpack(ty, b, &mut q, &mut s);
        for (i, v) in y.iter_mut().enumerate() {
            *v = s[i / RUN] * q[i] as f32;
        }
    }
}

fn dequantize_iq4_nl(src: &[u8], dst: &mut [f32]) {
    dequantize_with(GgmlType::IQ4_NL, src, dst)
}

fn dequantize_iq4_xs(src: &[u8], dst: &mut [f32]) {
    dequantize_with(GgmlType::IQ4_XS, src, dst)
}

fn dequantize_mxfp4(src: &[u8], dst: &mut [f32]) {
    dequantize_with(GgmlType::MXFP4, src, dst)
}

/// The portable converter ([`crate::gemm::ConvertFn`]) of `ty`: the levels plus 128 as unsigned
/// bytes (offset 128), one scale per run of 32.
fn convert_with(ty: GgmlType, src: &[u8], u: &mut [u8], scales: &mut [f32]) {
    let g = geometry_or_panic(ty);
    let nb = check_row(&g, src.len(), u.len(), "convert");
    let mut q = [0i8; QK_K];
    let runs = g.qk / RUN;
    for (i, b) in src[..nb * g.bytes].chunks_exact(g.bytes).enumerate() {
        unpack(ty, b, &mut q, &mut scales[i * runs..(i + 1) * runs]);
        for (o, &v) in u[i * g.qk..(i + 1) * g.qk].iter_mut().zip(&q) {
            *o = (v as u8) ^ 0x80;
        }
    }
}

/// The int8 GEMM's converter of one of [`TYPES`] (see [`crate::gemm::Converter`]).
pub(crate) fn int8_converter(ty: GgmlType) -> Option<Converter> {
    macro_rules! conv {
        ($ty:expr) => {{
            fn row(src: &[u8], u: &mut [u8], scales: &mut [f32], _mins: &mut [f32]) {
                convert_with($ty, src, u, scales)
            }
            Converter {
                ty: $ty,
                sub16: false,
                min: false,
                offset: 128,
                // The table's levels plus 128, within 0..=255.
                max: 255,
                row,
                fast: fast_converter($ty),
                tile16: tile16_loader($ty),
                // No repacked layout.
                tile16_packed: None,
            }
        }};
    }
    Some(match ty {
        GgmlType::IQ4_NL => conv!(GgmlType::IQ4_NL),
        GgmlType::IQ4_XS => conv!(GgmlType::IQ4_XS),
        GgmlType::MXFP4 => conv!(GgmlType::MXFP4),
        _ => return None,
    })
}

/// The SIMD converter of `ty` if this CPU runs it.
fn fast_converter(ty: GgmlType) -> Option<crate::gemm::ConvertFn> {
    #[cfg(target_arch = "x86_64")]
    {
        x86::converter(ty)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = ty;
        None
    }
}

/// The direct 16-row tile loader of `ty` if this CPU runs it.
fn tile16_loader(ty: GgmlType) -> Option<crate::gemm::Tile16Fn> {
    #[cfg(target_arch = "x86_64")]
    {
        x86::tile16(ty)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = ty;
        None
    }
}

/// The reference dot of `ty` (the matmul's arithmetic for one output, portable).
fn dot_ref(ty: GgmlType, w: &[u8], a: &[u8], n: usize) -> f32 {
    let conv = int8_converter(ty).expect("a lookup-table type");
    crate::gemm::dot_row(&conv, geometry_or_panic(ty).act, w, a, n)
}

fn dot_iq4_nl(w: &[u8], a: &[u8], n: usize) -> f32 {
    dot_ref(GgmlType::IQ4_NL, w, a, n)
}

fn dot_iq4_xs(w: &[u8], a: &[u8], n: usize) -> f32 {
    dot_ref(GgmlType::IQ4_XS, w, a, n)
}

fn dot_mxfp4(w: &[u8], a: &[u8], n: usize) -> f32 {
    dot_ref(GgmlType::MXFP4, w, a, n)
}

/// Dequantizer signature of [`QuantKernel`].
type DequantFn = fn(&[u8], &mut [f32]);
/// Quantizer signature of [`QuantKernel`].
type QuantFn = fn(&[f32], &mut [u8]);

fn make(ty: GgmlType, dot: DotFn, dot_variant: &'static str) -> QuantKernel {
    let (dequantize_row, quantize_row): (DequantFn, QuantFn) = match ty {
        GgmlType::IQ4_NL => (dequantize_iq4_nl, quantize::quantize_iq4_nl),
        GgmlType::IQ4_XS => (dequantize_iq4_xs, quantize::quantize_iq4_xs),
        GgmlType::MXFP4 => (dequantize_mxfp4, quantize::quantize_mxfp4),
        _ => panic!("lookup-table kernels do not handle {ty}"),
    };
    QuantKernel {
        ty,
        act: geometry_or_panic(ty).act,
        dequantize_row,
        quantize_row,
        dot,
        dot_variant,
    }
}

/// The kernel of one of [`TYPES`]: its dot is the portable reference of the matmul's arithmetic
/// (matmuls run the int8 GEMM, [`crate::gemm`]).
///
/// # Panics
/// For any other type.
pub fn scalar_kernel(ty: GgmlType) -> QuantKernel {
    let dot: DotFn = match ty {
        GgmlType::IQ4_NL => dot_iq4_nl,
        GgmlType::IQ4_XS => dot_iq4_xs,
        GgmlType::MXFP4 => dot_mxfp4,
        _ => panic!("lookup-table kernels do not handle {ty}"),
    };
    make(ty, dot, "scalar")
}

/// The kernels of `ty` (one: the reference dot).
///
/// # Panics
/// For a type not in [`TYPES`].
pub fn kernel_variants(ty: GgmlType) -> Vec<QuantKernel> {
    vec![scalar_kernel(ty)]
}

/// The kernel of `ty`.
///
/// # Panics
/// For a type not in [`TYPES`].
pub fn kernel(ty: GgmlType) -> QuantKernel {
    scalar_kernel(ty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e8m0_half_is_two_to_the_e_minus_128() {
        for e in 0..=255u8 {
            assert_eq!(e8m0_half(e) as f64, 2f64.powi(e as i32 - 128), "e = {e}");
        }
    }

    #[test]
    fn tables_are_sorted_codebooks() {
        assert!(NL.windows(2).all(|w| w[0] < w[1]));
        for q in 0..8 {
            assert_eq!(FP4[q + 8], -FP4[q], "sign bit of index {q}");
        }
    }

    #[test]
    fn iq4xs_scale_bits() {
        let mut b = [0u8; IQ4_XS_BYTES];
        // Sub-block 5: low nibble 0xA in the high nibble of scales_l[2], top bits 0b11 at 10..12.
        b[4 + 2] = 0xA0;
        b[2..4].copy_from_slice(&(0b11u16 << 10).to_le_bytes());
        assert_eq!(iq4xs_scale(&b, 5), 0x3A - 32);
        assert_eq!(iq4xs_scale(&b, 4), -32);
    }
}
