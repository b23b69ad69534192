//! Attention: flash (prefill), split-KV with its combine (decode), latent attention (MLA).

use super::launchers::Launchers;
use super::{blocks, check_q8_0_dims, CudaKernels};
use crate::cuda::error::{CudaError, CudaResult};
use crate::kv::KvType;
use cudarc::driver::CudaStream;

/// Parameters of an attention launch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnParams {
    /// Query heads.
    pub n_head: usize,
    /// KV heads.
    pub n_kv: usize,
    /// Key head dimension.
    pub dk: usize,
    /// Value head dimension.
    pub dv: usize,
    /// KV cache capacity in positions.
    pub n_ctx: usize,
    /// Score scale.
    pub scale: f32,
    /// Soft-cap of scores (0 = none).
    pub softcap: f32,
    /// Sliding window (0 = none).
    pub window: usize,
    /// Latent attention: one KV head whose values are the first `dv` of each `dk`-wide K row.
    pub v_in_k: bool,
}

/// Query rows at or below which attention uses the split-KV kernel.
pub const ATTN_SPLIT_MAX_ROWS: usize = 4;

/// How attention finds its KV cells: K and V rows, each sequence owning `AttnParams::n_ctx`
/// consecutive cells (position `p` in cell `p % n_ctx` of its sequence's span).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvCells {
    /// The rows' element type (f16, or Q8_0 blocks along each row).
    pub ty: KvType,
    /// K rows.
    pub k: u64,
    /// V rows.
    pub v: u64,
    /// Sequence id of each query token (i32 on the device), for the split-KV (decode) path.
    pub seq: u64,
    /// First cell of the batch's sequence, for the flash (prefill) path, which takes one
    /// sequence per call.
    pub base: usize,
}

pub(super) const FLASH_DIMS: &[(usize, usize)] = &[(64, 64), (128, 64), (256, 32)];

pub(super) fn flash_smem(d: usize, bkv: usize) -> usize {
    // Two stages of K and V tiles, rows padded by 8 halves.
    2 * 2 * bkv * (d + 8) * 2
}

/// Keys per shared-memory tile of the split-KV kernel (`SPLIT_TILE` in attention.cu).
pub const ATTN_SPLIT_TILE: usize = 64;

/// Most splits per query row and head (`attn_combine` holds one factor per split in 64 floats).
pub const ATTN_MAX_SPLITS: usize = 64;

/// Row stride (halves) of a staged K or V tile in `attn_split` (`split_stride` in attention.cu).
fn split_stride(d: usize) -> usize {
    d.div_ceil(32) * 32 + 16
}

/// Dynamic shared memory of `attn_split`: one tile of K and one of V.
pub(super) fn split_smem(dk: usize, dv: usize) -> usize {
    ATTN_SPLIT_TILE * (split_stride(dk) + split_stride(dv)) * 2
}

/// Scratch bytes the split-KV attention path needs for one call of exactly `n` query rows (0 when
/// the flash kernel is used).
fn attention_scratch_rows(p: &AttnParams, n: usize) -> usize {
    if uses_flash(p, n) {
        0
    } else {
        n * p.n_head * n_split(p, n) * (p.dv + 2) * 4
    }
}

/// Scratch bytes the attention kernels need for any call of 1 to `n` query rows: a program sized
/// for `n` rows also runs shorter batches (a prompt's tail, one sequence of several), and those
/// below the flash threshold take the split-KV path even when `n` itself would not. A pure function
/// of the shapes, so the planner sizes exactly what the runtime allocates.
pub fn attention_scratch(p: &AttnParams, n: usize) -> usize {
    // Past 1024 rows every head has one split (`n_split`), so the bytes only grow with the rows:
    // the rows up to 1024 and `n` itself cover the maximum.
    (1..=n.clamp(1, 1024))
        .chain([n.max(1)])
        .map(|m| attention_scratch_rows(p, m))
        .max()
        .unwrap_or(0)
}

fn uses_flash(p: &AttnParams, n: usize) -> bool {
    n > ATTN_SPLIT_MAX_ROWS
        && !p.v_in_k
        && p.dk == p.dv
        && FLASH_DIMS.iter().any(|&(d, _)| d == p.dk)
}

/// Query heads per block of `mla_attn_split` (`MLA_HG` in attention.cu).
const MLA_HG: usize = 16;
/// Keys per tile of `mla_attn_split` (`MLA_TILE`).
const MLA_TILE: usize = 32;
/// Widest latent-attention values (`MLA_MAX_DV`).
const MLA_MAX_DV: usize = 512;
/// Widest latent-attention keys the raised shared-memory limit covers (deepseek2: 576).
pub(super) const MLA_MAX_DK: usize = 576;

/// Dynamic shared memory of `mla_attn_split`: the block's queries, one key tile, its scores.
pub(super) fn mla_smem(dk: usize) -> usize {
    MLA_HG * dk * 4 + MLA_TILE * dk * 2 + MLA_HG * MLA_TILE * 4
}

/// Whether `mla_attn_split` covers latent attention of these parameters.
fn mla_supported(p: &AttnParams) -> CudaResult<()> {
    if p.n_kv != 1
        || p.dk > MLA_MAX_DK
        || p.dv > MLA_MAX_DV
        || p.dv > p.dk
        || !p.dk.is_multiple_of(2)
        || !p.dv.is_multiple_of(2)
        || p.softcap != 0.0
    {
        return Err(CudaError::Invalid(format!(
            "latent attention of {} KV heads, key/value widths {}/{} (at most {MLA_MAX_DK}/{MLA_MAX_DV}, even, values inside keys, no soft-cap) is not supported on CUDA",
            p.n_kv, p.dk, p.dv
        )));
    }
    Ok(())
}

/// Splits of the split-KV path for `n` query rows: enough that a call at full context has about
/// 1024 blocks, at most [`ATTN_MAX_SPLITS`] and no more than the cache has key tiles. The kernels
/// size each split on the device from the query's position (a multiple of [`ATTN_SPLIT_TILE`]
/// keys), so short contexts read only their keys.
fn n_split(p: &AttnParams, n: usize) -> usize {
    let want = 1024usize
        .div_ceil((p.n_head * n).max(1))
        .clamp(1, ATTN_MAX_SPLITS);
    want.min(p.n_ctx.div_ceil(ATTN_SPLIT_TILE)).max(1)
}

impl CudaKernels {
    /// Causal (optionally windowed) attention of `n` query rows over the f16 caches at positions
    /// `pos` (i32 on the device). `q`: `[n, n_head·dk]` f32 (row stride `ldq`), `out`:
    /// `[n, n_head·dv]` f32 (row stride `ldo`). `part` must hold [`attention_scratch`] bytes.
    /// `sinks` (f32 per query head) join each softmax's denominator. With `p.v_in_k` (latent
    /// attention, one KV head) the values are the first `dv` of each K row and `kv.v` is unused.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        p: &AttnParams,
        q: u64,
        ldq: usize,
        kv: KvCells,
        pos: u64,
        n: usize,
        out: u64,
        ldo: usize,
        part: u64,
        sinks: Option<u64>,
        s: &CudaStream,
    ) -> CudaResult<()> {
        let (kc, vc) = (kv.k, kv.v);
        if p.n_kv == 0 || !p.n_head.is_multiple_of(p.n_kv) {
            return Err(CudaError::Invalid(format!(
                "{} query heads cannot share {} KV heads",
                p.n_head, p.n_kv
            )));
        }
        if n == 0 {
            return Ok(());
        }
        let common_tail = (p.scale, p.softcap, p.window as i32);
        let sinks = sinks.unwrap_or(0);
        // Every head of a Q8_0 cache is whole 32-value blocks.
        if kv.ty == KvType::Q8_0 {
            check_q8_0_dims(&[("K head dim", p.dk), ("V head dim", p.dv)])?;
        }
        if p.v_in_k {
            // Latent attention: `mla_attn_split` stages every K tile once for MLA_HG query heads.
            mla_supported(p)?;
            let ns = n_split(p, n);
            let split = match kv.ty {
                KvType::F16 => Launchers::mla_attn_split,
                KvType::Q8_0 => Launchers::mla_attn_split_q8,
            };
            return self.split_then_combine(
                p,
                ns,
                n,
                pos,
                (out, ldo),
                part,
                sinks,
                s,
                |t0, chunk| {
                    split(
                        self.k(),
                        (ns as u32, p.n_head.div_ceil(MLA_HG) as u32, chunk as u32),
                        256,
                        mla_smem(p.dk) as u32,
                        s,
                        q + (t0 * ldq * 4) as u64,
                        ldq as i32,
                        kv.k,
                        p.dk as i32,
                        part,
                        pos + (t0 * 4) as u64,
                        kv.seq + (t0 * 4) as u64,
                        p.n_head as i32,
                        p.n_ctx as i32,
                        p.dk as i32,
                        p.dv as i32,
                        p.scale,
                        p.window as i32,
                        ns as i32,
                    )
                },
            );
        }
        if uses_flash(p, n) {
            let &(d, bkv) = FLASH_DIMS
                .iter()
                .find(|&&(d, _)| d == p.dk)
                .expect("checked by uses_flash");
            let flash = match kv.ty {
                KvType::F16 => Launchers::flash_attn,
                KvType::Q8_0 => Launchers::flash_attn_q8,
            };
            return flash(
                self.k(),
                d,
                (blocks(n, 64), p.n_head as u32, 1),
                128,
                flash_smem(d, bkv) as u32,
                s,
                q,
                ldq as i32,
                kc,
                vc,
                out,
                ldo as i32,
                pos,
                n as i32,
                p.n_head as i32,
                p.n_kv as i32,
                kv.base as i32,
                p.n_ctx as i32,
                common_tail.0,
                common_tail.1,
                common_tail.2,
                sinks,
            );
        }
        if !p.dk.is_multiple_of(2)
            || !p.dv.is_multiple_of(2)
            || p.dk == 0
            || p.dv == 0
            || p.dk > 256
            || p.dv > 256
        {
            return Err(CudaError::Invalid(format!(
                "attention head dims {}/{} are not supported on CUDA",
                p.dk, p.dv
            )));
        }
        let ns = n_split(p, n);
        let smem = split_smem(p.dk, p.dv);
        let split = match kv.ty {
            KvType::F16 => Launchers::attn_split,
            KvType::Q8_0 => Launchers::attn_split_q8,
        };
        self.split_then_combine(p, ns, n, pos, (out, ldo), part, sinks, s, |t0, chunk| {
            split(
                self.k(),
                (ns as u32, p.n_head as u32, chunk as u32),
                128,
                smem as u32,
                s,
                q + (t0 * ldq * 4) as u64,
                ldq as i32,
                kc,
                vc,
                part,
                pos + (t0 * 4) as u64,
                kv.seq + (t0 * 4) as u64,
                p.n_head as i32,
                p.n_kv as i32,
                p.n_ctx as i32,
                p.dk as i32,
                p.dv as i32,
                common_tail.0,
                common_tail.1,
                common_tail.2,
                ns as i32,
            )
        })
    }

    /// The split-KV path in launches of at most 65535 query rows (grid.z): `split(t0, chunk)`
    /// writes the partials of rows `t0..t0 + chunk` into `part` (`ns` splits each), then
    /// `attn_combine` merges them into `out` (row stride `ldo`), each head's sink (`sinks`: f32
    /// per head, or 0) joining the denominator.
    #[allow(clippy::too_many_arguments)]
    fn split_then_combine(
        &self,
        p: &AttnParams,
        ns: usize,
        n: usize,
        pos: u64,
        (out, ldo): (u64, usize),
        part: u64,
        sinks: u64,
        s: &CudaStream,
        split: impl Fn(usize, usize) -> CudaResult<()>,
    ) -> CudaResult<()> {
        let mut t0 = 0;
        while t0 < n {
            let chunk = (n - t0).min(65535);
            split(t0, chunk)?;
            self.k().attn_combine(
                (p.n_head as u32, chunk as u32, 1),
                128,
                0,
                s,
                part,
                out + (t0 * ldo * 4) as u64,
                ldo as i32,
                pos + (t0 * 4) as u64,
                p.n_head as i32,
                p.dv as i32,
                p.window as i32,
                ns as i32,
                sinks,
            )?;
            t0 += chunk;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_kv_sizing() {
        let p = |n_head, n_ctx| AttnParams {
            n_head,
            n_kv: 1,
            dk: 128,
            dv: 128,
            n_ctx,
            scale: 1.0,
            softcap: 0.0,
            window: 0,
            v_in_k: false,
        };
        // ~1024 blocks at full context, capped by attn_combine's 64 and by the cache's tiles.
        assert_eq!(n_split(&p(32, 4096), 1), 32);
        assert_eq!(n_split(&p(4, 4096), 1), 64);
        assert_eq!(n_split(&p(32, 4096), 4), 8);
        assert_eq!(n_split(&p(32, 100), 1), 2);
        assert_eq!(n_split(&p(32, 4096), 512), 1);
        assert_eq!(n_split(&p(1, 1), 1), 1);
        // A program sized for n rows also runs shorter calls: its scratch covers every one, the
        // split-KV calls below the flash threshold included (a flash-sized batch of 512 rows needs
        // none itself, its 3-row tail does).
        for (heads, ctx, dv) in [(32, 4096, 128), (4, 32768, 256), (2, 100, 80), (1, 64, 64)] {
            let q = AttnParams {
                dv,
                dk: dv,
                ..p(heads, ctx)
            };
            for n in [1, 3, 4, 5, 17, 512, 2000] {
                let s = attention_scratch(&q, n);
                for m in 1..=n {
                    assert!(
                        s >= attention_scratch_rows(&q, m),
                        "{heads} heads, {n} ≥ {m} rows"
                    );
                }
            }
        }
        assert_eq!(attention_scratch_rows(&p(32, 4096), 512), 0);
        assert!(attention_scratch(&p(32, 4096), 512) > 0);
        // Shared memory: head dims 128 fit the default 48 KiB; 256 needs the raised limit, which
        // is what load() sets.
        assert_eq!(split_smem(128, 128), 64 * 144 * 2 * 2);
        assert!(split_smem(128, 128) <= 48 << 10);
        assert_eq!(split_smem(256, 256), 64 * 272 * 2 * 2);
        // Row strides: 16-byte aligned, 2 mod 4 in 16-byte units (conflict-free reads).
        for d in [2, 20, 64, 96, 128, 256] {
            let st = split_stride(d);
            assert!(
                st >= d && st.is_multiple_of(8) && (st / 8) % 4 == 2,
                "{d}: {st}"
            );
        }
    }
}
