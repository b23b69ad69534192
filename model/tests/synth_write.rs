//! Writing tiny synthetic models: files open, read back to the planned spec, are deterministic per
//! seed, and hold finite weights with the intended σ.

use std::path::PathBuf;

use half::f16;
use pshard_model::ggml_type::GgmlType;
use pshard_model::gguf::ModelFile;
use pshard_model::spec::ModelSpec;
use pshard_model::synth::{plan, preset, preset_names, write_synth, QuantRecipe};

fn seed() -> u64 {
    let s = std::env::var("PSHARD_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(42);
    eprintln!("seed {s} (set PSHARD_SEED to replay)");
    s
}

struct TempFile(PathBuf);
impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn write(name: &str, r: QuantRecipe, seed: u64) -> TempFile {
    // Tests run in parallel threads: a counter keeps their files apart.
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!(
        "pshard-synth-test-{}-{n}-{name}-{}-{seed}.gguf",
        std::process::id(),
        r.name()
    ));
    let f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let mut last = (0, 0);
    write_synth(&preset(name).unwrap(), r, seed, f, &mut |d, t| {
        last = (d, t)
    })
    .unwrap();
    assert_eq!(last.0, last.1, "progress ends at the total");
    TempFile(path)
}

#[test]
fn tiny_presets_write_and_read_back() {
    let seed = seed();
    for name in preset_names().iter().filter(|n| n.starts_with("tiny-")) {
        for r in QuantRecipe::ALL {
            let f = write(name, r, seed);
            let file = ModelFile::open(&f.0).unwrap();
            let p = plan(&preset(name).unwrap(), r);
            assert_eq!(
                file.file_size(),
                p.file_bytes().unwrap(),
                "{name} {}",
                r.name()
            );
            let h = p.header().unwrap();
            assert_eq!(file.header().data_offset, h.data_offset);
            let from_file = ModelSpec::from_file(&file).unwrap();
            let planned = ModelSpec::from_gguf(&h, &h.tensors, name).unwrap();
            assert_eq!(from_file, planned, "{name} {}", r.name());
            assert!(
                file.file_size() < 8 << 20,
                "{name} {} is {} bytes",
                r.name(),
                file.file_size()
            );
        }
    }
}

#[test]
fn same_seed_same_bytes() {
    let a = write("tiny-qwen3moe", QuantRecipe::Q4_K_M, 7);
    let b = write("tiny-qwen3moe", QuantRecipe::Q4_K_M, 7);
    let c = write("tiny-qwen3moe", QuantRecipe::Q4_K_M, 8);
    let (a, b, c) = (
        std::fs::read(&a.0).unwrap(),
        std::fs::read(&b.0).unwrap(),
        std::fs::read(&c.0).unwrap(),
    );
    assert_eq!(a, b);
    assert_eq!(a.len(), c.len());
    assert_ne!(a, c);
}

/// The (scale, min) of sub-block `j` from the 12-byte K-quant scales.
fn scale_min(s: &[u8], j: usize) -> (f32, f32) {
    if j < 4 {
        ((s[j] & 63) as f32, (s[j + 4] & 63) as f32)
    } else {
        (
            ((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4)) as f32,
            ((s[j + 4] >> 4) | ((s[j] >> 6) << 4)) as f32,
        )
    }
}

fn h(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Local reference decoders (no dependency on the kernels crate).
fn dequant(ty: GgmlType, data: &[u8]) -> Vec<f32> {
    match ty {
        GgmlType::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        GgmlType::F16 => data.chunks_exact(2).map(h).collect(),
        GgmlType::Q8_0 => data
            .chunks_exact(34)
            .flat_map(|b| {
                let d = h(b);
                b[2..].iter().map(move |&q| d * q as i8 as f32)
            })
            .collect(),
        GgmlType::Q4_K => data
            .chunks_exact(144)
            .flat_map(|b| {
                let (d, dmin, s, qs) = (h(&b[0..]), h(&b[2..]), &b[4..16], &b[16..]);
                let mut out = Vec::with_capacity(256);
                for c in 0..4 {
                    let ((s0, m0), (s1, m1)) = (scale_min(s, 2 * c), scale_min(s, 2 * c + 1));
                    let q = &qs[32 * c..32 * c + 32];
                    out.extend(q.iter().map(|&x| d * s0 * (x & 0xF) as f32 - dmin * m0));
                    out.extend(q.iter().map(|&x| d * s1 * (x >> 4) as f32 - dmin * m1));
                }
                out
            })
            .collect(),
        GgmlType::Q5_K => data
            .chunks_exact(176)
            .flat_map(|b| {
                let (d, dmin, s, qh, qs) =
                    (h(&b[0..]), h(&b[2..]), &b[4..16], &b[16..48], &b[48..]);
                let mut out = Vec::with_capacity(256);
                for c in 0..4 {
                    let ((s0, m0), (s1, m1)) = (scale_min(s, 2 * c), scale_min(s, 2 * c + 1));
                    let q = &qs[32 * c..32 * c + 32];
                    let hb = |l: usize, bit: usize| if qh[l] >> bit & 1 == 1 { 16.0 } else { 0.0 };
                    out.extend(
                        (0..32).map(|l| d * s0 * ((q[l] & 0xF) as f32 + hb(l, 2 * c)) - dmin * m0),
                    );
                    out.extend(
                        (0..32)
                            .map(|l| d * s1 * ((q[l] >> 4) as f32 + hb(l, 2 * c + 1)) - dmin * m1),
                    );
                }
                out
            })
            .collect(),
        GgmlType::Q4_0 => data
            .chunks_exact(18)
            .flat_map(|b| {
                let (d, qs) = (h(b), &b[2..18]);
                let lo = qs.iter().map(move |&q| d * ((q & 0xF) as f32 - 8.0));
                let hi = qs.iter().map(move |&q| d * ((q >> 4) as f32 - 8.0));
                lo.chain(hi).collect::<Vec<_>>()
            })
            .collect(),
        GgmlType::Q5_0 => data
            .chunks_exact(22)
            .flat_map(|b| {
                let (d, qh, qs) = (
                    h(b),
                    u32::from_le_bytes(b[2..6].try_into().unwrap()),
                    &b[6..22],
                );
                let lo = (0..16).map(move |j| {
                    d * (((qs[j] & 0xF) as u32 | (((qh >> j) & 1) << 4)) as f32 - 16.0)
                });
                let hi = (0..16).map(move |j| {
                    d * (((qs[j] >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4)) as f32 - 16.0)
                });
                lo.chain(hi).collect::<Vec<_>>()
            })
            .collect(),
        GgmlType::Q6_K => data
            .chunks_exact(210)
            .flat_map(|b| {
                let (ql, qh, sc, d) = (&b[0..128], &b[128..192], &b[192..208], h(&b[208..]));
                let mut y = vec![0f32; 256];
                for n in 0..2 {
                    let (ql, qh, sc, y) = (
                        &ql[64 * n..],
                        &qh[32 * n..],
                        &sc[8 * n..],
                        &mut y[128 * n..],
                    );
                    for l in 0..32 {
                        let is = l / 16;
                        let q = |low: u8, shift: u8| {
                            ((low as i32) | ((((qh[l] >> shift) & 3) as i32) << 4)) - 32
                        };
                        let s = |k: usize| d * (sc[is + k] as i8) as f32;
                        y[l] = s(0) * q(ql[l] & 0xF, 0) as f32;
                        y[l + 32] = s(2) * q(ql[l + 32] & 0xF, 2) as f32;
                        y[l + 64] = s(4) * q(ql[l] >> 4, 4) as f32;
                        y[l + 96] = s(6) * q(ql[l + 32] >> 4, 6) as f32;
                    }
                }
                y
            })
            .collect(),
        other => panic!("no local decoder for {other}"),
    }
}

#[test]
fn weights_are_finite_with_intended_sigma() {
    let seed = seed();
    let cases = [
        ("tiny-llama", QuantRecipe::F16),
        ("tiny-llama", QuantRecipe::Q8_0),
        ("tiny-llama", QuantRecipe::Q4_K),
        ("tiny-llama", QuantRecipe::Q4_0),
        ("tiny-qwen2", QuantRecipe::Q4_K),
        ("tiny-qwen3moe", QuantRecipe::Q4_K_M),
    ];
    let mut seen = std::collections::BTreeSet::new();
    for (name, r) in cases {
        let f = write(name, r, seed);
        let file = ModelFile::open(&f.0).unwrap();
        let spec = ModelSpec::from_file(&file).unwrap();
        let mut checked = 0;
        for t in &spec.tensors {
            seen.insert(t.ty.name());
            let v = dequant(t.ty, file.tensor_data(t.file_index));
            assert_eq!(v.len() as u64, t.dims.iter().product::<u64>());
            assert!(
                v.iter().all(|x| x.is_finite()),
                "{}: non-finite value",
                t.name
            );
            let n = v.len() as f64;
            let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
            let sd = (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
            let name = t.name.as_str();
            let (want_mean, want_sd) = if name.ends_with(".bias") {
                (0.0, 0.02)
            } else if t.dims.len() == 1 {
                // Norms: 1 ± uniform 0.02 (σ 0.0115); rope factors are fixed values.
                if name == "rope_freqs.weight" {
                    continue;
                }
                (1.0, 0.02 / 3f64.sqrt())
            } else if name == "token_embd.weight" {
                (
                    0.0,
                    if spec.hparams.tied_embeddings {
                        1.0 / (t.dims[0] as f64).sqrt()
                    } else {
                        1.0
                    },
                )
            } else {
                (0.0, 1.0 / (t.dims[0] as f64).sqrt())
            };
            assert!(
                (mean - want_mean).abs() < 0.05 * want_sd.max(0.02) + 3.0 * want_sd / n.sqrt(),
                "{name} {}: mean {mean}",
                r.name()
            );
            // Sampling error of σ grows for short vectors.
            let tol = 0.06f64.max(3.0 / n.sqrt());
            assert!(
                (sd / want_sd - 1.0).abs() < tol,
                "{name} {}: σ {sd}, want {want_sd}",
                r.name()
            );
            checked += 1;
        }
        assert!(checked > 10, "{}: only {checked} tensors checked", r.name());
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["F16", "F32", "Q4_0", "Q4_K", "Q5_0", "Q5_K", "Q6_K", "Q8_0"]
    );
}

#[test]
fn rope_freqs_hold_llama3_factors() {
    let f = write("tiny-llama", QuantRecipe::Q8_0, 1);
    let file = ModelFile::open(&f.0).unwrap();
    let spec = ModelSpec::from_file(&file).unwrap();
    let t = spec.tensor(spec.rope_freqs.unwrap());
    let v = dequant(GgmlType::F32, file.tensor_data(t.file_index));
    let p = preset("tiny-llama").unwrap();
    assert_eq!(
        v,
        p.llama3_rope.unwrap().freq_factors(p.head_dim, p.rope_base)
    );
    assert_eq!(v[0], 1.0);
    assert_eq!(*v.last().unwrap(), 8.0);
}
