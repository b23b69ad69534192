//! Quant block formats: dequantize, reference quantize, the int8 GEMM's converters and the
//! reference dot products against activations quantized to each type's partner format. One file
//! per block family.
//!
//! Weight rows are read in the GGUF block layout exactly as they lie in the file.

use std::sync::OnceLock;

use pshard_model::ggml_type::GgmlType;

pub mod act;
pub mod exact;
pub mod float;
pub mod kquants;
pub mod legacy;
pub mod lut4;

/// The format activations are converted to before dotting with a weight type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActFormat {
    /// Plain f32 values (F32/F16/BF16 weights).
    F32,
    /// Q8_0 blocks of 32 (Q4_0, Q5_0, Q8_0, IQ4_NL, MXFP4 weights).
    Q8_0,
    /// Q8_1 blocks of 32 with block sums (Q4_1, Q5_1 weights).
    Q8_1,
    /// Q8_K blocks of 256 with 16-element sums (K-quants, IQ4_XS).
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
    /// Dot product of one weight row with one activation row: for the float types the f32 dot
    /// of the best level this CPU runs (every level gives the same bits); for the quantized types
    /// the portable reference of the matmul's arithmetic ([`crate::gemm::dot_row`]; matmuls run
    /// the int8 GEMM).
    pub dot: DotFn,
    /// Name of the dot variant (`"avx512"`, `"avx2"`, `"scalar"`), for reports.
    pub dot_variant: &'static str,
}

/// The kernel for a weight type, with the best SIMD variant for this CPU up to [`simd_cap`];
/// `None` if the CPU engine cannot compute with the type.
pub fn kernel(ty: GgmlType) -> Option<QuantKernel> {
    let cap = simd_cap();
    if cap != SimdLevel::Avx512 {
        static CAPPED: OnceLock<Vec<QuantKernel>> = OnceLock::new();
        let table = CAPPED.get_or_init(|| {
            SUPPORTED
                .iter()
                .filter_map(|&t| kernel_at(t, cap))
                .collect()
        });
        return table.iter().find(|k| k.ty == ty).copied();
    }
    match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => Some(float::kernel(ty)),
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
            Some(legacy::kernel(ty))
        }
        GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => {
            Some(kquants::kernel(ty))
        }
        GgmlType::IQ4_NL | GgmlType::IQ4_XS | GgmlType::MXFP4 => Some(lut4::kernel(ty)),
        _ => None,
    }
}

/// A SIMD level of the CPU kernels (the K-quants' [`kquants::Variant`]): `Scalar` (any CPU),
/// `Avx2` (AVX2 + FMA + F16C), `Avx512` (AVX-512, with VNNI for the integer kernels).
pub use kquants::Variant as SimdLevel;

/// Environment variable capping the SIMD level of the CPU kernels: `scalar`, `avx2` or `avx512`.
pub const SIMD_CAP_ENV: &str = "PSHARD_CPU_SIMD";

/// The highest SIMD level the CPU kernels' dispatch ([`kernel`], the matmul driver's tiles, the
/// activation quantizers, the exact path's dot) may use: [`SIMD_CAP_ENV`] set to `scalar` or
/// `avx2` caps it, to measure or test a slower path on a CPU that has better; unset (or
/// `avx512`), there is no cap and each kernel uses the best its CPU runs. Read once per process;
/// an unknown value is reported on stderr and ignored.
pub fn simd_cap() -> SimdLevel {
    static CAP: OnceLock<SimdLevel> = OnceLock::new();
    *CAP.get_or_init(|| match std::env::var(SIMD_CAP_ENV) {
        Err(_) => SimdLevel::Avx512,
        Ok(v) => match v.trim().to_ascii_lowercase().as_str() {
            "scalar" => SimdLevel::Scalar,
            "avx2" => SimdLevel::Avx2,
            "avx512" | "" => SimdLevel::Avx512,
            _ => {
                eprintln!(
                    "pshard: ignoring {SIMD_CAP_ENV}={v:?} (expected scalar, avx2 or avx512)"
                );
                SimdLevel::Avx512
            }
        },
    })
}

/// The level of a kernel's dot variant, from its [`QuantKernel::dot_variant`] name.
fn level_of(variant: &str) -> SimdLevel {
    match variant {
        "scalar" => SimdLevel::Scalar,
        "avx2" => SimdLevel::Avx2,
        _ => SimdLevel::Avx512,
    }
}

/// Every kernel variant of `ty` this CPU can run, best first; empty if the CPU engine cannot
/// compute with the type.
fn variants(ty: GgmlType) -> Vec<QuantKernel> {
    match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => float::kernel_variants(ty),
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
            legacy::kernel_variants(ty)
        }
        GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => {
            kquants::kernel_variants(ty)
        }
        GgmlType::IQ4_NL | GgmlType::IQ4_XS | GgmlType::MXFP4 => lut4::kernel_variants(ty),
        _ => Vec::new(),
    }
}

/// The kernel for `ty` with the best dot variant this CPU runs at or below `level` — tests and
/// benchmarks use it to force the AVX2 or scalar path on a CPU that has better. `None` if the CPU
/// engine cannot compute with the type. (Allocates: not for hot paths; [`kernel`] caches.)
pub fn kernel_at(ty: GgmlType, level: SimdLevel) -> Option<QuantKernel> {
    variants(ty)
        .into_iter()
        .find(|k| level_of(k.dot_variant) as u8 <= level as u8)
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
        GgmlType::IQ4_NL | GgmlType::IQ4_XS | GgmlType::MXFP4 => Some(lut4::scalar_kernel(ty)),
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
    GgmlType::IQ4_NL,
    GgmlType::IQ4_XS,
    GgmlType::MXFP4,
];
