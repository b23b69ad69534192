//! KV cache writes and context shifts.

use super::launchers::Launchers;
use super::rope::{RopeArgs, RopeKind, RopeYarnArg};
use super::{blocks, check_q8_0_dims, CudaKernels};
use crate::cuda::error::{CudaError, CudaResult};
use crate::kv::KvType;
use cudarc::driver::CudaStream;

impl CudaKernels {
    /// Context shift of one sequence's KV rows in place (`cols` values in `ty` per row at `rows`;
    /// Q8_0 rows are dequantized, turned and quantized afresh per head, or copied): the runs
    /// of cell moves `(moves, run_start, cyclic, n_runs)` (`moves`: i32 source, destination
    /// pairs; `run_start`: `n_runs + 1` i32 offsets into them; `cyclic`: one i32 flag per run, see
    /// `pshard_kernels::ops::ShiftRun`), each moved row rotated by the rope angles of `delta`
    /// positions when `rope` is given (K: in each head of `rope.head_dim`, the `rope.n_dims`
    /// values from the given offset on; without YaRN's magnitude, which the cached K already
    /// carries), copied otherwise (V). The same rotation as `pshard_kernels::ops::kv_shift`.
    pub fn kv_shift(
        &self,
        ty: KvType,
        rows: u64,
        cols: usize,
        (moves, run_start, cyclic, n_runs): (u64, u64, u64, usize),
        rope: Option<(&RopeArgs, usize)>,
        delta: f32,
        s: &CudaStream,
    ) -> CudaResult<()> {
        if n_runs == 0 || cols == 0 {
            return Ok(());
        }
        let (head_dim, rope_off, r) = match rope {
            Some((r, off)) => {
                if r.head_dim == 0
                    || off + r.n_dims > r.head_dim
                    || !off.is_multiple_of(2)
                    || !cols.is_multiple_of(r.head_dim)
                {
                    return Err(CudaError::Invalid(format!(
                        "KV shift of rows of {cols} with rope over {} of {} dims from {off}",
                        r.n_dims, r.head_dim
                    )));
                }
                (r.head_dim, off, r.karg()?)
            }
            None => {
                let none = RopeArgs {
                    head_dim: cols,
                    n_dims: 0,
                    mode: RopeKind::Adjacent,
                    base: 1.0,
                    pos_scale: 1.0,
                    freq_factors: None,
                    yarn: RopeYarnArg::NONE,
                };
                (cols, 0, none.karg()?)
            }
        };
        if !cols.is_multiple_of(2) || !head_dim.is_multiple_of(2) {
            return Err(CudaError::Invalid(format!(
                "KV shift of rows of {cols} values in heads of {head_dim}: not pairs"
            )));
        }
        let (grid_y, threads, smem, head_dim) = match ty {
            KvType::F16 => (blocks(cols / 2, 128), 128, 0, head_dim),
            KvType::Q8_0 => {
                // Without rope every 32-value block is its own "head" (copied as it is).
                let hd = if rope.is_some() { head_dim } else { 32 };
                check_q8_0_dims(&[("KV row", cols), ("rotated head", hd)])?;
                let smem = hd * 4 + hd / 32 * 34;
                if smem > 48 << 10 {
                    return Err(CudaError::Invalid(format!(
                        "KV shift of a q8_0 cache with heads of {hd} values (at most 9000)"
                    )));
                }
                ((cols / hd) as u32, 256, smem as u32, hd)
            }
        };
        let launch = match ty {
            KvType::F16 => Launchers::kv_shift,
            KvType::Q8_0 => Launchers::kv_shift_q8_0,
        };
        launch(
            self.k(),
            (n_runs as u32, grid_y, 1),
            threads,
            smem,
            s,
            rows,
            cols as i32,
            moves,
            run_start,
            cyclic,
            head_dim as i32,
            rope_off as i32,
            delta,
            r,
        )
    }

    /// Writes `n` rows of `row` f32 values (row stride `ld_src`) into a cache of type `ty`
    /// (f16, or Q8_0 blocks along the row: `row` a multiple of 32): token `t` to cell
    /// `seq[t] · cells + pos[t] % cells` (i32s on the device; negative positions are skipped).
    pub fn kv_write(
        &self,
        ty: KvType,
        src: u64,
        ld_src: usize,
        cache: u64,
        row: usize,
        pos: u64,
        seq: u64,
        cells: usize,
        n: usize,
        s: &CudaStream,
    ) -> CudaResult<()> {
        if n == 0 {
            return Ok(());
        }
        if cells == 0 {
            return Err(CudaError::Invalid("a KV cache of 0 cells".into()));
        }
        let grid_x = match ty {
            KvType::F16 => blocks(row, 256),
            KvType::Q8_0 => {
                check_q8_0_dims(&[("KV row", row)])?;
                // One warp per 32-value block, eight per launch block.
                blocks(row / 32, 8)
            }
        };
        let launch = match ty {
            KvType::F16 => Launchers::kv_write,
            KvType::Q8_0 => Launchers::kv_write_q8_0,
        };
        launch(
            self.k(),
            (grid_x, n as u32, 1),
            256,
            0,
            s,
            src,
            ld_src as i32,
            cache,
            row as i32,
            pos,
            seq,
            cells as i32,
        )
    }
}
