//! The compiled kernels and their launchers. Every launcher takes device addresses (`u64`) and
//! the stream to enqueue on; shapes are checked here so a bad call is an error, not a fault.

// Launchers mirror their kernels' parameter lists (device addresses, shapes, strides, stream).
#![allow(clippy::too_many_arguments)]

use super::arena::{RegionId, RegionKind};
use super::device::GpuDevice;
use super::error::{check, CudaError, CudaResult};
use super::nvrtc::{compile_cached, ModuleBuild, SOURCES};
use crate::kv::KvType;
use crate::quant::ActFormat;
use cudarc::driver::{sys, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;
use pshard_model::ggml_type::GgmlType;
use pshard_model::graph::{Activation, Routing, SWIGLU_OAI_ALPHA, SWIGLU_OAI_LIMIT};
use pshard_model::spec::Gating;
use std::collections::HashMap;
use std::ffi::c_void;
use std::path::Path;
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

/// A kernel argument passed by value.
pub trait KArg {
    /// Address of the value (cuLaunchKernel copies it).
    fn addr(&self) -> *mut c_void;
}
macro_rules! karg {
    ($($t:ty),*) => {$(impl KArg for $t { fn addr(&self) -> *mut c_void { self as *const $t as *mut c_void } })*};
}
karg!(u64, i64, i32, u32, f32);

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
karg!(RopeYarnArg);

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
struct RopeKArg {
    n_dims: i32,
    mode: i32,
    base: f32,
    pos_scale: f32,
    freq_factors: u64,
    yarn: RopeYarnArg,
}
karg!(RopeKArg);

impl RopeArgs {
    /// The launch argument, after checking the rotated dimensions (even, at most `head_dim`).
    fn karg(&self) -> CudaResult<RopeKArg> {
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

/// Parameters of an attention launch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnParams {
    /// Query heads.
    pub n_head: usize,
    /// KV heads.
    pub n_kv: usize,
    /// Key head dimension.
    pub dk: usize,
    /// Value head dimension.
    pub dv: usize,
    /// KV cache capacity in positions.
    pub n_ctx: usize,
    /// Score scale.
    pub scale: f32,
    /// Soft-cap of scores (0 = none).
    pub softcap: f32,
    /// Sliding window (0 = none).
    pub window: usize,
    /// Latent attention: one KV head whose values are the first `dv` of each `dk`-wide K row.
    pub v_in_k: bool,
}

/// Weight rows at or below which a single-row GEMV puts a whole block on each row (more warps in
/// flight for small matrices such as k/v projections).
pub const GEMV_SPLITK_MAX_ROWS: usize = 4096;

/// Query rows at or below which attention uses the split-KV kernel.
pub const ATTN_SPLIT_MAX_ROWS: usize = 4;

/// Most columns (reduction length) of a quantized GEMV: sizes the int8 activation scratch.
pub const GEMV_MAX_COLS: usize = 1 << 17;

/// Activation rows quantized and dotted per GEMV launch (kernels for at most 1, 2, 4, 8 rows).
pub const GEMV_MAX_NB: usize = 8;

/// The (rows per team, warps per team) variants of the int8 GEMV kernels (`GEMVQ_NB` in gemv.cu).
const GEMVQ_SHAPES: [(usize, usize); 3] = [(2, 4), (2, 1), (4, 1)];

/// The (rows per team, warps per team) variants of the int8 MoE GEMV kernels (`MOE_GEMVQ_KERNELS`
/// in gemv.cu).
const MOE_GEMVQ_SHAPES: [(usize, usize); 3] = [(1, 1), (2, 1), (2, 4)];

/// Most experts of a MoE layer the device-side sort handles (`moe_route`'s limit too).
pub const MOE_MAX_EXPERTS: usize = 1024;

/// The (BM weight rows, BN tokens, threads) tiles of the grouped expert GEMM
/// (`MOE_GEMM_KERNELS` in moe_gemm.cu).
const MOE_GEMM_TILES: [(usize, usize, u32); 2] = [(64, 64, 128), (128, 64, 256)];

/// Rows per token tile of the grouped expert GEMM (`MG_BN` in moe_gemm.cu): [`CudaKernels::moe_sort`]
/// numbers each expert's tiles of this many rows.
pub const MOE_GEMM_BN: usize = 64;

/// Dynamic shared memory of a grouped expert GEMM tile: the f16 weight and activation tiles,
/// 256 columns padded to 264 (`MG_LD` in moe_gemm.cu).
fn moe_gemm_smem(bm: usize, bn: usize) -> usize {
    (bm + bn) * 264 * 2
}

/// The int8 activation scratch of the quantized GEMV: one region of the VRAM arena, made when the
/// kernels load and freed with them, so a GEMV call allocates nothing (and can be captured in a
/// CUDA graph). Calls on one stream reuse it in stream order.
struct ActScratch {
    dev: Arc<GpuDevice>,
    region: RegionId,
    /// int8 quants, `GEMV_MAX_NB × GEMV_MAX_COLS`.
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

/// How attention finds its KV cells: K and V rows, each sequence owning `AttnParams::n_ctx`
/// consecutive cells (position `p` in cell `p % n_ctx` of its sequence's span).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvCells {
    /// The rows' element type (f16, or Q8_0 blocks along each row).
    pub ty: KvType,
    /// K rows.
    pub k: u64,
    /// V rows.
    pub v: u64,
    /// Sequence id of each query token (i32 on the device), for the split-KV (decode) path.
    pub seq: u64,
    /// First cell of the batch's sequence, for the flash (prefill) path, which takes one
    /// sequence per call.
    pub base: usize,
}

impl ActScratch {
    const Q_BYTES: u64 = (GEMV_MAX_NB * GEMV_MAX_COLS) as u64;
    // Q8_1 needs 8 bytes per 32 elements, Q8_K 4 per 256; sums: 2 bytes per 16.
    const D_BYTES: u64 = (GEMV_MAX_NB * GEMV_MAX_COLS / 4) as u64;
    const BS_BYTES: u64 = (GEMV_MAX_NB * GEMV_MAX_COLS / 8) as u64;

    fn new(dev: &Arc<GpuDevice>) -> CudaResult<ActScratch> {
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

const FLASH_DIMS: &[(usize, usize)] = &[(64, 64), (128, 64), (256, 32)];

fn flash_smem(d: usize, bkv: usize) -> usize {
    // Two stages of K and V tiles, rows padded by 8 halves.
    2 * 2 * bkv * (d + 8) * 2
}

/// Keys per shared-memory tile of the split-KV kernel (`SPLIT_TILE` in attention.cu).
pub const ATTN_SPLIT_TILE: usize = 64;

/// Most splits per query row and head (`attn_combine` holds one factor per split in 64 floats).
pub const ATTN_MAX_SPLITS: usize = 64;

/// Row stride (halves) of a staged K or V tile in `attn_split` (`split_stride` in attention.cu).
fn split_stride(d: usize) -> usize {
    d.div_ceil(32) * 32 + 16
}

/// Dynamic shared memory of `attn_split`: one tile of K and one of V.
fn split_smem(dk: usize, dv: usize) -> usize {
    ATTN_SPLIT_TILE * (split_stride(dk) + split_stride(dv)) * 2
}

/// Scratch bytes the split-KV attention path needs for one call of exactly `n` query rows (0 when
/// the flash kernel is used).
fn attention_scratch_rows(p: &AttnParams, n: usize) -> usize {
    if uses_flash(p, n) {
        0
    } else {
        n * p.n_head * n_split(p, n) * (p.dv + 2) * 4
    }
}

/// Scratch bytes the attention kernels need for any call of 1 to `n` query rows: a program sized
/// for `n` rows also runs shorter batches (a prompt's tail, one sequence of several), and those
/// below the flash threshold take the split-KV path even when `n` itself would not. A pure function
/// of the shapes, so the planner sizes exactly what the runtime allocates.
pub fn attention_scratch(p: &AttnParams, n: usize) -> usize {
    // Past 1024 rows every head has one split (`n_split`), so the bytes only grow with the rows:
    // the rows up to 1024 and `n` itself cover the maximum.
    (1..=n.clamp(1, 1024))
        .chain([n.max(1)])
        .map(|m| attention_scratch_rows(p, m))
        .max()
        .unwrap_or(0)
}

fn uses_flash(p: &AttnParams, n: usize) -> bool {
    n > ATTN_SPLIT_MAX_ROWS
        && !p.v_in_k
        && p.dk == p.dv
        && FLASH_DIMS.iter().any(|&(d, _)| d == p.dk)
}

/// Query heads per block of `mla_attn_split` (`MLA_HG` in attention.cu).
const MLA_HG: usize = 16;
/// Keys per tile of `mla_attn_split` (`MLA_TILE`).
const MLA_TILE: usize = 32;
/// Widest latent-attention values (`MLA_MAX_DV`).
const MLA_MAX_DV: usize = 512;
/// Widest latent-attention keys the raised shared-memory limit covers (deepseek2: 576).
const MLA_MAX_DK: usize = 576;

/// Dynamic shared memory of `mla_attn_split`: the block's queries, one key tile, its scores.
fn mla_smem(dk: usize) -> usize {
    MLA_HG * dk * 4 + MLA_TILE * dk * 2 + MLA_HG * MLA_TILE * 4
}

/// Whether `mla_attn_split` covers latent attention of these parameters.
fn mla_supported(p: &AttnParams) -> CudaResult<()> {
    if p.n_kv != 1
        || p.dk > MLA_MAX_DK
        || p.dv > MLA_MAX_DV
        || p.dv > p.dk
        || !p.dk.is_multiple_of(2)
        || !p.dv.is_multiple_of(2)
        || p.softcap != 0.0
    {
        return Err(CudaError::Invalid(format!(
            "latent attention of {} KV heads, key/value widths {}/{} (at most {MLA_MAX_DK}/{MLA_MAX_DV}, even, values inside keys, no soft-cap) is not supported on CUDA",
            p.n_kv, p.dk, p.dv
        )));
    }
    Ok(())
}

/// Splits of the split-KV path for `n` query rows: enough that a call at full context has about
/// 1024 blocks, at most [`ATTN_MAX_SPLITS`] and no more than the cache has key tiles. The kernels
/// size each split on the device from the query's position (a multiple of [`ATTN_SPLIT_TILE`]
/// keys), so short contexts read only their keys.
fn n_split(p: &AttnParams, n: usize) -> usize {
    let want = 1024usize
        .div_ceil((p.n_head * n).max(1))
        .clamp(1, ATTN_MAX_SPLITS);
    want.min(p.n_ctx.div_ceil(ATTN_SPLIT_TILE)).max(1)
}

/// Refuses Q8_0 KV dims that are not whole 32-value blocks (`(what, values)` pairs).
fn check_q8_0_dims(dims: &[(&str, usize)]) -> CudaResult<()> {
    KvType::Q8_0.check_dims(dims).map_err(CudaError::Invalid)
}

fn blocks(n: usize, per: usize) -> u32 {
    n.div_ceil(per).max(1) as u32
}

impl CudaKernels {
    /// Compiles (or reads from `cache_dir`) every source for this device and loads it; reserves
    /// the GEMV's int8 activation scratch (1.4 MiB) in the arena.
    pub fn load(dev: &Arc<GpuDevice>, cache_dir: &Path) -> CudaResult<CudaKernels> {
        dev.bind()?;
        let arch = dev.info().arch();
        let mut funcs = HashMap::new();
        let mut modules = Vec::new();
        let mut builds = Vec::new();
        for src in SOURCES {
            let (cubin, build) = compile_cached(src, &arch, dev.info().driver_version, cache_dir)?;
            let module = dev
                .context()
                .load_module(Ptx::from_binary(cubin))
                .map_err(|e| CudaError::Driver {
                    call: "loading a kernel module",
                    err: format!("{}: {e:?}", src.name),
                })?;
            for name in kernel_names(src.text) {
                let f = module.load_function(&name).map_err(|e| {
                    CudaError::Invalid(format!("kernel {name} missing from {}: {e:?}", src.name))
                })?;
                funcs.insert(name, f);
            }
            modules.push(module);
            builds.push(build);
        }
        let k = CudaKernels {
            funcs,
            _modules: modules,
            builds,
            smem_optin: dev.info().smem_optin,
            sm_count: dev.info().sm_count,
            acts: ActScratch::new(dev)?,
            pdl: dev.info().cc.0 >= 9
                && std::env::var("PSHARD_GEMV_PDL").map_or(true, |v| v != "0"),
        };
        // Kernels whose largest tiles need more dynamic shared memory than the default 48 KiB.
        for &(d, bkv) in FLASH_DIMS {
            k.allow_smem(&format!("flash_attn_{d}"), flash_smem(d, bkv))?;
            k.allow_smem(&format!("flash_attn_q8_{d}"), flash_smem(d, bkv))?;
        }
        for &(bm, bn, _) in &MOE_GEMM_TILES {
            for &ty in CUDA_TYPES {
                let suffix = type_geom(ty).map_or("", |g| g.suffix);
                k.allow_smem(
                    &format!("moe_gemm_{suffix}_{bm}x{bn}"),
                    moe_gemm_smem(bm, bn),
                )?;
            }
        }
        // The largest tile pair (head dims 256).
        k.allow_smem("attn_split", split_smem(256, 256))?;
        k.allow_smem("attn_split_q8", split_smem(256, 256))?;
        k.allow_smem("mla_attn_split", mla_smem(MLA_MAX_DK))?;
        k.allow_smem("mla_attn_split_q8", mla_smem(MLA_MAX_DK))?;
        Ok(k)
    }

    /// How each module was obtained (cache hits, compile times).
    pub fn builds(&self) -> &[ModuleBuild] {
        &self.builds
    }

    /// Whether every module came from the disk cache.
    pub fn all_cached(&self) -> bool {
        self.builds.iter().all(|b| b.cache_hit)
    }

    /// One log line describing the build, e.g. for `pshard run`.
    pub fn build_summary(&self) -> String {
        let hits = self.builds.iter().filter(|b| b.cache_hit).count();
        let ms: f64 = self.builds.iter().map(|b| b.ms).sum();
        if hits == self.builds.len() {
            format!("nvrtc cache hit: {hits}/{} modules loaded from cache, nothing compiled ({ms:.0} ms)", self.builds.len())
        } else {
            format!(
                "nvrtc compiled {}/{} modules ({ms:.0} ms), cached for the next start",
                self.builds.len() - hits,
                self.builds.len()
            )
        }
    }

    /// Number of kernels loaded.
    pub fn len(&self) -> usize {
        self.funcs.len()
    }

    /// Whether no kernel is loaded.
    pub fn is_empty(&self) -> bool {
        self.funcs.is_empty()
    }

    /// Raises kernel `name`'s dynamic shared memory limit to `bytes`.
    fn allow_smem(&self, name: &str, bytes: usize) -> CudaResult<()> {
        let f = self.func(name)?;
        // SAFETY: sets an attribute of a function loaded from one of our modules, which stays
        // loaded as long as `self`.
        check("raising a kernel's shared memory limit", unsafe {
            sys::cuFuncSetAttribute(
                f.cu_function(),
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
        })
    }

    fn func(&self, name: &str) -> CudaResult<&CudaFunction> {
        self.funcs
            .get(name)
            .ok_or_else(|| CudaError::Invalid(format!("no CUDA kernel named {name}")))
    }

    /// Launches kernel `name`.
    pub fn launch(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        stream: &CudaStream,
        args: &[&dyn KArg],
    ) -> CudaResult<()> {
        let f = self.func(name)?;
        if grid.1 > 65535 || grid.2 > 65535 {
            return Err(CudaError::Invalid(format!(
                "grid {grid:?} of {name} is too large"
            )));
        }
        if smem as i32 > self.smem_optin {
            return Err(CudaError::Invalid(format!(
                "{name} needs {smem} bytes of shared memory, the device has {}",
                self.smem_optin
            )));
        }
        let mut params: Vec<*mut c_void> = args.iter().map(|a| a.addr()).collect();
        // SAFETY: params point at values borrowed for this call; the kernel's parameter list matches
        // the launcher that built `args` (each launcher mirrors its kernel's signature).
        unsafe {
            check(
                "launching a kernel",
                sys::cuLaunchKernel(
                    f.cu_function(),
                    grid.0,
                    grid.1,
                    grid.2,
                    block,
                    1,
                    1,
                    smem,
                    stream.cu_stream(),
                    params.as_mut_ptr(),
                    std::ptr::null_mut(),
                ),
            )
            .map_err(|e| match e {
                CudaError::Driver { call, err } => CudaError::Driver {
                    call,
                    err: format!("{name}: {err}"),
                },
                e => e,
            })
        }
    }

    // ----------------------------------------------------------------------------------------
    // Weights
    // ----------------------------------------------------------------------------------------

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
        self.launch(
            &format!("dequant_{}", g.suffix),
            (blocks(n_units as usize, 256), 1, 1),
            256,
            0,
            s,
            &[&src, &dst, &n_units],
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
    fn quantize_rows(
        &self,
        format: ActFormat,
        x: u64,
        ldx: usize,
        cols: usize,
        n: usize,
        s: &CudaStream,
    ) -> CudaResult<QuantizedActsDev> {
        let (name, qk) = match format {
            ActFormat::Q8_0 => ("quantize_q8_0", 32),
            ActFormat::Q8_1 => ("quantize_q8_1", 32),
            ActFormat::Q8K => ("quantize_q8_k", 256),
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
        if format == ActFormat::Q8K {
            self.launch(
                name,
                grid,
                256,
                0,
                s,
                &[&x, &ldx_i, &cols_i, &a.q, &a.d, &a.bs],
            )?;
        } else {
            self.launch(name, grid, 256, 0, s, &[&x, &ldx_i, &cols_i, &a.q, &a.d])?;
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
        if let Some(v) = std::env::var("PSHARD_GEMV_RW").ok().and_then(|v| {
            let (r, w) = v.split_once(',')?;
            Some((
                r.trim().parse::<usize>().ok()?,
                w.trim().parse::<usize>().ok()?,
            ))
        }) {
            if GEMVQ_SHAPES.contains(&v) {
                return v;
            }
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
    /// (any GEMV of other activations in between overwrites them).
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
        self.launch_gemvq(
            &format!("gemvq_{}_{max_nb}r{r}w{tw}", g.suffix),
            (blocks(rows, 4 * r / tw), 1, 1),
            128,
            0,
            s,
            &[
                &w, &rb, &rows_i, &cols_i, &nb_i, &a.q, &a.d, &a.bs, &y, &ldy_i, &bias,
            ],
        )
    }

    /// Launches an int8 GEMV kernel; with `pdl`, as a programmatic dependent of the kernel before
    /// it on the stream (its quantizer): the GEMV's blocks start early and wait on the device
    /// (`griddepcontrol.wait`) before reading the activations. Capturable in CUDA graphs.
    fn launch_gemvq(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        stream: &CudaStream,
        args: &[&dyn KArg],
    ) -> CudaResult<()> {
        if !self.pdl {
            return self.launch(name, grid, block, smem, stream, args);
        }
        let f = self.func(name)?;
        let mut params: Vec<*mut c_void> = args.iter().map(|a| a.addr()).collect();
        let mut attr = sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value: sys::CUlaunchAttributeValue {
                programmaticStreamSerializationAllowed: 1,
            },
        };
        let config = sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: smem,
            hStream: stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        // SAFETY: config, attr and params outlive the call; params point at values borrowed for
        // this call and match the kernel's parameter list (the launcher mirrors its signature).
        unsafe {
            check(
                "launching a kernel",
                sys::cuLaunchKernelEx(
                    &config,
                    f.cu_function(),
                    params.as_mut_ptr(),
                    std::ptr::null_mut(),
                ),
            )
            .map_err(|e| match e {
                CudaError::Driver { call, err } => CudaError::Driver {
                    call,
                    err: format!("{name}: {err}"),
                },
                e => e,
            })
        }
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
                self.launch(
                    &format!("gemv_{}_1k", g.suffix),
                    (rows as u32, 1, 1),
                    128,
                    0,
                    s,
                    &[&w, &rb, &rows_i, &cols_i, &xp, &yp, &bias],
                )?;
                done += 1;
                continue;
            }
            // Rows per warp: two rows share each activation load at batch 2 and 4.
            let r = if nb == 2 || nb == 4 { 2 } else { 1 };
            self.launch(
                &format!("gemv_{}_{nb}r{r}", g.suffix),
                (blocks(rows, 4 * r), 1, 1),
                128,
                0,
                s,
                &[&w, &rb, &rows_i, &cols_i, &xp, &ldx_i, &yp, &ldy_i, &bias],
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
        self.launch(
            &format!("get_rows_{}", g.suffix),
            (blocks(units, 128), n as u32, 1),
            128,
            0,
            s,
            &[&table, &rb, &cols_i, &ids, &out, &ldo_i, &scale],
        )
    }

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
                let name = format!("moe_gemvq_{}_r{r}w{tw}", g.suffix);
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
                    self.launch_gemvq(
                        &name,
                        (blocks(rows, 4 * r / tw), chunk as u32, 1),
                        128,
                        0,
                        s,
                        &[
                            &w, &eb, &rb, &rows_i, &cols_i, &a.q, &a.d, &a.bs, &p0_i, &x_div_i,
                            &route, &n_used_i, &yo, &ldy_i,
                        ],
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
                    self.launch(
                        &format!("moe_gemv_{}", g.suffix),
                        (blocks(rows, 4), chunk as u32, 1),
                        128,
                        0,
                        s,
                        &[
                            &w, &eb, &rb, &rows_i, &cols_i, &xo, &ldx_i, &x_div_i, &ro, &n_used_i,
                            &yo, &ldy_i,
                        ],
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
        if let Some(v) = std::env::var("PSHARD_MOE_RW").ok().and_then(|v| {
            let (r, w) = v.split_once(',')?;
            Some((
                r.trim().parse::<usize>().ok()?,
                w.trim().parse::<usize>().ok()?,
            ))
        }) {
            if MOE_GEMVQ_SHAPES.contains(&v) {
                return v;
            }
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

    // ----------------------------------------------------------------------------------------
    // Row and elementwise ops
    // ----------------------------------------------------------------------------------------

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
        self.launch(
            "rms_norm",
            (rows as u32, 1, 1),
            threads,
            0,
            s,
            &[&x, &w, &y, &(cols as i32), &eps],
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
        self.launch(
            "head_rms_norm",
            (blocks(total, 8), 1, 1),
            256,
            0,
            s,
            &[&x, &w, &(total as i32), &(head_dim as i32), &eps],
        )
    }

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
        self.launch(
            "qk_norm_rope",
            (blocks(heads, 8), 1, 1),
            256,
            0,
            s,
            &[
                &q,
                &k,
                &qw,
                &kw,
                &eps,
                &pos,
                &(n_tokens as i32),
                &(n_q as i32),
                &(n_k as i32),
                &(rope.head_dim as i32),
                &r,
            ],
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
        self.launch(
            "rope",
            (blocks(total, 256), 1, 1),
            256,
            0,
            s,
            &[
                &x,
                &pos,
                &(n_tokens as i32),
                &(n_heads as i32),
                &(rope.head_dim as i32),
                &r,
            ],
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
        self.launch(
            "rope_heads",
            (blocks(total, 256), 1, 1),
            256,
            0,
            s,
            &[
                &src,
                &i(ld_src),
                &i(src_stride),
                &i(src_off),
                &dst,
                &i(ld_dst),
                &i(dst_stride),
                &i(dst_off),
                &i(n_heads),
                &pos,
                &i(n_tokens),
                &r,
            ],
        )
    }

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
        let (name, grid_y, threads, smem, head_dim) = match ty {
            KvType::F16 => ("kv_shift", blocks(cols / 2, 128), 128, 0, head_dim),
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
                ("kv_shift_q8_0", (cols / hd) as u32, 256, smem as u32, hd)
            }
        };
        self.launch(
            name,
            (n_runs as u32, grid_y, 1),
            threads,
            smem,
            s,
            &[
                &rows,
                &(cols as i32),
                &moves,
                &run_start,
                &cyclic,
                &(head_dim as i32),
                &(rope_off as i32),
                &delta,
                &r,
            ],
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
        self.launch(
            "mla_kv",
            (n as u32, 1, 1),
            256,
            0,
            s,
            &[
                &x,
                &(ldx as i32),
                &w,
                &out,
                &(ldo as i32),
                &(kv_lora as i32),
                &eps,
                &pos,
                &r,
            ],
        )
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
        self.launch(
            "head_route",
            (blocks(n * 2 * n_heads, 256), 1, 1),
            256,
            0,
            s,
            &[&route, &(n as i32), &(n_heads as i32)],
        )
    }

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
        self.launch(
            "glu",
            (blocks(n, 256), 1, 1),
            256,
            0,
            s,
            &[
                &gate,
                &up,
                &out,
                &(n as i64),
                &code,
                &SWIGLU_OAI_ALPHA,
                &SWIGLU_OAI_LIMIT,
            ],
        )
    }

    /// `out = a + b` over `n` values.
    pub fn add(&self, a: u64, b: u64, out: u64, n: usize, s: &CudaStream) -> CudaResult<()> {
        self.launch(
            "add",
            (blocks(n, 256), 1, 1),
            256,
            0,
            s,
            &[&a, &b, &out, &(n as i64)],
        )
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
        self.launch(
            "add_bias",
            (blocks(total, 256), 1, 1),
            256,
            0,
            s,
            &[&y, &bias, &(cols as i32), &(ldy as i32), &(total as i64)],
        )
    }

    /// `x = cap · tanh(x / cap)` in place.
    pub fn softcap(&self, x: u64, n: usize, cap: f32, s: &CudaStream) -> CudaResult<()> {
        self.launch(
            "softcap",
            (blocks(n, 256), 1, 1),
            256,
            0,
            s,
            &[&x, &(n as i64), &cap],
        )
    }

    /// `x *= k` in place.
    pub fn scale(&self, x: u64, n: usize, k: f32, s: &CudaStream) -> CudaResult<()> {
        self.launch(
            "scale",
            (blocks(n, 256), 1, 1),
            256,
            0,
            s,
            &[&x, &(n as i64), &k],
        )
    }

    /// f32 → f16 conversion of `n` values.
    pub fn f32_to_f16(&self, x: u64, y: u64, n: usize, s: &CudaStream) -> CudaResult<()> {
        self.launch(
            "f32_to_f16",
            (blocks(n, 256), 1, 1),
            256,
            0,
            s,
            &[&x, &y, &(n as i64)],
        )
    }

    /// f32 → bf16 conversion of `n` values.
    pub fn f32_to_bf16(&self, x: u64, y: u64, n: usize, s: &CudaStream) -> CudaResult<()> {
        self.launch(
            "f32_to_bf16",
            (blocks(n, 256), 1, 1),
            256,
            0,
            s,
            &[&x, &y, &(n as i64)],
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
        let (name, grid_x) = match ty {
            KvType::F16 => ("kv_write", blocks(row, 256)),
            KvType::Q8_0 => {
                check_q8_0_dims(&[("KV row", row)])?;
                // One warp per 32-value block, eight per launch block.
                ("kv_write_q8_0", blocks(row / 32, 8))
            }
        };
        self.launch(
            name,
            (grid_x, n as u32, 1),
            256,
            0,
            s,
            &[
                &src,
                &(ld_src as i32),
                &cache,
                &(row as i32),
                &pos,
                &seq,
                &(cells as i32),
            ],
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
        self.launch(
            "select_rows",
            (blocks(cols, 256), n as u32, 1),
            256,
            0,
            s,
            &[&x, &rows, &out, &(cols as i32)],
        )
    }

    /// MoE routing of `n` tokens as [`Routing`] says (gating, group limit, top `n_used`,
    /// renormalisation, scale), choosing by the gated values plus `select_bias` (f32 per expert)
    /// when given.
    pub fn moe_route(
        &self,
        logits: u64,
        n: usize,
        r: &Routing,
        select_bias: Option<u64>,
        route: u64,
        s: &CudaStream,
    ) -> CudaResult<()> {
        let (n_expert, n_used) = (r.n_expert, r.n_used);
        let (groups, groups_used) = if r.groups.0 > 1 { r.groups } else { (0, 0) };
        if n_expert > 1024
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
        self.launch(
            "moe_route",
            (blocks(n, 8), 1, 1),
            256,
            0,
            s,
            &[
                &logits,
                &(n as i32),
                &(n_expert as i32),
                &(n_used as i32),
                &gating,
                &select_bias.unwrap_or(0),
                &(groups as i32),
                &(groups_used as i32),
                &(r.normalize as i32),
                &r.scale,
                &route,
            ],
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
            self.launch(
                "moe_add_bias",
                (blocks(cols, 256), c as u32, 1),
                256,
                0,
                s,
                &[
                    &ho,
                    &(ldh as i32),
                    &route,
                    &(n_used as i32),
                    &oo,
                    &(r0 as i32),
                    &bias,
                    &(cols as i32),
                ],
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
        self.launch(
            "moe_combine",
            (blocks(cols, 256), n as u32, 1),
            256,
            0,
            s,
            &[&h, &route, &(n_used as i32), &out, &(cols as i32)],
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
        self.launch(
            "gather_rows_f16",
            (blocks(cols, 256), n as u32, 1),
            256,
            0,
            s,
            &[
                &x,
                &(ldx as i32),
                &rows,
                &(x_div as i32),
                &out,
                &(cols as i32),
            ],
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
        self.launch(
            "scatter_rows",
            (blocks(cols, 256), n as u32, 1),
            256,
            0,
            s,
            &[&x, &rows, &y, &(cols as i32)],
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
        self.launch(
            "moe_sort",
            (1, 1, 1),
            1024,
            0,
            s,
            &[
                &route,
                &(n_tokens as i32),
                &(n_used as i32),
                &(n_expert as i32),
                &offsets,
                &tiles,
                &order,
            ],
        )
    }

    /// The grouped expert GEMM of MoE prefill: for every expert `e < n_expert` and every sorted
    /// row `i` in `offsets[e]..offsets[e + 1]` (as [`Self::moe_sort`] writes them),
    /// `y[row(i), r] = Σ_c W_e[r, c] · x[i, c]` for `r < rows`, where `W_e` is expert `e`'s
    /// `rows × cols` matrix in the stacked GGUF-block tensor at `w` (any type of
    /// [`CUDA_TYPES`], 16-byte aligned), `x` holds f16 rows of `cols` (16-byte aligned) and
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
        self.launch(
            &format!("moe_gemm_{}_{bm}x{bn}", g.suffix),
            (
                blocks(rows, bm),
                (n_pairs.div_ceil(bn) + n_expert + 1).min(65535) as u32,
                1,
            ),
            threads,
            moe_gemm_smem(bm, bn) as u32,
            s,
            &[
                &w,
                &eb,
                &rb,
                &(rows as i32),
                &(cols as i32),
                &(n_expert as i32),
                &x,
                &offsets,
                &tiles,
                &y,
                &(ldy as i32),
                &y_rows,
            ],
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

    // ----------------------------------------------------------------------------------------
    // Attention
    // ----------------------------------------------------------------------------------------

    /// Causal (optionally windowed) attention of `n` query rows over the f16 caches at positions
    /// `pos` (i32 on the device). `q`: `[n, n_head·dk]` f32 (row stride `ldq`), `out`:
    /// `[n, n_head·dv]` f32 (row stride `ldo`). `part` must hold [`attention_scratch`] bytes.
    /// `sinks` (f32 per query head) join each softmax's denominator. With `p.v_in_k` (latent
    /// attention, one KV head) the values are the first `dv` of each K row and `kv.v` is unused.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        p: &AttnParams,
        q: u64,
        ldq: usize,
        kv: KvCells,
        pos: u64,
        n: usize,
        out: u64,
        ldo: usize,
        part: u64,
        sinks: Option<u64>,
        s: &CudaStream,
    ) -> CudaResult<()> {
        let (kc, vc) = (kv.k, kv.v);
        if p.n_kv == 0 || !p.n_head.is_multiple_of(p.n_kv) {
            return Err(CudaError::Invalid(format!(
                "{} query heads cannot share {} KV heads",
                p.n_head, p.n_kv
            )));
        }
        if n == 0 {
            return Ok(());
        }
        let common_tail = (p.scale, p.softcap, p.window as i32);
        let sinks = sinks.unwrap_or(0);
        // The Q8_0 cache's kernels carry a `_q8` infix; every head is whole 32-value blocks.
        let q8 = match kv.ty {
            KvType::F16 => "",
            KvType::Q8_0 => {
                check_q8_0_dims(&[("K head dim", p.dk), ("V head dim", p.dv)])?;
                "_q8"
            }
        };
        if p.v_in_k {
            // Latent attention: `mla_attn_split` stages every K tile once for MLA_HG query heads.
            mla_supported(p)?;
            let ns = n_split(p, n);
            return self.split_then_combine(
                p,
                ns,
                n,
                pos,
                (out, ldo),
                part,
                sinks,
                s,
                |t0, chunk| {
                    self.launch(
                        &format!("mla_attn_split{q8}"),
                        (ns as u32, p.n_head.div_ceil(MLA_HG) as u32, chunk as u32),
                        256,
                        mla_smem(p.dk) as u32,
                        s,
                        &[
                            &(q + (t0 * ldq * 4) as u64),
                            &(ldq as i32),
                            &kv.k,
                            &(p.dk as i32),
                            &part,
                            &(pos + (t0 * 4) as u64),
                            &(kv.seq + (t0 * 4) as u64),
                            &(p.n_head as i32),
                            &(p.n_ctx as i32),
                            &(p.dk as i32),
                            &(p.dv as i32),
                            &p.scale,
                            &(p.window as i32),
                            &(ns as i32),
                        ],
                    )
                },
            );
        }
        if uses_flash(p, n) {
            let &(d, bkv) = FLASH_DIMS
                .iter()
                .find(|&&(d, _)| d == p.dk)
                .expect("checked by uses_flash");
            let name = match kv.ty {
                KvType::F16 => format!("flash_attn_{d}"),
                KvType::Q8_0 => format!("flash_attn_q8_{d}"),
            };
            return self.launch(
                &name,
                (blocks(n, 64), p.n_head as u32, 1),
                128,
                flash_smem(d, bkv) as u32,
                s,
                &[
                    &q,
                    &(ldq as i32),
                    &kc,
                    &vc,
                    &out,
                    &(ldo as i32),
                    &pos,
                    &(n as i32),
                    &(p.n_head as i32),
                    &(p.n_kv as i32),
                    &(kv.base as i32),
                    &(p.n_ctx as i32),
                    &common_tail.0,
                    &common_tail.1,
                    &common_tail.2,
                    &sinks,
                ],
            );
        }
        if !p.dk.is_multiple_of(2)
            || !p.dv.is_multiple_of(2)
            || p.dk == 0
            || p.dv == 0
            || p.dk > 256
            || p.dv > 256
        {
            return Err(CudaError::Invalid(format!(
                "attention head dims {}/{} are not supported on CUDA",
                p.dk, p.dv
            )));
        }
        let ns = n_split(p, n);
        let smem = split_smem(p.dk, p.dv);
        self.split_then_combine(p, ns, n, pos, (out, ldo), part, sinks, s, |t0, chunk| {
            self.launch(
                &format!("attn_split{q8}"),
                (ns as u32, p.n_head as u32, chunk as u32),
                128,
                smem as u32,
                s,
                &[
                    &(q + (t0 * ldq * 4) as u64),
                    &(ldq as i32),
                    &kc,
                    &vc,
                    &part,
                    &(pos + (t0 * 4) as u64),
                    &(kv.seq + (t0 * 4) as u64),
                    &(p.n_head as i32),
                    &(p.n_kv as i32),
                    &(p.n_ctx as i32),
                    &(p.dk as i32),
                    &(p.dv as i32),
                    &common_tail.0,
                    &common_tail.1,
                    &common_tail.2,
                    &(ns as i32),
                ],
            )
        })
    }

    /// The split-KV path in launches of at most 65535 query rows (grid.z): `split(t0, chunk)`
    /// writes the partials of rows `t0..t0 + chunk` into `part` (`ns` splits each), then
    /// `attn_combine` merges them into `out` (row stride `ldo`), each head's sink (`sinks`: f32
    /// per head, or 0) joining the denominator.
    #[allow(clippy::too_many_arguments)]
    fn split_then_combine(
        &self,
        p: &AttnParams,
        ns: usize,
        n: usize,
        pos: u64,
        (out, ldo): (u64, usize),
        part: u64,
        sinks: u64,
        s: &CudaStream,
        split: impl Fn(usize, usize) -> CudaResult<()>,
    ) -> CudaResult<()> {
        let mut t0 = 0;
        while t0 < n {
            let chunk = (n - t0).min(65535);
            split(t0, chunk)?;
            self.launch(
                "attn_combine",
                (p.n_head as u32, chunk as u32, 1),
                128,
                0,
                s,
                &[
                    &part,
                    &(out + (t0 * ldo * 4) as u64),
                    &(ldo as i32),
                    &(pos + (t0 * 4) as u64),
                    &(p.n_head as i32),
                    &(p.dv as i32),
                    &(p.window as i32),
                    &(ns as i32),
                    &sinks,
                ],
            )?;
            t0 += chunk;
        }
        Ok(())
    }
}

/// Names of the `extern "C" __global__` kernels in a source, expanding the FOR_EACH_TYPE and
/// GEMV/FLASH instantiation macros the sources use.
fn kernel_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let types: Vec<&str> = CUDA_TYPES
        .iter()
        .map(|&t| type_geom(t).expect("listed types have geometry").suffix)
        .collect();
    const FLOAT_TYPES: [&str; 3] = ["f32", "f16", "bf16"];
    let quant_types: Vec<&str> = types
        .iter()
        .copied()
        .filter(|t| !FLOAT_TYPES.contains(t))
        .collect();
    for line in text.lines() {
        let l = line.trim();
        let each = [
            ("FOR_EACH_TYPE(", &types[..]),
            ("FOR_EACH_FLOAT_TYPE(", &FLOAT_TYPES[..]),
            ("FOR_EACH_QUANT_TYPE(", &quant_types[..]),
        ]
        .into_iter()
        .find_map(|(prefix, list)| l.strip_prefix(prefix).map(|rest| (rest, list)));
        if let Some((rest, list)) = each {
            let mac = rest.trim_end_matches(')');
            for t in list {
                match mac {
                    "DEQUANT_KERNEL" => names.push(format!("dequant_{t}")),
                    "GEMV_KERNELS" => names.extend(
                        ["1r1", "2r2", "4r2", "8r1"]
                            .iter()
                            .map(|v| format!("gemv_{t}_{v}")),
                    ),
                    "GEMVQ_KERNELS" => {
                        for nb in [1, 2, 4, 8] {
                            for (r, w) in GEMVQ_SHAPES {
                                names.push(format!("gemvq_{t}_{nb}r{r}w{w}"));
                            }
                        }
                    }
                    "GET_ROWS_KERNEL" => names.push(format!("get_rows_{t}")),
                    "GEMV_SPLITK_KERNEL" => names.push(format!("gemv_{t}_1k")),
                    "MOE_GEMV_KERNEL" => names.push(format!("moe_gemv_{t}")),
                    "MOE_GEMM_KERNELS" => {
                        for (bm, bn, _) in MOE_GEMM_TILES {
                            names.push(format!("moe_gemm_{t}_{bm}x{bn}"));
                        }
                    }
                    "MOE_GEMVQ_KERNELS" => {
                        for (r, w) in MOE_GEMVQ_SHAPES {
                            names.push(format!("moe_gemvq_{t}_r{r}w{w}"));
                        }
                    }
                    _ => {}
                }
            }
        } else if let Some(rest) = l.strip_prefix("FLASH_KERNEL(") {
            if let Some(d) = rest.split(',').next() {
                names.push(format!("flash_attn_{}", d.trim()));
                names.push(format!("flash_attn_q8_{}", d.trim()));
            }
        }
    }
    // Plain kernels: `extern "C" __global__ void [__launch_bounds__(..)] NAME(`.
    let marker = "extern \"C\" __global__ void";
    let mut rest = text;
    while let Some(i) = rest.find(marker) {
        rest = &rest[i + marker.len()..];
        let mut t = rest.trim_start();
        if let Some(lb) = t.strip_prefix("__launch_bounds__(") {
            t = lb[lb.find(')').map_or(0, |k| k + 1)..].trim_start();
        }
        let end = t
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(t.len());
        let name = &t[..end];
        if !name.is_empty() && !t[end..].starts_with("##") {
            names.push(name.to_string());
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_names_found() {
        let names: Vec<String> = SOURCES.iter().flat_map(|s| kernel_names(s.text)).collect();
        for n in [
            "dequant_q4_k",
            "gemv_f16_8r1",
            "gemv_bf16_1k",
            "gemvq_q6_k_8r4w1",
            "gemvq_q4_0_2r2w4",
            "gemvq_q2_k_1r2w1",
            "quantize_q8_k",
            "quantize_q8_1",
            "get_rows_f16",
            "moe_gemv_bf16",
            "moe_gemvq_q8_0_r2w1",
            "moe_gemvq_q6_k_r2w4",
            "rms_norm",
            "rope",
            "kv_shift",
            "moe_route",
            "moe_sort",
            "moe_gemm_q4_k_64x64",
            "gemvq_iq4_xs_8r4w1",
            "moe_gemvq_mxfp4_r2w4",
            "moe_gemm_iq4_nl_128x64",
            "dequant_mxfp4",
            "moe_gemm_f16_128x64",
            "flash_attn_128",
            "attn_combine",
            "kv_write",
            "glu",
            "mla_attn_split",
            "mla_kv",
            "rope_heads",
            "head_route",
            "moe_add_bias",
        ] {
            assert!(names.iter().any(|x| x == n), "{n} not found in {names:?}");
        }
    }

    /// `RopeKArg` is copied byte for byte into ops.cu's `RopeP`: four 4-byte fields, the
    /// 8-byte pointer at 16, the four YaRN floats at 24.
    #[test]
    fn rope_argument_layout_matches_the_kernels_struct() {
        use std::mem::{align_of, offset_of, size_of};
        assert_eq!(offset_of!(RopeKArg, pos_scale), 12);
        assert_eq!(offset_of!(RopeKArg, freq_factors), 16);
        assert_eq!(offset_of!(RopeKArg, yarn), 24);
        assert_eq!((size_of::<RopeKArg>(), align_of::<RopeKArg>()), (40, 8));
        let src = include_str!("../../cuda/ops.cu");
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

    /// The lookup-table levels the CUDA decoders read (four little-endian words per table in
    /// common.cuh) are the CPU's.
    #[test]
    fn lut4_tables_match_cpu() {
        use crate::quant::lut4::{FP4, NL};
        for (name, table) in [("LUT4_NL", &NL), ("LUT4_FP4", &FP4)] {
            let line = super::super::nvrtc::COMMON
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

    #[test]
    fn geometry_matches_ggml_table() {
        for &t in CUDA_TYPES {
            let g = type_geom(t).unwrap();
            let (bs, bb) = (t.block_size() as usize, t.type_size() as usize);
            // Float types use 8-element pseudo-blocks.
            assert_eq!(g.bytes * bs, bb * g.qk, "{t:?}");
        }
    }

    #[test]
    fn split_kv_sizing() {
        let p = |n_head, n_ctx| AttnParams {
            n_head,
            n_kv: 1,
            dk: 128,
            dv: 128,
            n_ctx,
            scale: 1.0,
            softcap: 0.0,
            window: 0,
            v_in_k: false,
        };
        // ~1024 blocks at full context, capped by attn_combine's 64 and by the cache's tiles.
        assert_eq!(n_split(&p(32, 4096), 1), 32);
        assert_eq!(n_split(&p(4, 4096), 1), 64);
        assert_eq!(n_split(&p(32, 4096), 4), 8);
        assert_eq!(n_split(&p(32, 100), 1), 2);
        assert_eq!(n_split(&p(32, 4096), 512), 1);
        assert_eq!(n_split(&p(1, 1), 1), 1);
        // A program sized for n rows also runs shorter calls: its scratch covers every one, the
        // split-KV calls below the flash threshold included (a flash-sized batch of 512 rows needs
        // none itself, its 3-row tail does).
        for (heads, ctx, dv) in [(32, 4096, 128), (4, 32768, 256), (2, 100, 80), (1, 64, 64)] {
            let q = AttnParams {
                dv,
                dk: dv,
                ..p(heads, ctx)
            };
            for n in [1, 3, 4, 5, 17, 512, 2000] {
                let s = attention_scratch(&q, n);
                for m in 1..=n {
                    assert!(
                        s >= attention_scratch_rows(&q, m),
                        "{heads} heads, {n} ≥ {m} rows"
                    );
                }
            }
        }
        assert_eq!(attention_scratch_rows(&p(32, 4096), 512), 0);
        assert!(attention_scratch(&p(32, 4096), 512) > 0);
        // Shared memory: head dims 128 fit the default 48 KiB; 256 needs the raised limit, which
        // is what load() sets.
        assert_eq!(split_smem(128, 128), 64 * 144 * 2 * 2);
        assert!(split_smem(128, 128) <= 48 << 10);
        assert_eq!(split_smem(256, 256), 64 * 272 * 2 * 2);
        // Row strides: 16-byte aligned, 2 mod 4 in 16-byte units (conflict-free reads).
        for d in [2, 20, 64, 96, 128, 256] {
            let st = split_stride(d);
            assert!(
                st >= d && st.is_multiple_of(8) && (st / 8) % 4 == 2,
                "{d}: {st}"
            );
        }
    }
}
