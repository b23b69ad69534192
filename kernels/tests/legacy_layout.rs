//! Legacy block layouts (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) checked against blocks built by hand from the
//! GGUF / ggml format description, not through pshard's own quantizer (a quantize → dequantize round
//! trip cannot see a layout that is wrong the same way in both directions):
//!
//! - Q4_0, 18 bytes per 32 weights: `d` (f16), then 16 bytes of nibbles; byte `j` holds weight `j` in
//!   its low nibble and weight `j + 16` in its high nibble; a weight is `(q − 8)·d`.
//! - Q4_1, 20 bytes: `d`, `m` (f16), 16 bytes of nibbles as Q4_0; a weight is `q·d + m`.
//! - Q5_0, 22 bytes: `d`, a little-endian u32 whose bit `i` is the fifth bit of weight `i`, 16 bytes
//!   of low nibbles as Q4_0; a weight is `(q − 16)·d`.
//! - Q5_1, 24 bytes: `d`, `m`, the u32 of high bits, 16 bytes of low nibbles; a weight is `q·d + m`.
//! - Q8_0, 34 bytes: `d`, 32 signed bytes; a weight is `q·d`.
//!
//! Their activation partners are built the same way: Q8_0 for Q4_0/Q5_0/Q8_0, and Q8_1 (36 bytes:
//! `d`, `s = d·Σq` as f16, 32 signed bytes) for Q4_1/Q5_1. Every dot variant this CPU runs must give
//! the f64 dot of the hand-decoded values.

use half::f16;
use pshard_kernels::quant::{self, legacy, ActFormat};
use pshard_model::ggml_type::GgmlType;

fn h(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_bits().to_le_bytes()
}

/// A hand-built block: its bytes and the 32 weights it stands for.
struct Block {
    bytes: Vec<u8>,
    values: Vec<f64>,
}

/// Packs 32 four-bit values as the legacy types lay them out: byte `j` = `q[j] | q[j + 16] << 4`.
fn nibbles(q: &[u8; 32]) -> Vec<u8> {
    assert!(
        (0..16).all(|j| q[j] != q[j + 16]),
        "levels that could hide a nibble swap"
    );
    (0..16)
        .map(|j| (q[j] & 15) | (q[j + 16] & 15) << 4)
        .collect()
}

/// The u32 whose bit `i` is bit 4 of `q[i]`.
fn high_bits(q: &[u8; 32]) -> [u8; 4] {
    let mut qh = 0u32;
    for (i, &v) in q.iter().enumerate() {
        qh |= u32::from(v >> 4 & 1) << i;
    }
    qh.to_le_bytes()
}

/// Quant levels with every value of the range present, and weights `i` and `i + 16` (which share
/// a byte) always different, so a swapped nibble order cannot go unseen.
fn levels(range: u8, salt: usize) -> [u8; 32] {
    std::array::from_fn(|i| ((i * 7 + (i / 16) * 5 + salt * 3) % range as usize) as u8)
}

fn block(ty: GgmlType, d: f32, m: f32, salt: usize) -> Block {
    // The stored scales are f16: the values use what the file holds.
    let (dd, mm) = (f16::from_f32(d).to_f64(), f16::from_f32(m).to_f64());
    let mut bytes = h(d).to_vec();
    let values: Vec<f64> = match ty {
        GgmlType::Q4_0 => {
            let q = levels(16, salt);
            bytes.extend(nibbles(&q));
            q.iter().map(|&v| (f64::from(v) - 8.0) * dd).collect()
        }
        GgmlType::Q4_1 => {
            let q = levels(16, salt);
            bytes.extend(h(m));
            bytes.extend(nibbles(&q));
            q.iter().map(|&v| f64::from(v) * dd + mm).collect()
        }
        GgmlType::Q5_0 => {
            let q = levels(32, salt);
            bytes.extend(high_bits(&q));
            bytes.extend(nibbles(&q));
            q.iter().map(|&v| (f64::from(v) - 16.0) * dd).collect()
        }
        GgmlType::Q5_1 => {
            let q = levels(32, salt);
            bytes.extend(h(m));
            bytes.extend(high_bits(&q));
            bytes.extend(nibbles(&q));
            q.iter().map(|&v| f64::from(v) * dd + mm).collect()
        }
        GgmlType::Q8_0 => {
            let q: [i8; 32] =
                std::array::from_fn(|i| ((i as i32 * 37 + salt as i32 * 11) % 255 - 127) as i8);
            bytes.extend(q.iter().map(|&v| v as u8));
            q.iter().map(|&v| f64::from(v) * dd).collect()
        }
        other => unreachable!("{other:?} is not a legacy type"),
    };
    assert_eq!(bytes.len() as u64, ty.type_size(), "{ty:?} block size");
    Block { bytes, values }
}

/// A hand-built activation block of the partner format: bytes and the 32 values.
fn act_block(format: ActFormat, d: f32, salt: i32) -> Block {
    let q: [i8; 32] = std::array::from_fn(|i| ((i as i32 * 29 + salt * 5) % 255 - 127) as i8);
    let dd = f16::from_f32(d).to_f64();
    let mut bytes = h(d).to_vec();
    if format == ActFormat::Q8_1 {
        let sum: i32 = q.iter().map(|&v| i32::from(v)).sum();
        bytes.extend(h((dd * f64::from(sum)) as f32));
    }
    bytes.extend(q.iter().map(|&v| v as u8));
    Block {
        bytes,
        values: q.iter().map(|&v| f64::from(v) * dd).collect(),
    }
}

const TYPES: [GgmlType; 5] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
];

/// Three blocks per row: positive, negative and a tiny (subnormal-range f16) scale.
fn row(ty: GgmlType) -> Block {
    let parts = [
        block(ty, 0.5, -1.5, 0),
        block(ty, -0.0703125, 0.25, 1),
        block(ty, 3.0e-5, -2.0e-5, 2),
    ];
    Block {
        bytes: parts.iter().flat_map(|b| b.bytes.clone()).collect(),
        values: parts.iter().flat_map(|b| b.values.clone()).collect(),
    }
}

#[test]
fn hand_built_blocks_dequantize_to_their_values() {
    for ty in TYPES {
        let r = row(ty);
        let k = quant::scalar_kernel(ty).expect("legacy kernel");
        for kv in std::iter::once(k).chain(legacy::kernel_variants(ty)) {
            let mut y = vec![f32::NAN; r.values.len()];
            (kv.dequantize_row)(&r.bytes, &mut y);
            for (i, (&got, &want)) in y.iter().zip(&r.values).enumerate() {
                // d·q in f32 is exact for these scales up to one f32 rounding (Q4_1/Q5_1 add m).
                let tol = want.abs() * 1e-6 + 1e-12;
                assert!(
                    (f64::from(got) - want).abs() <= tol,
                    "{ty:?} {}: weight {i} is {got}, the layout says {want}",
                    kv.dot_variant
                );
            }
        }
    }
}

#[test]
fn hand_built_blocks_dot_as_the_layout_says() {
    for ty in TYPES {
        let w = row(ty);
        let k = quant::scalar_kernel(ty).expect("legacy kernel");
        let parts: Vec<Block> = (0..3)
            .map(|b| act_block(k.act, [0.02, -0.5, 0.003][b], b as i32))
            .collect();
        let a = Block {
            bytes: parts.iter().flat_map(|b| b.bytes.clone()).collect(),
            values: parts.iter().flat_map(|b| b.values.clone()).collect(),
        };
        let want: f64 = w.values.iter().zip(&a.values).map(|(x, y)| x * y).sum();
        let scale: f64 = w
            .values
            .iter()
            .zip(&a.values)
            .map(|(x, y)| (x * y).abs())
            .sum();
        // Q8_1's stored sum s is f16: the kernels use it for the m term, so its rounding shows.
        let s_slack: f64 = match k.act {
            ActFormat::Q8_1 => parts
                .iter()
                .enumerate()
                .map(|(b, p)| {
                    let s = f16::from_bits(u16::from_le_bytes([p.bytes[2], p.bytes[3]])).to_f64();
                    let exact: f64 = p.values.iter().sum();
                    let m = f16::from_bits(u16::from_le_bytes([
                        w.bytes[b * ty.type_size() as usize + 2],
                        w.bytes[b * ty.type_size() as usize + 3],
                    ]))
                    .to_f64();
                    m.abs() * (s - exact).abs()
                })
                .sum(),
            _ => 0.0,
        };
        for kv in std::iter::once(k).chain(legacy::kernel_variants(ty)) {
            assert_eq!(kv.act, k.act, "{ty:?}: every variant pairs with one format");
            let got = f64::from((kv.dot)(&w.bytes, &a.bytes, w.values.len()));
            assert!(
                (got - want).abs() <= 1e-5 * scale + s_slack,
                "{ty:?} {}: dot {got}, the layout says {want}",
                kv.dot_variant
            );
        }
    }
}
