//! Corrupt GGUF input: truncation at every offset, each header field corrupted on its own, and random
//! mutations. Every case is an error naming the file, the byte offset and the problem; nothing panics.

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestRunner};
use pshard_model::ggml_type::GgmlType;
use pshard_model::gguf::writer::write_to_vec;
use pshard_model::gguf::{GgufError, GgufHeader, MetaType, MetaValue};

/// A small valid file: a few metadata keys of different types and three tensors.
fn tiny() -> Vec<u8> {
    let meta: Vec<(String, MetaValue)> = vec![
        (
            "general.architecture".into(),
            MetaValue::String("llama".into()),
        ),
        ("k.bool".into(), MetaValue::Bool(true)),
        (
            "k.arr".into(),
            MetaValue::Array(MetaType::U32, vec![MetaValue::U32(1), MetaValue::U32(2)]),
        ),
        (
            "k.nested".into(),
            MetaValue::Array(
                MetaType::Array,
                vec![MetaValue::Array(
                    MetaType::String,
                    vec![MetaValue::String("s".into())],
                )],
            ),
        ),
        ("k.aaaa".into(), MetaValue::U8(1)),
        ("k.aaab".into(), MetaValue::U8(2)),
    ];
    let a: Vec<u8> = (0..68).collect();
    let b: Vec<u8> = (0..32).map(|i| i * 3).collect();
    let c: Vec<u8> = (0..36).map(|i| 255 - i).collect();
    write_to_vec(
        32,
        &meta,
        &[
            ("tens.a", &[32, 2], GgmlType::Q8_0, &a),
            ("tens.b", &[8], GgmlType::F32, &b),
            ("tens.c", &[64], GgmlType::Q4_0, &c),
        ],
    )
    .unwrap()
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).position(|w| w == needle).unwrap()
}

/// Byte offsets of a tensor info's fields: (n_dims, dims, type, offset).
fn tensor_fields(file: &[u8], name: &str, n_dims: usize) -> (usize, usize, usize, usize) {
    let mut pat = (name.len() as u64).to_le_bytes().to_vec();
    pat.extend_from_slice(name.as_bytes());
    let nd = find(file, &pat) + pat.len();
    (nd, nd + 4, nd + 4 + 8 * n_dims, nd + 8 + 8 * n_dims)
}

/// Byte offset of a metadata key's type id.
fn key_type_at(file: &[u8], key: &str) -> usize {
    let mut pat = (key.len() as u64).to_le_bytes().to_vec();
    pat.extend_from_slice(key.as_bytes());
    find(file, &pat) + pat.len()
}

fn put_u32(f: &mut [u8], at: usize, v: u32) {
    f[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(f: &mut [u8], at: usize, v: u64) {
    f[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Parses a corrupted file; it must fail with `expect` in the message (and at `at`, when given).
fn expect_err(file: &[u8], expect: &str, at: Option<usize>) -> GgufError {
    let e = GgufHeader::parse(file, "bad.gguf")
        .expect_err(&format!("expected an error containing {expect:?}"));
    let msg = e.to_string();
    assert!(
        msg.contains(expect),
        "message {msg:?} does not say {expect:?}"
    );
    assert!(
        msg.starts_with(&format!("bad.gguf: at byte {}: ", e.offset)),
        "{msg}"
    );
    assert!(!msg.contains('\n'), "one line: {msg}");
    if let Some(at) = at {
        assert_eq!(e.offset, at as u64, "{msg}");
    }
    e
}

#[test]
fn tiny_file_is_valid() {
    let f = tiny();
    let h = GgufHeader::parse(&f, "tiny").unwrap();
    assert_eq!(h.tensors.len(), 3);
    assert_eq!(h.metadata.len(), 6);
}

#[test]
fn truncation_at_every_offset_is_an_error() {
    let f = tiny();
    let h = GgufHeader::parse(&f, "tiny").unwrap();
    let end =
        (h.data_offset + h.tensors.iter().map(|t| t.offset + t.bytes).max().unwrap()) as usize;
    for n in 0..end {
        let e = GgufHeader::parse(&f[..n], "cut").expect_err(&format!("cut at {n} parsed"));
        assert!(e.offset <= n as u64, "cut at {n}: offset {}", e.offset);
    }
    // Only the final padding may be cut away.
    for n in end..=f.len() {
        assert!(GgufHeader::parse(&f[..n], "cut").is_ok(), "cut at {n}");
    }
    expect_err(&f[..3], "truncated: GGUF magic needs 4 bytes", Some(0));
    expect_err(
        &f[..30],
        "tensor count is 3, but the 14 bytes left",
        Some(8),
    );
}

#[test]
fn bad_magic_and_versions() {
    let mut f = tiny();
    f[0] = b'X';
    expect_err(&f, "bad magic", Some(0));
    for (v, msg) in [
        (1, "GGUF version 1 is not supported"),
        (0, "unsupported GGUF version 0"),
        (4, "unsupported GGUF version 4"),
        (3u32.swap_bytes(), "big-endian"),
    ] {
        let mut f = tiny();
        put_u32(&mut f, 4, v);
        expect_err(&f, msg, Some(4));
    }
}

#[test]
fn absurd_counts() {
    for v in [u64::MAX, 1 << 40, 1000] {
        let mut f = tiny();
        put_u64(&mut f, 8, v);
        expect_err(&f, &format!("tensor count is {v}"), Some(8));
        let mut f = tiny();
        put_u64(&mut f, 16, v);
        expect_err(&f, &format!("metadata key/value count is {v}"), Some(16));
    }
    // Each count alone is plausible, together they are not.
    let mut f = tiny();
    let len = f.len() as u64;
    put_u64(&mut f, 8, (len - 24) / 32);
    put_u64(&mut f, 16, (len - 24) / 13);
    expect_err(&f, "need at least", Some(8));
    // A count that is small but wrong runs into the next field: still an error.
    let mut f = tiny();
    put_u64(&mut f, 16, 7);
    assert!(GgufHeader::parse(&f, "bad.gguf").is_err());
}

#[test]
fn absurd_string_lengths() {
    let f0 = tiny();
    // First key's length.
    let mut f = f0.clone();
    put_u64(&mut f, 24, 1 << 50);
    expect_err(
        &f,
        "string length 1125899906842624 of metadata key #0",
        Some(24),
    );
    // A string value's length.
    let mut f = f0.clone();
    let at = key_type_at(&f, "general.architecture") + 4;
    put_u64(&mut f, at, u64::MAX);
    expect_err(&f, "exceeds the", Some(at));
    // A tensor name's length.
    let mut f = f0.clone();
    let at = tensor_fields(&f, "tens.b", 1).0 - 6 - 8;
    put_u64(&mut f, at, 1 << 33);
    expect_err(
        &f,
        "string length 8589934592 of name of tensor #1",
        Some(at),
    );
}

#[test]
fn bad_metadata() {
    let f0 = tiny();
    // Unknown value type.
    let mut f = f0.clone();
    let at = key_type_at(&f, "k.bool");
    put_u32(&mut f, at, 13);
    expect_err(&f, "unknown value type id 13", Some(at));
    // Bool that is not 0/1.
    let mut f = f0.clone();
    f[at + 4] = 7;
    expect_err(&f, "bool byte is 7", Some(at + 4));
    // Unknown array element type, absurd element count.
    let at = key_type_at(&f0, "k.arr") + 4;
    let mut f = f0.clone();
    put_u32(&mut f, at, 99);
    expect_err(&f, "unknown array element type id 99", Some(at));
    let mut f = f0.clone();
    put_u64(&mut f, at + 4, 1 << 61);
    expect_err(
        &f,
        "element count of u32 array \"k.arr\" is 2305843009213693952",
        Some(at + 4),
    );
    // Nested array's inner count.
    let at = key_type_at(&f0, "k.nested") + 4 + 4 + 8; // inner array: elem type, count
    let mut f = f0.clone();
    put_u64(&mut f, at + 4, u64::MAX / 2);
    expect_err(
        &f,
        "element count of string array \"k.nested\"",
        Some(at + 4),
    );
    // Duplicate key.
    let mut f = f0.clone();
    let at = key_type_at(&f, "k.aaab") - 1;
    f[at] = b'a';
    expect_err(&f, "duplicate metadata key \"k.aaaa\"", Some(at - 5 - 8));
    // Invalid UTF-8 key.
    let mut f = f0.clone();
    f[at] = 0xff;
    expect_err(&f, "metadata key #5 is not valid UTF-8", None);
}

#[test]
fn deep_arrays_are_rejected() {
    // Hand-built: one key whose value is 20 arrays nested in each other.
    let mut f = b"GGUF".to_vec();
    f.extend_from_slice(&3u32.to_le_bytes());
    f.extend_from_slice(&0u64.to_le_bytes());
    f.extend_from_slice(&1u64.to_le_bytes());
    f.extend_from_slice(&1u64.to_le_bytes());
    f.push(b'd');
    f.extend_from_slice(&9u32.to_le_bytes());
    for _ in 0..20 {
        f.extend_from_slice(&9u32.to_le_bytes());
        f.extend_from_slice(&1u64.to_le_bytes());
    }
    f.extend_from_slice(&4u32.to_le_bytes());
    f.extend_from_slice(&0u64.to_le_bytes());
    expect_err(&f, "nested deeper than 8", Some(37 + 8 * 12));
}

#[test]
fn bad_alignment() {
    let mk = |v: MetaValue| {
        let mut f =
            write_to_vec(64, &[("general.alignment".into(), MetaValue::U32(64))], &[]).unwrap();
        let at = key_type_at(&f, "general.alignment");
        put_u32(&mut f, at, v.meta_type() as u32);
        if let MetaValue::U32(a) = v {
            put_u32(&mut f, at + 4, a);
        }
        (f, at)
    };
    for a in [0, 48, 3] {
        let (f, at) = mk(MetaValue::U32(a));
        expect_err(
            &f,
            &format!("general.alignment is {a}, not a non-zero power of two"),
            Some(at + 4),
        );
    }
    let (f, at) = mk(MetaValue::I32(64));
    expect_err(&f, "general.alignment has type i32, expected u32", Some(at));
}

/// A large power-of-two alignment is valid; it only leaves no room for tensors in a small file.
/// (Found by the fuzzer: the writer must not allocate the padding.)
#[test]
fn huge_alignment() {
    let mut f = write_to_vec(64, &[("general.alignment".into(), MetaValue::U32(64))], &[]).unwrap();
    let at = key_type_at(&f, "general.alignment") + 4;
    put_u32(&mut f, at, 1 << 30);
    let h = GgufHeader::parse(&f, "big").unwrap();
    assert_eq!((h.alignment, h.data_offset), (1 << 30, 1 << 30));
    // With a tensor, its data would start at 2^30: past the end of the file.
    let meta = [("general.alignment".to_string(), MetaValue::U32(64))];
    let mut f = write_to_vec(64, &meta, &[("t", &[4], GgmlType::F32, &[0; 16])]).unwrap();
    let at = key_type_at(&f, "general.alignment") + 4;
    put_u32(&mut f, at, 1 << 30);
    expect_err(
        &f,
        "(data section starts at 1073741824) extends past the end of the file",
        None,
    );
}

#[test]
fn bad_tensor_infos() {
    let f0 = tiny();
    let (nd, dims, ty, off) = tensor_fields(&f0, "tens.b", 1);
    let case = |patch: &dyn Fn(&mut Vec<u8>), expect: &str, at: Option<usize>| {
        let mut f = f0.clone();
        patch(&mut f);
        expect_err(&f, expect, at);
    };
    case(
        &|f| put_u32(f, nd, 0),
        "has 0 dimensions (valid: 1..=4)",
        Some(nd),
    );
    case(&|f| put_u32(f, nd, 5), "has 5 dimensions", Some(nd));
    case(
        &|f| put_u32(f, nd, u32::MAX),
        "has 4294967295 dimensions",
        Some(nd),
    );
    case(&|f| put_u64(f, dims, 0), "dimension 0 is 0", Some(dims));
    case(
        &|f| put_u64(f, dims, u64::MAX),
        "dimension 0 is 18446744073709551615",
        Some(dims),
    );
    // Absurd but representable: the data would lie past the end of the file.
    case(
        &|f| put_u64(f, dims, 1 << 40),
        "extends past the end of the file",
        Some(off),
    );
    // The byte size overflows u64.
    case(
        &|f| put_u64(f, dims, 1 << 62),
        "byte size of dims [4611686018427387904] as F32 overflows",
        Some(nd),
    );
    case(&|f| put_u32(f, ty, 99), "unknown ggml type id 99", Some(ty));
    case(
        &|f| put_u32(f, ty, 31),
        "ggml type id 31 (Q4_0_4_4) was removed",
        Some(ty),
    );
    case(&|f| put_u32(f, ty, 4), "(Q4_2) was removed", Some(ty));
    // 8 F32 elements are not whole Q8_0 blocks.
    case(
        &|f| put_u32(f, ty, GgmlType::Q8_0.id()),
        "row length 8 is not a multiple of Q8_0's block size 32",
        Some(nd),
    );
    case(
        &|f| put_u64(f, off, 1 << 40),
        "extends past the end of the file",
        Some(off),
    );
    case(
        &|f| put_u64(f, off, u64::MAX - 31),
        "extends past the end of the file",
        Some(off),
    );
    case(
        &|f| put_u64(f, off, 96 + 1),
        "data offset 97 is not a multiple of the alignment 32",
        Some(off),
    );
    // tens.b over tens.a's data (which starts at 0).
    case(
        &|f| put_u64(f, off, 0),
        "tensor \"tens.b\" (data offset 0) overlaps tensor \"tens.a\"",
        Some(off),
    );
    case(
        &|f| put_u64(f, off, 64),
        "overlaps tensor \"tens.a\" (data offset 0, 68 bytes)",
        Some(off),
    );

    // Dims whose product overflows although each dim is fine.
    let (nd, dims, _, _) = tensor_fields(&f0, "tens.a", 2);
    case(
        &|f| {
            put_u64(f, dims, 1 << 32);
            put_u64(f, dims + 8, 1 << 32);
        },
        "element count of dims [4294967296, 4294967296] overflows",
        Some(nd),
    );
    // Duplicate tensor name.
    let at = tensor_fields(&f0, "tens.c", 1).0 - 1;
    case(
        &|f| f[at] = b'b',
        "duplicate tensor name \"tens.b\"",
        Some(at - 5 - 8),
    );
    case(
        &|f| f[at - 5] = 0xc3,
        "name of tensor #2 is not valid UTF-8",
        Some(at - 5 - 8),
    );
}

/// Random byte mutations (overwrites, truncation, insertion) of a valid file never panic; when one
/// still parses, its tensor views are in bounds.
#[test]
fn random_mutations_never_panic() {
    let seed = std::env::var("PSHARD_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_9a1f_u64);
    let cases = std::env::var("PSHARD_MUTATION_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    eprintln!("random_mutations_never_panic: seed {seed} (PSHARD_SEED), {cases} cases (PSHARD_MUTATION_CASES)");
    let base = tiny();
    let len = base.len();
    let mut runner = TestRunner::new(Config {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        ..Config::default()
    });
    let edit = prop_oneof![
        // Overwrite a byte; bias towards the header where the structure is.
        (0..len, any::<u8>()).prop_map(|(i, b)| (0u8, i, b)),
        (0..200usize, any::<u8>()).prop_map(|(i, b)| (0u8, i, b)),
        // Set a byte to a "boundary" value.
        (0..len, prop::sample::select(vec![0u8, 1, 0x7f, 0x80, 0xff]))
            .prop_map(|(i, b)| (0u8, i, b)),
        (0..len, any::<u8>()).prop_map(|(i, b)| (1u8, i, b)),
        (0..len, any::<u8>()).prop_map(|(i, b)| (2u8, i, b)),
        (0..len, any::<u8>()).prop_map(|(i, b)| (3u8, i, b)),
    ];
    let strategy = prop::collection::vec(edit, 1..8);
    runner
        .run(&strategy, |edits| {
            let mut f = base.clone();
            for (kind, i, b) in edits {
                let i = i.min(f.len().saturating_sub(1));
                match kind {
                    0 if !f.is_empty() => f[i] = b,
                    1 => f.truncate(i),
                    2 => f.insert(i.min(f.len()), b),
                    _ if !f.is_empty() => {
                        f.remove(i);
                    }
                    _ => {}
                }
            }
            if let Ok(h) = GgufHeader::parse(&f, "m") {
                for i in 0..h.tensors.len() {
                    let d = h.tensor_data(&f, i);
                    prop_assert_eq!(d.len() as u64, h.tensors[i].bytes);
                }
            }
            Ok(())
        })
        .unwrap();
}

/// A file of many tiny array elements is rejected before it can demand 32 bytes of memory per byte.
#[test]
fn too_many_array_elements() {
    use pshard_model::gguf::reader::MAX_ARRAY_ELEMENTS;
    let n = MAX_ARRAY_ELEMENTS + 1;
    let mut f = b"GGUF".to_vec();
    f.extend_from_slice(&3u32.to_le_bytes());
    f.extend_from_slice(&0u64.to_le_bytes());
    f.extend_from_slice(&1u64.to_le_bytes());
    f.extend_from_slice(&1u64.to_le_bytes());
    f.push(b'a');
    f.extend_from_slice(&9u32.to_le_bytes());
    f.extend_from_slice(&0u32.to_le_bytes());
    f.extend_from_slice(&n.to_le_bytes());
    f.resize(f.len() + n as usize, 7);
    expect_err(&f, "more than 16777216 array elements", Some(37 + 4));
}

/// The tensors must tile the data section: a tensor whose type or shape was changed to a smaller
/// one leaves bytes no tensor claims, and so does data appended after the last tensor's padding.
#[test]
fn data_section_bytes_are_all_accounted_for() {
    let f0 = tiny();
    // tens.a: Q8_0 [32, 2] = 68 bytes at 0; tens.b: F32 [8] = 32 bytes at 96; tens.c: Q4_0 [64] =
    // 36 bytes at 128, padded to 160.
    let (_, _, a_ty, _) = tensor_fields(&f0, "tens.a", 2);
    let (_, _, b_ty, _) = tensor_fields(&f0, "tens.b", 1);
    let (_, c_dims, _, _) = tensor_fields(&f0, "tens.c", 1);
    let (_, _, _, b_off) = tensor_fields(&f0, "tens.b", 1);
    // Q8_0 -> Q4_0 (type 2): 36 bytes, so 64..96 belongs to nothing.
    let mut f = f0.clone();
    put_u32(&mut f, a_ty, 2);
    let e = expect_err(
        &f,
        "32 bytes of the data section belong to no tensor",
        Some(b_off),
    );
    assert!(
        e.what.contains("\"tens.a\"") && e.what.contains("\"tens.b\""),
        "{e}"
    );
    // F32 -> F16 (type 1) leaves 16 bytes, which the 32-byte alignment padding covers: a change
    // hidden inside the padding cannot be told from padding (tiling bounds it by the alignment).
    let mut f = f0.clone();
    put_u32(&mut f, b_ty, 1);
    assert!(GgufHeader::parse(&f, "b.gguf").is_ok());
    // The last tensor shrunk: its old data trails it.
    let mut f = f0.clone();
    put_u64(&mut f, c_dims, 32);
    let e = expect_err(&f, "after the last tensor's data", None);
    assert!(e.what.contains("\"tens.c\""), "{e}");
    // Bytes appended after the final padding.
    let mut f = f0.clone();
    f.extend_from_slice(&[0u8; 32]);
    expect_err(&f, "32 bytes after the last tensor's data", None);
    // The first tensor moved off the start of the data section.
    let (_, _, _, a_off) = tensor_fields(&f0, "tens.a", 2);
    let mut f = f0.clone();
    put_u64(&mut f, a_off, 32);
    expect_err(&f, "", Some(a_off));
}
