//! MMQ: the int8 tensor-core matmul of quantized weights (`mmq_*` in mmq.cu) for batches of
//! about 8 to 256 tokens, on activations quantized into the GEMV's scratch. Its outputs are the
//! CPU engine's bits (same integer sums, same f32 operations in the same order; see mmq.cu).

use super::gemv::{ActScratch, QuantizedActsDev};
use super::{blocks, geom, type_geom, CudaKernels, TypeGeom};
use crate::cuda::error::{CudaError, CudaResult};
use crate::quant::ActFormat;
use cudarc::driver::CudaStream;
use pshard_model::ggml_type::GgmlType;

#[cfg(test)]
mod emu;

/// The tile variants (BM weight rows, BN tokens, warps along the rows, warps along the tokens)
/// of the MMQ kernels (`MMQ_KERNELS` in mmq.cu), `mmq_<type>_<BM>x<BN>`.
pub(super) const MMQ_TILES: [(usize, usize, usize, usize); 6] = [
    (32, 16, 2, 1),
    (64, 8, 4, 1),
    (64, 16, 4, 1),
    (64, 32, 4, 1),
    (64, 64, 2, 2),
    (128, 64, 4, 2),
];

/// Columns of the activation rows the int8 scratch holds [`crate::cuda::MMQ_TOKENS`]'s largest
/// count of in one piece (wider rows, or more tokens, are quantized and multiplied in chunks,
/// each chunk reading the weights again): llama3-8b's widest input is 14336.
pub const MMQ_SCRATCH_COLS: usize = 16384;

/// Environment variable naming the MMQ tile to use, `BMxBN` (benchmarks).
pub const MMQ_TILE_ENV: &str = "PSHARD_MMQ_TILE";

// mmq.cu's layout constants (a test reads them from the source): elements per K tile, bytes per
// row of the int8 tiles, floats per row of the per-sub-block factor tables and of the activation
// scale table, raw activation factor words per token.
const MQ_K: usize = 256;
const MQ_ALD: usize = 272;
const MQ_FLD: usize = 17;
const MQ_DLD: usize = 9;
const MQ_RAW: usize = 16;

/// Bytes per row of a stage's raw weight windows for K tiles of `tile_bytes` (`mq_wld`).
fn mmq_wld(tile_bytes: usize) -> usize {
    16 * ((tile_bytes + 19).div_ceil(16) | 1)
}

/// Dynamic shared memory of an MMQ block of `bm` rows and `bn` tokens whose K tiles are
/// `tile_bytes` bytes: `mq_smem` in mmq.cu (the kernel traps when launched with less).
pub(super) fn mmq_smem(tile_bytes: usize, bm: usize, bn: usize) -> usize {
    let wld = mmq_wld(tile_bytes);
    2 * (bm * wld + bn * MQ_ALD + bn * MQ_RAW * 4)
        + bm * MQ_ALD
        + 4 * (2 * bm * MQ_FLD + bn * MQ_FLD + bn * MQ_DLD)
}

/// Bytes of one K tile (256 elements) of a type.
fn tile_bytes(g: &TypeGeom) -> usize {
    MQ_K / g.qk * g.bytes
}

/// A tile of the MMQ kernels: weight rows × tokens per block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmqTile {
    /// Weight rows per block.
    pub bm: usize,
    /// Tokens per block.
    pub bn: usize,
}

impl MmqTile {
    /// Every compiled tile.
    pub fn all() -> Vec<MmqTile> {
        MMQ_TILES
            .iter()
            .map(|&(bm, bn, _, _)| MmqTile { bm, bn })
            .collect()
    }

    /// Threads per block.
    fn threads(self) -> Option<u32> {
        MMQ_TILES
            .iter()
            .find(|&&(bm, bn, _, _)| bm == self.bm && bn == self.bn)
            .map(|&(_, _, wm, wn)| (wm * wn * 32) as u32)
    }
}

impl std::fmt::Display for MmqTile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.bm, self.bn)
    }
}

/// Whether `ty` has MMQ kernels: every quantized type the CUDA kernels read (those the int8
/// GEMV multiplies).
pub fn mmq_supported(ty: GgmlType) -> bool {
    type_geom(ty).is_some() && crate::quant::kernel(ty).is_some_and(|k| k.act != ActFormat::F32)
}

impl CudaKernels {
    /// Whether this device can run tile `t` of type geometry `g` (its shared memory fits).
    fn mmq_fits(&self, g: &TypeGeom, t: MmqTile) -> bool {
        mmq_smem(tile_bytes(g), t.bm, t.bn) as i64 <= self.smem_optin as i64
    }

    /// The tiles this device runs for `ty` (those whose shared memory fits).
    pub fn mmq_tiles(&self, ty: GgmlType) -> Vec<MmqTile> {
        match type_geom(ty) {
            Some(g) if mmq_supported(ty) => MmqTile::all()
                .into_iter()
                .filter(|t| self.mmq_fits(&g, *t))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The MMQ tile for `rows` weight rows and `n` tokens of `ty`: [`MMQ_TILE_ENV`] when set to a
    /// tile this device runs, else the narrowest token tile that holds `n` (64 at most), with 128
    /// rows per block when 64-token tiles still fill every SM and 32 when 8- or 16-token tiles of
    /// 64 rows leave SMs idle. `cuda_bench_mmq` prints every tile: on the H100 (2026-12-05) this
    /// picks the fastest at 8-32 tokens of 14336×4096; at 64 tokens 128×64 beat the 64×64 it picks
    /// (102 against 121 µs for Q4_K).
    pub fn mmq_tile(&self, ty: GgmlType, rows: usize, n: usize) -> CudaResult<MmqTile> {
        let g = geom(ty, MQ_K)?;
        if let Ok(v) = std::env::var(MMQ_TILE_ENV) {
            if let Some(t) = MmqTile::all()
                .into_iter()
                .find(|t| v.trim() == t.to_string() && self.mmq_fits(&g, *t))
            {
                return Ok(t);
            }
        }
        let sms = self.sm_count.max(1) as usize;
        let bn = match n {
            0..=8 => 8,
            9..=16 => 16,
            17..=32 => 32,
            _ => 64,
        };
        let wide = MmqTile { bm: 128, bn: 64 };
        let narrow = MmqTile { bm: 32, bn: 16 };
        let t = if bn == 64 && rows.div_ceil(128) * n.div_ceil(64) >= sms && self.mmq_fits(&g, wide)
        {
            wide
        } else if bn <= 16 && rows.div_ceil(64) * n.div_ceil(bn) < sms {
            narrow
        } else {
            MmqTile { bm: 64, bn }
        };
        Ok(t)
    }

    /// `y[t, r] = Σ_c W[r, c] x[t, c] (+ bias[r])` for `n` activation rows (`x`: f32, row stride
    /// `ldx`) with MMQ: the rows are quantized to `ty`'s partner format in the GEMV's scratch, as
    /// many at a time as it holds, and each chunk is one MMQ launch (a programmatic dependent of
    /// its quantizer) with tile `tile` (`None`: [`Self::mmq_tile`]). The outputs are the CPU
    /// engine's bits. Nothing is allocated and nothing waits for the host.
    #[allow(clippy::too_many_arguments)]
    pub fn mmq(
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
        tile: Option<MmqTile>,
        s: &CudaStream,
    ) -> CudaResult<()> {
        let format = self.mmq_format(ty)?;
        geom(ty, cols)?;
        if rows == 0 || n == 0 || cols == 0 {
            return Ok(());
        }
        if !x.is_multiple_of(16) || !ldx.is_multiple_of(4) {
            return Err(CudaError::Invalid(format!(
                "MMQ activations must be 16-byte aligned with a row stride that is a multiple of 4 (address {x:#x}, stride {ldx})"
            )));
        }
        let chunk = (ActScratch::Q_BYTES as usize / cols).min(n);
        if chunk == 0 {
            return Err(CudaError::Invalid(format!(
                "an MMQ activation row of {cols} columns exceeds the {}-byte int8 scratch",
                ActScratch::Q_BYTES
            )));
        }
        let mut done = 0;
        while done < n {
            let nb = (n - done).min(chunk);
            let a = self.quantize_rows(format, x + (done * ldx * 4) as u64, ldx, cols, nb, s)?;
            let yp = y + (done * ldy * 4) as u64;
            self.mmq_launch(ty, a, w, rows, cols, yp, ldy, nb, bias, tile, s)?;
            done += nb;
        }
        Ok(())
    }

    /// MMQ on activations quantized earlier on this stream (`acts`, as
    /// [`Self::quantize_acts`] or [`Self::quantized_acts`] describe them; they must still hold
    /// the `n` rows, in `ty`'s partner format).
    #[allow(clippy::too_many_arguments)]
    pub fn mmq_prequantized(
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
        let format = self.mmq_format(ty)?;
        geom(ty, cols)?;
        if format != acts.format || (n * cols) as u64 > ActScratch::Q_BYTES {
            return Err(CudaError::Invalid(format!(
                "{ty} weights cannot use {n} rows of {cols} {} activations (partner {}, at most {} values)",
                acts.format.name(),
                format.name(),
                ActScratch::Q_BYTES
            )));
        }
        if rows == 0 || n == 0 || cols == 0 {
            return Ok(());
        }
        self.mmq_launch(ty, acts, w, rows, cols, y, ldy, n, bias, None, s)
    }

    /// `ty`'s partner format, or why it has no MMQ kernels.
    fn mmq_format(&self, ty: GgmlType) -> CudaResult<ActFormat> {
        match crate::quant::kernel(ty).map(|k| k.act) {
            Some(f) if mmq_supported(ty) => Ok(f),
            _ => Err(CudaError::Invalid(format!(
                "no MMQ kernel multiplies {ty} weights"
            ))),
        }
    }

    /// One MMQ launch over `n` quantized activation rows.
    #[allow(clippy::too_many_arguments)]
    fn mmq_launch(
        &self,
        ty: GgmlType,
        a: QuantizedActsDev,
        w: u64,
        rows: usize,
        cols: usize,
        y: u64,
        ldy: usize,
        n: usize,
        bias: Option<u64>,
        tile: Option<MmqTile>,
        s: &CudaStream,
    ) -> CudaResult<()> {
        let g = geom(ty, cols)?;
        let t = match tile {
            Some(t) => t,
            None => self.mmq_tile(ty, rows, n)?,
        };
        let threads = t
            .threads()
            .ok_or_else(|| CudaError::Invalid(format!("no MMQ kernel has tile {t}")))?;
        if !self.mmq_fits(&g, t) {
            return Err(CudaError::Invalid(format!(
                "MMQ tile {t} of {ty} needs {} bytes of shared memory, the device has {}",
                mmq_smem(tile_bytes(&g), t.bm, t.bn),
                self.smem_optin
            )));
        }
        let rb = (cols / g.qk * g.bytes) as i64;
        let (rows_i, cols_i, n_i, ldy_i) = (rows as i32, cols as i32, n as i32, ldy as i32);
        self.k().mmq(
            g.suffix,
            t.bm,
            t.bn,
            (blocks(rows, t.bm), blocks(n, t.bn), 1),
            threads,
            mmq_smem(tile_bytes(&g), t.bm, t.bn) as u32,
            s,
            w,
            rb,
            rows_i,
            cols_i,
            n_i,
            a.q,
            a.d,
            a.bs,
            y,
            ldy_i,
            bias.unwrap_or(0),
        )
    }

    /// Raises every MMQ kernel's shared memory limit to what its tile needs, where the device has
    /// that much (a tile that does not fit is never chosen: [`Self::mmq_tile`]).
    pub(super) fn allow_mmq_smem(&self) -> CudaResult<()> {
        for &ty in super::CUDA_TYPES {
            let Some(g) = type_geom(ty).filter(|_| mmq_supported(ty)) else {
                continue;
            };
            for t in MmqTile::all() {
                if self.mmq_fits(&g, t) {
                    let name = format!("mmq_{}_{t}", g.suffix);
                    self.allow_smem(&name, mmq_smem(tile_bytes(&g), t.bm, t.bn))?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shared memory of the tiles the heuristic picks fits a Hopper (227 KiB per block) for
    /// every type, and the largest tiles of the widest K tiles need more than an A100's 163 KiB:
    /// the size check matters.
    #[test]
    fn tile_shared_memory() {
        let q8 = type_geom(GgmlType::Q8_0).unwrap();
        let q4k = type_geom(GgmlType::Q4_K).unwrap();
        assert_eq!(tile_bytes(&q8), 272);
        assert_eq!(tile_bytes(&q4k), 144);
        // Q4_K 64x64: raw windows 176 bytes a row.
        assert_eq!(
            mmq_smem(144, 64, 64),
            2 * (64 * 176 + 64 * 272 + 64 * 64) + 64 * 272 + 4 * (2 * 64 * 17 + 64 * 17 + 64 * 9)
        );
        for &ty in super::super::CUDA_TYPES {
            let Some(g) = type_geom(ty).filter(|_| mmq_supported(ty)) else {
                continue;
            };
            for t in MmqTile::all() {
                assert!(
                    mmq_smem(tile_bytes(&g), t.bm, t.bn) <= 227 * 1024,
                    "{ty} {t}"
                );
            }
        }
        assert!(mmq_smem(tile_bytes(&q8), 128, 64) > 163 * 1024);
    }

    /// Every listed tile has threads, and a name the kernels are instantiated with.
    #[test]
    fn tiles_have_threads() {
        for t in MmqTile::all() {
            let th = t.threads().unwrap();
            assert!(th % 32 == 0 && th <= 256, "{t}");
            // Warp tiles of 16 rows x 8 tokens cover the block.
            let &(_, _, wm, wn) = MMQ_TILES
                .iter()
                .find(|&&(bm, bn, _, _)| bm == t.bm && bn == t.bn)
                .unwrap();
            assert!(t.bm % (16 * wm) == 0 && t.bn % (8 * wn) == 0, "{t}");
        }
        assert_eq!(MmqTile { bm: 64, bn: 99 }.threads(), None);
    }

    /// The constants and tile variants mirrored here and in the emulation are mmq.cu's.
    #[test]
    fn constants_match_the_source() {
        let src = crate::cuda::nvrtc::SOURCES
            .iter()
            .find(|s| s.name == "mmq.cu")
            .expect("mmq.cu is a source")
            .text;
        let define = |name: &str| -> usize {
            let line = src
                .lines()
                .find(|l| l.starts_with(&format!("#define {name} ")))
                .unwrap_or_else(|| panic!("{name} not defined in mmq.cu"));
            line.split_whitespace().nth(2).unwrap().parse().unwrap()
        };
        assert_eq!(define("MQ_K"), MQ_K);
        assert_eq!(define("MQ_ALD"), MQ_ALD);
        assert_eq!(define("MQ_FLD"), MQ_FLD);
        assert_eq!(define("MQ_DLD"), MQ_DLD);
        assert_eq!(define("MQ_RAW"), MQ_RAW);
        // `MMQ_VARIANT(NAME, M, BM, BN, WARPS_M, WARPS_N)` lines of `MMQ_KERNELS`.
        let variants: Vec<(usize, usize, usize, usize)> = src
            .lines()
            .filter_map(|l| l.trim().strip_prefix("MMQ_VARIANT(NAME, M,"))
            .map(|rest| {
                let v: Vec<usize> = rest
                    .split([',', ')'])
                    .filter_map(|x| x.trim().parse().ok())
                    .collect();
                (v[0], v[1], v[2], v[3])
            })
            .collect();
        assert_eq!(variants, MMQ_TILES.to_vec());
    }

    #[test]
    fn supported_types() {
        for ty in [
            GgmlType::Q4_K,
            GgmlType::Q6_K,
            GgmlType::Q8_0,
            GgmlType::MXFP4,
        ] {
            assert!(mmq_supported(ty), "{ty}");
        }
        for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
            assert!(!mmq_supported(ty), "{ty}");
        }
    }
}
