//! The CUDA device: the [`Device`] interface over one GPU — the VRAM arena (budget covering the
//! context too), a compute and a copy stream with events, page-locked host memory, the kernels
//! ([`exec`]), captured decode graphs, and per-op timing ([`timing`]).
//!
//! Every call binds the device's context to the calling thread first, so the engine may move
//! between threads.

mod exec;
pub mod host;
mod moe;
mod timing;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use pshard_kernels::cuda::CudaEvent;
use pshard_kernels::cuda::{CapturedGraph, Gpu, RegionId, RegionKind, RegionReport};

use crate::device::{
    DevPtr, Device, Event, GpuStep, HostBuf, HostSrc, KvShift, OpKey, OpTime, Shape2d, Stream,
};
use crate::error::EngineError;
use crate::model::Model;
use host::PinnedMem;

/// How to open the GPU.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// CUDA ordinal.
    pub ordinal: usize,
    /// VRAM budget in bytes for everything the process holds on the GPU, CUDA context included
    /// (`None`: the free memory minus a margin).
    pub vram_budget: Option<u64>,
    /// NVRTC cache directory (`None`: the default).
    pub cache_dir: Option<PathBuf>,
}

/// A captured decode run: replayed after its first capture.
struct GraphEntry {
    runs: u32,
    graph: Option<CapturedGraph>,
}

/// One GPU as the engine's device.
pub struct CudaDevice {
    /// Mapped ranges locked in place; dropped (unregistered) before the model they point into.
    registered: Vec<pshard_kernels::cuda::HostRegistration<'static>>,
    model: Arc<Model>,
    /// The GPU (kernels, cuBLAS, device); dropped after the graphs and events.
    gpu: Gpu,
    events: Mutex<Vec<Arc<CudaEvent>>>,
    graphs: HashMap<(u64, usize), GraphEntry>,
    timing: timing::OpTimer,
    h2d: AtomicU64,
    d2h: AtomicU64,
}

impl CudaDevice {
    /// Opens the GPU for `model`.
    pub fn open(model: Arc<Model>, opts: &GpuOptions) -> Result<CudaDevice, EngineError> {
        let cache = opts
            .cache_dir
            .clone()
            .unwrap_or_else(pshard_kernels::cuda::nvrtc::default_cache_dir);
        let gpu = Gpu::open(opts.ordinal, opts.vram_budget, &cache)?;
        Ok(CudaDevice {
            registered: Vec::new(),
            model,
            gpu,
            events: Mutex::new(Vec::new()),
            graphs: HashMap::new(),
            timing: timing::OpTimer::default(),
            h2d: AtomicU64::new(0),
            d2h: AtomicU64::new(0),
        })
    }

    /// The GPU.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    fn stream(&self, s: Stream) -> &Arc<pshard_kernels::cuda::CudaStream> {
        match s {
            Stream::Compute => self.gpu.dev.compute_stream(),
            Stream::Copy => self.gpu.dev.copy_stream(),
        }
    }

    fn event(&self, e: Event) -> Result<Arc<CudaEvent>, EngineError> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(e.0 as usize)
            .cloned()
            .ok_or_else(|| EngineError::Device(format!("no event {}", e.0)))
    }

    /// The host address behind a copy source.
    fn host_ptr(&self, src: &HostSrc) -> Result<*mut u8, EngineError> {
        match src {
            HostSrc::Buf(b, off) => Ok(pinned(b)?.ptr().wrapping_add(*off)),
            HostSrc::Mapped { file_index, offset } => {
                let data = self.model.file().tensor_data(*file_index);
                if *offset > data.len() {
                    return Err(EngineError::Device(format!(
                        "offset {offset} past tensor {file_index}'s {} bytes",
                        data.len()
                    )));
                }
                Ok(data.as_ptr().wrapping_add(*offset) as *mut u8)
            }
        }
    }
}

/// The pinned memory behind a host buffer this device made.
fn pinned(b: &HostBuf) -> Result<&PinnedMem, EngineError> {
    b.as_any().downcast_ref::<PinnedMem>().ok_or_else(|| {
        EngineError::Device("a host buffer that is not page-locked reached a CUDA copy".into())
    })
}

fn drv<T, E: std::fmt::Debug>(what: &'static str, r: Result<T, E>) -> Result<T, EngineError> {
    r.map_err(|e| {
        EngineError::Cuda(pshard_kernels::cuda::CudaError::Driver {
            call: what,
            err: format!("{e:?}"),
        })
    })
}

impl Device for CudaDevice {
    fn describe(&self) -> String {
        let i = self.gpu.dev.info();
        format!("{} ({}, {} SMs)", i.name, i.arch(), i.sm_count)
    }

    fn report(&self) -> String {
        let i = self.gpu.dev.info();
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        let mut s = format!(
            "gpu: {}, CUDA context overhead {:.0} MiB\ngpu: {}\n",
            self.describe(),
            mib(i.context_overhead),
            self.gpu.kernels.build_summary()
        );
        let regions = self.regions();
        let total: u64 = regions.iter().map(|r| r.capacity).sum();
        s += &format!("gpu: VRAM arena {:.0} MiB:", mib(total));
        for r in regions {
            s += &format!(" {} {:.0} MiB;", r.name, mib(r.capacity));
        }
        s
    }

    fn budget(&self) -> u64 {
        self.gpu.dev.arena().map_or(0, |a| a.budget())
    }

    fn create_region(
        &self,
        kind: RegionKind,
        name: &str,
        bytes: u64,
    ) -> Result<RegionId, EngineError> {
        Ok(self.gpu.dev.create_region(kind, name, bytes)?)
    }

    fn alloc(&self, region: RegionId, bytes: u64, what: &str) -> Result<DevPtr, EngineError> {
        Ok(self.gpu.dev.alloc(region, bytes, what)?.ptr)
    }

    fn destroy_region(&self, region: RegionId) -> Result<(), EngineError> {
        self.gpu.dev.synchronize()?;
        Ok(self.gpu.dev.arena()?.destroy_region(region)?)
    }

    fn regions(&self) -> Vec<RegionReport> {
        self.gpu.dev.vram_report().unwrap_or_default()
    }

    fn measured_bytes(&self) -> u64 {
        self.gpu.dev.measured_usage().unwrap_or(0)
    }

    fn host_alloc(&self, bytes: usize) -> Result<HostBuf, EngineError> {
        let b = pshard_kernels::cuda::PinnedBuf::new(&self.gpu.dev, bytes)?;
        Ok(Arc::new(PinnedMem::new(b)))
    }

    fn register_mapped(&mut self, ranges: &[(usize, usize, usize)]) -> Result<u64, EngineError> {
        // Whole pages around each range, merged where they touch or overlap, so that every copy
        // lies inside one registration and no page is registered twice.
        const PAGE: usize = 4096;
        let mut spans: Vec<(usize, usize)> = ranges
            .iter()
            .map(|&(fi, off, len)| {
                let data = self.model.file().tensor_data(fi);
                let a = data.as_ptr() as usize + off.min(data.len());
                let b = a + len.min(data.len() - off.min(data.len()));
                (a / PAGE * PAGE, b.div_ceil(PAGE) * PAGE)
            })
            .filter(|(a, b)| b > a)
            .collect();
        spans.sort_unstable();
        let mut merged: Vec<(usize, usize)> = Vec::new();
        for (a, b) in spans {
            match merged.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        let mut bytes = 0u64;
        for (a, b) in merged {
            // Parts already registered by an earlier call are skipped whole.
            if self.registered.iter().any(|r| {
                let (ra, rb) = (r.as_ptr() as usize, r.as_ptr() as usize + r.len());
                a < rb && ra < b
            }) {
                continue;
            }
            // SAFETY: the pages lie in the model file's mapping, which this device keeps alive
            // (it holds the model) until after `registered` is dropped; overlapping
            // registrations were skipped above.
            let r = unsafe {
                pshard_kernels::cuda::HostRegistration::register_read_only_raw(
                    &self.gpu.dev,
                    a as *const u8,
                    b - a,
                )?
            };
            bytes += (b - a) as u64;
            self.registered.push(r);
        }
        Ok(bytes)
    }

    fn upload(
        &self,
        s: Stream,
        dst: DevPtr,
        src: &HostSrc,
        shape: Shape2d,
    ) -> Result<(), EngineError> {
        let host = self.host_ptr(src)?;
        let st = self.stream(s);
        // SAFETY: host buffers are page-locked memory owned by the engine, which does not touch
        // them until the events after this copy complete; mapped tensors live as long as the
        // model this device holds. Device addresses come from the arena with their sizes.
        unsafe {
            if shape.rows <= 1 {
                self.gpu.dev.upload_async(st, dst, host, shape.width)?;
            } else {
                self.gpu.dev.copy_2d_async(
                    st,
                    true,
                    host,
                    shape.src_pitch,
                    dst,
                    shape.dst_pitch,
                    shape.width,
                    shape.rows,
                )?;
            }
        }
        self.h2d.fetch_add(shape.bytes() as u64, Ordering::Relaxed);
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
        let len = (shape.rows.max(1) - 1) * shape.dst_pitch + shape.width;
        if offset + len > dst.len() {
            return Err(EngineError::Device(
                "a download writes past its host buffer".into(),
            ));
        }
        let host = pinned(dst)?.ptr().wrapping_add(offset);
        let st = self.stream(s);
        // SAFETY: as `upload`; the range was checked against the buffer above.
        unsafe {
            if shape.rows <= 1 {
                self.gpu.dev.download_async(st, host, src, shape.width)?;
            } else {
                self.gpu.dev.copy_2d_async(
                    st,
                    false,
                    host,
                    shape.dst_pitch,
                    src,
                    shape.src_pitch,
                    shape.width,
                    shape.rows,
                )?;
            }
        }
        self.d2h.fetch_add(shape.bytes() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn copy_d2d(
        &self,
        s: Stream,
        dst: DevPtr,
        src: DevPtr,
        bytes: usize,
    ) -> Result<(), EngineError> {
        Ok(self.gpu.dev.copy_d2d(self.stream(s), dst, src, bytes)?)
    }

    fn new_event(&self) -> Result<Event, EngineError> {
        let e = self.gpu.dev.event(false)?;
        let mut v = self.events.lock().unwrap_or_else(|p| p.into_inner());
        v.push(Arc::new(e));
        Ok(Event(v.len() as u32 - 1))
    }

    fn record(&self, s: Stream, e: Event) -> Result<(), EngineError> {
        self.gpu.dev.bind()?;
        drv("recording an event", self.event(e)?.record(self.stream(s)))
    }

    fn wait(&self, s: Stream, e: Event) -> Result<(), EngineError> {
        self.gpu.dev.bind()?;
        drv("waiting on an event", self.stream(s).wait(&*self.event(e)?))
    }

    fn host_wait(&self, e: Event) -> Result<(), EngineError> {
        drv("waiting for an event", self.event(e)?.synchronize())
    }

    fn synchronize(&self) -> Result<(), EngineError> {
        Ok(self.gpu.dev.synchronize()?)
    }

    fn launch(&self, step: &GpuStep<'_>) -> Result<(), EngineError> {
        self.gpu.dev.bind()?;
        if self.timing.on() {
            return self.timing.time(&self.gpu, &self.model, step, || {
                exec::launch(&self.gpu, &self.model, step)
            });
        }
        exec::launch(&self.gpu, &self.model, step)
    }

    fn shift_kv(&self, shift: &KvShift) -> Result<(), EngineError> {
        self.gpu.dev.bind()?;
        // The move tables: (source, destination) pairs, run offsets, cyclic flags.
        let mut moves: Vec<i32> = Vec::new();
        let mut starts: Vec<i32> = vec![0];
        let mut cyclic: Vec<i32> = Vec::new();
        for r in &shift.runs {
            moves.extend(r.moves.iter().flat_map(|&(s, d)| [s as i32, d as i32]));
            starts.push((moves.len() / 2) as i32);
            cyclic.push(r.cyclic as i32);
        }
        if cyclic.is_empty() {
            return Ok(());
        }
        let tables: [&[i32]; 3] = [&moves, &starts, &cyclic];
        let bytes: u64 = tables
            .iter()
            .map(|t| pshard_planner::lanes::align(t.len() as u64 * 4))
            .sum();
        let region = self.create_region(
            pshard_kernels::cuda::RegionKind::Scratch,
            "context shift moves",
            bytes,
        )?;
        let res = (|| {
            let st = self.stream(Stream::Compute);
            let mut ptrs = [0u64; 3];
            let mut hosts = Vec::new();
            for (i, t) in tables.iter().enumerate() {
                ptrs[i] = self.alloc(region, t.len() as u64 * 4, "context shift table")?;
                let hb = self.host_alloc(t.len() * 4)?;
                hb.write(&mut |b: &mut [u8]| b.copy_from_slice(bytemuck::cast_slice(t)));
                self.upload(
                    Stream::Compute,
                    ptrs[i],
                    &HostSrc::Buf(hb.clone(), 0),
                    Shape2d::flat(t.len() * 4),
                )?;
                // Kept until the region goes (which waits for the device).
                hosts.push(hb);
            }
            let rope = shift.rope.map(|r| {
                let ff = shift.freq_factors.map(|w| w.addr);
                (exec::kernel_rope(r.head_dim, &r.rope, ff), r.offset)
            });
            let (cells, ty) = (shift.kv.cells, shift.kv.ty);
            for (base, cols, rope) in [
                (
                    shift.kv.k,
                    shift.kv.k_cols,
                    rope.as_ref().map(|(a, o)| (a, *o)),
                ),
                (shift.kv.v, shift.kv.v_cols, None),
            ] {
                let rows = base + (shift.seq * cells * ty.row_bytes(cols)) as u64;
                self.gpu.kernels.kv_shift(
                    ty,
                    rows,
                    cols,
                    (ptrs[0], ptrs[1], ptrs[2], cyclic.len()),
                    rope,
                    shift.delta as f32,
                    st,
                )?;
            }
            self.gpu.dev.synchronize()?;
            drop(hosts);
            Ok(())
        })();
        let freed = self.destroy_region(region);
        res.and(freed)
    }

    fn graph_run(
        &mut self,
        key: (u64, usize),
        issue: &mut dyn FnMut(&dyn Device) -> Result<(), EngineError>,
    ) -> Result<(), EngineError> {
        if self.timing.on() || std::env::var_os("PSHARD_NO_CUDA_GRAPH").is_some() {
            return issue(self);
        }
        let mut entry = self.graphs.remove(&key).unwrap_or(GraphEntry {
            runs: 0,
            graph: None,
        });
        let res = (|| {
            if entry.graph.is_none() && entry.runs >= 1 {
                let this: &CudaDevice = self;
                let mut err = None;
                let g = CapturedGraph::capture(&this.gpu.dev, this.gpu.stream(), || {
                    issue(this).map_err(|e| {
                        let msg = e.to_string();
                        err = Some(e);
                        pshard_kernels::cuda::CudaError::Invalid(msg)
                    })
                });
                match (g, err) {
                    (Ok(g), _) => entry.graph = Some(g),
                    (Err(_), Some(e)) => return Err(e),
                    (Err(e), None) => return Err(e.into()),
                }
            }
            match &entry.graph {
                Some(g) => Ok(g.launch(self.gpu.stream())?),
                None => issue(self),
            }
        })();
        entry.runs += 1;
        self.graphs.insert(key, entry);
        res
    }

    fn forget_graphs(&mut self, program: u64) {
        self.graphs.retain(|k, _| k.0 != program);
    }

    fn set_op_timing(&mut self, on: bool) {
        self.timing.set(on);
    }

    fn op_times(&self) -> Vec<(OpKey, OpTime)> {
        self.timing.times()
    }

    fn clear_op_times(&mut self) {
        self.timing.clear();
    }

    fn copied_bytes(&self) -> (u64, u64) {
        (
            self.h2d.load(Ordering::Relaxed),
            self.d2h.load(Ordering::Relaxed),
        )
    }
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        let _ = self.gpu.dev.synchronize();
        self.graphs.clear();
    }
}

#[cfg(test)]
mod tests;
