//! x86-64 converters of the K-quants (AVX2): the levels of 32 elements per register with shifts
//! and masks (16-bit shifts are masked to bits that stay within their byte), the factors from the
//! portable per-block code, so the output is the portable converter's bit for bit.
//!
//! The direct 16-row tile loaders (AVX-512, every K-quant) do the same on 16 rows at once, a row
//! per dword lane ([`rows16x4`]), and write each group of 4 levels straight into the VNNI tile
//! ([`put_group`]); the argument check and the store are shared with the legacy and lookup-table
//! loaders. Measured on a 256 × 4096 matrix in cache (docs/PERF.md): Q2_K/Q3_K decode 2–2.2×
//! faster than converting row-major and interleaving.
//!
//! The public wrappers are plain `fn`s so they fit [`ConvertFn`]; each re-checks the (cached)
//! feature flags, so calling one on a CPU without the features falls back to the portable
//! converter instead of executing unsupported instructions.

use std::arch::x86_64::*;

use pshard_model::ggml_type::GgmlType;

use super::{q2k, q3k, q4k, q5k, q6k, unpack_scales_mins_k4, QK_K};
use crate::gemm::x86::{
    f16_lanes, packed_tile_args, rows16x4, store16f, store64, FileRows, Rows16,
};
use crate::gemm::{ConvertFn, PackedTile16Fn, Tile16Fn};
use crate::quant::legacy::x86::has_avx2;
use crate::quant::SimdLevel;

/// The SIMD converter of `ty` if this CPU runs it.
pub(super) fn converter(ty: GgmlType) -> Option<ConvertFn> {
    if !has_avx2() {
        return None;
    }
    Some(match ty {
        GgmlType::Q2_K => convert_q2k,
        GgmlType::Q3_K => convert_q3k,
        GgmlType::Q4_K => convert_q4k,
        GgmlType::Q5_K => convert_q5k,
        GgmlType::Q6_K => convert_q6k,
        _ => return None,
    })
}

/// Unaligned 32-byte load of `b[off..off + 32]`.
#[inline]
#[target_feature(enable = "avx2")]
fn load(b: &[u8], off: usize) -> __m256i {
    let s: &[u8; 32] = b[off..off + 32].try_into().expect("32 bytes");
    // SAFETY: `s` is 32 readable bytes; the load is unaligned.
    unsafe { _mm256_loadu_si256(s.as_ptr().cast()) }
}

/// Unaligned 32-byte store to `u[off..off + 32]`.
#[inline]
#[target_feature(enable = "avx2")]
fn store(u: &mut [u8], off: usize, v: __m256i) {
    let d: &mut [u8; 32] = (&mut u[off..off + 32]).try_into().expect("32 bytes");
    // SAFETY: `d` is 32 writable bytes; the store is unaligned.
    unsafe { _mm256_storeu_si256(d.as_mut_ptr().cast(), v) }
}

/// Each byte of `v` shifted right by `k` (a 16-bit shift; the caller masks the bits that came
/// from the neighbouring byte).
#[inline]
#[target_feature(enable = "avx2")]
fn srl(v: __m256i, k: usize) -> __m256i {
    _mm256_srl_epi16(v, _mm_cvtsi32_si128(k as i32))
}

/// The f16 at `b[off..off + 2]` as f32 (F16C).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn f16c(b: &[u8], off: usize) -> f32 {
    let bits = u16::from_le_bytes([b[off], b[off + 1]]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// `out[j] = d · v[j]` for 8 small integers (`v` unsigned, or signed bytes if `signed`): the
/// portable factors' f32 products, 8 at a time.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn times8(out: &mut [f32], d: f32, v: &[u8], signed: bool) {
    let b = i64::from_le_bytes(v[..8].try_into().expect("8 factors"));
    let x = _mm_cvtsi64_si128(b);
    let i = if signed {
        _mm256_cvtepi8_epi32(x)
    } else {
        _mm256_cvtepu8_epi32(x)
    };
    let p = _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(i));
    let o: &mut [f32; 8] = (&mut out[..8]).try_into().expect("8 outputs");
    // SAFETY: `o` is 8 writable f32; unaligned store.
    unsafe { _mm256_storeu_ps(o.as_mut_ptr(), p) };
}

/// [`super::k4_factors`] with F16C and 8-wide products.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn k4_factors(b: &[u8], scales: &mut [f32], mins: &mut [f32]) {
    let (d, dmin) = (f16c(b, 0), f16c(b, 2));
    let (sc, mn) = unpack_scales_mins_k4(&b[4..16]);
    times8(scales, d, &sc, false);
    times8(mins, -dmin, &mn, false);
}

/// 16 signed sub-block factors `d · sc[j]` (Q3_K, Q6_K).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn signed16(scales: &mut [f32], d: f32, sc: &[u8]) {
    times8(&mut scales[..8], d, &sc[..8], true);
    times8(&mut scales[8..16], d, &sc[8..16], true);
}

/// The blocks of `src` covering `u`, each given to `f(block, index)`.
fn blocks<'a>(
    src: &'a [u8],
    u: &[u8],
    bytes: usize,
) -> impl Iterator<Item = (usize, &'a [u8])> + 'a {
    src.chunks_exact(bytes).take(u.len() / QK_K).enumerate()
}

#[target_feature(enable = "avx2,fma,f16c")]
fn q2k_avx2(src: &[u8], u: &mut [u8], scales: &mut [f32], mins: &mut [f32]) {
    let m3 = _mm256_set1_epi8(3);
    for (i, b) in blocks(src, u, q2k::BLOCK_BYTES) {
        // q2k::factors with F16C and 8-wide products.
        let (d, dmin) = (f16c(b, q2k::D), f16c(b, q2k::D + 2));
        let lo: [u8; 16] = std::array::from_fn(|j| b[j] & 15);
        let hi: [u8; 16] = std::array::from_fn(|j| b[j] >> 4);
        for h in 0..2 {
            times8(&mut scales[16 * i + 8 * h..], d, &lo[8 * h..], false);
            times8(&mut mins[16 * i + 8 * h..], -dmin, &hi[8 * h..], false);
        }
        for h in 0..2 {
            let q = load(b, 16 + 32 * h);
            for j in 0..4 {
                store(
                    u,
                    QK_K * i + 128 * h + 32 * j,
                    _mm256_and_si256(srl(q, 2 * j), m3),
                );
            }
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn q3k_avx2(src: &[u8], u: &mut [u8], scales: &mut [f32]) {
    let (m3, m1) = (_mm256_set1_epi8(3), _mm256_set1_epi8(1));
    for (i, b) in blocks(src, u, q3k::BLOCK_BYTES) {
        let sc = q3k::unpack_scales(&b[q3k::SC..q3k::SC + 12]).map(|v| v as u8);
        signed16(&mut scales[16 * i..], f16c(b, q3k::D), &sc);
        let hm = load(b, 0);
        for h in 0..2 {
            let q = load(b, 32 + 32 * h);
            for j in 0..4 {
                let low = _mm256_and_si256(srl(q, 2 * j), m3);
                let hb = _mm256_and_si256(srl(hm, 4 * h + j), m1);
                let v = _mm256_or_si256(low, _mm256_slli_epi16(hb, 2));
                store(u, QK_K * i + 128 * h + 32 * j, v);
            }
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn q4k_avx2(src: &[u8], u: &mut [u8], scales: &mut [f32], mins: &mut [f32]) {
    let m4 = _mm256_set1_epi8(0x0F);
    for (i, b) in blocks(src, u, q4k::BLOCK_BYTES) {
        k4_factors(
            b,
            &mut scales[8 * i..8 * i + 8],
            &mut mins[8 * i..8 * i + 8],
        );
        for c in 0..4 {
            let v = load(b, 16 + 32 * c);
            store(u, QK_K * i + 64 * c, _mm256_and_si256(v, m4));
            store(u, QK_K * i + 64 * c + 32, _mm256_and_si256(srl(v, 4), m4));
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn q5k_avx2(src: &[u8], u: &mut [u8], scales: &mut [f32], mins: &mut [f32]) {
    let (m4, m1) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(1));
    for (i, b) in blocks(src, u, q5k::BLOCK_BYTES) {
        k4_factors(
            b,
            &mut scales[8 * i..8 * i + 8],
            &mut mins[8 * i..8 * i + 8],
        );
        let qh = load(b, 16);
        for c in 0..4 {
            let v = load(b, 48 + 32 * c);
            let h0 = _mm256_slli_epi16(_mm256_and_si256(srl(qh, 2 * c), m1), 4);
            let h1 = _mm256_slli_epi16(_mm256_and_si256(srl(qh, 2 * c + 1), m1), 4);
            store(
                u,
                QK_K * i + 64 * c,
                _mm256_or_si256(_mm256_and_si256(v, m4), h0),
            );
            let hi = _mm256_and_si256(srl(v, 4), m4);
            store(u, QK_K * i + 64 * c + 32, _mm256_or_si256(hi, h1));
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn q6k_avx2(src: &[u8], u: &mut [u8], scales: &mut [f32]) {
    let (m4, m30) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
    for (i, b) in blocks(src, u, q6k::BLOCK_BYTES) {
        signed16(
            &mut scales[16 * i..],
            f16c(b, q6k::D),
            &b[q6k::SC..q6k::SC + 16],
        );
        for h in 0..2 {
            let (a, c) = (load(b, 64 * h), load(b, 64 * h + 32));
            let hq = load(b, 128 + 32 * h);
            let at = QK_K * i + 128 * h;
            let hi2 = |v: __m256i| _mm256_and_si256(v, m30);
            store(
                u,
                at,
                _mm256_or_si256(_mm256_and_si256(a, m4), hi2(_mm256_slli_epi16(hq, 4))),
            );
            store(
                u,
                at + 32,
                _mm256_or_si256(_mm256_and_si256(c, m4), hi2(_mm256_slli_epi16(hq, 2))),
            );
            store(
                u,
                at + 64,
                _mm256_or_si256(_mm256_and_si256(srl(a, 4), m4), hi2(hq)),
            );
            store(
                u,
                at + 96,
                _mm256_or_si256(_mm256_and_si256(srl(c, 4), m4), hi2(srl(hq, 2))),
            );
        }
    }
}

macro_rules! convert_fn {
    ($name:ident, $portable:path, |$s:ident, $u:ident, $sc:ident, $mn:ident| $simd:expr) => {
        fn $name($s: &[u8], $u: &mut [u8], $sc: &mut [f32], $mn: &mut [f32]) {
            if !has_avx2() {
                return $portable($s, $u, $sc, $mn);
            }
            // SAFETY: AVX2 (with FMA and F16C) was detected just above.
            unsafe { $simd }
        }
    };
}
convert_fn!(convert_q2k, q2k::convert, |s, u, sc, mn| q2k_avx2(
    s, u, sc, mn
));
convert_fn!(convert_q3k, q3k::convert, |s, u, sc, _mn| q3k_avx2(
    s, u, sc
));
convert_fn!(convert_q4k, q4k::convert, |s, u, sc, mn| q4k_avx2(
    s, u, sc, mn
));
convert_fn!(convert_q5k, q5k::convert, |s, u, sc, mn| q5k_avx2(
    s, u, sc, mn
));
convert_fn!(convert_q6k, q6k::convert, |s, u, sc, _mn| q6k_avx2(
    s, u, sc
));

/// An AVX-512 body of a K-quant tile loader: `nb` super-blocks of each row of `S` into the tile's
/// levels `q`, scales `scale` and (types with them) minima `min`.
type KBody<S> = unsafe fn(&S, usize, *mut u8, *mut f32, *mut f32);

/// What every K-quant tile loader does around its body: checks the arguments for super-blocks of
/// `bb` bytes and `subs` sub-blocks ([`tile16_args`], and the minima's buffer where the type has
/// them), then runs `body`.
#[allow(clippy::too_many_arguments)]
fn k_tile16(
    rows: &[&[u8]; 16],
    e0: usize,
    n: usize,
    q: &mut [u8],
    scale: &mut [f32],
    min: &mut [f32],
    (bb, subs, has_min): (usize, usize, bool),
    body: KBody<FileRows>,
) {
    let (p, nb) = tile16_args(rows, e0, n, QK_K, bb, q, scale, subs);
    k_run(
        &FileRows { p, bytes: bb },
        nb,
        q,
        scale,
        min,
        (subs, has_min),
        body,
    )
}

/// [`k_tile16`] for one repacked group of `ty` ([`packed_tile_args`]).
#[allow(clippy::too_many_arguments)]
fn k_tile16_packed(
    ty: GgmlType,
    group: &[u8],
    e0: usize,
    n: usize,
    q: &mut [u8],
    scale: &mut [f32],
    min: &mut [f32],
    (subs, has_min): (usize, bool),
    body: KBody<crate::gemm::x86::PackedRows>,
) {
    let (src, nb) = packed_tile_args(ty, group, e0, n, q, scale, subs);
    k_run(&src, nb, q, scale, min, (subs, has_min), body)
}

/// Runs a K-quant body on `nb` super-blocks of `src` (checked by the caller's argument check)
/// after checking the minima's buffer where the type has them.
fn k_run<S>(
    src: &S,
    nb: usize,
    q: &mut [u8],
    scale: &mut [f32],
    min: &mut [f32],
    (subs, has_min): (usize, bool),
    body: KBody<S>,
) {
    assert!(
        !has_min || min.len() >= 16 * subs * nb,
        "tile loader: output buffers too small"
    );
    // SAFETY: AVX-512 checked and every row of `src` holds `nb` super-blocks; the outputs hold
    // 16 rows × nb super-blocks (the caller's argument check and the assertion above; a body
    // without minima never touches `min`).
    unsafe {
        body(
            src,
            nb,
            q.as_mut_ptr(),
            scale.as_mut_ptr(),
            min.as_mut_ptr(),
        )
    }
}

/// The K-quant tile loaders ([`Tile16Fn`]): each [`k_tile16`] with its type's shape and body.
macro_rules! k_loaders {
    ($($name:ident: $ty:literal, $bb:expr, $subs:expr, $min:expr, $body:expr;)*) => {$(
        #[doc = concat!($ty, " rows into a 16-row tile.")]
        fn $name(
            rows: &[&[u8]; 16],
            e0: usize,
            n: usize,
            q: &mut [u8],
            scale: &mut [f32],
            min: &mut [f32],
        ) {
            k_tile16(rows, e0, n, q, scale, min, ($bb, $subs, $min), $body)
        }
    )*};
}

k_loaders! {
    tile16_q2k: "Q2_K", q2k::BLOCK_BYTES, 16, true, q2k_tile16;
    tile16_q3k: "Q3_K", q3k::BLOCK_BYTES, 16, false, q3k_tile16;
    tile16_q4k: "Q4_K", q4k::BLOCK_BYTES, 8, true, k45_tile16::<false, FileRows>;
    tile16_q5k: "Q5_K", q5k::BLOCK_BYTES, 8, true, k45_tile16::<true, FileRows>;
    tile16_q6k: "Q6_K", q6k::BLOCK_BYTES, 16, false, q6k_tile16::<FileRows>;
}

/// The repacked K-quant tile loaders ([`PackedTile16Fn`]): each [`k_tile16_packed`] with its
/// type's shape and body.
macro_rules! k_packed_loaders {
    ($($name:ident: $ty:expr, $subs:expr, $min:expr, $body:expr;)*) => {$(
        #[doc = concat!("A repacked group of ", stringify!($ty), " into a 16-row tile.")]
        fn $name(
            group: &[u8],
            e0: usize,
            n: usize,
            q: &mut [u8],
            scale: &mut [f32],
            min: &mut [f32],
        ) {
            k_tile16_packed($ty, group, e0, n, q, scale, min, ($subs, $min), $body)
        }
    )*};
}

k_packed_loaders! {
    tile16p_q4k: GgmlType::Q4_K, 8, true, k45_tile16::<false, _>;
    tile16p_q5k: GgmlType::Q5_K, 8, true, k45_tile16::<true, _>;
    tile16p_q6k: GgmlType::Q6_K, 16, false, q6k_tile16::<_>;
}

/// The direct 16-row tile loader of `ty`'s repacked groups ([`crate::gemm::packed`]) if this CPU
/// runs it.
pub(super) fn tile16_packed(ty: GgmlType) -> Option<PackedTile16Fn> {
    if !SimdLevel::Avx512.available() {
        return None;
    }
    Some(match ty {
        GgmlType::Q4_K => tile16p_q4k,
        GgmlType::Q5_K => tile16p_q5k,
        GgmlType::Q6_K => tile16p_q6k,
        _ => return None,
    })
}

/// The direct 16-row tile loader of `ty` if this CPU runs it (AVX-512 VNNI level).
pub(super) fn tile16(ty: GgmlType) -> Option<Tile16Fn> {
    if !SimdLevel::Avx512.available() {
        return None;
    }
    Some(match ty {
        GgmlType::Q2_K => tile16_q2k,
        GgmlType::Q3_K => tile16_q3k,
        GgmlType::Q4_K => tile16_q4k,
        GgmlType::Q5_K => tile16_q5k,
        GgmlType::Q6_K => tile16_q6k,
        _ => return None,
    })
}

/// Checks a loader's arguments: elements `e0 .. e0 + n` whole blocks of `qk` elements (`bb`
/// bytes, `subs` sub-blocks each), rows long enough, outputs large enough, the CPU able; returns
/// pointers to each row's first block and the number of blocks. Every direct tile loader of the
/// K-quants and the lookup-table types starts here.
#[allow(clippy::too_many_arguments)]
pub(crate) fn tile16_args(
    rows: &[&[u8]; 16],
    e0: usize,
    n: usize,
    qk: usize,
    bb: usize,
    q: &[u8],
    scale: &[f32],
    subs: usize,
) -> ([*const u8; 16], usize) {
    assert!(
        e0.is_multiple_of(qk) && n.is_multiple_of(qk),
        "tile loader: elements {e0}..+{n} are not whole {qk}-element blocks"
    );
    let (first, nb) = (e0 / qk, n / qk);
    assert!(
        rows.iter().all(|r| r.len() >= (first + nb) * bb),
        "tile loader: rows shorter than {} elements",
        e0 + n
    );
    assert!(
        q.len() >= 16 * n && scale.len() >= 16 * nb * subs,
        "tile loader: output buffers too small"
    );
    assert!(
        SimdLevel::Avx512.available(),
        "tile loaders need AVX-512 VNNI"
    );
    (std::array::from_fn(|k| rows[k][first * bb..].as_ptr()), nb)
}

/// Stores group `g` (elements `4g .. 4g + 4`) of block `blk` (of 32, counted from the tile's
/// first) of the 16 rows (row `k` in dword lane `k`) where the tile keeps it.
///
/// # Safety
/// `q` holds the tile's blocks up to `blk`; `g < 8`.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn put_group(q: *mut u8, blk: usize, g: usize, v: __m512i) {
    // SAFETY: the group lies within the tile (caller).
    unsafe { store64(q.add((blk * 8 + g) * 64), v) }
}

/// `−v` (the sign flipped, as the portable `-x`).
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn neg(v: __m512) -> __m512 {
    _mm512_castsi512_ps(_mm512_xor_si512(
        _mm512_castps_si512(v),
        _mm512_set1_epi32(i32::MIN),
    ))
}

/// Q4_K (`FIVE` false) or Q5_K super-blocks of 16 rows into a tile: the same header (d, dmin, 12
/// bytes of 6-bit scales and minima), nibbles at 16 (Q4_K) or 48 (Q5_K), Q5_K's fifth bits at 16
/// (bit `2c` of byte `l` for element `l` of block `2c`, bit `2c + 1` for block `2c + 1`).
///
/// # Safety
/// AVX-512 F/BW/VL available; `src` holds `nb` super-blocks of the type; `q` holds
/// `16 · 256 · nb` bytes, `scale` and `min` `16 · 8 · nb` f32.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn k45_tile16<const FIVE: bool, S: Rows16>(
    src: &S,
    nb: usize,
    q: *mut u8,
    scale: *mut f32,
    min: *mut f32,
) {
    let m4 = _mm512_set1_epi8(0x0F);
    let qs = if FIVE { 48 } else { 16 };
    let bit4 = _mm512_set1_epi8(0x10);
    // Bit `b` of every byte moved to bit 4 (16-bit shifts; the mask keeps the byte's own bit).
    let fifth = |qh: __m512i, b: u32| {
        let v = if b <= 4 {
            _mm512_sll_epi16(qh, _mm_cvtsi32_si128(4 - b as i32))
        } else {
            _mm512_srl_epi16(qh, _mm_cvtsi32_si128(b as i32 - 4))
        };
        _mm512_and_si512(v, bit4)
    };
    for i in 0..nb {
        // SAFETY (whole super-block): offsets within the block (16-byte reads at 0, at the fifth
        // bits 16 + 16h and at the nibbles qs + 32c + 16h, all ending by the block's last byte,
        // on the dword grid), outputs of super-block i within the caller's buffers.
        unsafe {
            // d | dmin, scales 0..4, 4..8, 8..12 of every row (lanes = rows).
            let (k, m) = src.k4_factors(i);
            for sub in 0..8 {
                let at = (8 * i + sub) * 16;
                store16f(scale.add(at), k[sub]);
                store16f(min.add(at), m[sub]);
            }
            // Nibbles: chunk c's dword g holds group g of block 2c (low) and 2c + 1 (high).
            for h in 0..2 {
                let qh = if FIVE {
                    src.x4(i, 16 + 16 * h)
                } else {
                    [_mm512_setzero_si512(); 4]
                };
                for c in 0..4 {
                    let v = src.x4(i, qs + 32 * c + 16 * h);
                    for (k, x) in v.into_iter().enumerate() {
                        let g = 4 * h + k;
                        let mut lo = _mm512_and_si512(x, m4);
                        let mut hi = _mm512_and_si512(_mm512_srli_epi16::<4>(x), m4);
                        if FIVE {
                            lo = _mm512_or_si512(lo, fifth(qh[k], 2 * c as u32));
                            hi = _mm512_or_si512(hi, fifth(qh[k], 2 * c as u32 + 1));
                        }
                        put_group(q, 8 * i + 2 * c, g, lo);
                        put_group(q, 8 * i + 2 * c + 1, g, hi);
                    }
                }
            }
        }
    }
}

/// # Safety
/// AVX-512 F/BW/VL available; `src` holds `nb` Q6_K super-blocks; `q` holds `16 · 256 · nb`
/// bytes, `scale` `16 · 16 · nb` f32.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn q6k_tile16<S: Rows16>(src: &S, nb: usize, q: *mut u8, scale: *mut f32, _min: *mut f32) {
    let (m4, m30) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x30));
    for i in 0..nb {
        // SAFETY (whole super-block): 16-byte reads at 64h + 16c, 64h + 32 + 16c (ql),
        // 128 + 32h + 16c (qh), 192 (scales) and the f16 d at 208, all within the 210 bytes;
        // outputs of super-block i within the caller's buffers.
        unsafe {
            let d = src.f16(i, q6k::D);
            let sc = src.x4(i, q6k::SC);
            for m in 0..16 {
                // Byte m of the scales, sign-extended: byte m % 4 of dword m / 4.
                let v = _mm512_sll_epi32(sc[m / 4], _mm_cvtsi32_si128(24 - 8 * (m % 4) as i32));
                let s = _mm512_cvtepi32_ps(_mm512_srai_epi32::<24>(v));
                store16f(scale.add((16 * i + m) * 16), _mm512_mul_ps(d, s));
            }
            for h in 0..2 {
                for c in 0..2 {
                    let a = src.x4(i, 64 * h + 16 * c);
                    let b = src.x4(i, 64 * h + 32 + 16 * c);
                    let hq = src.x4(i, 128 + 32 * h + 16 * c);
                    for k in 0..4 {
                        let g = 4 * c + k;
                        let hi2 = |v: __m512i| _mm512_and_si512(v, m30);
                        let lo4 = |v: __m512i| _mm512_and_si512(v, m4);
                        let quarters = [
                            _mm512_or_si512(lo4(a[k]), hi2(_mm512_slli_epi16::<4>(hq[k]))),
                            _mm512_or_si512(lo4(b[k]), hi2(_mm512_slli_epi16::<2>(hq[k]))),
                            _mm512_or_si512(lo4(_mm512_srli_epi16::<4>(a[k])), hi2(hq[k])),
                            _mm512_or_si512(
                                lo4(_mm512_srli_epi16::<4>(b[k])),
                                hi2(_mm512_srli_epi16::<2>(hq[k])),
                            ),
                        ];
                        for (j, v) in quarters.into_iter().enumerate() {
                            put_group(q, 8 * i + 4 * h + j, g, v);
                        }
                    }
                }
            }
        }
    }
}

/// Q2_K super-blocks of 16 rows into a tile: per sub-block `m` of 16 the scale `d · (sc & 15)`
/// and minimum `−dmin · (sc >> 4)` of byte `m`; the 2-bit levels of group `g` of block `4h + j`
/// are bits `2j..2j + 2` of the group's dword of `qs[32h ..]`.
///
/// # Safety
/// AVX-512 F/BW/VL available; `src.p[k]` points at `nb` Q2_K super-blocks; `q` holds `16 · 256 · nb`
/// bytes, `scale` and `min` `16 · 16 · nb` f32.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn q2k_tile16(src: &FileRows, nb: usize, q: *mut u8, scale: *mut f32, min: *mut f32) {
    let p = &src.p;
    let (m3, m15) = (_mm512_set1_epi8(3), _mm512_set1_epi32(15));
    for i in 0..nb {
        let base = i * q2k::BLOCK_BYTES;
        // SAFETY (whole super-block): 16-byte reads at 0 (scales), 68 (d and dmin in bytes
        // 80..84, the block's end) and 16 + 32h + 16c (qs), all within the 84 bytes; outputs of
        // super-block i within the caller's buffers.
        unsafe {
            let sc = rows16x4(p, base);
            let dd = rows16x4(p, base + q2k::D - 12)[3];
            let (d, dmin) = (f16_lanes::<false>(dd), neg(f16_lanes::<true>(dd)));
            for m in 0..16 {
                let x = _mm512_srl_epi32(sc[m / 4], _mm_cvtsi32_si128(8 * (m % 4) as i32));
                let s = _mm512_cvtepi32_ps(_mm512_and_si512(x, m15));
                let mn = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32::<4>(x), m15));
                store16f(scale.add((16 * i + m) * 16), _mm512_mul_ps(d, s));
                store16f(min.add((16 * i + m) * 16), _mm512_mul_ps(dmin, mn));
            }
            for h in 0..2 {
                for c in 0..2 {
                    let v = rows16x4(p, base + q2k::QS + 32 * h + 16 * c);
                    for (k, x) in v.into_iter().enumerate() {
                        for j in 0..4 {
                            let l = _mm512_and_si512(
                                _mm512_srl_epi16(x, _mm_cvtsi32_si128(2 * j as i32)),
                                m3,
                            );
                            put_group(q, 8 * i + 4 * h + j, 4 * c + k, l);
                        }
                    }
                }
            }
        }
    }
}

/// Q3_K super-blocks of 16 rows into a tile: the 16 signed scales unpacked as
/// [`q3k::unpack_scales`] does, a dword per row and four scales at a time; levels of group `g`
/// of block `4h + j` are bits `2j..2j + 2` of the group's dword of `qs[32h ..]` with bit `4h + j`
/// of its dword of `hmask` as bit 2.
///
/// # Safety
/// AVX-512 F/BW/VL available; `src.p[k]` points at `nb` Q3_K super-blocks; `q` holds `16 · 256 · nb`
/// bytes, `scale` `16 · 16 · nb` f32.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn q3k_tile16(src: &FileRows, nb: usize, q: *mut u8, scale: *mut f32, _min: *mut f32) {
    let p = &src.p;
    let (m3, bit2) = (_mm512_set1_epi8(3), _mm512_set1_epi8(4));
    let (m0f, m03) = (
        _mm512_set1_epi32(0x0f0f_0f0f),
        _mm512_set1_epi32(0x0303_0303),
    );
    let (mff, bias) = (_mm512_set1_epi32(0xFF), _mm512_set1_epi32(32));
    // Bit `b` of every byte moved to bit 2 (16-bit shifts; the mask keeps the byte's own bit).
    let third = |hm: __m512i, b: i32| {
        let v = if b <= 2 {
            _mm512_sll_epi16(hm, _mm_cvtsi32_si128(2 - b))
        } else {
            _mm512_srl_epi16(hm, _mm_cvtsi32_si128(b - 2))
        };
        _mm512_and_si512(v, bit2)
    };
    for i in 0..nb {
        let base = i * q3k::BLOCK_BYTES;
        // SAFETY (whole super-block): 16-byte reads at 16c (hmask), 32 + 32h + 16c (qs), 92
        // (scales in bytes 96..108) and 94 (d in bytes 108..110, the block's end), all within
        // the 110 bytes; outputs of super-block i within the caller's buffers.
        unsafe {
            let [_, a0, a1, t] = rows16x4(p, base + q3k::SC - 4);
            let d = f16_lanes::<true>(rows16x4(p, base + q3k::D - 14)[3]);
            let hi = |sh: u32| {
                let x = _mm512_srl_epi32(t, _mm_cvtsi32_si128(sh as i32));
                _mm512_slli_epi32::<4>(_mm512_and_si512(x, m03))
            };
            let parts = [
                _mm512_or_si512(_mm512_and_si512(a0, m0f), hi(0)),
                _mm512_or_si512(_mm512_and_si512(a1, m0f), hi(2)),
                _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32::<4>(a0), m0f), hi(4)),
                _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32::<4>(a1), m0f), hi(6)),
            ];
            for m in 0..16 {
                let x = _mm512_srl_epi32(parts[m / 4], _mm_cvtsi32_si128(8 * (m % 4) as i32));
                let s = _mm512_sub_epi32(_mm512_and_si512(x, mff), bias);
                store16f(
                    scale.add((16 * i + m) * 16),
                    _mm512_mul_ps(d, _mm512_cvtepi32_ps(s)),
                );
            }
            let hm = [rows16x4(p, base), rows16x4(p, base + 16)];
            for h in 0..2 {
                for (c, hc) in hm.iter().enumerate() {
                    let v = rows16x4(p, base + q3k::QS + 32 * h + 16 * c);
                    for (k, x) in v.into_iter().enumerate() {
                        for j in 0..4 {
                            let low = _mm512_and_si512(
                                _mm512_srl_epi16(x, _mm_cvtsi32_si128(2 * j as i32)),
                                m3,
                            );
                            let l = _mm512_or_si512(low, third(hc[k], (4 * h + j) as i32));
                            put_group(q, 8 * i + 4 * h + j, 4 * c + k, l);
                        }
                    }
                }
            }
        }
    }
}

/// The check every direct tile loader's unit test runs (K-quants and lookup-table types).
#[cfg(test)]
pub(crate) mod tile_check {
    use pshard_model::ggml_type::GgmlType;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use crate::gemm::{self, Converter, Tile};
    use crate::quant::SimdLevel;

    /// A block's scale field: an f16 or an E8M0 exponent byte.
    #[derive(Clone, Copy)]
    pub(crate) enum Field {
        /// A little-endian f16 at this byte offset of the block.
        F16(usize),
        /// An E8M0 exponent byte at this offset.
        E8m0(usize),
    }

    /// f16 scales at the edges: ±inf, a quiet NaN with payload, a signalling NaN, the smallest
    /// subnormal, the largest finite, −0, 0.
    const F16_EDGES: [u16; 8] = [
        0x7C00, 0xFC00, 0x7E01, 0x7C01, 0x0001, 0x7BFF, 0x8000, 0x0000,
    ];
    /// E8M0 exponents at the edges (the two subnormal halves, 2^−1 .. 2^127).
    const E8M0_EDGES: [u8; 7] = [0, 1, 2, 127, 128, 254, 255];

    /// Asserts that the direct loader of `ty` writes every byte and factor of the tile that the
    /// portable converter and the interleaving write, on 21 rows of random bytes with the scale
    /// fields of every third block set to edge values (infinite, NaN, subnormal, extreme): whole
    /// and partial tiles (the missing rows repeat the last), chunks at the first, middle and
    /// last blocks, and single blocks. Skips (printing why) without AVX-512 VNNI.
    pub(crate) fn tile16_matches_portable(ty: GgmlType, fields: &[Field]) {
        if !SimdLevel::Avx512.available() {
            println!("SKIP {ty}: no AVX-512 VNNI");
            return;
        }
        let conv = gemm::converter(ty).expect("a quantized type");
        let load = conv.tile16.expect("a direct tile loader");
        let plain = Converter {
            fast: None,
            tile16: None,
            ..conv
        };
        let (bs, bb) = (ty.block_size() as usize, ty.type_size() as usize);
        let (rows, cols) = (21, 1536);
        let rb = cols / bs * bb;
        let mut r = StdRng::seed_from_u64(ty as u64);
        let mut data = vec![0u8; rows * rb];
        r.fill(&mut data[..]);
        for (i, blk) in data
            .chunks_exact_mut(bb)
            .enumerate()
            .filter(|(i, _)| i % 3 == 0)
        {
            for (j, f) in fields.iter().enumerate() {
                match *f {
                    Field::F16(o) => {
                        let v = F16_EDGES[(i / 3 + j) % F16_EDGES.len()];
                        blk[o..o + 2].copy_from_slice(&v.to_le_bytes());
                    }
                    Field::E8m0(o) => blk[o] = E8M0_EDGES[(i / 3 + j) % E8M0_EDGES.len()],
                }
            }
        }
        let row = |i: usize| &data[i * rb..(i + 1) * rb];
        let mut cases = vec![
            (0..16, 0, 512),
            (5..21, 512, 1024),
            (16..21, 1024, 512),
            (20..21, 0, cols),
            (3..18, cols - 256, 256),
        ];
        if bs == 32 {
            cases.extend([(2..19, 32, 96), (0..16, cols - 32, 32)]);
        }
        for (range, e0, n) in cases {
            let src: [&[u8]; 16] =
                std::array::from_fn(|k| row((range.start + k).min(range.end - 1)));
            let subs = 16 * n / conv.sub();
            let junk = f32::from_bits(0x7FA5_A5A5);
            let (mut q, mut s, mut m) = (vec![0xA5u8; 16 * n], vec![junk; subs], vec![junk; subs]);
            load(&src, e0, n, &mut q, &mut s, &mut m);
            let mut t = Tile::default();
            t.load(&plain, SimdLevel::Avx512, 16, range.clone(), row, e0, n);
            let what = format!("{ty} rows {range:?} elements {e0}..+{n}");
            assert!(q == t.q[..16 * n], "{what}: levels");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&s), bits(&t.scale[..subs]), "{what}: scales");
            if conv.min {
                assert_eq!(bits(&m), bits(&t.min[..subs]), "{what}: minima");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tile_check::{tile16_matches_portable, Field};
    use super::*;

    #[test]
    fn q2k_tile_loader_matches_portable() {
        tile16_matches_portable(
            GgmlType::Q2_K,
            &[Field::F16(q2k::D), Field::F16(q2k::D + 2)],
        );
    }

    #[test]
    fn q3k_tile_loader_matches_portable() {
        tile16_matches_portable(GgmlType::Q3_K, &[Field::F16(q3k::D)]);
    }

    #[test]
    fn q4k_q5k_tile_loaders_match_portable() {
        for ty in [GgmlType::Q4_K, GgmlType::Q5_K] {
            tile16_matches_portable(ty, &[Field::F16(0), Field::F16(2)]);
        }
    }

    #[test]
    fn q6k_tile_loader_matches_portable() {
        tile16_matches_portable(GgmlType::Q6_K, &[Field::F16(q6k::D)]);
    }
}
