//! Module loading and the launch machinery: kernels looked up by name, launched with
//! `cuLaunchKernel` (or `cuLaunchKernelEx` for programmatic dependents).

use super::attention::{flash_smem, mla_smem, split_smem, FLASH_DIMS, MLA_MAX_DK};
use super::gemv::{ActScratch, GEMVQ_SHAPES};
use super::mmq::MMQ_TILES;
use super::moe::{moe_gemm_smem, MOE_GEMM_TILES, MOE_GEMVQ_SHAPES};
use super::rope::{RopeKArg, RopeYarnArg};
use super::{type_geom, CudaKernels, CUDA_TYPES};
use crate::cuda::device::GpuDevice;
use crate::cuda::error::{check, CudaError, CudaResult};
use crate::cuda::nvrtc::{compile_cached, ModuleBuild, SOURCES};
use cudarc::driver::{sys, CudaFunction, CudaStream};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::ffi::c_void;
use std::path::Path;
use std::sync::Arc;

/// A kernel argument passed by value.
pub trait KArg {
    /// Address of the value (cuLaunchKernel copies it).
    fn addr(&self) -> *mut c_void;
}
macro_rules! karg {
    ($($t:ty),*) => {$(impl KArg for $t { fn addr(&self) -> *mut c_void { self as *const $t as *mut c_void } })*};
}
karg!(u64, i64, i32, u32, f32, RopeYarnArg, RopeKArg);

impl CudaKernels {
    /// Compiles (or reads from `cache_dir`) every source for this device and loads it; reserves
    /// the GEMV's int8 activation scratch ([`super::ACT_SCRATCH_BYTES`]) in the arena.
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
        k.allow_mmq_smem()?;
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
    pub(super) fn allow_smem(&self, name: &str, bytes: usize) -> CudaResult<()> {
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

    /// Launches kernel `name` with `args`, which must match its parameter list: only the typed
    /// launchers (`launchers.rs`) call it.
    pub(super) fn launch(
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
        // SAFETY: params point at values borrowed for this call; `args` come from a typed launcher
        // whose parameters are the kernel's (checked against the source by launchers.rs's test).
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
            .map_err(|e| launch_error(name, e))
        }
    }

    /// Launches an int8 GEMV or MMQ kernel; with `pdl`, as a programmatic dependent of the kernel
    /// before it on the stream (its quantizer): the kernel's blocks start early and wait on the
    /// device (`griddepcontrol.wait`) before reading the activations. Capturable in CUDA graphs.
    pub(super) fn launch_gemvq(
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
        // this call, from a typed launcher whose parameters are the kernel's (checked against the
        // source by launchers.rs's test).
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
            .map_err(|e| launch_error(name, e))
        }
    }
}

/// A launch's driver error with the kernel's name.
fn launch_error(name: &str, e: CudaError) -> CudaError {
    match e {
        CudaError::Driver { call, err } => CudaError::Driver {
            call,
            err: format!("{name}: {err}"),
        },
        e => e,
    }
}

/// Names of the `extern "C" __global__` kernels in a source, expanding the FOR_EACH_TYPE and
/// GEMV/FLASH instantiation macros the sources use.
pub(super) fn kernel_names(text: &str) -> Vec<String> {
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
            ("FOR_EACH_MMQ_TYPE(", &quant_types[..]),
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
                    "MMQ_KERNELS" => {
                        for (bm, bn, _, _) in MMQ_TILES {
                            names.push(format!("mmq_{t}_{bm}x{bn}"));
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
            "mmq_q4_k_64x64",
            "mmq_q6_k_32x16",
            "mmq_mxfp4_128x64",
            "mmq_q8_0_64x8",
        ] {
            assert!(names.iter().any(|x| x == n), "{n} not found in {names:?}");
        }
    }
}
