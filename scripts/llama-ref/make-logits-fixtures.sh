#!/usr/bin/env bash
# Regenerates runtime/tests/fixtures/llama-ref/: llama.cpp's logits (every prompt position, 32
# greedy steps) and perplexities of pshard's tiny synthetic models of every catalogued
# architecture. CI only reads the committed fixtures (runtime/tests/llama_ref.rs); this script
# needs a llama.cpp build with shared libraries:
#
#   LLAMA_CPP=/path/to/llama.cpp scripts/llama-ref/make-logits-fixtures.sh
#
# LLAMA_CPP is a source tree with a CMake build in build/ (BUILD_SHARED_LIBS=ON), e.g.
# vendor/llama.cpp of the llama-cpp-python 0.3.36 sdist. The models come from this checkout's
# `pshard synth` (built here in release mode).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
llama="${LLAMA_CPP:?set LLAMA_CPP to a llama.cpp source tree with a build in build/}"
libdir="$llama/build/bin"
[ -f "$libdir/libllama.so" ] || { echo "no $libdir/libllama.so (build llama.cpp with -DBUILD_SHARED_LIBS=ON)" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cc -O1 -o "$work/logits_ref" "$here/logits_ref.c" -I"$llama/include" -I"$llama/ggml/include" \
    -L"$libdir" -lllama -lggml -lggml-base -lm -Wl,-rpath,"$libdir"
(cd "$repo" && cargo build --release -p pshard --quiet)
version="$(cd "$libdir" && ls libllama.so.*.*.* 2>/dev/null | head -1 | sed 's/libllama.so.//')"
python3 "$here/make_logits_fixtures.py" "$repo/target/release/pshard" "$work/logits_ref" \
    "$repo/runtime/tests/fixtures/llama-ref" "libllama ${version:-unknown}"
