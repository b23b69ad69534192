//! x86-64 kernels of the int8 GEMM: 16 rows × 8 tokens with AVX-512 VNNI, 8 rows × 8 tokens
//! with AVX2 (see the module above for the layouts).

use std::arch::x86_64::*;

use super::{GemmActs, Tile, QB};
use crate::quant::SimdLevel;

/// Tokens per kernel call.
const TN: usize = 8;

pub(super) fn tile_dot(
    level: SimdLevel,
    tile: &Tile,
    acts: &GemmActs,
    t0: usize,
    nt: usize,
    out: &mut [[f32; 16]; 8],
) {
    let (sub16, min) = (tile.subs == 2, tile.has_min);
    match (level, tile.r) {
        (SimdLevel::Avx512, 16) => {
            assert!(
                SimdLevel::Avx512.available(),
                "the VNNI GEMM kernel needs AVX-512 VNNI"
            );
            // SAFETY: AVX-512 F/BW/VL/VNNI and the AVX2 set were detected just above; the
            // pointers the kernel forms stay inside `tile` and `acts` (shapes asserted by the
            // caller: tile.q is 16 × cols, acts rows t0..t0 + nt exist).
            unsafe {
                match (sub16, min) {
                    (false, false) => vnni::<false, false>(tile, acts, t0, nt, out),
                    (false, true) => vnni::<false, true>(tile, acts, t0, nt, out),
                    (true, false) => vnni::<true, false>(tile, acts, t0, nt, out),
                    (true, true) => vnni::<true, true>(tile, acts, t0, nt, out),
                }
            }
        }
        (SimdLevel::Avx512 | SimdLevel::Avx2, 8) => {
            assert!(
                SimdLevel::Avx2.available(),
                "the AVX2 GEMM kernel needs AVX2"
            );
            // SAFETY: AVX2/FMA were detected just above; shapes as for the VNNI kernel with
            // 8-row tiles.
            unsafe {
                match (sub16, min) {
                    (false, false) => avx2::<false, false>(tile, acts, t0, nt, out),
                    (false, true) => avx2::<false, true>(tile, acts, t0, nt, out),
                    (true, false) => avx2::<true, false>(tile, acts, t0, nt, out),
                    (true, true) => avx2::<true, true>(tile, acts, t0, nt, out),
                }
            }
        }
        _ => panic!(
            "no int8 GEMM kernel for {level:?} with {}-row tiles",
            tile.r
        ),
    }
}

/// Pointers to the rows of tokens `t0..t0 + nt`, the last repeated up to [`TN`].
fn token_rows(acts: &GemmActs, t0: usize, nt: usize) -> ([*const u8; TN], [usize; TN]) {
    let nb = acts.cols / QB;
    let t = |j: usize| t0 + j.min(nt - 1);
    (
        std::array::from_fn(|j| acts.q[t(j) * acts.cols..].as_ptr()),
        std::array::from_fn(|j| t(j) * nb),
    )
}

/// # Safety
/// AVX-512 F/BW/VL/VNNI available; `tile` holds 16 rows of `acts.cols` elements; tokens
/// `t0..t0 + nt` exist in `acts`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
unsafe fn vnni<const SUB16: bool, const MIN: bool>(
    tile: &Tile,
    acts: &GemmActs,
    t0: usize,
    nt: usize,
    out: &mut [[f32; 16]; 8],
) {
    const R: usize = 16;
    let nb = acts.cols / QB;
    let (aq, ab) = token_rows(acts, t0, nt);
    let wq = tile.q.as_ptr().cast::<u8>();
    let mut f = [_mm512_setzero_ps(); TN];
    for b in 0..nb {
        // SAFETY (whole block): b < nb, so the weight groups (b·8 + g)·64 .. + 64 lie in the
        // 16 × cols tile, sub-block entries s·16 .. + 16 (s < nb·subs) in scale/corr, b·16 .. + 16
        // in min, token bytes b·32 .. + 32 in each token row and index ab[j] + b in d/sa.
        unsafe {
            let w: [__m512i; 8] =
                std::array::from_fn(|g| _mm512_loadu_si512(wq.add((b * 8 + g) * 64).cast()));
            let s0 = if SUB16 { 2 * b } else { b };
            let c0 = _mm512_loadu_si512(tile.corr.as_ptr().add(s0 * R).cast());
            let k0 = _mm512_loadu_ps(tile.scale.as_ptr().add(s0 * R));
            let (c1, k1) = if SUB16 {
                (
                    _mm512_loadu_si512(tile.corr.as_ptr().add((s0 + 1) * R).cast()),
                    _mm512_loadu_ps(tile.scale.as_ptr().add((s0 + 1) * R)),
                )
            } else {
                (c0, k0)
            };
            let mn = if MIN {
                _mm512_loadu_ps(tile.min.as_ptr().add(b * R))
            } else {
                _mm512_setzero_ps()
            };
            for j in 0..TN {
                let ap = aq[j].add(b * QB);
                let a = |g: usize| _mm512_set1_epi32(ap.add(4 * g).cast::<i32>().read_unaligned());
                let da = _mm512_set1_ps(*acts.d.get_unchecked(ab[j] + b));
                if SUB16 {
                    let mut x = c0;
                    let mut y = c1;
                    for g in 0..4 {
                        x = _mm512_dpbusd_epi32(x, a(g), w[g]);
                        y = _mm512_dpbusd_epi32(y, a(g + 4), w[g + 4]);
                    }
                    f[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(x), _mm512_mul_ps(k0, da), f[j]);
                    f[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(y), _mm512_mul_ps(k1, da), f[j]);
                } else {
                    // Two chains of four, summed: shorter dependency chains.
                    let mut x = c0;
                    let mut y = _mm512_setzero_si512();
                    for g in 0..4 {
                        x = _mm512_dpbusd_epi32(x, a(g), w[g]);
                        y = _mm512_dpbusd_epi32(y, a(g + 4), w[g + 4]);
                    }
                    let s = _mm512_add_epi32(x, y);
                    f[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(k0, da), f[j]);
                }
                if MIN {
                    let sa = _mm512_set1_ps(*acts.sa.get_unchecked(ab[j] + b));
                    f[j] = _mm512_fmadd_ps(mn, sa, f[j]);
                }
            }
        }
    }
    for (o, v) in out.iter_mut().zip(f) {
        // SAFETY: `o` is 16 writable f32.
        unsafe { _mm512_storeu_ps(o.as_mut_ptr(), v) };
    }
}

/// # Safety
/// AVX2 and FMA available; `tile` holds 8 rows of `acts.cols` elements (no −128); tokens
/// `t0..t0 + nt` exist in `acts`, stored signed (not offset).
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2<const SUB16: bool, const MIN: bool>(
    tile: &Tile,
    acts: &GemmActs,
    t0: usize,
    nt: usize,
    out: &mut [[f32; 16]; 8],
) {
    const R: usize = 8;
    let nb = acts.cols / QB;
    let (aq, ab) = token_rows(acts, t0, nt);
    let wq = tile.q.as_ptr().cast::<u8>();
    let ones = _mm256_set1_epi16(1);
    let mut f = [_mm256_setzero_ps(); TN];
    for b in 0..nb {
        // SAFETY (whole block): as in the VNNI kernel, with 32-byte groups of 8 rows.
        unsafe {
            let s0 = if SUB16 { 2 * b } else { b };
            let k0 = _mm256_loadu_ps(tile.scale.as_ptr().add(s0 * R));
            let k1 = if SUB16 {
                _mm256_loadu_ps(tile.scale.as_ptr().add((s0 + 1) * R))
            } else {
                k0
            };
            let mn = if MIN {
                _mm256_loadu_ps(tile.min.as_ptr().add(b * R))
            } else {
                _mm256_setzero_ps()
            };
            for j in 0..TN {
                let ap = aq[j].add(b * QB);
                let group = |g: usize| {
                    let w = _mm256_loadu_si256(wq.add((b * 8 + g) * 32).cast());
                    let a = _mm256_set1_epi32(ap.add(4 * g).cast::<i32>().read_unaligned());
                    // |a| (Q8_K may hold −128: as unsigned 128) times w signed by a.
                    _mm256_madd_epi16(
                        _mm256_maddubs_epi16(_mm256_abs_epi8(a), _mm256_sign_epi8(w, a)),
                        ones,
                    )
                };
                let da = _mm256_set1_ps(*acts.d.get_unchecked(ab[j] + b));
                let x = _mm256_add_epi32(
                    _mm256_add_epi32(group(0), group(1)),
                    _mm256_add_epi32(group(2), group(3)),
                );
                let y = _mm256_add_epi32(
                    _mm256_add_epi32(group(4), group(5)),
                    _mm256_add_epi32(group(6), group(7)),
                );
                if SUB16 {
                    f[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(x), _mm256_mul_ps(k0, da), f[j]);
                    f[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(y), _mm256_mul_ps(k1, da), f[j]);
                } else {
                    let s = _mm256_add_epi32(x, y);
                    f[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(k0, da), f[j]);
                }
                if MIN {
                    let sa = _mm256_set1_ps(*acts.sa.get_unchecked(ab[j] + b));
                    f[j] = _mm256_fmadd_ps(mn, sa, f[j]);
                }
            }
        }
    }
    for (o, v) in out.iter_mut().zip(f) {
        // SAFETY: `o` holds 16 writable f32; 8 are written.
        unsafe { _mm256_storeu_ps(o.as_mut_ptr(), v) };
    }
}
