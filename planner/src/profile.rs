//! Machine profiles: measured timings of pshard's own kernels, stored as versioned TOML.
//!
//! A profile holds the machine identity, a roofline summary (bandwidth and compute ceilings) and a list
//! of measured points keyed by (op, lane, quant type, shape, batch, threads), each with its statistics.
//! The format is specified in `profile-format.md`. The profiler fills profiles; the planner reads them
//! through [`crate::CostTable`].

use std::fmt;
use std::path::Path;

use pshard_model::ggml_type::GgmlType;
use serde::{Deserialize, Serialize};

/// The value of the `format` key of every profile.
pub const PROFILE_FORMAT: &str = "pshard-profile";
/// Major version this reader understands; files with another major are rejected.
pub const PROFILE_MAJOR: u32 = 1;
/// Minor version written by this code; newer minors of the same major are read (unknown keys ignored).
pub const PROFILE_MINOR: u32 = 0;

/// Which half of a machine a profile measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProfileKind {
    /// CPU kernels, DRAM bandwidth and CPU-while-PCIe numbers.
    Cpu,
    /// GPU kernels, HBM bandwidth, host↔device copies, CUDA context size.
    Gpu,
}

impl ProfileKind {
    /// `cpu` or `gpu`: the profile's name in file names and messages.
    pub fn name(self) -> &'static str {
        match self {
            ProfileKind::Cpu => "cpu",
            ProfileKind::Gpu => "gpu",
        }
    }

    /// Where `pshard profile cpu|gpu` writes this machine's profile and where `pshard run`,
    /// `bench`, `serve` and `plan` look for it: `~/.cache/pshard/profiles/{cpu,gpu}.toml`
    /// (`None` without `HOME`).
    pub fn cache_path(self) -> Option<std::path::PathBuf> {
        let home = std::env::var_os("HOME")?;
        Some(
            std::path::PathBuf::from(home)
                .join(".cache/pshard/profiles")
                .join(format!("{}.toml", self.name())),
        )
    }
}

/// Where an op runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lane {
    /// The CPU engine.
    Cpu,
    /// The GPU compute stream.
    Gpu,
    /// The GPU copy engine (host↔device transfers).
    Copy,
}

impl Lane {
    /// Lowercase name as written in files.
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Cpu => "cpu",
            Lane::Gpu => "gpu",
            Lane::Copy => "copy",
        }
    }
}

/// Identity of the GPU a profile was measured on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuIdentity {
    /// Device name, e.g. `"NVIDIA H200"`.
    pub name: String,
    /// Total device memory in bytes.
    pub memory_bytes: u64,
    /// Driver version string.
    pub driver: String,
    /// Compute capability, e.g. `"9.0"`.
    pub compute_capability: String,
    /// PCIe generation of the link.
    pub pcie_gen: u32,
    /// PCIe lane count of the link.
    pub pcie_width: u32,
}

/// Identity of the machine a profile was measured on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    /// CPU model name.
    pub cpu_model: String,
    /// Physical CPU cores.
    pub cpu_cores: u32,
    /// Hardware threads of the CPU.
    pub cpu_threads: u32,
    /// Threads the measurements used (largest thread count measured).
    pub threads_used: u32,
    /// Installed RAM in bytes.
    pub ram_bytes: u64,
    /// The GPU, when the machine has one (always present in GPU profiles).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuIdentity>,
}

/// Ceilings of the machine: the roofline used beyond the measured range and when no point matches.
///
/// Every field is optional because a CPU profile fills only the CPU side and a GPU profile the GPU and
/// copy side. Bandwidths are in GB/s (10⁹ bytes per second), compute in GFLOP/s, times in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Roofline {
    /// CPU DRAM read bandwidth with all measured threads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_mem_gbs: Option<f64>,
    /// CPU matmul compute ceiling (quantized dot products, all threads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_gflops: Option<f64>,
    /// Fixed cost of one CPU op (thread fan-out and join).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_op_overhead_us: Option<f64>,
    /// CPU DRAM read bandwidth that survives while a pinned host→device copy runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_mem_while_h2d_gbs: Option<f64>,
    /// GPU memory (HBM) read bandwidth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_mem_gbs: Option<f64>,
    /// GPU dense f16 GEMM ceiling (tensor cores), in GFLOP/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_gemm_gflops: Option<f64>,
    /// GPU ceiling of non-tensor-core kernels (fused GEMV, elementwise), in GFLOP/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_simt_gflops: Option<f64>,
    /// Launch overhead of one GPU kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_launch_us: Option<f64>,
    /// Cost of one small kernel replayed inside a CUDA graph (decode steps run as graphs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_graph_node_us: Option<f64>,
    /// Host cost of issuing one small cuBLAS GEMM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_blas_launch_us: Option<f64>,
    /// Host→device bandwidth from pinned (page-locked or registered) memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub h2d_pinned_gbs: Option<f64>,
    /// Host→device bandwidth from pageable memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub h2d_pageable_gbs: Option<f64>,
    /// Device→host bandwidth into pinned memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub d2h_pinned_gbs: Option<f64>,
    /// Host→device pinned bandwidth achieved while the CPU runs matmuls at full tilt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub h2d_while_cpu_gbs: Option<f64>,
    /// Fixed latency of one small copy including its synchronisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_latency_us: Option<f64>,
    /// Fraction of the copy time hidden when copies overlap GPU compute (0..1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlap_efficiency: Option<f64>,
    /// VRAM taken by the CUDA context, cuBLAS workspace and allocator slack, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda_context_bytes: Option<u64>,
}

/// Statistics of one measured point. Times are seconds per call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Median time per call.
    pub median_s: f64,
    /// Lower end of the 95% interval of the median.
    pub lo_s: f64,
    /// Upper end of the 95% interval of the median.
    pub hi_s: f64,
    /// Coefficient of variation of the repetitions.
    pub cv: f64,
    /// Number of timed repetitions.
    pub n: u32,
    /// The point did not stabilise within the time cap; kept, but flagged.
    #[serde(default)]
    pub noisy: bool,
}

/// One measured point.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// What was timed (see profile-format.md for the list and the meaning of `shape` per op).
    pub op: String,
    /// Where it ran.
    pub lane: Lane,
    /// Weight/KV element type, for ops that have one (ggml name, e.g. `"Q4_K"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quant: Option<String>,
    /// Op-specific shape (matmul: `[rows, cols]`; attention: `[kv_len, n_head, n_head_kv, head_dim]`;
    /// memory and copy ops: `[bytes]`).
    #[serde(default)]
    pub shape: Vec<u64>,
    /// Tokens (rows of activations) per call.
    #[serde(default = "one")]
    pub batch: u64,
    /// CPU threads used (0 for GPU and copy ops).
    #[serde(default)]
    pub threads: u32,
    /// The measurement.
    #[serde(flatten)]
    pub stats: Stats,
}

fn one() -> u64 {
    1
}

impl Point {
    /// The quant type of the point, if it names one.
    pub fn quant_type(&self) -> Option<GgmlType> {
        self.quant.as_deref().and_then(GgmlType::from_name)
    }
}

/// A machine profile (one TOML file).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// Always [`PROFILE_FORMAT`].
    pub format: String,
    /// `"MAJOR.MINOR"`.
    pub version: String,
    /// CPU or GPU half.
    pub kind: ProfileKind,
    /// pshard version that measured it.
    pub pshard_version: String,
    /// When it was measured (RFC 3339, UTC).
    pub created: String,
    /// Free text: how the profile was obtained (e.g. "hand-made fixture").
    #[serde(default)]
    pub note: String,
    /// Machine identity.
    pub machine: Machine,
    /// Ceilings.
    #[serde(default)]
    pub roofline: Roofline,
    /// Measured points.
    #[serde(default, rename = "point")]
    pub points: Vec<Point>,
}

/// Why a profile could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// File path.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// TOML syntax or structure error, with its line and column.
    #[error("{origin}: line {line}, column {column}: {message}")]
    Syntax {
        /// File path or `"<string>"`.
        origin: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What was wrong.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("{origin}: line {line}: {message}")]
    Invalid {
        /// File path or `"<string>"`.
        origin: String,
        /// 1-based line of the offending table (0 when unknown).
        line: usize,
        /// What was wrong.
        message: String,
    },
    /// The file is a profile of a major version this reader does not know.
    #[error("{origin}: profile format version {found} is not supported (this pshard reads {PROFILE_MAJOR}.x); re-run the profiler")]
    UnsupportedVersion {
        /// File path or `"<string>"`.
        origin: String,
        /// Version string found.
        found: String,
    },
}

/// Converts a byte offset into a 1-based (line, column).
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, column)
}

/// Line of the `index`-th `[[point]]` header (1-based), or 0.
fn point_line(text: &str, index: usize) -> usize {
    text.lines()
        .enumerate()
        .filter(|(_, l)| l.trim() == "[[point]]")
        .nth(index)
        .map(|(i, _)| i + 1)
        .unwrap_or(0)
}

/// Line where a top-level table `[name]` starts, or 0.
fn table_line(text: &str, name: &str) -> usize {
    let header = format!("[{name}]");
    text.lines()
        .position(|l| l.trim() == header)
        .map(|i| i + 1)
        .unwrap_or(0)
}

fn syntax(origin: &str, text: &str, e: toml::de::Error) -> ProfileError {
    let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((0, 0));
    ProfileError::Syntax {
        origin: origin.to_string(),
        line,
        column,
        message: e.message().to_string(),
    }
}

/// Shortest median time a point may record: nothing pshard times finishes in under a nanosecond
/// (a few clock cycles; the timers themselves resolve tens of nanoseconds). Below it, rates derived
/// from the point overflow to infinity.
pub const MIN_TIME_S: f64 = 1e-9;
/// Longest median time a point may record: an hour (the profiler's longest op takes under a second).
pub const MAX_TIME_S: f64 = 3600.0;
/// Largest product of a point's shape entries and batch. The largest real point, a 152064 × 4096
/// output matmul at batch 4096, is 2^41; the bound keeps every product the cost table forms from a
/// point (elements × type size, bytes × 4, …) inside 64 bits.
pub const MAX_POINT_WORK: u64 = 1 << 48;
/// Largest roofline ceiling (GB/s or GFLOP/s): 10^9, a thousand times any machine's.
pub const MAX_CEILING: f64 = 1e9;

/// Parses `"MAJOR.MINOR"`.
fn parse_version(v: &str) -> Option<(u32, u32)> {
    let (a, b) = v.split_once('.')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

impl Profile {
    /// Parses and validates a profile from TOML text. `origin` names the source in errors.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Profile, ProfileError> {
        // Check format and version before the structure so that a future major gets a clear message
        // rather than a complaint about some field it renamed.
        let table: toml::Table = toml::from_str(text).map_err(|e| syntax(origin, text, e))?;
        let format = table.get("format").and_then(|v| v.as_str());
        if format != Some(PROFILE_FORMAT) {
            return Err(ProfileError::Invalid {
                origin: origin.to_string(),
                line: text
                    .lines()
                    .position(|l| l.trim_start().starts_with("format"))
                    .map_or(1, |i| i + 1),
                message: format!("not a pshard profile: key `format` must be \"{PROFILE_FORMAT}\""),
            });
        }
        let version = table.get("version").and_then(|v| v.as_str()).unwrap_or("");
        match parse_version(version) {
            Some((PROFILE_MAJOR, _)) => {}
            _ => {
                return Err(ProfileError::UnsupportedVersion {
                    origin: origin.to_string(),
                    found: if version.is_empty() {
                        "(missing)".into()
                    } else {
                        version.to_string()
                    },
                })
            }
        }
        let profile: Profile = toml::from_str(text).map_err(|e| syntax(origin, text, e))?;
        profile.validate(text, origin)?;
        Ok(profile)
    }

    /// Reads and validates a profile file.
    pub fn load(path: &Path) -> Result<Profile, ProfileError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Io {
            path: origin.clone(),
            source,
        })?;
        Profile::from_toml_str(&text, &origin)
    }

    /// Serialises the profile as TOML.
    pub fn to_toml_string(&self) -> String {
        toml::to_string(self).expect("a Profile always serialises to TOML")
    }

    /// A short stable identity: kind, machine, creation date and a hash of the content.
    pub fn identity(&self) -> String {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(self.to_toml_string().as_bytes());
        let hex: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
        let kind = match self.kind {
            ProfileKind::Cpu => "cpu",
            ProfileKind::Gpu => "gpu",
        };
        format!("{kind}:{hex}")
    }

    fn validate(&self, text: &str, origin: &str) -> Result<(), ProfileError> {
        let invalid = |line: usize, message: String| ProfileError::Invalid {
            origin: origin.to_string(),
            line,
            message,
        };
        let m = &self.machine;
        let mline = table_line(text, "machine");
        if m.cpu_cores == 0 || m.cpu_threads == 0 || m.threads_used == 0 {
            return Err(invalid(
                mline,
                "machine: cpu_cores, cpu_threads and threads_used must be positive".into(),
            ));
        }
        if self.kind == ProfileKind::Gpu && m.gpu.is_none() {
            return Err(invalid(
                mline,
                "a GPU profile needs a [machine.gpu] table".into(),
            ));
        }
        if let Some(g) = &m.gpu {
            if g.memory_bytes == 0 {
                return Err(invalid(
                    table_line(text, "machine.gpu"),
                    "machine.gpu.memory_bytes must be positive".into(),
                ));
            }
        }
        let r = &self.roofline;
        let rline = table_line(text, "roofline");
        let ceilings = [
            ("cpu_mem_gbs", r.cpu_mem_gbs),
            ("cpu_gflops", r.cpu_gflops),
            ("cpu_mem_while_h2d_gbs", r.cpu_mem_while_h2d_gbs),
            ("gpu_mem_gbs", r.gpu_mem_gbs),
            ("gpu_gemm_gflops", r.gpu_gemm_gflops),
            ("gpu_simt_gflops", r.gpu_simt_gflops),
            ("h2d_pinned_gbs", r.h2d_pinned_gbs),
            ("h2d_pageable_gbs", r.h2d_pageable_gbs),
            ("d2h_pinned_gbs", r.d2h_pinned_gbs),
            ("h2d_while_cpu_gbs", r.h2d_while_cpu_gbs),
        ];
        for (name, v) in ceilings {
            if let Some(v) = v {
                if !(v.is_finite() && v > 0.0 && v <= MAX_CEILING) {
                    return Err(invalid(
                        rline,
                        format!("roofline.{name} must be in (0, {MAX_CEILING:e}], got {v}"),
                    ));
                }
            }
        }
        for (name, v) in [
            ("cpu_op_overhead_us", r.cpu_op_overhead_us),
            ("gpu_launch_us", r.gpu_launch_us),
            ("gpu_graph_node_us", r.gpu_graph_node_us),
            ("gpu_blas_launch_us", r.gpu_blas_launch_us),
            ("copy_latency_us", r.copy_latency_us),
        ] {
            if let Some(v) = v {
                if !(0.0..=MAX_TIME_S * 1e6).contains(&v) {
                    return Err(invalid(
                        rline,
                        format!(
                            "roofline.{name} must be from 0 to {:e} µs, got {v}",
                            MAX_TIME_S * 1e6
                        ),
                    ));
                }
            }
        }
        if let Some(e) = r.overlap_efficiency {
            if !(0.0..=1.0).contains(&e) {
                return Err(invalid(
                    rline,
                    format!("roofline.overlap_efficiency must be in 0..1, got {e}"),
                ));
            }
        }
        match self.kind {
            ProfileKind::Cpu if r.cpu_mem_gbs.is_none() => {
                return Err(invalid(
                    rline,
                    "a CPU profile needs roofline.cpu_mem_gbs".into(),
                ))
            }
            ProfileKind::Gpu if r.gpu_mem_gbs.is_none() || r.h2d_pinned_gbs.is_none() => {
                return Err(invalid(
                    rline,
                    "a GPU profile needs roofline.gpu_mem_gbs and roofline.h2d_pinned_gbs".into(),
                ))
            }
            _ => {}
        }
        for (i, p) in self.points.iter().enumerate() {
            let line = point_line(text, i);
            let s = &p.stats;
            let what = format!("point {} (op {})", i + 1, p.op);
            if !(s.median_s.is_finite() && (MIN_TIME_S..=MAX_TIME_S).contains(&s.median_s)) {
                return Err(invalid(
                    line,
                    format!(
                        "{what}: median_s must be a time from {MIN_TIME_S:e} to {MAX_TIME_S} s, got {}",
                        s.median_s
                    ),
                ));
            }
            let work = p
                .shape
                .iter()
                .try_fold(p.batch, |acc, &d| acc.checked_mul(d))
                .filter(|&w| w <= MAX_POINT_WORK);
            if work.is_none() {
                return Err(invalid(
                    line,
                    format!(
                        "{what}: shape {:?} × batch {} exceeds 2^48 (no measured op is that large)",
                        p.shape, p.batch
                    ),
                ));
            }
            if !(s.lo_s.is_finite()
                && s.hi_s.is_finite()
                && s.lo_s <= s.median_s
                && s.median_s <= s.hi_s)
            {
                return Err(invalid(
                    line,
                    format!(
                        "{what}: need lo_s ≤ median_s ≤ hi_s, got {} ≤ {} ≤ {}",
                        s.lo_s, s.median_s, s.hi_s
                    ),
                ));
            }
            if !(s.cv.is_finite() && s.cv >= 0.0) || s.n == 0 {
                return Err(invalid(line, format!("{what}: cv must be ≥ 0 and n ≥ 1")));
            }
            if p.batch == 0 {
                return Err(invalid(line, format!("{what}: batch must be ≥ 1")));
            }
            if let Some(q) = &p.quant {
                if GgmlType::from_name(q).is_none() {
                    return Err(invalid(line, format!("{what}: unknown quant type `{q}`")));
                }
            }
            if let Some(op) = KnownOp::parse(&p.op) {
                let need = op.shape_len();
                if p.shape.len() != need || p.shape.contains(&0) {
                    return Err(invalid(
                        line,
                        format!(
                            "{what}: shape must have {need} positive entries ({}), got {:?}",
                            op.shape_doc(),
                            p.shape
                        ),
                    ));
                }
                if op.needs_quant() && p.quant_type().is_none() {
                    return Err(invalid(line, format!("{what}: needs a quant type")));
                }
            }
        }
        Ok(())
    }
}

/// Ops the planner reads from profiles. Other op names are kept in the file but ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KnownOp {
    /// Quantized matmul on the CPU (`shape = [rows, cols]`).
    Matmul,
    /// CPU matmul while a pinned host→device copy loop runs.
    MatmulWhileH2d,
    /// GPU fused GEMV / small-batch matmul path.
    MatmulGemv,
    /// The same GEMV timed as nodes of a replayed CUDA graph (decode batches).
    MatmulGemvGraph,
    /// GPU dequantize + GEMM path.
    MatmulGemm,
    /// The grouped MoE expert GEMM (`moe_gemm`: all experts in one launch, weights decoded on
    /// the fly), per expert matrix (`shape = [rows, cols]`, `batch` = tokens per expert).
    MoeGemm,
    /// Attention (`shape = [kv_len, n_head, n_head_kv, head_dim]`, `batch` = query rows).
    Attention,
    /// Streaming read of memory (`shape = [bytes]`).
    MemRead,
    /// Host→device copy from pinned memory (`shape = [bytes]`).
    H2dPinned,
    /// Host→device copy from pageable memory.
    H2dPageable,
    /// Device→host copy into pinned memory.
    D2hPinned,
    /// Host→device pinned copy while the CPU runs matmuls.
    H2dWhileCpu,
    /// RMS norm of `batch` rows on the CPU (`shape = [cols]`).
    RmsNorm,
    /// SiLU GLU of `batch` rows on the CPU (`shape = [cols]`).
    Glu,
    /// GELU-tanh GLU of `batch` rows on the CPU (`shape = [cols]`).
    Geglu,
    /// In-place add of `batch` rows on the CPU (`shape = [cols]`).
    Add,
    /// Rotary embedding of `batch` rows on the CPU (`shape = [heads, head_dim]`, every
    /// dimension rotated).
    Rope,
}

impl KnownOp {
    /// Parses a profile op name.
    pub fn parse(s: &str) -> Option<KnownOp> {
        Some(match s {
            "matmul" => KnownOp::Matmul,
            "matmul_while_h2d" => KnownOp::MatmulWhileH2d,
            "matmul_gemv" => KnownOp::MatmulGemv,
            "matmul_gemv_graph" => KnownOp::MatmulGemvGraph,
            "matmul_gemm" => KnownOp::MatmulGemm,
            "moe_gemm" => KnownOp::MoeGemm,
            "attention" => KnownOp::Attention,
            "mem_read" => KnownOp::MemRead,
            "h2d_pinned" => KnownOp::H2dPinned,
            "h2d_pageable" => KnownOp::H2dPageable,
            "d2h_pinned" => KnownOp::D2hPinned,
            "h2d_while_cpu" => KnownOp::H2dWhileCpu,
            "rms_norm" => KnownOp::RmsNorm,
            "glu" => KnownOp::Glu,
            "geglu" => KnownOp::Geglu,
            "add" => KnownOp::Add,
            "rope" => KnownOp::Rope,
            _ => return None,
        })
    }

    /// The op name as written in files.
    pub fn as_str(self) -> &'static str {
        match self {
            KnownOp::Matmul => "matmul",
            KnownOp::MatmulWhileH2d => "matmul_while_h2d",
            KnownOp::MatmulGemv => "matmul_gemv",
            KnownOp::MatmulGemvGraph => "matmul_gemv_graph",
            KnownOp::MatmulGemm => "matmul_gemm",
            KnownOp::MoeGemm => "moe_gemm",
            KnownOp::Attention => "attention",
            KnownOp::MemRead => "mem_read",
            KnownOp::H2dPinned => "h2d_pinned",
            KnownOp::H2dPageable => "h2d_pageable",
            KnownOp::D2hPinned => "d2h_pinned",
            KnownOp::H2dWhileCpu => "h2d_while_cpu",
            KnownOp::RmsNorm => "rms_norm",
            KnownOp::Glu => "glu",
            KnownOp::Geglu => "geglu",
            KnownOp::Add => "add",
            KnownOp::Rope => "rope",
        }
    }

    /// For the elementwise ops: f32 values read and written per element of a row (what the
    /// CPU lane's buffers move: a norm reads its input and writes its output, the GLU reads
    /// two and writes one, the add reads two and writes one, rope rewrites its row in place).
    pub fn elementwise_streams(self) -> Option<usize> {
        match self {
            KnownOp::RmsNorm | KnownOp::Rope => Some(2),
            KnownOp::Glu | KnownOp::Geglu | KnownOp::Add => Some(3),
            _ => None,
        }
    }

    fn shape_len(self) -> usize {
        match self {
            KnownOp::Matmul
            | KnownOp::MatmulWhileH2d
            | KnownOp::MatmulGemv
            | KnownOp::MatmulGemvGraph
            | KnownOp::MatmulGemm
            | KnownOp::MoeGemm => 2,
            KnownOp::Attention => 4,
            KnownOp::Rope => 2,
            _ => 1,
        }
    }

    fn shape_doc(self) -> &'static str {
        match self {
            KnownOp::Rope => "[heads, head_dim]",
            KnownOp::RmsNorm | KnownOp::Glu | KnownOp::Geglu | KnownOp::Add => "[cols]",
            _ => match self.shape_len() {
                2 => "[rows, cols]",
                4 => "[kv_len, n_head, n_head_kv, head_dim]",
                _ => "[bytes]",
            },
        }
    }

    fn needs_quant(self) -> bool {
        matches!(
            self,
            KnownOp::Matmul
                | KnownOp::MatmulWhileH2d
                | KnownOp::MatmulGemv
                | KnownOp::MatmulGemvGraph
                | KnownOp::MatmulGemm
                | KnownOp::MoeGemm
                | KnownOp::Attention
        )
    }
}

impl fmt::Display for KnownOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
