#!/usr/bin/env bash
# CPU engine vs llama.cpp's CPU backend on the same machine (issue 3's peer comparison). Meant for a
# quiet many-core machine such as the lent GPU machine's 16-core host (run there with carry).
#
#   Here:   scripts/gpu-bench.sh --build                 # carry/pshard
#           cp -a /path/to/llama.cpp/build/bin carry/llama-cpu   # llama-bench + its .so files
#   There:  scripts/cpu-peer-bench.sh [MODELS]           # carry: ["carry"]
#
# MODELS: synth preset names (default "llama3.2-1b llama3-8b"), made with `pshard synth --quant q4_k`
# unless present in $SYNTH_DIR. Env: THREADS (all cores), REPS (3), PP (512), TG (64).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pshard-cpu-peer}
mkdir -p "$OUT"
MODELS=${*:-llama3.2-1b llama3-8b}
THREADS=${THREADS:-$(nproc)}
REPS=${REPS:-3}
PP=${PP:-512}
TG=${TG:-64}
DIR=${SYNTH_DIR:-/tmp/pshard-synth}
mkdir -p "$DIR"
BIN=carry/pshard
PEER=carry/llama-cpu/llama-bench
lscpu | grep -E "Model name|^CPU\(s\)" | tee "$OUT/cpu.txt"
rows=()
for m in $MODELS; do
    f="$DIR/$m-q4_k.gguf"
    [ -s "$f" ] || "$BIN" synth "$m" --quant q4_k -o "$f" >"$OUT/synth-$m.log" 2>&1 || { echo "synth $m failed"; continue; }
    "$BIN" bench -m "$f" -p "$PP" -n "$TG" -t "$THREADS" -r "$REPS" --device cpu -o md >"$OUT/pshard-$m.md" 2>"$OUT/pshard-$m.log"
    if [ -x "$PEER" ]; then
        LD_LIBRARY_PATH=carry/llama-cpu "$PEER" -m "$f" -p "$PP" -n "$TG" -t "$THREADS" -r "$REPS" -o md \
            >"$OUT/llama-$m.md" 2>"$OUT/llama-$m.log"
    fi
    for test in "pp$PP" "tg$TG"; do
        ours=$(grep -E "\| *$test *\|" "$OUT/pshard-$m.md" | awk -F'|' '{print $(NF-1)}' | xargs)
        peer=$(grep -E "\| *$test *\|" "$OUT/llama-$m.md" 2>/dev/null | awk -F'|' '{print $(NF-1)}' | xargs)
        rows+=("| $m q4_k | $test | ${ours:-?} | ${peer:-?} |")
    done
done
echo
echo "CPU: $(grep 'Model name' "$OUT/cpu.txt" | sed 's/.*: *//'), $THREADS threads, $(date -u +%Y-%m-%d)"
echo "| model | test | pshard t/s | llama.cpp t/s |"
echo "|---|---|---:|---:|"
for r in "${rows[@]}"; do echo "$r"; done
