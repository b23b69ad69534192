#!/usr/bin/env python3
"""Writes fuzzing seeds (the corpus is not committed): small valid GGUF files into corpus/gguf_parse/,
the registry examples of registry-format.md into corpus/registry_parse/, the committed profiles into
corpus/profile_parse/ and llama.cpp-style command lines into corpus/cli_args/."""
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
    # Exactly the data the tensors tile (the reader refuses bytes no tensor claims).
    return out + (bytes(range(256)) * ((data_len or 0) // 256 + 1))[: data_len or 0]

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
here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(here)


def write_seeds(target, named):
    d = os.path.join(here, "corpus", target)
    os.makedirs(d, exist_ok=True)
    for name, data in named.items():
        with open(os.path.join(d, "seed-" + name), "wb") as f:
            f.write(data)
    print(f"wrote {len(named)} seeds to {d}")


write_seeds("gguf_parse", seeds)

# Registry examples: the fenced blocks of registry-format.md that start with the magic line.
text = open(os.path.join(root, "registry-format.md")).read()
blocks = [b.split("\n", 1)[1] for b in text.split("```")[1::2] if "\n" in b]
regs = {f"example{i}": b.encode() for i, b in enumerate(blocks) if b.startswith("pshard-registry ")}
write_seeds("registry_parse", regs)

profiles = os.path.join(root, "profiles")
# The committed profiles cut after a few points: small seeds keep executions fast.
def head_points(text, n):
    parts = text.split("[[point]]")
    return "[[point]]".join(parts[: n + 1])


prof = {}
for name in sorted(os.listdir(profiles)):
    t = open(os.path.join(profiles, name)).read()
    for n in (0, 3, 12):
        prof[f"{name}-{n}"] = head_points(t, n).encode()
write_seeds("profile_parse", prof)

# Command lines: NUL-separated arguments after the program name.
lines = [
    "run -m M.gguf -p hello -n 16 -c 256 --temp 0.7 --top-p 0.9 --min-p 0.05 -s 1",
    "run -m M.gguf -f - -n -1 -s -1 -ub 16 -ngl 0 -fa -ctk f16 -ctv f16 --chat",
    "perplexity -m M.gguf -f t.txt -c 512 --chunks 2 -t 2 -u 128",
    "bench -m M.gguf -p 512,4096 -n 128 -ub 2048 -r 3 -o json --device cpu",
    "plan -m M.gguf --vram-budget 3072 -c 16384 --kv-type f16 -b 2048 -o M.gguf.pshard --json",
    "inspect -m M.gguf --json",
    "tokenize -m M.gguf -p hi --ids --show-count",
    "synth tiny-llama -q q4_k -o t.gguf --seed 3",
    "profile plot p.toml -o r.svg",
]
write_seeds("cli_args", {f"line{i}": l.replace(" ", "\0").encode() for i, l in enumerate(lines)})
