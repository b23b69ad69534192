#!/usr/bin/env python3
"""Writes small valid GGUF files into corpus/gguf_parse/ as fuzzing seeds (the corpus is not committed)."""
import os
import struct

def s(b):
    return struct.pack("<Q", len(b)) + b

def kv(key, tid, payload):
    return s(key.encode()) + struct.pack("<I", tid) + payload

def gguf(kvs, tensors, align=32, version=3, data_len=None):
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs)) + b"".join(kvs)
    for name, dims, ty, off in tensors:
        out += s(name.encode()) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ty, off)
    out += b"\0" * (-len(out) % align)
    return out + bytes(range(256)) * ((data_len or 0) // 256 + 1)

arr = lambda tid, items: struct.pack("<IQ", tid, len(items)) + b"".join(items)
seeds = {
    "empty": gguf([], []),
    "meta": gguf([
        kv("general.architecture", 8, s(b"llama")),
        kv("a.u8", 0, b"\x07"), kv("a.i8", 1, b"\xff"), kv("a.u16", 2, b"\x01\x02"), kv("a.i16", 3, b"\x01\x80"),
        kv("a.u32", 4, struct.pack("<I", 9)), kv("a.i32", 5, struct.pack("<i", -9)),
        kv("a.f32", 6, struct.pack("<f", 1.5)), kv("a.bool", 7, b"\x01"),
        kv("a.u64", 10, struct.pack("<Q", 1 << 40)), kv("a.i64", 11, struct.pack("<q", -1)),
        kv("a.f64", 12, struct.pack("<d", 2.5)),
        kv("a.strs", 9, arr(8, [s(b"x"), s(b""), s(b"\xc4\xa0the")])),
        kv("a.nested", 9, arr(9, [arr(4, [struct.pack("<I", 1)]), arr(8, [s(b"y")])])),
    ], []),
    "tensors": gguf([kv("general.alignment", 4, struct.pack("<I", 64))],
                    [("w", [32, 2], 8, 0), ("n", [8], 0, 128), ("q", [256], 12, 192), ("e", [32, 2, 2], 2, 384)],
                    align=64, data_len=512),
    "v2": gguf([kv("k", 8, s(b"v"))], [("t", [4], 0, 0)], version=2, data_len=16),
}
d = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "gguf_parse")
os.makedirs(d, exist_ok=True)
for name, data in seeds.items():
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)
print(f"wrote {len(seeds)} seeds to {d}")
