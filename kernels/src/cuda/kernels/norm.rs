//! RMS norms of rows and of heads.

use super::{blocks, CudaKernels};
use crate::cuda::error::CudaResult;
use cudarc::driver::CudaStream;

impl CudaKernels {
    /// `y = x / rms(x) · w` per row (`w`: f32, `cols` long).
    pub fn rms_norm(
        &self,
        x: u64,
        w: u64,
        y: u64,
        rows: usize,
        cols: usize,
        eps: f32,
        s: &CudaStream,
    ) -> CudaResult<()> {
        let threads = if cols >= 1024 {
            1024
        } else {
            cols.div_ceil(32).max(1) * 32
        } as u32;
        self.k().rms_norm(
            (rows as u32, 1, 1),
            threads,
            0,
            s,
            x,
            w,
            y,
            cols as i32,
            eps,
        )
    }

    /// In-place RMS norm of each `head_dim` slice (`rows × n_heads` slices).
    pub fn head_rms_norm(
        &self,
        x: u64,
        w: u64,
        rows: usize,
        n_heads: usize,
        head_dim: usize,
        eps: f32,
        s: &CudaStream,
    ) -> CudaResult<()> {
        let total = rows * n_heads;
        self.k().head_rms_norm(
            (blocks(total, 8), 1, 1),
            256,
            0,
            s,
            x,
            w,
            total as i32,
            head_dim as i32,
            eps,
        )
    }
}
