//! The reader on the real test models (each test SKIPs with a message when its model is absent):
//! parsing, known tensors, zero-copy views, and truncation at sampled offsets.

use std::path::PathBuf;

use pshard_model::ggml_type::GgmlType;
use pshard_model::gguf::{GgufHeader, MetaType, ModelFile};

fn model(name: &str) -> Option<PathBuf> {
    pshard_testkit::real_model(name)
}

const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const GEMMA3: &str = "gemma-3-270m-q4_k_m.gguf";

/// Checks what holds for any well-formed single file: data views lie in the map, sizes add up.
fn check_views(m: &ModelFile) {
    let map = m.split_bytes(0);
    let map_range = map.as_ptr() as usize..map.as_ptr() as usize + map.len();
    let mut sum = 0;
    for (i, t) in m.tensors().iter().enumerate() {
        let d = m.tensor_data(i);
        assert_eq!(d.len() as u64, t.bytes, "{}", t.name);
        // Zero copy: the view points into the map.
        assert!(
            map_range.contains(&(d.as_ptr() as usize)),
            "{} is not a view of the map",
            t.name
        );
        let (split, r) = m.map_ranges(i);
        assert_eq!(split, 0);
        assert_eq!(r.start, m.header().data_offset + t.offset);
        assert_eq!(r.start % m.header().alignment, 0);
        sum += t.bytes;
    }
    assert_eq!(m.tensor_data_bytes(), sum);
    assert!(m.header().data_offset + sum <= m.file_size());
    assert_eq!(
        m.file_size(),
        std::fs::metadata(&m.paths()[0]).unwrap().len()
    );
}

#[test]
fn smollm2_parses() {
    let Some(path) = model(SMOLLM2) else { return };
    let t0 = std::time::Instant::now();
    let m = ModelFile::open(&path).unwrap();
    eprintln!("{SMOLLM2}: opened and validated in {:?}", t0.elapsed());
    let h = m.header();
    assert_eq!(h.version, 3);
    assert_eq!(h.alignment, 32);
    assert_eq!(m.tensors().len(), 272);
    assert_eq!(h.metadata.len(), 33);
    assert_eq!(h.get_str("general.architecture"), Some("llama"));
    assert_eq!(h.get_u64("llama.block_count"), Some(30));
    assert_eq!(h.get_u64("llama.embedding_length"), Some(576));
    assert_eq!(h.get_i64("llama.attention.head_count_kv"), Some(3));
    assert_eq!(h.get_f32("llama.rope.freq_base"), Some(100000.0));
    assert_eq!(h.get_bool("tokenizer.ggml.add_bos_token"), Some(false));
    let (ty, tokens) = h.get_array("tokenizer.ggml.tokens").unwrap();
    assert_eq!(ty, MetaType::String);
    assert_eq!(tokens.len(), 49152);
    assert_eq!(tokens[1].as_str(), Some("<|im_start|>"));
    let (ty, merges) = h.get_array("tokenizer.ggml.merges").unwrap();
    assert_eq!(ty, MetaType::String);
    assert!(merges.len() > 40_000);

    let t = &m.tensors()[m.tensor_index("token_embd.weight").unwrap()];
    assert_eq!(
        (t.dims.as_slice(), t.ty),
        (&[576u64, 49152][..], GgmlType::Q8_0)
    );
    assert_eq!(t.bytes, 576 / 32 * 34 * 49152);
    let t = &m.tensors()[m.tensor_index("blk.0.ffn_down.weight").unwrap()];
    assert_eq!(
        (t.dims.as_slice(), t.ty),
        (&[1536u64, 576][..], GgmlType::Q4_1)
    );
    let t = &m.tensors()[m.tensor_index("output_norm.weight").unwrap()];
    assert_eq!((t.dims.as_slice(), t.ty), (&[576u64][..], GgmlType::F32));
    // Tied embeddings: no output.weight.
    assert_eq!(m.tensor_index("output.weight"), None);
    let mut types: Vec<GgmlType> = m.tensors().iter().map(|t| t.ty).collect();
    types.sort();
    types.dedup();
    assert_eq!(types, vec![GgmlType::F32, GgmlType::Q4_1, GgmlType::Q8_0]);
    check_views(&m);
    // The norm weights are ordinary finite floats near 1 (data view points at the right bytes).
    let d = m.tensor_data(m.tensor_index("output_norm.weight").unwrap());
    let first = f32::from_le_bytes(d[..4].try_into().unwrap());
    assert!(first.is_finite() && first.abs() < 100.0, "{first}");
}

#[test]
fn gemma3_parses() {
    let Some(path) = model(GEMMA3) else { return };
    let m = ModelFile::open(&path).unwrap();
    let h = m.header();
    assert_eq!(h.get_str("general.architecture"), Some("gemma3"));
    assert_eq!(h.get_u64("gemma3.block_count"), Some(18));
    assert_eq!(h.get_u64("gemma3.attention.key_length"), Some(256));
    assert_eq!(m.tensors().len(), 236);
    let t = &m.tensors()[m.tensor_index("token_embd.weight").unwrap()];
    assert_eq!(t.dims, vec![640, 262144]);
    assert!(m.tensor_index("blk.17.attn_q_norm.weight").is_some());
    let mut types: Vec<GgmlType> = m.tensors().iter().map(|t| t.ty).collect();
    types.sort();
    types.dedup();
    eprintln!("{GEMMA3}: {} tensors, types {types:?}", m.tensors().len());
    assert!(types.contains(&GgmlType::Q4_K) && types.contains(&GgmlType::Q6_K));
    check_views(&m);
}

/// Truncating the real file anywhere before the end of its last tensor is an error, never a panic:
/// every byte of the first 2 KiB (magic, counts, the scalar metadata), ~100 points in the vocabulary
/// arrays, ~100 in the tensor-info table, ~40 in the tensor data.
#[test]
fn smollm2_truncated_at_sampled_offsets_is_an_error() {
    let Some(path) = model(SMOLLM2) else { return };
    let bytes = std::fs::read(&path).unwrap();
    let full = GgufHeader::parse(&bytes, "full").unwrap();
    let data_end = (full.data_offset
        + full
            .tensors
            .iter()
            .map(|t| t.offset + t.bytes)
            .max()
            .unwrap()) as usize;
    let header_end = full.data_offset as usize;
    // The tensor-info table starts with the first tensor's name (after its 8-byte length).
    let name = full.tensors[0].name.as_bytes();
    let infos = bytes.windows(name.len()).rposition(|w| w == name).unwrap() - 8;
    assert!(infos > 2048 && infos < header_end);
    let spread =
        |from: usize, to: usize, n: usize| (0..n).map(move |i| from + i * (to - from) / n + i % 7);
    let mut cuts: Vec<usize> = (0..2048).collect();
    cuts.extend(spread(2048, infos, 100));
    cuts.extend(spread(infos, header_end, 100));
    cuts.extend(spread(header_end, data_end, 40));
    cuts.extend([
        infos - 1,
        infos,
        infos + 1,
        header_end - 1,
        header_end,
        header_end + 1,
        data_end - 1,
    ]);
    let t0 = std::time::Instant::now();
    for &n in &cuts {
        assert!(n < data_end);
        let e =
            GgufHeader::parse(&bytes[..n], "cut").expect_err(&format!("truncated at {n} parsed"));
        assert!(
            e.offset <= n as u64,
            "cut at {n}: error offset {} past the end",
            e.offset
        );
        assert!(e.to_string().starts_with("cut: at byte "), "{e}");
    }
    eprintln!(
        "{} truncations of {SMOLLM2}: all errors, {:?}",
        cuts.len(),
        t0.elapsed()
    );
    assert!(GgufHeader::parse(&bytes[..data_end], "exact").is_ok());
}
