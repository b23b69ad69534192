//! The device itself: the arena budget, pinned and registered copies, the NVRTC cache, the probe
//! and the type geometry.

use super::*;

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_arena_budget_is_enforced_and_named() {
    let Some(c) = ctx("cuda_arena_budget_is_enforced_and_named") else {
        return;
    };
    let dev = &c.gpu.dev;
    let left = dev.arena().unwrap().unreserved();
    match dev.create_region(RegionKind::Weights, "too-big", left + (1 << 20)) {
        Err(CudaError::OutOfVram { what, .. }) => assert!(what.contains("too-big"), "{what}"),
        other => panic!("expected OutOfVram, got {other:?}"),
    }
    let reg = dev.create_region(RegionKind::Kv, "small", 1 << 20).unwrap();
    let a = dev.alloc(reg, 600 << 10, "first").unwrap();
    match dev.alloc(reg, 600 << 10, "blk.0.attn_k cache") {
        Err(e @ CudaError::OutOfVram { .. }) => {
            assert!(e.to_string().contains("blk.0.attn_k cache"), "{e}")
        }
        other => panic!("expected OutOfVram, got {other:?}"),
    }
    dev.free(a).unwrap();
    // After freeing, the whole region is one extent again.
    let b = dev.alloc(reg, 1 << 20, "whole").unwrap();
    dev.free(b).unwrap();
    dev.arena().unwrap().destroy_region(reg).unwrap();
    eprintln!("vram report: {:?}", dev.vram_report().unwrap());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_pinned_and_registered_async_copies() {
    let Some(c) = ctx("cuda_pinned_and_registered_async_copies") else {
        return;
    };
    let dev = &c.gpu.dev;
    let n = 8 << 20;
    let mut pin = PinnedBuf::new(dev, n).unwrap();
    for (i, b) in pin.as_mut_slice().iter_mut().enumerate() {
        *b = (i * 7 + 3) as u8;
    }
    let d = c.alloc(n);
    let copy = dev.copy_stream().clone();
    let ev = dev.event(true).unwrap();
    // SAFETY (test): the pinned buffer outlives the copy; we synchronise on the event below.
    unsafe { dev.upload_async(&copy, d.ptr, pin.as_ptr(), n).unwrap() };
    ev.record(&copy).unwrap();
    dev.compute_stream().wait(&ev).unwrap();
    let mut back = PinnedBuf::new(dev, n).unwrap();
    // SAFETY (test): `back` is untouched until the stream is synchronised.
    unsafe {
        dev.download_async(dev.compute_stream(), back.as_mut_ptr(), d.ptr, n)
            .unwrap()
    };
    dev.compute_stream().synchronize().unwrap();
    assert!(
        back.as_slice() == pin.as_slice(),
        "pinned round trip differs"
    );

    // Register an existing page-aligned host range read-only and copy from it.
    let layout = std::alloc::Layout::from_size_align(n, 4096).unwrap();
    // SAFETY (test): a fresh allocation of n bytes, freed below after the registration is dropped.
    let raw = unsafe { std::alloc::alloc_zeroed(layout) };
    assert!(!raw.is_null());
    // SAFETY (test): raw holds n initialised (zeroed) bytes.
    let host = unsafe { std::slice::from_raw_parts_mut(raw, n) };
    for (i, b) in host.iter_mut().enumerate() {
        *b = (i * 13 + 1) as u8;
    }
    {
        let reg = HostRegistration::register_read_only(dev, host).unwrap();
        // SAFETY (test): the registered range outlives the copy (synchronised before drop).
        unsafe { dev.upload_async(&copy, d.ptr, reg.as_ptr(), n).unwrap() };
        copy.synchronize().unwrap();
    }
    let got = c.down_bytes(d.ptr, n);
    assert!(got == host, "registered copy differs");
    // SAFETY (test): allocated above with the same layout.
    unsafe { std::alloc::dealloc(raw, layout) };
    c.free(&[d]);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_nvrtc_second_load_is_a_cache_hit() {
    let Some(c) = ctx("cuda_nvrtc_second_load_is_a_cache_hit") else {
        return;
    };
    let dir = pshard_kernels::cuda::nvrtc::default_cache_dir();
    let again = pshard_kernels::cuda::CudaKernels::load(&c.gpu.dev, &dir).unwrap();
    eprintln!("second load: {}", again.build_summary());
    assert!(
        again.all_cached(),
        "second load compiled: {:?}",
        again.builds()
    );
    assert!(again.len() > 100, "only {} kernels", again.len());
}

#[test]
fn cuda_probe_never_panics() {
    // Runs everywhere: without CUDA it must be a clean error naming the missing library.
    match pshard_kernels::cuda::probe(0) {
        Ok(s) => eprintln!("probe: {} device(s)", s.count),
        Err(e) => eprintln!("probe: {e}"),
    }
    assert!(pshard_kernels::cuda::probe(999).is_err());
}

#[test]
fn cuda_type_geometry_covers_cpu_types() {
    for &ty in quant::SUPPORTED {
        assert!(type_geom(ty).is_some(), "{ty:?} has no CUDA decoder");
    }
}
