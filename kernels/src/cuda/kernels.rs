//! The compiled kernels and their launchers. Every launcher takes device addresses (`u64`) and
//! the stream to enqueue on; shapes are checked here so a bad call is an error, not a fault.

// Launchers mirror their kernels' parameter lists (device addresses, shapes, strides, stream).
#![allow(clippy::too_many_arguments)]

use super::device::GpuDevice;
use super::error::{check, CudaError, CudaResult};
use super::nvrtc::{compile_cached, ModuleBuild, SOURCES};
use cudarc::driver::{sys, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;
use pshard_model::ggml_type::GgmlType;
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

/// Rotary pairing mode as the kernel encodes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeKind {
    /// (2i, 2i+1).
    Adjacent,
    /// (i, i + n_dims/2).
    Neox,
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
}

/// Weight rows at or below which a single-row GEMV puts a whole block on each row (more warps in
/// flight for small matrices such as k/v projections).
pub const GEMV_SPLITK_MAX_ROWS: usize = 4096;

/// Query rows at or below which attention uses the split-KV kernel.
pub const ATTN_SPLIT_MAX_ROWS: usize = 4;

/// The loaded kernels.
pub struct CudaKernels {
    funcs: HashMap<String, CudaFunction>,
    _modules: Vec<Arc<CudaModule>>,
    builds: Vec<ModuleBuild>,
    smem_optin: i32,
    sm_count: i32,
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

fn blocks(n: usize, per: usize) -> u32 {
    n.div_ceil(per).max(1) as u32
}

impl CudaKernels {
    /// Compiles (or reads from `cache_dir`) every source for this device and loads it.
    pub fn load(dev: &GpuDevice, cache_dir: &Path) -> CudaResult<CudaKernels> {
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
        };
        for &(d, bkv) in FLASH_DIMS {
            let f = k.func(&format!("flash_attn_{d}"))?;
            // SAFETY: raises the dynamic shared memory limit of a function we loaded.
            check("raising a kernel's shared memory limit", unsafe {
                sys::cuFuncSetAttribute(
                    f.cu_function(),
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    flash_smem(d, bkv) as i32,
                )
            })?;
        }
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

    /// `y[b, r] = Σ_c W[r, c] x[b, c] (+ bias[r])` for `n` batch rows with the fused GEMV (weights
    /// read once per 8 batch rows). `w`, `y` and `bias` already point at the first row of a range.
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
            if nb == 1 && ty == GgmlType::Q4_K {
                // Wide Q4_K decoder; the whole block on one row for matrices with few rows.
                let (name, grid) = if rows <= 2048 {
                    ("gemv_q4_k_wide_k", rows as u32)
                } else {
                    ("gemv_q4_k_wide", blocks(rows, 4))
                };
                self.launch(
                    name,
                    (grid, 1, 1),
                    128,
                    0,
                    s,
                    &[&w, &rb, &rows_i, &cols_i, &xp, &yp, &bias],
                )?;
                done += 1;
                continue;
            }
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
            // Rows per warp: more rows reuse each activation load, fewer keep enough blocks to
            // fill the GPU (about 2 blocks of 4 warps per SM).
            let r = match nb {
                1 => self.gemv_rows_per_warp(rows),
                2 | 4 => 2,
                _ => 1,
            };
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

    /// Rows per warp of the single-row GEMV (`PSHARD_GEMV_R` = 1, 2 or 4 overrides, for benchmarks).
    pub fn gemv_rows_per_warp(&self, rows: usize) -> usize {
        if let Some(r) = std::env::var("PSHARD_GEMV_R")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
        {
            if matches!(r, 1 | 2 | 4) {
                return r;
            }
        }
        // Measured on the H200 (2026-11-21): one row per warp is fastest or within 10% for
        // Q4_K, Q4_1 and Q6_K at 1k-128k rows; more rows per warp leave too few warps in flight.
        let _ = rows;
        1
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

    /// MoE expert GEMV over `n_pairs` (token, slot) pairs; see `moe_gemv_*` in matmul.cu.
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
        let rb = (cols / g.qk * g.bytes) as i64;
        let eb = rb * rows as i64;
        let args: [&dyn KArg; 12] = [
            &w,
            &eb,
            &rb,
            &(rows as i32),
            &(cols as i32),
            &x,
            &(ldx as i32),
            &(x_div as i32),
            &route,
            &(n_used as i32),
            &y,
            &(ldy as i32),
        ];
        let mut p0 = 0;
        while p0 < n_pairs {
            // grid.y is limited to 65535: launch in chunks of whole tokens.
            let chunk = (65535 / n_used * n_used).min(n_pairs - p0);
            let xo = x + ((p0 / x_div) * ldx * 4) as u64;
            let ro = route + ((p0 / n_used) * 2 * n_used * 4) as u64;
            let yo = y + (p0 * ldy * 4) as u64;
            let mut a = args;
            a[5] = &xo;
            a[8] = &ro;
            a[10] = &yo;
            let name = if ty == GgmlType::Q4_K {
                "moe_gemv_q4_k_wide".to_string()
            } else {
                format!("moe_gemv_{}", g.suffix)
            };
            self.launch(&name, (blocks(rows, 4), chunk as u32, 1), 128, 0, s, &a)?;
            p0 += chunk;
        }
        Ok(())
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

    /// Rotary embedding in place; positions are i32 on the device.
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        x: u64,
        pos: u64,
        n_tokens: usize,
        n_heads: usize,
        head_dim: usize,
        n_dims: usize,
        mode: RopeKind,
        base: f32,
        pos_scale: f32,
        freq_factors: Option<u64>,
        s: &CudaStream,
    ) -> CudaResult<()> {
        if n_dims > head_dim || !n_dims.is_multiple_of(2) {
            return Err(CudaError::Invalid(format!(
                "rope over {n_dims} of {head_dim} dims"
            )));
        }
        let total = n_tokens * n_heads * n_dims / 2;
        let m = match mode {
            RopeKind::Adjacent => 0i32,
            RopeKind::Neox => 1,
        };
        let ff = freq_factors.unwrap_or(0);
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
                &(head_dim as i32),
                &(n_dims as i32),
                &m,
                &base,
                &pos_scale,
                &ff,
            ],
        )
    }

    /// `out = act(gate) · up` over `n` values; `gelu` selects GELU-tanh instead of SiLU.
    pub fn glu(
        &self,
        gate: u64,
        up: u64,
        out: u64,
        n: usize,
        gelu: bool,
        s: &CudaStream,
    ) -> CudaResult<()> {
        let act = gelu as i32;
        self.launch(
            "glu",
            (blocks(n, 256), 1, 1),
            256,
            0,
            s,
            &[&gate, &up, &out, &(n as i64), &act],
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

    /// Writes `n` rows of `row` f32 values (row stride `ld_src`) into an f16 cache at rows `pos[t]`.
    pub fn kv_write(
        &self,
        src: u64,
        ld_src: usize,
        cache: u64,
        row: usize,
        pos: u64,
        n: usize,
        s: &CudaStream,
    ) -> CudaResult<()> {
        if n == 0 {
            return Ok(());
        }
        self.launch(
            "kv_write",
            (blocks(row, 256), n as u32, 1),
            256,
            0,
            s,
            &[&src, &(ld_src as i32), &cache, &(row as i32), &pos],
        )
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

    /// MoE routing of `n` tokens: softmax, top `n_used`, optional renormalisation.
    pub fn moe_route(
        &self,
        logits: u64,
        n: usize,
        n_expert: usize,
        n_used: usize,
        normalize: bool,
        route: u64,
        s: &CudaStream,
    ) -> CudaResult<()> {
        if n_expert > 1024 || n_used == 0 || n_used > n_expert {
            return Err(CudaError::Invalid(format!(
                "MoE routing of {n_used} of {n_expert} experts is not supported"
            )));
        }
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
                &(normalize as i32),
                &route,
            ],
        )
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

    /// `out[i] = f16(x[rows[i] / x_div])` for `n` rows.
    #[allow(clippy::too_many_arguments)]
    pub fn gather_rows_f16(
        &self,
        x: u64,
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
            &[&x, &rows, &(x_div as i32), &out, &(cols as i32)],
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

    // ----------------------------------------------------------------------------------------
    // Attention
    // ----------------------------------------------------------------------------------------

    /// Scratch bytes the split-KV path needs for `n` query rows (0 when the flash kernel is used).
    pub fn attention_scratch(&self, p: &AttnParams, n: usize) -> usize {
        if self.uses_flash(p, n) {
            0
        } else {
            n * p.n_head * Self::n_split(p) * (p.dv + 2) * 4
        }
    }

    fn uses_flash(&self, p: &AttnParams, n: usize) -> bool {
        n > ATTN_SPLIT_MAX_ROWS && p.dk == p.dv && FLASH_DIMS.iter().any(|&(d, _)| d == p.dk)
    }

    fn n_split(p: &AttnParams) -> usize {
        (p.n_ctx / 256).clamp(1, 64)
    }

    /// Causal (optionally windowed) attention of `n` query rows over the f16 caches at positions
    /// `pos` (i32 on the device). `q`: `[n, n_head·dk]` f32 (row stride `ldq`), `out`:
    /// `[n, n_head·dv]` f32 (row stride `ldo`). `part` must hold [`Self::attention_scratch`] bytes.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        p: &AttnParams,
        q: u64,
        ldq: usize,
        kc: u64,
        vc: u64,
        pos: u64,
        n: usize,
        out: u64,
        ldo: usize,
        part: u64,
        s: &CudaStream,
    ) -> CudaResult<()> {
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
        if self.uses_flash(p, n) {
            let &(d, bkv) = FLASH_DIMS
                .iter()
                .find(|&&(d, _)| d == p.dk)
                .expect("checked by uses_flash");
            return self.launch(
                &format!("flash_attn_{d}"),
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
                    &(p.n_ctx as i32),
                    &common_tail.0,
                    &common_tail.1,
                    &common_tail.2,
                ],
            );
        }
        if !p.dk.is_multiple_of(2) || !p.dv.is_multiple_of(2) || p.dk > 256 || p.dv > 256 {
            return Err(CudaError::Invalid(format!(
                "attention head dims {}/{} are not supported on CUDA",
                p.dk, p.dv
            )));
        }
        let ns = Self::n_split(p);
        let mut t0 = 0;
        while t0 < n {
            let chunk = (n - t0).min(65535);
            let qo = q + (t0 * ldq * 4) as u64;
            let po = pos + (t0 * 4) as u64;
            self.launch(
                "attn_split",
                (ns as u32, p.n_head as u32, chunk as u32),
                128,
                0,
                s,
                &[
                    &qo,
                    &(ldq as i32),
                    &kc,
                    &vc,
                    &part,
                    &po,
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
            )?;
            let oo = out + (t0 * ldo * 4) as u64;
            self.launch(
                "attn_combine",
                (p.n_head as u32, chunk as u32, 1),
                128,
                0,
                s,
                &[
                    &part,
                    &oo,
                    &(ldo as i32),
                    &(p.n_head as i32),
                    &(p.dv as i32),
                    &(ns as i32),
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
    for line in text.lines() {
        let l = line.trim();
        if let Some(rest) = l.strip_prefix("FOR_EACH_TYPE(") {
            let mac = rest.trim_end_matches(')');
            for t in &types {
                match mac {
                    "DEQUANT_KERNEL" => names.push(format!("dequant_{t}")),
                    "GEMV_KERNELS" => names.extend(
                        ["1r1", "1r2", "1r4", "2r2", "4r2", "8r1"]
                            .iter()
                            .map(|v| format!("gemv_{t}_{v}")),
                    ),
                    "GET_ROWS_KERNEL" => names.push(format!("get_rows_{t}")),
                    "GEMV_SPLITK_KERNEL" => names.push(format!("gemv_{t}_1k")),
                    "MOE_GEMV_KERNEL" => names.push(format!("moe_gemv_{t}")),
                    _ => {}
                }
            }
        } else if let Some(rest) = l.strip_prefix("FLASH_KERNEL(") {
            if let Some(d) = rest.split(',').next() {
                names.push(format!("flash_attn_{}", d.trim()));
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
            "gemv_q6_k_8r1",
            "get_rows_f16",
            "moe_gemv_q8_0",
            "rms_norm",
            "rope",
            "moe_route",
            "flash_attn_128",
            "attn_combine",
            "kv_write",
            "glu",
        ] {
            assert!(names.iter().any(|x| x == n), "{n} not found in {names:?}");
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
}
