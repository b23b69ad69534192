//! KV cache row formats: how one row of K or V values is stored and read back.
//!
//! - `F16`: one little-endian f16 per value.
//! - `Q8_0`: the GGUF Q8_0 block along the row: per 32 values an f16 scale `d = max|x| / 127`
//!   and 32 i8 `q = round(x / d)` (34 bytes), value `q · d`. A row is whole blocks, and so is
//!   every head slice the kernels take of it (head dims multiples of 32; [`KvType::check_dims`]).

use half::f16;
use pshard_model::ggml_type::GgmlType;
use pshard_model::spec::ModelSpec;

/// The element type of the KV cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KvType {
    /// f16 values.
    #[default]
    F16,
    /// GGUF Q8_0 blocks along each row.
    Q8_0,
}

impl KvType {
    /// Every KV type, in the order messages list them.
    pub const ALL: [KvType; 2] = [KvType::F16, KvType::Q8_0];

    /// The type of a ggml type, if it is a KV type.
    pub fn from_ggml(ty: GgmlType) -> Option<KvType> {
        match ty {
            GgmlType::F16 => Some(KvType::F16),
            GgmlType::Q8_0 => Some(KvType::Q8_0),
            _ => None,
        }
    }

    /// The ggml type of the same layout.
    pub fn ggml(self) -> GgmlType {
        match self {
            KvType::F16 => GgmlType::F16,
            KvType::Q8_0 => GgmlType::Q8_0,
        }
    }

    /// The name as llama.cpp's `-ctk` and pshard's registry spell it.
    pub fn name(self) -> &'static str {
        match self {
            KvType::F16 => "f16",
            KvType::Q8_0 => "q8_0",
        }
    }

    /// Parses a name (any case); the error lists the accepted ones.
    pub fn parse(s: &str) -> Result<KvType, String> {
        let lower = s.to_ascii_lowercase();
        KvType::ALL
            .into_iter()
            .find(|t| t.name() == lower)
            .ok_or_else(|| {
                format!(
                    "`{s}` is not a KV cache type pshard runs (accepted: {})",
                    KvType::accepted()
                )
            })
    }

    /// The accepted names, comma-separated.
    pub fn accepted() -> String {
        KvType::ALL.map(|t| t.name()).join(", ")
    }

    /// Values per block (1 for f16).
    pub fn block(self) -> usize {
        self.ggml().block_size() as usize
    }

    /// Bytes of `n` values (`n` whole blocks; see [`pshard_model::bytes::kv_row_bytes`]).
    pub fn row_bytes(self, n: usize) -> usize {
        pshard_model::bytes::kv_row_bytes(self.ggml(), n) as usize
    }

    /// Checks that every head slice `dims` names (`(what, values)`) is whole blocks, so each
    /// starts and ends on a block boundary of its row.
    pub fn check_dims(self, dims: &[(&str, usize)]) -> Result<(), String> {
        let b = self.block();
        for &(what, n) in dims {
            if !n.is_multiple_of(b) {
                return Err(format!(
                    "a {} KV cache stores rows in blocks of {b} values, but the model's {what} \
                     is {n} (not a multiple of {b}): use -ctk f16 -ctv f16",
                    self.name()
                ));
            }
        }
        Ok(())
    }

    /// Checks that this type's blocks tile the head slices the attention kernels take of a model's
    /// KV rows: each K and V head (latent attention: its latent, which is the values, and its
    /// rope key); the error names the model and its dimension.
    pub fn check_model(self, spec: &ModelSpec) -> Result<(), String> {
        let h = &spec.hparams;
        let dims: Vec<(&str, usize)> = match h.mla {
            Some(m) => vec![
                ("kv_lora_rank", m.kv_lora_rank),
                ("rope key width (rope_dims)", h.rope_dims),
            ],
            None => vec![("K head dim", h.head_dim_k), ("V head dim", h.head_dim_v)],
        };
        self.check_dims(&dims)
            .map_err(|e| format!("{}: {e}", spec.name))
    }

    /// Stores `src` (whole blocks) into `dst` (`self.row_bytes(src.len())` bytes).
    #[inline(always)]
    pub fn store(self, src: &[f32], dst: &mut [u8]) {
        match self {
            KvType::F16 => match bytemuck::try_cast_slice_mut::<u8, f16>(dst) {
                Ok(d) => {
                    use half::slice::HalfFloatSliceExt;
                    d.convert_from_f32_slice(src);
                }
                // Bytes not 2-aligned (never in the cache's own buffers): value by value.
                Err(_) => {
                    for (d, &x) in dst.chunks_exact_mut(2).zip(src) {
                        d.copy_from_slice(&f16::from_f32(x).to_le_bytes());
                    }
                }
            },
            KvType::Q8_0 => crate::quant::act::quantize_row_q8_0(src, dst),
        }
    }

    /// Reads `dst.len()` values (whole blocks) from `src`.
    #[inline(always)]
    pub fn load(self, src: &[u8], dst: &mut [f32]) {
        match self {
            KvType::F16 => match bytemuck::try_cast_slice::<u8, f16>(src) {
                Ok(s) => {
                    use half::slice::HalfFloatSliceExt;
                    s.convert_to_f32_slice(dst);
                }
                Err(_) => {
                    for (y, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                        *y = f16::from_le_bytes([b[0], b[1]]).to_f32();
                    }
                }
            },
            KvType::Q8_0 => load_q8_0(src, dst),
        }
    }
}

/// Q8_0 blocks to f32; inlined so that inside the attention bodies (compiled per SIMD level) the
/// i8 → f32 widening vectorises.
#[inline(always)]
fn load_q8_0(src: &[u8], dst: &mut [f32]) {
    const QK: usize = 32;
    for (b, y) in src.chunks_exact(QK + 2).zip(dst.chunks_exact_mut(QK)) {
        let d = f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
        let q: &[u8; QK] = b[2..].try_into().expect("a block of 32");
        let y: &mut [f32; QK] = y.try_into().expect("a block of 32");
        for (yi, &qi) in y.iter_mut().zip(q) {
            *yi = qi as i8 as f32 * d;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Q8_0 row store against blocks built by hand from the GGUF definition: `d = max|x| /
    /// 127` stored as little-endian f16 first, then the 32 values `round(x / d)` as i8, blocks one
    /// after another along the row.
    #[test]
    fn q8_0_rows_are_gguf_blocks() {
        let n = 96;
        let x: Vec<f32> = (0..n)
            .map(|i| ((i * 53 % 29) as f32 - 14.0) * (1.0 + (i / 32) as f32 * 3.0) / 7.0)
            .collect();
        let mut want = Vec::new();
        for blk in x.chunks(32) {
            let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = 1.0 / d;
            want.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
            for v in blk {
                want.push((v * id).round() as i8 as u8);
            }
        }
        assert_eq!(KvType::Q8_0.row_bytes(n), 3 * 34);
        let mut got = vec![0u8; KvType::Q8_0.row_bytes(n)];
        KvType::Q8_0.store(&x, &mut got);
        assert_eq!(got, want);
        // Reading back: q · d per value.
        let mut back = vec![0f32; n];
        KvType::Q8_0.load(&got, &mut back);
        for (i, (b, v)) in back.iter().zip(&x).enumerate() {
            let d = f16::from_bits(u16::from_le_bytes([
                want[i / 32 * 34],
                want[i / 32 * 34 + 1],
            ]));
            assert_eq!(*b, want[i / 32 * 34 + 2 + i % 32] as i8 as f32 * d.to_f32());
            assert!((b - v).abs() <= d.to_f32() * 0.51, "value {i}: {b} vs {v}");
        }
    }

    #[test]
    fn f16_rows_round_trip_and_names_parse() {
        let x = [1.5f32, -2.25, 0.0, 65504.0];
        let mut b = vec![0u8; KvType::F16.row_bytes(4)];
        KvType::F16.store(&x, &mut b);
        assert_eq!(&b[..2], &f16::from_f32(1.5).to_bits().to_le_bytes());
        let mut y = [0f32; 4];
        KvType::F16.load(&b, &mut y);
        assert_eq!(x, y);
        assert_eq!(KvType::parse("Q8_0"), Ok(KvType::Q8_0));
        let e = KvType::parse("q4_0").unwrap_err();
        assert!(e.contains("accepted: f16, q8_0"), "{e}");
        assert!(KvType::Q8_0.check_dims(&[("head dim", 64)]).is_ok());
        let e = KvType::Q8_0
            .check_dims(&[("K head dim", 64), ("V head dim", 40)])
            .unwrap_err();
        assert!(e.contains("V head dim is 40"), "{e}");
    }
}
