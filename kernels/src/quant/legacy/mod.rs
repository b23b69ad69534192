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
//! A dot product works block by block in integers, `Σ q_w q_a`, scaled by `d_w d_a`; the types with
//! a minimum add `m_w s_a`, where `s_a = d_a Σ q_a` is the Q8_1 block's stored sum.

use std::sync::OnceLock;

use half::f16;
use pshard_model::ggml_type::GgmlType;

use super::act::{f16_at, quantize_row_q8_0, Q8_0_BYTES, Q8_1_BYTES, QK8};
use super::{ActFormat, DotFn, QuantKernel};

#[cfg(target_arch = "x86_64")]
mod tile;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;

/// Rows and tokens of a full register tile.
pub(crate) const TILE: usize = 4;

/// A register tile: `out[r][t] = dot(w[r], a[t])` over `n` elements for `TILE` weight rows and
/// up to `TILE` activation rows; slots the caller does not need may repeat a used row (their
/// results are ignored). `next` holds the weight rows the caller computes next (back to back,
/// possibly empty): they are prefetched alongside, so a single thread streaming weights from
/// DRAM overlaps loading with computing.
pub(crate) type TileFn =
    fn(w: &[&[u8]; TILE], a: &[&[u8]; TILE], next: &[u8], n: usize, out: &mut [[f32; TILE]; TILE]);

/// Register-tile kernels for `ty` on this CPU, if it has them: (`TILE` × `TILE` tokens,
/// `TILE` rows × 1 token).
pub(crate) fn tiles(ty: GgmlType) -> Option<(TileFn, TileFn)> {
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

/// A decoded block: integer levels `q` with `value = q * d + m`.
struct Decoded {
    q: [i32; QK],
    d: f32,
    m: f32,
}

#[inline]
fn nibbles(qs: &[u8], q: &mut [i32; QK], high: u32, offset: i32) {
    for j in 0..16 {
        let lo = (qs[j] & 0x0F) as u32 | ((high >> j) & 1) << 4;
        let hi = (qs[j] >> 4) as u32 | ((high >> (j + 16)) & 1) << 4;
        q[j] = lo as i32 - offset;
        q[j + 16] = hi as i32 - offset;
    }
}

#[inline]
fn decode_q4_0(b: &[u8]) -> Decoded {
    let mut q = [0; QK];
    nibbles(&b[2..18], &mut q, 0, 8);
    Decoded {
        q,
        d: f16_at(b),
        m: 0.0,
    }
}

#[inline]
fn decode_q4_1(b: &[u8]) -> Decoded {
    let mut q = [0; QK];
    nibbles(&b[4..20], &mut q, 0, 0);
    Decoded {
        q,
        d: f16_at(b),
        m: f16_at(&b[2..]),
    }
}

#[inline]
fn decode_q5_0(b: &[u8]) -> Decoded {
    let mut q = [0; QK];
    nibbles(&b[6..22], &mut q, u32_at(&b[2..6]), 16);
    Decoded {
        q,
        d: f16_at(b),
        m: 0.0,
    }
}

#[inline]
fn decode_q5_1(b: &[u8]) -> Decoded {
    let mut q = [0; QK];
    nibbles(&b[8..24], &mut q, u32_at(&b[4..8]), 0);
    Decoded {
        q,
        d: f16_at(b),
        m: f16_at(&b[2..]),
    }
}

#[inline]
fn decode_q8_0(b: &[u8]) -> Decoded {
    let mut q = [0; QK];
    for (qi, &v) in q.iter_mut().zip(&b[2..34]) {
        *qi = v as i8 as i32;
    }
    Decoded {
        q,
        d: f16_at(b),
        m: 0.0,
    }
}

/// Dequantizes whole blocks (`dst.len()` elements) of a legacy type.
fn dequantize_with(src: &[u8], dst: &mut [f32], bytes: usize, decode: impl Fn(&[u8]) -> Decoded) {
    assert!(
        dst.len().is_multiple_of(QK),
        "element count {} is not a whole number of blocks",
        dst.len()
    );
    let nb = dst.len() / QK;
    for (b, y) in src[..nb * bytes]
        .chunks_exact(bytes)
        .zip(dst.chunks_exact_mut(QK))
    {
        let dec = decode(b);
        for (yi, &q) in y.iter_mut().zip(&dec.q) {
            *yi = q as f32 * dec.d + dec.m;
        }
    }
}

macro_rules! dequant_fn {
    ($name:ident, $bytes:expr, $decode:ident) => {
        fn $name(src: &[u8], dst: &mut [f32]) {
            dequantize_with(src, dst, $bytes, $decode)
        }
    };
}
dequant_fn!(dequantize_q4_0, 18, decode_q4_0);
dequant_fn!(dequantize_q4_1, 20, decode_q4_1);
dequant_fn!(dequantize_q5_0, 22, decode_q5_0);
dequant_fn!(dequantize_q5_1, 24, decode_q5_1);
dequant_fn!(dequantize_q8_0, 34, decode_q8_0);

/// The int8 GEMM's converter ([`crate::gemm`]) for a legacy type: `q.len()` elements of the row
/// `src` as `q · scale + min` per block of 32 (one scale and one minimum per block).
fn to_int8_with(
    src: &[u8],
    q: &mut [i8],
    scales: &mut [f32],
    mins: &mut [f32],
    bytes: usize,
    decode: impl Fn(&[u8]) -> Decoded,
) {
    let nb = q.len() / QK;
    for (i, b) in src[..nb * bytes].chunks_exact(bytes).enumerate() {
        let dec = decode(b);
        for (o, &v) in q[i * QK..(i + 1) * QK].iter_mut().zip(&dec.q) {
            *o = v as i8;
        }
        scales[i] = dec.d;
        mins[i] = dec.m;
    }
}

/// The int8 GEMM's converter of a legacy type (see [`crate::gemm::Converter`]).
pub(crate) fn int8_converter(ty: GgmlType) -> Option<crate::gemm::Converter> {
    macro_rules! conv {
        ($bytes:expr, $decode:ident, $min:expr) => {{
            fn row(src: &[u8], q: &mut [i8], scales: &mut [f32], mins: &mut [f32]) {
                to_int8_with(src, q, scales, mins, $bytes, $decode)
            }
            crate::gemm::Converter {
                sub16: false,
                min: $min,
                row,
            }
        }};
    }
    Some(match ty {
        GgmlType::Q4_0 => conv!(18, decode_q4_0, false),
        GgmlType::Q4_1 => conv!(20, decode_q4_1, true),
        GgmlType::Q5_0 => conv!(22, decode_q5_0, false),
        GgmlType::Q5_1 => conv!(24, decode_q5_1, true),
        GgmlType::Q8_0 => conv!(34, decode_q8_0, false),
        _ => return None,
    })
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

/// Scalar dot of `n` elements: weight blocks of `wb` bytes, activation blocks of `ab` bytes
/// (34 = Q8_0, 36 = Q8_1 with its stored sum used for the minimum term).
#[inline]
fn dot_scalar_with(
    w: &[u8],
    a: &[u8],
    n: usize,
    wb: usize,
    ab: usize,
    decode: impl Fn(&[u8]) -> Decoded,
) -> f32 {
    assert!(
        n.is_multiple_of(QK),
        "dot length {n} is not a whole number of blocks"
    );
    let nb = n / QK;
    let mut sum = 0f32;
    for (wblk, ablk) in w[..nb * wb]
        .chunks_exact(wb)
        .zip(a[..nb * ab].chunks_exact(ab))
    {
        let dec = decode(wblk);
        let aq = &ablk[ab - QK..];
        let isum: i32 = dec
            .q
            .iter()
            .zip(aq)
            .map(|(&x, &y)| x * (y as i8 as i32))
            .sum();
        sum += dec.d * f16_at(ablk) * isum as f32;
        if ab == Q8_1_BYTES {
            sum += dec.m * f16_at(&ablk[2..]);
        }
    }
    sum
}

macro_rules! scalar_dot_fn {
    ($name:ident, $wb:expr, $ab:expr, $decode:ident) => {
        pub(crate) fn $name(w: &[u8], a: &[u8], n: usize) -> f32 {
            dot_scalar_with(w, a, n, $wb, $ab, $decode)
        }
    };
}
scalar_dot_fn!(dot_q4_0_scalar, 18, Q8_0_BYTES, decode_q4_0);
scalar_dot_fn!(dot_q4_1_scalar, 20, Q8_1_BYTES, decode_q4_1);
scalar_dot_fn!(dot_q5_0_scalar, 22, Q8_0_BYTES, decode_q5_0);
scalar_dot_fn!(dot_q5_1_scalar, 24, Q8_1_BYTES, decode_q5_1);
scalar_dot_fn!(dot_q8_0_scalar, 34, Q8_0_BYTES, decode_q8_0);

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

/// The portable scalar kernel for a legacy type.
///
/// # Panics
/// For a non-legacy type (the dispatcher in `quant::kernel` only passes legacy types).
pub fn scalar_kernel(ty: GgmlType) -> QuantKernel {
    let dot: DotFn = match ty {
        GgmlType::Q4_0 => dot_q4_0_scalar,
        GgmlType::Q4_1 => dot_q4_1_scalar,
        GgmlType::Q5_0 => dot_q5_0_scalar,
        GgmlType::Q5_1 => dot_q5_1_scalar,
        GgmlType::Q8_0 => dot_q8_0_scalar,
        _ => panic!("legacy kernels do not handle {ty}"),
    };
    make(ty, dot, "scalar")
}

/// Every dot variant this CPU can run for `ty`, best first (the last is always scalar). Tests
/// check each of them.
///
/// # Panics
/// For a non-legacy type.
pub fn kernel_variants(ty: GgmlType) -> Vec<QuantKernel> {
    let scalar = scalar_kernel(ty);
    let mut v = Vec::new();
    #[cfg(target_arch = "x86_64")]
    for (dot, name) in x86::variants(ty) {
        v.push(make(ty, dot, name));
    }
    v.push(scalar);
    v
}

const TYPES: [GgmlType; 5] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
];

/// The kernel for a legacy type with the fastest dot variant this CPU supports (detected once).
///
/// # Panics
/// For a non-legacy type.
pub fn kernel(ty: GgmlType) -> QuantKernel {
    static BEST: OnceLock<[QuantKernel; 5]> = OnceLock::new();
    let best = BEST.get_or_init(|| TYPES.map(|t| kernel_variants(t)[0]));
    match TYPES.iter().position(|&t| t == ty) {
        Some(i) => best[i],
        None => panic!("legacy kernels do not handle {ty}"),
    }
}
