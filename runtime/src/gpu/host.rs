//! Page-locked host memory as the engine's [`HostMem`]: staging buffers, inputs and the host copies
//! of KV, which the copy engines read and write asynchronously.

use std::any::Any;

use pshard_kernels::cuda::PinnedBuf;

use crate::device::HostMem;

/// A pinned buffer shared between the CPU lane and the device's copies.
pub struct PinnedMem {
    buf: PinnedBuf,
}

impl PinnedMem {
    /// Wraps a pinned buffer.
    pub fn new(buf: PinnedBuf) -> PinnedMem {
        PinnedMem { buf }
    }

    /// The host address copies use.
    pub fn ptr(&self) -> *mut u8 {
        self.buf.as_ptr() as *mut u8
    }
}

impl HostMem for PinnedMem {
    fn len(&self) -> usize {
        self.buf.len()
    }

    fn read(&self, f: &mut dyn FnMut(&[u8])) {
        f(self.buf.as_slice())
    }

    fn write(&self, f: &mut dyn FnMut(&mut [u8])) {
        // SAFETY: the engine touches a host buffer from the CPU only when no device copy that
        // reads or writes it is in flight (its steps wait for the events of those copies), and
        // only from its one issuing thread, so this is the only access while `f` runs.
        let bytes = unsafe { std::slice::from_raw_parts_mut(self.ptr(), self.buf.len()) };
        f(bytes)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
