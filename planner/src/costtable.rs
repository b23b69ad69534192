//! Op timings from profiles: interpolation between measured points, roofline beyond them.
//!
//! Every measured point is turned into an *efficiency*: the roofline time of its work (the larger of
//! bytes / bandwidth and flops / compute ceiling, plus the fixed per-op cost) divided by the measured
//! median. A query interpolates that efficiency linearly in log(batch) between the measured batches of
//! each measured size, then linearly in log(size) between sizes, and divides its own roofline time by
//! it. Beyond the measured range the efficiency of the nearest edge is held, so the time follows the
//! roofline (bandwidth-bound → compute-bound) rather than a neighbour's time.

use std::collections::HashMap;

use pshard_model::ggml_type::GgmlType;

use crate::profile::{KnownOp, Lane, Profile};

/// Ceilings used by the cost model, in SI units (bytes/s, flop/s, s).
#[derive(Clone, Debug, PartialEq)]
pub struct Ceilings {
    /// CPU DRAM read bandwidth at the planning thread count.
    pub cpu_mem: f64,
    /// CPU DRAM bandwidth left while a pinned copy runs.
    pub cpu_mem_while_h2d: f64,
    /// CPU matmul compute ceiling at the planning thread count.
    pub cpu_flops: f64,
    /// Fixed cost of one CPU op.
    pub cpu_op_s: f64,
    /// GPU HBM bandwidth.
    pub gpu_mem: f64,
    /// GPU tensor-core GEMM ceiling.
    pub gpu_gemm_flops: f64,
    /// GPU SIMT ceiling (GEMV, attention without tensor cores, elementwise).
    pub gpu_simt_flops: f64,
    /// Launch cost of one GPU kernel.
    pub gpu_launch_s: f64,
    /// Cost of one small kernel replayed in a CUDA graph (decode tiers).
    pub gpu_graph_node_s: f64,

    /// Host→device pinned bandwidth.
    pub h2d: f64,
    /// Host→device pinned bandwidth while the CPU computes.
    pub h2d_while_cpu: f64,
    /// Device→host bandwidth.
    pub d2h: f64,
    /// Latency of one synchronised small copy.
    pub copy_latency_s: f64,
    /// CUDA context, cuBLAS workspace and allocator slack in VRAM (bytes).
    pub cuda_context_bytes: u64,
}

impl Ceilings {
    /// Generic numbers used when no profile is given (fit-only planning). Deliberately round figures
    /// of a PCIe 4 workstation; predictions made with them are labelled nominal everywhere.
    pub fn nominal() -> Ceilings {
        Ceilings {
            cpu_mem: 50e9,
            cpu_mem_while_h2d: 40e9,
            cpu_flops: 500e9,
            cpu_op_s: 5e-6,
            gpu_mem: 1000e9,
            gpu_gemm_flops: 150e12,
            gpu_simt_flops: 30e12,
            gpu_launch_s: 5e-6,
            gpu_graph_node_s: 2e-6,

            h2d: 25e9,
            h2d_while_cpu: 22e9,
            d2h: 25e9,
            copy_latency_s: 15e-6,
            cuda_context_bytes: 512 << 20,
        }
    }
}

/// A measured point reduced to interpolation coordinates.
#[derive(Clone, Copy, Debug)]
struct EffPoint {
    log_size: f64,
    log_batch: f64,
    eff: f64,
    /// The measured matrix shape `[rows, cols]` (`[0, 0]` for other ops).
    shape: [u64; 2],
}

/// Key of a series of points that interpolate together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct SeriesKey {
    op: KnownOp,
    quant: Option<GgmlType>,
}

/// GPU matmul path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuPath {
    /// Fused quantized GEMV / small batch kernel.
    Gemv,
    /// Dequantize to f16 then tensor-core GEMM.
    Gemm,
}

/// Op timing oracle built from a CPU and a GPU profile (either may be missing).
#[derive(Clone, Debug)]
pub struct CostTable {
    /// Ceilings in SI units.
    pub ceil: Ceilings,
    /// Whether a CPU profile was given.
    pub has_cpu_profile: bool,
    /// Whether a GPU profile was given.
    pub has_gpu_profile: bool,
    series: HashMap<SeriesKey, Vec<EffPoint>>,
    /// Copy efficiency vs log(bytes), pre-merged for allocation-free lookups:
    /// [h2d pinned, h2d while CPU, d2h pinned].
    copy_curves: [Vec<(f64, f64)>; 3],
}

const GB: f64 = 1e9;

/// Clamp for interpolated efficiencies: guards against a single wild point dominating.
const EFF_MIN: f64 = 1e-3;
const EFF_MAX: f64 = 4.0;

impl CostTable {
    /// Builds the table for planning with `threads` CPU threads (0 = the profile's thread count).
    pub fn new(cpu: Option<&Profile>, gpu: Option<&Profile>, threads: usize) -> CostTable {
        let mut ceil = Ceilings::nominal();
        if let Some(p) = cpu {
            let r = &p.roofline;
            let cpu_threads_used = p.machine.threads_used;
            if let Some(v) = r.cpu_mem_gbs {
                ceil.cpu_mem = v * GB;
                ceil.cpu_mem_while_h2d = v * GB * 0.8;
            }
            if let Some(v) = r.cpu_mem_while_h2d_gbs {
                ceil.cpu_mem_while_h2d = v * GB;
            }
            if let Some(v) = r.cpu_gflops {
                ceil.cpu_flops = v * GB;
            }
            if let Some(v) = r.cpu_op_overhead_us {
                ceil.cpu_op_s = v * 1e-6;
            }
            if let Some(v) = r.h2d_while_cpu_gbs {
                ceil.h2d_while_cpu = v * GB;
            }
            // Scale the CPU ceilings to the planning thread count when it differs from the profile's.
            if threads > 0 && cpu_threads_used > 0 && threads as u32 != cpu_threads_used {
                let bw = mem_read_bandwidth(p, threads as u32).unwrap_or_else(|| {
                    // Bandwidth saturates with a few threads; without points assume it scales up to half
                    // the measured threads and is flat beyond.
                    let f = (threads as f64 / (cpu_threads_used as f64 / 2.0)).min(1.0);
                    ceil.cpu_mem * f
                });
                let f = bw / ceil.cpu_mem;
                ceil.cpu_mem *= f;
                ceil.cpu_mem_while_h2d *= f;
                ceil.cpu_flops *= (threads as f64 / cpu_threads_used as f64).min(1.0);
            }
            // A copy at the same time never makes the CPU read faster (a noisy profile can say so).
            ceil.cpu_mem_while_h2d = ceil.cpu_mem_while_h2d.min(ceil.cpu_mem);
        }
        if let Some(p) = gpu {
            let r = &p.roofline;
            if let Some(v) = r.gpu_mem_gbs {
                ceil.gpu_mem = v * GB;
            }
            if let Some(v) = r.gpu_gemm_gflops {
                ceil.gpu_gemm_flops = v * GB;
            }
            if let Some(v) = r.gpu_simt_gflops {
                ceil.gpu_simt_flops = v * GB;
            }
            if let Some(v) = r.gpu_launch_us {
                ceil.gpu_launch_s = v * 1e-6;
            }
            // Profiles without graph points: a graph node costs at most a launch.
            ceil.gpu_graph_node_s = r.gpu_graph_node_us.map_or(ceil.gpu_launch_s, |v| v * 1e-6);

            if let Some(v) = r.h2d_pinned_gbs {
                ceil.h2d = v * GB;
                ceil.h2d_while_cpu = ceil.h2d_while_cpu.min(ceil.h2d);
            }
            if let Some(v) = r.h2d_while_cpu_gbs {
                ceil.h2d_while_cpu = v * GB;
            }
            if let Some(v) = r.d2h_pinned_gbs {
                ceil.d2h = v * GB;
            }
            if let Some(v) = r.copy_latency_us {
                ceil.copy_latency_s = v * 1e-6;
            }
            if let Some(v) = r.cuda_context_bytes {
                ceil.cuda_context_bytes = v;
            }
        }
        let mut table = CostTable {
            ceil,
            has_cpu_profile: cpu.is_some(),
            has_gpu_profile: gpu.is_some(),
            series: HashMap::new(),
            copy_curves: Default::default(),
        };
        for (p, lane_ok) in [(cpu, Lane::Cpu), (gpu, Lane::Gpu)] {
            let Some(p) = p else { continue };
            // Use the points of the thread count closest to the planning threads (GPU points have 0).
            let want = if threads > 0 {
                threads as u32
            } else {
                p.machine.threads_used
            };
            let best_threads = p
                .points
                .iter()
                .filter(|pt| pt.lane == Lane::Cpu)
                .map(|pt| pt.threads)
                .min_by_key(|t| (i64::from(*t) - i64::from(want)).abs());
            for pt in &p.points {
                let Some(op) = KnownOp::parse(&pt.op) else {
                    continue;
                };
                let lane_matches =
                    pt.lane == lane_ok || (lane_ok == Lane::Gpu && pt.lane == Lane::Copy);
                if !lane_matches || (pt.lane == Lane::Cpu && Some(pt.threads) != best_threads) {
                    continue;
                }
                let Some((size, roof)) =
                    table.point_roofline(op, pt.lane, pt.quant_type(), &pt.shape, pt.batch)
                else {
                    continue;
                };
                let eff = roof / pt.stats.median_s;
                let quant = match op {
                    KnownOp::Attention => Some(attn_series_quant(
                        pt.lane,
                        pt.quant_type().unwrap_or(GgmlType::F16),
                    )),
                    _ => pt.quant_type(),
                };
                let key = SeriesKey { op, quant };
                let shape = match (op, pt.shape.as_slice()) {
                    (KnownOp::Attention, _) => [0, 0],
                    (_, &[r, c]) => [r, c],
                    _ => [0, 0],
                };
                table.series.entry(key).or_default().push(EffPoint {
                    log_size: size.ln(),
                    log_batch: (pt.batch as f64).ln(),
                    eff,
                    shape,
                });
            }
        }
        for (i, op) in [KnownOp::H2dPinned, KnownOp::H2dWhileCpu, KnownOp::D2hPinned]
            .into_iter()
            .enumerate()
        {
            if let Some(pts) = table.series.get(&SeriesKey { op, quant: None }) {
                let mut c: Vec<(f64, f64)> = Vec::new();
                let mut sizes: Vec<f64> = pts.iter().map(|p| p.log_size).collect();
                sizes.sort_by(f64::total_cmp);
                sizes.dedup_by(|a, b| (*a - *b).abs() < 1e-9);
                for sz in sizes {
                    c.push((sz, interpolate(pts, sz, 0.0, None).clamp(EFF_MIN, EFF_MAX)));
                }
                table.copy_curves[i] = c;
            }
        }
        table
    }

    fn copy_eff(&self, i: usize, bytes: f64) -> f64 {
        let c = &self.copy_curves[i];
        if c.is_empty() {
            1.0
        } else {
            interp_1d(c, bytes.ln())
        }
    }

    /// Whether predictions rest on measured profiles (false: nominal fit-only numbers).
    pub fn is_measured(&self) -> bool {
        self.has_cpu_profile || self.has_gpu_profile
    }

    /// (size coordinate, roofline seconds) of a profile point's work.
    fn point_roofline(
        &self,
        op: KnownOp,
        lane: Lane,
        quant: Option<GgmlType>,
        shape: &[u64],
        batch: u64,
    ) -> Option<(f64, f64)> {
        let b = batch as usize;
        Some(match op {
            // Priced from the matmul series against the read rate while H2D runs
            // ([`Self::cpu_matmul`]): its few points check that rule, they are no series.
            KnownOp::MatmulWhileH2d => return None,
            KnownOp::Matmul
            | KnownOp::MatmulGemv
            | KnownOp::MatmulGemvGraph
            | KnownOp::MatmulGemm
            | KnownOp::MoeGemm => {
                let (rows, cols) = (*shape.first()? as usize, *shape.get(1)? as usize);
                let ty = quant?;
                let roof = match op {
                    KnownOp::Matmul => self.roof_cpu_matmul(ty, rows, cols, b, false),
                    KnownOp::MatmulGemv | KnownOp::MatmulGemvGraph => {
                        self.roof_gpu_matmul(GpuPath::Gemv, ty, rows, cols, b)
                    }
                    _ => self.roof_gpu_matmul(GpuPath::Gemm, ty, rows, cols, b),
                };
                ((rows * cols) as f64, roof)
            }
            KnownOp::Attention => {
                let (kv, nh, nkv, hd) = (
                    *shape.first()? as usize,
                    *shape.get(1)? as usize,
                    *shape.get(2)? as usize,
                    *shape.get(3)? as usize,
                );
                let ty = quant.unwrap_or(GgmlType::F16);
                let attn = AttnShape {
                    kv_len: kv,
                    n_q: b,
                    n_head: nh,
                    n_head_kv: nkv,
                    head_dim_k: hd,
                    head_dim_v: hd,
                    v_in_k: false,
                    kv_type: ty,
                };
                let roof = if lane == Lane::Cpu {
                    attn.roof_cpu(self)
                } else {
                    attn.roof_gpu(self)
                };
                ((kv * nkv * hd) as f64, roof)
            }
            KnownOp::RmsNorm | KnownOp::Glu | KnownOp::Geglu | KnownOp::Add | KnownOp::Rope => {
                if lane != Lane::Cpu {
                    return None;
                }
                // Size coordinate: the row width, or for rope the heads per row (its sines and
                // cosines are per position and pair, its rotations per head).
                let size = *shape.first()? as usize;
                let width = if op == KnownOp::Rope {
                    size * *shape.get(1)? as usize
                } else {
                    size
                };
                let bytes = (b * width * 4 * op.elementwise_streams()?) as f64;
                (size as f64, self.elementwise(Lane::Cpu, bytes))
            }
            KnownOp::MemRead
            | KnownOp::H2dPinned
            | KnownOp::H2dPageable
            | KnownOp::D2hPinned
            | KnownOp::H2dWhileCpu => {
                let bytes = *shape.first()? as f64;
                let bw = match op {
                    KnownOp::MemRead => return None, // used for thread scaling only
                    KnownOp::H2dPinned => self.ceil.h2d,
                    KnownOp::H2dWhileCpu => self.ceil.h2d_while_cpu,
                    KnownOp::D2hPinned => self.ceil.d2h,
                    _ => return None, // pageable copies are not used by the runtime's plans
                };
                (bytes, self.ceil.copy_latency_s + bytes / bw)
            }
        })
    }

    fn roof_cpu_matmul(
        &self,
        ty: GgmlType,
        rows: usize,
        cols: usize,
        batch: usize,
        while_h2d: bool,
    ) -> f64 {
        let wbytes = weight_bytes(ty, rows, cols);
        let abytes = (batch * (rows + cols) * 4) as f64;
        let bw = if while_h2d {
            self.ceil.cpu_mem_while_h2d
        } else {
            self.ceil.cpu_mem
        };
        let flops = 2.0 * (rows * cols * batch) as f64;
        self.ceil.cpu_op_s + ((wbytes + abytes) / bw).max(flops / self.ceil.cpu_flops)
    }

    fn roof_gpu_matmul(
        &self,
        path: GpuPath,
        ty: GgmlType,
        rows: usize,
        cols: usize,
        batch: usize,
    ) -> f64 {
        let wbytes = weight_bytes(ty, rows, cols);
        let abytes = (batch * (rows + cols) * 4) as f64;
        let flops = 2.0 * (rows * cols * batch) as f64;
        match path {
            GpuPath::Gemv => {
                self.ceil.gpu_launch_s
                    + ((wbytes + abytes) / self.ceil.gpu_mem).max(flops / self.ceil.gpu_simt_flops)
            }
            GpuPath::Gemm => {
                // Dequantize to f16 (read blocks, write f16), then GEMM reading f16 back.
                let dequant = if ty == GgmlType::F16 {
                    0.0
                } else {
                    (wbytes + (rows * cols * 4) as f64) / self.ceil.gpu_mem
                };
                let gemm = (((rows * cols * 2) as f64 + abytes) / self.ceil.gpu_mem)
                    .max(flops / self.ceil.gpu_gemm_flops);
                2.0 * self.ceil.gpu_launch_s + dequant + gemm
            }
        }
    }

    /// Interpolated efficiency of a series at (size, batch); `None` when the series has no points.
    fn efficiency(
        &self,
        op: KnownOp,
        quant: Option<GgmlType>,
        shape: [usize; 2],
        batch: usize,
    ) -> Option<f64> {
        let size = (shape[0] * shape[1]) as f64;
        let shape = Some([shape[0] as u64, shape[1] as u64]);
        let pts = self.series.get(&SeriesKey { op, quant }).or_else(|| {
            // A type the profile did not measure (one made before the type was supported) costs
            // like its kernel twin when that was measured.
            let twin = quant.and_then(kernel_twin)?;
            self.series.get(&SeriesKey {
                op,
                quant: Some(twin),
            })
        });
        let pts = pts.or_else(|| {
            // Another quant type of the same op: efficiencies transfer better than raw times because
            // the roofline already accounts for the bytes per weight. Prefer a quantized stand-in for
            // quantized types and a float one for floats, then anything.
            let want_q = quant.map(|q| q.is_quantized());
            let mut candidates: Vec<(&SeriesKey, &Vec<EffPoint>)> =
                self.series.iter().filter(|(k, _)| k.op == op).collect();
            candidates.sort_by_key(|(k, _)| {
                let same_kind = k.quant.map(|q| q.is_quantized()) == want_q;
                (!same_kind, k.quant.map(|q| q.id()).unwrap_or(u32::MAX))
            });
            candidates.first().map(|(_, v)| *v)
        })?;
        Some(interpolate(pts, size.ln(), (batch.max(1) as f64).ln(), shape).clamp(EFF_MIN, EFF_MAX))
    }

    /// Seconds for a matmul of a `rows × cols` weight of type `ty` over `batch` token rows on the CPU.
    /// `while_h2d`: a pinned copy runs at the same time (bandwidth aggregation, streamed neighbours).
    pub fn cpu_matmul(
        &self,
        ty: GgmlType,
        rows: usize,
        cols: usize,
        batch: usize,
        while_h2d: bool,
    ) -> f64 {
        // A copy at the same time takes DRAM bandwidth, not compute: the matmul keeps the
        // efficiency measured alone against a roof whose bandwidth is the CPU's read rate while
        // H2D runs. The profile's four while-H2D points (two large shapes) are no series to
        // interpolate the experts' small matrices from: priced from them, a 6144 × 2048 Q4_K
        // decode matmul took 2× its time alone and a Q6_K one, borrowing Q8_0's point, 0.9×.
        let eff = self.efficiency(KnownOp::Matmul, Some(ty), [rows, cols], batch);
        self.roof_cpu_matmul(ty, rows, cols, batch, while_h2d) / eff.unwrap_or(1.0)
    }

    /// Seconds for a GPU matmul on the given path: the device time the profile measured for
    /// back-to-back calls, but never less than the host's cost of issuing its launches (one for
    /// the GEMV, dequantize + GEMM for the other), which bounds runs of small kernels.
    pub fn gpu_matmul_path(
        &self,
        path: GpuPath,
        ty: GgmlType,
        rows: usize,
        cols: usize,
        batch: usize,
    ) -> f64 {
        self.gpu_matmul_timed(path, ty, rows, cols, batch, false)
    }

    /// [`Self::gpu_matmul_path`] for a kernel replayed in a CUDA graph (decode tiers): the profile's
    /// graph-timed device time, bounded below by the graph's per-node cost instead of host launches.
    pub fn gpu_matmul_path_in_graph(
        &self,
        path: GpuPath,
        ty: GgmlType,
        rows: usize,
        cols: usize,
        batch: usize,
    ) -> f64 {
        self.gpu_matmul_timed(path, ty, rows, cols, batch, true)
    }

    fn gpu_matmul_timed(
        &self,
        path: GpuPath,
        ty: GgmlType,
        rows: usize,
        cols: usize,
        batch: usize,
        in_graph: bool,
    ) -> f64 {
        let roof = self.roof_gpu_matmul(path, ty, rows, cols, batch);
        let (op, launches) = match path {
            GpuPath::Gemv => (KnownOp::MatmulGemv, 1.0),
            GpuPath::Gemm => (KnownOp::MatmulGemm, 2.0),
        };
        let shape = [rows, cols];
        // In a graph: the graph-timed GEMV points when the profile has them.
        let graph_eff = match (in_graph, path) {
            (true, GpuPath::Gemv) => {
                self.efficiency(KnownOp::MatmulGemvGraph, Some(ty), shape, batch)
            }
            _ => None,
        };
        let eff = graph_eff.or_else(|| self.efficiency(op, Some(ty), shape, batch));
        let per_launch = if in_graph {
            self.ceil.gpu_graph_node_s
        } else {
            self.ceil.gpu_launch_s
        };
        (roof / eff.unwrap_or(1.0)).max(launches * per_launch)
    }

    /// Seconds for a GPU matmul on the path the runtime takes ([`crate::lanes::gemm_path`]);
    /// batches up to [`pshard_kernels::cuda::GRAPH_MAX_TOKENS`] replay as CUDA graphs.
    pub fn gpu_matmul(&self, ty: GgmlType, rows: usize, cols: usize, batch: usize) -> f64 {
        let path = if crate::lanes::gemm_path(ty, batch, false) {
            GpuPath::Gemm
        } else {
            GpuPath::Gemv
        };
        if batch <= pshard_kernels::cuda::GRAPH_MAX_TOKENS {
            self.gpu_matmul_path_in_graph(path, ty, rows, cols, batch)
        } else {
            self.gpu_matmul_path(path, ty, rows, cols, batch)
        }
    }

    /// Seconds per expert matrix in the CUDA backend's grouped MoE path: one grouped GEMM over
    /// every used expert (`moe_gemm`, weights decoded from their blocks on the fly), `batch`
    /// tokens per expert, from the profile's `moe_gemm` points (per expert matrix); without
    /// them, the dequantize + GEMM points stand in. One launch per matrix, shared by all experts,
    /// so no per-expert launch floor.
    pub fn gpu_grouped_expert(&self, ty: GgmlType, rows: usize, cols: usize, batch: usize) -> f64 {
        let roof = self.roof_gpu_matmul(GpuPath::Gemm, ty, rows, cols, batch);
        let eff = self
            .efficiency(KnownOp::MoeGemm, Some(ty), [rows, cols], batch)
            .or_else(|| self.efficiency(KnownOp::MatmulGemm, Some(ty), [rows, cols], batch));
        roof / eff.unwrap_or(1.0)
    }

    /// Seconds of one CPU op's fixed cost: handing a job to every thread of the pool and waiting
    /// for them (the profile's `op_overhead`).
    pub fn cpu_op_overhead(&self) -> f64 {
        self.ceil.cpu_op_s
    }

    /// Seconds to issue one kernel launch outside a CUDA graph.
    pub fn gpu_launch(&self) -> f64 {
        self.ceil.gpu_launch_s
    }

    /// Seconds for attention on a lane.
    pub fn attention(&self, lane: Lane, a: &AttnShape) -> f64 {
        let roof = match lane {
            Lane::Cpu => a.roof_cpu(self),
            _ => a.roof_gpu(self),
        };
        let size = (a.kv_len.max(1) * a.n_head_kv * a.head_dim_k) as f64;
        let eff = self.attn_efficiency(lane, a.kv_type, size, a.n_q);
        roof / eff.unwrap_or(1.0)
    }

    /// The attention efficiency of a KV type's own points; without them (profiles measure f16
    /// KV), the f16 points: a Q8_0 cache runs the same kernels after widening its rows, and the
    /// roofline already counts its bytes.
    fn attn_efficiency(&self, lane: Lane, kv: GgmlType, size: f64, batch: usize) -> Option<f64> {
        let key = |kv| SeriesKey {
            op: KnownOp::Attention,
            quant: Some(attn_series_quant(lane, kv)),
        };
        let pts = self
            .series
            .get(&key(kv))
            .or_else(|| self.series.get(&key(GgmlType::F16)))?;
        let (ls, lb) = (size.ln(), (batch.max(1) as f64).ln());
        // CPU: within each batch first (see `interpolate_by_batch`). The GPU keeps the size-first
        // interpolation its decode predictions were checked with: there it prices shallow decode
        // attention from the smallest prefill point, ~12 µs more per call than its own decode
        // points give, and that excess stands in for GPU decode costs the model lacks — read
        // within each batch, the calibration's qwen3-30b-a3b all-GPU decode goes from -1% to +19%
        // of `pshard bench` and the sanity check's qwen2.5-32b from +26% to +38% of llama.cpp.
        let eff = match lane {
            Lane::Cpu => interpolate_by_batch(pts, ls, lb),
            _ => interpolate(pts, ls, lb, None),
        };
        Some(eff.clamp(EFF_MIN, EFF_MAX))
    }

    /// Seconds for an elementwise op touching `bytes` bytes on a lane.
    pub fn elementwise(&self, lane: Lane, bytes: f64) -> f64 {
        match lane {
            Lane::Cpu => self.ceil.cpu_op_s + bytes / self.ceil.cpu_mem,
            _ => self.ceil.gpu_launch_s + bytes / self.ceil.gpu_mem,
        }
    }

    /// Seconds for a CPU elementwise op of the profile's kind `op` (an op with
    /// [`KnownOp::elementwise_streams`]) over `rows` rows moving `bytes`: the roofline time
    /// ([`Self::elementwise`]) over the efficiency the profile's points of that op give at this
    /// size (the row width, or for rope the heads) and row count. Profiles without such points
    /// (made before they were measured) give the roofline time itself.
    pub fn cpu_elementwise(&self, op: KnownOp, rows: usize, size: usize, bytes: f64) -> f64 {
        let roof = self.elementwise(Lane::Cpu, bytes);
        let eff = self.series.get(&SeriesKey { op, quant: None }).map(|pts| {
            interpolate(
                pts,
                (size.max(1) as f64).ln(),
                (rows.max(1) as f64).ln(),
                None,
            )
            .clamp(EFF_MIN, EFF_MAX)
        });
        roof / eff.unwrap_or(1.0)
    }

    /// Seconds for a GPU elementwise op replayed in a CUDA graph (decode tiers).
    pub fn gpu_elementwise_in_graph(&self, bytes: f64) -> f64 {
        self.ceil.gpu_graph_node_s + bytes / self.ceil.gpu_mem
    }

    /// Seconds to copy `bytes` host→device from pinned memory (`while_cpu`: the CPU computes meanwhile).
    pub fn h2d(&self, bytes: f64, while_cpu: bool) -> f64 {
        if bytes <= 0.0 {
            return 0.0;
        }
        let bw = if while_cpu {
            self.ceil.h2d_while_cpu
        } else {
            self.ceil.h2d
        };
        let roof = self.ceil.copy_latency_s + bytes / bw;
        // Without concurrent points, the pinned curve's shape applies to the concurrent ceiling.
        let i = if while_cpu && !self.copy_curves[1].is_empty() {
            1
        } else {
            0
        };
        roof / self.copy_eff(i, bytes)
    }

    /// Seconds to copy `bytes` device→host.
    pub fn d2h(&self, bytes: f64) -> f64 {
        if bytes <= 0.0 {
            return 0.0;
        }
        (self.ceil.copy_latency_s + bytes / self.ceil.d2h) / self.copy_eff(2, bytes)
    }
}

/// Attention points of both lanes share one op name. GPU series are keyed by the KV type and CPU
/// series by an integer type that never holds KV (I8 for q8_0 KV, I16 otherwise), so one map serves
/// both lanes without a lane dimension in the key.
fn attn_series_quant(lane: Lane, kv: GgmlType) -> GgmlType {
    match lane {
        Lane::Cpu => match kv {
            GgmlType::Q8_0 => GgmlType::I8,
            _ => GgmlType::I16,
        },
        _ => kv,
    }
}

/// Shape of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    /// Keys attended per query (average over the batch for causal prefill).
    pub kv_len: usize,
    /// Query rows.
    pub n_q: usize,
    /// Query heads.
    pub n_head: usize,
    /// KV heads.
    pub n_head_kv: usize,
    /// Key head dimension.
    pub head_dim_k: usize,
    /// Value head dimension.
    pub head_dim_v: usize,
    /// The values are the first `head_dim_v` of each K row (latent attention): no V bytes.
    pub v_in_k: bool,
    /// KV element type.
    pub kv_type: GgmlType,
}

impl AttnShape {
    fn kv_bytes(&self) -> f64 {
        let v = if self.v_in_k { 0 } else { self.head_dim_v };
        let per_cell = self.n_head_kv * (self.head_dim_k + v);
        weight_bytes(self.kv_type, self.kv_len.max(1), per_cell)
    }
    fn flops(&self) -> f64 {
        2.0 * (self.n_q * self.kv_len.max(1) * self.n_head * (self.head_dim_k + self.head_dim_v))
            as f64
    }
    fn act_bytes(&self) -> f64 {
        (self.n_q * self.n_head * (self.head_dim_k + self.head_dim_v) * 4) as f64
    }
    fn roof_cpu(&self, t: &CostTable) -> f64 {
        t.ceil.cpu_op_s
            + ((self.kv_bytes() + self.act_bytes()) / t.ceil.cpu_mem)
                .max(self.flops() / t.ceil.cpu_flops)
    }
    fn roof_gpu(&self, t: &CostTable) -> f64 {
        // Prefill attention runs on tensor cores (flash, mma); decode is bandwidth-bound.
        let peak = if self.n_q >= 16 {
            t.ceil.gpu_gemm_flops
        } else {
            t.ceil.gpu_simt_flops
        };
        t.ceil.gpu_launch_s
            + ((self.kv_bytes() + self.act_bytes()) / t.ceil.gpu_mem).max(self.flops() / peak)
    }
}

/// The measured type whose kernels do the same work per weight as `ty`, for types that profiles
/// made before their support lack: IQ4_NL and MXFP4 are Q4_0's 32-element blocks of nibbles with
/// the same Q8_0 activation partner (one byte shuffle more per 32 weights on the CPU, a byte
/// permute on the GPU); IQ4_XS is 256-element blocks with 32-element sub-block scales and the
/// Q8_K partner, as Q4_K. Their roofline already counts their own bytes per weight.
pub fn kernel_twin(ty: GgmlType) -> Option<GgmlType> {
    match ty {
        GgmlType::IQ4_NL | GgmlType::MXFP4 => Some(GgmlType::Q4_0),
        GgmlType::IQ4_XS => Some(GgmlType::Q4_K),
        _ => None,
    }
}

/// Bytes of a `rows × cols` matrix of type `ty` (fractional blocks rounded up).
pub fn weight_bytes(ty: GgmlType, rows: usize, cols: usize) -> f64 {
    let blocks = (cols as u64).div_ceil(ty.block_size());
    (blocks * ty.type_size() * rows as u64) as f64
}

/// CPU read bandwidth at `threads` from the profile's `mem_read` points (log-log in threads).
fn mem_read_bandwidth(p: &Profile, threads: u32) -> Option<f64> {
    let mut by_threads: Vec<(f64, f64)> = Vec::new();
    for pt in p
        .points
        .iter()
        .filter(|pt| pt.op == "mem_read" && pt.lane == Lane::Cpu && pt.threads > 0)
    {
        let bw = *pt.shape.first()? as f64 / pt.stats.median_s;
        match by_threads
            .iter_mut()
            .find(|(t, _)| *t == f64::from(pt.threads))
        {
            Some(e) => e.1 = e.1.max(bw),
            None => by_threads.push((f64::from(pt.threads), bw)),
        }
    }
    if by_threads.is_empty() {
        return None;
    }
    by_threads.sort_by(|a, b| a.0.total_cmp(&b.0));
    let xs: Vec<(f64, f64)> = by_threads.iter().map(|(t, bw)| (t.ln(), bw.ln())).collect();
    Some(interp_1d(&xs, f64::from(threads.max(1)).ln()).exp())
}

/// Linear interpolation on sorted (x, y) pairs, holding the edge values beyond the range.
fn interp_1d(xs: &[(f64, f64)], x: f64) -> f64 {
    match xs {
        [] => 1.0,
        [only] => only.1,
        _ => {
            if x <= xs[0].0 {
                return xs[0].1;
            }
            if x >= xs[xs.len() - 1].0 {
                return xs[xs.len() - 1].1;
            }
            let i = xs.partition_point(|p| p.0 <= x);
            let (a, b) = (xs[i - 1], xs[i]);
            if (b.0 - a.0).abs() < 1e-12 {
                return a.1;
            }
            a.1 + (b.1 - a.1) * (x - a.0) / (b.0 - a.0)
        }
    }
}

/// Averages the y of consecutive points with equal x (input sorted by x).
fn merge_equal_x(row: Vec<(f64, f64)>) -> Vec<(f64, f64)> {
    let mut merged: Vec<(f64, f64)> = Vec::with_capacity(row.len());
    let mut counts: Vec<f64> = Vec::new();
    for (x, y) in row {
        match merged.last_mut() {
            Some(last) if (last.0 - x).abs() < 1e-9 => {
                let c = counts.last_mut().expect("counts track merged");
                last.1 = (last.1 * *c + y) / (*c + 1.0);
                *c += 1.0;
            }
            _ => {
                merged.push((x, y));
                counts.push(1.0);
            }
        }
    }
    merged
}

/// Two-stage interpolation: log-batch within each measured size, then log-size across sizes. A
/// matrix shape that was measured itself uses only its own points (over batch), so the table
/// reproduces every measured shape; aspect ratios of equal size can differ by 20%.
fn interpolate(pts: &[EffPoint], log_size: f64, log_batch: f64, shape: Option<[u64; 2]>) -> f64 {
    if let Some(shape) = shape.filter(|s| s[0] > 0) {
        let mut own: Vec<(f64, f64)> = pts
            .iter()
            .filter(|p| p.shape == shape)
            .map(|p| (p.log_batch, p.eff))
            .collect();
        if !own.is_empty() {
            own.sort_by(|a, b| a.0.total_cmp(&b.0));
            return interp_1d(&merge_equal_x(own), log_batch);
        }
    }
    let mut sizes: Vec<f64> = pts.iter().map(|p| p.log_size).collect();
    sizes.sort_by(f64::total_cmp);
    sizes.dedup_by(|a, b| (*a - *b).abs() < 1e-9);
    let mut per_size: Vec<(f64, f64)> = Vec::with_capacity(sizes.len());
    for s in sizes {
        let mut row: Vec<(f64, f64)> = pts
            .iter()
            .filter(|p| (p.log_size - s).abs() < 1e-9)
            .map(|p| (p.log_batch, p.eff))
            .collect();
        row.sort_by(|a, b| a.0.total_cmp(&b.0));
        // Points of equal size and batch (different aspect ratios) are averaged.
        per_size.push((s, interp_1d(&merge_equal_x(row), log_batch)));
    }
    interp_1d(&per_size, log_size)
}

/// Two-stage interpolation for series whose sizes differ from batch to batch (attention: a
/// causal batch of `b` rows attends `ctx - (b - 1) / 2` keys on average, so no two batches share
/// a size): log-size within each measured batch, then log-batch across batches.
fn interpolate_by_batch(pts: &[EffPoint], log_size: f64, log_batch: f64) -> f64 {
    let mut batches: Vec<f64> = pts.iter().map(|p| p.log_batch).collect();
    batches.sort_by(f64::total_cmp);
    batches.dedup_by(|a, b| (*a - *b).abs() < 1e-9);
    let per_batch: Vec<(f64, f64)> = batches
        .into_iter()
        .map(|b| {
            let mut row: Vec<(f64, f64)> = pts
                .iter()
                .filter(|p| (p.log_batch - b).abs() < 1e-9)
                .map(|p| (p.log_size, p.eff))
                .collect();
            row.sort_by(|x, y| x.0.total_cmp(&y.0));
            (b, interp_1d(&merge_equal_x(row), log_size))
        })
        .collect();
    interp_1d(&per_batch, log_batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pt(size: f64, batch: f64, eff: f64) -> EffPoint {
        EffPoint {
            log_size: size.ln(),
            log_batch: batch.ln(),
            eff,
            shape: [0, 0],
        }
    }

    #[test]
    fn interpolates_in_log_space_and_holds_edges() {
        let pts = vec![
            pt(1e6, 1.0, 0.5),
            pt(1e6, 16.0, 0.9),
            pt(1e8, 1.0, 0.7),
            pt(1e8, 16.0, 0.8),
        ];
        // Midway in log batch (4 = sqrt(1*16)) at size 1e6.
        assert!((interpolate(&pts, 1e6f64.ln(), 4f64.ln(), None) - 0.7).abs() < 1e-12);
        // Midway in log size (1e7) at batch 1.
        assert!((interpolate(&pts, 1e7f64.ln(), 0.0, None) - 0.6).abs() < 1e-12);
        // Beyond the range: edge efficiency.
        assert!((interpolate(&pts, 1e9f64.ln(), 1000f64.ln(), None) - 0.8).abs() < 1e-12);
    }

    /// Attention sizes differ per batch (a causal batch attends fewer keys on average than its
    /// context): a query interpolates in size within each batch first, so a prefill query reads
    /// the prefill points and a decode query the decode points, however near in size the other
    /// batch's points lie.
    #[test]
    fn attention_interpolates_size_within_each_batch() {
        let pts = vec![
            pt(1e3, 1.0, 0.2),
            pt(1e5, 1.0, 0.6),
            pt(2e3, 512.0, 0.8),
            pt(2e5, 512.0, 0.9),
        ];
        let at = |size: f64, batch: f64| interpolate_by_batch(&pts, size.ln(), batch.ln());
        // Batch 512 at 2e4 (midway in log size between its own points): 0.85, although the
        // batch-1 point at 1e5 is nearer in size than the batch-512 one at 2e5.
        assert!((at(2e4, 512.0) - 0.85).abs() < 1e-12);
        // Batch 1 at 1e4: midway between 0.2 and 0.6.
        assert!((at(1e4, 1.0) - 0.4).abs() < 1e-12);
        // Between the batches (log-midway, ~22.6 rows) at a size beyond both: the edges' mean.
        assert!((at(1e6, 512f64.sqrt()) - 0.75).abs() < 1e-12);
        // The size-first interpolation mixes the batches (what attention must not use).
        assert!((interpolate(&pts, 2e4f64.ln(), 512f64.ln(), None) - 0.85).abs() > 0.05);
    }

    /// A type the profile lacks costs like its kernel twin (same efficiency, its own bytes), and
    /// a lone unmeasured type with no twin falls back to another measured series, never panics.
    #[test]
    fn unmeasured_types_cost_like_their_kernel_twin() {
        let mut t = CostTable::new(None, None, 0);
        let (rows, cols) = (4096usize, 4096usize);
        let key = |q| SeriesKey {
            op: KnownOp::Matmul,
            quant: Some(q),
        };
        t.series.insert(
            key(GgmlType::Q4_0),
            vec![pt((rows * cols) as f64, 1.0, 0.25)],
        );
        t.series.insert(
            key(GgmlType::Q8_0),
            vec![pt((rows * cols) as f64, 1.0, 0.9)],
        );
        for ty in [GgmlType::IQ4_NL, GgmlType::MXFP4] {
            let got = t.cpu_matmul(ty, rows, cols, 1, false);
            let roof = t.roof_cpu_matmul(ty, rows, cols, 1, false);
            assert!((got - roof / 0.25).abs() <= 1e-12 * got, "{ty}: {got}");
        }
        // IQ4_XS's twin Q4_K is not measured: another quantized series stands in.
        let got = t.cpu_matmul(GgmlType::IQ4_XS, rows, cols, 1, false);
        assert!(got.is_finite() && got > 0.0);
    }

    #[test]
    fn roofline_beyond_range_is_not_nearest_neighbour() {
        // A table without points is pure roofline: doubling the batch of a compute-bound matmul
        // doubles its time, while a bandwidth-bound GEMV barely changes.
        let t = CostTable::new(None, None, 0);
        let a = t.cpu_matmul(GgmlType::Q4_K, 4096, 4096, 4096, false);
        let b = t.cpu_matmul(GgmlType::Q4_K, 4096, 4096, 8192, false);
        assert!((b / a - 2.0).abs() < 0.01, "{a} {b}");
        let c = t.cpu_matmul(GgmlType::Q4_K, 4096, 4096, 1, false);
        let d = t.cpu_matmul(GgmlType::Q4_K, 4096, 4096, 2, false);
        assert!(d / c < 1.05);
    }
}
