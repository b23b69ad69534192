#!/usr/bin/env bash
# Regenerates kernels/tests/fixtures/llama-ref/*.txt: blocks of IQ4_NL, IQ4_XS and MXFP4 (made
# here, deterministically) with the values llama.cpp's ggml dequantizes them to. CI only reads the
# committed fixtures; this script needs a llama.cpp build:
#
#   LLAMA_CPP=/path/to/llama.cpp scripts/llama-ref/make-fixtures.sh
#
# LLAMA_CPP is a source tree with a CMake build in build/ (shared libraries, BUILD_SHARED_LIBS=ON),
# e.g. vendor/llama.cpp of the llama-cpp-python 0.3.36 sdist.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
llama="${LLAMA_CPP:?set LLAMA_CPP to a llama.cpp source tree with a build in build/}"
libdir="$llama/build/bin"
[ -f "$libdir/libggml-base.so" ] || { echo "no $libdir/libggml-base.so (build llama.cpp with -DBUILD_SHARED_LIBS=ON)" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cc -O1 -o "$work/dequant_ref" "$here/dequant_ref.c" -I"$llama/ggml/include" \
    -L"$libdir" -lggml-base -Wl,-rpath,"$libdir"
out="$repo/kernels/tests/fixtures/llama-ref"
mkdir -p "$out"
ggml_version="$(cd "$libdir" && ls libggml-base.so.*.*.* 2>/dev/null | head -1 | sed 's/libggml-base.so.//')"
python3 "$here/make_fixtures.py" "$work/dequant_ref" "$out" "${ggml_version:-unknown}"
