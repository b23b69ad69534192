//! Catalogue: errors (unsupported architectures, missing keys, missing and ill-shaped tensors) and
//! hparams read as llama.cpp reads them (gemma3's window pattern and local rope base, softcaps,
//! expert widths, top-k renormalization).

use pshard_model::catalogue::SpecError;
use pshard_model::gguf::{GgufHeader, MetaValue};
use pshard_model::spec::{GroupRole, ModelSpec, TensorRole};
use pshard_model::synth::{plan, preset, QuantRecipe};

fn header(name: &str) -> GgufHeader {
    plan(&preset(name).unwrap(), QuantRecipe::Q8_0)
        .header()
        .unwrap()
}

fn build(h: &GgufHeader) -> Result<ModelSpec, SpecError> {
    ModelSpec::from_gguf(h, &h.tensors, "test")
}

fn set(h: &mut GgufHeader, key: &str, v: MetaValue) {
    match h.metadata.iter_mut().find(|(k, _)| k == key) {
        Some(slot) => slot.1 = v,
        None => h.metadata.push((key.to_string(), v)),
    }
}

#[test]
fn unsupported_architecture_lists_supported() {
    let mut h = header("tiny-llama");
    set(
        &mut h,
        "general.architecture",
        MetaValue::String("mamba".into()),
    );
    let e = build(&h).unwrap_err().to_string();
    assert!(
        e.contains("mamba") && e.contains("llama, qwen2, qwen3, qwen3moe, gemma3"),
        "{e}"
    );
}

#[test]
fn missing_key_is_named() {
    let mut h = header("tiny-qwen3");
    h.metadata
        .retain(|(k, _)| k != "qwen3.attention.layer_norm_rms_epsilon");
    let e = build(&h).unwrap_err().to_string();
    assert!(e.contains("qwen3.attention.layer_norm_rms_epsilon"), "{e}");
}

#[test]
fn missing_tensor_names_it_and_its_shape() {
    let mut h = header("tiny-qwen2");
    h.tensors.retain(|t| t.name != "blk.1.attn_k.bias");
    match build(&h) {
        Err(SpecError::MissingTensor { name, expected }) => {
            assert_eq!(name, "blk.1.attn_k.bias");
            assert_eq!(expected, vec![2 * 32]);
        }
        other => panic!("expected MissingTensor, got {other:?}"),
    }
    let mut h = header("tiny-gemma3");
    h.tensors.retain(|t| t.name != "blk.6.post_ffw_norm.weight");
    let e = build(&h).unwrap_err().to_string();
    assert!(
        e.contains("blk.6.post_ffw_norm.weight") && e.contains("[128]"),
        "{e}"
    );
}

#[test]
fn ill_shaped_tensor_names_expected_and_found() {
    let mut h = header("tiny-qwen3moe");
    let t = h
        .tensors
        .iter_mut()
        .find(|t| t.name == "blk.0.ffn_down_exps.weight")
        .unwrap();
    t.dims = vec![64, 128, 4];
    match build(&h) {
        Err(SpecError::IllShapedTensor {
            name,
            expected,
            found,
        }) => {
            assert_eq!(name, "blk.0.ffn_down_exps.weight");
            assert_eq!(expected, vec![64, 128, 8]);
            assert_eq!(found, vec![64, 128, 4]);
        }
        other => panic!("expected IllShapedTensor, got {other:?}"),
    }
    let mut h = header("tiny-llama");
    h.tensors
        .iter_mut()
        .find(|t| t.name == "blk.1.attn_q.weight")
        .unwrap()
        .dims = vec![256, 128];
    let e = build(&h).unwrap_err().to_string();
    assert!(
        e.contains("blk.1.attn_q.weight") && e.contains("[256, 128]") && e.contains("[256, 256]"),
        "{e}"
    );
}

#[test]
fn unsupported_rope_scaling_is_named() {
    let mut h = header("tiny-qwen2");
    set(
        &mut h,
        "qwen2.rope.scaling.type",
        MetaValue::String("longrope".into()),
    );
    let e = build(&h).unwrap_err();
    assert!(
        matches!(e, SpecError::UnsupportedRopeScaling { ref kind } if kind == "longrope"),
        "{e}"
    );
    // YaRN is supported but needs its factor.
    set(
        &mut h,
        "qwen2.rope.scaling.type",
        MetaValue::String("yarn".into()),
    );
    let e = build(&h).unwrap_err();
    assert!(
        matches!(e, SpecError::MissingKey { ref key } if key == "qwen2.rope.scaling.factor"),
        "{e}"
    );
}

#[test]
fn linear_rope_scaling_and_softcaps_are_read() {
    let mut h = header("tiny-gemma3");
    set(
        &mut h,
        "gemma3.attn_logit_softcapping",
        MetaValue::F32(50.0),
    );
    set(
        &mut h,
        "gemma3.final_logit_softcapping",
        MetaValue::F32(30.0),
    );
    let s = build(&h).unwrap();
    assert_eq!(s.hparams.rope_linear_scale, 8.0);
    assert_eq!(s.layers[5].rope_linear_scale, 8.0);
    assert_eq!(s.layers[4].rope_linear_scale, 1.0);
    // llama.cpp's gemma3 never applies attention logit softcapping; the final one it reads.
    assert_eq!(
        (s.hparams.attn_softcap, s.hparams.final_softcap),
        (None, Some(30.0))
    );
    set(
        &mut h,
        "gemma3.final_logit_softcapping",
        MetaValue::F32(0.0),
    );
    assert_eq!(build(&h).unwrap().hparams.final_softcap, None, "0 is none");
    // Other architectures read neither key.
    let mut q = header("tiny-qwen3");
    set(&mut q, "qwen3.attn_logit_softcapping", MetaValue::F32(50.0));
    set(
        &mut q,
        "qwen3.final_logit_softcapping",
        MetaValue::F32(30.0),
    );
    let s = build(&q).unwrap();
    assert_eq!(
        (s.hparams.attn_softcap, s.hparams.final_softcap),
        (None, None)
    );
}

/// Indices of the layers without a sliding window.
fn global_layers(s: &ModelSpec) -> Vec<usize> {
    s.layers
        .iter()
        .filter(|l| l.window.is_none())
        .map(|l| l.index)
        .collect()
}

#[test]
fn gemma3_window_pattern_is_read_from_the_file() {
    // gemma3-270m: 18 layers, window 512, rope bases 1e6 (global) and 1e4 (local by default).
    let h = header("gemma3-270m");
    let s = build(&h).unwrap();
    assert_eq!(global_layers(&s), vec![5, 11, 17]);
    assert_eq!(s.hparams.rope_base_local, 10_000.0);
    // A period: layer il slides when il % n < n - 1; 0 slides everywhere, 1 nowhere.
    for (n, want) in [
        (4u32, vec![3, 7, 11, 15]),
        (0, vec![]),
        (1, (0..18).collect::<Vec<_>>()),
    ] {
        let mut h = h.clone();
        set(
            &mut h,
            "gemma3.attention.sliding_window_pattern",
            MetaValue::U32(n),
        );
        assert_eq!(global_layers(&build(&h).unwrap()), want, "period {n}");
    }
    // A per-layer array (true: sliding); layers past its end attend globally.
    let mut h2 = h.clone();
    let arr: Vec<MetaValue> = (0..6).map(|il| MetaValue::Bool(il % 2 == 0)).collect();
    set(
        &mut h2,
        "gemma3.attention.sliding_window_pattern",
        MetaValue::Array(pshard_model::gguf::MetaType::Bool, arr),
    );
    let s = build(&h2).unwrap();
    assert_eq!(
        global_layers(&s),
        [1, 3, 5].into_iter().chain(6..18).collect::<Vec<_>>()
    );
    assert_eq!(s.layers[0].window, Some(512));
    // The local rope base.
    let mut h3 = h.clone();
    set(
        &mut h3,
        "gemma3.rope.freq_base_swa",
        MetaValue::F32(20_000.0),
    );
    let s = build(&h3).unwrap();
    assert_eq!(s.layers[0].rope_base, 20_000.0);
    assert_eq!(s.layers[5].rope_base, 1_000_000.0);
    assert_eq!(s.hparams.rope_base_local, 20_000.0);
    // A pattern of another type is named.
    let mut h4 = h.clone();
    set(
        &mut h4,
        "gemma3.attention.sliding_window_pattern",
        MetaValue::Array(
            pshard_model::gguf::MetaType::String,
            vec![MetaValue::String("x".into())],
        ),
    );
    let e = build(&h4).unwrap_err().to_string();
    assert!(e.contains("gemma3.attention.sliding_window_pattern"), "{e}");
}

#[test]
fn gemma3_without_a_window_attends_globally_everywhere() {
    for w in [None, Some(0u32)] {
        let mut h = header("gemma3-270m");
        h.metadata
            .retain(|(k, _)| k != "gemma3.attention.sliding_window");
        if let Some(w) = w {
            set(&mut h, "gemma3.attention.sliding_window", MetaValue::U32(w));
        }
        set(
            &mut h,
            "gemma3.rope.freq_base_swa",
            MetaValue::F32(20_000.0),
        );
        let s = build(&h).unwrap();
        assert_eq!(s.hparams.sliding_window, None, "window {w:?}");
        assert_eq!(global_layers(&s), (0..18).collect::<Vec<_>>());
        assert!(s.layers.iter().all(|l| l.rope_base == 1_000_000.0));
    }
}

#[test]
fn llama_moe_expert_width_is_feed_forward_length() {
    // llama.cpp's llama never reads expert_feed_forward_length.
    let mut h = header("tiny-mixtral");
    set(
        &mut h,
        "llama.expert_feed_forward_length",
        MetaValue::U32(999),
    );
    assert_eq!(build(&h).unwrap().hparams.n_ff_expert, 256);
}

#[test]
fn qwen3moe_expert_width_falls_back_to_ff_over_experts_used() {
    // tiny-qwen3moe: experts 64 wide, 2 used per token.
    let mut h = header("tiny-qwen3moe");
    h.metadata
        .retain(|(k, _)| k != "qwen3moe.expert_feed_forward_length");
    set(&mut h, "qwen3moe.feed_forward_length", MetaValue::U32(128));
    assert_eq!(build(&h).unwrap().hparams.n_ff_expert, 64);
    set(&mut h, "qwen3moe.feed_forward_length", MetaValue::U32(256));
    let e = build(&h).unwrap_err().to_string();
    assert!(e.contains("ffn_gate_exps") && e.contains("128"), "{e}");
}

#[test]
fn old_per_expert_mixtral_layout_is_rejected_clearly() {
    let mut h = header("tiny-mixtral");
    let mut t = h.tensors[0].clone();
    t.name = "blk.0.ffn_gate.0.weight".into();
    h.tensors.push(t);
    let e = build(&h).unwrap_err().to_string();
    assert!(e.contains("per-expert") && e.contains("re-convert"), "{e}");
}

#[test]
fn moe_top_k_weights_are_always_renormalized() {
    // llama.cpp's llama and qwen3moe graphs renormalize whatever expert_weights_norm says.
    for (name, key) in [
        ("tiny-qwen3moe", "qwen3moe.expert_weights_norm"),
        ("tiny-mixtral", "llama.expert_weights_norm"),
    ] {
        let mut h = header(name);
        assert!(build(&h).unwrap().hparams.expert_weights_norm);
        set(&mut h, key, MetaValue::Bool(false));
        assert!(build(&h).unwrap().hparams.expert_weights_norm, "{name}");
    }
    assert!(
        !build(&header("tiny-llama"))
            .unwrap()
            .hparams
            .expert_weights_norm
    );
}

#[test]
fn shared_experts_form_their_own_group() {
    use pshard_model::ggml_type::GgmlType;
    use pshard_model::gguf::TensorInfo;

    let mut h = header("tiny-qwen3moe");
    set(
        &mut h,
        "qwen3moe.expert_shared_feed_forward_length",
        MetaValue::U32(96),
    );
    for l in 0..2 {
        for (n, dims) in [
            ("gate", [128u64, 96]),
            ("up", [128, 96]),
            ("down", [96, 128]),
        ] {
            h.tensors.push(TensorInfo {
                name: format!("blk.{l}.ffn_{n}_shexp.weight"),
                dims: dims.to_vec(),
                ty: GgmlType::F16,
                offset: 0,
                bytes: 96 * 128 * 2,
            });
        }
    }
    let s = build(&h).unwrap();
    assert_eq!(s.hparams.n_ff_shared_expert, 96);
    let g = s.layer_group(1, GroupRole::SharedExperts).unwrap();
    assert_eq!(s.group(g).tensors.len(), 3);
    assert_eq!(s.group(g).bytes, 3 * 96 * 128 * 2);
    let roles: Vec<GroupRole> = s.layers[1]
        .groups
        .iter()
        .map(|&g| s.group(g).role)
        .collect();
    assert_eq!(
        roles,
        [
            GroupRole::Attn,
            GroupRole::Router,
            GroupRole::Experts,
            GroupRole::SharedExperts
        ]
    );
    // A partial set of shared-expert tensors names the missing one.
    h.tensors.retain(|t| t.name != "blk.1.ffn_up_shexp.weight");
    let e = build(&h).unwrap_err().to_string();
    assert!(
        e.contains("blk.1.ffn_up_shexp.weight") && e.contains("[128, 96]"),
        "{e}"
    );
}

/// gpt-oss as llama.cpp reads it: even layers slide (period 2), every layer keeps the YaRN scale,
/// rope magnitude 1 + 0.1 ln(factor), softmax after the top k, no renormalisation.
#[test]
fn gpt_oss_hparams() {
    use pshard_model::spec::Gating;
    let h = header("tiny-gpt-oss");
    let s = build(&h).unwrap();
    let windows: Vec<Option<usize>> = s.layers.iter().map(|l| l.window).collect();
    assert_eq!(windows, [Some(16), None, Some(16), None]);
    assert!(s.layers.iter().all(|l| l.rope_linear_scale == 32.0));
    let y = s.hparams.yarn.unwrap();
    assert_eq!(y.orig_ctx, 4096);
    assert!((y.mscale - (1.0 + 0.1 * 32f32.ln())).abs() < 1e-6);
    // ggml's correction range for 32 rotated dims at base 150,000: pairs 4 to 9.
    assert_eq!(y.corr_dims(32, 150_000.0), [4.0, 9.0]);
    assert_eq!(s.hparams.gating, Gating::SoftmaxAfterTopK);
    assert!(!s.hparams.expert_weights_norm);
    assert_eq!(s.hparams.attn_scale, 1.0 / 32f32.sqrt());
    assert!(s.find(Some(3), TensorRole::AttnSinks).is_some());
    assert!(s.find(Some(0), TensorRole::FfnDownExpsBias).is_some());
    // A pattern in the file wins over the period.
    let mut h2 = h.clone();
    set(
        &mut h2,
        "gpt-oss.attention.sliding_window_pattern",
        MetaValue::Array(
            pshard_model::gguf::MetaType::Bool,
            vec![MetaValue::Bool(false), MetaValue::Bool(true)],
        ),
    );
    let s = build(&h2).unwrap();
    let windows: Vec<Option<usize>> = s.layers.iter().map(|l| l.window).collect();
    assert_eq!(windows, [None, Some(16), None, None]);
    // The window is required.
    let mut h3 = h;
    h3.metadata
        .retain(|(k, _)| k != "gpt-oss.attention.sliding_window");
    let e = build(&h3).unwrap_err().to_string();
    assert!(e.contains("gpt-oss.attention.sliding_window"), "{e}");
}

/// glm4moe: the multi-token-prediction layer is not a decoder layer, one dense layer leads,
/// sigmoid gating by default, the weight scale and renormalisation from the file.
#[test]
fn glm4moe_hparams() {
    use pshard_model::spec::Gating;
    let mut h = header("tiny-glm4moe");
    let s = build(&h).unwrap();
    assert_eq!((s.hparams.n_layer, s.hparams.n_nextn_layers), (3, 1));
    assert_eq!(s.layers.len(), 3);
    assert!(s.layer_group(0, GroupRole::Ffn).is_some());
    assert!(s.layer_group(1, GroupRole::SharedExperts).is_some());
    assert_eq!(s.hparams.n_ff_shared_expert, 64);
    assert_eq!(s.hparams.gating, Gating::Sigmoid);
    assert_eq!(s.hparams.expert_weights_scale, 2.5);
    assert!(s.hparams.expert_weights_norm);
    assert_eq!(s.hparams.rope_dims, 16);
    let unused = s.unused_file_tensors(h.tensors.len());
    assert!(unused
        .iter()
        .all(|&i| h.tensors[i].name.starts_with("blk.3.")));
    assert!(!unused.is_empty());
    // Without the key: still sigmoid (llama.cpp's default for glm4moe).
    h.metadata
        .retain(|(k, _)| k != "glm4moe.expert_gating_func");
    assert_eq!(build(&h).unwrap().hparams.gating, Gating::Sigmoid);
    set(&mut h, "glm4moe.expert_gating_func", MetaValue::U32(4));
    let e = build(&h).unwrap_err().to_string();
    assert!(e.contains("expert_gating_func"), "{e}");
}

/// deepseek2: latent attention shapes, its YaRN-corrected score scale, group-limited routing;
/// the lite variants never read q_lora_rank; pre-MLA files are refused by name.
#[test]
fn deepseek2_hparams() {
    let h = header("tiny-deepseek2");
    let s = build(&h).unwrap();
    let m = s.hparams.mla.unwrap();
    assert_eq!(
        (m.q_lora_rank, m.kv_lora_rank, m.nope, m.head_dim_v),
        (64, 64, 32, 32)
    );
    assert_eq!((s.hparams.head_dim_k, s.hparams.head_dim_v), (80, 64));
    assert_eq!((s.hparams.n_expert_groups, s.hparams.n_group_used), (4, 2));
    let ms = 1.0 + 0.1 * 0.707f32 * 40f32.ln();
    assert!((s.hparams.attn_scale - ms * ms / 48f32.sqrt()).abs() < 1e-6);
    // YaRN's own magnitude cancels for deepseek2.
    assert!((s.hparams.yarn.unwrap().mscale - 1.0).abs() < 1e-6);
    assert_eq!(pshard_model::bytes::kv_cols(&s, 1), (80, 0));
    // DeepSeek-V2-Lite (27 layers) projects queries directly even when the key is present.
    let mut lite = plan(&preset("deepseek-v2-lite").unwrap(), QuantRecipe::Q4_K_M)
        .header()
        .unwrap();
    set(
        &mut lite,
        "deepseek2.attention.q_lora_rank",
        MetaValue::U32(1536),
    );
    let s = build(&lite).unwrap();
    assert_eq!(s.hparams.mla.unwrap().q_lora_rank, 0);
    assert!(s.find(Some(0), TensorRole::AttnQ).is_some());
    // A file converted before MLA (joint attn_kv_b, no key_length_mla).
    let mut old = h.clone();
    old.metadata
        .retain(|(k, _)| !k.ends_with("key_length_mla") && !k.ends_with("value_length_mla"));
    for t in old.tensors.iter_mut() {
        if t.name.ends_with("attn_k_b.weight") {
            t.name = t.name.replace("attn_k_b", "attn_kv_b");
        }
    }
    let e = build(&old).unwrap_err().to_string();
    assert!(e.contains("attn_kv_b") && e.contains("re-convert"), "{e}");
    // Groups must divide the experts.
    let mut bad = h;
    set(&mut bad, "deepseek2.expert_group_count", MetaValue::U32(3));
    let e = build(&bad).unwrap_err().to_string();
    assert!(e.contains("expert_group"), "{e}");
}

/// `block_count` must match the blocks the tensors hold: an absurd count is refused before
/// anything is sized by it (it used to allocate 240 GB of layer descriptions), and a count smaller
/// than the tensors present is not allowed to ignore the extra layers.
#[test]
fn block_count_must_match_the_tensors() {
    let h0 = header("tiny-llama");
    let n = h0.get_u64("llama.block_count").unwrap();
    for bad in [u64::from(u32::MAX), n + 1, n - 1, 0] {
        let mut h = h0.clone();
        set(&mut h, "llama.block_count", MetaValue::U32(bad as u32));
        let e = build(&h).expect_err("bad block_count").to_string();
        assert!(e.contains("llama.block_count"), "{bad}: {e}");
        if bad != 0 {
            assert!(e.contains(&format!("hold {n} blocks")), "{bad}: {e}");
        }
    }
    // A stray tensor of a block past the count.
    let mut h = h0.clone();
    let mut extra = h.tensors[1].clone();
    extra.name = format!("blk.{n}.attn_norm.weight");
    h.tensors.push(extra);
    let e = build(&h).expect_err("extra block").to_string();
    assert!(e.contains(&format!("hold {} blocks", n + 1)), "{e}");
}

/// Float hparams are checked where they are read: NaN, infinite, zero or negative values of the
/// RMS epsilon and the rope base, and NaN or negative final softcaps (0 there means none), are
/// refused with the key and the accepted range. gemma3's `attn_logit_softcapping` is not read at
/// all (llama.cpp ignores it for gemma3 too).
#[test]
fn float_hparams_out_of_range_are_refused() {
    let cases: [(&str, &str, &[f32]); 3] = [
        (
            "tiny-llama",
            "llama.attention.layer_norm_rms_epsilon",
            &[f32::NAN, -1e-5, 0.0, 1.0, f32::INFINITY],
        ),
        (
            "tiny-llama",
            "llama.rope.freq_base",
            &[f32::NAN, -10_000.0, 0.0, 1.0, f32::INFINITY],
        ),
        (
            "tiny-gemma3",
            "gemma3.final_logit_softcapping",
            &[f32::NAN, -30.0, f32::NEG_INFINITY],
        ),
    ];
    for (preset_name, key, values) in cases {
        for &v in values {
            let mut h = header(preset_name);
            set(&mut h, key, MetaValue::F32(v));
            let e = build(&h)
                .expect_err(&format!("{key} = {v} accepted"))
                .to_string();
            assert!(e.contains(key) && e.contains("out of range"), "{e}");
        }
    }
}

/// Size hparams are bounded where they are read, so no product of two of them can overflow.
#[test]
fn size_hparams_out_of_range_are_refused() {
    for (key, v) in [
        ("llama.attention.head_count", u64::MAX),
        ("llama.attention.key_length", 1 << 40),
        ("llama.context_length", 0),
        ("llama.context_length", 1 << 33),
        ("llama.feed_forward_length", 1 << 32),
    ] {
        let mut h = header("tiny-llama");
        set(&mut h, key, MetaValue::U64(v));
        let e = build(&h).expect_err(&format!("{key} = {v}")).to_string();
        assert!(e.contains(key) && e.contains("out of range"), "{e}");
    }
}
