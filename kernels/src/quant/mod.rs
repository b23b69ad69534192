//! Quant block formats: dequantize, reference quantize, and dot products against activations
//! quantized to each type's partner format. One file per block family.
//!
//! Weight rows are read in the GGUF block layout exactly as they lie in the file.

use pshard_model::ggml_type::GgmlType;

pub mod act;
pub mod float;
pub mod kquants;
pub mod legacy;

/// The format activations are converted to before dotting with a weight type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActFormat {
    /// Plain f32 values (F32/F16/BF16 weights).
    F32,
    /// Q8_0 blocks of 32 (Q4_0, Q5_0, Q8_0 weights).
    Q8_0,
    /// Q8_1 blocks of 32 with block sums (Q4_1, Q5_1 weights).
    Q8_1,
    /// Q8_K blocks of 256 with 16-element sums (K-quants).
    Q8K,
}

/// Dot product of one weight row (`n` elements, GGUF blocks) with one activation row in the
/// kernel's [`ActFormat`].
pub type DotFn = fn(weight_row: &[u8], act_row: &[u8], n: usize) -> f32;

/// Everything the engine needs to compute with one weight type on the CPU.
#[derive(Clone, Copy, Debug)]
pub struct QuantKernel {
    /// The weight type.
    pub ty: GgmlType,
    /// Partner format of activations.
    pub act: ActFormat,
    /// Dequantizes `dst.len()` elements (whole blocks) from `src`.
    pub dequantize_row: fn(src: &[u8], dst: &mut [f32]),
    /// Reference quantizer: `src.len()` elements (whole blocks) into `dst`.
    pub quantize_row: fn(src: &[f32], dst: &mut [u8]),
    /// Dot product, the fastest variant this CPU supports (picked once at run time).
    pub dot: DotFn,
    /// Name of the chosen dot variant (e.g. `"avx2"`, `"scalar"`), for reports.
    pub dot_variant: &'static str,
}

/// The kernel for a weight type, with the best SIMD variant for this CPU; `None` if the CPU engine
/// cannot compute with the type.
pub fn kernel(ty: GgmlType) -> Option<QuantKernel> {
    match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => Some(float::kernel(ty)),
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
            Some(legacy::kernel(ty))
        }
        GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => {
            Some(kquants::kernel(ty))
        }
        _ => None,
    }
}

/// The portable scalar kernel for a type (tests compare SIMD variants against it).
pub fn scalar_kernel(ty: GgmlType) -> Option<QuantKernel> {
    match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => Some(float::scalar_kernel(ty)),
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
            Some(legacy::scalar_kernel(ty))
        }
        GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => {
            Some(kquants::scalar_kernel(ty))
        }
        _ => None,
    }
}

/// Types the CPU engine computes with.
pub const SUPPORTED: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];
