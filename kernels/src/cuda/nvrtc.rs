//! Run-time compilation of the `.cu` sources with NVRTC for the device's exact architecture, and a
//! disk cache of the resulting cubins keyed by (source hash, arch, driver and NVRTC versions), so a
//! second start compiles nothing.

use super::error::{CudaError, CudaResult};
use cudarc::nvrtc::{result as nvres, sys as nvsys};
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Text prepended to every source (type aliases, f16 conversions, block decoders).
pub const COMMON: &str = include_str!("../../cuda/common.cuh");

/// One kernel family's source.
#[derive(Clone, Copy, Debug)]
pub struct Source {
    /// File name, for logs and cache file names.
    pub name: &'static str,
    /// CUDA C text (without [`COMMON`]).
    pub text: &'static str,
}

/// Every kernel family, one `.cu` file each.
pub const SOURCES: &[Source] = &[
    Source {
        name: "matmul.cu",
        text: include_str!("../../cuda/matmul.cu"),
    },
    Source {
        name: "gemv.cu",
        text: include_str!("../../cuda/gemv.cu"),
    },
    Source {
        name: "ops.cu",
        text: include_str!("../../cuda/ops.cu"),
    },
    Source {
        name: "attention.cu",
        text: include_str!("../../cuda/attention.cu"),
    },
    Source {
        name: "moe_gemm.cu",
        text: include_str!("../../cuda/moe_gemm.cu"),
    },
    Source {
        name: "mmq.cu",
        text: include_str!("../../cuda/mmq.cu"),
    },
];

/// How one module was obtained.
#[derive(Clone, Debug, PartialEq)]
pub struct ModuleBuild {
    /// Source file name.
    pub name: &'static str,
    /// Found in the disk cache (nothing compiled).
    pub cache_hit: bool,
    /// Milliseconds spent compiling or reading the cache.
    pub ms: f64,
    /// Cubin path in the cache.
    pub path: PathBuf,
}

/// The default cache directory: `$PSHARD_NVRTC_CACHE`, else `$XDG_CACHE_HOME/pshard/nvrtc`, else
/// `~/.cache/pshard/nvrtc`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("PSHARD_NVRTC_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("pshard").join("nvrtc")
}

/// Whether the NVRTC library can be loaded.
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { nvsys::is_culib_present() }
}

/// NVRTC (major, minor).
pub fn nvrtc_version() -> CudaResult<(i32, i32)> {
    if !nvrtc_present() {
        return Err(CudaError::MissingLibrary { lib: "libnvrtc" });
    }
    let (mut a, mut b) = (0, 0);
    // SAFETY: out-pointers to locals.
    let r = unsafe { nvsys::nvrtcVersion(&mut a, &mut b) };
    r.result().map_err(|e| CudaError::Driver {
        call: "reading the NVRTC version",
        err: format!("{e:?}"),
    })?;
    Ok((a, b))
}

/// 64-bit FNV-1a: a stable hash for cache keys (std's hasher may change between Rust versions).
pub fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for p in parts {
        for &b in p.iter() {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        // Separator so ("ab","c") and ("a","bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

fn options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "-lineinfo".into(),
    ]
}

/// Compiles `src` for `arch` (e.g. `"sm_90"`) or reads it from `cache_dir`; returns the cubin.
pub fn compile_cached(
    src: &Source,
    arch: &str,
    driver_version: i32,
    cache_dir: &Path,
) -> CudaResult<(Vec<u8>, ModuleBuild)> {
    let t0 = Instant::now();
    let (vmaj, vmin) = nvrtc_version()?;
    let opts = options(arch);
    let key = fnv1a(&[
        COMMON.as_bytes(),
        src.text.as_bytes(),
        opts.join(" ").as_bytes(),
        format!("{driver_version}/{vmaj}.{vmin}").as_bytes(),
    ]);
    let stem = src.name.trim_end_matches(".cu");
    let path = cache_dir.join(format!(
        "{stem}-{arch}-drv{driver_version}-{key:016x}.cubin"
    ));
    if let Ok(bytes) = std::fs::read(&path) {
        if !bytes.is_empty() {
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            return Ok((
                bytes,
                ModuleBuild {
                    name: src.name,
                    cache_hit: true,
                    ms,
                    path,
                },
            ));
        }
    }
    let cubin = compile(src, &opts)?;
    std::fs::create_dir_all(cache_dir)
        .map_err(|e| CudaError::Io(format!("creating {}: {e}", cache_dir.display())))?;
    // Write to a temporary name and rename, so a concurrent start never reads half a file.
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, &cubin)
        .map_err(|e| CudaError::Io(format!("writing {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, &path)
        .map_err(|e| CudaError::Io(format!("renaming to {}: {e}", path.display())))?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    Ok((
        cubin,
        ModuleBuild {
            name: src.name,
            cache_hit: false,
            ms,
            path,
        },
    ))
}

fn compile(src: &Source, opts: &[String]) -> CudaResult<Vec<u8>> {
    let text = format!("{COMMON}\n#line 1 \"{}\"\n{}", src.name, src.text);
    let c_src = CString::new(text)
        .map_err(|_| CudaError::Invalid(format!("{} contains a NUL byte", src.name)))?;
    let c_name =
        CString::new(src.name).map_err(|_| CudaError::Invalid("bad source name".into()))?;
    let prog = nvres::create_program(&c_src, Some(&c_name)).map_err(|e| CudaError::Compile {
        file: src.name,
        log: format!("creating the program: {e:?}"),
    })?;
    // SAFETY: prog is a live program created above and destroyed once at the end of this block;
    // the log and cubin buffers are sized by the matching size queries.
    unsafe {
        let compiled = nvres::compile_program(prog, opts);
        let mut log_len = 0usize;
        let _ = nvsys::nvrtcGetProgramLogSize(prog, &mut log_len);
        let mut log = vec![0u8; log_len.max(1)];
        let _ = nvsys::nvrtcGetProgramLog(prog, log.as_mut_ptr() as *mut _);
        let log = String::from_utf8_lossy(&log)
            .trim_end_matches('\0')
            .to_string();
        if let Err(e) = compiled {
            let _ = nvres::destroy_program(prog);
            return Err(CudaError::Compile {
                file: src.name,
                log: format!("{e:?}\n{log}"),
            });
        }
        let mut n = 0usize;
        let r = nvsys::nvrtcGetCUBINSize(prog, &mut n);
        if r.result().is_err() || n == 0 {
            let _ = nvres::destroy_program(prog);
            return Err(CudaError::Compile {
                file: src.name,
                log: format!("no cubin produced ({r:?})"),
            });
        }
        let mut cubin = vec![0u8; n];
        let r = nvsys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut _);
        let _ = nvres::destroy_program(prog);
        r.result().map_err(|e| CudaError::Compile {
            file: src.name,
            log: format!("reading the cubin: {e:?}"),
        })?;
        Ok(cubin)
    }
}
