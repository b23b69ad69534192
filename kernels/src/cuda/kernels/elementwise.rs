//! Elementwise ops (GLU, add, bias, soft-cap, scale, conversions) and row selection.

use super::{blocks, CudaKernels};
use crate::cuda::error::CudaResult;
use cudarc::driver::CudaStream;
use pshard_model::graph::{Activation, SWIGLU_OAI_ALPHA, SWIGLU_OAI_LIMIT};

impl CudaKernels {
    /// `out = act(gate, up)` over `n` values.
    pub fn glu(
        &self,
        gate: u64,
        up: u64,
        out: u64,
        n: usize,
        act: Activation,
        s: &CudaStream,
    ) -> CudaResult<()> {
        let code = match act {
            Activation::Silu => 0i32,
            Activation::GeluTanh => 1,
            Activation::SwigluOai => 2,
        };
        self.k().glu(
            (blocks(n, 256), 1, 1),
            256,
            0,
            s,
            gate,
            up,
            out,
            n as i64,
            code,
            SWIGLU_OAI_ALPHA,
            SWIGLU_OAI_LIMIT,
        )
    }

    /// `out = a + b` over `n` values.
    pub fn add(&self, a: u64, b: u64, out: u64, n: usize, s: &CudaStream) -> CudaResult<()> {
        self.k()
            .add((blocks(n, 256), 1, 1), 256, 0, s, a, b, out, n as i64)
    }

    /// `y[t, r] += bias[r]` for `n` rows of `cols` values (row stride `ldy`).
    pub fn add_bias(
        &self,
        y: u64,
        bias: u64,
        n: usize,
        cols: usize,
        ldy: usize,
        s: &CudaStream,
    ) -> CudaResult<()> {
        let total = n * cols;
        self.k().add_bias(
            (blocks(total, 256), 1, 1),
            256,
            0,
            s,
            y,
            bias,
            cols as i32,
            ldy as i32,
            total as i64,
        )
    }

    /// `x = cap · tanh(x / cap)` in place.
    pub fn softcap(&self, x: u64, n: usize, cap: f32, s: &CudaStream) -> CudaResult<()> {
        self.k()
            .softcap((blocks(n, 256), 1, 1), 256, 0, s, x, n as i64, cap)
    }

    /// `x *= k` in place.
    pub fn scale(&self, x: u64, n: usize, k: f32, s: &CudaStream) -> CudaResult<()> {
        self.k()
            .scale((blocks(n, 256), 1, 1), 256, 0, s, x, n as i64, k)
    }

    /// f32 → f16 conversion of `n` values.
    pub fn f32_to_f16(&self, x: u64, y: u64, n: usize, s: &CudaStream) -> CudaResult<()> {
        self.k()
            .f32_to_f16((blocks(n, 256), 1, 1), 256, 0, s, x, y, n as i64)
    }

    /// f32 → bf16 conversion of `n` values.
    pub fn f32_to_bf16(&self, x: u64, y: u64, n: usize, s: &CudaStream) -> CudaResult<()> {
        self.k()
            .f32_to_bf16((blocks(n, 256), 1, 1), 256, 0, s, x, y, n as i64)
    }

    /// `out[i] = x[rows[i]]` for `n` rows (rows: i32 on the device).
    pub fn select_rows(
        &self,
        x: u64,
        rows: u64,
        out: u64,
        n: usize,
        cols: usize,
        s: &CudaStream,
    ) -> CudaResult<()> {
        self.k().select_rows(
            (blocks(cols, 256), n as u32, 1),
            256,
            0,
            s,
            x,
            rows,
            out,
            cols as i32,
        )
    }
}
