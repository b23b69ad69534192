//! Split models: a model written as 3 files (`NAME-0000K-of-00003.gguf`, `split.count` / `split.no`)
//! opens as one, identical to the unsplit file; broken split sets are clear errors.

use std::path::{Path, PathBuf};

use pshard_model::ggml_type::GgmlType;
use pshard_model::gguf::{GgufWriter, MetaValue, ModelFile};

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("pshard-gguf-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

type Tensor = (String, Vec<u64>, GgmlType, Vec<u8>);

fn model_tensors() -> Vec<Tensor> {
    let mut v = Vec::new();
    let mut fill = 0u8;
    let mut data = |n: u64| {
        fill = fill.wrapping_add(37);
        (0..n).map(|i| fill ^ (i as u8)).collect::<Vec<u8>>()
    };
    v.push((
        "token_embd.weight".to_string(),
        vec![64, 10],
        GgmlType::Q8_0,
        data(2 * 34 * 10),
    ));
    for l in 0..4 {
        v.push((
            format!("blk.{l}.attn_norm.weight"),
            vec![64],
            GgmlType::F32,
            data(256),
        ));
        v.push((
            format!("blk.{l}.attn_q.weight"),
            vec![64, 64],
            GgmlType::Q4_1,
            data(2 * 20 * 64),
        ));
        v.push((
            format!("blk.{l}.ffn_down.weight"),
            vec![256, 64],
            GgmlType::Q4_K,
            data(144 * 64),
        ));
    }
    v.push((
        "output_norm.weight".to_string(),
        vec![64],
        GgmlType::F32,
        data(256),
    ));
    v
}

fn write_file(path: &Path, meta: &[(&str, MetaValue)], tensors: &[Tensor]) {
    let out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut w = GgufWriter::new(out, 32);
    for (k, v) in meta {
        w.add_meta(k, v.clone());
    }
    for (name, dims, ty, _) in tensors {
        w.add_tensor(name, dims, *ty).unwrap();
    }
    w.write_header().unwrap();
    for (_, _, _, d) in tensors {
        w.write_tensor_data(d).unwrap();
    }
    w.finish().unwrap();
}

fn base_meta() -> Vec<(&'static str, MetaValue)> {
    vec![
        ("general.architecture", MetaValue::String("llama".into())),
        ("llama.block_count", MetaValue::U32(4)),
    ]
}

/// Writes the model unsplit and as `count` splits (tensors distributed unevenly); returns both paths.
fn write_split_set(
    dir: &Path,
    count: u16,
    split_meta: impl Fn(u16) -> Vec<(&'static str, MetaValue)>,
) -> PathBuf {
    let tensors = model_tensors();
    let n = tensors.len();
    // Split points: first file gets 2 tensors, the rest evenly.
    let mut bounds = vec![0, 2];
    for k in 1..count as usize {
        bounds.push(2 + (n - 2) * k / (count as usize - 1));
    }
    for s in 0..count {
        let mut meta = if s == 0 { base_meta() } else { vec![] };
        meta.extend(split_meta(s));
        let part = &tensors[bounds[s as usize]..bounds[s as usize + 1]];
        write_file(
            &dir.join(format!("m-{:05}-of-{count:05}.gguf", s + 1)),
            &meta,
            part,
        );
    }
    dir.join(format!("m-00001-of-{count:05}.gguf"))
}

fn standard_split_meta(count: u16) -> impl Fn(u16) -> Vec<(&'static str, MetaValue)> {
    move |s| {
        vec![
            ("split.no", MetaValue::U16(s)),
            ("split.count", MetaValue::U16(count)),
            (
                "split.tensors.count",
                MetaValue::I32(model_tensors().len() as i32),
            ),
        ]
    }
}

#[test]
fn split_set_opens_as_one_model() {
    let dir = TempDir::new("split");
    let whole = dir.0.join("whole.gguf");
    write_file(&whole, &base_meta(), &model_tensors());
    let first = write_split_set(&dir.0, 3, standard_split_meta(3));

    let one = ModelFile::open(&whole).unwrap();
    let split = ModelFile::open(&first).unwrap();
    assert_eq!(one.paths().len(), 1);
    assert_eq!(split.paths().len(), 3);
    assert_eq!(
        split.header().get_str("general.architecture"),
        Some("llama")
    );
    assert_eq!(split.tensors().len(), one.tensors().len());
    assert_eq!(split.tensor_data_bytes(), one.tensor_data_bytes());
    let mut splits_used = Vec::new();
    for (i, (a, b)) in one.tensors().iter().zip(split.tensors()).enumerate() {
        assert_eq!(
            (&a.name, &a.dims, a.ty, a.bytes),
            (&b.name, &b.dims, b.ty, b.bytes)
        );
        assert_eq!(one.tensor_data(i), split.tensor_data(i), "{}", a.name);
        assert_eq!(split.tensor_index(&a.name), Some(i));
        let (s, r) = split.map_ranges(i);
        splits_used.push(s);
        // The range is the view, and the view is inside the split's map (no copy).
        let map = split.split_bytes(s);
        assert_eq!(&map[r.start as usize..r.end as usize], split.tensor_data(i));
        assert_eq!(
            split.tensor_data(i).as_ptr(),
            map[r.start as usize..].as_ptr()
        );
    }
    splits_used.dedup();
    assert_eq!(splits_used, vec![0, 1, 2]);
    let on_disk: u64 = split
        .paths()
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert_eq!(split.file_size(), on_disk);

    // Opening by the path of a later split gives the same model.
    let second = ModelFile::open(&dir.0.join("m-00002-of-00003.gguf")).unwrap();
    assert_eq!(second.paths(), split.paths());
    assert_eq!(second.tensors(), split.tensors());
}

#[test]
fn broken_split_sets_are_errors() {
    let dir = TempDir::new("split-bad");
    let first = write_split_set(&dir.0, 3, standard_split_meta(3));
    std::fs::remove_file(dir.0.join("m-00003-of-00003.gguf")).unwrap();
    let e = ModelFile::open(&first).unwrap_err().to_string();
    assert!(
        e.contains("m-00003-of-00003.gguf") && e.contains("cannot open"),
        "{e}"
    );

    // split.no that does not match the position.
    let dir = TempDir::new("split-no");
    let first = write_split_set(&dir.0, 3, |s| {
        vec![
            ("split.no", MetaValue::U16(if s == 2 { 1 } else { s })),
            ("split.count", MetaValue::U16(3)),
        ]
    });
    let e = ModelFile::open(&first).unwrap_err().to_string();
    assert!(
        e.contains("m-00003-of-00003.gguf") && e.contains("split.no is Some(1), expected 2"),
        "{e}"
    );

    // Disagreeing split.count.
    let dir = TempDir::new("split-count");
    let first = write_split_set(&dir.0, 3, |s| {
        vec![
            ("split.no", MetaValue::U16(s)),
            ("split.count", MetaValue::U16(if s == 1 { 4 } else { 3 })),
        ]
    });
    let e = ModelFile::open(&first).unwrap_err().to_string();
    assert!(e.contains("split.count is 4"), "{e}");

    // Wrong total tensor count.
    let dir = TempDir::new("split-tensors");
    let first = write_split_set(&dir.0, 3, |s| {
        vec![
            ("split.no", MetaValue::U16(s)),
            ("split.count", MetaValue::U16(3)),
            ("split.tensors.count", MetaValue::I32(5)),
        ]
    });
    let e = ModelFile::open(&first).unwrap_err().to_string();
    assert!(
        e.contains("split.tensors.count is I32(5) but the files hold 14 tensors"),
        "{e}"
    );

    // split.count > 1 in a file whose name is not a split name.
    let dir = TempDir::new("split-name");
    let p = dir.0.join("model.gguf");
    write_file(
        &p,
        &[
            ("split.count", MetaValue::U16(2)),
            ("split.no", MetaValue::U16(0)),
        ],
        &[],
    );
    let e = ModelFile::open(&p).unwrap_err().to_string();
    assert!(
        e.contains("does not look like NAME-00001-of-00002.gguf"),
        "{e}"
    );

    // A tensor present in two splits.
    let dir = TempDir::new("split-dup");
    let t = model_tensors();
    for s in 0..2u16 {
        let meta = [
            ("split.no", MetaValue::U16(s)),
            ("split.count", MetaValue::U16(2)),
        ];
        write_file(
            &dir.0.join(format!("d-{:05}-of-00002.gguf", s + 1)),
            &meta,
            &t[..2],
        );
    }
    let e = ModelFile::open(&dir.0.join("d-00001-of-00002.gguf"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("appears in more than one split"), "{e}");
}

#[test]
fn missing_and_non_gguf_files_are_errors() {
    let dir = TempDir::new("misc");
    let e = ModelFile::open(&dir.0.join("nope.gguf"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.gguf: at byte 0: cannot open"), "{e}");
    let p = dir.0.join("empty.gguf");
    std::fs::write(&p, b"").unwrap();
    let e = ModelFile::open(&p).unwrap_err().to_string();
    assert!(e.contains("empty.gguf") && e.contains("truncated"), "{e}");
    let p = dir.0.join("text.gguf");
    std::fs::write(&p, b"hello world, not a model").unwrap();
    let e = ModelFile::open(&p).unwrap_err().to_string();
    assert!(e.contains("bad magic"), "{e}");
}
