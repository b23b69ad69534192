//! The CPU half: DRAM read bandwidth vs threads, pshard's own quantized matmuls per type, shape and
//! batch, attention vs context and head layout, the fan-out cost of one op and, when a GPU is
//! present, the same matmuls and reads while a pinned host→device copy loop runs.
//!
//! Weights and KV caches are rotated through copies that together exceed the last-level cache, so
//! every call reads from DRAM as the runtime does with a real model (whose weights never fit).

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use half::f16;
use pshard_kernels::gemm::packed;
use pshard_kernels::matmul::{
    matmul, quantize_acts_into, QuantizedActs, WeightLayout, WeightMatrix,
};
use pshard_kernels::ops::{self, attention, AttnParams, KvType, KvView};
use pshard_kernels::quant::{self, SUPPORTED};
use pshard_model::ggml_type::GgmlType;
use pshard_model::graph::Activation;
use pshard_planner::profile::{
    KnownOp, Lane, Point, Profile, ProfileKind, Roofline, Stats, PROFILE_FORMAT, PROFILE_MAJOR,
    PROFILE_MINOR,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use rayon::ThreadPool;

use crate::machine;
use crate::progress::Progress;
use crate::stats::{measure, summarize, MeasureCfg};

/// Batch sizes of the full run (token rows per matmul call).
pub const FULL_BATCHES: &[usize] = &[1, 2, 4, 8, 16, 32, 64, 128, 512];
/// Matrix shapes `[rows, cols]` of the full run: attention/FFN projections of 7-8B models and an
/// MoE expert.
pub const FULL_SHAPES: &[(usize, usize)] =
    &[(4096, 4096), (4096, 14336), (14336, 4096), (2048, 768)];
/// Smaller matrices of the full run, every type and batch: the projections of sub-1B models and
/// the k/v projections of GQA models, where the fixed costs of an op (handing rows to the
/// threads, quantizing the activations, the last thread's tail) weigh on the time as much as
/// the bytes (on the 2-core dev VM a 576 × 192 Q4_1 decode matmul moves 69 KB).
pub const SMALL_SHAPES: &[(usize, usize)] = &[(1024, 1024), (512, 512), (256, 256)];
/// Context lengths of the attention points of the full run (the GPU profile's too).
pub const FULL_CONTEXTS: &[usize] = &[1024, 2048, 4096, 8192, 16384, 32768];
/// Shorter contexts of the CPU's decode attention points: early decode steps, where the fixed
/// cost of the op (one task per kv head and span) outweighs reading the cache.
pub const SHORT_CONTEXTS: &[usize] = &[64, 256];
/// Query rows of the CPU's prefill attention points: the engine's default ubatch.
pub const PREFILL_ROWS: usize = 512;
/// Contexts of the prefill attention points (the ubatch at the start of the context and after
/// earlier ubatches).
pub const PREFILL_CONTEXTS: &[usize] = &[512, 1024, 2048];
/// Head layouts `(name, n_head, n_head_kv)`; head dimension 128.
pub const LAYOUTS: &[(&str, usize, usize)] = &[("MHA", 32, 32), ("GQA-4", 32, 8), ("GQA-8", 32, 4)];
/// Head dimension of the attention points.
pub const HEAD_DIM: usize = 128;

/// Rows (tokens) of the elementwise points: a decode step, decode batches and a prefill ubatch.
pub const ELEMENTWISE_ROWS: &[usize] = &[1, 16, 64, 512];
/// Row widths of the norm, GLU and add points.
pub const ELEMENTWISE_COLS: &[usize] = &[1024, 4096];
/// Head layouts `(heads, head_dim)` of the rope points: one head (the per-position sines and
/// cosines dominate) and 32 (the rotations do).
pub const ROPE_LAYOUTS: &[(usize, usize)] = &[(1, 128), (32, 128)];

/// What a CPU profile run measures.
#[derive(Clone, Debug)]
pub struct CpuConfig {
    /// Short run (CI, smoke tests): fewer types, shapes, batches and contexts, shorter caps.
    pub quick: bool,
    /// Largest thread count (default: all hardware threads).
    pub threads: Option<usize>,
    /// Seed of the random weights and activations.
    pub seed: u64,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// Measure with a GPU copy loop when a GPU is present (`false` skips the GPU probe entirely).
    pub use_gpu: bool,
}

impl Default for CpuConfig {
    fn default() -> Self {
        CpuConfig {
            quick: false,
            threads: None,
            seed: 0x5eed,
            progress: true,
            use_gpu: true,
        }
    }
}

/// One matmul series: a shape, its types, its batches.
#[derive(Clone, Debug)]
struct MatmulPlan {
    shape: (usize, usize),
    types: Vec<GgmlType>,
    batches: Vec<usize>,
}

/// The full list of what a run measures (also sizes the progress bar).
#[derive(Clone, Debug)]
struct Plan {
    thread_counts: Vec<usize>,
    mem_bytes: usize,
    matmuls: Vec<MatmulPlan>,
    /// Attention series: query rows and the contexts measured at that many rows.
    attn: Vec<(usize, Vec<usize>)>,
    while_h2d: Vec<(GgmlType, (usize, usize), usize)>,
    /// Elementwise points: rows, and row widths (norm, GLU, add) / rope layouts.
    ew_rows: Vec<usize>,
    ew_cols: Vec<usize>,
    rope_layouts: Vec<(usize, usize)>,
    cfg: MeasureCfg,
}

fn plan(c: &CpuConfig, threads: usize, llc: usize) -> Plan {
    let mut thread_counts: Vec<usize> = Vec::new();
    let mut t = 1;
    while t < threads {
        thread_counts.push(t);
        t *= 2;
    }
    thread_counts.push(threads);
    // A streaming buffer several times the last-level cache (at least 1 GiB).
    let mem_bytes = (4 * llc).clamp(1 << 30, 4 << 30);
    let all: Vec<GgmlType> = SUPPORTED.to_vec();
    if c.quick {
        let types = vec![GgmlType::Q4_K, GgmlType::Q8_0, GgmlType::F16];
        Plan {
            thread_counts,
            mem_bytes,
            matmuls: vec![
                MatmulPlan {
                    shape: (4096, 4096),
                    types: types.clone(),
                    batches: vec![1, 8],
                },
                MatmulPlan {
                    shape: (2048, 768),
                    types,
                    batches: vec![1, 8, 64],
                },
                MatmulPlan {
                    shape: (2048, 768),
                    types: vec![GgmlType::Q4_K],
                    batches: vec![512],
                },
            ],
            attn: vec![(1, vec![1024, 4096])],
            while_h2d: vec![(GgmlType::Q4_K, (4096, 4096), 1)],
            ew_rows: vec![1, 512],
            ew_cols: vec![1024],
            rope_layouts: ROPE_LAYOUTS.to_vec(),
            cfg: MeasureCfg::quick(),
        }
    } else {
        Plan {
            thread_counts,
            mem_bytes,
            matmuls: vec![
                MatmulPlan {
                    shape: (4096, 4096),
                    types: all.clone(),
                    batches: FULL_BATCHES.to_vec(),
                },
                MatmulPlan {
                    shape: (2048, 768),
                    types: all.clone(),
                    batches: FULL_BATCHES.to_vec(),
                },
            ]
            .into_iter()
            .chain(SMALL_SHAPES.iter().map(|&shape| MatmulPlan {
                shape,
                types: all.clone(),
                batches: FULL_BATCHES.to_vec(),
            }))
            .chain([
                // The large shapes take seconds per call at big batches: every type at a few
                // batches, the common types at 512 too.
                MatmulPlan {
                    shape: (4096, 14336),
                    types: all.clone(),
                    batches: vec![1, 4, 16, 64],
                },
                MatmulPlan {
                    shape: (14336, 4096),
                    types: all.clone(),
                    batches: vec![1, 4, 16, 64],
                },
                MatmulPlan {
                    shape: (4096, 14336),
                    types: vec![GgmlType::Q4_K, GgmlType::Q8_0],
                    batches: vec![512],
                },
                MatmulPlan {
                    shape: (14336, 4096),
                    types: vec![GgmlType::Q4_K, GgmlType::Q6_K],
                    batches: vec![512],
                },
            ])
            .collect(),
            attn: vec![
                (
                    1,
                    SHORT_CONTEXTS
                        .iter()
                        .chain(FULL_CONTEXTS)
                        .copied()
                        .collect(),
                ),
                (
                    32,
                    FULL_CONTEXTS
                        .iter()
                        .copied()
                        .filter(|&c| c <= 2048)
                        .collect(),
                ),
                (PREFILL_ROWS, PREFILL_CONTEXTS.to_vec()),
            ],
            while_h2d: vec![
                (GgmlType::Q4_K, (14336, 4096), 1),
                (GgmlType::Q4_K, (14336, 4096), 16),
                (GgmlType::Q8_0, (14336, 4096), 1),
                (GgmlType::Q4_K, (4096, 4096), 512),
            ],
            ew_rows: ELEMENTWISE_ROWS.to_vec(),
            ew_cols: ELEMENTWISE_COLS.to_vec(),
            rope_layouts: ROPE_LAYOUTS.to_vec(),
            cfg: MeasureCfg::full(),
        }
    }
}

impl Plan {
    fn steps(&self, gpu: bool) -> u64 {
        let mm: usize = self
            .matmuls
            .iter()
            .map(|m| m.types.len() * m.batches.len())
            .sum();
        let attn: usize = self.attn.iter().map(|(_, c)| c.len()).sum::<usize>() * LAYOUTS.len();
        let h2d = if gpu { self.while_h2d.len() + 1 } else { 0 };
        let ew = self.ew_rows.len() * (4 * self.ew_cols.len() + self.rope_layouts.len());
        (self.thread_counts.len() + 1 + mm + attn + ew + h2d) as u64
    }
}

/// Size in bytes of the largest data cache (sysfs), or 32 MiB when unknown.
pub fn last_level_cache_bytes() -> usize {
    let mut best = 0usize;
    for i in 0..8 {
        let dir = format!("/sys/devices/system/cpu/cpu0/cache/index{i}");
        let Ok(size) = std::fs::read_to_string(format!("{dir}/size")) else {
            continue;
        };
        let size = size.trim();
        let (num, mul) = match size.chars().last() {
            Some('K') => (&size[..size.len() - 1], 1usize << 10),
            Some('M') => (&size[..size.len() - 1], 1 << 20),
            Some('G') => (&size[..size.len() - 1], 1 << 30),
            _ => (size, 1),
        };
        if let Ok(n) = num.parse::<usize>() {
            best = best.max(n * mul);
        }
    }
    if best == 0 {
        32 << 20
    } else {
        best
    }
}

/// Builds a rayon pool of `n` threads.
fn pool(n: usize) -> Result<ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .map_err(|e| anyhow!("cannot start a pool of {n} threads: {e}"))
}

/// Weight bytes of a `rows × cols` matrix of `ty`, made by the type's own reference quantizer from
/// random values: a few distinct rows, repeated (the values do not change the timing).
pub fn make_weights(ty: GgmlType, rows: usize, cols: usize, rng: &mut StdRng) -> Result<Vec<u8>> {
    let k = quant::kernel(ty).ok_or_else(|| anyhow!("no CPU kernel for {ty}"))?;
    let rb = ty
        .row_bytes(cols as u64)
        .ok_or_else(|| anyhow!("{cols} columns are not whole {ty} blocks"))? as usize;
    let distinct = rows.min(16);
    let mut seed_rows = vec![0u8; distinct * rb];
    let mut src = vec![0f32; cols];
    for r in 0..distinct {
        src.iter_mut()
            .for_each(|v| *v = rng.gen_range(-1.0f32..1.0));
        (k.quantize_row)(&src, &mut seed_rows[r * rb..][..rb]);
    }
    let mut data = Vec::with_capacity(rows * rb);
    for r in 0..rows {
        let s = r % distinct;
        data.extend_from_slice(&seed_rows[s * rb..][..rb]);
    }
    Ok(data)
}

/// Copies of one buffer that together hold at least `target` bytes (at least one copy).
fn replicate(one: Vec<u8>, target: usize) -> Vec<Vec<u8>> {
    let copies = target.div_ceil(one.len().max(1)).clamp(1, 4096);
    let mut v = Vec::with_capacity(copies);
    for _ in 1..copies {
        v.push(one.clone());
    }
    v.push(one);
    v
}

/// A pinned host→device copy loop on its own thread; reports the seconds of every chunk copy.
struct CopyLoop {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<f64>>>,
    handle: Option<std::thread::JoinHandle<Result<()>>>,
    chunk: usize,
}

impl CopyLoop {
    fn start(dev: Arc<pshard_kernels::cuda::GpuDevice>, chunk: usize) -> Result<CopyLoop> {
        use pshard_kernels::cuda::{PinnedBuf, RegionKind};
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (stop2, samples2) = (stop.clone(), samples.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let handle = std::thread::spawn(move || -> Result<()> {
            let setup = || -> Result<_> {
                dev.bind()?;
                let host = PinnedBuf::new(&dev, chunk)?;
                let region =
                    dev.create_region(RegionKind::Scratch, "profiler h2d", chunk as u64)?;
                let buf = dev.alloc(region, chunk as u64, "profiler h2d target")?;
                Ok((host, buf))
            };
            let (host, buf) = match setup() {
                Ok(v) => {
                    let _ = ready_tx.send(Ok(()));
                    v
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow!("{e}")));
                    return Err(e);
                }
            };
            let stream = dev.copy_stream().clone();
            while !stop2.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                // SAFETY: `host` is pinned and outlives the copy (we synchronise right after);
                // `buf` was allocated with `chunk` bytes.
                unsafe { dev.upload_async(&stream, buf.at(0), host.as_ptr(), chunk)? };
                stream
                    .synchronize()
                    .map_err(|e| anyhow!("waiting for the H2D copy: {e:?}"))?;
                samples2
                    .lock()
                    .map_err(|_| anyhow!("copy sample lock poisoned"))?
                    .push(t0.elapsed().as_secs_f64());
            }
            Ok(())
        });
        ready_rx
            .recv()
            .map_err(|_| anyhow!("the copy thread stopped before starting"))??;
        Ok(CopyLoop {
            stop,
            samples,
            handle: Some(handle),
            chunk,
        })
    }

    /// Forgets the samples so far (between measurements).
    fn reset(&self) {
        if let Ok(mut s) = self.samples.lock() {
            s.clear();
        }
    }

    fn take(&self) -> Vec<f64> {
        self.samples
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default()
    }

    fn finish(mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.take().map(|h| h.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(anyhow!("the copy thread panicked")),
            None => Ok(()),
        }
    }
}

impl Drop for CopyLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// State of one run.
struct Runner {
    plan: Plan,
    rng: StdRng,
    points: Vec<Point>,
    progress: Progress,
    /// Bytes the rotated copies of weights / KV should cover (several times the LLC).
    rotate_bytes: usize,
}

fn point(
    op: &str,
    quant: Option<GgmlType>,
    shape: Vec<u64>,
    batch: usize,
    threads: usize,
    stats: Stats,
) -> Point {
    Point {
        op: op.to_string(),
        lane: Lane::Cpu,
        quant: quant.map(|q| q.name().to_string()),
        shape,
        batch: batch as u64,
        threads: threads as u32,
        stats,
    }
}

/// Streaming read of `buf` (wrapping sum, vectorised) split over the current pool.
fn read_all(buf: &[u64]) -> u64 {
    buf.par_chunks(1 << 15)
        .map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b)))
        .reduce(|| 0, u64::wrapping_add)
}

impl Runner {
    fn mem_read(&mut self, buf: &[u64], threads: usize, op: &str) -> Result<Stats> {
        let p = pool(threads)?;
        let stats = p.install(|| {
            measure(&self.plan.cfg, || {
                black_box(read_all(black_box(buf)));
                None
            })
        });
        self.points.push(point(
            op,
            None,
            vec![(buf.len() * 8) as u64],
            1,
            threads,
            stats.clone(),
        ));
        Ok(stats)
    }

    /// Times quantize-activations + matmul (the work of one runtime matmul op) over rotated copies
    /// of the weights in `layout`.
    fn matmul_point(
        &mut self,
        p: &ThreadPool,
        (copies, layout): (&[Vec<u8>], WeightLayout),
        ty: GgmlType,
        shape: (usize, usize),
        batch: usize,
        op: &str,
    ) -> Result<Stats> {
        let (rows, cols) = shape;
        let k = quant::kernel(ty).ok_or_else(|| anyhow!("no CPU kernel for {ty}"))?;
        let x: Vec<f32> = (0..batch * cols)
            .map(|_| self.rng.gen_range(-1.0f32..1.0))
            .collect();
        let mut acts = QuantizedActs::empty(k.act);
        let mut out = vec![0f32; batch * rows];
        let mut i = 0usize;
        let mut err = None;
        let stats = p.install(|| {
            measure(&self.plan.cfg, || {
                let w = WeightMatrix {
                    ty,
                    data: &copies[i % copies.len()],
                    rows,
                    cols,
                    layout,
                };
                i += 1;
                let r = quantize_acts_into(k.act, &x, batch, cols, &mut acts)
                    .and_then(|_| matmul(&w, &acts, &mut out, rows, 0..rows));
                if let Err(e) = r {
                    err.get_or_insert(e);
                }
                None
            })
        });
        if let Some(e) = err {
            return Err(anyhow!("{ty} matmul {rows}x{cols} batch {batch}: {e}"));
        }
        black_box(&out);
        let threads = p.current_num_threads();
        self.points.push(point(
            op,
            Some(ty),
            vec![rows as u64, cols as u64],
            batch,
            threads,
            stats.clone(),
        ));
        Ok(stats)
    }

    /// Times `f` on the kernels' pool and records it as a point of `op`.
    fn ew_point(&mut self, op: KnownOp, shape: Vec<u64>, rows: usize, f: impl FnMut()) {
        let mut f = f;
        let stats = measure(&self.plan.cfg, || {
            f();
            None
        });
        let threads = pshard_kernels::pool::threads();
        self.points
            .push(point(op.as_str(), None, shape, rows, threads, stats));
    }

    /// The elementwise ops of a layer as the CPU lane runs them (their kernels decide when to
    /// split rows over the pool): RMS norm, GLU (SiLU and GELU-tanh), add and rope, per row
    /// count and width. Activations stay in cache, as the lane's buffers are between ops.
    fn elementwise_points(&mut self) {
        let (rows_list, cols_list) = (self.plan.ew_rows.clone(), self.plan.ew_cols.clone());
        let max = rows_list.iter().max().copied().unwrap_or(1)
            * cols_list
                .iter()
                .copied()
                .chain(self.plan.rope_layouts.iter().map(|l| l.0 * l.1))
                .max()
                .unwrap_or(1);
        let a: Vec<f32> = (0..max).map(|_| self.rng.gen_range(-1.0f32..1.0)).collect();
        let b: Vec<f32> = (0..max).map(|_| self.rng.gen_range(-1.0f32..1.0)).collect();
        let mut out = vec![0f32; max];
        for &rows in &rows_list {
            for &cols in &cols_list {
                let n = rows * cols;
                let shape = vec![cols as u64];
                let w = &b[..cols];
                self.progress.step(&format!("rms_norm {rows}x{cols}"));
                self.ew_point(KnownOp::RmsNorm, shape.clone(), rows, || {
                    ops::rms_norm(&a[..n], w, &mut out[..n], 1e-6);
                    black_box(&out);
                });
                for (op, act) in [
                    (KnownOp::Glu, Activation::Silu),
                    (KnownOp::Geglu, Activation::GeluTanh),
                ] {
                    self.progress.step(&format!("{op} {rows}x{cols}"));
                    self.ew_point(op, shape.clone(), rows, || {
                        ops::glu(&a[..n], &b[..n], &mut out[..n], act);
                        black_box(&out);
                    });
                }
                self.progress.step(&format!("add {rows}x{cols}"));
                out[..n].copy_from_slice(&a[..n]);
                self.ew_point(KnownOp::Add, shape, rows, || {
                    ops::add_inplace(&mut out[..n], &b[..n]);
                    black_box(&out);
                });
            }
            for &(heads, hd) in &self.plan.rope_layouts.clone() {
                let n = rows * heads * hd;
                // Positions deep in a context, as most rows of a prompt are.
                let positions: Vec<u32> = (0..rows as u32).map(|i| 4096 + i).collect();
                let rope = ops::Rope {
                    pairing: ops::RopePairing::Neox,
                    n_dims: hd,
                    base: 10000.0,
                    pos_scale: 1.0,
                    freq_factors: None,
                    yarn: None,
                };
                self.progress.step(&format!("rope {rows}x{heads}x{hd}"));
                out[..n].copy_from_slice(&a[..n]);
                self.ew_point(KnownOp::Rope, vec![heads as u64, hd as u64], rows, || {
                    ops::rope(&mut out[..n], hd, &positions, &rope);
                    black_box(&out);
                });
            }
        }
    }

    fn attention_points(&mut self, p: &ThreadPool) -> Result<()> {
        let threads = p.current_num_threads();
        let max_ctx = self
            .plan
            .attn
            .iter()
            .flat_map(|(_, c)| c.iter().copied())
            .max()
            .unwrap_or(0);
        let max_kv_heads = LAYOUTS.iter().map(|l| l.2).max().unwrap_or(1);
        let need = 2 * max_ctx * max_kv_heads * HEAD_DIM;
        // f16 elements: one largest cache (K and V), or more to cover the rotation target.
        let len = need.max(self.rotate_bytes / 2);
        // Small random values from a table (filling gigabytes through the RNG would be slow).
        let table: Vec<f16> = (0..4099)
            .map(|_| f16::from_f32(self.rng.gen_range(-1.0f32..1.0)))
            .collect();
        let kv: Vec<f16> = (0..len).map(|i| table[i % table.len()]).collect();
        for (batch, contexts) in self.plan.attn.clone() {
            for ctx in contexts.into_iter().filter(|&c| c >= batch) {
                for &(name, n_head, n_kv) in LAYOUTS {
                    self.progress
                        .step(&format!("attention {name} ctx {ctx} batch {batch}"));
                    let kk = n_kv * HEAD_DIM;
                    let slot = 2 * ctx * kk;
                    let slots = (len / slot).max(1);
                    let q: Vec<f32> = (0..batch * n_head * HEAD_DIM)
                        .map(|_| self.rng.gen_range(-1.0f32..1.0))
                        .collect();
                    let positions: Vec<u32> = (ctx - batch..ctx).map(|p| p as u32).collect();
                    let mut out = vec![0f32; batch * n_head * HEAD_DIM];
                    let params = AttnParams {
                        n_head,
                        n_head_kv: n_kv,
                        head_dim_k: HEAD_DIM,
                        head_dim_v: HEAD_DIM,
                        window: None,
                        scale: 1.0 / (HEAD_DIM as f32).sqrt(),
                        softcap: None,
                        sinks: None,
                    };
                    let mut i = 0usize;
                    let stats = p.install(|| {
                        measure(&self.plan.cfg, || {
                            let base = (i % slots) * slot;
                            i += 1;
                            let view = KvView {
                                k: bytemuck::cast_slice(&kv[base..][..ctx * kk]),
                                v: bytemuck::cast_slice(&kv[base + ctx * kk..][..ctx * kk]),
                                ty: KvType::F16,
                                cells: ctx,
                                k_row: kk,
                                v_row: kk,
                            };
                            attention(&q, &positions, &view, &params, &mut out);
                            None
                        })
                    });
                    black_box(&out);
                    // Keys attended per query, averaged over the causal batch.
                    let kv_len = ctx - (batch - 1) / 2;
                    self.points.push(point(
                        "attention",
                        Some(GgmlType::F16),
                        vec![kv_len as u64, n_head as u64, n_kv as u64, HEAD_DIM as u64],
                        batch,
                        threads,
                        stats,
                    ));
                }
            }
        }
        Ok(())
    }
}

/// What the GPU-side measurement of a CPU run found (for the roofline).
struct WhileH2d {
    cpu_mem_gbs: f64,
    h2d_gbs: f64,
}

/// Runs the CPU profile and returns it (not yet written).
pub fn run_cpu(c: &CpuConfig) -> Result<Profile> {
    let hw = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let threads = c.threads.unwrap_or(hw).max(1);
    let llc = last_level_cache_bytes();
    let plan = plan(c, threads, llc);
    let gpu = if c.use_gpu {
        machine::try_open_gpu().ok()
    } else {
        None
    };
    let progress = Progress::new(plan.steps(gpu.is_some()), c.progress);
    let rotate_bytes = (3 * llc).clamp(256 << 20, 2 << 30);
    let mut r = Runner {
        plan,
        rng: StdRng::seed_from_u64(c.seed),
        points: Vec::new(),
        progress,
        rotate_bytes,
    };
    let started = Instant::now();

    // DRAM read bandwidth vs threads. Non-zero contents: zero pages could all map one frame.
    let words = r.plan.mem_bytes / 8;
    let buf: Vec<u64> = (0..words as u64).collect();
    let mut mem_gbs = 0f64;
    for &t in &r.plan.thread_counts.clone() {
        r.progress.step(&format!("DRAM read, {t} threads"));
        let s = r.mem_read(&buf, t, "mem_read")?;
        if t == threads {
            mem_gbs = (buf.len() * 8) as f64 / s.median_s / 1e9;
        }
    }

    let main_pool = pool(threads)?;
    // The kernels run on their own pool: the same thread count.
    pshard_kernels::pool::set_threads(threads);
    // Fixed cost of one op: handing an empty job to every participant of the kernels' pool and
    // waiting for all of them (workers hot from the previous op, as within a layer).
    r.progress.step("op fan-out overhead");
    let overhead = measure(&r.plan.cfg, || {
        pshard_kernels::pool::run(|i, _| {
            black_box(i);
        });
        None
    });
    r.points.push(point(
        "op_overhead",
        None,
        vec![threads as u64],
        1,
        threads,
        overhead.clone(),
    ));

    // Matmuls.
    let mut best_gflops = 0f64;
    for m in r.plan.matmuls.clone() {
        let (rows, cols) = m.shape;
        for &ty in &m.types {
            // The layout the engine computes a CPU-only matrix from (repacked at load where
            // this CPU has the kernels); the points while H2D below keep the file's layout,
            // as the CPU's share of a matrix that also travels to the GPU does.
            let one = make_weights(ty, rows, cols, &mut r.rng)?;
            let wrb = one.len() / rows;
            let (one, layout) = if packed::computes_repacked(ty, one.len(), rows, wrb) {
                (
                    packed::repack(ty, &one, rows, wrb)?,
                    WeightLayout::Interleaved,
                )
            } else {
                (one, WeightLayout::File)
            };
            let copies = replicate(one, r.rotate_bytes);
            for &b in &m.batches {
                r.progress
                    .step(&format!("matmul {ty} {rows}x{cols} batch {b}"));
                let s = r.matmul_point(&main_pool, (&copies, layout), ty, m.shape, b, "matmul")?;
                best_gflops = best_gflops.max(2.0 * (rows * cols * b) as f64 / s.median_s / 1e9);
            }
        }
    }

    r.attention_points(&main_pool)?;
    r.elementwise_points();

    // CPU while a pinned H2D copy loop runs.
    let mut while_h2d = None;
    if let Some(dev) = gpu.clone() {
        while_h2d = Some(measure_while_h2d(&mut r, &main_pool, dev, &buf, threads)?);
    }
    drop(buf);
    r.progress.finish(started.elapsed());

    let roofline = Roofline {
        cpu_mem_gbs: Some(mem_gbs),
        cpu_gflops: (best_gflops > 0.0).then_some(best_gflops),
        cpu_op_overhead_us: Some(overhead.median_s * 1e6),
        cpu_mem_while_h2d_gbs: while_h2d.as_ref().map(|w| w.cpu_mem_gbs),
        h2d_while_cpu_gbs: while_h2d.as_ref().map(|w| w.h2d_gbs),
        ..Roofline::default()
    };
    let gpu_id = gpu.as_deref().map(machine::gpu_identity);
    Ok(Profile {
        format: PROFILE_FORMAT.to_string(),
        version: format!("{PROFILE_MAJOR}.{PROFILE_MINOR}"),
        kind: ProfileKind::Cpu,
        pshard_version: env!("CARGO_PKG_VERSION").to_string(),
        created: machine::now_rfc3339(),
        note: format!(
            "measured by pshard-profile-cpu{} in {:.0} s; weights rotated over {} MiB (LLC {} MiB)",
            if c.quick { " --quick" } else { "" },
            started.elapsed().as_secs_f64(),
            r.rotate_bytes >> 20,
            llc >> 20
        ),
        machine: machine::machine(threads as u32, gpu_id),
        roofline,
        points: r.points,
    })
}

fn measure_while_h2d(
    r: &mut Runner,
    p: &ThreadPool,
    dev: Arc<pshard_kernels::cuda::GpuDevice>,
    buf: &[u64],
    threads: usize,
) -> Result<WhileH2d> {
    let chunk = 64 << 20;
    let copy = CopyLoop::start(dev, chunk).context("starting the pinned H2D copy loop")?;
    // Let the copy engine reach steady state.
    std::thread::sleep(Duration::from_millis(50));
    copy.reset();
    r.progress.step("DRAM read while H2D");
    let s = r.mem_read(buf, threads, "mem_read_while_h2d")?;
    let cpu_mem_gbs = (buf.len() * 8) as f64 / s.median_s / 1e9;
    let mut all_copy = copy.take();
    for (ty, shape, b) in r.plan.while_h2d.clone() {
        r.progress.step(&format!(
            "matmul {ty} {}x{} batch {b} while H2D",
            shape.0, shape.1
        ));
        let one = make_weights(ty, shape.0, shape.1, &mut r.rng)?;
        let copies = replicate(one, r.rotate_bytes);
        copy.reset();
        r.matmul_point(
            p,
            (&copies, WeightLayout::File),
            ty,
            shape,
            b,
            "matmul_while_h2d",
        )?;
        all_copy.extend(copy.take());
    }
    let chunk_bytes = copy.chunk;
    copy.finish()?;
    if all_copy.is_empty() {
        return Err(anyhow!(
            "the H2D copy loop completed no copy while the CPU ran"
        ));
    }
    let stats = summarize(&all_copy, r.plan.cfg.cv_target);
    let h2d_gbs = chunk_bytes as f64 / stats.median_s / 1e9;
    r.points.push(Point {
        op: "h2d_while_cpu".into(),
        lane: Lane::Copy,
        quant: None,
        shape: vec![chunk_bytes as u64],
        batch: 1,
        threads: 0,
        stats,
    });
    Ok(WhileH2d {
        cpu_mem_gbs,
        h2d_gbs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full run measures every type the CPU engine computes with, the lookup-table types
    /// included, at each of its matmul shapes; the quick run keeps its three types.
    #[test]
    fn full_plan_measures_every_supported_type() {
        let full = plan(&CpuConfig::default(), 2, 32 << 20);
        for m in full.matmuls.iter().take(4) {
            for ty in SUPPORTED {
                assert!(m.types.contains(ty), "{ty} missing at {:?}", m.shape);
            }
        }
        for ty in [GgmlType::IQ4_NL, GgmlType::IQ4_XS, GgmlType::MXFP4] {
            assert!(SUPPORTED.contains(&ty));
            assert!(make_weights(ty, 4, 256, &mut StdRng::seed_from_u64(1)).is_ok());
        }
        let quick = CpuConfig {
            quick: true,
            ..CpuConfig::default()
        };
        assert_eq!(plan(&quick, 2, 32 << 20).matmuls[0].types.len(), 3);
    }
}
