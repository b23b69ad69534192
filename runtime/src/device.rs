//! The device interface: what the engine asks of a GPU, with two implementations — CUDA
//! ([`crate::gpu`]) and the host device ([`crate::host_device`]: device memory is host memory under
//! the same budget accounting, a stream is a worker thread running its queue in order, an event is
//! a completion flag, kernels are the CPU ops), so CI, which has no GPU, runs mixed programs end
//! to end.
//!
//! Everything that touches a stream is asynchronous: it is enqueued and returns. Ordering between
//! the two streams is by [`Event`]s; the engine's CPU lane waits with [`Device::host_wait`].

use std::any::Any;
use std::sync::Arc;

use pshard_kernels::cuda::{RegionId, RegionKind, RegionReport};
use pshard_model::graph::{BufId, Graph, Op};
use pshard_model::spec::TensorId;

use crate::error::EngineError;
use crate::model::Model;

/// A device address.
pub type DevPtr = u64;

/// An in-order queue of device work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    /// Kernels, and the activation copies that sit between them.
    Compute,
    /// Weight loads into ring slots and KV staging, ahead of the compute stream.
    Copy,
}

/// An event made by [`Device::new_event`]: recorded on a stream, waited for by a stream or the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Event(pub u32);

/// Host memory that device copies read and write asynchronously (page-locked on CUDA). The CPU
/// reads or writes it only when no copy that touches it is in flight (the engine's events ensure
/// that).
pub trait HostMem: Send + Sync {
    /// Bytes.
    fn len(&self) -> usize;
    /// Whether it is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Calls `f` with the bytes.
    fn read(&self, f: &mut dyn FnMut(&[u8]));
    /// Calls `f` with the bytes, mutable.
    fn write(&self, f: &mut dyn FnMut(&mut [u8]));
    /// The concrete type, for the device that made it.
    fn as_any(&self) -> &dyn Any;
}

/// A shared handle to [`HostMem`].
pub type HostBuf = Arc<dyn HostMem>;

/// Host memory for engines without a device, and the host device's: a vector of 32-bit words (so
/// f32 and f16 views are aligned) behind a lock.
pub struct PlainHostMem {
    words: std::sync::RwLock<Vec<u32>>,
    len: usize,
}

impl PlainHostMem {
    /// `len` zero bytes.
    pub fn new(len: usize) -> PlainHostMem {
        PlainHostMem {
            words: std::sync::RwLock::new(vec![0u32; len.div_ceil(4)]),
            len,
        }
    }
}

impl HostMem for PlainHostMem {
    fn len(&self) -> usize {
        self.len
    }
    fn read(&self, f: &mut dyn FnMut(&[u8])) {
        let w = self.words.read().unwrap_or_else(|e| e.into_inner());
        f(&bytemuck::cast_slice(&w)[..self.len])
    }
    fn write(&self, f: &mut dyn FnMut(&mut [u8])) {
        let mut w = self.words.write().unwrap_or_else(|e| e.into_inner());
        f(&mut bytemuck::cast_slice_mut(&mut w)[..self.len])
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Where a host→device copy reads.
#[derive(Clone)]
pub enum HostSrc {
    /// Bytes of a host buffer from `offset`.
    Buf(HostBuf, usize),
    /// Bytes of the mapped model file: tensor `file_index`'s data from `offset`.
    Mapped {
        /// Index into the file's tensor table.
        file_index: usize,
        /// Byte offset into the tensor's data.
        offset: usize,
    },
}

/// A (possibly strided) copy shape: `rows` rows of `width` bytes, consecutive rows `src_pitch`
/// and `dst_pitch` bytes apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape2d {
    /// Bytes per row.
    pub width: usize,
    /// Rows.
    pub rows: usize,
    /// Source row stride.
    pub src_pitch: usize,
    /// Destination row stride.
    pub dst_pitch: usize,
}

impl Shape2d {
    /// One contiguous run of `bytes`.
    pub fn flat(bytes: usize) -> Shape2d {
        Shape2d {
            width: bytes,
            rows: 1,
            src_pitch: bytes,
            dst_pitch: bytes,
        }
    }
    /// Bytes moved.
    pub fn bytes(&self) -> usize {
        self.width * self.rows
    }
}

/// Where an op's weight lies on the device: the address of row `first_row` of matrix 0 (rows
/// before it are not on the device: the CPU computes them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WeightRef {
    /// The tensor.
    pub tensor: TensorId,
    /// Device address of its first stored row.
    pub addr: DevPtr,
    /// The first stored row.
    pub first_row: usize,
}

/// One layer's KV on the device: K then V cells, `cells` per sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvRef {
    /// K cells: `n_seq · cells` rows of `k_cols` values in `ty`.
    pub k: DevPtr,
    /// V cells, same rows of `v_cols` values.
    pub v: DevPtr,
    /// Values per K row.
    pub k_cols: usize,
    /// Values per V row (0: the values live inside K).
    pub v_cols: usize,
    /// Cells per sequence (position `p` of sequence `s` lives in cell `s · cells + p % cells`).
    pub cells: usize,
    /// Sequences.
    pub seqs: usize,
    /// The rows' element type.
    pub ty: pshard_kernels::ops::KvType,
}

/// The rotary embedding of a layer's cached K: in each head of `head_dim` values, the
/// `rope.n_dims` from `offset` on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KRope {
    /// The rope.
    pub rope: pshard_model::graph::RopeParams,
    /// Values per head.
    pub head_dim: usize,
    /// Where the rotated values start in each head.
    pub offset: usize,
}

impl KRope {
    /// The rope `op` applies to K buffer `k`, when it ropes it: a rope op in place (every head
    /// from its start), or latent attention's K row (one head, roped after its latent).
    pub fn of(op: &pshard_model::graph::Op, k: pshard_model::graph::BufId) -> Option<KRope> {
        use pshard_model::graph::Op;
        match *op {
            Op::Rope { x, head_dim, rope } if x == k => Some(KRope {
                rope,
                head_dim,
                offset: 0,
            }),
            Op::MlaKv {
                out, kv_lora, rope, ..
            } if out == k => Some(KRope {
                rope,
                head_dim: kv_lora + rope.n_dims,
                offset: kv_lora,
            }),
            _ => None,
        }
    }

    /// `(head_dim, offset)`, as `pshard_kernels::ops::kv_shift` takes them.
    pub fn span(&self) -> (usize, usize) {
        (self.head_dim, self.offset)
    }
}

/// A context shift of one sequence in one layer's KV on the device (see
/// [`crate::engine::Engine::shift_seq`]): cells move as `runs` say, K rows rotated back by the
/// rope angles of `delta` positions when `rope` is given, V rows copied.
#[derive(Clone, Debug)]
pub struct KvShift {
    /// The layer's KV; the moves are cells of sequence `seq` in it.
    pub kv: KvRef,
    /// The sequence.
    pub seq: usize,
    /// The rotary embedding of the layer's K, when it has one.
    pub rope: Option<KRope>,
    /// Where the rope's frequency factors lie on the device, when it has them.
    pub freq_factors: Option<WeightRef>,
    /// Positions every moved cell moves by (negative: towards the start).
    pub delta: i64,
    /// The moves.
    pub runs: Vec<pshard_kernels::ops::ShiftRun>,
}

/// The per-step inputs of a program on the device (i32 each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inputs {
    /// Token ids.
    pub tokens: DevPtr,
    /// Positions.
    pub positions: DevPtr,
    /// Sequence slot of each token.
    pub seqs: DevPtr,
    /// Rows that want logits.
    pub logit_rows: DevPtr,
}

/// Device scratch of a program (0: not allocated), see `pshard_planner::lanes::DeviceScratch`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScratchPtrs {
    /// Dequantized f16 weights of the GEMM path.
    pub gemm_w: DevPtr,
    /// f16 activations of the GEMM path.
    pub gemm_x: DevPtr,
    /// Attention partials.
    pub attn: DevPtr,
    /// Expert gate, up, hidden and output rows per (token, expert) pair.
    pub moe: [DevPtr; 4],
    /// Grouped expert path: f16 rows, pair order, offsets.
    pub moe_grouped: [DevPtr; 3],
    /// Per-head matmuls' routes.
    pub head_route: DevPtr,
}

impl ScratchPtrs {
    /// The addresses in `DeviceScratch::parts` order.
    pub fn from_parts(p: [DevPtr; 11]) -> ScratchPtrs {
        ScratchPtrs {
            gemm_w: p[0],
            gemm_x: p[1],
            attn: p[2],
            moe: [p[3], p[4], p[5], p[6]],
            moe_grouped: [p[7], p[8], p[9]],
            head_route: p[10],
        }
    }

    /// The addresses in `DeviceScratch::parts` order.
    pub fn parts(&self) -> [DevPtr; 11] {
        let (m, g) = (self.moe, self.moe_grouped);
        [
            self.gemm_w,
            self.gemm_x,
            self.attn,
            m[0],
            m[1],
            m[2],
            m[3],
            g[0],
            g[1],
            g[2],
            self.head_route,
        ]
    }
}

/// What a GPU-lane step computes.
#[derive(Clone, Debug, PartialEq)]
pub enum GpuWork {
    /// One graph node; `cols` restricts its output columns (the GPU part of a split op).
    Node {
        /// Index into the graph's nodes.
        node: usize,
        /// Output columns computed, when not all.
        cols: Option<std::ops::Range<usize>>,
        /// Its int8 GEMV reuses the activations the step before quantized.
        reuse_acts: bool,
    },
    /// The q and k per-head norms (optional) and rotary embeddings of consecutive nodes in one
    /// launch: nodes `nodes`, covering `HeadRmsNorm q, HeadRmsNorm k, Rope q, Rope k` or the two
    /// `Rope`s.
    QkNormRope {
        /// The covered nodes.
        nodes: std::ops::Range<usize>,
    },
}

/// Everything a device needs to run one GPU-lane step: the op, the program's addresses, the
/// weights it reads and the KV it uses.
pub struct GpuStep<'a> {
    /// The program's graph.
    pub graph: &'a Arc<Graph>,
    /// What to compute.
    pub work: &'a GpuWork,
    /// Device address of each graph buffer (0 where the buffer is not on the device).
    pub bufs: &'a [DevPtr],
    /// Weights read (matrices and vectors), by tensor.
    pub weights: &'a [WeightRef],
    /// KV of the attention layer, if this is attention.
    pub kv: Option<KvRef>,
    /// Per-step inputs.
    pub inputs: Inputs,
    /// Kernel scratch.
    pub scratch: ScratchPtrs,
    /// Exact-activation mode (f16 GEMMs for quantized weights at every batch).
    pub exact: bool,
    /// The batch's runs of consecutive rows of one sequence (attention kernels that take one
    /// sequence per call run once per run); empty inside a captured graph (one sequence).
    pub seq_runs: &'a [(u32, std::ops::Range<usize>)],
    /// A routing step's forced experts on the device, when the run forces any token's: a
    /// [`crate::batch::route_table`] of the graph's tokens.
    pub forced_route: Option<DevPtr>,
}

impl GpuStep<'_> {
    /// The op of node `i`.
    pub fn op(&self, i: usize) -> &Op {
        &self.graph.nodes[i].op
    }
    /// The device address of buffer `b`.
    pub fn buf(&self, b: BufId) -> DevPtr {
        self.bufs[b.0 as usize]
    }
    /// Where tensor `t` lies.
    pub fn weight(&self, t: TensorId) -> Result<WeightRef, EngineError> {
        self.weights
            .iter()
            .find(|w| w.tensor == t)
            .copied()
            .ok_or_else(|| {
                EngineError::Device(format!("tensor {} is not on the device for this step", t.0))
            })
    }
}

/// What a per-op time is accumulated under.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OpKey {
    /// Op kind ([`Op::kind`], or a fused launch's name).
    pub op: &'static str,
    /// Weight type (matmuls, embeddings, expert FFNs).
    pub quant: Option<pshard_model::ggml_type::GgmlType>,
    /// Weight shape `[rows, cols]` (expert FFNs: one expert's gate matrix `[n_ff, n_embd]`).
    pub shape: Option<[usize; 2]>,
    /// Tokens of the program (its batch).
    pub n_tokens: usize,
    /// Rows the op computed: `n_tokens`, except after the logit-row selection.
    pub rows: usize,
}

impl OpKey {
    /// The key of node `ni` of `g`.
    pub fn of(model: &Model, g: &Graph, ni: usize) -> OpKey {
        let op = &g.nodes[ni].op;
        let rows = op.writes().first().map_or(g.n_tokens, |&b| g.rows(b));
        let weight = match *op {
            Op::MatMul { weight, .. } | Op::Embed { table: weight, .. } => Some(weight),
            Op::MoeFfn { gate_exps, .. } => Some(gate_exps),
            _ => None,
        };
        let (quant, shape) = match weight {
            Some(id) => {
                let t = model.spec.tensor(id);
                (Some(t.ty), Some([t.rows(), t.cols()]))
            }
            None => (None, None),
        };
        OpKey {
            op: op.kind(),
            quant,
            shape,
            n_tokens: g.n_tokens,
            rows,
        }
    }
}

/// Accumulated device time of one [`OpKey`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct OpTime {
    /// Steps timed.
    pub calls: u64,
    /// Seconds.
    pub seconds: f64,
}

/// A GPU, or the host standing in for one.
pub trait Device: Send {
    /// One line: what device this is.
    fn describe(&self) -> String;
    /// Report lines (device, caches, VRAM per region).
    fn report(&self) -> String;

    /// The VRAM budget of the arena (the context and workspaces already taken out).
    fn budget(&self) -> u64;
    /// Reserves a region; fails with a message naming it when the budget cannot hold it.
    fn create_region(
        &self,
        kind: RegionKind,
        name: &str,
        bytes: u64,
    ) -> Result<RegionId, EngineError>;
    /// A buffer inside a region.
    fn alloc(&self, region: RegionId, bytes: u64, what: &str) -> Result<DevPtr, EngineError>;
    /// Frees a region and every buffer in it.
    fn destroy_region(&self, region: RegionId) -> Result<(), EngineError>;
    /// Usage per region.
    fn regions(&self) -> Vec<RegionReport>;
    /// Device memory in use by this process as the driver reports it (CUDA: `cuMemGetInfo`
    /// against the free memory before the context; the host device: its regions).
    fn measured_bytes(&self) -> u64;

    /// Host memory that copies can use asynchronously.
    fn host_alloc(&self, bytes: usize) -> Result<HostBuf, EngineError>;

    /// Makes these ranges of the mapped model file (tensor `file_index`, byte offset, length)
    /// copyable asynchronously at full speed, in place (CUDA: page-locked read-only, no second
    /// host copy): the ranges the copy lane streams from. Returns the bytes now locked.
    fn register_mapped(&mut self, ranges: &[(usize, usize, usize)]) -> Result<u64, EngineError>;

    /// Enqueues a copy host→device.
    fn upload(
        &self,
        s: Stream,
        dst: DevPtr,
        src: &HostSrc,
        shape: Shape2d,
    ) -> Result<(), EngineError>;
    /// Enqueues a copy device→host into `dst` from `offset`.
    fn download(
        &self,
        s: Stream,
        dst: &HostBuf,
        offset: usize,
        src: DevPtr,
        shape: Shape2d,
    ) -> Result<(), EngineError>;
    /// Enqueues a device→device copy of `bytes`.
    fn copy_d2d(
        &self,
        s: Stream,
        dst: DevPtr,
        src: DevPtr,
        bytes: usize,
    ) -> Result<(), EngineError>;

    /// A new event.
    fn new_event(&self) -> Result<Event, EngineError>;
    /// Enqueues the recording of `e` on `s`.
    fn record(&self, s: Stream, e: Event) -> Result<(), EngineError>;
    /// Makes `s` wait for the last recording of `e`.
    fn wait(&self, s: Stream, e: Event) -> Result<(), EngineError>;
    /// Blocks the calling thread until the last recording of `e` has happened.
    fn host_wait(&self, e: Event) -> Result<(), EngineError>;
    /// Blocks until both streams are idle.
    fn synchronize(&self) -> Result<(), EngineError>;

    /// Enqueues one GPU-lane step on the compute stream.
    fn launch(&self, step: &GpuStep<'_>) -> Result<(), EngineError>;

    /// Enqueues a context shift of one layer's cells of one sequence on the compute stream.
    fn shift_kv(&self, shift: &KvShift) -> Result<(), EngineError>;

    /// Runs `issue`, which enqueues a fixed run of compute-stream steps of a program, as a CUDA
    /// graph where the device supports it: the run is captured the second time `key` comes (the
    /// first run warms up) and replayed after. Devices without graphs just call `issue`.
    fn graph_run(
        &mut self,
        key: (u64, usize),
        issue: &mut dyn FnMut(&dyn Device) -> Result<(), EngineError>,
    ) -> Result<(), EngineError>;
    /// Forgets captured graphs of programs with this id.
    fn forget_graphs(&mut self, program: u64);

    /// Turns per-op timing on or off: while on, every launch is timed (no graphs).
    fn set_op_timing(&mut self, on: bool);
    /// Device time per op key since timing was last cleared.
    fn op_times(&self) -> Vec<(OpKey, OpTime)>;
    /// Forgets the accumulated op times.
    fn clear_op_times(&mut self);

    /// Bytes copied host→device and device→host so far (tests compare them with the planner's).
    fn copied_bytes(&self) -> (u64, u64);
}
