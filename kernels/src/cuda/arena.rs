//! The VRAM arena: one hard budget for everything this process puts on the GPU, divided into
//! regions (weights, KV cache, scratch, library workspace). Each region is one device allocation
//! made when the region is created; buffers are carved out of it first-fit. Exceeding the budget
//! or a region is an error that names what did not fit.

use super::error::{check, fmt_bytes, CudaError, CudaResult};
use cudarc::driver::sys;

/// Alignment of every buffer inside a region (enough for 16-byte vector loads and cuBLAS).
pub const ALIGN: u64 = 256;

/// What a region holds; used for reports and for the planner's VRAM bill.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RegionKind {
    /// Model weights resident on the GPU (and the streaming ring's slots).
    Weights,
    /// KV cache.
    Kv,
    /// Activations and temporaries of a program.
    Scratch,
    /// Library workspaces (cuBLAS).
    Workspace,
}

impl RegionKind {
    /// Short name for reports.
    pub fn as_str(self) -> &'static str {
        match self {
            RegionKind::Weights => "weights",
            RegionKind::Kv => "kv",
            RegionKind::Scratch => "scratch",
            RegionKind::Workspace => "workspace",
        }
    }
}

/// Index of a region in its arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RegionId(pub usize);

/// A buffer inside a region: a device address and its size. Plain data; give it back with
/// [`VramArena::free`] (or drop the whole region with [`VramArena::reset`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevBuf {
    /// Device address.
    pub ptr: u64,
    /// Usable bytes.
    pub bytes: u64,
    region: RegionId,
    offset: u64,
    len: u64,
}

impl DevBuf {
    /// Device address `off` bytes in.
    pub fn at(&self, off: u64) -> u64 {
        debug_assert!(off <= self.bytes);
        self.ptr + off
    }

    /// The region this buffer lives in.
    pub fn region(&self) -> RegionId {
        self.region
    }
}

#[derive(Debug)]
struct Region {
    kind: RegionKind,
    name: String,
    base: u64,
    capacity: u64,
    /// Free extents (offset, len), sorted by offset, coalesced.
    free: Vec<(u64, u64)>,
    used: u64,
    peak: u64,
    live: usize,
    /// Not backed by device memory (unit tests of the allocator).
    fake: bool,
}

/// Usage of one region, for reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionReport {
    /// Region kind.
    pub kind: RegionKind,
    /// Region name.
    pub name: String,
    /// Bytes reserved on the device.
    pub capacity: u64,
    /// Bytes in live buffers.
    pub used: u64,
    /// Highest `used` seen.
    pub peak: u64,
    /// Live buffers.
    pub live: usize,
}

/// The arena. It must be used with its CUDA context current on the calling thread
/// (`GpuDevice` does that); dropping it frees every region.
#[derive(Debug)]
pub struct VramArena {
    budget: u64,
    reserved: u64,
    regions: Vec<Option<Region>>,
}

fn align_up(x: u64) -> u64 {
    x.div_ceil(ALIGN) * ALIGN
}

impl VramArena {
    /// An empty arena that will never hold more than `budget` bytes of regions.
    pub fn new(budget: u64) -> Self {
        VramArena {
            budget,
            reserved: 0,
            regions: Vec::new(),
        }
    }

    /// The hard budget in bytes.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Bytes reserved by all regions.
    pub fn reserved(&self) -> u64 {
        self.reserved
    }

    /// Bytes of the budget not yet reserved by a region.
    pub fn unreserved(&self) -> u64 {
        self.budget - self.reserved
    }

    /// Reserves a region of `bytes` on the device. Fails with [`CudaError::OutOfVram`] when the
    /// budget cannot hold it, or with a driver error when the device itself is out of memory.
    pub fn create_region(
        &mut self,
        kind: RegionKind,
        name: &str,
        bytes: u64,
    ) -> CudaResult<RegionId> {
        let bytes = align_up(bytes.max(ALIGN));
        if bytes > self.unreserved() {
            return Err(CudaError::OutOfVram {
                what: format!("{} region '{name}'", kind.as_str()),
                requested: bytes,
                available: self.unreserved(),
                limit: self.budget,
            });
        }
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: plain allocation into a local out-pointer; the caller keeps the context current.
        let r = unsafe { sys::cuMemAlloc_v2(&mut ptr, bytes as usize) };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(CudaError::Driver {
                call: "allocating a VRAM region",
                err: format!(
                    "{r:?} for {} region '{name}' of {}",
                    kind.as_str(),
                    fmt_bytes(bytes)
                ),
            });
        }
        Ok(self.add_region(kind, name, ptr, bytes, false))
    }

    /// A region that no device allocation backs, at address `base` (which the caller's memory
    /// stands behind): the host device's VRAM, held to the same budget and alignment rules, and
    /// the allocator's own tests.
    pub fn create_host_region(
        &mut self,
        kind: RegionKind,
        name: &str,
        bytes: u64,
        base: u64,
    ) -> CudaResult<RegionId> {
        let bytes = align_up(bytes.max(ALIGN));
        if bytes > self.unreserved() {
            return Err(CudaError::OutOfVram {
                what: format!("{} region '{name}'", kind.as_str()),
                requested: bytes,
                available: self.unreserved(),
                limit: self.budget,
            });
        }
        Ok(self.add_region(kind, name, base, bytes, true))
    }

    fn add_region(
        &mut self,
        kind: RegionKind,
        name: &str,
        base: u64,
        bytes: u64,
        fake: bool,
    ) -> RegionId {
        self.reserved += bytes;
        let region = Region {
            kind,
            name: name.to_string(),
            base,
            capacity: bytes,
            free: vec![(0, bytes)],
            used: 0,
            peak: 0,
            live: 0,
            fake,
        };
        if let Some(i) = self.regions.iter().position(|r| r.is_none()) {
            self.regions[i] = Some(region);
            RegionId(i)
        } else {
            self.regions.push(Some(region));
            RegionId(self.regions.len() - 1)
        }
    }

    /// Frees a region and every buffer in it, returning its bytes to the budget.
    pub fn destroy_region(&mut self, id: RegionId) -> CudaResult<()> {
        let r = self
            .regions
            .get_mut(id.0)
            .and_then(|r| r.take())
            .ok_or_else(|| CudaError::Invalid(format!("no VRAM region {}", id.0)))?;
        self.reserved -= r.capacity;
        if r.fake {
            return Ok(());
        }
        // SAFETY: `base` came from cuMemAlloc and is freed once (the region was just taken out).
        check("freeing a VRAM region", unsafe {
            sys::cuMemFree_v2(r.base)
        })
    }

    fn region_mut(&mut self, id: RegionId) -> CudaResult<&mut Region> {
        self.regions
            .get_mut(id.0)
            .and_then(|r| r.as_mut())
            .ok_or_else(|| CudaError::Invalid(format!("no VRAM region {}", id.0)))
    }

    /// Carves `bytes` out of region `id`; `what` names the buffer in the error if it does not fit.
    pub fn alloc(&mut self, id: RegionId, bytes: u64, what: &str) -> CudaResult<DevBuf> {
        let budget = self.budget;
        let r = self.region_mut(id)?;
        let len = align_up(bytes.max(1));
        let Some(i) = r.free.iter().position(|&(_, l)| l >= len) else {
            let largest = r.free.iter().map(|f| f.1).max().unwrap_or(0);
            return Err(CudaError::OutOfVram {
                what: format!("{} region '{}': {what}", r.kind.as_str(), r.name),
                requested: bytes,
                available: largest,
                limit: r.capacity.min(budget),
            });
        };
        let (off, flen) = r.free[i];
        if flen == len {
            r.free.remove(i);
        } else {
            r.free[i] = (off + len, flen - len);
        }
        r.used += len;
        r.peak = r.peak.max(r.used);
        r.live += 1;
        Ok(DevBuf {
            ptr: r.base + off,
            bytes,
            region: id,
            offset: off,
            len,
        })
    }

    /// Returns a buffer to its region.
    pub fn free(&mut self, buf: DevBuf) -> CudaResult<()> {
        let r = self.region_mut(buf.region)?;
        if buf.offset + buf.len > r.capacity
            || r.free
                .iter()
                .any(|&(o, l)| buf.offset < o + l && o < buf.offset + buf.len)
        {
            return Err(CudaError::Invalid(format!(
                "freeing a buffer at offset {} that is not live in region '{}'",
                buf.offset, r.name
            )));
        }
        let pos = r.free.partition_point(|&(o, _)| o < buf.offset);
        r.free.insert(pos, (buf.offset, buf.len));
        // Coalesce with the neighbours.
        if pos + 1 < r.free.len() && r.free[pos].0 + r.free[pos].1 == r.free[pos + 1].0 {
            r.free[pos].1 += r.free[pos + 1].1;
            r.free.remove(pos + 1);
        }
        if pos > 0 && r.free[pos - 1].0 + r.free[pos - 1].1 == r.free[pos].0 {
            r.free[pos - 1].1 += r.free[pos].1;
            r.free.remove(pos);
        }
        r.used -= buf.len;
        r.live -= 1;
        Ok(())
    }

    /// Forgets every buffer of a region (its memory stays reserved).
    pub fn reset(&mut self, id: RegionId) -> CudaResult<()> {
        let r = self.region_mut(id)?;
        r.free = vec![(0, r.capacity)];
        r.used = 0;
        r.live = 0;
        Ok(())
    }

    /// Usage of every region.
    pub fn report(&self) -> Vec<RegionReport> {
        self.regions
            .iter()
            .flatten()
            .map(|r| RegionReport {
                kind: r.kind,
                name: r.name.clone(),
                capacity: r.capacity,
                used: r.used,
                peak: r.peak,
                live: r.live,
            })
            .collect()
    }

    /// Frees every region (called by the device before its context goes away).
    pub(crate) fn release_all(&mut self) {
        for r in self.regions.iter_mut() {
            if let Some(r) = r.take().filter(|r| !r.fake) {
                // SAFETY: each region's base is freed exactly once, here or in destroy_region.
                unsafe {
                    let _ = sys::cuMemFree_v2(r.base);
                }
            }
        }
        self.reserved = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl VramArena {
        fn fake_region(
            &mut self,
            kind: RegionKind,
            name: &str,
            bytes: u64,
        ) -> CudaResult<RegionId> {
            self.create_host_region(kind, name, bytes, 1 << 40)
        }
    }

    #[test]
    fn budget_and_regions_are_enforced_with_names() {
        let mut a = VramArena::new(10 << 20);
        let w = a
            .fake_region(RegionKind::Weights, "weights", 6 << 20)
            .unwrap();
        match a.fake_region(RegionKind::Kv, "kv", 5 << 20) {
            Err(e @ CudaError::OutOfVram { .. }) => {
                assert!(e.to_string().contains("kv region 'kv'"), "{e}")
            }
            other => panic!("expected OutOfVram, got {other:?}"),
        }
        let b1 = a.alloc(w, 4 << 20, "blk.0.ffn_up.weight").unwrap();
        match a.alloc(w, 3 << 20, "blk.0.ffn_down.weight") {
            Err(e) => assert!(e.to_string().contains("blk.0.ffn_down.weight"), "{e}"),
            Ok(_) => panic!("allocation beyond the region succeeded"),
        }
        let b2 = a.alloc(w, 1000, "small").unwrap();
        assert_eq!(b2.ptr % ALIGN, 0);
        assert!(b2.ptr >= b1.ptr + (4 << 20));
        a.free(b1).unwrap();
        assert!(a.free(b1).is_err(), "double free accepted");
        a.free(b2).unwrap();
        // Freed extents coalesce: the whole region fits again.
        let all = a.alloc(w, 6 << 20, "all").unwrap();
        assert_eq!(a.report()[0].used, 6 << 20);
        assert_eq!(a.report()[0].peak, 6 << 20);
        a.free(all).unwrap();
        a.destroy_region(w).unwrap();
        assert_eq!(a.reserved(), 0);
        let kv = a.fake_region(RegionKind::Kv, "kv", 9 << 20).unwrap();
        a.alloc(kv, 9 << 20, "cache").unwrap();
        a.reset(kv).unwrap();
        a.alloc(kv, 9 << 20, "cache again").unwrap();
    }
}
