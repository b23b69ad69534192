#!/usr/bin/env bash
# GPU checks for the lent GPU machine (no Rust toolchain there: build here, carry the binaries).
#
#   Here:   scripts/gpu-check.sh --build      # builds + strips the CUDA test binaries into carry/
#   There:  scripts/gpu-check.sh              # run with carry: ["carry"]; logs under $OUT
#
# There it runs every carry/cuda_* test binary (all GPU tests), then the same binary again to
# check that the second start compiles nothing (NVRTC cache hit), then compute-sanitizer memcheck
# on tiny shapes, and prints a short table last.
set -u
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--build" ]; then
    set -e
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
    mkdir -p carry
    cargo test -p pshard-kernels -p pshard-runtime --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    try: m=json.loads(l)
    except Exception: continue
    if m.get("reason")!="compiler-artifact" or not m.get("executable"): continue
    t=m["target"]
    if t["name"].startswith("cuda_"): print(t["name"], m["executable"])
    elif t["name"]=="pshard_runtime" and "lib" in t["kind"]: print("cuda_runtime", m["executable"])' |
        while read -r name exe; do
            cp "$exe" "carry/$name"
            strip "carry/$name"
            echo "carried carry/$name ($(du -h "carry/$name" | cut -f1))"
        done
    exit 0
fi

OUT=${OUT:-/tmp/pshard-gpu-check}
mkdir -p "$OUT"
export PSHARD_NVRTC_CACHE=/tmp/pshard-nvrtc-check   # fresh cache: first start compiles
rm -rf "$PSHARD_NVRTC_CACHE"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv | tee "$OUT/device.txt"
declare -a rows
status=0
for bin in carry/cuda_*; do
    [ -x "$bin" ] || continue
    name=$(basename "$bin")
    t0=$(date +%s.%N)
    filter=""
    [ "$name" = cuda_runtime ] && filter="gpu::"   # the runtime's GPU tests (all-GPU vs all-CPU)
    "$bin" --test-threads=1 --nocapture $filter >"$OUT/$name.log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    passed=$(grep -Eo '[0-9]+ passed' "$OUT/$name.log" | tail -1)
    failed=$(grep -Eo '[0-9]+ failed' "$OUT/$name.log" | tail -1)
    rows+=("$name tests|rc=$rc, ${passed:-?}, ${failed:-0 failed}, $(awk "BEGIN{printf \"%.1f\", $t1 - $t0}") s")
    [ $rc -eq 0 ] || status=1
    grep -E "^(cuda:|gpu:|SKIP|attention|BENCH|tiny)|logits rel|panicked|FAILED|failed" "$OUT/$name.log" | head -60
    [ "$name" = cuda_kernels ] || continue
    # Second start: the NVRTC cache must be hit and nothing compiled.
    "$bin" --test-threads=1 --nocapture cuda_nvrtc_second_load >"$OUT/$name.second.log" 2>&1
    if grep -q "nvrtc cache hit" "$OUT/$name.second.log"; then
        rows+=("$name 2nd start|$(grep -m1 'nvrtc cache hit' "$OUT/$name.second.log" | sed 's/^cuda: //')")
    else
        rows+=("$name 2nd start|NO CACHE HIT: $(grep -m1 'nvrtc' "$OUT/$name.second.log")")
        status=1
    fi
    # compute-sanitizer memcheck on tiny shapes.
    if command -v compute-sanitizer >/dev/null; then
        PSHARD_CUDA_TINY=1 timeout 300 compute-sanitizer --tool memcheck --error-exitcode 9 \
            "$bin" --test-threads=1 --nocapture cuda_dequant cuda_gemv cuda_get_rows cuda_norms cuda_moe cuda_attention \
            >"$OUT/$name.memcheck.log" 2>&1
        mrc=$?
        summary=$(grep -m1 "ERROR SUMMARY" "$OUT/$name.memcheck.log")
        rows+=("$name memcheck|rc=$mrc ${summary:-no summary}")
        [ $mrc -eq 0 ] || status=1
    else
        rows+=("$name memcheck|compute-sanitizer not found")
    fi
done
echo
echo "| check | result |"
echo "|---|---|"
for r in "${rows[@]}"; do echo "| ${r%%|*} | ${r#*|} |"; done
exit $status
