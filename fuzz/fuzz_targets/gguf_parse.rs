//! Fuzz target: arbitrary bytes through the GGUF parser. It must never panic; when the input parses,
//! every tensor view must be in bounds and the header must survive a write/read round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pshard_model::gguf::{GgufHeader, GgufWriter};

fuzz_target!(|data: &[u8]| {
    let Ok(h) = GgufHeader::parse(data, "fuzz") else {
        return;
    };
    for (i, t) in h.tensors.iter().enumerate() {
        assert_eq!(h.tensor_data(data, i).len() as u64, t.bytes);
    }
    // Whatever the reader accepts, the writer can write, and it reads back the same. (A huge valid
    // alignment, possible only without tensors, would make the rewritten file huge: skip those.)
    if h.alignment > 1 << 16 {
        return;
    }
    let mut w = GgufWriter::new(Vec::new(), h.alignment);
    for (k, v) in &h.metadata {
        w.add_meta(k, v.clone());
    }
    for t in &h.tensors {
        w.add_tensor(&t.name, &t.dims, t.ty)
            .expect("reader-accepted tensor rejected by the writer");
    }
    w.write_header().expect("write header");
    for i in 0..h.tensors.len() {
        w.write_tensor_data(h.tensor_data(data, i))
            .expect("write data");
    }
    let out = w.finish().expect("finish");
    let back = GgufHeader::parse(&out, "rewritten").expect("rewritten file parses");
    // Debug text compares NaN metadata values equal to themselves.
    assert_eq!(format!("{:?}", back.metadata), format!("{:?}", h.metadata));
    assert_eq!(back.alignment, h.alignment);
    assert_eq!(back.tensors.len(), h.tensors.len());
    for (i, (a, b)) in h.tensors.iter().zip(&back.tensors).enumerate() {
        assert_eq!(
            (&a.name, &a.dims, a.ty, a.bytes),
            (&b.name, &b.dims, b.ty, b.bytes)
        );
        assert_eq!(h.tensor_data(data, i), back.tensor_data(&out, i));
    }
});
