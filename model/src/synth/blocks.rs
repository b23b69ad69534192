//! Random but valid quant blocks, generated directly (no f32 quantization), with a chosen σ.
//!
//! Each block gets a random scale near the target and uniformly random quants; the block layouts are
//! the public GGUF/ggml formats. Offsets that would bias the mean are cancelled: K-quants through their
//! per-sub-block mins, the others by a random sign on the block scale.

use crate::ggml_type::GgmlType;
use half::f16;

/// xoshiro256** seeded through splitmix64: fast, and stable forever (unlike a library's default RNG).
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    /// A generator for stream `(seed, a, b)` (e.g. tensor index and chunk index).
    pub fn new(seed: u64, a: u64, b: u64) -> Rng {
        let mut x =
            seed ^ a.wrapping_mul(0xD6E8_FEB8_6659_FD93) ^ b.wrapping_mul(0xA076_1D64_78BD_642F);
        Rng {
            s: [
                splitmix(&mut x),
                splitmix(&mut x),
                splitmix(&mut x),
                splitmix(&mut x),
            ],
        }
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let r = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        r
    }

    /// Uniform in [0, 1).
    #[inline]
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Uniform in [lo, hi] (integers).
    #[inline]
    fn range(&mut self, lo: u32, hi: u32) -> u32 {
        lo + (((self.next_u64() >> 32) * (hi - lo + 1) as u64) >> 32) as u32
    }

    /// Fills `out` with random bytes.
    #[inline]
    fn fill(&mut self, out: &mut [u8]) {
        let mut chunks = out.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&last[..n]);
    }

    /// A random sign.
    #[inline]
    fn sign(&mut self) -> f32 {
        if self.next_u64() >> 63 == 0 {
            1.0
        } else {
            -1.0
        }
    }
}

/// What values a tensor holds.
#[derive(Clone, Debug, PartialEq)]
pub enum Init {
    /// Zero-mean random values with standard deviation σ.
    Random {
        /// Target standard deviation.
        sigma: f32,
    },
    /// `center` plus uniform noise in ±`noise` (norm weights: 1 ± a little).
    Around {
        /// Mean value.
        center: f32,
        /// Half-width of the uniform noise.
        noise: f32,
    },
    /// Exactly these values (F32 only), e.g. rope frequency factors.
    Values(Vec<f32>),
}

// RMS of the integer quant offsets each format uses with uniform quants (hand-computed):
// i8 (−128..127) 73.90; nibble−8 4.637; 5-bit−16 9.247; nibble−7.5 4.610; 5-bit−15.5 9.233;
// 6-bit−32 18.48. RMS of the random K-quant sub-block scales: uniform 32..63 → 48.39; Q6_K |sc| 16..63 → 41.86.
const RMS_I8: f32 = 73.90;
const RMS_Q4_0: f32 = 4.637;
const RMS_Q5_0: f32 = 9.247;
const RMS_Q4_K: f32 = 4.610;
const RMS_Q5_K: f32 = 9.233;
const RMS_Q6_K: f32 = 18.48;
const RMS_SC_K: f32 = 48.39;
const RMS_SC_Q6: f32 = 41.86;
// Lookup-table types with uniform indices: RMS of the IQ4_NL codebook 67.44 (mean −5.875, cancelled
// by a random sign on the block scale); of the doubled E2M1 levels (mean 0) 5.852. IQ4_XS sub-block
// scales `ls − 32` drawn with magnitude uniform in 16..=31 and a random sign: RMS 23.95.
const RMS_NL: f32 = 67.44;
const RMS_FP4: f32 = 5.852;
const RMS_SC_XS: f32 = 23.95;

/// Block scale jitter: uniform in [0.8, 1.2] (RMS 1.0067), so blocks differ like real ones.
#[inline]
fn jitter(rng: &mut Rng) -> f32 {
    0.8 + 0.4 * rng.unit()
}

#[inline]
fn put_f16(out: &mut [u8], v: f32) {
    out.copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// Packs eight 6-bit scales and mins into the 12-byte K-quant layout (Q4_K/Q5_K).
fn pack_scales_mins(sc: &[u8; 8], m: &[u8; 8], out: &mut [u8]) {
    for j in 0..4 {
        out[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
        out[j + 4] = (m[j] & 63) | ((m[j + 4] >> 4) << 6);
        out[j + 8] = (sc[j + 4] & 0xF) | ((m[j + 4] & 0xF) << 4);
    }
}

/// Whether [`fill`] can generate this type.
pub fn supported(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::F32
            | GgmlType::F16
            | GgmlType::Q8_0
            | GgmlType::Q4_0
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q4_K
            | GgmlType::Q5_K
            | GgmlType::Q6_K
            | GgmlType::IQ4_NL
            | GgmlType::IQ4_XS
            | GgmlType::MXFP4
    )
}

/// An MXFP4 exponent byte whose scale `2^(e − 128)` has mean square `target²`: the two powers of
/// two around `target`, the upper one with the probability that matches the mean square.
fn mxfp4_exponent(rng: &mut Rng, target: f32) -> u8 {
    let lo = target.log2().floor();
    let a = lo.exp2();
    let p_up = ((target / a).powi(2) - 1.0) / 3.0;
    let e = lo as i32 + 128 + i32::from(rng.unit() < p_up);
    e.clamp(0, 255) as u8
}

/// Fills `out` (whole blocks of `ty`) with values per `init`; `first_elem` is the index of the first
/// element (for [`Init::Values`]). Returns false for a type [`supported`] rejects or an init the type
/// cannot hold.
pub fn fill(ty: GgmlType, init: &Init, first_elem: usize, rng: &mut Rng, out: &mut [u8]) -> bool {
    let sigma = match init {
        Init::Random { sigma } => *sigma,
        Init::Around { center, noise } => {
            return match ty {
                GgmlType::F32 => {
                    for c in out.chunks_exact_mut(4) {
                        let v = center + noise * (2.0 * rng.unit() - 1.0);
                        c.copy_from_slice(&v.to_le_bytes());
                    }
                    true
                }
                GgmlType::F16 => {
                    for c in out.chunks_exact_mut(2) {
                        put_f16(c, center + noise * (2.0 * rng.unit() - 1.0));
                    }
                    true
                }
                _ => false,
            };
        }
        Init::Values(v) => {
            if ty != GgmlType::F32 {
                return false;
            }
            for (i, c) in out.chunks_exact_mut(4).enumerate() {
                let x = v.get(first_elem + i).copied().unwrap_or(0.0);
                c.copy_from_slice(&x.to_le_bytes());
            }
            return true;
        }
    };
    // Uniform in ±√3σ has standard deviation σ.
    let half_width = sigma * 3f32.sqrt();
    match ty {
        GgmlType::F32 => {
            for c in out.chunks_exact_mut(4) {
                c.copy_from_slice(&(half_width * (2.0 * rng.unit() - 1.0)).to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for c in out.chunks_exact_mut(2) {
                put_f16(c, half_width * (2.0 * rng.unit() - 1.0));
            }
        }
        GgmlType::Q8_0 => {
            // d (f16), 32 × i8: x = d·q
            for b in out.chunks_exact_mut(34) {
                put_f16(&mut b[0..2], rng.sign() * sigma * jitter(rng) / RMS_I8);
                rng.fill(&mut b[2..34]);
            }
        }
        GgmlType::Q4_0 => {
            // d (f16), 16 bytes of nibbles: x = d·(q − 8)
            for b in out.chunks_exact_mut(18) {
                put_f16(&mut b[0..2], rng.sign() * sigma * jitter(rng) / RMS_Q4_0);
                rng.fill(&mut b[2..18]);
            }
        }
        GgmlType::Q5_0 => {
            // d (f16), qh (u32: 5th bits), 16 bytes of nibbles: x = d·(q − 16)
            for b in out.chunks_exact_mut(22) {
                put_f16(&mut b[0..2], rng.sign() * sigma * jitter(rng) / RMS_Q5_0);
                rng.fill(&mut b[2..22]);
            }
        }
        GgmlType::Q5_1 => {
            // d (f16), m (f16), qh, nibbles: x = d·q + m; m = −15.5·d centres q in 0..31.
            for b in out.chunks_exact_mut(24) {
                let d = sigma * jitter(rng) / RMS_Q5_K;
                put_f16(&mut b[0..2], d);
                put_f16(&mut b[2..4], -15.5 * d);
                rng.fill(&mut b[4..24]);
            }
        }
        GgmlType::Q4_K => {
            // d, dmin (f16), 12 bytes of 6-bit scales/mins, 128 bytes of nibbles:
            // x = d·sc·q − dmin·m per 32-element sub-block. With m = sc and dmin = 7.5·d, x = d·sc·(q − 7.5).
            for b in out.chunks_exact_mut(144) {
                let d = sigma * jitter(rng) / (RMS_SC_K * RMS_Q4_K);
                put_f16(&mut b[0..2], d);
                put_f16(&mut b[2..4], 7.5 * d);
                let sc: [u8; 8] = std::array::from_fn(|_| rng.range(32, 63) as u8);
                pack_scales_mins(&sc, &sc, &mut b[4..16]);
                rng.fill(&mut b[16..144]);
            }
        }
        GgmlType::Q5_K => {
            // d, dmin, 12 bytes scales/mins, 32 bytes high bits, 128 bytes nibbles; q in 0..31.
            for b in out.chunks_exact_mut(176) {
                let d = sigma * jitter(rng) / (RMS_SC_K * RMS_Q5_K);
                put_f16(&mut b[0..2], d);
                put_f16(&mut b[2..4], 15.5 * d);
                let sc: [u8; 8] = std::array::from_fn(|_| rng.range(32, 63) as u8);
                pack_scales_mins(&sc, &sc, &mut b[4..16]);
                rng.fill(&mut b[16..176]);
            }
        }
        GgmlType::Q6_K => {
            // ql[128], qh[64], 16 × i8 scales, d (f16): x = d·sc·(q − 32); random scale signs cancel the
            // −0.5 mean of (q − 32).
            for b in out.chunks_exact_mut(210) {
                rng.fill(&mut b[0..192]);
                for s in &mut b[192..208] {
                    let mag = rng.range(16, 63) as i8;
                    *s = (if rng.next_u64() >> 63 == 0 { mag } else { -mag }) as u8;
                }
                put_f16(
                    &mut b[208..210],
                    sigma * jitter(rng) / (RMS_SC_Q6 * RMS_Q6_K),
                );
            }
        }
        GgmlType::IQ4_NL => {
            // d (f16), 16 bytes of nibbles: x = d·NL[q].
            for b in out.chunks_exact_mut(18) {
                put_f16(&mut b[0..2], rng.sign() * sigma * jitter(rng) / RMS_NL);
                rng.fill(&mut b[2..18]);
            }
        }
        GgmlType::IQ4_XS => {
            // d (f16), scales_h (u16), scales_l (4 bytes), 128 bytes of nibbles:
            // x = d·(ls − 32)·NL[q] per 32-element sub-block.
            for b in out.chunks_exact_mut(136) {
                put_f16(&mut b[0..2], sigma * jitter(rng) / (RMS_SC_XS * RMS_NL));
                let mut h = 0u16;
                b[4..8].fill(0);
                for j in 0..8 {
                    let mag = rng.range(16, 31) as i32;
                    let ls = (32 + if rng.sign() > 0.0 { mag } else { -mag }) as u8;
                    b[4 + j / 2] |= (ls & 0xF) << (4 * (j % 2));
                    h |= u16::from(ls >> 4) << (2 * j);
                }
                b[2..4].copy_from_slice(&h.to_le_bytes());
                rng.fill(&mut b[8..136]);
            }
        }
        GgmlType::MXFP4 => {
            // e (E8M0), 16 bytes of nibbles: x = 2^(e − 128)·FP4[q] (symmetric levels).
            for b in out.chunks_exact_mut(17) {
                let target = sigma * jitter(rng) / RMS_FP4;
                b[0] = mxfp4_exponent(rng, target);
                rng.fill(&mut b[1..17]);
            }
        }
        _ => return false,
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unpack(q: &[u8], j: usize) -> (u8, u8) {
        if j < 4 {
            (q[j] & 63, q[j + 4] & 63)
        } else {
            (
                (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
                (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
            )
        }
    }

    #[test]
    fn scale_packing_round_trips() {
        let sc = [0, 63, 17, 40, 63, 1, 32, 48];
        let m = [5, 6, 63, 0, 33, 62, 7, 16];
        let mut out = [0u8; 12];
        pack_scales_mins(&sc, &m, &mut out);
        for j in 0..8 {
            assert_eq!(unpack(&out, j), (sc[j], m[j]), "sub-block {j}");
        }
    }

    /// The generated blocks of each type, decoded here from the layout, have the requested σ.
    #[test]
    fn lookup_table_blocks_have_the_requested_sigma() {
        const NL: [i8; 16] = [
            -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
        ];
        const FP4: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];
        let nib = |qs: &[u8], e: usize| {
            if e < 16 {
                (qs[e] & 15) as usize
            } else {
                (qs[e - 16] >> 4) as usize
            }
        };
        let f16v = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f64();
        let sigma = 0.03f32;
        for ty in [GgmlType::IQ4_NL, GgmlType::IQ4_XS, GgmlType::MXFP4] {
            let n_blocks = 4096 * 32 / ty.block_size() as usize;
            let mut out = vec![0u8; n_blocks * ty.type_size() as usize];
            let mut rng = Rng::new(3, 1, 2);
            assert!(fill(ty, &Init::Random { sigma }, 0, &mut rng, &mut out));
            let (mut s1, mut s2, mut n) = (0f64, 0f64, 0f64);
            for b in out.chunks_exact(ty.type_size() as usize) {
                for e in 0..ty.block_size() as usize {
                    let v = match ty {
                        GgmlType::IQ4_NL => f16v(b) * NL[nib(&b[2..], e)] as f64,
                        GgmlType::MXFP4 => {
                            2f64.powi(b[0] as i32 - 128) * FP4[nib(&b[1..], e)] as f64
                        }
                        _ => {
                            let j = e / 32;
                            let lo = (b[4 + j / 2] >> (4 * (j % 2))) & 15;
                            let hi = (u16::from_le_bytes([b[2], b[3]]) >> (2 * j)) & 3;
                            let ls = (lo as i32 | (hi as i32) << 4) - 32;
                            f16v(b) * ls as f64 * NL[nib(&b[8 + 16 * j..], e % 32)] as f64
                        }
                    };
                    s1 += v;
                    s2 += v * v;
                    n += 1.0;
                }
            }
            let (mean, sd) = (s1 / n, (s2 / n).sqrt());
            assert!(
                (sd / sigma as f64 - 1.0).abs() < 0.05,
                "{ty}: σ {sd} vs {sigma}"
            );
            assert!(mean.abs() < 0.05 * sigma as f64, "{ty}: mean {mean}");
        }
    }

    #[test]
    fn rng_is_deterministic_and_streams_differ() {
        let a: Vec<u64> = (0..4)
            .map({
                let mut r = Rng::new(1, 2, 3);
                move |_| r.next_u64()
            })
            .collect();
        let mut r2 = Rng::new(1, 2, 3);
        assert!(a.iter().all(|&x| x == r2.next_u64()));
        let mut r3 = Rng::new(1, 2, 4);
        assert_ne!(a[0], r3.next_u64());
    }

    #[test]
    fn integer_range_is_inclusive() {
        let mut r = Rng::new(7, 0, 0);
        let mut seen = [false; 4];
        for _ in 0..1000 {
            let v = r.range(3, 6);
            assert!((3..=6).contains(&v));
            seen[(v - 3) as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }
}
