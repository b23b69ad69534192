//! CUDA backend: a device layer on cudarc with dynamic loading (this crate builds and its tests
//! pass on machines without CUDA; a GPU is detected at run time) and kernels written in CUDA C
//! (`kernels/cuda/*.cu`), compiled by NVRTC for the device's architecture and cached on disk.
//!
//! - [`device`]: context, compute + copy streams, events, copies, context overhead measurement.
//! - [`arena`]: the VRAM arena with a hard budget and regions (weights, KV, scratch, workspace).
//! - [`host`]: pinned host buffers and in-place registration of host ranges.
//! - [`nvrtc`]: compilation and the disk cache.
//! - [`kernels`]: the loaded kernels and their launchers.
//! - [`blas`]: cuBLAS GEMM (f16/bf16 in, f32 accumulate) for prefill.
//!
//! [`Gpu`] bundles them; [`Gpu::matmul`] picks the fused GEMV (few rows: int8 activations for
//! quantized weights, see gemv.cu), MMQ (int8 tensor cores on quantized weights, see mmq.cu; only
//! with [`MMQ_ENV`] set) or dequantize + GEMM ([`matmul_path`]).

pub mod arena;
pub mod blas;
pub mod device;
pub mod error;
pub mod graph;
pub mod host;
pub mod kernels;
pub mod nvrtc;

pub use arena::{DevBuf, RegionId, RegionKind, RegionReport, VramArena};
pub use blas::{Blas, GemmInput};
pub use cudarc::driver::{CudaEvent, CudaStream, DriverError};
pub use device::{DeviceInfo, GpuDevice};
pub use error::{CudaError, CudaResult};
pub use graph::CapturedGraph;
pub use host::{HostRegistration, PinnedBuf};
pub use kernels::{AttnParams, CudaKernels, KvCells, RopeArgs, RopeKind};

use pshard_model::ggml_type::GgmlType;
use std::ops::RangeInclusive;
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// Batch rows at or below which every matmul uses the fused GEMV instead of dequantize + GEMM
/// (callers provide GEMM scratch above it). Measured on the H200 (2026-11-21): the f32 GEMV of F16
/// weights loses to the GEMM at 8 rows (889 vs 1176 GB/s on 4096×4096).
pub const GEMV_MAX_ROWS: usize = 4;

/// Batch rows at or below which matmuls of quantized weights use the int8 GEMV, with or without
/// GEMM scratch. Measured on the H200 (2026-11-21, CUDA graphs): at 8 rows it reads Q4_K weights
/// at 650-870 GB/s against 370-400 for dequantize + GEMM, Q8_0 at 810-1190 against 710-770.
pub const GEMV_INT8_MAX_ROWS: usize = kernels::GEMV_MAX_NB;

/// Batch rows for which matmuls of quantized weights use MMQ when [`MMQ_ENV`] is `1` (off by
/// default). Measured with `cuda_bench_mmq` on the H100 (docs/PERF.md, 2026-12-05), MMQ's own tile
/// against the better of the int8 GEMV and dequantize + cuBLAS: it wins only on many rows and few
/// columns — 14336×4096 Q8_0 at 16/32/64 tokens 61/71/96 µs against 108/114/115, Q4_K at 16/32
/// 74/93 against 79/110 — and loses on every 4096-row matrix (4096×14336 Q4_K at 16 tokens: 252
/// µs against 84), where too few row blocks fill the SMs and each walks all of K alone.
pub const MMQ_TOKENS: RangeInclusive<usize> = 8..=128;

/// Environment variable that turns MMQ on (`1`) for [`MMQ_TOKENS`] rows; read once per process.
pub const MMQ_ENV: &str = "PSHARD_CUDA_MMQ";

/// Whether [`MMQ_ENV`] is `1` in this process.
pub fn mmq_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var(MMQ_ENV).is_ok_and(|v| v.trim() == "1"))
}

/// Whether a matmul of `ty` weights over `n` batch rows takes MMQ ([`mmq_enabled`], `n` in
/// [`MMQ_TOKENS`], a type with MMQ kernels).
pub fn mmq_path(ty: GgmlType, n: usize) -> bool {
    mmq_enabled() && MMQ_TOKENS.contains(&n) && kernels::mmq_supported(ty)
}

/// The kernels [`Gpu::matmul`] runs a matmul on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulPath {
    /// The fused GEMV (int8 activations for quantized weights).
    Gemv,
    /// The int8 tensor-core matmul of quantized weights.
    Mmq,
    /// Weights dequantized to f16 in scratch, then cuBLAS (activations in f16/bf16).
    Gemm,
}

/// The path of a matmul of `ty` weights over `n` batch rows, given whether GEMM scratch is at
/// hand and whether the GEMM is forced (exact mode). The one rule [`Gpu::matmul`] follows and the
/// planner sizes GEMM scratch by.
pub fn matmul_path(ty: GgmlType, n: usize, gemm_scratch: bool, force_gemm: bool) -> MatmulPath {
    let quantized = !matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16);
    let gemv_max = if quantized {
        GEMV_INT8_MAX_ROWS
    } else {
        GEMV_MAX_ROWS
    };
    if force_gemm {
        MatmulPath::Gemm
    } else if quantized && mmq_path(ty, n) {
        MatmulPath::Mmq
    } else if gemm_scratch && n > gemv_max {
        MatmulPath::Gemm
    } else {
        MatmulPath::Gemv
    }
}

/// (token, expert) pairs up to which MoE experts run as one GEMV per pair, in one launch per
/// matrix. Above, the pairs are sorted by expert on the device and every matrix is one grouped GEMM
/// that decodes each used expert once per tile of its tokens (`moe_gemm`): reading an expert once
/// per pair costs more from about 32 tokens × 8 experts on the H200.
pub const MOE_GEMV_MAX_PAIRS: usize = 256;

/// VRAM the backend reserves besides what programs allocate: the cuBLAS workspace and the int8
/// GEMV's activation scratch (regions of the arena, made once per device).
pub const WORKSPACE_BYTES: u64 = blas::BLAS_WORKSPACE + kernels::ACT_SCRATCH_BYTES;

/// Batches at or below this many tokens are captured as CUDA graphs (decode).
pub const GRAPH_MAX_TOKENS: usize = 4;

/// Why no GPU is usable here, or `None` if device `ordinal` can be opened. Never panics.
pub fn probe(ordinal: usize) -> Result<DeviceSummary, CudaError> {
    let count = device::device_count()?;
    if ordinal >= count {
        return Err(CudaError::NoDevice { ordinal, count });
    }
    if !nvrtc::nvrtc_present() {
        return Err(CudaError::MissingLibrary { lib: "libnvrtc" });
    }
    if !blas::blas_present() {
        return Err(CudaError::MissingLibrary { lib: "libcublas" });
    }
    Ok(DeviceSummary { ordinal, count })
}

/// Result of a successful [`probe`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceSummary {
    /// The ordinal probed.
    pub ordinal: usize,
    /// Devices the driver reports.
    pub count: usize,
}

/// A ready GPU: device, kernels and a cuBLAS handle on the compute stream.
pub struct Gpu {
    /// Kernels (declared before `dev` so they unload while the context is alive).
    pub kernels: CudaKernels,
    /// cuBLAS handle.
    pub blas: Blas,
    /// The device.
    pub dev: Arc<GpuDevice>,
    /// The workspace region (cuBLAS).
    pub workspace_region: RegionId,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("dev", &self.dev)
            .field("kernels", &self.kernels)
            .finish()
    }
}

/// Scratch for the dequantize + GEMM path of [`Gpu::matmul`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmScratch {
    /// Room for the dequantized weight slice: `rows × cols` 16-bit values.
    pub weights: u64,
    /// Room for the converted activations: `n × cols` 16-bit values.
    pub acts: u64,
}

impl GemmScratch {
    /// Bytes of each part for a `rows × cols` weight and `n` activation rows.
    pub fn bytes(rows: usize, cols: usize, n: usize) -> (u64, u64) {
        ((rows * cols * 2) as u64, (n * cols * 2) as u64)
    }
}

impl Gpu {
    /// Opens device `ordinal` with a VRAM budget (`None`: free memory minus a margin), loads the
    /// kernels (from `cache_dir` when cached) and creates the cuBLAS handle.
    pub fn open(ordinal: usize, budget: Option<u64>, cache_dir: &Path) -> CudaResult<Gpu> {
        probe(ordinal)?;
        let dev = GpuDevice::open(ordinal, budget)?;
        let kernels = CudaKernels::load(&dev, cache_dir)?;
        let workspace_region =
            dev.create_region(RegionKind::Workspace, "cublas", blas::BLAS_WORKSPACE)?;
        let ws = dev.alloc(workspace_region, blas::BLAS_WORKSPACE, "cuBLAS workspace")?;
        let blas = Blas::new(&dev, dev.compute_stream(), ws)?;
        Ok(Gpu {
            kernels,
            blas,
            dev,
            workspace_region,
        })
    }

    /// The compute stream.
    pub fn stream(&self) -> &Arc<CudaStream> {
        self.dev.compute_stream()
    }

    /// `out[t, r] = Σ_c W[row0 + r, c] x[t, c] (+ bias)` for `r < nrows`, `t < n`, on the compute
    /// stream. `w` is the whole weight (GGUF blocks, `rows_total × cols`); `out` has row stride
    /// `ldo`; `bias` (f32, whole length) is optional. The path is [`matmul_path`]'s: the fused
    /// GEMV for `n <=` [`GEMV_MAX_ROWS`] (quantized weights: [`GEMV_INT8_MAX_ROWS`]), MMQ for
    /// quantized weights where [`mmq_path`] holds, else the slice dequantized into `scratch` and a
    /// GEMM; `force_gemm` takes the GEMM at any `n` (no 8-bit rounding of the activations: the
    /// exact-activation mode compared with the CPU engine's). The GEMV and MMQ paths allocate
    /// nothing and never wait for the host, so they can be captured in a CUDA graph.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        &self,
        ty: GgmlType,
        w: u64,
        cols: usize,
        row0: usize,
        nrows: usize,
        x: u64,
        n: usize,
        out: u64,
        ldo: usize,
        bias: Option<u64>,
        scratch: Option<GemmScratch>,
        force_gemm: bool,
    ) -> CudaResult<()> {
        let rb = kernels::row_bytes(ty, cols)? as u64;
        let (wr, br) = (w + row0 as u64 * rb, bias.map(|b| b + row0 as u64 * 4));
        match (matmul_path(ty, n, scratch.is_some(), force_gemm), scratch) {
            (MatmulPath::Gemm, Some(sc)) => {
                self.gemm_f16(ty, w, cols, row0, nrows, x, n, out, ldo, bias, sc)
            }
            (MatmulPath::Gemm, None) => Err(CudaError::Invalid(
                "the GEMM path was asked for without GEMM scratch".into(),
            )),
            (MatmulPath::Mmq, _) => self.kernels.mmq(
                ty,
                wr,
                nrows,
                cols,
                x,
                cols,
                out,
                ldo,
                n,
                br,
                None,
                self.stream(),
            ),
            (MatmulPath::Gemv, _) => {
                self.kernels
                    .gemv(ty, wr, nrows, cols, x, cols, out, ldo, n, br, self.stream())
            }
        }
    }

    /// The GEMM path of [`Gpu::matmul`]: the weight slice dequantized to f16 in `sc` (BF16 weights
    /// used as they are), activations converted to f16/bf16, cuBLAS with f32 accumulation.
    #[allow(clippy::too_many_arguments)]
    fn gemm_f16(
        &self,
        ty: GgmlType,
        w: u64,
        cols: usize,
        row0: usize,
        nrows: usize,
        x: u64,
        n: usize,
        out: u64,
        ldo: usize,
        bias: Option<u64>,
        sc: GemmScratch,
    ) -> CudaResult<()> {
        let s = self.stream();
        let rb = kernels::row_bytes(ty, cols)? as u64;
        let wr = w + row0 as u64 * rb;
        let br = bias.map(|b| b + row0 as u64 * 4);
        let input = if ty == GgmlType::BF16 {
            GemmInput::Bf16
        } else {
            GemmInput::F16
        };
        let wsrc = if ty == GgmlType::BF16 {
            wr
        } else {
            self.kernels
                .dequant_f16(ty, wr, sc.weights, nrows, cols, s)?;
            sc.weights
        };
        match input {
            GemmInput::F16 => self.kernels.f32_to_f16(x, sc.acts, n * cols, s)?,
            GemmInput::Bf16 => self.kernels.f32_to_bf16(x, sc.acts, n * cols, s)?,
        }
        self.blas
            .matmul(input, wsrc, nrows, cols, sc.acts, n, out, ldo)?;
        if let Some(b) = br {
            self.kernels.add_bias(out, b, n, nrows, ldo, s)?;
        }
        Ok(())
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        let _ = self.dev.synchronize();
    }
}
