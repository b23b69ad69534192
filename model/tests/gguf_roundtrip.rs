//! The writer: every metadata type and tensors of several types read back identically; chunked streaming
//! gives the same bytes; misuse is an error.

use pshard_model::ggml_type::GgmlType;
use pshard_model::gguf::writer::write_to_vec;
use pshard_model::gguf::{GgufHeader, GgufWriter, MetaType, MetaValue};

/// One key per metadata type, plus nested arrays (of arrays, of strings, empty).
fn all_metadata() -> Vec<(String, MetaValue)> {
    use MetaValue as V;
    let strs = |v: &[&str]| {
        V::Array(
            MetaType::String,
            v.iter().map(|s| V::String(s.to_string())).collect(),
        )
    };
    vec![
        ("general.architecture".into(), V::String("llama".into())),
        ("t.u8".into(), V::U8(200)),
        ("t.i8".into(), V::I8(-100)),
        ("t.u16".into(), V::U16(60000)),
        ("t.i16".into(), V::I16(-30000)),
        ("t.u32".into(), V::U32(4_000_000_000)),
        ("t.i32".into(), V::I32(-2_000_000_000)),
        ("t.f32".into(), V::F32(-1.5e-7)),
        ("t.bool_t".into(), V::Bool(true)),
        ("t.bool_f".into(), V::Bool(false)),
        ("t.string".into(), V::String("héllo ✓ \u{0}".into())),
        ("t.empty_string".into(), V::String(String::new())),
        ("t.u64".into(), V::U64(u64::MAX)),
        ("t.i64".into(), V::I64(i64::MIN)),
        ("t.f64".into(), V::F64(std::f64::consts::PI)),
        (
            "t.arr_i32".into(),
            V::Array(MetaType::I32, vec![V::I32(1), V::I32(-2), V::I32(3)]),
        ),
        (
            "t.arr_f32".into(),
            V::Array(MetaType::F32, vec![V::F32(0.5), V::F32(f32::INFINITY)]),
        ),
        (
            "t.arr_bool".into(),
            V::Array(MetaType::Bool, vec![V::Bool(true), V::Bool(false)]),
        ),
        (
            "t.arr_u8".into(),
            V::Array(MetaType::U8, (0..=255).map(V::U8).collect()),
        ),
        ("t.arr_str".into(), strs(&["a", "", "Ġthe", "<0x0A>"])),
        ("t.arr_empty".into(), V::Array(MetaType::U64, vec![])),
        (
            "t.arr_arr".into(),
            V::Array(
                MetaType::Array,
                vec![
                    strs(&["x", "y"]),
                    V::Array(MetaType::U16, vec![V::U16(7)]),
                    V::Array(
                        MetaType::Array,
                        vec![V::Array(MetaType::F64, vec![V::F64(-0.0)])],
                    ),
                    V::Array(MetaType::Bool, vec![]),
                ],
            ),
        ),
    ]
}

/// Deterministic pseudo-random bytes (content does not matter, only that it is recognisable).
fn data(n: u64, salt: u64) -> Vec<u8> {
    let mut x = salt.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

type Tensor = (&'static str, Vec<u64>, GgmlType);

fn tensors() -> Vec<Tensor> {
    vec![
        ("norm", vec![7], GgmlType::F32),
        ("half", vec![3, 5], GgmlType::F16),
        ("q4_0", vec![64, 3], GgmlType::Q4_0),
        ("q8_0", vec![32, 2, 2], GgmlType::Q8_0),
        ("q4_k", vec![256, 3], GgmlType::Q4_K),
        ("q6_k", vec![512, 1, 1, 2], GgmlType::Q6_K),
        ("bf16", vec![1], GgmlType::BF16),
        ("experts", vec![32, 4, 3], GgmlType::Q4_1),
    ]
}

fn write(alignment: u64, chunk: usize) -> (Vec<u8>, Vec<Vec<u8>>) {
    let mut w = GgufWriter::new(Vec::new(), alignment);
    for (k, v) in all_metadata() {
        w.add_meta(&k, v);
    }
    for (name, dims, ty) in tensors() {
        w.add_tensor(name, &dims, ty).unwrap();
    }
    let datas: Vec<Vec<u8>> = w
        .tensors()
        .iter()
        .enumerate()
        .map(|(i, t)| data(t.bytes, i as u64))
        .collect();
    w.write_header().unwrap();
    let all: Vec<u8> = datas.concat();
    for c in all.chunks(chunk) {
        w.write_tensor_data(c).unwrap();
    }
    (w.finish().unwrap(), datas)
}

#[test]
fn everything_reads_back_identically() {
    for alignment in [32, 1, 8, 64, 4096] {
        let (file, datas) = write(alignment, 1 << 20);
        let h = GgufHeader::parse(&file, "rt").unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.alignment, alignment);
        let mut expect = all_metadata();
        if alignment != 32 {
            expect.push(("general.alignment".into(), MetaValue::U32(alignment as u32)));
        }
        assert_eq!(h.metadata, expect, "alignment {alignment}");
        assert_eq!(h.data_offset % alignment, 0);
        assert_eq!(h.tensors.len(), tensors().len());
        for (i, ((name, dims, ty), t)) in tensors().into_iter().zip(&h.tensors).enumerate() {
            assert_eq!((t.name.as_str(), &t.dims, t.ty), (name, &dims, ty));
            assert_eq!(t.bytes, ty.tensor_bytes(dims.iter().product()).unwrap());
            assert_eq!(t.offset % alignment, 0);
            assert_eq!(h.tensor_data(&file, i), datas[i].as_slice(), "{name}");
        }
        // The file ends padded to the alignment.
        assert_eq!(file.len() as u64 % alignment, 0);
    }
}

#[test]
fn accessors_convert_between_numeric_types() {
    let (file, _) = write(32, 4096);
    let h = GgufHeader::parse(&file, "rt").unwrap();
    assert_eq!(h.get_u64("t.u8"), Some(200));
    assert_eq!(h.get_u64("t.i8"), None, "negative is not a u64");
    assert_eq!(h.get_i64("t.i8"), Some(-100));
    assert_eq!(h.get_u64("t.u64"), Some(u64::MAX));
    assert_eq!(h.get_i64("t.u64"), None, "does not fit i64");
    assert_eq!(h.get_i64("t.i64"), Some(i64::MIN));
    assert_eq!(h.get_f32("t.f64"), Some(std::f32::consts::PI));
    assert_eq!(h.get_f32("t.u16"), Some(60000.0));
    assert_eq!(h.get_f32("t.string"), None);
    assert_eq!(h.get_bool("t.bool_t"), Some(true));
    assert_eq!(h.get_bool("t.u8"), None);
    assert_eq!(h.get_str("general.architecture"), Some("llama"));
    assert_eq!(h.get_str("missing"), None);
    let (ty, items) = h.get_array("t.arr_arr").unwrap();
    assert_eq!(ty, MetaType::Array);
    assert_eq!(items[0].as_array().unwrap().1[1].as_str(), Some("y"));
    assert_eq!(items[2].meta_type(), MetaType::Array);
    assert_eq!(h.get_array("t.u8"), None);
}

#[test]
fn chunk_size_does_not_change_the_file() {
    let (reference, _) = write(64, 1 << 20);
    for chunk in [1, 3, 31, 32, 33, 1000] {
        assert_eq!(write(64, chunk).0, reference, "chunk {chunk}");
    }
}

#[test]
fn version_2_files_read_like_version_3() {
    let (mut file, _) = write(32, 4096);
    let v3 = GgufHeader::parse(&file, "v3").unwrap();
    file[4..8].copy_from_slice(&2u32.to_le_bytes());
    let v2 = GgufHeader::parse(&file, "v2").unwrap();
    assert_eq!(v2.version, 2);
    assert_eq!((v2.metadata, v2.tensors), (v3.metadata, v3.tensors));
}

#[test]
fn empty_model_round_trips() {
    let file = write_to_vec(32, &[("a".into(), MetaValue::Bool(true))], &[]).unwrap();
    let h = GgufHeader::parse(&file, "empty").unwrap();
    assert!(h.tensors.is_empty());
    assert_eq!(h.get_bool("a"), Some(true));
}

#[test]
fn writer_misuse_is_an_error() {
    let mut w = GgufWriter::new(Vec::new(), 32);
    assert!(w.add_tensor("", &[4], GgmlType::F32).is_err());
    assert!(w.add_tensor("a", &[], GgmlType::F32).is_err());
    assert!(w.add_tensor("a", &[1, 1, 1, 1, 1], GgmlType::F32).is_err());
    assert!(w.add_tensor("a", &[0], GgmlType::F32).is_err());
    assert!(w
        .add_tensor("a", &[33], GgmlType::Q8_0)
        .unwrap_err()
        .to_string()
        .contains("block size"));
    assert!(w
        .add_tensor("a", &[1 << 40, 1 << 40], GgmlType::F32)
        .unwrap_err()
        .to_string()
        .contains("overflows"));
    w.add_tensor("a", &[4], GgmlType::F32).unwrap();
    assert!(w
        .add_tensor("a", &[4], GgmlType::F32)
        .unwrap_err()
        .to_string()
        .contains("twice"));
    w.add_tensor("b", &[2], GgmlType::F16).unwrap();
    assert!(w.write_tensor_data(&[0; 4]).is_err(), "data before header");
    w.write_header().unwrap();
    assert!(w.write_header().is_err(), "header twice");
    assert!(
        w.add_tensor("c", &[4], GgmlType::F32).is_err(),
        "tensor after header"
    );
    w.write_tensor_data(&[1; 16]).unwrap();
    w.write_tensor_data(&[2; 3]).unwrap();
    let e = w.write_tensor_data(&[3; 2]).unwrap_err();
    assert!(e.to_string().contains("beyond"), "{e}");

    // Missing data on finish.
    let mut w = GgufWriter::new(Vec::new(), 32);
    w.add_tensor("a", &[4], GgmlType::F32).unwrap();
    w.write_header().unwrap();
    w.write_tensor_data(&[0; 15]).unwrap();
    let e = w.finish().unwrap_err();
    assert!(
        e.to_string().contains("missing") && e.to_string().contains("\"a\""),
        "{e}"
    );

    // Bad alignments, a conflicting general.alignment and an ill-typed array.
    for a in [0, 3, 48, 1 << 33] {
        assert!(
            GgufWriter::new(Vec::new(), a).write_header().is_err(),
            "alignment {a}"
        );
    }
    let mut w = GgufWriter::new(Vec::new(), 64);
    w.add_meta("general.alignment", MetaValue::U32(32));
    assert!(w.write_header().is_err());
    let mut w = GgufWriter::new(Vec::new(), 32);
    w.add_meta("x", MetaValue::Array(MetaType::U8, vec![MetaValue::I8(1)]));
    assert!(w
        .write_header()
        .unwrap_err()
        .to_string()
        .contains("i8 element in an array of u8"));
}

#[test]
fn add_meta_twice_replaces_in_place() {
    let mut w = GgufWriter::new(Vec::new(), 32);
    w.add_meta("a", MetaValue::U8(1));
    w.add_meta("b", MetaValue::U8(2));
    w.add_meta("a", MetaValue::String("z".into()));
    let file = w.finish().unwrap();
    let h = GgufHeader::parse(&file, "m").unwrap();
    assert_eq!(
        h.metadata,
        vec![
            ("a".into(), MetaValue::String("z".into())),
            ("b".into(), MetaValue::U8(2))
        ]
    );
}
