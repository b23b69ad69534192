//! CPU implementations of the op graph's non-matmul ops: norms, rope (YaRN included), GLUs,
//! residual add, soft-cap, MoE routing and attention (with sinks) over an f16 or Q8_0 KV cache
//! ([`KvType`]).
//!
//! All activations are f32 row-major `[rows, cols]`. Reductions accumulate in f32 (attention scores
//! and softmax too), matching what the GPU kernels do.
//!
//! One submodule per concern, its public items re-exported here: `norm` (RMS norms), `rope`
//! (rotary embedding and the KV context shift), `act` (exp, activations, GLU, add, soft-cap,
//! softmax), `route` (MoE routing) and `attention`. This module keeps what they share: the row
//! count at which row-wise ops go parallel, the `multiversion!` macro and the CPU's SIMD level.

pub use crate::kv::KvType;
pub use act::{add_inplace, exp_f32, gelu_tanh, glu, silu, softcap, softmax, swiglu_oai};
pub use attention::{attention, AttnParams, KvView};
pub use norm::{head_rms_norm, rms_norm, rms_norm_inplace};
pub use rope::{kv_shift, rope, rope_heads, Rope, RopePairing, ShiftRun};
pub use route::route;

/// Rows at or above which the row-wise ops go parallel (below, thread hand-off costs more).
const PAR_ROWS: usize = 16;

/// `fn $name(args)` running `$body(args)` compiled for the best SIMD level of this CPU (up to
/// [`crate::quant::simd_cap`]): `$body` (`#[inline(always)]`) is inlined into a function with
/// those target features. For loops whose operations give the same bits at every vector width
/// (no fused multiply-adds unless written, no reordered sums). A generic trampoline taking a
/// closure was not enough: the closure stayed out of line, in SSE2.
macro_rules! multiversion {
    ($(#[$m:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) => $body:ident) => {
        $(#[$m])*
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                fn avx512($($arg: $ty),*) {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) {
                    $body($($arg),*)
                }
                match $crate::ops::simd_level() {
                    // SAFETY: simd_level checked that the CPU has these features.
                    crate::quant::SimdLevel::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    crate::quant::SimdLevel::Avx2 => return unsafe { avx2($($arg),*) },
                    crate::quant::SimdLevel::Scalar => {}
                }
            }
            $body($($arg),*)
        }
    };
}

// After the macro: `macro_rules!` is in scope only below its definition.
mod act;
mod attention;
mod norm;
mod rope;
mod route;

/// The best SIMD level of this CPU, capped by [`crate::quant::simd_cap`].
fn simd_level() -> crate::quant::SimdLevel {
    use crate::quant::SimdLevel;
    match crate::quant::simd_cap() {
        SimdLevel::Avx512 if is_avx512() => SimdLevel::Avx512,
        SimdLevel::Avx512 | SimdLevel::Avx2 if is_avx2() => SimdLevel::Avx2,
        _ => SimdLevel::Scalar,
    }
}

#[cfg(target_arch = "x86_64")]
fn is_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f") && is_avx2()
}

#[cfg(target_arch = "x86_64")]
fn is_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

#[cfg(not(target_arch = "x86_64"))]
fn is_avx512() -> bool {
    false
}

#[cfg(not(target_arch = "x86_64"))]
fn is_avx2() -> bool {
    false
}
