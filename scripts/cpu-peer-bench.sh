#!/usr/bin/env bash
# The CPU lane three-way on the lent GPU machine's host (16 cores): pshard beside llama.cpp and
# ik_llama.cpp, both peers built there for its CPU (scripts/cpu-peers.sh build), then
# scripts/cpu-peers.sh table over synthesized models with all cores.
#
#   Here:   scripts/gpu-race.sh --build                # carry/pshard and carry/llama.cpp.tar.gz
#           scripts/cpu-peer-bench.sh --pack IK_SRC    # carry/ik_llama.cpp.tar.gz (sources only)
#           scripts/cpu-peer-bench.sh --build          # carry/cpu_invariance (the kernels' batch
#                                                      # invariance tests, AMX's included)
#   There:  scripts/cpu-peer-bench.sh [MODELS]         # carry: ["carry"]
#
# There it first runs carry/cpu_invariance (every CPU matmul path against the definition, AMX
# tiles included: a CPU without AMX, or an OS that does not grant it, fails that test) and, after
# the table, pshard's prefill again with AMX turned on (PSHARD_CPU_AMX=1) beside the table's.
#
# Resumable on a warm machine: the peers' build trees and the models stay under /tmp, a peer whose
# llama-bench exists is not rebuilt and a model that exists is not synthesized again, so a call
# cut off by its time limit is carried on by the next one.
# MODELS: synth preset names (default "llama3.2-1b llama3-8b qwen3-30b-a3b"), made with
# `pshard synth --quant q4_k`. Env: THREADS (all cores), REPS (3), PP (512), TG (64), ROUNDS (1),
# BUILD_LIMIT (seconds for the peers' builds, default 420; 0: no build), OUT (logs), SYNTH_DIR.
set -u
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--pack" ]; then
    [ $# -eq 2 ] && [ -f "$2/CMakeLists.txt" ] || { echo "usage: $0 --pack IK_SRC" >&2; exit 1; }
    mkdir -p carry
    # Sources only: the build tree, models, docs and the GitHub data dump stay behind.
    src=$(realpath "$2")
    base=$(basename "$src")
    tar -czf carry/ik_llama.cpp.tar.gz -C "$(dirname "$src")" --exclude="$base/build" \
        --exclude="$base/build*.log" --exclude="$base/BUILDING-*" --exclude="$base/.git" \
        --exclude="$base/models" --exclude="$base/docs" --exclude="$base/media" \
        --exclude="$base/github-data" --transform "s|^$base|ik_llama.cpp|" "$base"
    du -h carry/ik_llama.cpp.tar.gz
    exit 0
fi

if [ "${1:-}" = "--build" ]; then
    set -e
    mkdir -p carry
    exe=$(cargo test -p pshard-kernels --test invariance --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    try: m=json.loads(l)
    except Exception: continue
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"]=="invariance": print(m["executable"])')
    cp "$exe" carry/cpu_invariance
    strip carry/cpu_invariance
    du -h carry/cpu_invariance
    exit 0
fi

OUT=${OUT:-/tmp/pshard-cpu-peer}
mkdir -p "$OUT"
MODELS=${*:-llama3.2-1b llama3-8b qwen3-30b-a3b}
THREADS=${THREADS:-$(nproc)}
DIR=${SYNTH_DIR:-/tmp/pshard-synth}
SRC=/tmp/pshard-peer-src
PEERS=/tmp/pshard-peers
BIN=carry/pshard
[ -x "$BIN" ] || { echo "carry/pshard missing: run scripts/gpu-race.sh --build here" >&2; exit 1; }
mkdir -p "$DIR" "$SRC" "$PEERS"
{ lscpu | grep -E "Model name|^CPU\(s\)"; echo "AMX flags: $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep '^amx' | xargs)"; } | tee "$OUT/cpu.txt"
if [ -x carry/cpu_invariance ]; then
    PSHARD_NO_SKIP=1 timeout 300 carry/cpu_invariance --include-ignored --test-threads=1 >"$OUT/invariance.log" 2>&1
    echo "CPU matmul invariance (AMX included): rc=$? $(grep -E '^test result' "$OUT/invariance.log" | tail -1)"
    grep -E "^SKIP|panicked|AMX" "$OUT/invariance.log" | head -5
fi

# Models in the background while the peers build (both take minutes).
synth_pids=()
for m in $MODELS; do
    f="$DIR/$m-q4_k.gguf"
    [ -s "$f" ] && continue
    ( "$BIN" synth "$m" --quant q4_k -o "$f.part" >"$OUT/synth-$m.log" 2>&1 && mv "$f.part" "$f" ) &
    synth_pids+=($!)
done

for t in llama.cpp ik_llama.cpp; do
    [ -f "$SRC/$t/CMakeLists.txt" ] || [ ! -s "carry/$t.tar.gz" ] || tar -xzf "carry/$t.tar.gz" -C "$SRC"
done
if [ "${BUILD_LIMIT:-420}" -gt 0 ]; then
    t0=$(date +%s)
    PEERS=$PEERS JOBS=$(nproc) timeout "${BUILD_LIMIT:-420}" scripts/cpu-peers.sh build "$SRC/llama.cpp" "$SRC/ik_llama.cpp" \
        >"$OUT/peers-build.log" 2>&1
    echo "peers build: rc=$? in $(( $(date +%s) - t0 )) s (log $OUT/peers-build.log)"
else
    echo "peers build skipped (BUILD_LIMIT=0): the table has the peers already built, if any"
fi
for p in "${synth_pids[@]}"; do wait "$p"; done

files=()
for m in $MODELS; do
    f="$DIR/$m-q4_k.gguf"
    if [ -s "$f" ]; then files+=("$f"); else echo "synth $m failed: $(tail -2 "$OUT/synth-$m.log")"; fi
done
[ ${#files[@]} -gt 0 ] || exit 1
PEERS=$PEERS PSHARD=$BIN THREADS=$THREADS OUT=$OUT scripts/cpu-peers.sh table "${files[@]}"
# What pshard's GEMM ran on, then its prefill again with AMX on (off by default).
grep -h "bench: CPU" "$OUT"/pshard-*-1.log 2>/dev/null | sort -u
echo "| model | pp${PP:-512} AMX on t/s |"
echo "|---|---:|"
for f in "${files[@]}"; do
    cat "$f" >/dev/null
    v=$(PSHARD_CPU_AMX=1 "$BIN" bench -m "$f" -p "${PP:-512}" -n 0 -t "$THREADS" -r "${REPS:-3}" --device cpu -o md \
        2>"$OUT/amx-on-$(basename "$f" .gguf).log" | awk -F'|' -v t="pp${PP:-512}" '
        col == 0 { for (i = 1; i <= NF; i++) { h = $i; gsub(/ /, "", h); if (h == "t/s") col = i } next }
        { for (i = 1; i <= NF; i++) { g = $i; gsub(/ /, "", g); if (g == t) { v = $col; sub(/±.*/, "", v); gsub(/ /, "", v); print v; exit } } }')
    echo "| $(basename "$f" .gguf) | ${v:-?} |"
done
