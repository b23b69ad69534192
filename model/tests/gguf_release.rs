//! Releasing a tensor's host pages keeps its bytes readable and unchanged (they fault back in from
//! the file).

use pshard_model::gguf::ModelFile;
use pshard_model::synth::{preset, write_synth, QuantRecipe};

#[test]
fn released_pages_read_back_identically() {
    let dir = std::env::temp_dir().join(format!("pshard-release-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiny.gguf");
    let f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    write_synth(
        &preset("tiny-llama").unwrap(),
        QuantRecipe::F16,
        3,
        f,
        &mut |_, _| {},
    )
    .unwrap();
    let file = ModelFile::open(&path).unwrap();
    let (big, _) = file
        .tensors()
        .iter()
        .enumerate()
        .max_by_key(|(_, t)| t.bytes)
        .unwrap();
    let before = file.tensor_data(big).to_vec();
    let released = file.release_pages(big).unwrap();
    assert!(
        released > 0 && released <= before.len() as u64,
        "released {released} of {}",
        before.len()
    );
    assert_eq!(file.tensor_data(big), &before[..]);
    // Piece by piece, as a copy advancing through the tensor drops what it has read: each call
    // from the last one's end releases whole pages only, and together they cover every whole page
    // the single call released.
    let n = before.len() as u64;
    let (mut lo, mut total) = (0u64, 0u64);
    for hi in (1..=7).map(|i| n * i / 7) {
        let r = file.release_tensor_range(big, lo..hi).unwrap();
        assert!(r.start >= lo && r.end <= hi, "{r:?} outside {lo}..{hi}");
        if !r.is_empty() {
            if lo > 0 {
                assert_eq!(r.start, lo, "a page skipped before {r:?}");
            }
            total += r.end - r.start;
            lo = r.end;
        }
    }
    assert_eq!(
        total, released,
        "pieces released {total} bytes, the whole call {released}"
    );
    assert_eq!(file.tensor_data(big), &before[..]);
    std::fs::remove_dir_all(&dir).ok();
}
