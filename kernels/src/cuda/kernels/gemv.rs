//! Weights: dequantization, the fused GEMV (int8 activations for quantized weights, f32 for
//! float weights) and its activation scratch, embedding lookup.

use super::mmq::MMQ_SCRATCH_COLS;
use super::{blocks, geom, CudaKernels};
use crate::cuda::arena::{RegionId, RegionKind};
use crate::cuda::device::GpuDevice;
use crate::cuda::error::{CudaError, CudaResult};
use crate::quant::ActFormat;
use cudarc::driver::CudaStream;
use pshard_model::ggml_type::GgmlType;
use std::sync::Arc;

/// Weight rows at or below which a single-row GEMV puts a whole block on each row (more warps in
/// flight for small matrices such as k/v projections).
pub const GEMV_SPLITK_MAX_ROWS: usize = 4096;

/// Most columns (reduction length) of a quantized GEMV: sizes the int8 activation scratch.
pub const GEMV_MAX_COLS: usize = 1 << 17;

/// Activation rows quantized and dotted per GEMV launch (kernels for at most 1, 2, 4, 8 rows).
pub const GEMV_MAX_NB: usize = 8;

/// The (rows per team, warps per team) variants of the int8 GEMV kernels (`GEMVQ_NB` in gemv.cu).
pub(super) const GEMVQ_SHAPES: [(usize, usize); 3] = [(2, 4), (2, 1), (4, 1)];

/// The (R, TW) variant that environment variable `var` names as "R,TW" (benchmarks), if it is
/// one of `shapes`.
pub(super) fn shape_override(var: &str, shapes: &[(usize, usize)]) -> Option<(usize, usize)> {
    let v = std::env::var(var).ok()?;
    let (r, w) = v.split_once(',')?;
    let v = (r.trim().parse().ok()?, w.trim().parse().ok()?);
    shapes.contains(&v).then_some(v)
}

/// The int8 activation scratch of the quantized GEMV: one region of the VRAM arena, made when the
/// kernels load and freed with them, so a GEMV call allocates nothing (and can be captured in a
/// CUDA graph). Calls on one stream reuse it in stream order.
pub(super) struct ActScratch {
    dev: Arc<GpuDevice>,
    region: RegionId,
    /// int8 quants, [`ActScratch::Q_BYTES`].
    q: u64,
    /// Block scales (f32, or f32 pairs for Q8_1).
    d: u64,
    /// Q8_K 16-element sums (i16).
    bs: u64,
    /// [`ZERO_SEQS`] zero i32s.
    zeros: u64,
}

/// Zero i32s kept on the device for batches that are all sequence 0 ([`CudaKernels::zero_seqs`]).
pub const ZERO_SEQS: usize = 1 << 18;

/// Bytes of the int8 GEMV's activation scratch (quants, scales, sums) and the zero sequence ids.
pub const ACT_SCRATCH_BYTES: u64 =
    ActScratch::Q_BYTES + ActScratch::D_BYTES + ActScratch::BS_BYTES + (ZERO_SEQS * 4) as u64;

/// Activation values the int8 scratch holds: a GEMV launch's rows of the widest input, or the
/// MMQ range's most tokens of [`MMQ_SCRATCH_COLS`] columns, the larger (2 Mi: with the scales and
/// sums 1.375 MiB more VRAM than the GEMV alone needs).
const ACT_SCRATCH_VALUES: usize = {
    let gemv = GEMV_MAX_NB * GEMV_MAX_COLS;
    let mmq = *crate::cuda::MMQ_TOKENS.end() * MMQ_SCRATCH_COLS;
    if gemv > mmq {
        gemv
    } else {
        mmq
    }
};

impl ActScratch {
    /// Bytes of int8 quants (one per activation value).
    pub(super) const Q_BYTES: u64 = ACT_SCRATCH_VALUES as u64;
    // Q8_1 needs 8 bytes per 32 elements, Q8_K 4 per 256; sums: 2 bytes per 16.
    const D_BYTES: u64 = (ACT_SCRATCH_VALUES / 4) as u64;
    const BS_BYTES: u64 = (ACT_SCRATCH_VALUES / 8) as u64;

    pub(super) fn new(dev: &Arc<GpuDevice>) -> CudaResult<ActScratch> {
        let bytes = ACT_SCRATCH_BYTES;
        let region = dev.create_region(RegionKind::Workspace, "gemv int8 activations", bytes)?;
        let buf = dev.alloc(region, bytes, "gemv int8 activations")?;
        let zeros = buf.ptr + Self::Q_BYTES + Self::D_BYTES + Self::BS_BYTES;
        dev.memset(dev.compute_stream(), zeros, 0, ZERO_SEQS * 4)?;
        Ok(ActScratch {
            dev: dev.clone(),
            region,
            q: buf.ptr,
            d: buf.ptr + Self::Q_BYTES,
            bs: buf.ptr + Self::Q_BYTES + Self::D_BYTES,
            zeros,
        })
    }
}

impl Drop for ActScratch {
    fn drop(&mut self) {
        if let Ok(mut a) = self.dev.arena() {
            let _ = a.destroy_region(self.region);
        }
    }
}

/// Where [`CudaKernels::quantize_acts`] left the quantized activations (see gemv.cu for the
/// layout): int8 quants, block scales and, for Q8_K, the 16-element sums.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantizedActsDev {
    /// The partner format.
    pub format: ActFormat,
    /// `n × cols` int8 quants.
    pub q: u64,
    /// Scales: f32 per block (Q8_0, Q8_K) or (scale, scaled sum) f32 pairs (Q8_1).
    pub d: u64,
    /// Q8_K: `n × cols/16` i16 sums.
    pub bs: u64,
}

impl CudaKernels {
    /// Dequantizes `rows × cols` weights at `src` (GGUF blocks) into f16 at `dst` (row-major).
    pub fn dequant_f16(
        &self,
        ty: GgmlType,
        src: u64,
        dst: u64,
        rows: usize,
        cols: usize,
        s: &CudaStream,
    ) -> CudaResult<()> {
        let g = geom(ty, cols)?;
        let n_units = (rows * cols / g.qk * g.units) as i64;
        if n_units == 0 {
            return Ok(());
        }
        self.k().dequant(
            g.suffix,
            (blocks(n_units as usize, 256), 1, 1),
            256,
            0,
            s,
            src,
            dst,
            n_units,
        )
    }

    /// `y[b, r] = Σ_c W[r, c] x[b, c] (+ bias[r])` for `n` batch rows with the fused GEMV. `w`,
    /// `y` and `bias` already point at the first row of a range; `x` is f32 (16-byte aligned,
    /// `ldx` a multiple of 4).
    ///
    /// Quantized weights: every 8 activation rows are quantized to the type's partner format
    /// ([`ActFormat`], exactly as the CPU engine does) in the kernels' own scratch and dotted in
    /// int8 (`gemvq_*` in gemv.cu), reading the weights once per 8 rows. Float weights use the f32
    /// GEMV. Nothing is allocated and nothing waits for the host, so the call can be captured.
    #[allow(clippy::too_many_arguments)]
    pub fn gemv(
        &self,
        ty: GgmlType,
        w: u64,
        rows: usize,
        cols: usize,
        x: u64,
        ldx: usize,
        y: u64,
        ldy: usize,
        n: usize,
        bias: Option<u64>,
        s: &CudaStream,
    ) -> CudaResult<()> {
        geom(ty, cols)?;
        if rows == 0 || n == 0 {
            return Ok(());
        }
        if !x.is_multiple_of(16) || !ldx.is_multiple_of(4) {
            return Err(CudaError::Invalid(format!(
                "GEMV activations must be 16-byte aligned with a row stride that is a multiple of 4 (address {x:#x}, stride {ldx})"
            )));
        }
        let format = crate::quant::kernel(ty).map(|k| k.act);
        match format {
            Some(f) if f != ActFormat::F32 => {
                self.gemv_int8(ty, f, w, rows, cols, x, ldx, y, ldy, n, bias, s)
            }
            _ => self.gemv_f32(ty, w, rows, cols, x, ldx, y, ldy, n, bias, s),
        }
    }

    /// Quantizes `n <= 8` rows of f32 activations (`x`, row stride `ldx`, `cols` columns) into
    /// `format` in the GEMV's scratch, exactly as the CPU engine's quantizer does; returns where
    /// they are. The next GEMV on any stream overwrites them.
    pub fn quantize_acts(
        &self,
        format: ActFormat,
        x: u64,
        ldx: usize,
        cols: usize,
        n: usize,
        s: &CudaStream,
    ) -> CudaResult<QuantizedActsDev> {
        if n > GEMV_MAX_NB || cols > GEMV_MAX_COLS {
            return Err(CudaError::Invalid(format!(
                "cannot quantize {n} activation rows of {cols} columns to {} (at most {GEMV_MAX_NB} rows of {GEMV_MAX_COLS})",
                format.name()
            )));
        }
        self.quantize_rows(format, x, ldx, cols, n, s)
    }

    /// Quantizes `n` rows (`n × cols` at most the scratch's [`ActScratch::Q_BYTES`]) into the
    /// scratch; see [`Self::quantize_acts`].
    pub(super) fn quantize_rows(
        &self,
        format: ActFormat,
        x: u64,
        ldx: usize,
        cols: usize,
        n: usize,
        s: &CudaStream,
    ) -> CudaResult<QuantizedActsDev> {
        let qk = match format {
            ActFormat::Q8_0 | ActFormat::Q8_1 => 32,
            ActFormat::Q8K => 256,
            ActFormat::F32 => {
                return Err(CudaError::Invalid(
                    "f32 activations are not quantized".into(),
                ))
            }
        };
        if (n * cols) as u64 > ActScratch::Q_BYTES || n > 65535 || !cols.is_multiple_of(qk) {
            return Err(CudaError::Invalid(format!(
                "cannot quantize {n} activation rows of {cols} columns to {} (at most {} values, whole blocks of {qk})",
                format.name(),
                ActScratch::Q_BYTES
            )));
        }
        let a = &self.acts;
        let out = QuantizedActsDev {
            format,
            q: a.q,
            d: a.d,
            bs: a.bs,
        };
        if n == 0 || cols == 0 {
            return Ok(out);
        }
        let (ldx_i, cols_i) = (ldx as i32, cols as i32);
        let grid = (blocks(cols / qk, 8), n as u32, 1);
        let (k, q, d) = (self.k(), a.q, a.d);
        match format {
            ActFormat::Q8_0 => k.quantize_q8_0(grid, 256, 0, s, x, ldx_i, cols_i, q, d)?,
            ActFormat::Q8_1 => k.quantize_q8_1(grid, 256, 0, s, x, ldx_i, cols_i, q, d)?,
            ActFormat::Q8K => k.quantize_q8_k(grid, 256, 0, s, x, ldx_i, cols_i, q, d, a.bs)?,
            ActFormat::F32 => unreachable!("f32 activations are refused above"),
        }
        Ok(out)
    }

    /// Shape of the int8 GEMV of `ty` for `rows` weight rows and `nb` batch rows: (R weight rows
    /// per team, TW warps per team). `PSHARD_GEMV_RW` = "R,TW" overrides (benchmarks).
    ///
    /// Measured on the H200 (2026-11-21, CUDA graphs, 1024..14336 rows × 4096..14336 columns,
    /// batch 1..8; variants 1,1 1,4 2,1 2,4 4,1): two rows per team of four warps is the best or
    /// within a few percent everywhere (teams of four warps keep loads in flight on matrices with
    /// few rows; two rows share each activation load), except Q2_K/Q3_K on 4096+ rows, whose
    /// heavier decode prefers one warp per team, and Q6_K on 8192+ rows at batch 3+, where four
    /// rows per warp share the activations best.
    fn gemv_shape(&self, ty: GgmlType, rows: usize, nb: usize) -> (usize, usize) {
        if let Some(v) = shape_override("PSHARD_GEMV_RW", &GEMVQ_SHAPES) {
            return v;
        }
        match ty {
            GgmlType::Q2_K | GgmlType::Q3_K if rows >= 4096 => {
                if nb == 1 {
                    (2, 1)
                } else {
                    (4, 1)
                }
            }
            GgmlType::Q6_K if rows >= 8192 && nb >= 3 => (4, 1),
            _ => (2, 4),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn gemv_int8(
        &self,
        ty: GgmlType,
        format: ActFormat,
        w: u64,
        rows: usize,
        cols: usize,
        x: u64,
        ldx: usize,
        y: u64,
        ldy: usize,
        n: usize,
        bias: Option<u64>,
        s: &CudaStream,
    ) -> CudaResult<()> {
        let mut done = 0;
        while done < n {
            let nb = (n - done).min(GEMV_MAX_NB);
            let a = self.quantize_acts(format, x + (done * ldx * 4) as u64, ldx, cols, nb, s)?;
            let yp = y + (done * ldy * 4) as u64;
            self.gemvq(ty, a, w, rows, cols, yp, ldy, nb, bias, s)?;
            done += nb;
        }
        Ok(())
    }

    /// The int8 GEMV of quantized weights on activations quantized earlier on this stream
    /// (`acts`, as [`Self::quantize_acts`] or [`Self::quantized_acts`] describe them): lets
    /// matmuls that share their input (q/k/v, gate/up) quantize it once. `n <=`
    /// [`GEMV_MAX_NB`] rows; `acts` must be in `ty`'s partner format and still hold those rows
    /// (any GEMV of other activations in between overwrites them). Where
    /// [`crate::cuda::mmq_path`] holds, MMQ multiplies them instead (as [`crate::cuda::Gpu::matmul`]
    /// would for the same rows).
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_prequantized(
        &self,
        ty: GgmlType,
        acts: QuantizedActsDev,
        w: u64,
        rows: usize,
        cols: usize,
        y: u64,
        ldy: usize,
        n: usize,
        bias: Option<u64>,
        s: &CudaStream,
    ) -> CudaResult<()> {
        let want = crate::quant::kernel(ty).map(|k| k.act);
        if want != Some(acts.format) || n > GEMV_MAX_NB {
            return Err(CudaError::Invalid(format!(
                "{ty} weights cannot use {n} rows of {} activations (partner {:?}, at most {GEMV_MAX_NB} rows)",
                acts.format.name(),
                want.map(|f| f.name())
            )));
        }
        if rows == 0 || n == 0 {
            return Ok(());
        }
        if crate::cuda::mmq_path(ty, n) {
            return self.mmq_prequantized(ty, acts, w, rows, cols, y, ldy, n, bias, s);
        }
        self.gemvq(ty, acts, w, rows, cols, y, ldy, n, bias, s)
    }

    /// Where the GEMV's quantized activations of `format` live (what the last quantization
    /// wrote; see [`Self::gemv_prequantized`]).
    pub fn quantized_acts(&self, format: ActFormat) -> QuantizedActsDev {
        QuantizedActsDev {
            format,
            q: self.acts.q,
            d: self.acts.d,
            bs: self.acts.bs,
        }
    }

    /// One int8 GEMV launch over `nb <= GEMV_MAX_NB` quantized activation rows.
    #[allow(clippy::too_many_arguments)]
    fn gemvq(
        &self,
        ty: GgmlType,
        a: QuantizedActsDev,
        w: u64,
        rows: usize,
        cols: usize,
        y: u64,
        ldy: usize,
        nb: usize,
        bias: Option<u64>,
        s: &CudaStream,
    ) -> CudaResult<()> {
        let g = geom(ty, cols)?;
        let rb = (cols / g.qk * g.bytes) as i64;
        let (rows_i, cols_i, ldy_i, nb_i) = (rows as i32, cols as i32, ldy as i32, nb as i32);
        let bias = bias.unwrap_or(0);
        // Kernels exist for at most 1, 2, 4 and 8 batch rows.
        let max_nb = nb.next_power_of_two();
        let (r, tw) = self.gemv_shape(ty, rows, nb);
        self.k().gemvq(
            g.suffix,
            max_nb,
            r,
            tw,
            (blocks(rows, 4 * r / tw), 1, 1),
            128,
            0,
            s,
            w,
            rb,
            rows_i,
            cols_i,
            nb_i,
            a.q,
            a.d,
            a.bs,
            y,
            ldy_i,
            bias,
        )
    }

    /// The f32-activation GEMV of float weights (F32, F16, BF16).
    #[allow(clippy::too_many_arguments)]
    fn gemv_f32(
        &self,
        ty: GgmlType,
        w: u64,
        rows: usize,
        cols: usize,
        x: u64,
        ldx: usize,
        y: u64,
        ldy: usize,
        n: usize,
        bias: Option<u64>,
        s: &CudaStream,
    ) -> CudaResult<()> {
        let g = geom(ty, cols)?;
        let rb = (cols / g.qk * g.bytes) as i64;
        let (rows_i, cols_i, ldx_i, ldy_i) = (rows as i32, cols as i32, ldx as i32, ldy as i32);
        let bias = bias.unwrap_or(0);
        let mut done = 0;
        while done < n {
            let nb = match n - done {
                r if r >= 8 => 8,
                r if r >= 4 => 4,
                r if r >= 2 => 2,
                _ => 1,
            };
            let xp = x + (done * ldx * 4) as u64;
            let yp = y + (done * ldy * 4) as u64;
            if nb == 1 && rows <= GEMV_SPLITK_MAX_ROWS.max(32 * self.sm_count as usize) {
                self.k().gemv_1k(
                    g.suffix,
                    (rows as u32, 1, 1),
                    128,
                    0,
                    s,
                    w,
                    rb,
                    rows_i,
                    cols_i,
                    xp,
                    yp,
                    bias,
                )?;
                done += 1;
                continue;
            }
            // Rows per warp: two rows share each activation load at batch 2 and 4.
            let r = if nb == 2 || nb == 4 { 2 } else { 1 };
            self.k().gemv(
                g.suffix,
                nb,
                r,
                (blocks(rows, 4 * r), 1, 1),
                128,
                0,
                s,
                w,
                rb,
                rows_i,
                cols_i,
                xp,
                ldx_i,
                yp,
                ldy_i,
                bias,
            )?;
            done += nb;
        }
        Ok(())
    }

    /// Embedding lookup: `out[t] = table[ids[t]] · scale` for `n` tokens (ids: i32 on the device).
    #[allow(clippy::too_many_arguments)]
    pub fn get_rows(
        &self,
        ty: GgmlType,
        table: u64,
        cols: usize,
        ids: u64,
        n: usize,
        out: u64,
        ldo: usize,
        scale: f32,
        s: &CudaStream,
    ) -> CudaResult<()> {
        let g = geom(ty, cols)?;
        let rb = (cols / g.qk * g.bytes) as i64;
        let units = cols / g.qk * g.units;
        let (cols_i, ldo_i) = (cols as i32, ldo as i32);
        self.k().get_rows(
            g.suffix,
            (blocks(units, 128), n as u32, 1),
            128,
            0,
            s,
            table,
            rb,
            cols_i,
            ids,
            out,
            ldo_i,
            scale,
        )
    }

    /// Device address of `n` zero i32s: the sequence ids of a batch that is all sequence 0.
    pub fn zero_seqs(&self, n: usize) -> CudaResult<u64> {
        if n > ZERO_SEQS {
            return Err(CudaError::Invalid(format!(
                "{n} tokens of sequence 0 exceed the {ZERO_SEQS} zeros kept on the device"
            )));
        }
        Ok(self.acts.zeros)
    }
}

#[cfg(test)]
mod tests {
    /// The lookup-table levels the CUDA decoders read (four little-endian words per table in
    /// common.cuh) are the CPU's.
    #[test]
    fn lut4_tables_match_cpu() {
        use crate::quant::lut4::{FP4, NL};
        for (name, table) in [("LUT4_NL", &NL), ("LUT4_FP4", &FP4)] {
            let line = crate::cuda::nvrtc::COMMON
                .lines()
                .find(|l| l.starts_with(&format!("#define {name} ")))
                .unwrap_or_else(|| panic!("{name} not defined in common.cuh"));
            let words: Vec<u32> = line
                .split_whitespace()
                .skip(2)
                .map(|w| {
                    let w = w.trim_end_matches(',').trim_end_matches('u');
                    u32::from_str_radix(w.trim_start_matches("0x"), 16).expect("hex word")
                })
                .collect();
            let bytes: Vec<i8> = words
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .map(|b| b as i8)
                .collect();
            assert_eq!(bytes, table.to_vec(), "{name}");
        }
    }
}
