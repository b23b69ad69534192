#!/usr/bin/env bash
# Machine profiles on the lent GPU machine (kind: nvidia-h200 for the committed profiles/h200-*).
#
#   Here:   scripts/gpu-bench.sh --build          # builds + strips carry/pshard
#   There:  scripts/gpu-profile.sh [gpu] [cpu]    # carry: ["carry"]; default both halves
#
# Writes $OUT/profiles/{gpu,cpu}.toml (+ roofline SVGs and logs) and prints each summary last.
# Env: QUICK=1 for the --quick runs, LIMIT (seconds per half, default 420).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pshard-gpu-profile}
mkdir -p "$OUT/profiles"
BIN=carry/pshard
HALVES=${*:-gpu cpu}
LIMIT=${LIMIT:-420}
quick=""
[ "${QUICK:-0}" = 1 ] && quick="--quick"
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max --format=csv,noheader | tee "$OUT/device.txt"
lscpu | grep -E "Model name|^CPU\(s\)|Thread" | tee -a "$OUT/device.txt"
for half in $HALVES; do
    t0=$(date +%s)
    timeout "$LIMIT" "$BIN" profile "$half" $quick --no-progress -o "$OUT/profiles/$half.toml" \
        --plot "$OUT/profiles/roofline-$half.svg" >"$OUT/profile-$half.log" 2>&1
    rc=$?
    echo "profile $half: rc=$rc in $(( $(date +%s) - t0 )) s"
    [ $rc -eq 0 ] || { status=1; tail -20 "$OUT/profile-$half.log"; }
done
for half in $HALVES; do
    echo "== $half summary"
    tail -40 "$OUT/profile-$half.log"
done
exit $status
