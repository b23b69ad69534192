//! Page-locked host memory: fresh pinned buffers (not write-combined, since the CPU also reads
//! them) and in-place registration of existing ranges (the streaming runtime registers the mapped
//! GGUF ranges of streamed tensors read-only, so no second host copy exists).

use super::device::GpuDevice;
use super::error::{check, CudaResult};
use cudarc::driver::sys;
use std::marker::PhantomData;

/// A page-locked host buffer from `cuMemHostAlloc` (portable, cached: fine for CPU reads).
pub struct PinnedBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is plain host memory owned by this value; moving it between threads is fine.
unsafe impl Send for PinnedBuf {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for PinnedBuf {}

impl PinnedBuf {
    /// Allocates `len` zeroed bytes of pinned memory.
    pub fn new(dev: &GpuDevice, len: usize) -> CudaResult<PinnedBuf> {
        dev.bind()?;
        let mut p: *mut std::ffi::c_void = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; PORTABLE without WRITECOMBINED keeps CPU reads cached.
        check("allocating pinned host memory", unsafe {
            sys::cuMemHostAlloc(&mut p, len.max(1), sys::CU_MEMHOSTALLOC_PORTABLE)
        })?;
        // SAFETY: the allocation holds at least len bytes.
        unsafe { std::ptr::write_bytes(p as *mut u8, 0, len) };
        Ok(PinnedBuf {
            ptr: p as *mut u8,
            len,
        })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Host address (for async copies).
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }

    /// Mutable host address (for async copies into it).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is a live allocation of len bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for PinnedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr came from cuMemHostAlloc and is freed once.
        unsafe {
            let _ = sys::cuMemFreeHost(self.ptr as *mut _);
        }
    }
}

/// An existing host range page-locked in place for the lifetime `'a` of the borrow it came from.
/// Unregistered on drop. Registered pages stay resident in RAM: account for them.
pub struct HostRegistration<'a> {
    ptr: *mut u8,
    len: usize,
    _borrow: PhantomData<&'a [u8]>,
}

// SAFETY: a registration is an address range and the driver's record of it; unregistering it from
// another thread (with the context current, as `drop` needs anyway) is fine.
unsafe impl Send for HostRegistration<'_> {}

impl<'a> HostRegistration<'a> {
    /// Registers `range` read-only (the device only reads it; works on read-only file mappings).
    /// The range should be page-aligned; the driver rounds to pages.
    pub fn register_read_only(
        dev: &GpuDevice,
        range: &'a [u8],
    ) -> CudaResult<HostRegistration<'a>> {
        dev.bind()?;
        let ptr = range.as_ptr() as *mut u8;
        // SAFETY: the range is borrowed for 'a, so it outlives the registration; READ_ONLY means the
        // device never writes through it.
        check("registering host memory", unsafe {
            sys::cuMemHostRegister_v2(
                ptr as *mut _,
                range.len(),
                sys::CU_MEMHOSTREGISTER_READ_ONLY | sys::CU_MEMHOSTREGISTER_PORTABLE,
            )
        })?;
        Ok(HostRegistration {
            ptr,
            len: range.len(),
            _borrow: PhantomData,
        })
    }

    /// Registers `len` bytes at `ptr` read-only, for as long as the returned value lives.
    ///
    /// # Safety
    /// The range must stay mapped (and its pages must not be registered already) until the
    /// registration is dropped: the caller holds what keeps it mapped for longer.
    pub unsafe fn register_read_only_raw(
        dev: &GpuDevice,
        ptr: *const u8,
        len: usize,
    ) -> CudaResult<HostRegistration<'static>> {
        dev.bind()?;
        check(
            "registering host memory",
            sys::cuMemHostRegister_v2(
                ptr as *mut _,
                len,
                sys::CU_MEMHOSTREGISTER_READ_ONLY | sys::CU_MEMHOSTREGISTER_PORTABLE,
            ),
        )?;
        Ok(HostRegistration {
            ptr: ptr as *mut u8,
            len,
            _borrow: PhantomData,
        })
    }

    /// Host address of the registered range.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for HostRegistration<'_> {
    fn drop(&mut self) {
        // SAFETY: ptr was registered by us and is unregistered once.
        unsafe {
            let _ = sys::cuMemHostUnregister(self.ptr as *mut _);
        }
    }
}
