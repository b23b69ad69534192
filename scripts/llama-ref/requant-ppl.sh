#!/usr/bin/env bash
# Requantizes the real test models to IQ4_NL, IQ4_XS and MXFP4 with llama.cpp's llama-quantize and
# prints llama.cpp's and pshard's perplexity on each file (GPL-2, -c 512, the CI's text), as recorded
# in docs/PERF.md. Needs a llama.cpp CPU build (LLAMA_CPP, binaries in build/bin) and a release pshard.
#
#   LLAMA_CPP=/path/to/llama.cpp OUT=/tmp/requant scripts/llama-ref/requant-ppl.sh
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
bin="${LLAMA_CPP:?set LLAMA_CPP to a llama.cpp tree with a build in build/}/build/bin"
models="${PSHARD_MODELS:-$HOME/.cache/pshard/models}"
out="${OUT:-$(mktemp -d)}"
text=/usr/share/common-licenses/GPL-2
pshard="$repo/target/release/pshard"
[ -x "$pshard" ] || cargo build --release -p pshard --manifest-path "$repo/Cargo.toml"
threads="${THREADS:-$(nproc)}"
final() { sed -n 's/.*Final estimate: PPL = \([0-9.]*\).*/\1/p' "$1"; }
for m in SmolLM2-135M-Instruct.Q4_1 gemma-3-270m-q4_k_m; do
    for t in IQ4_NL IQ4_XS MXFP4; do
        f="$out/$m.req-$t.gguf"
        # MXFP4_MOE's mix makes only expert tensors MXFP4; --pure makes every matrix MXFP4.
        if [ "$t" = MXFP4 ]; then
            "$bin/llama-quantize" --allow-requantize --pure "$models/$m.gguf" "$f" MXFP4_MOE > "$f.log" 2>&1
        else
            "$bin/llama-quantize" --allow-requantize "$models/$m.gguf" "$f" "$t" > "$f.log" 2>&1
        fi
        "$bin/llama-perplexity" -m "$f" -f "$text" -c 512 -t "$threads" > "$f.llama.txt" 2>&1
        "$pshard" perplexity --device cpu -t "$threads" -m "$f" -f "$text" -c 512 > "$f.pshard.txt" 2>&1
        l=$(final "$f.llama.txt"); p=$(final "$f.pshard.txt")
        echo "$m $t: llama.cpp $l pshard $p ($(python3 -c "print(f'{($p - $l) / $l * 100:+.2f}%')"))"
    done
done
