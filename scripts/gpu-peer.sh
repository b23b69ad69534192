#!/usr/bin/env bash
# Builds the llama.cpp peer for the lent GPU machine's GPU (CUDA, sm_90) from carry/llama.cpp.tar.gz
# (packed by `scripts/gpu-race.sh --build`) into /tmp/llama.cpp, once per machine: targets already
# built are kept, so a second script on a warm machine only builds what it adds (~3 min for the
# first, seconds after). Logs under $OUT.
#
#   scripts/gpu-peer.sh TARGET...     # e.g. llama-bench llama-fit-params llama-batched-bench
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pshard-gpu-peer}
mkdir -p "$OUT"
PEER=/tmp/llama.cpp
missing=()
for t in "$@"; do [ -x "$PEER/build/bin/$t" ] || missing+=("$t"); done
[ ${#missing[@]} -eq 0 ] && exit 0
t0=$(date +%s)
if [ ! -f "$PEER/build/CMakeCache.txt" ]; then
    rm -rf "$PEER" && mkdir -p /tmp && tar -xzf carry/llama.cpp.tar.gz -C /tmp
    (cd "$PEER" && cmake -B build -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_CURL=OFF \
        -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF >"$OUT/peer-cmake.log" 2>&1) ||
        { echo "peer configure failed (see $OUT/peer-cmake.log)"; tail -20 "$OUT/peer-cmake.log"; exit 1; }
fi
(cd "$PEER" && cmake --build build -j "$(nproc)" --target "${missing[@]}" >"$OUT/peer-build.log" 2>&1) ||
    { echo "peer build failed (see $OUT/peer-build.log)"; tail -20 "$OUT/peer-build.log"; exit 1; }
echo "peer build (${missing[*]}): $(( $(date +%s) - t0 )) s"
