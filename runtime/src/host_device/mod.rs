//! The host device: the [`Device`] interface on the CPU, so machines without a GPU (CI) run mixed
//! programs end to end. Device memory is host memory in regions of the same [`VramArena`] the
//! CUDA device uses (same budget, same alignment, same errors); each stream is a worker thread
//! running its queue in order; an event is a generation counter that a stream's job bumps; the
//! kernels are the CPU lane's own ops, reading their inputs from device memory and writing their
//! outputs back.
//!
//! Every device-memory access is checked against the stream order ([`order`]): a missing event
//! wait or a ring slot reused too early is an error on every run. Optionally every job of a
//! stream also first sleeps a random while ([`HostDevice::with_delays`]), so such a bug shows in
//! the logits too.

mod order;

use std::cell::Cell;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;

use pshard_kernels::cuda::{CudaError, RegionId, RegionKind, RegionReport, VramArena};
use pshard_kernels::matmul::{ActPrecision, WeightMatrix};
use pshard_model::graph::{BufId, Graph, Op};
use pshard_model::spec::TensorId;
use pshard_planner::lanes::{DeviceScratch, Lane, Run};

use crate::batch::{Batch, ForcedRoutes};
use crate::cpu::{CpuLane, KvAccess, LayerKvMut, Weights};
use crate::device::{
    DevPtr, Device, Event, GpuStep, GpuWork, HostBuf, HostSrc, Inputs, KvRef, KvShift, OpKey,
    OpTime, PlainHostMem, ScratchPtrs, Shape2d, Stream, WeightRef,
};
use crate::error::EngineError;
use crate::model::Model;

/// Bits of an address that are the offset inside its region.
const REGION_SHIFT: u32 = 40;

thread_local! {
    /// The order of the job a stream worker is running (none on other threads).
    static CURRENT: Cell<Option<order::JobClock>> = const { Cell::new(None) };
}

type Job = Box<dyn FnOnce() + Send>;

/// One region's memory.
type RegionMem = Arc<RwLock<Vec<u32>>>;

/// Region memory, addressed by region index.
type Memory = Arc<RwLock<HashMap<usize, RegionMem>>>;

/// One stream: a worker thread running its jobs in order.
struct Worker {
    tx: Option<Sender<Job>>,
    handle: Option<JoinHandle<()>>,
}

impl Worker {
    fn spawn(name: &str) -> Worker {
        let (tx, rx) = channel::<Job>();
        let handle = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            })
            .expect("spawning a host-device stream thread");
        Worker {
            tx: Some(tx),
            handle: Some(handle),
        }
    }

    fn push(&self, job: Job) {
        if let Some(tx) = &self.tx {
            // The worker only stops when the device drops.
            let _ = tx.send(job);
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Events: per event the generation last recorded (by the issuing thread) and the generation
/// its stream has reached.
#[derive(Default)]
struct Events {
    state: Mutex<Vec<(u64, u64)>>,
    done: Condvar,
}

impl Events {
    /// The generation of event `e`'s last record, as issued.
    fn recorded(&self, e: usize) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner())[e].0
    }

    fn wait_for(&self, e: usize, gen: u64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while s[e].1 < gen {
            s = self.done.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// State the stream workers share.
struct Shared {
    model: Arc<Model>,
    mem: Memory,
    events: Events,
    h2d: AtomicU64,
    d2h: AtomicU64,
    /// The first failure of a job, reported by the next wait or synchronize.
    error: Mutex<Option<String>>,
    op_times: Mutex<HashMap<OpKey, OpTime>>,
    /// Bytes and name of each allocation, by address: a step checks that its kernel scratch
    /// holds what the CUDA kernels of its nodes would use; order errors name the allocation.
    allocs: Mutex<HashMap<DevPtr, (u64, String)>>,
    /// The last accesses of device memory, for the stream-order check.
    shadow: Mutex<order::Shadow>,
}

impl Shared {
    fn region(&self, addr: DevPtr) -> Result<(RegionMem, usize), String> {
        let idx = (addr >> REGION_SHIFT) as usize;
        let off = (addr & ((1u64 << REGION_SHIFT) - 1)) as usize;
        let mem = self.mem.read().unwrap_or_else(|p| p.into_inner());
        let r = idx
            .checked_sub(1)
            .and_then(|i| mem.get(&i))
            .ok_or_else(|| format!("address {addr:#x} is in no region"))?;
        Ok((r.clone(), off))
    }

    /// Checks the running job's access of `rows` rows of `width` bytes, `pitch` apart, at
    /// `addr` against the stream order (nothing outside a stream job).
    fn check_order(
        &self,
        addr: DevPtr,
        rows: usize,
        pitch: usize,
        width: usize,
        write: bool,
    ) -> Result<(), String> {
        let Some(job) = CURRENT.with(Cell::get) else {
            return Ok(());
        };
        let region = (addr >> REGION_SHIFT) as usize;
        let off = (addr & ((1u64 << REGION_SHIFT) - 1)) as usize;
        let mut shadow = self.shadow.lock().unwrap_or_else(|p| p.into_inner());
        for row in 0..rows.max(1) {
            let start = off + row * pitch;
            shadow
                .access(region, start..start + width, write, &job)
                .map_err(|e| {
                    let at = addr + (row * pitch) as u64;
                    let allocs = self.allocs.lock().unwrap_or_else(|p| p.into_inner());
                    let owner = allocs
                        .iter()
                        .find(|(&p, (b, _))| p <= at && at < p + b)
                        .map_or_else(String::new, |(p, (_, what))| {
                            format!(" in {what} (at {p:#x})")
                        });
                    format!("device memory at {at:#x}{owner}: {e}")
                })?;
        }
        Ok(())
    }

    /// The byte ranges, inside its region of `len` bytes at offset `off`, of `rows` rows of
    /// `width` bytes `pitch` apart: an error if one leaves the region.
    fn rows_in(
        what: &str,
        addr: DevPtr,
        off: usize,
        len: usize,
        (rows, pitch, width): (usize, usize, usize),
    ) -> Result<impl Iterator<Item = std::ops::Range<usize>>, String> {
        let last = off + rows.saturating_sub(1) * pitch + width;
        if rows > 0 && last > len {
            return Err(format!(
                "{what} of {width} bytes at {addr:#x} leaves its region"
            ));
        }
        Ok((0..rows).map(move |r| off + r * pitch..off + r * pitch + width))
    }

    /// Reads `shape` bytes at `addr` (rows `src_pitch` apart) into `out` (rows `dst_pitch` apart).
    fn read(&self, addr: DevPtr, shape: Shape2d, out: &mut [u8]) -> Result<(), String> {
        self.check_order(addr, shape.rows, shape.src_pitch, shape.width, false)?;
        let (r, off) = self.region(addr)?;
        let words = r.read().unwrap_or_else(|p| p.into_inner());
        let bytes: &[u8] = bytemuck::cast_slice(&words);
        let rows = (shape.rows, shape.src_pitch, shape.width);
        for (i, src) in Self::rows_in("read", addr, off, bytes.len(), rows)?.enumerate() {
            out[i * shape.dst_pitch..][..shape.width].copy_from_slice(&bytes[src]);
        }
        Ok(())
    }

    /// Writes `data` (rows `src_pitch` apart) to `addr` (rows `dst_pitch` apart).
    fn write(&self, addr: DevPtr, shape: Shape2d, data: &[u8]) -> Result<(), String> {
        self.check_order(addr, shape.rows, shape.dst_pitch, shape.width, true)?;
        let (r, off) = self.region(addr)?;
        let mut words = r.write().unwrap_or_else(|p| p.into_inner());
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut words);
        let rows = (shape.rows, shape.dst_pitch, shape.width);
        for (i, dst) in Self::rows_in("write", addr, off, bytes.len(), rows)?.enumerate() {
            bytes[dst].copy_from_slice(&data[i * shape.src_pitch..][..shape.width]);
        }
        Ok(())
    }

    fn read_f32(&self, addr: DevPtr, n: usize) -> Result<Vec<f32>, String> {
        let mut v = vec![0f32; n];
        self.read(addr, Shape2d::flat(n * 4), bytemuck::cast_slice_mut(&mut v))?;
        Ok(v)
    }

    fn fail(&self, e: String) {
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(e);
    }
}

/// Random delays before each job of a stream.
#[derive(Clone, Copy, Debug)]
struct Delay {
    seed: u64,
    max_us: u64,
}

/// The host device (see the module notes).
pub struct HostDevice {
    shared: Arc<Shared>,
    arena: Mutex<VramArena>,
    compute: Worker,
    copy: Worker,
    delay: Option<Delay>,
    jobs: AtomicU64,
    op_timing: bool,
    /// The issue order of jobs, events and host waits (see [`order`]).
    issue: Mutex<order::Issue>,
}

impl HostDevice {
    /// A host device with a VRAM budget of `budget` bytes for `model`, of which the CUDA
    /// backend's fixed workspaces take their share as on a GPU.
    pub fn new(model: Arc<Model>, budget: u64) -> HostDevice {
        let d = HostDevice::bare(model, budget);
        // Like the CUDA device: cuBLAS and the int8 GEMV scratch live in the arena.
        let _ = d.create_region(
            RegionKind::Workspace,
            "workspaces",
            pshard_kernels::cuda::WORKSPACE_BYTES,
        );
        d
    }

    fn bare(model: Arc<Model>, budget: u64) -> HostDevice {
        HostDevice {
            shared: Arc::new(Shared {
                model,
                mem: Arc::new(RwLock::new(HashMap::new())),
                events: Events::default(),
                h2d: AtomicU64::new(0),
                d2h: AtomicU64::new(0),
                error: Mutex::new(None),
                op_times: Mutex::new(HashMap::new()),
                allocs: Mutex::new(HashMap::new()),
                shadow: Mutex::new(order::Shadow::default()),
            }),
            arena: Mutex::new(VramArena::new(budget)),
            compute: Worker::spawn("host-device compute"),
            copy: Worker::spawn("host-device copy"),
            delay: None,
            jobs: AtomicU64::new(0),
            op_timing: false,
            issue: Mutex::new(order::Issue::default()),
        }
    }

    /// Every job sleeps a random 0..`max_us` µs first (seeded, per job), on both streams.
    pub fn with_delays(mut self, seed: u64, max_us: u64) -> HostDevice {
        self.delay = Some(Delay { seed, max_us });
        self
    }

    fn push(&self, s: Stream, job: impl FnOnce(&Shared) -> Result<(), String> + Send + 'static) {
        let shared = self.shared.clone();
        let clock = self.issue().job(s);
        let n = self.jobs.fetch_add(1, Ordering::Relaxed);
        let delay = self.delay.map(|d| {
            // splitmix64 of (seed, job number): reproducible per seed, different per job.
            let mut z = d.seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            z % (d.max_us + 1)
        });
        let job: Job = Box::new(move || {
            if let Some(us) = delay {
                std::thread::sleep(std::time::Duration::from_micros(us));
            }
            CURRENT.with(|c| c.set(Some(clock)));
            let res = job(&shared);
            CURRENT.with(|c| c.set(None));
            if let Err(e) = res {
                shared.fail(e);
            }
        });
        match s {
            Stream::Compute => self.compute.push(job),
            Stream::Copy => self.copy.push(job),
        }
    }

    fn issue(&self) -> std::sync::MutexGuard<'_, order::Issue> {
        self.issue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_error(&self) -> Result<(), EngineError> {
        let e = self
            .shared
            .error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match e {
            Some(e) => Err(EngineError::Device(e)),
            None => Ok(()),
        }
    }
}

fn cuda(e: CudaError) -> EngineError {
    EngineError::Cuda(e)
}

impl Device for HostDevice {
    fn describe(&self) -> String {
        "host device (CPU standing in for a GPU)".into()
    }

    fn report(&self) -> String {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        let mut s = format!(
            "device: {}; VRAM used {:.0} MiB:",
            self.describe(),
            mib(self.measured_bytes())
        );
        for r in self.regions() {
            s += &format!(" {} {:.0} MiB;", r.name, mib(r.capacity));
        }
        s
    }

    fn budget(&self) -> u64 {
        self.arena
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .budget()
    }

    fn create_region(
        &self,
        kind: RegionKind,
        name: &str,
        bytes: u64,
    ) -> Result<RegionId, EngineError> {
        let mut a = self.arena.lock().unwrap_or_else(|p| p.into_inner());
        // The arena hands out region indices; base the addresses on the index it will use.
        let probe = a.create_host_region(kind, name, bytes, 0).map_err(cuda)?;
        a.destroy_region(probe).map_err(cuda)?;
        let base = ((probe.0 + 1) as u64) << REGION_SHIFT;
        let id = a
            .create_host_region(kind, name, bytes, base)
            .map_err(cuda)?;
        let cap = bytes.max(pshard_kernels::cuda::arena::ALIGN);
        self.shared
            .mem
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id.0,
                Arc::new(RwLock::new(vec![0u32; cap.div_ceil(4) as usize])),
            );
        Ok(id)
    }

    fn alloc(&self, region: RegionId, bytes: u64, what: &str) -> Result<DevPtr, EngineError> {
        let mut a = self.arena.lock().unwrap_or_else(|p| p.into_inner());
        let ptr = a.alloc(region, bytes, what).map_err(cuda)?.ptr;
        self.shared
            .allocs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ptr, (bytes, what.to_string()));
        Ok(ptr)
    }

    fn destroy_region(&self, region: RegionId) -> Result<(), EngineError> {
        self.synchronize()?;
        let mut a = self.arena.lock().unwrap_or_else(|p| p.into_inner());
        a.destroy_region(region).map_err(cuda)?;
        self.shared
            .mem
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&region.0);
        self.shared
            .shadow
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .forget(region.0 + 1);
        let base = (region.0 as u64 + 1) << REGION_SHIFT;
        self.shared
            .allocs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|&a, _| a >> REGION_SHIFT != base >> REGION_SHIFT);
        Ok(())
    }

    fn regions(&self) -> Vec<RegionReport> {
        self.arena
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .report()
    }

    fn measured_bytes(&self) -> u64 {
        self.arena
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .reserved()
    }

    fn host_alloc(&self, bytes: usize) -> Result<HostBuf, EngineError> {
        Ok(Arc::new(PlainHostMem::new(bytes)))
    }

    fn register_mapped(&mut self, ranges: &[(usize, usize, usize)]) -> Result<u64, EngineError> {
        // Host memory is what the stream threads copy from anyway: nothing to lock.
        Ok(ranges.iter().map(|r| r.2 as u64).sum())
    }

    fn upload(
        &self,
        s: Stream,
        dst: DevPtr,
        src: &HostSrc,
        shape: Shape2d,
    ) -> Result<(), EngineError> {
        let src = src.clone();
        self.push(s, move |sh| {
            let mut data = vec![0u8; (shape.rows.max(1) - 1) * shape.src_pitch + shape.width];
            match &src {
                HostSrc::Buf(b, off) => {
                    let mut res = Ok(());
                    b.read(
                        &mut |bytes: &[u8]| match bytes.get(*off..*off + data.len()) {
                            Some(s) => data.copy_from_slice(s),
                            None => res = Err("upload reads past its host buffer".to_string()),
                        },
                    );
                    res?;
                }
                HostSrc::Mapped { file_index, offset } => {
                    let t = sh.model.file().tensor_data(*file_index);
                    let s = t
                        .get(*offset..*offset + data.len())
                        .ok_or("upload reads past its tensor")?;
                    data.copy_from_slice(s);
                }
            }
            sh.write(dst, shape, &data)?;
            sh.h2d.fetch_add(shape.bytes() as u64, Ordering::Relaxed);
            Ok(())
        });
        Ok(())
    }

    fn download(
        &self,
        s: Stream,
        dst: &HostBuf,
        offset: usize,
        src: DevPtr,
        shape: Shape2d,
    ) -> Result<(), EngineError> {
        let dst = dst.clone();
        self.push(s, move |sh| {
            let len = (shape.rows.max(1) - 1) * shape.dst_pitch + shape.width;
            let mut res = Ok(());
            dst.write(&mut |bytes: &mut [u8]| {
                res = match bytes.get_mut(offset..offset + len) {
                    Some(out) => sh.read(src, shape, out),
                    None => Err("download writes past its host buffer".to_string()),
                };
            });
            res?;
            sh.d2h.fetch_add(shape.bytes() as u64, Ordering::Relaxed);
            Ok(())
        });
        Ok(())
    }

    fn copy_d2d(
        &self,
        s: Stream,
        dst: DevPtr,
        src: DevPtr,
        bytes: usize,
    ) -> Result<(), EngineError> {
        self.push(s, move |sh| {
            let mut tmp = vec![0u8; bytes];
            sh.read(src, Shape2d::flat(bytes), &mut tmp)?;
            sh.write(dst, Shape2d::flat(bytes), &tmp)
        });
        Ok(())
    }

    fn new_event(&self) -> Result<Event, EngineError> {
        let mut s = self
            .shared
            .events
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        s.push((0, 0));
        Ok(Event(s.len() as u32 - 1))
    }

    fn record(&self, s: Stream, e: Event) -> Result<(), EngineError> {
        let gen = {
            let mut st = self
                .shared
                .events
                .state
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            st[e.0 as usize].0 += 1;
            st[e.0 as usize].0
        };
        self.push(s, move |sh| {
            let mut st = sh.events.state.lock().unwrap_or_else(|p| p.into_inner());
            let slot = &mut st[e.0 as usize].1;
            *slot = (*slot).max(gen);
            sh.events.done.notify_all();
            Ok(())
        });
        self.issue().record(s, e.0 as usize);
        Ok(())
    }

    fn wait(&self, s: Stream, e: Event) -> Result<(), EngineError> {
        let gen = self.shared.events.recorded(e.0 as usize);
        self.issue().wait(s, e.0 as usize);
        self.push(s, move |sh| {
            sh.events.wait_for(e.0 as usize, gen);
            Ok(())
        });
        Ok(())
    }

    fn host_wait(&self, e: Event) -> Result<(), EngineError> {
        let gen = self.shared.events.recorded(e.0 as usize);
        self.shared.events.wait_for(e.0 as usize, gen);
        self.issue().host_wait(e.0 as usize);
        self.check_error()
    }

    fn synchronize(&self) -> Result<(), EngineError> {
        for s in [Stream::Compute, Stream::Copy] {
            let e = self.new_event()?;
            self.record(s, e)?;
            let gen = self.shared.events.recorded(e.0 as usize);
            self.shared.events.wait_for(e.0 as usize, gen);
        }
        self.issue().host_sync();
        self.check_error()
    }

    fn shift_kv(&self, shift: &KvShift) -> Result<(), EngineError> {
        let shift = shift.clone();
        self.push(Stream::Compute, move |sh| {
            let model: &Model = &sh.model;
            let rope = shift
                .rope
                .map(|r| (crate::cpu::rope_op(&r.rope, model), r.span()));
            let (cells, ty) = (shift.kv.cells, shift.kv.ty);
            for (base, cols, rope) in [
                (shift.kv.k, shift.kv.k_cols, rope.as_ref()),
                (shift.kv.v, shift.kv.v_cols, None),
            ] {
                if cols == 0 {
                    continue;
                }
                let rb = ty.row_bytes(cols);
                let addr = base + (shift.seq * cells * rb) as u64;
                let shape = Shape2d::flat(cells * rb);
                let mut rows = vec![0u8; cells * rb];
                sh.read(addr, shape, &mut rows)?;
                let (r, span) = (rope.map(|r| &r.0), rope.map_or((cols, 0), |r| r.1));
                pshard_kernels::ops::kv_shift(
                    &mut rows,
                    ty,
                    cols,
                    span,
                    r,
                    shift.delta,
                    &shift.runs,
                );
                sh.write(addr, shape, &rows)?;
            }
            Ok(())
        });
        Ok(())
    }

    fn launch(&self, step: &GpuStep<'_>) -> Result<(), EngineError> {
        let job = OwnedStep {
            graph: step.graph.clone(),
            work: step.work.clone(),
            bufs: step.bufs.to_vec(),
            weights: step.weights.to_vec(),
            kv: step.kv,
            inputs: step.inputs,
            scratch: step.scratch,
            exact: step.exact,
            forced_route: step.forced_route,
        };
        let timing = self.op_timing;
        self.push(Stream::Compute, move |sh| {
            let t0 = std::time::Instant::now();
            job.run(sh)?;
            if timing {
                let ni = match &job.work {
                    GpuWork::Node { node, .. } => *node,
                    GpuWork::QkNormRope { nodes } => nodes.start,
                };
                let key = OpKey::of(&sh.model, &job.graph, ni);
                let mut t = sh.op_times.lock().unwrap_or_else(|p| p.into_inner());
                let e = t.entry(key).or_default();
                e.calls += 1;
                e.seconds += t0.elapsed().as_secs_f64();
            }
            Ok(())
        });
        Ok(())
    }

    fn graph_run(
        &mut self,
        _key: (u64, usize),
        issue: &mut dyn FnMut(&dyn Device) -> Result<(), EngineError>,
    ) -> Result<(), EngineError> {
        issue(self)
    }

    fn forget_graphs(&mut self, _program: u64) {}

    fn set_op_timing(&mut self, on: bool) {
        self.op_timing = on;
    }

    fn op_times(&self) -> Vec<(OpKey, OpTime)> {
        let mut v: Vec<_> = self
            .shared
            .op_times
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, t)| (k.clone(), *t))
            .collect();
        v.sort_by(|a, b| b.1.seconds.total_cmp(&a.1.seconds).then(a.0.cmp(&b.0)));
        v
    }

    fn clear_op_times(&mut self) {
        self.shared
            .op_times
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    fn copied_bytes(&self) -> (u64, u64) {
        (
            self.shared.h2d.load(Ordering::Relaxed),
            self.shared.d2h.load(Ordering::Relaxed),
        )
    }
}

impl Drop for HostDevice {
    fn drop(&mut self) {
        let _ = self.synchronize();
    }
}

/// A GPU step with everything it needs owned, to run on the compute worker.
struct OwnedStep {
    graph: Arc<Graph>,
    work: GpuWork,
    bufs: Vec<DevPtr>,
    weights: Vec<WeightRef>,
    kv: Option<KvRef>,
    inputs: Inputs,
    scratch: ScratchPtrs,
    exact: bool,
    forced_route: Option<DevPtr>,
}

/// A matrix read from device memory: its rows from `first` on.
struct DevMatrix {
    ty: pshard_model::ggml_type::GgmlType,
    data: Vec<u8>,
    rows: usize,
    cols: usize,
    first: usize,
    n_mats: usize,
}

/// Weights read from device memory for one step.
struct DevWeights {
    mats: HashMap<TensorId, DevMatrix>,
    vecs: HashMap<TensorId, Vec<f32>>,
}

impl Weights for DevWeights {
    fn matrix(&self, id: TensorId, expert: usize) -> (WeightMatrix<'_>, usize) {
        let m = &self.mats[&id];
        let per = m.data.len() / m.n_mats.max(1);
        (
            WeightMatrix {
                ty: m.ty,
                data: &m.data[expert * per..][..per],
                rows: m.rows,
                cols: m.cols,
                layout: pshard_kernels::matmul::WeightLayout::File,
            },
            m.first,
        )
    }
    fn vector(&self, id: TensorId) -> &[f32] {
        &self.vecs[&id]
    }
}

/// KV read from device memory for one attention step.
struct DevKv {
    k: Vec<u8>,
    v: Vec<u8>,
    cells: usize,
    ty: pshard_kernels::ops::KvType,
}

impl KvAccess for DevKv {
    fn with_layer(
        &mut self,
        _layer: usize,
        f: &mut dyn FnMut(LayerKvMut<'_>) -> Result<(), EngineError>,
    ) -> Result<(), EngineError> {
        f(LayerKvMut {
            k: &mut self.k,
            v: &mut self.v,
            cells: self.cells,
            ty: self.ty,
        })
    }
}

impl OwnedStep {
    /// Fails unless every scratch part the CUDA kernels of `nodes` would use at this batch is an
    /// allocation at least that large (the host kernels need none, so without this check a
    /// program sized short would pass here and write out of bounds on a GPU).
    fn check_scratch(
        &self,
        sh: &Shared,
        nodes: &[(usize, Option<std::ops::Range<usize>>)],
    ) -> Result<(), String> {
        let spec = &sh.model.spec;
        let cells = self.kv.map_or(0, |k| k.cells);
        let need = nodes
            .iter()
            .fold(DeviceScratch::default(), |acc, (ni, cols)| {
                let run = match cols {
                    None => Run::On(Lane::Gpu),
                    Some(r) => Run::Split { cpu_cols: r.start },
                };
                acc.max(DeviceScratch::of_node(
                    spec,
                    &self.graph,
                    *ni,
                    run,
                    cells,
                    self.exact,
                ))
            });
        let allocs = sh.allocs.lock().unwrap_or_else(|p| p.into_inner());
        for (ptr, (bytes, what)) in self.scratch.parts().into_iter().zip(need.parts()) {
            let have = allocs.get(&ptr).map_or(0, |a| a.0);
            if bytes > have {
                return Err(format!(
                    "{what} scratch at {ptr:#x} holds {have} bytes; node {} of a {}-token \
                     program needs {bytes}",
                    nodes[0].0, self.graph.n_tokens
                ));
            }
        }
        Ok(())
    }

    fn run(&self, sh: &Shared) -> Result<(), String> {
        let g = &*self.graph;
        let spec = &sh.model.spec;
        let n = g.n_tokens;
        let ints = |addr: DevPtr, count: usize| -> Result<Vec<u32>, String> {
            let mut v = vec![0u32; count];
            sh.read(
                addr,
                Shape2d::flat(count * 4),
                bytemuck::cast_slice_mut(&mut v),
            )?;
            Ok(v)
        };
        let tokens = ints(self.inputs.tokens, n)?;
        let positions = ints(self.inputs.positions, n)?;
        let seqs = ints(self.inputs.seqs, n)?;
        let logit_rows: Vec<usize> = ints(self.inputs.logit_rows, g.n_logit_rows)?
            .into_iter()
            .map(|r| r as usize)
            .collect();
        let nodes: Vec<(usize, Option<std::ops::Range<usize>>)> = match &self.work {
            GpuWork::Node { node, cols, .. } => vec![(*node, cols.clone())],
            GpuWork::QkNormRope { nodes } => nodes.clone().map(|i| (i, None)).collect(),
        };
        self.check_scratch(sh, &nodes)?;
        // Buffers the nodes touch, read from device memory.
        let mut used = vec![false; g.buffers.len()];
        for (ni, _) in &nodes {
            let op = &g.nodes[*ni].op;
            for b in op.reads().into_iter().chain(op.writes()) {
                used[b.0 as usize] = true;
            }
        }
        let mut lane = CpuLane::new(g, &used);
        lane.set_act_precision(if self.exact {
            ActPrecision::Exact
        } else {
            ActPrecision::Quantized
        });
        for (i, &u) in used.iter().enumerate() {
            if u {
                let b = BufId(i as u32);
                let len = g.rows(b) * g.buffer(b).cols;
                let v = sh.read_f32(self.bufs[i], len)?;
                lane.buf_mut(b).copy_from_slice(&v);
            }
        }
        // Weights at their device addresses.
        let mut w = DevWeights {
            mats: HashMap::new(),
            vecs: HashMap::new(),
        };
        for r in &self.weights {
            let td = spec.tensor(r.tensor);
            if td.is_matrix() {
                let rows = td.rows() - r.first_row;
                let bytes = if td.n_mats() > 1 {
                    td.bytes as usize
                } else {
                    rows * td.row_bytes() as usize
                };
                let mut data = vec![0u8; bytes];
                sh.read(r.addr, Shape2d::flat(bytes), &mut data)?;
                w.mats.insert(
                    r.tensor,
                    DevMatrix {
                        ty: td.ty,
                        data,
                        rows,
                        cols: td.cols(),
                        first: r.first_row,
                        n_mats: td.n_mats(),
                    },
                );
            } else {
                let len = td.dims.iter().product::<u64>() as usize;
                w.vecs.insert(r.tensor, sh.read_f32(r.addr, len)?);
            }
        }
        let mut kv = DevKv {
            k: Vec::new(),
            v: Vec::new(),
            cells: 0,
            ty: Default::default(),
        };
        if let Some(r) = self.kv {
            let rows = r.seqs * r.cells;
            let (kb, vb) = (
                rows * r.ty.row_bytes(r.k_cols),
                rows * r.ty.row_bytes(r.v_cols),
            );
            kv.k = vec![0u8; kb];
            kv.v = vec![0u8; vb];
            kv.cells = r.cells;
            kv.ty = r.ty;
            sh.read(r.k, Shape2d::flat(kb), &mut kv.k)?;
            sh.read(r.v, Shape2d::flat(vb), &mut kv.v)?;
        }
        // A forced-route table, read from device memory as the CUDA kernel reads it.
        let forced = match self.forced_route {
            Some(addr) => {
                let n_used = nodes
                    .iter()
                    .find_map(|(ni, _)| match g.nodes[*ni].op {
                        Op::MoeRoute { routing, .. } => Some(routing.n_used),
                        _ => None,
                    })
                    .ok_or("a forced-route table came with a step that routes no experts")?;
                Some(ints(addr, n * n_used)?)
            }
            None => None,
        };
        let batch = Batch {
            tokens: &tokens,
            positions: &positions,
            seqs: &seqs,
            logit_rows: &logit_rows,
            forced: forced
                .as_deref()
                .map_or(ForcedRoutes::None, ForcedRoutes::Table),
        };
        for (ni, cols) in &nodes {
            lane.exec(
                g,
                *ni,
                cols.clone(),
                &w,
                &mut kv,
                &batch,
                spec.hparams.n_expert,
            )
            .map_err(|e| e.to_string())?;
        }
        // Outputs back to device memory.
        let mut written = vec![false; g.buffers.len()];
        for (ni, _) in &nodes {
            for b in g.nodes[*ni].op.writes() {
                written[b.0 as usize] = true;
            }
        }
        for (i, &wr) in written.iter().enumerate() {
            if wr {
                let data = lane.buf(BufId(i as u32));
                sh.write(
                    self.bufs[i],
                    Shape2d::flat(data.len() * 4),
                    bytemuck::cast_slice(data),
                )?;
            }
        }
        if let Some(r) = self.kv {
            if nodes
                .iter()
                .any(|(ni, _)| matches!(g.nodes[*ni].op, Op::Attention { .. }))
            {
                sh.write(r.k, Shape2d::flat(kv.k.len()), &kv.k)?;
                sh.write(r.v, Shape2d::flat(kv.v.len()), &kv.v)?;
            }
        }
        Ok(())
    }
}
