//! The legacy 32-element block types Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 (GGUF block layouts).
//!
//! | type | bytes | layout                                   | value              | partner |
//! |------|-------|------------------------------------------|--------------------|---------|
//! | Q4_0 | 18    | f16 d, 16 B nibbles                      | `(q - 8) d`        | Q8_0    |
//! | Q4_1 | 20    | f16 d, f16 m, 16 B nibbles               | `q d + m`          | Q8_1    |
//! | Q5_0 | 22    | f16 d, u32 qh, 16 B nibbles              | `(q - 16) d`       | Q8_0    |
//! | Q5_1 | 24    | f16 d, f16 m, u32 qh, 16 B nibbles       | `q d + m`          | Q8_1    |
//! | Q8_0 | 34    | f16 d, 32 i8                             | `q d`              | Q8_0    |
//!
//! Nibbles: element `j` is the low nibble of byte `j`, element `j + 16` the high nibble. For the
//! 5-bit types bit `j` of `qh` (little-endian) is bit 4 of element `j`.
//!
//! Matmuls convert blocks exactly to `(u − offset) · d + m` ([`int8_converter`]) and compute in the
//! one order of [`crate::gemm`]: per block `Σ (u − offset) q_a` in integers, scaled by `d_w d_a`;
//! the types with a minimum add `m_w s_a`, where `s_a` is the Q8_1 block's stored sum.

use std::sync::OnceLock;

use half::f16;
use pshard_model::ggml_type::GgmlType;

use super::act::{f16_at, quantize_row_q8_0, QK8};
use super::{ActFormat, DotFn, QuantKernel};
use crate::gemm::Converter;

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;

/// Elements per block of every legacy type.
pub const QK: usize = QK8;

/// Bytes per block of a legacy type.
///
/// # Panics
/// For a non-legacy type.
pub fn block_bytes(ty: GgmlType) -> usize {
    match ty {
        GgmlType::Q4_0 => 18,
        GgmlType::Q4_1 => 20,
        GgmlType::Q5_0 => 22,
        GgmlType::Q5_1 => 24,
        GgmlType::Q8_0 => 34,
        _ => panic!("legacy kernels do not handle {ty}"),
    }
}

/// The activation partner format of a legacy type (Q8_1 for the types with a minimum, else
/// Q8_0).
pub fn act_format(ty: GgmlType) -> ActFormat {
    match ty {
        GgmlType::Q4_1 | GgmlType::Q5_1 => ActFormat::Q8_1,
        _ => ActFormat::Q8_0,
    }
}

#[inline]
fn u32_at(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Dequantizes whole blocks (`dst.len()` elements) of a legacy type: `(u − offset) · d + m` from
/// the converter's exact levels and factors.
fn dequantize_with(src: &[u8], dst: &mut [f32], ty: GgmlType) {
    assert!(
        dst.len().is_multiple_of(QK),
        "element count {} is not a whole number of blocks",
        dst.len()
    );
    let l = layout(ty);
    let nb = dst.len() / QK;
    let mut u = [0u8; QK];
    let (mut d, mut m) = ([0f32; 1], [0f32; 1]);
    for (b, y) in src[..nb * l.bytes]
        .chunks_exact(l.bytes)
        .zip(dst.chunks_exact_mut(QK))
    {
        convert_with(b, &mut u, &mut d, &mut m, l);
        for (yi, &q) in y.iter_mut().zip(&u) {
            *yi = (q as i32 - l.offset as i32) as f32 * d[0] + m[0];
        }
    }
}

macro_rules! dequant_fn {
    ($name:ident, $ty:expr) => {
        fn $name(src: &[u8], dst: &mut [f32]) {
            dequantize_with(src, dst, $ty)
        }
    };
}
dequant_fn!(dequantize_q4_0, GgmlType::Q4_0);
dequant_fn!(dequantize_q4_1, GgmlType::Q4_1);
dequant_fn!(dequantize_q5_0, GgmlType::Q5_0);
dequant_fn!(dequantize_q5_1, GgmlType::Q5_1);
dequant_fn!(dequantize_q8_0, GgmlType::Q8_0);

/// Where a legacy block keeps its fields, for the converters.
#[derive(Clone, Copy)]
pub(crate) struct Layout {
    /// Bytes per block.
    pub bytes: usize,
    /// Offset of the 16 nibble bytes (or of Q8_0's 32 quants).
    pub qs: usize,
    /// Offset of the 32-bit word of fifth bits (Q5_0, Q5_1).
    pub qh: Option<usize>,
    /// Offset of the f16 minimum (Q4_1, Q5_1).
    pub m: Option<usize>,
    /// Q8_0: 32 signed quants instead of nibbles.
    pub eight: bool,
    /// The converter's offset: the level is `u − offset`.
    pub offset: u8,
}

/// The block layout of a legacy type.
///
/// # Panics
/// For a non-legacy type.
pub(crate) fn layout(ty: GgmlType) -> Layout {
    let l = |bytes, qs, qh, m, offset| Layout {
        bytes,
        qs,
        qh,
        m,
        eight: false,
        offset,
    };
    match ty {
        GgmlType::Q4_0 => l(18, 2, None, None, 8),
        GgmlType::Q4_1 => l(20, 4, None, Some(2), 0),
        GgmlType::Q5_0 => l(22, 6, Some(2), None, 16),
        GgmlType::Q5_1 => l(24, 8, Some(4), Some(2), 0),
        GgmlType::Q8_0 => Layout {
            eight: true,
            ..l(34, 2, None, None, 128)
        },
        _ => panic!("legacy kernels do not handle {ty}"),
    }
}

/// The portable converter of a legacy type ([`crate::gemm::ConvertFn`]): per block of 32 the
/// levels as unsigned bytes (Q8_0's quants offset by 128), the scale `d` and the minimum `m`.
fn convert_with(src: &[u8], u: &mut [u8], scales: &mut [f32], mins: &mut [f32], l: Layout) {
    let nb = u.len() / QK;
    for (i, b) in src[..nb * l.bytes].chunks_exact(l.bytes).enumerate() {
        let y = &mut u[i * QK..(i + 1) * QK];
        if l.eight {
            for (o, &v) in y.iter_mut().zip(&b[l.qs..l.qs + QK]) {
                *o = v ^ 0x80;
            }
        } else {
            let high = l.qh.map_or(0, |o| u32_at(&b[o..]));
            let qs = &b[l.qs..l.qs + 16];
            for j in 0..16 {
                y[j] = (qs[j] & 0x0F) | (((high >> j) & 1) << 4) as u8;
                y[j + 16] = (qs[j] >> 4) | (((high >> (j + 16)) & 1) << 4) as u8;
            }
        }
        scales[i] = f16_at(b);
        if let Some(m) = l.m {
            mins[i] = f16_at(&b[m..]);
        }
    }
}

/// The int8 GEMM's converter of a legacy type (see [`crate::gemm::Converter`]).
pub(crate) fn int8_converter(ty: GgmlType) -> Option<Converter> {
    macro_rules! conv {
        ($ty:expr) => {{
            fn row(src: &[u8], u: &mut [u8], scales: &mut [f32], mins: &mut [f32]) {
                convert_with(src, u, scales, mins, layout($ty))
            }
            Converter {
                ty: $ty,
                sub16: false,
                min: layout($ty).m.is_some(),
                offset: layout($ty).offset,
                max: match layout($ty) {
                    l if l.eight => 255,
                    l if l.qh.is_some() => 31,
                    _ => 15,
                },
                row,
                fast: fast_converter($ty),
                tile16: tile16_loader($ty),
                tile16_packed: packed_loader($ty),
            }
        }};
    }
    Some(match ty {
        GgmlType::Q4_0 => conv!(GgmlType::Q4_0),
        GgmlType::Q4_1 => conv!(GgmlType::Q4_1),
        GgmlType::Q5_0 => conv!(GgmlType::Q5_0),
        GgmlType::Q5_1 => conv!(GgmlType::Q5_1),
        GgmlType::Q8_0 => conv!(GgmlType::Q8_0),
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

/// The direct 16-row tile loader of `ty`'s repacked groups if this CPU runs it.
fn packed_loader(ty: GgmlType) -> Option<crate::gemm::PackedTile16Fn> {
    #[cfg(target_arch = "x86_64")]
    {
        x86::tile16_packed(ty)
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

/// Splits `src` into blocks and checks `dst` is long enough.
fn blocks<'a>(
    src: &'a [f32],
    dst: &'a mut [u8],
    bytes: usize,
) -> impl Iterator<Item = (&'a [f32], &'a mut [u8])> {
    assert!(
        src.len().is_multiple_of(QK),
        "element count {} is not a whole number of blocks",
        src.len()
    );
    let nb = src.len() / QK;
    assert!(
        dst.len() >= nb * bytes,
        "destination holds {} bytes, need {}",
        dst.len(),
        nb * bytes
    );
    src.chunks_exact(QK)
        .zip(dst[..nb * bytes].chunks_exact_mut(bytes))
}

/// The element with the largest magnitude, sign kept.
fn signed_absmax(x: &[f32]) -> f32 {
    x.iter()
        .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m })
}

fn min_max(x: &[f32]) -> (f32, f32) {
    x.iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        })
}

/// Packs 5-bit (or 4-bit) levels: low nibbles into `qs`, bit 4 into the returned `qh`.
fn pack(levels: &[u32; QK], qs: &mut [u8]) -> u32 {
    let mut qh = 0u32;
    for j in 0..16 {
        qs[j] = (levels[j] & 0x0F) as u8 | ((levels[j + 16] & 0x0F) as u8) << 4;
        qh |= ((levels[j] >> 4) & 1) << j | ((levels[j + 16] >> 4) & 1) << (j + 16);
    }
    qh
}

/// Symmetric levels: `d = max / -half` (the largest magnitude maps to `-half`), levels
/// `trunc(x / d + half + 0.5)` clamped to `2 half - 1`.
fn symmetric_levels(x: &[f32], half: f32) -> ([u32; QK], f32) {
    let max = signed_absmax(x);
    let d = max / -half;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let top = 2.0 * half - 1.0;
    let mut l = [0u32; QK];
    for (li, &v) in l.iter_mut().zip(x) {
        *li = (v * id + half + 0.5).clamp(0.0, top) as u32;
    }
    (l, d)
}

/// Asymmetric levels: `d = (max - min) / top`, `m = min`, levels `round((x - m) / d)` in `0..=top`.
fn asymmetric_levels(x: &[f32], top: f32) -> ([u32; QK], f32, f32) {
    let (min, max) = min_max(x);
    let d = (max - min) / top;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut l = [0u32; QK];
    for (li, &v) in l.iter_mut().zip(x) {
        *li = ((v - min) * id + 0.5).clamp(0.0, top) as u32;
    }
    (l, d, min)
}

fn put_f16(b: &mut [u8], v: f32) {
    b[..2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

fn quantize_q4_0(src: &[f32], dst: &mut [u8]) {
    for (x, b) in blocks(src, dst, 18) {
        let (l, d) = symmetric_levels(x, 8.0);
        put_f16(b, d);
        pack(&l, &mut b[2..18]);
    }
}

fn quantize_q4_1(src: &[f32], dst: &mut [u8]) {
    for (x, b) in blocks(src, dst, 20) {
        let (l, d, m) = asymmetric_levels(x, 15.0);
        put_f16(b, d);
        put_f16(&mut b[2..], m);
        pack(&l, &mut b[4..20]);
    }
}

fn quantize_q5_0(src: &[f32], dst: &mut [u8]) {
    for (x, b) in blocks(src, dst, 22) {
        let (l, d) = symmetric_levels(x, 16.0);
        put_f16(b, d);
        let qh = pack(&l, &mut b[6..22]);
        b[2..6].copy_from_slice(&qh.to_le_bytes());
    }
}

fn quantize_q5_1(src: &[f32], dst: &mut [u8]) {
    for (x, b) in blocks(src, dst, 24) {
        let (l, d, m) = asymmetric_levels(x, 31.0);
        put_f16(b, d);
        put_f16(&mut b[2..], m);
        let qh = pack(&l, &mut b[8..24]);
        b[4..8].copy_from_slice(&qh.to_le_bytes());
    }
}

/// Q8_0 weights use the same block as Q8_0 activations.
fn quantize_q8_0(src: &[f32], dst: &mut [u8]) {
    quantize_row_q8_0(src, dst)
}

/// The reference dot of `ty` (the matmul's arithmetic for one output, portable).
fn dot_ref(ty: GgmlType, w: &[u8], a: &[u8], n: usize) -> f32 {
    let conv = int8_converter(ty).expect("a legacy type");
    crate::gemm::dot_row(&conv, act_format(ty), w, a, n)
}

macro_rules! ref_dot_fn {
    ($name:ident, $ty:expr) => {
        fn $name(w: &[u8], a: &[u8], n: usize) -> f32 {
            dot_ref($ty, w, a, n)
        }
    };
}
ref_dot_fn!(dot_q4_0, GgmlType::Q4_0);
ref_dot_fn!(dot_q4_1, GgmlType::Q4_1);
ref_dot_fn!(dot_q5_0, GgmlType::Q5_0);
ref_dot_fn!(dot_q5_1, GgmlType::Q5_1);
ref_dot_fn!(dot_q8_0, GgmlType::Q8_0);

/// Dequantizer signature of [`QuantKernel`].
type DequantFn = fn(&[u8], &mut [f32]);
/// Quantizer signature of [`QuantKernel`].
type QuantFn = fn(&[f32], &mut [u8]);

fn make(ty: GgmlType, dot: DotFn, dot_variant: &'static str) -> QuantKernel {
    let (dequantize_row, quantize_row): (DequantFn, QuantFn) = match ty {
        GgmlType::Q4_0 => (dequantize_q4_0, quantize_q4_0),
        GgmlType::Q4_1 => (dequantize_q4_1, quantize_q4_1),
        GgmlType::Q5_0 => (dequantize_q5_0, quantize_q5_0),
        GgmlType::Q5_1 => (dequantize_q5_1, quantize_q5_1),
        GgmlType::Q8_0 => (dequantize_q8_0, quantize_q8_0),
        _ => panic!("legacy kernels do not handle {ty}"),
    };
    QuantKernel {
        ty,
        act: act_format(ty),
        dequantize_row,
        quantize_row,
        dot,
        dot_variant,
    }
}

/// The kernel of a legacy type: its dot is the portable reference of the matmul's arithmetic
/// (matmuls run the int8 GEMM, [`crate::gemm`]).
///
/// # Panics
/// For a non-legacy type (the dispatcher in `quant::kernel` only passes legacy types).
pub fn scalar_kernel(ty: GgmlType) -> QuantKernel {
    let dot: DotFn = match ty {
        GgmlType::Q4_0 => dot_q4_0,
        GgmlType::Q4_1 => dot_q4_1,
        GgmlType::Q5_0 => dot_q5_0,
        GgmlType::Q5_1 => dot_q5_1,
        GgmlType::Q8_0 => dot_q8_0,
        _ => panic!("legacy kernels do not handle {ty}"),
    };
    make(ty, dot, "scalar")
}

/// The kernels of `ty` (one: the reference dot).
///
/// # Panics
/// For a non-legacy type.
pub fn kernel_variants(ty: GgmlType) -> Vec<QuantKernel> {
    vec![scalar_kernel(ty)]
}

const TYPES: [GgmlType; 5] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
];

/// The kernel for a legacy type.
///
/// # Panics
/// For a non-legacy type.
pub fn kernel(ty: GgmlType) -> QuantKernel {
    static KERNELS: OnceLock<[QuantKernel; 5]> = OnceLock::new();
    let all = KERNELS.get_or_init(|| TYPES.map(scalar_kernel));
    match TYPES.iter().position(|&t| t == ty) {
        Some(i) => all[i],
        None => panic!("legacy kernels do not handle {ty}"),
    }
}
