//! Rotary embeddings: the launch arguments (`RopeP`), rope in place and between buffers, q/k
//! norm + rope in one launch, latent attention's K rows.

use super::{blocks, CudaKernels};
use crate::cuda::error::{CudaError, CudaResult};
use cudarc::driver::CudaStream;

/// YaRN parameters of a rope launch, as the kernels' `RopeYarn` struct takes them by value (see
/// [`pshard_model::graph::RopeYarn`]); [`RopeYarnArg::NONE`] is plain rope.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeYarnArg {
    /// First pair of the ramp.
    pub low: f32,
    /// Last pair of the ramp.
    pub high: f32,
    /// Weight of the ramp (0: no YaRN).
    pub ext: f32,
    /// Multiplier of the rotated values.
    pub mscale: f32,
}

impl RopeYarnArg {
    /// No YaRN.
    pub const NONE: RopeYarnArg = RopeYarnArg {
        low: 0.0,
        high: 0.0,
        ext: 0.0,
        mscale: 1.0,
    };

    /// The launch argument of a graph rope's YaRN (none: [`Self::NONE`]).
    pub fn of(y: Option<pshard_model::graph::RopeYarn>) -> RopeYarnArg {
        y.map_or(Self::NONE, |y| RopeYarnArg {
            low: y.low,
            high: y.high,
            ext: y.ext_factor,
            mscale: y.mscale,
        })
    }
}

/// Rotary pairing mode as the kernel encodes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeKind {
    /// (2i, 2i+1).
    Adjacent,
    /// (i, i + n_dims/2).
    Neox,
}

/// Rotary embedding parameters of a launch (see [`CudaKernels::qk_norm_rope`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeArgs {
    /// Head dimension.
    pub head_dim: usize,
    /// Rotated dimensions (`<= head_dim`, even).
    pub n_dims: usize,
    /// Pairing mode.
    pub mode: RopeKind,
    /// Frequency base.
    pub base: f32,
    /// Position scale (1 / linear scaling factor).
    pub pos_scale: f32,
    /// Per-pair frequency divisors (llama3 scaling), f32 on the device.
    pub freq_factors: Option<u64>,
    /// YaRN.
    pub yarn: RopeYarnArg,
}

/// A rope launch's parameters as the kernels' `RopeP` struct takes them by value (same field
/// order and layout).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(super) struct RopeKArg {
    n_dims: i32,
    mode: i32,
    base: f32,
    pos_scale: f32,
    freq_factors: u64,
    yarn: RopeYarnArg,
}

impl RopeArgs {
    /// The launch argument, after checking the rotated dimensions (even, at most `head_dim`).
    pub(super) fn karg(&self) -> CudaResult<RopeKArg> {
        if self.n_dims > self.head_dim || !self.n_dims.is_multiple_of(2) {
            return Err(CudaError::Invalid(format!(
                "rope over {} of {} dims",
                self.n_dims, self.head_dim
            )));
        }
        Ok(RopeKArg {
            n_dims: self.n_dims as i32,
            mode: match self.mode {
                RopeKind::Adjacent => 0,
                RopeKind::Neox => 1,
            },
            base: self.base,
            pos_scale: self.pos_scale,
            freq_factors: self.freq_factors.unwrap_or(0),
            yarn: self.yarn,
        })
    }
}

impl CudaKernels {
    /// The q and k heads of a batch in one launch (`q`: `n_tokens × n_q` heads, `k`: `n_tokens ×
    /// n_k` heads of `rope.head_dim`): each head optionally RMS-normed with its weights (`norm` =
    /// (q weights, k weights, eps)), then rotated as [`Self::rope`] does — the same arithmetic as
    /// [`Self::head_rms_norm`] followed by [`Self::rope`] on q and on k, in one launch instead of
    /// up to four.
    #[allow(clippy::too_many_arguments)]
    pub fn qk_norm_rope(
        &self,
        q: u64,
        k: u64,
        norm: Option<(u64, u64, f32)>,
        pos: u64,
        n_tokens: usize,
        n_q: usize,
        n_k: usize,
        rope: &RopeArgs,
        s: &CudaStream,
    ) -> CudaResult<()> {
        let r = rope.karg()?;
        let heads = n_tokens * (n_q + n_k);
        if heads > i32::MAX as usize {
            return Err(CudaError::Invalid(format!("{heads} heads are too many")));
        }
        let (qw, kw, eps) = norm.unwrap_or((0, 0, 0.0));
        self.k().qk_norm_rope(
            (blocks(heads, 8), 1, 1),
            256,
            0,
            s,
            q,
            k,
            qw,
            kw,
            eps,
            pos,
            n_tokens as i32,
            n_q as i32,
            n_k as i32,
            rope.head_dim as i32,
            r,
        )
    }

    /// Rotary embedding in place of `n_tokens` rows of `n_heads` heads of `rope.head_dim`;
    /// positions are i32 on the device.
    pub fn rope(
        &self,
        x: u64,
        pos: u64,
        n_tokens: usize,
        n_heads: usize,
        rope: &RopeArgs,
        s: &CudaStream,
    ) -> CudaResult<()> {
        let r = rope.karg()?;
        let total = n_tokens * n_heads * rope.n_dims / 2;
        self.k().rope(
            (blocks(total, 256), 1, 1),
            256,
            0,
            s,
            x,
            pos,
            n_tokens as i32,
            n_heads as i32,
            rope.head_dim as i32,
            r,
        )
    }

    /// Rope of `n_heads` heads per row from `src` into `dst` (see `rope_heads` in ops.cu): head
    /// `h` of row `t` reads `src[t·ld_src + h·src_stride + src_off ..][..n_dims]`, writes `dst`
    /// likewise. `rope.head_dim` bounds `n_dims` as usual.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_heads(
        &self,
        (src, ld_src, src_stride, src_off): (u64, usize, usize, usize),
        (dst, ld_dst, dst_stride, dst_off): (u64, usize, usize, usize),
        n_heads: usize,
        pos: u64,
        n_tokens: usize,
        rope: &RopeArgs,
        s: &CudaStream,
    ) -> CudaResult<()> {
        let r = rope.karg()?;
        let total = n_tokens * n_heads * rope.n_dims / 2;
        let i = |v: usize| v as i32;
        self.k().rope_heads(
            (blocks(total, 256), 1, 1),
            256,
            0,
            s,
            src,
            i(ld_src),
            i(src_stride),
            i(src_off),
            dst,
            i(ld_dst),
            i(dst_stride),
            i(dst_off),
            i(n_heads),
            pos,
            i(n_tokens),
            r,
        )
    }

    /// Latent attention's K rows of `n` tokens: `out[..kv_lora]` = RMS-normed `x[..kv_lora]` times
    /// `w`, `out[kv_lora..][..n_dims]` = `x[kv_lora..]` roped (`x`, `out`: row strides `ldx`,
    /// `ldo`).
    #[allow(clippy::too_many_arguments)]
    pub fn mla_kv(
        &self,
        (x, ldx): (u64, usize),
        w: u64,
        (out, ldo): (u64, usize),
        kv_lora: usize,
        eps: f32,
        pos: u64,
        n: usize,
        rope: &RopeArgs,
        s: &CudaStream,
    ) -> CudaResult<()> {
        let r = rope.karg()?;
        self.k().mla_kv(
            (n as u32, 1, 1),
            256,
            0,
            s,
            x,
            ldx as i32,
            w,
            out,
            ldo as i32,
            kv_lora as i32,
            eps,
            pos,
            r,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `RopeKArg` is copied byte for byte into ops.cu's `RopeP`: four 4-byte fields, the
    /// 8-byte pointer at 16, the four YaRN floats at 24.
    #[test]
    fn rope_argument_layout_matches_the_kernels_struct() {
        use std::mem::{align_of, offset_of, size_of};
        assert_eq!(offset_of!(RopeKArg, pos_scale), 12);
        assert_eq!(offset_of!(RopeKArg, freq_factors), 16);
        assert_eq!(offset_of!(RopeKArg, yarn), 24);
        assert_eq!((size_of::<RopeKArg>(), align_of::<RopeKArg>()), (40, 8));
        let src = include_str!("../../../cuda/ops.cu");
        let body = src
            .split("struct RopeP {")
            .nth(1)
            .and_then(|t| t.split("};").next())
            .expect("RopeP in ops.cu");
        let fields: Vec<&str> = body
            .split(';')
            .map(str::trim)
            .filter(|f| !f.is_empty())
            .collect();
        assert_eq!(
            fields,
            [
                "int n_dims",
                "int mode",
                "float base",
                "float pos_scale",
                "const float* freq_factors",
                "RopeYarn y"
            ]
        );
    }
}
