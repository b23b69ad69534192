//! The catalogue on the real test models (skipped with a message when they are absent).

use std::path::PathBuf;

use pshard_model::bytes;
use pshard_model::ggml_type::GgmlType;
use pshard_model::gguf::ModelFile;
use pshard_model::spec::{Arch, GroupRole, ModelSpec, RopeMode};

fn model(name: &str) -> Option<PathBuf> {
    pshard_testkit::real_model(name)
}

/// Groups (tied output excluded) add up to the file's tensor data, and every file tensor is used.
fn check_bytes(spec: &ModelSpec, file: &ModelFile) {
    assert!(spec.unused_file_tensors(file.tensors().len()).is_empty());
    assert_eq!(bytes::file_bytes(spec), file.tensor_data_bytes());
    let groups: u64 = spec.groups.iter().map(|g| g.bytes).sum();
    let tied = if spec.hparams.tied_embeddings {
        bytes::role_bytes(spec, GroupRole::Embed)
    } else {
        0
    };
    assert_eq!(groups - tied, file.tensor_data_bytes());
    for g in &spec.groups {
        let sum: u64 = g.tensors.iter().map(|&t| spec.tensor(t).bytes).sum();
        assert_eq!(sum, g.bytes);
    }
}

#[test]
fn smollm2_135m() {
    let Some(path) = model("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let file = ModelFile::open(&path).unwrap();
    let spec = ModelSpec::from_file(&file).unwrap();
    let h = &spec.hparams;
    assert_eq!(spec.arch, Arch::Llama);
    assert_eq!(
        (h.n_layer, h.n_embd, h.n_head, h.n_head_kv),
        (30, 576, 9, 3)
    );
    assert_eq!(
        (h.head_dim_k, h.head_dim_v, h.n_vocab, h.n_ff),
        (64, 64, 49152, 1536)
    );
    assert!(h.tied_embeddings);
    assert_eq!(h.rope_mode, RopeMode::Adjacent);
    assert_eq!(h.rope_base, 100_000.0);
    assert_eq!(h.embed_scale, 1.0);
    assert!(spec.rope_freqs.is_none());
    let types: Vec<GgmlType> = bytes::type_mix(&spec).iter().map(|m| m.0).collect();
    assert_eq!(types, vec![GgmlType::F32, GgmlType::Q4_1, GgmlType::Q8_0]);
    assert_eq!(
        spec.group(spec.output).tensors,
        vec![spec
            .find(None, pshard_model::spec::TensorRole::TokenEmbd)
            .unwrap()]
    );
    assert!(spec
        .layers
        .iter()
        .all(|l| l.window.is_none() && l.groups.len() == 2));
    check_bytes(&spec, &file);
    // 30 layers × 2 × 3 kv heads × 64 × 2 bytes.
    assert_eq!(
        bytes::kv_bytes_per_token(&spec, GgmlType::F16),
        30 * 2 * 3 * 64 * 2
    );
}

#[test]
fn gemma3_270m() {
    let Some(path) = model("gemma-3-270m-q4_k_m.gguf") else {
        return;
    };
    let file = ModelFile::open(&path).unwrap();
    let spec = ModelSpec::from_file(&file).unwrap();
    let h = &spec.hparams;
    assert_eq!(spec.arch, Arch::Gemma3);
    assert_eq!(
        (h.n_layer, h.n_embd, h.n_head, h.n_head_kv),
        (18, 640, 4, 1)
    );
    assert_eq!((h.head_dim_k, h.head_dim_v, h.n_vocab), (256, 256, 262_144));
    assert_eq!(h.sliding_window, Some(512));
    assert_eq!(h.rope_mode, RopeMode::Neox);
    assert!(h.tied_embeddings);
    assert!((h.embed_scale - 640f32.sqrt()).abs() < 1e-4);
    let global: Vec<usize> = spec
        .layers
        .iter()
        .filter(|l| l.window.is_none())
        .map(|l| l.index)
        .collect();
    assert_eq!(global, vec![5, 11, 17]);
    for l in &spec.layers {
        if l.window.is_none() {
            assert_eq!((l.rope_base, l.rope_linear_scale), (1_000_000.0, 1.0));
        } else {
            assert_eq!(
                (l.window, l.rope_base, l.rope_linear_scale),
                (Some(512), 10_000.0, 1.0)
            );
        }
    }
    check_bytes(&spec, &file);
}
