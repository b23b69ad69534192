//! Synthetic presets: every preset plans a header that the catalogue reads back with the preset's
//! hparams; the model sizes match llama-bench's; the Q4_K_M mix matches a real llama.cpp file.

use pshard_model::bytes;
use pshard_model::gguf::ModelFile;
use pshard_model::spec::{Arch, GroupRole, ModelSpec};
use pshard_model::synth::{plan, preset, preset_names, QuantRecipe, SynthPreset};

fn spec_of(p: &SynthPreset, r: QuantRecipe) -> ModelSpec {
    let h = plan(p, r).header().unwrap();
    ModelSpec::from_gguf(&h, &h.tensors, p.name)
        .unwrap_or_else(|e| panic!("{} {}: {e}", p.name, r.name()))
}

fn check_hparams(p: &SynthPreset, s: &ModelSpec) {
    let h = &s.hparams;
    assert_eq!(s.arch, p.arch, "{}", p.name);
    assert_eq!(s.name, p.model_name);
    assert_eq!(
        (
            h.n_vocab,
            h.n_embd,
            h.n_layer,
            h.n_head,
            h.n_head_kv,
            h.head_dim_k,
            h.head_dim_v
        ),
        match p.mla {
            // Latent attention: one KV head of the latent plus the rope key, values the latent.
            Some(m) => (
                p.n_vocab,
                p.n_embd,
                p.n_layer,
                p.n_head,
                1,
                m.kv_lora_rank + m.rope,
                m.kv_lora_rank
            ),
            None => (
                p.n_vocab,
                p.n_embd,
                p.n_layer,
                p.n_head,
                p.n_head_kv,
                p.head_dim,
                p.head_dim
            ),
        },
        "{}",
        p.name
    );
    assert_eq!(h.n_nextn_layers, p.n_nextn);
    assert_eq!(h.n_layer_dense_lead, p.n_layer_dense_lead);
    assert_eq!(h.n_expert_shared, p.n_expert_shared);
    assert_eq!(h.n_ff_shared_expert, p.n_ff_expert * p.n_expert_shared);
    assert_eq!(h.yarn.is_some(), p.yarn.is_some());
    if let Some(d) = p.rope_dims {
        assert_eq!(h.rope_dims, d);
    }
    assert_eq!(h.n_ctx_train, p.n_ctx_train);
    assert_eq!((h.norm_eps, h.rope_base), (p.norm_eps, p.rope_base));
    assert_eq!(h.tied_embeddings, p.tied);
    assert_eq!(h.n_expert, p.n_expert);
    if p.n_expert > 0 {
        // Dense leading layers keep feed_forward_length.
        let n_ff = if p.n_layer_dense_lead > 0 { p.n_ff } else { 0 };
        assert_eq!(
            (h.n_ff, h.n_expert_used, h.n_ff_expert),
            (n_ff, p.n_expert_used, p.n_ff_expert)
        );
        // llama and qwen3moe always renormalise, gpt-oss never, the others as the file says.
        let norm = match p.arch {
            Arch::GptOss => false,
            Arch::Glm4Moe | Arch::Deepseek2 => p.expert_weights_norm.unwrap_or(false),
            _ => true,
        };
        assert_eq!(h.expert_weights_norm, norm, "{}", p.name);
    } else {
        assert_eq!(h.n_ff, p.n_ff);
    }
    assert_eq!(h.sliding_window, p.sliding_window);
    let scale = p.rope_linear.or(p.yarn.map(|y| y.factor)).unwrap_or(1.0);
    assert_eq!(h.rope_linear_scale, scale);
    assert_eq!(s.rope_freqs.is_some(), p.llama3_rope.is_some());
    let windowed = s.layers.iter().filter(|l| l.window.is_some()).count();
    match p.arch {
        Arch::Gemma3 => {
            assert_eq!(windowed, p.n_layer - p.n_layer / 6);
            assert!((h.embed_scale - (p.n_embd as f32).sqrt()).abs() < 1e-3);
        }
        Arch::GptOss => {
            assert_eq!(windowed, p.n_layer / 2);
            assert_eq!(h.embed_scale, 1.0);
        }
        _ => {
            assert_eq!(windowed, 0);
            assert_eq!(h.embed_scale, 1.0);
        }
    }
    let roles = |l: usize| -> Vec<GroupRole> {
        s.layers[l]
            .groups
            .iter()
            .map(|&g| s.group(g).role)
            .collect()
    };
    for l in 0..p.n_layer {
        let want = if p.n_expert == 0 || l < p.n_layer_dense_lead {
            vec![GroupRole::Attn, GroupRole::Ffn]
        } else if p.n_expert_shared > 0 {
            vec![
                GroupRole::Attn,
                GroupRole::Router,
                GroupRole::Experts,
                GroupRole::SharedExperts,
            ]
        } else {
            vec![GroupRole::Attn, GroupRole::Router, GroupRole::Experts]
        };
        assert_eq!(roles(l), want, "{} layer {l}", p.name);
    }
}

#[test]
fn every_preset_and_recipe_reads_back() {
    for name in preset_names() {
        let p = preset(name).unwrap();
        for r in QuantRecipe::ALL {
            let s = spec_of(&p, r);
            check_hparams(&p, &s);
            // Every tensor is the spec's, but the multi-token-prediction layers'.
            let pl = plan(&p, r);
            let unused = s.unused_file_tensors(pl.tensors.len());
            assert!(
                unused.iter().all(|&i| pl.tensors[i]
                    .name
                    .starts_with(&format!("blk.{}.", p.n_layer))),
                "{name}: unused tensors outside the MTP layer"
            );
            let unused_bytes: u64 = unused.iter().map(|&i| pl.tensors[i].bytes()).sum();
            assert_eq!(
                bytes::file_bytes(&s) + unused_bytes,
                pl.tensor_bytes(),
                "{name} {}",
                r.name()
            );
        }
    }
    assert!(preset("no-such-model").is_none());
}

fn gib(p: &str, r: QuantRecipe) -> String {
    let b = plan(&preset(p).unwrap(), r).tensor_bytes();
    format!("{:.2}", b as f64 / (1u64 << 30) as f64)
}

#[test]
fn sizes_match_llama_bench() {
    // llama-bench's "size" is the total tensor bytes; values from ARCHITECTURE.md's table.
    assert_eq!(gib("llama3-8b", QuantRecipe::Q4_K), "4.33");
    assert_eq!(
        plan(&preset("llama3-8b").unwrap(), QuantRecipe::Q4_K).tensor_bytes(),
        4_653_375_488
    );
    assert_eq!(gib("qwen2.5-32b", QuantRecipe::Q4_K), "17.35");
    assert_eq!(gib("qwen3-30b-a3b", QuantRecipe::Q4_K), "16.11");
}

#[test]
fn q4_k_m_matches_a_real_llama_cpp_file() {
    let Some(path) = pshard_testkit::real_model("gemma-3-270m-q4_k_m.gguf") else {
        return;
    };
    let real = ModelFile::open(&path).unwrap();
    let synth = plan(&preset("gemma3-270m").unwrap(), QuantRecipe::Q4_K_M);
    assert_eq!(real.tensors().len(), synth.tensors.len());
    for t in &synth.tensors {
        let i = real
            .tensor_index(&t.name)
            .unwrap_or_else(|| panic!("{} not in the real file", t.name));
        let r = &real.tensors()[i];
        assert_eq!((&r.dims, r.ty), (&t.dims, t.ty), "{}", t.name);
    }
    assert_eq!(synth.tensor_bytes(), real.tensor_data_bytes());
}

#[test]
fn q4_k_m_mix_bumps_attn_v_and_ffn_down() {
    let s = spec_of(&preset("llama3-8b").unwrap(), QuantRecipe::Q4_K_M);
    use pshard_model::ggml_type::GgmlType as T;
    use pshard_model::spec::TensorRole as R;
    let ty = |l: usize, r: R| s.tensor(s.find(Some(l), r).unwrap()).ty;
    // 32 layers: use_more_bits → 0..4, 6, 9, ..., 27, 28..32.
    for l in 0..32 {
        let more = !(4..28).contains(&l) || (l - 4) % 3 == 2;
        let want = if more { T::Q6_K } else { T::Q4_K };
        assert_eq!(
            (ty(l, R::AttnV), ty(l, R::FfnDown)),
            (want, want),
            "layer {l}"
        );
        assert_eq!(ty(l, R::AttnQ), T::Q4_K);
    }
    assert_eq!(s.tensor(s.find(None, R::Output).unwrap()).ty, T::Q6_K);
    assert_eq!(s.tensor(s.find(None, R::TokenEmbd).unwrap()).ty, T::Q4_K);
    // Mixtral (8 experts): attn_v and attn_k Q8_0, attn_output Q5_K.
    let m = spec_of(&preset("mixtral-8x7b").unwrap(), QuantRecipe::Q4_K_M);
    let mty = |r: R| m.tensor(m.find(Some(10), r).unwrap()).ty;
    assert_eq!(
        (mty(R::AttnV), mty(R::AttnK), mty(R::AttnOutput)),
        (T::Q8_0, T::Q8_0, T::Q5_K)
    );
    // 70B: attn_v of the other layers Q5_K.
    let b = spec_of(&preset("llama3-70b").unwrap(), QuantRecipe::Q4_K_M);
    assert_eq!(b.tensor(b.find(Some(11), R::AttnV).unwrap()).ty, T::Q5_K);
    assert_eq!(b.tensor(b.find(Some(12), R::AttnV).unwrap()).ty, T::Q6_K);
}

/// A deepseek2 file without `attention.q_lora_rank` and without `attn_q_a` projects queries
/// directly whatever its layer count (llama.cpp tells its "lite" models by 26/27 layers, which a
/// model cut to 2 layers no longer has); the catalogue reads the rank as 0.
#[test]
fn deepseek2_without_query_compression_reads_at_any_layer_count() {
    let mut p = preset("deepseek-v2-lite").unwrap();
    p.n_layer = 2;
    let s = spec_of(&p, QuantRecipe::from_name("q4_k").unwrap());
    assert_eq!(s.hparams.n_layer, 2);
    let mla = s.hparams.mla.as_ref().expect("latent attention");
    assert_eq!(mla.q_lora_rank, 0);
}
