//! AMX int8 tiles for the GEMM's 16-row tiles: 16 tokens at a time, on CPUs that have AMX-INT8
//! and an OS that grants this process the tile data.
//!
//! One `tdpbsud` multiplies a tile of 16 tokens' int8 activations (rows of the activation buffer,
//! one sub-block of 16 or 32 bytes each) with the VNNI tile's interleaved weights of one
//! sub-block — the GEMM's tile layout *is* AMX's B layout: group `g` of 4 elements holds the 4
//! bytes of each of the 16 rows side by side — into 16 × 16 exact i32 sums (token × row). Those
//! are the integer sums the VNNI kernel forms with 8 `vpdpbusd` per token and block, so the f32
//! steps that follow, token by token and sub-block by sub-block in the order of
//! [`super::dot_converted`] (seed added, `fma(f32(I), scale · d, acc)`, the minimum's `fma`), give
//! the same bits as every other path. Only those f32 steps stay on the vector units: per token
//! and block of 32 about 5 vector operations instead of 13.
//!
//! It is off unless [`AMX_ENV`] turns it on: on the 16-core Xeon host of the lent H100 machine
//! (AMX granted; 2026-12-05, `scripts/cpu-peer-bench.sh`) pshard's pp512 was 184–189 t/s with
//! it and 192–198 without on llama3-8b q4_k, 249–257 and 273–278 on qwen3-30b-a3b. The f32
//! steps, whose order batch invariance fixes, stay per token and sub-block on the vector units
//! either way, and the sums' round trip through memory (`tilestored`, then vector loads) costs
//! what the 8 `vpdpbusd` per token and block saved.
//!
//! Tiles are configured per thread (`ldtilecfg`) for one matmul at a time ([`Tiles`]) and
//! released when it ends. Linux hands a process the tile data only on request
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM)`); a CPU can report AMX and still fault on the first tile
//! instruction where the request was not made or the hypervisor does not pass the state on, so
//! [`status`] checks the CPU, the OS's XCR0 bits and the request before anything runs.

use std::arch::asm;
use std::arch::x86_64::*;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::OnceLock;

use super::x86::{with_flags, Tok};
use super::{Converter, GemmActs, Tile};
use crate::quant::{simd_cap, SimdLevel};

/// Environment variable turning the AMX kernel on (`1` or `on`; off otherwise): it gives the same
/// bits as the VNNI kernel but, measured, no speed (module notes).
pub const AMX_ENV: &str = "PSHARD_CPU_AMX";

/// Tokens per AMX step (the tile's rows).
pub const TOKENS: usize = 16;

/// Whether the CPU and OS have AMX-INT8 tiles for this process, or why not (probed once per
/// process; the first call asks Linux for the tile data, see the module notes).
pub fn status() -> Result<(), &'static str> {
    static STATUS: OnceLock<Result<(), &'static str>> = OnceLock::new();
    *STATUS.get_or_init(|| hardware().and_then(|()| request_tile_data()))
}

/// Whether the GEMM takes steps of 16 tokens on AMX tiles: [`status`] allows it and
/// [`AMX_ENV`] or [`set_enabled`] turned it on.
pub fn enabled() -> bool {
    match ENABLED.load(Ordering::Relaxed) {
        UNSET => {
            let on = std::env::var(AMX_ENV).is_ok_and(|v| matches!(v.trim(), "1" | "on"))
                && status().is_ok();
            ENABLED.store(if on { ON } else { OFF }, Ordering::Relaxed);
            on
        }
        v => v == ON,
    }
}

/// Turns the AMX kernel on or off for this process (tests and benchmarks; outputs are the same
/// bits either way, so matmuls running meanwhile stay correct).
///
/// # Errors
/// Turning it on where [`status`] says AMX cannot run: the reason.
pub fn set_enabled(on: bool) -> Result<(), &'static str> {
    if on {
        status()?;
    }
    ENABLED.store(if on { ON } else { OFF }, Ordering::Relaxed);
    Ok(())
}

/// The state of [`enabled`]: not read from the environment yet, off, on.
const UNSET: u8 = 0;
const OFF: u8 = 1;
const ON: u8 = 2;
static ENABLED: AtomicU8 = AtomicU8::new(UNSET);

/// One line for reports: on, available but off, or why not.
pub fn describe() -> String {
    if enabled() {
        "AMX int8 tiles on".to_string()
    } else {
        match hardware() {
            Ok(()) => format!("AMX available, off ({AMX_ENV}=1 turns it on)"),
            Err(why) => format!("AMX off: {why}"),
        }
    }
}

/// How many times a thread's tiles were configured for a matmul in this process (tests check
/// that the tiles ran).
pub fn configured() -> u64 {
    CONFIGURED.load(Ordering::Relaxed)
}

static CONFIGURED: AtomicU64 = AtomicU64::new(0);

/// The CPU's and the OS's side of [`status`], without asking for the tile data.
fn hardware() -> Result<(), &'static str> {
    static HW: OnceLock<Result<(), &'static str>> = OnceLock::new();
    *HW.get_or_init(probe_hardware)
}

fn probe_hardware() -> Result<(), &'static str> {
    if simd_cap() != SimdLevel::Avx512 || !SimdLevel::Avx512.available() {
        return Err("needs the AVX-512 VNNI level");
    }
    if __cpuid(0).eax < 7 {
        return Err("the CPU has no AMX (no cpuid leaf 7)");
    }
    let (leaf1, leaf7) = (__cpuid(1), __cpuid_count(7, 0));
    // Leaf 7: edx bit 24 AMX-TILE, bit 25 AMX-INT8.
    if leaf7.edx >> 24 & 3 != 3 {
        return Err("the CPU has no AMX-INT8");
    }
    // Leaf 1: ecx bit 27 OSXSAVE (xgetbv usable).
    if leaf1.ecx >> 27 & 1 == 0 {
        return Err("the OS has not enabled XSAVE");
    }
    // SAFETY: OSXSAVE is set, so xgetbv(0) reads XCR0.
    let xcr0 = unsafe { xcr0() };
    // XCR0 bits 17 (XTILECFG) and 18 (XTILEDATA): the OS manages the tile state.
    if xcr0 >> 17 & 3 != 3 {
        return Err("the OS does not manage the AMX tile state (XCR0)");
    }
    Ok(())
}

/// XCR0.
///
/// # Safety
/// The CPU has XSAVE and the OS enabled it (CPUID.1:ECX.OSXSAVE).
#[target_feature(enable = "xsave")]
unsafe fn xcr0() -> u64 {
    // SAFETY: the caller checked OSXSAVE.
    unsafe { _xgetbv(0) }
}

/// Asks Linux for this process's permission to use the tile data (`ARCH_REQ_XCOMP_PERM`,
/// XFEATURE 18); without it the first tile instruction raises SIGILL.
#[cfg(target_os = "linux")]
fn request_tile_data() -> Result<(), &'static str> {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only changes the process's permitted xsave
    // features; it reads and writes no memory of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err("the kernel refused the AMX tile data (arch_prctl ARCH_REQ_XCOMP_PERM)")
    }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_data() -> Result<(), &'static str> {
    Err("AMX is used on Linux only")
}

/// The 64-byte tile configuration of `ldtilecfg` (palette 1).
#[repr(C, align(64))]
struct Config {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    /// Bytes per row of tiles 0..8 (the rest must be 0).
    colsb: [u16; 16],
    /// Rows of tiles 0..8 (the rest must be 0).
    rows: [u8; 16],
}

/// This thread's tiles configured for sub-blocks of `per` elements (16 or 32) for as long as the
/// value lives; released when dropped. Tiles 0 and 1: 16 × 16 i32 sums (token × row); tiles 2
/// and 4: 16 tokens × `per` activation bytes; tiles 3 and 5: `per / 4` groups × 16 rows × 4
/// weight bytes. Even sub-blocks use 0, 2, 3, odd ones 1, 4, 5, so two can be in flight.
pub(crate) struct Tiles {
    per: usize,
}

impl Tiles {
    /// Configures this thread's tiles for sub-blocks of `per` elements.
    ///
    /// # Panics
    /// If AMX cannot run here ([`status`]) or `per` is not 16 or 32.
    pub(crate) fn configure(per: usize) -> Tiles {
        if let Err(why) = status() {
            panic!("the AMX kernel needs AMX: {why}");
        }
        assert!(per == 16 || per == 32, "sub-blocks of 16 or 32, not {per}");
        let mut cfg = Config {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        for (t, (rows, colsb)) in [
            (16, 64),
            (16, 64),
            (16, per),
            (per / 4, 64),
            (16, per),
            (per / 4, 64),
        ]
        .into_iter()
        .enumerate()
        {
            cfg.rows[t] = rows as u8;
            cfg.colsb[t] = colsb as u16;
        }
        // SAFETY: AMX is available and granted (checked above); `cfg` is a valid palette-1
        // configuration (shapes within 16 rows × 64 bytes, reserved bytes zero), 64-byte aligned.
        unsafe { asm!("ldtilecfg [{}]", in(reg) &cfg, options(nostack, readonly)) };
        CONFIGURED.fetch_add(1, Ordering::Relaxed);
        Tiles { per }
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: this thread's tiles were configured by `configure` (AMX available).
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// The i32 sums of one chunk: sub-block `s`, token `j`, row `k` at `(s · 16 + j) · 16 + k`.
#[repr(C, align(64))]
struct Sums([i32; 32 * 256]);

/// Adds the products of the 16-row `tile` with tokens `t0 .. t0 + 16` over the chunk's blocks
/// (the chunk starts at activation block `blk0`) to `acc[j][k]` (token `t0 + j`, row `k`), in the
/// order of [`super::dot_converted`]: the same bits as the VNNI kernel.
///
/// # Panics
/// If `tiles` were configured for another sub-block size, the tile is not a 16-row tile of
/// unsigned levels, `acc` does not hold 16 tokens or the shapes disagree.
pub(crate) fn tile_dot16(
    tiles: &Tiles,
    conv: &Converter,
    tile: &Tile,
    acts: &GemmActs,
    blk0: usize,
    t0: usize,
    acc: &mut [[f32; 16]],
) {
    let (sub16, min) = (conv.sub16, conv.min);
    let per = conv.sub();
    assert_eq!(
        tiles.per, per,
        "tiles configured for another sub-block size"
    );
    assert_eq!(tile.r, 16, "the AMX kernel takes 16-row tiles");
    assert_eq!(acc.len(), TOKENS, "the AMX kernel takes 16 tokens");
    assert!(
        t0 + TOKENS <= acts.n_rows && (blk0 + tile.nb) * super::QB <= acts.cols,
        "bad token or block range"
    );
    assert_eq!(tile.q.len(), 16 * tile.nb * super::QB, "tile shape");
    let nsub = tile.nb * super::QB / per;
    assert!(nsub <= 32, "a chunk holds at most 32 sub-blocks");
    let seed = !acts.seed.is_empty();
    // SAFETY: AMX and AVX-512 VNNI are available (the tiles exist); the shapes are asserted
    // above: tile.q holds nsub sub-blocks of 16 rows, tokens t0..t0+16 and the chunk's blocks
    // exist in acts, with sums and seeds where the flags read them.
    unsafe {
        macro_rules! chunk {
            ($s:tt, $m:tt, $e:tt) => {
                chunk::<$s, $m, $e>(tile, acts, blk0, t0, nsub, acc)
            };
        }
        with_flags!((sub16, min, seed), chunk)
    }
}

/// The integer sums of sub-blocks `s` and `s + 1` (if `pair`) into `sums`, on tiles 0, 2, 3 and
/// 1, 4, 5.
///
/// # Safety
/// Tiles configured for sub-blocks of `per` elements; `a` points at 16 activation rows of stride
/// `stride` with `2 · per` bytes (`per` without `pair`) from it, `w` at the sub-blocks' `per · 16`
/// weight bytes each, `c` at 256 (512 with `pair`) writable i32.
#[inline(always)]
unsafe fn sums_pair(
    a: *const i8,
    stride: usize,
    w: *const u8,
    c: *mut i32,
    per: usize,
    pair: bool,
) {
    // SAFETY: the caller's pointers and tile configuration.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tileloadd tmm2, [{a} + {sa}*1]",
            "tileloadd tmm3, [{w} + {sw}*1]",
            "tdpbsud tmm0, tmm2, tmm3",
            "tilestored [{c} + {sw}*1], tmm0",
            a = in(reg) a,
            sa = in(reg) stride,
            w = in(reg) w,
            sw = in(reg) 64usize,
            c = in(reg) c,
            options(nostack),
        );
        if pair {
            asm!(
                "tilezero tmm1",
                "tileloadd tmm4, [{a} + {sa}*1]",
                "tileloadd tmm5, [{w} + {sw}*1]",
                "tdpbsud tmm1, tmm4, tmm5",
                "tilestored [{c} + {sw}*1], tmm1",
                a = in(reg) a.add(per),
                sa = in(reg) stride,
                w = in(reg) w.add(per * 16),
                sw = in(reg) 64usize,
                c = in(reg) c.add(256),
                options(nostack),
            );
        }
    }
}

/// One chunk for 16 tokens: the integer sums of each pair of sub-blocks on the tiles, the f32
/// steps of the pair before run while the next pair's sums are formed.
///
/// # Safety
/// As for [`tile_dot16`]'s checks, with AMX configured for this sub-block size.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
unsafe fn chunk<const SUB16: bool, const MIN: bool, const SEED: bool>(
    tile: &Tile,
    acts: &GemmActs,
    blk0: usize,
    t0: usize,
    nsub: usize,
    acc: &mut [[f32; 16]],
) {
    const R: usize = 16;
    let per = if SUB16 { 16 } else { 32 };
    let toks = Tok::several::<TOKENS>(acts, blk0, t0, SUB16);
    let mut sums = MaybeUninit::<Sums>::uninit();
    let sp = sums.as_mut_ptr().cast::<i32>();
    let a0 = toks[0].q;
    let wq = tile.q.as_ptr();
    let mut f: [__m512; TOKENS] = std::array::from_fn(|j| {
        // SAFETY: acc[j] is 16 f32.
        unsafe { _mm512_loadu_ps(acc[j].as_ptr()) }
    });
    let npairs = nsub.div_ceil(2);
    for p in 0..=npairs {
        if p < npairs {
            let s = 2 * p;
            // SAFETY: sub-blocks s (and s + 1 when it exists) lie in the chunk: their activation
            // bytes in each token's row, their weight bytes in tile.q, their sums in `sums`.
            unsafe {
                sums_pair(
                    a0.add(s * per),
                    acts.cols,
                    wq.add(s * per * 16),
                    sp.add(s * 256),
                    per,
                    s + 1 < nsub,
                );
            }
        }
        if p == 0 {
            continue;
        }
        // The f32 steps of the previous pair, sub-block by sub-block in order.
        for s in 2 * (p - 1)..(2 * p).min(nsub) {
            // SAFETY: sums of sub-block s were written by `sums_pair` above; the tile has scales
            // (and minima) for its nsub sub-blocks; each token has block s·per/32, sum s and
            // seed s from its pointers.
            unsafe {
                let k = _mm512_loadu_ps(tile.scale.as_ptr().add(s * R));
                let m = if MIN {
                    _mm512_loadu_ps(tile.min.as_ptr().add(s * R))
                } else {
                    _mm512_setzero_ps()
                };
                let b = s * per / super::QB;
                for j in 0..TOKENS {
                    let t = toks[j];
                    let mut i = _mm512_load_si512(sp.add((s * TOKENS + j) * R).cast());
                    if SEED {
                        i = _mm512_add_epi32(i, _mm512_set1_epi32(*t.seed.add(s)));
                    }
                    let da = _mm512_set1_ps(*t.d.add(b));
                    f[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), _mm512_mul_ps(k, da), f[j]);
                    if MIN {
                        f[j] = _mm512_fmadd_ps(m, _mm512_set1_ps(*t.sa.add(s)), f[j]);
                    }
                }
            }
        }
    }
    for (o, v) in acc.iter_mut().zip(f) {
        // SAFETY: `o` is 16 writable f32.
        unsafe { _mm512_storeu_ps(o.as_mut_ptr(), v) };
    }
}
