//! The compiled kernels and their launchers. Every launcher takes device addresses (`u64`) and
//! the stream to enqueue on; shapes are checked here so a bad call is an error, not a fault.
//!
//! One file per concern, each with its own `impl CudaKernels`:
//! - `launch`: module loading, kernel lookup by name, `cuLaunchKernel`.
//! - `launchers`: one typed launcher per `.cu` kernel, its parameters those of the kernel's
//!   signature (a test parses the sources and compares them).
//! - `gemv`: dequantization, the fused GEMV and its int8 activation scratch, embedding lookup.
//! - `mmq`: the int8 tensor-core matmul of quantized weights for batches of tokens.
//! - `moe`: routing, the sort by expert, expert GEMV and grouped GEMM, combine.
//! - `attention`: flash, split-KV and latent attention.
//! - `rope`, `norm`, `kv` (cache writes and shifts), `elementwise`.

// Launchers mirror their kernels' parameter lists (device addresses, shapes, strides, stream).
#![allow(clippy::too_many_arguments)]

mod attention;
mod elementwise;
mod gemv;
mod kv;
mod launch;
mod launchers;
mod mmq;
mod moe;
mod norm;
mod rope;

pub use attention::{
    attention_scratch, AttnParams, KvCells, ATTN_MAX_SPLITS, ATTN_SPLIT_MAX_ROWS, ATTN_SPLIT_TILE,
};
pub use gemv::{
    QuantizedActsDev, ACT_SCRATCH_BYTES, GEMV_MAX_COLS, GEMV_MAX_NB, GEMV_SPLITK_MAX_ROWS,
    ZERO_SEQS,
};
pub use launch::KArg;
pub use mmq::{mmq_supported, MmqTile, MMQ_SCRATCH_COLS, MMQ_TILE_ENV};
pub use moe::{MOE_GEMM_BN, MOE_MAX_EXPERTS, MOE_ROUTE_FREE};
pub use rope::{RopeArgs, RopeKind, RopeYarnArg};

use super::error::{CudaError, CudaResult};
use super::nvrtc::ModuleBuild;
use crate::kv::KvType;
use cudarc::driver::{CudaFunction, CudaModule};
use gemv::ActScratch;
use pshard_model::ggml_type::GgmlType;
use std::collections::HashMap;
use std::sync::Arc;

/// Block geometry of a weight type as the CUDA decoders see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TypeGeom {
    /// Kernel name suffix, e.g. `"q4_k"`.
    pub suffix: &'static str,
    /// Elements per (pseudo-)block.
    pub qk: usize,
    /// Bytes per (pseudo-)block.
    pub bytes: usize,
    /// 8-value units per block.
    pub units: usize,
}

/// The geometry of a weight type, or `None` if the CUDA kernels cannot read it.
pub fn type_geom(ty: GgmlType) -> Option<TypeGeom> {
    let g = |suffix, qk, bytes| {
        Some(TypeGeom {
            suffix,
            qk,
            bytes,
            units: qk / 8,
        })
    };
    match ty {
        GgmlType::F32 => g("f32", 8, 32),
        GgmlType::F16 => g("f16", 8, 16),
        GgmlType::BF16 => g("bf16", 8, 16),
        GgmlType::Q4_0 => g("q4_0", 32, 18),
        GgmlType::Q4_1 => g("q4_1", 32, 20),
        GgmlType::Q5_0 => g("q5_0", 32, 22),
        GgmlType::Q5_1 => g("q5_1", 32, 24),
        GgmlType::Q8_0 => g("q8_0", 32, 34),
        GgmlType::Q2_K => g("q2_k", 256, 84),
        GgmlType::Q3_K => g("q3_k", 256, 110),
        GgmlType::Q4_K => g("q4_k", 256, 144),
        GgmlType::Q5_K => g("q5_k", 256, 176),
        GgmlType::Q6_K => g("q6_k", 256, 210),
        GgmlType::IQ4_NL => g("iq4_nl", 32, 18),
        GgmlType::IQ4_XS => g("iq4_xs", 256, 136),
        GgmlType::MXFP4 => g("mxfp4", 32, 17),
        _ => None,
    }
}

/// Weight types the CUDA kernels read.
pub const CUDA_TYPES: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::IQ4_NL,
    GgmlType::IQ4_XS,
    GgmlType::MXFP4,
];

fn geom(ty: GgmlType, cols: usize) -> CudaResult<TypeGeom> {
    let g = type_geom(ty).ok_or_else(|| {
        CudaError::Invalid(format!(
            "the CUDA backend cannot compute with {ty:?} weights"
        ))
    })?;
    if !cols.is_multiple_of(g.qk) {
        return Err(CudaError::Invalid(format!(
            "a {ty:?} row of {cols} columns is not a whole number of {}-element blocks",
            g.qk
        )));
    }
    Ok(g)
}

/// Bytes of one weight row of `cols` elements.
pub fn row_bytes(ty: GgmlType, cols: usize) -> CudaResult<usize> {
    let g = geom(ty, cols)?;
    Ok(cols / g.qk * g.bytes)
}

/// The loaded kernels.
pub struct CudaKernels {
    funcs: HashMap<String, CudaFunction>,
    _modules: Vec<Arc<CudaModule>>,
    builds: Vec<ModuleBuild>,
    smem_optin: i32,
    sm_count: i32,
    acts: ActScratch,
    /// Launch the int8 GEMV as a programmatic dependent of its quantizer (compute capability 9.0
    /// and up; `PSHARD_GEMV_PDL=0` turns it off).
    pdl: bool,
}

impl std::fmt::Debug for CudaKernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaKernels")
            .field("builds", &self.builds)
            .finish_non_exhaustive()
    }
}

/// Refuses Q8_0 KV dims that are not whole 32-value blocks (`(what, values)` pairs).
fn check_q8_0_dims(dims: &[(&str, usize)]) -> CudaResult<()> {
    KvType::Q8_0.check_dims(dims).map_err(CudaError::Invalid)
}

fn blocks(n: usize, per: usize) -> u32 {
    n.div_ceil(per).max(1) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_matches_ggml_table() {
        for &t in CUDA_TYPES {
            let g = type_geom(t).unwrap();
            let (bs, bb) = (t.block_size() as usize, t.type_size() as usize);
            // Float types use 8-element pseudo-blocks.
            assert_eq!(g.bytes * bs, bb * g.qk, "{t:?}");
        }
    }
}
