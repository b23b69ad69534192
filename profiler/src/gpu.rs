//! The GPU half: HBM bandwidth, both matmul paths of the CUDA backend per quant type and batch
//! (fused GEMV and dequantize + cuBLAS GEMM, exactly as [`Gpu::matmul`] runs them), attention
//! prefill and decode vs context, host↔device copies vs size (pinned and pageable), copies while the
//! GPU computes (overlap), launch and event overheads and the VRAM the CUDA context takes.
//!
//! Kernel times come from CUDA events on the compute stream; copies are timed on the host clock
//! including their synchronisation (that is what a copy costs the runtime). Weights rotate over
//! copies larger than the L2 cache so every call reads HBM.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use cudarc::driver::CudaStream;
use pshard_kernels::cuda::kernels::type_geom;
use pshard_kernels::cuda::{
    self, AttnParams, CapturedGraph, CudaResult, DevBuf, GemmInput, Gpu, GpuDevice, PinnedBuf,
    RegionId, RegionKind,
};
use pshard_kernels::quant::SUPPORTED;
use pshard_model::ggml_type::GgmlType;
use pshard_planner::profile::{
    Lane, Point, Profile, ProfileKind, Roofline, Stats, PROFILE_FORMAT, PROFILE_MAJOR,
    PROFILE_MINOR,
};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::cpu::{make_weights, FULL_CONTEXTS, HEAD_DIM, LAYOUTS};
use crate::machine;
use crate::progress::Progress;
use crate::stats::{measure, MeasureCfg};

/// Batch sizes of the GPU matmul points.
pub const GPU_BATCHES: &[usize] = &[1, 4, 16, 64, 256, 512, 1024, 2048, 4096, 8192];
/// Largest batch measured on the fused GEMV path (it reads the weights once per 8 rows, so larger
/// batches are never routed to it).
pub const GEMV_MAX_BATCH: usize = 256;
/// Matrix shapes `[rows, cols]` of the GPU matmul points.
pub const GPU_SHAPES: &[(usize, usize)] = &[
    (4096, 4096),
    (4096, 14336),
    (14336, 4096),
    (2048, 768),
    (768, 2048),
];
/// Expert matrix shapes `[rows, cols]` of the grouped-MoE points (qwen3-30b-a3b's down and gate/up
/// projections).
pub const EXPERT_SHAPES: &[(usize, usize)] = &[(2048, 768), (768, 2048)];
/// Tokens per expert of the grouped-MoE points (512- and 2048-token ubatches of a 128-expert top-8
/// model give 32 and 128).
pub const EXPERT_BATCHES: &[usize] = &[8, 32, 128, 512];
/// Experts of the grouped-MoE points (qwen3-30b-a3b's), and experts used per token.
const MOE_EXPERTS: usize = 128;
const MOE_USED: usize = 8;
/// Query rows of the prefill attention points (512- and 2048-token ubatches).
pub const PREFILL_ROWS: &[usize] = &[512, 2048];

/// What a GPU profile run measures.
#[derive(Clone, Debug)]
pub struct GpuConfig {
    /// Short run: fewer types, shapes, batches, sizes and contexts.
    pub quick: bool,
    /// CUDA device ordinal.
    pub ordinal: usize,
    /// Seed of the random weights.
    pub seed: u64,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// NVRTC kernel cache folder (default: the backend's).
    pub cache_dir: Option<PathBuf>,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            quick: false,
            ordinal: 0,
            seed: 0x5eed,
            progress: true,
            cache_dir: None,
        }
    }
}

fn cfg_for(quick: bool) -> MeasureCfg {
    let mut c = if quick {
        MeasureCfg::quick()
    } else {
        MeasureCfg::full()
    };
    // GPU timings are steadier than CPU ones; ask for more.
    c.cv_target = if quick { 0.05 } else { 0.03 };
    c.time_cap = c.time_cap.min(std::time::Duration::from_millis(200));
    c
}

fn gpu_err(e: cuda::CudaError) -> anyhow::Error {
    anyhow!("{e}")
}

/// Seconds between two events recorded around `f`'s work on `stream`.
fn event_time(
    dev: &GpuDevice,
    stream: &CudaStream,
    f: impl FnOnce() -> CudaResult<()>,
) -> CudaResult<f64> {
    let mut f = Some(f);
    event_time_per_call(dev, stream, 1, || f.take().map_or(Ok(()), |f| f()))
}

/// Seconds per call of `k` back-to-back calls of `f` between one pair of events: the device time
/// of a kernel in a stream of work (launch latency hidden behind the previous kernel), which is how
/// the runtime issues kernels, rather than one isolated launch with its event overhead.
fn event_time_per_call(
    dev: &GpuDevice,
    stream: &CudaStream,
    k: usize,
    mut f: impl FnMut() -> CudaResult<()>,
) -> CudaResult<f64> {
    let (a, b) = (dev.event(true)?, dev.event(true)?);
    let drv = |call: &'static str, r: Result<(), cudarc::driver::DriverError>| {
        r.map_err(|e| cuda::CudaError::Driver {
            call,
            err: format!("{e:?}"),
        })
    };
    drv("recording an event", a.record(stream))?;
    for _ in 0..k.max(1) {
        f()?;
    }
    drv("recording an event", b.record(stream))?;
    drv("waiting for an event", b.synchronize())?;
    let ms = a.elapsed_ms(&b).map_err(|e| cuda::CudaError::Driver {
        call: "reading event time",
        err: format!("{e:?}"),
    })?;
    Ok(f64::from(ms) * 1e-3 / k.max(1) as f64)
}

/// Calls per timed sample for a kernel whose single call took `single_s`: enough back-to-back
/// calls to fill ~50 µs (at most 16), so short kernels are timed as they run in a stream.
fn calls_per_sample(single_s: f64) -> usize {
    ((50e-6 / single_s.max(1e-7)).ceil() as usize).clamp(1, 16)
}

/// Runs `measure` over a fallible GPU body, keeping the first error.
fn measure_gpu(cfg: &MeasureCfg, mut f: impl FnMut() -> CudaResult<Option<f64>>) -> Result<Stats> {
    let mut err = None;
    let s = measure(cfg, || match f() {
        Ok(v) => v,
        Err(e) => {
            err.get_or_insert(e);
            Some(1e-9)
        }
    });
    match err {
        Some(e) => Err(gpu_err(e)),
        None => Ok(s),
    }
}

fn gpu_point(
    op: &str,
    lane: Lane,
    quant: Option<GgmlType>,
    shape: Vec<u64>,
    batch: usize,
    stats: Stats,
) -> Point {
    Point {
        op: op.to_string(),
        lane,
        quant: quant.map(|q| q.name().to_string()),
        shape,
        batch: batch as u64,
        threads: 0,
        stats,
    }
}

/// The dequantize + GEMM path of [`Gpu::matmul`], forced for any batch (that method picks the GEMV
/// for small batches): dequantize to f16 (BF16 is read as is), convert activations, cuBLAS GEMM.
#[allow(clippy::too_many_arguments)]
fn gemm_path(
    gpu: &Gpu,
    ty: GgmlType,
    w: u64,
    rows: usize,
    cols: usize,
    x: u64,
    n: usize,
    out: u64,
    wscratch: u64,
    xscratch: u64,
) -> CudaResult<()> {
    let s = gpu.stream();
    let (input, wsrc) = if ty == GgmlType::BF16 {
        (GemmInput::Bf16, w)
    } else {
        gpu.kernels.dequant_f16(ty, w, wscratch, rows, cols, s)?;
        (GemmInput::F16, wscratch)
    };
    match input {
        GemmInput::F16 => gpu.kernels.f32_to_f16(x, xscratch, n * cols, s)?,
        GemmInput::Bf16 => gpu.kernels.f32_to_bf16(x, xscratch, n * cols, s)?,
    }
    gpu.blas
        .matmul(input, wsrc, rows, cols, xscratch, n, out, rows)
}

struct Bufs {
    weights: RegionId,
    x: DevBuf,
    out: DevBuf,
    wscratch: DevBuf,
    xscratch: DevBuf,
}

/// Runs the GPU profile on device `ordinal` and returns it (not yet written).
pub fn run_gpu(c: &GpuConfig) -> Result<Profile> {
    let started = Instant::now();
    cuda::probe(c.ordinal).map_err(|e| anyhow!("no usable GPU: {e}"))?;
    let cache = c
        .cache_dir
        .clone()
        .unwrap_or_else(cuda::nvrtc::default_cache_dir);
    let gpu = Gpu::open(c.ordinal, None, &cache).map_err(gpu_err)?;
    let dev = gpu.dev.clone();
    let (free, total) = dev.mem_info().map_err(gpu_err)?;
    // Everything the process took so far: context, modules, cuBLAS handle and workspace.
    let cuda_context_bytes = total.saturating_sub(free);
    let l2 = dev.info().l2_bytes.max(1 << 20) as u64;
    let cfg = cfg_for(c.quick);
    let mut rng = StdRng::seed_from_u64(c.seed);
    let mut points = Vec::new();

    let types: Vec<GgmlType> = if c.quick {
        vec![GgmlType::Q4_K, GgmlType::Q8_0, GgmlType::F16]
    } else {
        SUPPORTED
            .iter()
            .copied()
            .filter(|t| type_geom(*t).is_some())
            .collect()
    };
    let shapes: Vec<(usize, usize)> = if c.quick {
        vec![(4096, 4096), (14336, 4096)]
    } else {
        GPU_SHAPES.to_vec()
    };
    let batches: Vec<usize> = if c.quick {
        vec![1, 16, 512, 4096]
    } else {
        GPU_BATCHES.to_vec()
    };
    let contexts: Vec<usize> = if c.quick {
        vec![1024, 8192]
    } else {
        FULL_CONTEXTS.to_vec()
    };
    let max_copy: usize = if c.quick { 64 << 20 } else { 1 << 30 };
    let copy_sizes: Vec<usize> = std::iter::once(4)
        .chain(
            (0..)
                .map(|k| 4096usize << (2 * k))
                .take_while(|&s| s <= max_copy),
        )
        .collect();
    let gemv_batches = batches.iter().filter(|&&b| b <= GEMV_MAX_BATCH).count();
    let steps = 1
        + shapes.len() * types.len() * (gemv_batches + batches.len())
        + contexts.len() * LAYOUTS.len() * (1 + PREFILL_ROWS.len())
        + EXPERT_SHAPES.len() * types.len() * EXPERT_BATCHES.len()
        + copy_sizes.len() * 3
        + 3;
    let progress = Progress::new(steps as u64, c.progress);

    // HBM: device-to-device copy of a buffer much larger than L2 (read + write traffic).
    progress.step("HBM bandwidth");
    let hbm_bytes: usize = if c.quick { 256 << 20 } else { 1 << 30 };
    let scratch_region = dev
        .create_region(
            RegionKind::Scratch,
            "profiler",
            2 * hbm_bytes as u64 + (1 << 20),
        )
        .map_err(gpu_err)?;
    let a = dev
        .alloc(scratch_region, hbm_bytes as u64, "hbm src")
        .map_err(gpu_err)?;
    let b = dev
        .alloc(scratch_region, hbm_bytes as u64, "hbm dst")
        .map_err(gpu_err)?;
    dev.memset(gpu.stream(), a.ptr, 1, hbm_bytes)
        .map_err(gpu_err)?;
    let s = measure_gpu(&cfg, || {
        event_time(&dev, gpu.stream(), || {
            dev.copy_d2d(gpu.stream(), b.ptr, a.ptr, hbm_bytes)
        })
        .map(Some)
    })?;
    let moved = 2 * hbm_bytes as u64;
    let mut hbm_gbs = moved as f64 / s.median_s / 1e9;
    points.push(gpu_point("mem_read", Lane::Gpu, None, vec![moved], 1, s));
    dev.arena()
        .map_err(gpu_err)?
        .destroy_region(scratch_region)
        .map_err(gpu_err)?;

    // Matmuls.
    let max_rows = shapes.iter().map(|s| s.0).max().unwrap_or(1);
    let max_cols = shapes.iter().map(|s| s.1).max().unwrap_or(1);
    let max_b = batches.iter().copied().max().unwrap_or(1);
    let max_w = shapes
        .iter()
        .flat_map(|&(r, cl)| {
            types
                .iter()
                .map(move |t| t.row_bytes(cl as u64).unwrap_or(0) as usize * r)
        })
        .max()
        .unwrap_or(0);
    let rotate = (4 * l2).max(max_w as u64);
    let wregion = dev
        .create_region(
            RegionKind::Weights,
            "profiler weights",
            rotate + max_w as u64 + (16 << 20),
        )
        .map_err(gpu_err)?;
    let sregion = dev
        .create_region(
            RegionKind::Scratch,
            "profiler matmul",
            ((max_b * max_cols * 4)
                + (max_b * max_rows * 4)
                + (max_rows * max_cols * 2)
                + (max_b * max_cols * 2)) as u64
                + (4 << 20),
        )
        .map_err(gpu_err)?;
    let alloc = |bytes: usize, what: &str| dev.alloc(sregion, bytes as u64, what).map_err(gpu_err);
    let bufs = Bufs {
        weights: wregion,
        x: alloc(max_b * max_cols * 4, "acts")?,
        out: alloc(max_b * max_rows * 4, "out")?,
        wscratch: alloc(max_rows * max_cols * 2, "dequantized weights")?,
        xscratch: alloc(max_b * max_cols * 2, "f16 acts")?,
    };
    // Activations: small f32 values (0x3c3c3c3c ≈ 0.0115).
    dev.memset(gpu.stream(), bufs.x.ptr, 0x3c, max_b * max_cols * 4)
        .map_err(gpu_err)?;
    let mut gemm_gflops = 0f64;
    let mut simt_gflops = 0f64;
    for &(rows, cols) in &shapes {
        for &ty in &types {
            let host = make_weights(ty, rows, cols, &mut rng)?;
            dev.arena()
                .map_err(gpu_err)?
                .reset(bufs.weights)
                .map_err(gpu_err)?;
            let n_copies = (rotate as usize).div_ceil(host.len()).max(1);
            let mut copies = Vec::with_capacity(n_copies);
            for i in 0..n_copies {
                let buf = dev
                    .alloc(bufs.weights, host.len() as u64, "weights copy")
                    .map_err(gpu_err)?;
                if i == 0 {
                    dev.upload(gpu.stream(), buf.ptr, &host).map_err(gpu_err)?;
                } else {
                    dev.copy_d2d(gpu.stream(), buf.ptr, copies[0], host.len())
                        .map_err(gpu_err)?;
                }
                copies.push(buf.ptr);
            }
            dev.synchronize().map_err(gpu_err)?;
            for path in ["matmul_gemv", "matmul_gemm"] {
                for &n in &batches {
                    if path == "matmul_gemv" && n > GEMV_MAX_BATCH {
                        continue;
                    }
                    progress.step(&format!("{path} {ty} {rows}x{cols} batch {n}"));
                    let mut i = 0usize;
                    let call = |w: u64| -> CudaResult<()> {
                        if path == "matmul_gemv" {
                            gpu.kernels.gemv(
                                ty,
                                w,
                                rows,
                                cols,
                                bufs.x.ptr,
                                cols,
                                bufs.out.ptr,
                                rows,
                                n,
                                None,
                                gpu.stream(),
                            )
                        } else {
                            gemm_path(
                                &gpu,
                                ty,
                                w,
                                rows,
                                cols,
                                bufs.x.ptr,
                                n,
                                bufs.out.ptr,
                                bufs.wscratch.ptr,
                                bufs.xscratch.ptr,
                            )
                        }
                    };
                    let single = event_time(&dev, gpu.stream(), || call(copies[0]))
                        .map_err(gpu_err)
                        .with_context(|| format!("{path} {ty} {rows}x{cols} batch {n}"))?;
                    let k = calls_per_sample(single);
                    let s = measure_gpu(&cfg, || {
                        event_time_per_call(&dev, gpu.stream(), k, || {
                            let w = copies[i % copies.len()];
                            i += 1;
                            call(w)
                        })
                        .map(Some)
                    })
                    .with_context(|| format!("{path} {ty} {rows}x{cols} batch {n}"))?;
                    // GEMV points at batches the runtime replays as CUDA graphs are timed inside a graph.
                    if path == "matmul_gemv" && n <= pshard_kernels::cuda::GRAPH_MAX_TOKENS {
                        // Decode batches run as CUDA graphs in the runtime: time the GEMV that
                        // way too, as 16 nodes (rotating weights) of one replayed graph.
                        let reps = 16usize;
                        let graph = CapturedGraph::capture(&dev, gpu.stream(), || {
                            (0..reps).try_for_each(|j| call(copies[j % copies.len()]))
                        })
                        .map_err(gpu_err)?;
                        let g = measure_gpu(&cfg, || {
                            event_time(&dev, gpu.stream(), || graph.launch(gpu.stream()))
                                .map(|t| Some(t / reps as f64))
                        })
                        .with_context(|| {
                            format!("{path} in a graph {ty} {rows}x{cols} batch {n}")
                        })?;
                        drop(graph);
                        points.push(gpu_point(
                            "matmul_gemv_graph",
                            Lane::Gpu,
                            Some(ty),
                            vec![rows as u64, cols as u64],
                            n,
                            g,
                        ));
                    }
                    let gflops = 2.0 * (rows * cols * n) as f64 / s.median_s / 1e9;
                    if path == "matmul_gemv" {
                        simt_gflops = simt_gflops.max(gflops);
                        if n == 1 {
                            hbm_gbs = hbm_gbs.max(host.len() as f64 / s.median_s / 1e9);
                        }
                    } else {
                        gemm_gflops = gemm_gflops.max(gflops);
                    }
                    points.push(gpu_point(
                        path,
                        Lane::Gpu,
                        Some(ty),
                        vec![rows as u64, cols as u64],
                        n,
                        s,
                    ));
                }
            }
        }
    }
    dev.arena()
        .map_err(gpu_err)?
        .destroy_region(wregion)
        .map_err(gpu_err)?;

    // MoE experts as the grouped prefill path runs them: one grouped GEMM (`moe_gemm`) over
    // MOE_EXPERTS experts with `b` tokens each (routes spread evenly, sorted once by `moe_sort`),
    // recorded per expert matrix at batch `b`.
    let moe_types: Vec<GgmlType> = types.iter().copied().filter(|t| t.is_quantized()).collect();
    let moe_batches: &[usize] = if c.quick {
        &EXPERT_BATCHES[..2]
    } else {
        EXPERT_BATCHES
    };
    let max_pairs = moe_batches.iter().max().copied().unwrap_or(1) * MOE_EXPERTS;
    let max_dim = EXPERT_SHAPES
        .iter()
        .map(|s| s.0.max(s.1))
        .max()
        .unwrap_or(1);
    let max_expert_bytes = EXPERT_SHAPES
        .iter()
        .flat_map(|&(r, cl)| {
            moe_types
                .iter()
                .map(move |t| t.row_bytes(cl as u64).unwrap_or(0) as usize * r)
        })
        .max()
        .unwrap_or(0);
    let max_tokens = max_pairs / MOE_USED;
    let mregion = dev
        .create_region(
            RegionKind::Scratch,
            "profiler moe",
            (MOE_EXPERTS * max_expert_bytes
                + max_pairs * max_dim * 6
                + max_tokens * 2 * MOE_USED * 4
                + max_pairs * 4) as u64
                + (16 << 20),
        )
        .map_err(gpu_err)?;
    let malloc = |bytes: usize, what: &str| dev.alloc(mregion, bytes as u64, what).map_err(gpu_err);
    let experts = malloc(MOE_EXPERTS * max_expert_bytes, "expert weights")?;
    let x16 = malloc(max_pairs * max_dim * 2, "expert f16 rows")?;
    let y = malloc(max_pairs * max_dim * 4, "expert out")?;
    let route = malloc(max_tokens * 2 * MOE_USED * 4, "routes")?;
    let offsets = malloc(2 * (MOE_EXPERTS + 2) * 4, "expert offsets")?;
    let order = malloc(max_pairs * 4, "pair order")?;
    let tiles = offsets.ptr + ((MOE_EXPERTS + 2) * 4) as u64;
    // f16 0x2c2c ≈ 0.07 everywhere: values do not change the timing.
    dev.memset(gpu.stream(), x16.ptr, 0x2c, max_pairs * max_dim * 2)
        .map_err(gpu_err)?;
    for &(rows, cols) in EXPERT_SHAPES {
        for &ty in &moe_types {
            let host = make_weights(ty, rows, cols, &mut rng)?;
            dev.upload(gpu.stream(), experts.ptr, &host)
                .map_err(gpu_err)?;
            for e in 1..MOE_EXPERTS {
                dev.copy_d2d(
                    gpu.stream(),
                    experts.ptr + (e * host.len()) as u64,
                    experts.ptr,
                    host.len(),
                )
                .map_err(gpu_err)?;
            }
            for &b in moe_batches {
                progress.step(&format!("moe_gemm {ty} {rows}x{cols} batch {b}"));
                let what = || format!("moe_gemm {ty} {rows}x{cols} batch {b}");
                // Each token routes to MOE_USED distinct experts drawn at random, as a router
                // does on random weights: b tokens per expert on average, unevenly (partly
                // filled token tiles cost what the runtime pays).
                let n_tokens = b * MOE_EXPERTS / MOE_USED;
                let mut words: Vec<u32> = Vec::with_capacity(n_tokens * 2 * MOE_USED);
                for _ in 0..n_tokens {
                    let ids = rand::seq::index::sample(&mut rng, MOE_EXPERTS, MOE_USED);
                    words.extend(ids.iter().map(|e| e as u32));
                    words.extend((0..MOE_USED).map(|_| (1.0f32 / MOE_USED as f32).to_bits()));
                }
                let words: Vec<u8> = words.iter().flat_map(|v| v.to_le_bytes()).collect();
                dev.upload(gpu.stream(), route.ptr, &words)
                    .map_err(gpu_err)?;
                gpu.kernels
                    .moe_sort(
                        route.ptr,
                        n_tokens,
                        MOE_USED,
                        MOE_EXPERTS,
                        offsets.ptr,
                        tiles,
                        order.ptr,
                        gpu.stream(),
                    )
                    .map_err(gpu_err)
                    .with_context(what)?;
                let pairs = b * MOE_EXPERTS;
                let call = || {
                    gpu.kernels.moe_gemm(
                        ty,
                        experts.ptr,
                        rows,
                        cols,
                        MOE_EXPERTS,
                        x16.ptr,
                        offsets.ptr,
                        tiles,
                        pairs,
                        y.ptr,
                        rows,
                        None,
                        gpu.stream(),
                    )
                };
                let single = event_time(&dev, gpu.stream(), call)
                    .map_err(gpu_err)
                    .with_context(what)?;
                let k = calls_per_sample(single);
                let s = measure_gpu(&cfg, || {
                    event_time_per_call(&dev, gpu.stream(), k, call).map(Some)
                })
                .with_context(what)?;
                let per = MOE_EXPERTS as f64;
                let s = Stats {
                    median_s: s.median_s / per,
                    lo_s: s.lo_s / per,
                    hi_s: s.hi_s / per,
                    ..s
                };
                points.push(gpu_point(
                    "moe_gemm",
                    Lane::Gpu,
                    Some(ty),
                    vec![rows as u64, cols as u64],
                    b,
                    s,
                ));
            }
        }
    }
    dev.arena()
        .map_err(gpu_err)?
        .destroy_region(mregion)
        .map_err(gpu_err)?;

    // Attention, decode (1 query row) and prefill (PREFILL_ROWS rows) vs context and layout.
    let max_rows = PREFILL_ROWS.iter().copied().max().unwrap_or(1);
    let max_ctx = contexts.iter().copied().max().unwrap_or(1024);
    let max_kv = LAYOUTS.iter().map(|l| l.2).max().unwrap_or(1);
    let max_heads = LAYOUTS.iter().map(|l| l.1).max().unwrap_or(1);
    let cache_bytes = max_ctx * max_kv * HEAD_DIM * 2;
    let aregion = dev
        .create_region(
            RegionKind::Kv,
            "profiler kv",
            2 * cache_bytes as u64 + (64 << 20),
        )
        .map_err(gpu_err)?;
    let kc = dev
        .alloc(aregion, cache_bytes as u64, "k cache")
        .map_err(gpu_err)?;
    let vc = dev
        .alloc(aregion, cache_bytes as u64, "v cache")
        .map_err(gpu_err)?;
    // f16 0x3c3c ≈ 1.06 everywhere: values do not change the timing.
    dev.memset(gpu.stream(), kc.ptr, 0x3c, cache_bytes)
        .map_err(gpu_err)?;
    dev.memset(gpu.stream(), vc.ptr, 0x3c, cache_bytes)
        .map_err(gpu_err)?;
    let pos_buf = alloc(max_rows * 4, "positions")?;
    for &ctx in &contexts {
        for &(name, n_head, n_kv) in LAYOUTS {
            for n in std::iter::once(1usize).chain(PREFILL_ROWS.iter().copied()) {
                progress.step(&format!("attention {name} ctx {ctx} rows {n}"));
                if n > ctx {
                    continue;
                }
                let p = AttnParams {
                    n_head,
                    n_kv,
                    dk: HEAD_DIM,
                    dv: HEAD_DIM,
                    n_ctx: ctx,
                    scale: 1.0 / (HEAD_DIM as f32).sqrt(),
                    softcap: 0.0,
                    window: 0,
                    v_in_k: false,
                };
                let pos: Vec<u8> = ((ctx - n) as i32..ctx as i32)
                    .flat_map(|p| p.to_le_bytes())
                    .collect();
                dev.upload(gpu.stream(), pos_buf.ptr, &pos)
                    .map_err(gpu_err)?;
                let part_bytes = pshard_kernels::cuda::kernels::attention_scratch(&p, n).max(4);
                let part = dev.alloc(aregion, part_bytes as u64, "attention partials");
                let part = match part {
                    Ok(b) => b,
                    Err(_) => alloc(part_bytes, "attention partials")?,
                };
                let q_cols = max_heads * HEAD_DIM;
                let seqs = gpu.kernels.zero_seqs(n).map_err(gpu_err)?;
                let call = || {
                    gpu.kernels.attention(
                        &p,
                        bufs.x.ptr,
                        q_cols,
                        pshard_kernels::cuda::KvCells {
                            ty: pshard_kernels::kv::KvType::F16,
                            k: kc.ptr,
                            v: vc.ptr,
                            seq: seqs,
                            base: 0,
                        },
                        pos_buf.ptr,
                        n,
                        bufs.out.ptr,
                        q_cols,
                        part.ptr,
                        None,
                        gpu.stream(),
                    )
                };
                let k = calls_per_sample(event_time(&dev, gpu.stream(), call).map_err(gpu_err)?);
                let s = measure_gpu(&cfg, || {
                    event_time_per_call(&dev, gpu.stream(), k, call).map(Some)
                })
                .with_context(|| format!("attention {name} ctx {ctx} rows {n}"))?;
                dev.free(part).map_err(gpu_err)?;
                let kv_len = ctx - (n - 1) / 2;
                points.push(gpu_point(
                    "attention",
                    Lane::Gpu,
                    Some(GgmlType::F16),
                    vec![kv_len as u64, n_head as u64, n_kv as u64, HEAD_DIM as u64],
                    n,
                    s,
                ));
            }
        }
    }
    dev.arena()
        .map_err(gpu_err)?
        .destroy_region(aregion)
        .map_err(gpu_err)?;

    // Copies vs size.
    let cregion = dev
        .create_region(
            RegionKind::Scratch,
            "profiler copies",
            max_copy as u64 + (1 << 20),
        )
        .map_err(gpu_err)?;
    let dbuf = dev
        .alloc(cregion, max_copy as u64, "copy target")
        .map_err(gpu_err)?;
    let mut pinned = PinnedBuf::new(&dev, max_copy).map_err(gpu_err)?;
    pinned
        .as_mut_slice()
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = i as u8);
    let pageable: Vec<u8> = (0..max_copy).map(|i| i as u8).collect();
    let copy = dev.copy_stream().clone();
    let mut best = [0f64; 3];
    let mut copy_latency_us = None;
    for (k, op) in ["h2d_pinned", "h2d_pageable", "d2h_pinned"]
        .into_iter()
        .enumerate()
    {
        for &size in &copy_sizes {
            progress.step(&format!("{op} {size} bytes"));
            let s = measure_gpu(&cfg, || {
                match k {
                    // SAFETY: `pinned` is page-locked and outlives the copy (synchronised below);
                    // `dbuf` holds max_copy ≥ size bytes.
                    0 => unsafe { dev.upload_async(&copy, dbuf.ptr, pinned.as_ptr(), size)? },
                    1 => dev.upload(&copy, dbuf.ptr, &pageable[..size])?,
                    // SAFETY: as above, the destination is pinned and exclusively ours until the
                    // synchronise.
                    _ => unsafe { dev.download_async(&copy, pinned.as_mut_ptr(), dbuf.ptr, size)? },
                }
                copy.synchronize().map_err(|e| cuda::CudaError::Driver {
                    call: "waiting for a copy",
                    err: format!("{e:?}"),
                })?;
                Ok(None)
            })?;
            if k == 0 && size == 4 {
                copy_latency_us = Some(s.median_s * 1e6);
            }
            best[k] = best[k].max(size as f64 / s.median_s / 1e9);
            points.push(gpu_point(op, Lane::Copy, None, vec![size as u64], 1, s));
        }
    }
    black_box(pinned.as_slice()[0]);

    // Copy while the GPU computes: a GEMM loop on the compute stream, a pinned H2D on the copy
    // stream; overlap = share of the shorter job hidden in the combined time.
    progress.step("H2D overlapping compute");
    let ov_bytes = max_copy.min(256 << 20);
    let (rows, cols) = (4096usize, 4096usize);
    let wq = make_weights(GgmlType::Q4_K, rows, cols, &mut rng)?;
    let wregion = dev
        .create_region(
            RegionKind::Weights,
            "profiler overlap",
            wq.len() as u64 + (1 << 20),
        )
        .map_err(gpu_err)?;
    let wbuf = dev
        .alloc(wregion, wq.len() as u64, "overlap weights")
        .map_err(gpu_err)?;
    dev.upload(gpu.stream(), wbuf.ptr, &wq).map_err(gpu_err)?;
    let compute_once = || {
        gemm_path(
            &gpu,
            GgmlType::Q4_K,
            wbuf.ptr,
            rows,
            cols,
            bufs.x.ptr,
            max_b.min(512),
            bufs.out.ptr,
            bufs.wscratch.ptr,
            bufs.xscratch.ptr,
        )
    };
    // Size the compute job to about the copy's duration.
    let t_one = event_time(&dev, gpu.stream(), compute_once).map_err(gpu_err)?;
    let t_copy_est = ov_bytes as f64 / (best[0].max(1.0) * 1e9);
    let reps = ((t_copy_est / t_one.max(1e-7)).ceil() as usize).clamp(1, 10_000);
    let wall = |do_compute: bool, do_copy: bool| -> CudaResult<Option<f64>> {
        let t0 = Instant::now();
        if do_compute {
            for _ in 0..reps {
                compute_once()?;
            }
        }
        if do_copy {
            // SAFETY: pinned source outlives the copy (synchronised below); `dbuf` has room.
            unsafe { dev.upload_async(&copy, dbuf.ptr, pinned.as_ptr(), ov_bytes)? };
        }
        dev.synchronize()?;
        Ok(Some(t0.elapsed().as_secs_f64()))
    };
    let t_c = measure_gpu(&cfg, || wall(true, false))?;
    let t_x = measure_gpu(&cfg, || wall(false, true))?;
    let t_both = measure_gpu(&cfg, || wall(true, true))?;
    let hidden = (t_c.median_s + t_x.median_s - t_both.median_s) / t_c.median_s.min(t_x.median_s);
    let overlap = hidden.clamp(0.0, 1.0);
    points.push(gpu_point(
        "h2d_overlap_compute",
        Lane::Copy,
        None,
        vec![ov_bytes as u64],
        1,
        t_both,
    ));
    dev.arena()
        .map_err(gpu_err)?
        .destroy_region(wregion)
        .map_err(gpu_err)?;

    // Launch and event overheads.
    progress.step("launch overhead");
    let per = 200usize;
    let launch = measure_gpu(&cfg, || {
        let t0 = Instant::now();
        for _ in 0..per {
            gpu.kernels.scale(bufs.out.ptr, 1, 1.0, gpu.stream())?;
        }
        dev.synchronize()?;
        Ok(Some(t0.elapsed().as_secs_f64() / per as f64))
    })?;
    let launch_us = launch.median_s * 1e6;
    points.push(gpu_point("launch", Lane::Gpu, None, vec![1], 1, launch));
    // cuBLAS calls cost the host more than a plain launch (heuristics, argument checks): the
    // grouped MoE path issues one per used expert matrix.
    progress.step("cuBLAS launch overhead");
    let blas_launch = measure_gpu(&cfg, || {
        let t0 = Instant::now();
        for _ in 0..per {
            gpu.blas.matmul(
                GemmInput::F16,
                bufs.wscratch.ptr,
                64,
                64,
                bufs.xscratch.ptr,
                1,
                bufs.out.ptr,
                64,
            )?;
        }
        dev.synchronize()?;
        Ok(Some(t0.elapsed().as_secs_f64() / per as f64))
    })?;
    let blas_launch_us = blas_launch.median_s * 1e6;
    points.push(gpu_point(
        "blas_launch",
        Lane::Gpu,
        None,
        vec![1],
        1,
        blas_launch,
    ));
    progress.step("event overhead");
    let ev = dev.event(false).map_err(gpu_err)?;
    let event = measure_gpu(&cfg, || {
        let t0 = Instant::now();
        ev.record(gpu.stream())
            .and_then(|_| ev.synchronize())
            .map_err(|e| cuda::CudaError::Driver {
                call: "recording and waiting for an event",
                err: format!("{e:?}"),
            })?;
        Ok(Some(t0.elapsed().as_secs_f64()))
    })?;
    points.push(gpu_point("event_sync", Lane::Gpu, None, vec![1], 1, event));
    progress.step("graph node overhead");
    let nodes = 64usize;
    let graph = CapturedGraph::capture(&dev, gpu.stream(), || {
        (0..nodes).try_for_each(|_| gpu.kernels.scale(bufs.out.ptr, 1, 1.0, gpu.stream()))
    })
    .map_err(gpu_err)?;
    let node = measure_gpu(&cfg, || {
        event_time(&dev, gpu.stream(), || graph.launch(gpu.stream()))
            .map(|t| Some(t / nodes as f64))
    })?;
    drop(graph);
    let graph_node_us = node.median_s * 1e6;
    points.push(gpu_point("graph_node", Lane::Gpu, None, vec![1], 1, node));
    dev.arena()
        .map_err(gpu_err)?
        .destroy_region(cregion)
        .map_err(gpu_err)?;
    progress.finish(started.elapsed());

    let positive = |v: f64| (v.is_finite() && v > 0.0).then_some(v);
    let roofline = Roofline {
        gpu_mem_gbs: Some(hbm_gbs),
        gpu_gemm_gflops: positive(gemm_gflops),
        gpu_simt_gflops: positive(simt_gflops),
        gpu_launch_us: Some(launch_us),
        gpu_graph_node_us: Some(graph_node_us),
        gpu_blas_launch_us: Some(blas_launch_us),
        h2d_pinned_gbs: Some(best[0]),
        h2d_pageable_gbs: positive(best[1]),
        d2h_pinned_gbs: positive(best[2]),
        copy_latency_us,
        overlap_efficiency: Some(overlap),
        cuda_context_bytes: Some(cuda_context_bytes),
        ..Roofline::default()
    };
    let gpu_id = machine::gpu_identity(&dev);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    drop(gpu);
    Ok(Profile {
        format: PROFILE_FORMAT.to_string(),
        version: format!("{PROFILE_MAJOR}.{PROFILE_MINOR}"),
        kind: ProfileKind::Gpu,
        pshard_version: env!("CARGO_PKG_VERSION").to_string(),
        created: machine::now_rfc3339(),
        note: format!(
            "measured by pshard-profile-gpu{} in {:.0} s; HBM from a device copy (read + write bytes) \
             and the batch-1 GEMV, copies timed with their synchronisation",
            if c.quick { " --quick" } else { "" },
            started.elapsed().as_secs_f64()
        ),
        machine: machine::machine(threads as u32, Some(gpu_id)),
        roofline,
        points,
    })
}
