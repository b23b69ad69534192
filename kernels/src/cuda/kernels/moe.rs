//! Mixture of experts: routing, the device-side sort by expert, expert GEMV and grouped GEMM,
//! bias, gather/scatter and combine.

use super::gemv::{shape_override, ActScratch, GEMV_MAX_COLS};
use super::{blocks, geom, CudaKernels};
use crate::cuda::error::{CudaError, CudaResult};
use crate::quant::ActFormat;
use cudarc::driver::CudaStream;
use pshard_model::ggml_type::GgmlType;
use pshard_model::graph::Routing;
use pshard_model::spec::Gating;

/// The (rows per team, warps per team) variants of the int8 MoE GEMV kernels (`MOE_GEMVQ_KERNELS`
/// in gemv.cu).
pub(super) const MOE_GEMVQ_SHAPES: [(usize, usize); 3] = [(1, 1), (2, 1), (2, 4)];

/// Most experts of a MoE layer the device-side sort handles (`moe_route`'s limit too).
pub const MOE_MAX_EXPERTS: usize = 1024;

/// The first id of a token's row in [`CudaKernels::moe_route`]'s forced-expert table when the
/// token routes by its router (`ROUTE_FREE` in ops.cu).
pub const MOE_ROUTE_FREE: u32 = u32::MAX;

/// The (BM weight rows, BN tokens, threads) tiles of the grouped expert GEMM
/// (`MOE_GEMM_KERNELS` in moe_gemm.cu).
pub(super) const MOE_GEMM_TILES: [(usize, usize, u32); 2] = [(64, 64, 128), (128, 64, 256)];

/// Rows per token tile of the grouped expert GEMM (`MG_BN` in moe_gemm.cu): [`CudaKernels::moe_sort`]
/// numbers each expert's tiles of this many rows.
pub const MOE_GEMM_BN: usize = 64;

/// Dynamic shared memory of a grouped expert GEMM tile: the f16 weight and activation tiles,
/// 256 columns padded to 264 (`MG_LD` in moe_gemm.cu).
pub(super) fn moe_gemm_smem(bm: usize, bn: usize) -> usize {
    (bm + bn) * 264 * 2
}

impl CudaKernels {
    /// MoE expert GEMV over `n_pairs` (token, slot) pairs: `y[p] = W_e · x[p / x_div]` where pair
    /// `p = token · n_used + slot` uses expert `e = route[token][slot]` (route rows on the device:
    /// `n_used` i32 expert ids, then `n_used` f32 weights) and `W_e` is the `rows × cols` matrix
    /// of expert `e` in the stacked tensor at `w`. `x_div = n_used`: one input row per token,
    /// shared by its experts (gate, up); `1`: one input row per pair (down).
    ///
    /// Quantized experts: the input rows are quantized once to the type's partner format (as the
    /// CPU engine does) in the kernels' scratch, then one int8 GEMV launch covers all pairs
    /// (`moe_gemvq_*` in gemv.cu), each pair reading its expert id from the route on the device.
    /// Float experts use the f32 GEMV (`moe_gemv_*` in matmul.cu). Nothing waits for the host,
    /// so the call can be captured in a CUDA graph.
    #[allow(clippy::too_many_arguments)]
    pub fn moe_gemv(
        &self,
        ty: GgmlType,
        w: u64,
        rows: usize,
        cols: usize,
        x: u64,
        ldx: usize,
        x_div: usize,
        route: u64,
        n_used: usize,
        n_pairs: usize,
        y: u64,
        ldy: usize,
        s: &CudaStream,
    ) -> CudaResult<()> {
        let g = geom(ty, cols)?;
        if n_used == 0 || x_div == 0 {
            return Err(CudaError::Invalid(format!(
                "MoE GEMV with {n_used} experts per token and {x_div} pairs per input row"
            )));
        }
        if rows == 0 || n_pairs == 0 {
            return Ok(());
        }
        if !x.is_multiple_of(16) || !ldx.is_multiple_of(4) {
            return Err(CudaError::Invalid(format!(
                "MoE GEMV activations must be 16-byte aligned with a row stride that is a multiple of 4 (address {x:#x}, stride {ldx})"
            )));
        }
        let rb = (cols / g.qk * g.bytes) as i64;
        let eb = rb * rows as i64;
        let (rows_i, cols_i, ldx_i, ldy_i) = (rows as i32, cols as i32, ldx as i32, ldy as i32);
        let (x_div_i, n_used_i) = (x_div as i32, n_used as i32);
        match crate::quant::kernel(ty).map(|k| k.act) {
            Some(format) if format != ActFormat::F32 => {
                if cols > GEMV_MAX_COLS {
                    return Err(CudaError::Invalid(format!(
                        "MoE GEMV rows of {cols} columns exceed the int8 scratch's {GEMV_MAX_COLS}"
                    )));
                }
                let (r, tw) = self.moe_gemv_shape(ty, cols);
                // Input rows that fit the scratch; a launch of c pairs from p0 spans at most
                // (c - 1) / x_div + 1 of them.
                let max_rows = (ActScratch::Q_BYTES as usize / cols).min(65535);
                let max_chunk = ((max_rows - 1) * x_div + 1).min(65535);
                let mut p0 = 0;
                while p0 < n_pairs {
                    let chunk = max_chunk.min(n_pairs - p0);
                    let (r0, r1) = (p0 / x_div, (p0 + chunk - 1) / x_div);
                    let a = self.quantize_rows(
                        format,
                        x + (r0 * ldx * 4) as u64,
                        ldx,
                        cols,
                        r1 - r0 + 1,
                        s,
                    )?;
                    let yo = y + (p0 * ldy * 4) as u64;
                    let p0_i = p0 as i32;
                    self.k().moe_gemvq(
                        g.suffix,
                        r,
                        tw,
                        (blocks(rows, 4 * r / tw), chunk as u32, 1),
                        128,
                        0,
                        s,
                        w,
                        eb,
                        rb,
                        rows_i,
                        cols_i,
                        a.q,
                        a.d,
                        a.bs,
                        p0_i,
                        x_div_i,
                        route,
                        n_used_i,
                        yo,
                        ldy_i,
                    )?;
                    p0 += chunk;
                }
            }
            _ => {
                let mut p0 = 0;
                while p0 < n_pairs {
                    // grid.y is limited to 65535: launch in chunks of whole tokens (and of whole
                    // input rows).
                    let unit = n_used * x_div;
                    let chunk = (65535 / unit * unit).max(unit).min(n_pairs - p0);
                    let xo = x + ((p0 / x_div) * ldx * 4) as u64;
                    let ro = route + ((p0 / n_used) * 2 * n_used * 4) as u64;
                    let yo = y + (p0 * ldy * 4) as u64;
                    self.k().moe_gemv(
                        g.suffix,
                        (blocks(rows, 4), chunk as u32, 1),
                        128,
                        0,
                        s,
                        w,
                        eb,
                        rb,
                        rows_i,
                        cols_i,
                        xo,
                        ldx_i,
                        x_div_i,
                        ro,
                        n_used_i,
                        yo,
                        ldy_i,
                    )?;
                    p0 += chunk;
                }
            }
        }
        Ok(())
    }

    /// Shape of the int8 MoE GEMV of `ty` on rows of `cols` columns: (R weight rows per team, TW
    /// warps per team); `PSHARD_MOE_RW` = "R,TW" overrides (benchmarks).
    ///
    /// Measured on the H200 (2026-11-21, qwen3-30b-a3b experts, CUDA graphs, 8 and 32 pairs):
    /// two rows per warp is the best everywhere on 768 × 2048 and 2048 × 768 experts (Q4_K gate
    /// 1.35 / 2.07 TB/s at 1 / 4 tokens, down 1.08 / 1.40; Q6_K down 1.25 / 1.64; one row per
    /// warp 15-25 % slower; teams of four warps up to 2.3× slower on Q4_K, level with one warp on
    /// Q8_0 rows of 256 chunks at 1 token and 12 % slower at 4). Rows of 512+ chunks (4+ per
    /// thread of a team; not measured on experts) use teams of four warps as the dense GEMV does.
    fn moe_gemv_shape(&self, ty: GgmlType, cols: usize) -> (usize, usize) {
        if let Some(v) = shape_override("PSHARD_MOE_RW", &MOE_GEMVQ_SHAPES) {
            return v;
        }
        // Chunks per row (`CH` of each dot type in gemv.cu).
        let chunks = match ty {
            GgmlType::Q8_0 => cols / 32 * 4,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 => cols / 32 * 2,
            GgmlType::Q2_K | GgmlType::Q3_K => cols / 256 * 4,
            _ => cols / 256 * 8,
        };
        if chunks >= 512 {
            (2, 4)
        } else {
            (2, 1)
        }
    }

    /// Routes every pair of `n` tokens × `n_heads` heads to its head (the route rows
    /// [`Self::moe_gemv`] and [`Self::moe_sort`] read), for per-head matmuls.
    pub fn head_route(
        &self,
        route: u64,
        n: usize,
        n_heads: usize,
        s: &CudaStream,
    ) -> CudaResult<()> {
        self.k().head_route(
            (blocks(n * 2 * n_heads, 256), 1, 1),
            256,
            0,
            s,
            route,
            n as i32,
            n_heads as i32,
        )
    }

    /// MoE routing of `n` tokens as [`Routing`] says (gating, group limit, top `n_used`,
    /// renormalisation, scale), choosing by the gated values plus `select_bias` (f32 per expert)
    /// when given. `forced`: a table of `n × n_used` u32 expert ids on the device; a token whose
    /// row does not start with [`MOE_ROUTE_FREE`] takes those experts (each below `n_expert`:
    /// the caller checks, the kernel reads their logits unchecked) instead of choosing, weighted
    /// by the same gating, renormalisation and scale.
    #[allow(clippy::too_many_arguments)]
    pub fn moe_route(
        &self,
        logits: u64,
        n: usize,
        r: &Routing,
        select_bias: Option<u64>,
        forced: Option<u64>,
        route: u64,
        s: &CudaStream,
    ) -> CudaResult<()> {
        let (n_expert, n_used) = (r.n_expert, r.n_used);
        let (groups, groups_used) = if r.groups.0 > 1 { r.groups } else { (0, 0) };
        if n_expert > MOE_MAX_EXPERTS
            || n_used == 0
            || n_used > n_expert
            || groups > 32
            || (groups > 1 && (!n_expert.is_multiple_of(groups) || groups_used == 0))
        {
            return Err(CudaError::Invalid(format!(
                "MoE routing of {n_used} of {n_expert} experts in {groups} groups ({groups_used} used) is not supported"
            )));
        }
        let gating = match r.gating {
            Gating::Softmax => 0i32,
            Gating::Sigmoid => 1,
            Gating::SoftmaxAfterTopK => 2,
        };
        self.k().moe_route(
            (blocks(n, 8), 1, 1),
            256,
            0,
            s,
            logits,
            n as i32,
            n_expert as i32,
            n_used as i32,
            gating,
            select_bias.unwrap_or(0),
            groups as i32,
            groups_used as i32,
            r.normalize as i32,
            r.scale,
            forced.unwrap_or(0),
            route,
        )
    }

    /// Adds each row's expert bias (`bias`: `cols` f32 per expert) to `n` expert FFN rows of
    /// `h` (row stride `ldh`); row `i` is pair `order[i]` (sorted rows) or `i` (pair order).
    #[allow(clippy::too_many_arguments)]
    pub fn moe_add_bias(
        &self,
        h: u64,
        ldh: usize,
        route: u64,
        n_used: usize,
        order: Option<u64>,
        bias: u64,
        n: usize,
        cols: usize,
        s: &CudaStream,
    ) -> CudaResult<()> {
        let mut r0 = 0;
        while r0 < n {
            let c = (n - r0).min(65535);
            let ho = h + (r0 * ldh * 4) as u64;
            let oo = order.map_or(0, |o| o + (r0 * 4) as u64);
            self.k().moe_add_bias(
                (blocks(cols, 256), c as u32, 1),
                256,
                0,
                s,
                ho,
                ldh as i32,
                route,
                n_used as i32,
                oo,
                r0 as i32,
                bias,
                cols as i32,
            )?;
            r0 += c;
        }
        Ok(())
    }

    /// `out[t] = Σ_s w[t,s] · h[t·n_used + s]`.
    pub fn moe_combine(
        &self,
        h: u64,
        route: u64,
        n_used: usize,
        out: u64,
        n: usize,
        cols: usize,
        s: &CudaStream,
    ) -> CudaResult<()> {
        self.k().moe_combine(
            (blocks(cols, 256), n as u32, 1),
            256,
            0,
            s,
            h,
            route,
            n_used as i32,
            out,
            cols as i32,
        )
    }

    /// `out[i] = f16(x[rows[i] / x_div][..cols])` for `n` rows (`x`: row stride `ldx`).
    #[allow(clippy::too_many_arguments)]
    pub fn gather_rows_f16(
        &self,
        (x, ldx): (u64, usize),
        rows: u64,
        x_div: usize,
        out: u64,
        n: usize,
        cols: usize,
        s: &CudaStream,
    ) -> CudaResult<()> {
        self.k().gather_rows_f16(
            (blocks(cols, 256), n as u32, 1),
            256,
            0,
            s,
            x,
            ldx as i32,
            rows,
            x_div as i32,
            out,
            cols as i32,
        )
    }

    /// `y[rows[i]] = x[i]` for `n` rows.
    pub fn scatter_rows(
        &self,
        x: u64,
        rows: u64,
        y: u64,
        n: usize,
        cols: usize,
        s: &CudaStream,
    ) -> CudaResult<()> {
        self.k().scatter_rows(
            (blocks(cols, 256), n as u32, 1),
            256,
            0,
            s,
            x,
            rows,
            y,
            cols as i32,
        )
    }

    /// Sorts the `n_tokens · n_used` (token, slot) pairs of a route buffer (as [`Self::moe_route`]
    /// writes it: per token `n_used` u32 expert ids, then `n_used` f32 weights) by expert, on the
    /// device in one launch: `offsets` (`n_expert + 2` i32) receives the exclusive prefix sum of
    /// the per-expert counts (`offsets[e]..offsets[e + 1]` are expert `e`'s sorted positions) and
    /// `order` (`n_tokens · n_used` i32) the pair indices `token · n_used + slot` grouped by expert,
    /// and `tiles` (`n_expert + 2` i32) the same prefix sum over the [`MOE_GEMM_BN`]-row tiles of
    /// each expert (`ceil(count / MOE_GEMM_BN)`; `tiles[n_expert + 1]` is the total), the work
    /// list of [`Self::moe_gemm`]. Within one expert the order is unspecified (atomics); the
    /// counts, offsets and tiles are exact.
    ///
    /// Ids `>= n_expert` (the router never writes one) are not clamped: they go to an extra
    /// bucket `n_expert` at the end (`offsets[n_expert + 1] - offsets[n_expert]` counts them,
    /// readable on the device), and [`Self::moe_gemm`] writes NaN to their output rows.
    #[allow(clippy::too_many_arguments)]
    pub fn moe_sort(
        &self,
        route: u64,
        n_tokens: usize,
        n_used: usize,
        n_expert: usize,
        offsets: u64,
        tiles: u64,
        order: u64,
        s: &CudaStream,
    ) -> CudaResult<()> {
        if n_expert == 0 || n_expert > MOE_MAX_EXPERTS || n_used == 0 {
            return Err(CudaError::Invalid(format!(
                "MoE sort of {n_used} experts per token among {n_expert} (1..={MOE_MAX_EXPERTS} experts)"
            )));
        }
        let pairs = n_tokens
            .checked_mul(n_used)
            .filter(|&p| p <= i32::MAX as usize);
        if pairs.is_none() {
            return Err(CudaError::Invalid(format!(
                "MoE sort of {n_tokens} tokens × {n_used} experts overflows i32 pair indices"
            )));
        }
        self.k().moe_sort(
            (1, 1, 1),
            1024,
            0,
            s,
            route,
            n_tokens as i32,
            n_used as i32,
            n_expert as i32,
            offsets,
            tiles,
            order,
        )
    }

    /// The grouped expert GEMM of MoE prefill: for every expert `e < n_expert` and every sorted
    /// row `i` in `offsets[e]..offsets[e + 1]` (as [`Self::moe_sort`] writes them),
    /// `y[row(i), r] = Σ_c W_e[r, c] · x[i, c]` for `r < rows`, where `W_e` is expert `e`'s
    /// `rows × cols` matrix in the stacked GGUF-block tensor at `w` (any type of
    /// [`CUDA_TYPES`](super::CUDA_TYPES), 16-byte aligned), `x` holds f16 rows of `cols` (16-byte aligned) and
    /// `row(i) = i`, or
    /// `y_rows[i]` when given (scatter back to pair order). `y` is f32 with row stride `ldy`.
    /// Rows of the invalid-id bucket `n_expert` are set to NaN.
    ///
    /// One launch, whatever the routing: the blocks walk the list of [`MOE_GEMM_BN`]-row token
    /// tiles that `tiles` numbers (from [`Self::moe_sort`]), the weights are decoded from their
    /// blocks into shared memory tile by tile (nothing else is allocated) and multiplied on the
    /// tensor cores with f16 operands and f32 accumulation. `n_pairs` (all sorted rows) only sizes
    /// the grid (`ceil(n_pairs / 64) + n_expert + 1` tile slots bound the tile count); any count
    /// is computed whatever it says. `PSHARD_MOE_GEMM_TILE` = `BMxBN` (64x64, 128x64) overrides
    /// the tile (benchmarks).
    #[allow(clippy::too_many_arguments)]
    pub fn moe_gemm(
        &self,
        ty: GgmlType,
        w: u64,
        rows: usize,
        cols: usize,
        n_expert: usize,
        x: u64,
        offsets: u64,
        tiles: u64,
        n_pairs: usize,
        y: u64,
        ldy: usize,
        y_rows: Option<u64>,
        s: &CudaStream,
    ) -> CudaResult<()> {
        let g = geom(ty, cols)?;
        if n_expert == 0 || n_expert > MOE_MAX_EXPERTS {
            return Err(CudaError::Invalid(format!(
                "grouped expert GEMM over {n_expert} experts (1..={MOE_MAX_EXPERTS})"
            )));
        }
        if ldy < rows || rows > i32::MAX as usize || ldy > i32::MAX as usize {
            return Err(CudaError::Invalid(format!(
                "grouped expert GEMM output of {rows} rows with row stride {ldy}"
            )));
        }
        if !x.is_multiple_of(16) || !w.is_multiple_of(16) {
            return Err(CudaError::Invalid(format!(
                "grouped expert GEMM weights and activations must be 16-byte aligned (addresses {w:#x}, {x:#x})"
            )));
        }
        if rows == 0 || cols == 0 || n_pairs == 0 {
            return Ok(());
        }
        let (bm, bn, threads) = self.moe_gemm_tile(rows);
        let rb = (cols / g.qk * g.bytes) as i64;
        let eb = rb * rows as i64;
        let y_rows = y_rows.unwrap_or(0);
        self.k().moe_gemm(
            g.suffix,
            bm,
            bn,
            (
                blocks(rows, bm),
                (n_pairs.div_ceil(bn) + n_expert + 1).min(65535) as u32,
                1,
            ),
            threads,
            moe_gemm_smem(bm, bn) as u32,
            s,
            w,
            eb,
            rb,
            rows as i32,
            cols as i32,
            n_expert as i32,
            x,
            offsets,
            tiles,
            y,
            ldy as i32,
            y_rows,
        )
    }

    /// Tile of the grouped expert GEMM.
    ///
    /// Measured on the H200 (2026-11-21, qwen3-30b-a3b experts: 128 × (768 × 2048 Q4_K/Q8_0,
    /// 2048 × 768 Q4_K/Q6_K), 8 per token, uniform random routes): 128 × 64 was the fastest of
    /// 64 × 32, 64 × 64, 128 × 64 and 128 × 128 at both 512 tokens (32 rows per expert: 303
    /// against 376-566 us for Q4_K gate) and 4096 tokens (1320 against 1429-2390 us). Matrices
    /// of at most 64 rows take 64 × 64.
    fn moe_gemm_tile(&self, rows: usize) -> (usize, usize, u32) {
        if let Ok(v) = std::env::var("PSHARD_MOE_GEMM_TILE") {
            if let Some(t) = MOE_GEMM_TILES
                .iter()
                .find(|&&(bm, bn, _)| v.trim() == format!("{bm}x{bn}"))
            {
                return *t;
            }
        }
        if rows <= 64 {
            MOE_GEMM_TILES[0]
        } else {
            MOE_GEMM_TILES[1]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::MOE_ROUTE_FREE;
    use crate::cuda::nvrtc::SOURCES;

    /// The kernel's `ROUTE_FREE` is the value the host writes into unforced rows.
    #[test]
    fn route_free_matches_the_kernel() {
        let ops = SOURCES.iter().find(|s| s.name == "ops.cu").unwrap().text;
        let line = ops
            .lines()
            .find_map(|l| l.strip_prefix("#define ROUTE_FREE "))
            .expect("ops.cu defines ROUTE_FREE");
        let hex = line.trim().trim_end_matches('u').trim_start_matches("0x");
        assert_eq!(u32::from_str_radix(hex, 16).unwrap(), MOE_ROUTE_FREE);
    }
}
