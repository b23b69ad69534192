#!/usr/bin/env bash
# Benchmark matrix for the lent GPU machine (run it with kind: nvidia-h200 for numbers that are
# compared with llama.cpp's published ones).
#
#   Here:   scripts/gpu-bench.sh --build     # builds + strips the pshard binary into carry/pshard
#   There:  scripts/gpu-bench.sh [MODELS]    # carry: ["carry/pshard"]; synthesizes the models with
#                                            # `pshard synth`, benches them, prints the table last
#
# MODELS defaults to "llama3-8b qwen3-30b-a3b" (q4_k: Q4_K weights, Q6_K output). Env: REPS (3),
# UB (2048), PP (512,4096), TG (128), GPU_PROFILE (profiles/h200-gpu.toml: the per-op breakdown in
# $OUT/optimes-*.txt compares every matmul with that profile's point).
set -u
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--build" ]; then
    set -e
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
    mkdir -p carry
    cargo build -p pshard --release
    cp "$CARGO_TARGET_DIR/release/pshard" carry/pshard
    strip carry/pshard
    echo "carried carry/pshard ($(du -h carry/pshard | cut -f1))"
    exit 0
fi

OUT=${OUT:-/tmp/pshard-gpu-bench}
mkdir -p "$OUT"
MODELS=${*:-llama3-8b qwen3-30b-a3b}
REPS=${REPS:-3}
UB=${UB:-2048}
PP=${PP:-512,4096}
TG=${TG:-128}
DIR=${SYNTH_DIR:-/tmp/pshard-synth}
mkdir -p "$DIR"
BIN=carry/pshard
GPU_PROFILE=${GPU_PROFILE:-profiles/h200-gpu.toml}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
status=0
for m in $MODELS; do
    f="$DIR/$m-q4_k.gguf"
    if [ ! -s "$f" ]; then
        t0=$(date +%s)
        "$BIN" synth "$m" --quant q4_k -o "$f" >"$OUT/synth-$m.log" 2>&1 || { echo "synth $m failed"; tail -5 "$OUT/synth-$m.log"; status=1; continue; }
        echo "synth $m: $(( $(date +%s) - t0 )) s"
    fi
    "$BIN" bench -m "$f" -p "$PP" -n "$TG" -u "$UB" -r "$REPS" --device cuda -o md >"$OUT/bench-$m.md" 2>"$OUT/bench-$m.log" || status=1
    "$BIN" bench -m "$f" -p "$PP" -n "$TG" -u "$UB" -r 1 --device cuda -o json >"$OUT/bench-$m.json" 2>/dev/null || true
    grep -E "^gpu:|bench:|error" "$OUT/bench-$m.log"
    # Where the time goes, op by op, and the matmuls against the GPU profile's points.
    "$BIN" bench -m "$f" -p "$PP" -n "$TG" -u "$UB" -r 1 --device cuda --op-times \
        --gpu-profile "$GPU_PROFILE" >/dev/null 2>"$OUT/optimes-$m.txt" || status=1
done
echo
echo "device: $(cat "$OUT/device.txt"), $(date -u +%Y-%m-%d)"
for m in $MODELS; do
    grep -h -E "matmul kinds matched|^ops total" "$OUT/optimes-$m.txt" 2>/dev/null | sed "s/^/$m: /"
done
for m in $MODELS; do
    grep -v "^device:" "$OUT/bench-$m.md" 2>/dev/null | { [ "$m" = "${MODELS%% *}" ] && cat || tail -n +3; }
done
exit $status
