//! The GPU device: detection at run time (dynamic loading, so a machine without CUDA gets an
//! error, never a panic), the context, a compute and a copy stream, events, the VRAM arena and
//! host<->device copies.

use super::arena::{DevBuf, RegionId, RegionKind, RegionReport, VramArena};
use super::error::{check, drv, CudaError, CudaResult};
use cudarc::driver::{sys, CudaContext, CudaEvent, CudaStream};
use std::sync::{Arc, Mutex, MutexGuard};

/// Default margin left free when no VRAM budget is given (driver, other processes, fragmentation).
pub const DEFAULT_MARGIN: u64 = 1 << 30;

/// What the driver says about a device, plus measured overheads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// CUDA ordinal.
    pub ordinal: usize,
    /// Marketing name, e.g. `"NVIDIA H200"`.
    pub name: String,
    /// Compute capability (major, minor).
    pub cc: (i32, i32),
    /// Streaming multiprocessors.
    pub sm_count: i32,
    /// L2 cache bytes.
    pub l2_bytes: i32,
    /// Max shared memory per block with opt-in.
    pub smem_optin: i32,
    /// Driver version as the driver encodes it (e.g. 13000).
    pub driver_version: i32,
    /// Total device memory.
    pub total_mem: u64,
    /// Free device memory right after our context was created.
    pub free_after_context: u64,
    /// Measured memory cost of one CUDA context on this device (free memory before minus after
    /// creating a second, throw-away context); the primary context costs about the same.
    pub context_overhead: u64,
}

impl DeviceInfo {
    /// The NVRTC architecture name, e.g. `"sm_90"`.
    pub fn arch(&self) -> String {
        format!("sm_{}{}", self.cc.0, self.cc.1)
    }
}

/// Whether the CUDA driver library can be loaded at all (no panic either way).
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library; no symbol is called.
    unsafe { sys::is_culib_present() }
}

/// Number of CUDA devices, or an error naming why there are none to ask.
pub fn device_count() -> CudaResult<usize> {
    if !driver_present() {
        return Err(CudaError::MissingLibrary { lib: "libcuda" });
    }
    guard(|| {
        drv("initialising the driver", cudarc::driver::result::init())?;
        Ok(drv(
            "counting devices",
            cudarc::driver::result::device::get_count(),
        )? as usize)
    })
}

/// Runs `f`, turning a panic inside cudarc (e.g. a symbol missing from an old driver) into an error.
fn guard<T>(f: impl FnOnce() -> CudaResult<T>) -> CudaResult<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(CudaError::Driver {
                call: "loading the CUDA driver",
                err: msg,
            })
        }
    }
}

/// An open GPU: context, two streams and the VRAM arena.
pub struct GpuDevice {
    info: DeviceInfo,
    arena: Mutex<VramArena>,
    compute: Arc<CudaStream>,
    copy: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
}

impl std::fmt::Debug for GpuDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuDevice")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl GpuDevice {
    /// Opens device `ordinal` with a VRAM budget in bytes for everything the process holds on it,
    /// the CUDA context included (`None`: the free memory minus [`DEFAULT_MARGIN`]). The arena gets
    /// the budget less the measured context; a budget the context does not fit in, or larger than
    /// the free memory, is an error.
    pub fn open(ordinal: usize, budget: Option<u64>) -> CudaResult<Arc<GpuDevice>> {
        let count = device_count()?;
        if ordinal >= count {
            return Err(CudaError::NoDevice { ordinal, count });
        }
        guard(|| Self::open_inner(ordinal, budget))
    }

    fn open_inner(ordinal: usize, budget: Option<u64>) -> CudaResult<Arc<GpuDevice>> {
        let ctx = drv("creating the CUDA context", CudaContext::new(ordinal))?;
        let (free, total) = drv("reading free memory", ctx.mem_get_info())?;
        let context_overhead = measure_context_overhead(&ctx, free)?;
        let attr = |a| drv("reading a device attribute", ctx.attribute(a));
        use sys::CUdevice_attribute as A;
        let cc = (
            attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        );
        let mut driver_version = 0;
        // SAFETY: out-pointer to a local.
        check("reading the driver version", unsafe {
            sys::cuDriverGetVersion(&mut driver_version)
        })?;
        let info = DeviceInfo {
            ordinal,
            name: drv("reading the device name", ctx.name())?,
            cc,
            sm_count: attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
            l2_bytes: attr(A::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?,
            smem_optin: attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?,
            driver_version,
            total_mem: total as u64,
            free_after_context: free as u64,
            context_overhead,
        };
        // A budget covers everything the process holds on the device, the context included: the
        // arena gets what is left after the context.
        let budget = match budget {
            Some(b) if b > free as u64 + context_overhead => {
                return Err(CudaError::OutOfVram {
                    what: "the requested VRAM budget".into(),
                    requested: b,
                    available: free as u64 + context_overhead,
                    limit: total as u64,
                })
            }
            Some(b) if b <= context_overhead => {
                return Err(CudaError::OutOfVram {
                    what: "the CUDA context within the VRAM budget".into(),
                    requested: context_overhead,
                    available: b,
                    limit: b,
                })
            }
            Some(b) => b - context_overhead,
            None => (free as u64).saturating_sub(DEFAULT_MARGIN),
        };
        let compute = drv("creating the compute stream", ctx.new_stream())?;
        let copy = drv("creating the copy stream", ctx.new_stream())?;
        Ok(Arc::new(GpuDevice {
            info,
            arena: Mutex::new(VramArena::new(budget)),
            compute,
            copy,
            ctx,
        }))
    }

    /// Device facts and measured overheads.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The cudarc context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream kernels run on.
    pub fn compute_stream(&self) -> &Arc<CudaStream> {
        &self.compute
    }

    /// The stream weight uploads and streaming copies run on.
    pub fn copy_stream(&self) -> &Arc<CudaStream> {
        &self.copy
    }

    /// Makes this device's context current on the calling thread (needed once per thread).
    pub fn bind(&self) -> CudaResult<()> {
        drv(
            "binding the context to this thread",
            self.ctx.bind_to_thread(),
        )
    }

    /// Locks the arena (binding the context first, since the arena allocates).
    pub fn arena(&self) -> CudaResult<MutexGuard<'_, VramArena>> {
        self.bind()?;
        self.arena
            .lock()
            .map_err(|_| CudaError::Invalid("VRAM arena lock poisoned".into()))
    }

    /// Reserves a region of the arena.
    pub fn create_region(&self, kind: RegionKind, name: &str, bytes: u64) -> CudaResult<RegionId> {
        self.arena()?.create_region(kind, name, bytes)
    }

    /// Allocates a buffer in a region.
    pub fn alloc(&self, region: RegionId, bytes: u64, what: &str) -> CudaResult<DevBuf> {
        self.arena()?.alloc(region, bytes, what)
    }

    /// Frees a buffer.
    pub fn free(&self, buf: DevBuf) -> CudaResult<()> {
        self.arena()?.free(buf)
    }

    /// Region usage.
    pub fn vram_report(&self) -> CudaResult<Vec<RegionReport>> {
        Ok(self.arena()?.report())
    }

    /// Free and total device memory now, as the driver reports it.
    pub fn mem_info(&self) -> CudaResult<(u64, u64)> {
        let (f, t) = drv("reading free memory", self.ctx.mem_get_info())?;
        Ok((f as u64, t as u64))
    }

    /// Creates an event (timing enabled when `timing`).
    pub fn event(&self, timing: bool) -> CudaResult<CudaEvent> {
        let flags = if timing {
            sys::CUevent_flags::CU_EVENT_DEFAULT
        } else {
            sys::CUevent_flags::CU_EVENT_DISABLE_TIMING
        };
        drv("creating an event", self.ctx.new_event(Some(flags)))
    }

    /// Copies host bytes to `dst + off` on `stream` and waits for the copy to finish.
    pub fn upload(&self, stream: &CudaStream, dst: u64, src: &[u8]) -> CudaResult<()> {
        self.bind()?;
        // SAFETY: `src` outlives the call because we synchronise before returning; the caller
        // guarantees `dst` has room for `src.len()` bytes (arena buffers carry their size).
        unsafe {
            check(
                "copying host to device",
                sys::cuMemcpyHtoDAsync_v2(
                    dst,
                    src.as_ptr() as *const _,
                    src.len(),
                    stream.cu_stream(),
                ),
            )?;
        }
        drv("waiting for an upload", stream.synchronize())
    }

    /// Copies device bytes into `dst` and waits.
    pub fn download(&self, stream: &CudaStream, dst: &mut [u8], src: u64) -> CudaResult<()> {
        self.bind()?;
        // SAFETY: as `upload`; `dst` is exclusively borrowed until the synchronise below.
        unsafe {
            check(
                "copying device to host",
                sys::cuMemcpyDtoHAsync_v2(
                    dst.as_mut_ptr() as *mut _,
                    src,
                    dst.len(),
                    stream.cu_stream(),
                ),
            )?;
        }
        drv("waiting for a download", stream.synchronize())
    }

    /// Enqueues a host-to-device copy without waiting.
    ///
    /// # Safety
    /// `src .. src+len` must stay valid and unchanged until the copy completes (record an event or
    /// synchronise `stream`); for a truly asynchronous copy it must be page-locked
    /// ([`super::host::PinnedBuf`] or [`super::host::HostRegistration`]); `dst` must have room.
    pub unsafe fn upload_async(
        &self,
        stream: &CudaStream,
        dst: u64,
        src: *const u8,
        len: usize,
    ) -> CudaResult<()> {
        self.bind()?;
        check(
            "copying host to device",
            sys::cuMemcpyHtoDAsync_v2(dst, src as *const _, len, stream.cu_stream()),
        )
    }

    /// Enqueues a device-to-host copy without waiting.
    ///
    /// # Safety
    /// `dst .. dst+len` must stay valid and untouched until the copy completes; `src` must hold
    /// `len` bytes.
    pub unsafe fn download_async(
        &self,
        stream: &CudaStream,
        dst: *mut u8,
        src: u64,
        len: usize,
    ) -> CudaResult<()> {
        self.bind()?;
        check(
            "copying device to host",
            sys::cuMemcpyDtoHAsync_v2(dst as *mut _, src, len, stream.cu_stream()),
        )
    }

    /// Enqueues a strided copy of `height` rows of `width` bytes between host and device
    /// (`to_device`: host → device), rows `host_pitch` / `dev_pitch` bytes apart.
    ///
    /// # Safety
    /// As [`Self::upload_async`] / [`Self::download_async`] for every row: the host rows stay valid
    /// (and untouched, for a download) until the copy completes; the device rows are allocated.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn copy_2d_async(
        &self,
        stream: &CudaStream,
        to_device: bool,
        host: *mut u8,
        host_pitch: usize,
        dev: u64,
        dev_pitch: usize,
        width: usize,
        height: usize,
    ) -> CudaResult<()> {
        self.bind()?;
        // Every field set: the struct holds enums (`CUmemorytype`), for which all-zero bytes are
        // not a valid value, so it cannot start from `mem::zeroed`.
        let (host_type, dev_type) = (
            sys::CUmemorytype::CU_MEMORYTYPE_HOST,
            sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
        );
        let null = std::ptr::null_mut();
        let c = sys::CUDA_MEMCPY2D {
            srcXInBytes: 0,
            srcY: 0,
            srcMemoryType: if to_device { host_type } else { dev_type },
            srcHost: if to_device { host as *const _ } else { null },
            srcDevice: if to_device { 0 } else { dev },
            srcArray: null as _,
            srcPitch: if to_device { host_pitch } else { dev_pitch },
            dstXInBytes: 0,
            dstY: 0,
            dstMemoryType: if to_device { dev_type } else { host_type },
            dstHost: if to_device { null } else { host as *mut _ },
            dstDevice: if to_device { dev } else { 0 },
            dstArray: null as _,
            dstPitch: if to_device { dev_pitch } else { host_pitch },
            WidthInBytes: width,
            Height: height,
        };
        check(
            "copying a strided block",
            sys::cuMemcpy2DAsync_v2(&c, stream.cu_stream()),
        )
    }

    /// Device memory this process uses now: the context plus what the free memory has dropped by
    /// since the context was made (`cuMemGetInfo`; other processes' allocations in between would
    /// count too).
    pub fn measured_usage(&self) -> CudaResult<u64> {
        let (free, _) = self.mem_info()?;
        Ok(self.info.context_overhead + self.info.free_after_context.saturating_sub(free))
    }

    /// Enqueues a device-to-device copy of `len` bytes.
    pub fn copy_d2d(&self, stream: &CudaStream, dst: u64, src: u64, len: usize) -> CudaResult<()> {
        self.bind()?;
        // SAFETY: device addresses only; the driver reports out-of-range addresses as errors.
        check("copying device to device", unsafe {
            sys::cuMemcpyDtoDAsync_v2(dst, src, len, stream.cu_stream())
        })
    }

    /// Fills `len` bytes at `dst` with `byte`.
    pub fn memset(&self, stream: &CudaStream, dst: u64, byte: u8, len: usize) -> CudaResult<()> {
        self.bind()?;
        // SAFETY: device address only.
        check("filling device memory", unsafe {
            sys::cuMemsetD8Async(dst, byte, len, stream.cu_stream())
        })
    }

    /// Makes `waiter` wait for everything enqueued on `producer` so far (an event between lanes).
    pub fn stream_wait(&self, waiter: &CudaStream, producer: &CudaStream) -> CudaResult<()> {
        let ev = self.event(false)?;
        drv("recording an event", ev.record(producer))?;
        drv("waiting on an event", waiter.wait(&ev))
    }

    /// Waits for both streams.
    pub fn synchronize(&self) -> CudaResult<()> {
        drv(
            "synchronising the compute stream",
            self.compute.synchronize(),
        )?;
        drv("synchronising the copy stream", self.copy.synchronize())
    }
}

impl Drop for GpuDevice {
    fn drop(&mut self) {
        let _ = self.synchronize();
        if self.ctx.bind_to_thread().is_ok() {
            if let Ok(mut a) = self.arena.lock() {
                a.release_all();
            }
        }
    }
}

/// Creates and destroys a second context to see what one context costs in device memory.
fn measure_context_overhead(ctx: &Arc<CudaContext>, free_before: usize) -> CudaResult<u64> {
    let mut extra: sys::CUcontext = std::ptr::null_mut();
    // SAFETY: creates a context into a local handle, reads free memory, destroys it, and makes the
    // primary context current again.
    unsafe {
        check(
            "creating a probe context",
            sys::cuCtxCreate_v4(&mut extra, std::ptr::null_mut(), 0, ctx.cu_device()),
        )?;
        let mut free = 0usize;
        let mut total = 0usize;
        let r = sys::cuMemGetInfo_v2(&mut free, &mut total);
        let _ = sys::cuCtxDestroy_v2(extra);
        drv("restoring the context", ctx.bind_to_thread())?;
        check("reading free memory", r)?;
        Ok(free_before.saturating_sub(free) as u64)
    }
}
