//! The row-interleaved weight layout of the decode path, repacked once at load: 16 rows per
//! *group*, their blocks dword-interleaved so that one 512-bit vector holds 4 consecutive bytes of
//! each of the 16 rows (row `k` in dword lane `k`).
//!
//! A group is `16 ×` the rows' bytes, *unit* by *unit* (a unit: one block of a legacy type, one
//! super-block of a K-quant), each unit in the type's own bytes: the 16 rows' f16 scales first
//! (32 bytes; types with one outside a dword: Q4_0, Q5_0, Q8_0 at byte 0, Q6_K at 208), then
//! dword `i` of each row's remaining bytes as vector `i` (64 bytes, row `k` in lane `k`); Q8_0's
//! quants are stored offset by 128 ([`Geo::flip`]), Q4_K's and Q5_K's 6-bit scales and minima
//! re-packed on the dwords' bit grid ([`k4_fields`]). So a repacked matrix is exactly as large
//! as in the file, and the kernel's `vpdpbusd` with 4 broadcast activation bytes accumulates 16
//! rows at once: each lane ends a sub-block holding that row's integer sum, with no horizontal
//! reduction (see `gemm::packed_x86`). Rows after the last whole group (`rows % 16`) stay in the
//! file layout behind the groups.
//!
//! The arithmetic is unchanged: the same integer sums and the same f32 steps as
//! [`super::dot_converted`], so every output keeps its bits.

use pshard_model::ggml_type::GgmlType;

use crate::matmul::KernelError;
use crate::quant::kquants::{pack_scales_mins_k4, unpack_scales_mins_k4};

/// Rows per group.
pub const ROWS: usize = 16;

/// Where a repacked type's unit keeps its moved f16 scale.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Geo {
    /// Bytes of one row's unit in the file.
    pub bytes: usize,
    /// Elements of a unit.
    pub elems: usize,
    /// Offset of the f16 scale moved behind the dwords, if any.
    pub f16: Option<usize>,
    /// The dwords are stored with every byte's top bit flipped (Q8_0: its signed quants become
    /// the unsigned levels `q + 128` the kernel multiplies, saving an operation per vector).
    pub flip: bool,
    /// Stored vector `i` holds dword `order(i)` of the unit (default: `i`): the order the
    /// kernel reads them in, so each group streams front to back. Q6_K's kernel reads three
    /// places of a super-block at once (low nibbles of two quarters, high bit pairs); stored in
    /// file order its 16-row super-blocks ran at half the DRAM rate of the other types.
    pub order: Option<fn(usize) -> usize>,
    /// The unit's bytes 4..16 (Q4_K's and Q5_K's 6-bit scales and minima) are stored re-packed
    /// ([`k4_fields`]).
    pub k4: bool,
}

impl Geo {
    /// Dwords of one row's unit left after the f16 is moved out (vectors per unit).
    pub(crate) fn dwords(self) -> usize {
        (self.bytes - if self.f16.is_some() { 2 } else { 0 }) / 4
    }

    /// Bytes of one unit of a group (16 rows).
    pub(crate) fn group_unit(self) -> usize {
        ROWS * self.bytes
    }

    /// Bytes before a group unit's first vector: the 16 rows' moved f16 scales, if any (read
    /// first, so each group streams front to back; 32-byte offsets split no 256-bit half of a
    /// load across cache lines).
    pub(crate) fn head(self) -> usize {
        if self.f16.is_some() {
            2 * ROWS
        } else {
            0
        }
    }

    /// The byte offset in a row's unit of the dword stored as vector `i`.
    fn src_at(self, i: usize) -> usize {
        let at = 4 * self.order.map_or(i, |o| o(i));
        match self.f16 {
            // Past the f16: the dwords start 2 bytes later.
            Some(f) if at >= f => at + 2,
            _ => at,
        }
    }

    /// What every stored dword is xor-ed with ([`Geo::flip`]).
    pub(crate) fn flip_mask(self) -> u32 {
        if self.flip {
            0x8080_8080
        } else {
            0
        }
    }
}

/// The repacked geometry of `ty`, for the types the decode path has a repacked kernel for.
pub(crate) fn geo(ty: GgmlType) -> Option<Geo> {
    let g = |bytes, elems, f16| {
        Some(Geo {
            bytes,
            elems,
            f16,
            flip: false,
            order: None,
            k4: false,
        })
    };
    match ty {
        GgmlType::Q4_K => Some(Geo {
            k4: true,
            ..g(144, 256, None)?
        }),
        GgmlType::Q5_K => Some(Geo {
            k4: true,
            ..g(176, 256, None)?
        }),
        GgmlType::Q6_K => Some(Geo {
            order: Some(q6k_order),
            ..g(210, 256, Some(208))?
        }),
        GgmlType::Q4_0 => g(18, 32, Some(0)),
        GgmlType::Q4_1 => g(20, 32, None),
        GgmlType::Q5_0 => g(22, 32, Some(0)),
        GgmlType::Q8_0 => Some(Geo {
            flip: true,
            ..g(34, 32, Some(0))?
        }),
        _ => None,
    }
}

/// Q6_K's stored order: the 4 scale dwords (48..52), then per half `h` and step `j` the low
/// nibbles of quarters 0 and 1 (`16h + j`, `16h + 8 + j`) and their high bit pairs (`32 + 8h + j`).
pub(crate) fn q6k_order(i: usize) -> usize {
    if i < 4 {
        return 48 + i;
    }
    let (h, j, x) = ((i - 4) / 24, (i - 4) % 24 / 3, (i - 4) % 3);
    [16 * h + j, 16 * h + 8 + j, 32 + 8 * h + j][x]
}

/// Where Q4_K's and Q5_K's 6-bit scales and minima go (the super-block's bytes 4..16, the three
/// dwords `w[0..3]` after `d | dmin`): field `n` — scale `n` for `n < 8`, minimum `n − 8` after —
/// at bit [`k4_shift`]`(n % 5)` of dword `n / 5`, and field 15's bits `2i, 2i + 1` at bits 24,
/// 25 of dword `i`. Fields 0–14 come out of 16 rows' dwords with a shift, a mask or both
/// (`gemm::x86::k4_factor`), where the file's order (scales and minima 4–7 split into a nibble
/// and two high bits) takes five to six operations: the repacked Q4_K kernel for one token,
/// forming each sub-block pair's factors before its f32 steps, ran at 55.7–58.8 ns per
/// 4096-wide row with the file's order and 50.5–50.8 with this (`GEMV_L2=1`, docs/PERF.md).
pub(crate) fn k4_fields(s: &[u8]) -> [u8; 12] {
    let (sc, mn) = unpack_scales_mins_k4(s);
    let f = |n: usize| u32::from(if n < 8 { sc[n] } else { mn[n - 8] });
    let mut o = [0u8; 12];
    for (i, o) in o.chunks_exact_mut(4).enumerate() {
        let mut w = (f(15) >> (2 * i) & 3) << 24;
        for p in 0..5 {
            w |= f(5 * i + p) << k4_shift(p);
        }
        o.copy_from_slice(&w.to_le_bytes());
    }
    o
}

/// The bit of its dword where field `5i + p` (`p < 5`) of [`k4_fields`] starts.
pub(crate) fn k4_shift(p: usize) -> usize {
    if p < 4 {
        6 * p
    } else {
        26
    }
}

/// The file's 12 bytes of scales and minima back from [`k4_fields`]'s.
pub(crate) fn k4_unfields(s: &[u8]) -> [u8; 12] {
    let w = |i: usize| u32::from_le_bytes(s[4 * i..4 * i + 4].try_into().expect("4 bytes"));
    let f = |n: usize| -> u8 {
        let v = if n == 15 {
            (0..3).map(|i| (w(i) >> 24 & 3) << (2 * i)).sum()
        } else {
            w(n / 5) >> k4_shift(n % 5) & 63
        };
        v as u8
    };
    let mut o = [0u8; 12];
    pack_scales_mins_k4(
        &std::array::from_fn(f),
        &std::array::from_fn(|j| f(8 + j)),
        &mut o,
    );
    o
}

/// Whether matrices of `ty` can be repacked.
pub fn supported(ty: GgmlType) -> bool {
    geo(ty).is_some()
}

/// The bytes of `rows` rows of `wrb` bytes (`ty`) repacked: whole groups interleaved, the last
/// `rows % 16` rows copied as they are. Groups are repacked in parallel over the pool.
///
/// # Errors
/// If `ty` has no repacked layout or `data` is not `rows × wrb` bytes of whole units.
pub fn repack(ty: GgmlType, data: &[u8], rows: usize, wrb: usize) -> Result<Vec<u8>, KernelError> {
    let mut out = vec![0u8; data.len()];
    repack_into(ty, data, rows, wrb, &mut out)?;
    Ok(out)
}

/// Checks that `len` bytes are `rows` rows of `wrb` bytes of whole units of `ty`, a type with a
/// repacked layout: the matrices [`repack`] takes.
///
/// # Errors
/// If `ty` has no repacked layout or the bytes are not such rows.
pub fn check(ty: GgmlType, len: usize, rows: usize, wrb: usize) -> Result<(), KernelError> {
    let g = geo(ty).ok_or(KernelError::UnsupportedType(ty))?;
    if !wrb.is_multiple_of(g.bytes) || rows.checked_mul(wrb) != Some(len) {
        return Err(KernelError::ShapeMismatch {
            what: format!(
                "repack {ty}: {len} bytes are not {rows} rows of {wrb} bytes (whole {}-byte blocks)",
                g.bytes
            ),
        });
    }
    Ok(())
}

/// Whether this CPU computes a matrix of `rows` rows of `wrb` bytes (`len` in all) of `ty` from
/// the repacked layout: the type and shape are [`check`]ed and the CPU lane runs a repacked
/// kernel for the type — AVX-512 VNNI (on this CPU and not capped by
/// [`crate::quant::simd_cap`]), every repacked type; else AVX2 (at most capped to it), the types
/// of its repacked kernel (`gemm::packed_avx2::supports`; without a kernel, the repacked
/// groups would be unpacked row by row, 7× slower than the file layout). The engine repacks
/// such matrices at load when only the CPU reads them; the profiler measures the CPU's matmuls
/// the same way.
pub fn computes_repacked(ty: GgmlType, len: usize, rows: usize, wrb: usize) -> bool {
    use crate::quant::{simd_cap, SimdLevel};
    let lane = match simd_cap() {
        SimdLevel::Avx512 if SimdLevel::Avx512.available() => true,
        SimdLevel::Avx512 | SimdLevel::Avx2 => SimdLevel::Avx2.available() && avx2_kernel(ty),
        SimdLevel::Scalar => false,
    };
    lane && check(ty, len, rows, wrb).is_ok()
}

/// Whether the AVX2 level has repacked kernels for `ty` (the decode kernel and the 8-row tile
/// loader, [`crate::gemm::Tile::load_packed8`]).
pub fn avx2_kernel(ty: GgmlType) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::packed_avx2::supports(ty)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = ty;
        false
    }
}

/// [`repack`] into `out` (as long as `data`). A matrix can be repacked a part at a time: rows
/// `16i ..` of its file bytes repacked as a matrix of their own give bytes `16i · wrb ..` of the
/// whole one's repacked bytes.
///
/// # Errors
/// As [`repack`], and if `out` is not as long as `data`.
pub fn repack_into(
    ty: GgmlType,
    data: &[u8],
    rows: usize,
    wrb: usize,
    out: &mut [u8],
) -> Result<(), KernelError> {
    check(ty, data.len(), rows, wrb)?;
    if out.len() != data.len() {
        return Err(KernelError::ShapeMismatch {
            what: format!(
                "repack {ty}: {} bytes into an output of {}",
                data.len(),
                out.len()
            ),
        });
    }
    let g = geo(ty).ok_or(KernelError::UnsupportedType(ty))?;
    let groups = rows / ROWS;
    let gb = ROWS * wrb;
    {
        let dst = crate::pool::SharedSlice::new(out);
        crate::pool::for_range(groups, 1, |r| {
            for i in r {
                // SAFETY: each group index is handled by one participant; groups are disjoint
                // ranges of the output.
                let d = unsafe { dst.range_mut(i * gb..(i + 1) * gb) };
                pack_group(g, &data[i * gb..(i + 1) * gb], wrb, d);
            }
        });
    }
    out[groups * gb..].copy_from_slice(&data[groups * gb..]);
    Ok(())
}

/// One group of 16 row-major rows (`src`, `wrb` bytes each) into the repacked layout (`dst`).
fn pack_group(g: Geo, src: &[u8], wrb: usize, dst: &mut [u8]) {
    let nd = g.dwords();
    for (u, d) in dst.chunks_exact_mut(g.group_unit()).enumerate() {
        for k in 0..ROWS {
            let unit = &src[k * wrb + u * g.bytes..][..g.bytes];
            let mut fields = [0u8; 256];
            let unit = if g.k4 {
                let f = &mut fields[..g.bytes];
                f.copy_from_slice(unit);
                f[4..16].copy_from_slice(&k4_fields(&unit[4..16]));
                f
            } else {
                unit
            };
            for i in 0..nd {
                let at = g.src_at(i);
                let x = u32::from_le_bytes(unit[at..at + 4].try_into().expect("4 bytes"));
                d[g.head() + 64 * i + 4 * k..][..4]
                    .copy_from_slice(&(x ^ g.flip_mask()).to_le_bytes());
            }
            if let Some(f) = g.f16 {
                d[2 * k..][..2].copy_from_slice(&unit[f..f + 2]);
            }
        }
    }
}

/// Rows `k0 .. k0 + dst.len() / wrb` (at most 16) of one repacked group (`src`) back in the file
/// layout: the inverse of [`pack_group`] (the portable path and partial groups read these).
pub(crate) fn unpack_rows(ty: GgmlType, src: &[u8], wrb: usize, k0: usize, dst: &mut [u8]) {
    let g = geo(ty).expect("a repacked type");
    let nd = g.dwords();
    for (j, row) in dst.chunks_exact_mut(wrb).enumerate() {
        let k = k0 + j;
        for (u, unit) in row.chunks_exact_mut(g.bytes).enumerate() {
            let s = &src[u * g.group_unit()..][..g.group_unit()];
            for i in 0..nd {
                let at = g.src_at(i);
                let x = s[g.head() + 64 * i + 4 * k..][..4]
                    .try_into()
                    .expect("4 bytes");
                let x = u32::from_le_bytes(x);
                unit[at..at + 4].copy_from_slice(&(x ^ g.flip_mask()).to_le_bytes());
            }
            if let Some(f) = g.f16 {
                unit[f..f + 2].copy_from_slice(&s[2 * k..][..2]);
            }
            if g.k4 {
                let f = k4_unfields(&unit[4..16]);
                unit[4..16].copy_from_slice(&f);
            }
        }
    }
}

/// Outputs of the whole groups `data` (repacked rows of `acts.cols` elements of `ty`) for each
/// token `t` of `acts` (converted with seeds, 1 to 4 tokens) into `outs[t]` (16 per group).
///
/// `width` picks the kernel: AVX-512 VNNI, or AVX2 (the types of `packed_avx2::supports`).
///
/// # Panics
/// If the shapes disagree, the type has no repacked kernel of `width` or the CPU lacks its
/// features.
pub(crate) fn groups(
    ty: GgmlType,
    width: super::gemv::Width,
    acts: &super::GemmActs,
    data: &[u8],
    outs: &mut [&mut [f32]],
) {
    let g = geo(ty).expect("a repacked type");
    let conv = super::converter(ty).expect("a quantized type");
    let n = acts.n_rows;
    assert!(
        (1..=super::gemv::MAX_TOKENS).contains(&n) && outs.len() == n,
        "repacked decode: {} outputs for {n} tokens",
        outs.len()
    );
    assert!(
        acts.cols.is_multiple_of(g.elems),
        "repacked decode: {} columns are not whole units",
        acts.cols
    );
    let gb = acts.cols / g.elems * g.group_unit();
    let len = outs[0].len();
    assert!(
        outs.iter().all(|o| o.len() == len)
            && len.is_multiple_of(ROWS)
            && data.len() == len / ROWS * gb,
        "repacked decode: {} bytes for {len} outputs",
        data.len()
    );
    let avx512 = width == super::gemv::Width::Vnni;
    // AVX2 multiplies the signed levels of the types its GEMM tiles hold signed (Q8_0).
    let signed = !avx512 && conv.tile_signed(8);
    assert!(
        conv.offset == 0 || signed || acts.seed.len() == n * acts.subs,
        "repacked decode: activations without seeds"
    );
    assert!(
        if avx512 {
            crate::quant::SimdLevel::Avx512.available()
        } else {
            crate::quant::SimdLevel::Avx2.available() && avx2_kernel(ty)
        },
        "no repacked {ty} decode kernel of {width:?} on this CPU"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the kernel's features and type asserted; `data` holds len / 16 groups of whole
    // units; the activations hold 1 to 4 tokens of `cols` elements (with seeds where the type has
    // an offset), one output slice of `len` each.
    unsafe {
        if avx512 {
            super::packed_x86::groups(&conv, g, acts, data, outs)
        } else {
            super::packed_avx2::groups(&conv, g, acts, data, outs)
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    panic!("the repacked decode has no kernel on this architecture");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every scale and minimum, at each of the 16 places, lands where [`k4_fields`] says and
    /// comes back: the file's bytes are restored exactly.
    #[test]
    fn k4_fields_place_each_field_and_round_trip() {
        for n in 0..16 {
            for v in 0..64u8 {
                // Field n = v, the others a pattern that changes with n.
                let fill = |m: usize| if m == n { v } else { ((7 * m + n) % 64) as u8 };
                let sc: [u8; 8] = std::array::from_fn(fill);
                let mn: [u8; 8] = std::array::from_fn(|j| fill(8 + j));
                let mut file = [0u8; 12];
                pack_scales_mins_k4(&sc, &mn, &mut file);
                let f = k4_fields(&file);
                let w = |i: usize| u32::from_le_bytes(f[4 * i..4 * i + 4].try_into().unwrap());
                let got = if n == 15 {
                    (0..3).map(|i| (w(i) >> 24 & 3) << (2 * i)).sum::<u32>()
                } else {
                    let p = n % 5;
                    w(n / 5) >> [0, 6, 12, 18, 26][p] & 63
                };
                assert_eq!(got, u32::from(v), "field {n} = {v}");
                assert_eq!(k4_unfields(&f), file, "field {n} = {v}");
            }
        }
    }
}
