#!/usr/bin/env bash
# Builds the two CPU peers (llama.cpp and ik_llama.cpp) for the CPU this runs on and prints the
# three-way table pshard bench / llama-bench / ik_llama.cpp llama-bench.
#
#   scripts/cpu-peers.sh build LLAMA_SRC IK_SRC      # build both peers under $PEERS (~15 min each on 2 cores)
#   scripts/cpu-peers.sh table MODEL.gguf...         # the three-way table (pp$PP and tg$TG), $ROUNDS rounds
#                                                    # of the three in turn, best round of each
#   scripts/cpu-peers.sh batched MODEL.gguf...       # aggregate decode of $NPL sequences, pshard bench
#                                                    # --parallel beside llama.cpp's llama-batched-bench
#   scripts/cpu-peers.sh build-avx2 LLAMA_SRC        # an AVX2-only llama.cpp under $PEERS/llama.cpp-avx2
#   scripts/cpu-peers.sh avx2 MODEL.gguf...          # pshard capped at AVX2 (PSHARD_CPU_SIMD=avx2) beside
#                                                    # it: $ROUNDS rounds in turn, best round of each
#
# LLAMA_SRC: a llama.cpp source tree, e.g. vendor/llama.cpp of the llama-cpp-python 0.3.36 sdist
#   (`pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`).
# IK_SRC: an ik_llama.cpp source tree (examples/server may be absent: it is not built).
# A peer whose build dir already holds bin/llama-bench is not rebuilt (another build may be running:
# a file BUILDING-* next to the build dir names who builds it; wait for it instead of starting a second).
#
# llama.cpp is configured with GGML_NATIVE=OFF and the x86 features this CPU reports turned on one by one
# (AMX never: a CPU may report AMX while the OS does not grant it, and llama.cpp's AMX code then faults).
# ik_llama.cpp is configured with GGML_NATIVE=ON (its own feature checks), only llama-bench built.
#
# The AVX2-only llama.cpp (build-avx2) is configured with GGML_NATIVE=OFF and AVX, AVX2, FMA, F16C and
# BMI2 on, the AVX-512 options off: the CPU lane of an AVX2 desktop (Haswell … Alder Lake, Zen 2/3).
#
# Env: PEERS (/work/peers), THREADS (2), PP (512; batched: 128), TG (64; batched: 32), REPS (3),
#      NPL (batched: 1,2,4), ROUNDS (table: 1, avx2: 3), PSHARD (target/release/pshard), OUT (/tmp/pshard-cpu-peers),
#      JOBS (nproc).
set -u
cd "$(dirname "$0")/.."
PEERS=${PEERS:-/work/peers}
THREADS=${THREADS:-2}
PP=${PP:-}
TG=${TG:-}
NPL=${NPL:-1,2,4}
REPS=${REPS:-3}
PSHARD=${PSHARD:-target/release/pshard}
OUT=${OUT:-/tmp/pshard-cpu-peers}
JOBS=${JOBS:-$(nproc)}
LLAMA_BIN=$PEERS/llama.cpp/build/bin/llama-bench
LLAMA_BATCHED=$PEERS/llama.cpp/build/bin/llama-batched-bench
LLAMA_AVX2_BIN=$PEERS/llama.cpp-avx2/build/bin/llama-bench
IK_BIN=$PEERS/ik_llama.cpp/build/bin/llama-bench

die() { echo "cpu-peers: $*" >&2; exit 1; }

has_flag() { grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -qx "$1"; }

# -DGGML_X=ON for each x86 feature this CPU reports (llama.cpp's non-native build options).
llama_cpu_flags() {
    local f=(-DGGML_NATIVE=OFF)
    has_flag avx && f+=(-DGGML_AVX=ON)
    has_flag avx2 && f+=(-DGGML_AVX2=ON)
    has_flag fma && f+=(-DGGML_FMA=ON)
    has_flag f16c && f+=(-DGGML_F16C=ON)
    has_flag bmi2 && f+=(-DGGML_BMI2=ON)
    has_flag avx512f && f+=(-DGGML_AVX512=ON)
    has_flag avx512vbmi && f+=(-DGGML_AVX512_VBMI=ON)
    has_flag avx512_vnni && f+=(-DGGML_AVX512_VNNI=ON)
    has_flag avx512_bf16 && f+=(-DGGML_AVX512_BF16=ON)
    has_flag avx_vnni && f+=(-DGGML_AVX_VNNI=ON)
    echo "${f[@]}"
}

# build NAME SRC DEST TARGETS CMAKE_ARGS...: configures SRC into DEST/build and builds TARGETS
# (space-separated; llama-bench first).
build_one() {
    local name=$1 src=$2 dest=$3 targets=$4
    shift 4
    if [ -x "$dest/build/bin/llama-bench" ]; then
        echo "$name: $dest/build/bin/llama-bench exists, not rebuilding"
        return 0
    fi
    local other
    other=$(ls "$dest"/BUILDING-* 2>/dev/null | grep -v BUILDING-cpu-peers.txt | head -1)
    if [ -n "$other" ]; then
        echo "$name: another build is under way ($other: $(cat "$other")); not starting a second"
        return 0
    fi
    [ -f "$src/CMakeLists.txt" ] || die "$name: $src has no CMakeLists.txt"
    if [ "$(realpath "$src")" != "$(realpath -m "$dest")" ]; then
        mkdir -p "$dest"
        cp -a "$src/." "$dest/"
    fi
    echo "built by scripts/cpu-peers.sh from $src; started $(date -u)" >"$dest/BUILDING-cpu-peers.txt"
    echo "$name: cmake $*"
    cmake -S "$dest" -B "$dest/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF "$@" \
        >"$dest/build-configure.log" 2>&1 || die "$name: configure failed, see $dest/build-configure.log"
    # shellcheck disable=SC2086
    cmake --build "$dest/build" --target $targets -j "$JOBS" >"$dest/build.log" 2>&1 \
        || die "$name: build failed, see $dest/build.log"
    echo "$name: built $targets in $dest/build/bin"
}

cmd_build() {
    [ $# -eq 2 ] || die "usage: $0 build LLAMA_SRC IK_SRC"
    command -v cmake >/dev/null || die "cmake is missing (apt-get install cmake)"
    # shellcheck disable=SC2046
    build_one llama.cpp "$1" "$PEERS/llama.cpp" "llama-bench llama-batched-bench" $(llama_cpu_flags)
    build_one ik_llama.cpp "$2" "$PEERS/ik_llama.cpp" llama-bench -DGGML_NATIVE=ON -DLLAMA_BUILD_SERVER=OFF \
        -DGGML_IQK_FA_ALL_QUANTS=OFF -DLLAMA_BUILD_TESTS=OFF
}

cmd_build_avx2() {
    [ $# -eq 1 ] || die "usage: $0 build-avx2 LLAMA_SRC"
    command -v cmake >/dev/null || die "cmake is missing (apt-get install cmake)"
    build_one llama.cpp-avx2 "$1" "$PEERS/llama.cpp-avx2" llama-bench -DGGML_NATIVE=OFF -DGGML_AVX=ON \
        -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF \
        -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF
}

# The t/s column of a markdown row whose test column is $2, from file $1.
# The "t/s" column (found by its header: pshard's table has more columns after it) of the row of test $2.
tps() {
    awk -F'|' -v t="$2" '
        col == 0 { for (i = 1; i <= NF; i++) { h = $i; gsub(/ /, "", h); if (h == "t/s") col = i } next }
        { for (i = 1; i <= NF; i++) { f = $i; gsub(/ /, "", f); if (f == t) { v = $col; sub(/±.*/, "", v); gsub(/ /, "", v); print v; exit } } }
    ' "$1" 2>/dev/null
}

cmd_table() {
    PP=${PP:-512}
    TG=${TG:-64}
    local rounds=${ROUNDS:-1}
    [ $# -ge 1 ] || die "usage: $0 table MODEL.gguf..."
    [ -x "$PSHARD" ] || die "$PSHARD missing (cargo build --release -p pshard-cli)"
    mkdir -p "$OUT"
    local rows=() loads=()
    for m in "$@"; do
        [ -s "$m" ] || die "model $m not found"
        local b
        b=$(basename "$m" .gguf)
        for r in $(seq "$rounds"); do
            # Each program starts from a warm page cache: pshard's repack copies the weights into
            # anonymous memory, which evicts a model near the RAM's size from the cache, and a peer
            # would then read it from disk (qwen3-30b-a3b at 16 GiB on 24 GiB: llama.cpp tg16 2.45
            # t/s cold, 2026-12-05).
            cat "$m" >/dev/null
            "$PSHARD" bench -m "$m" -p "$PP" -n "$TG" -t "$THREADS" -r "$REPS" --device cpu -o md \
                >"$OUT/pshard-$b-$r.md" 2>"$OUT/pshard-$b-$r.log" || echo "pshard bench failed on $b (see $OUT/pshard-$b-$r.log)"
            for peer in llama ik; do
                local bin=$LLAMA_BIN
                [ $peer = ik ] && bin=$IK_BIN
                [ -x "$bin" ] || continue
                cat "$m" >/dev/null
                LD_LIBRARY_PATH=$(dirname "$bin") "$bin" -m "$m" -p "$PP" -n "$TG" -t "$THREADS" -r "$REPS" -o md \
                    >"$OUT/$peer-$b-$r.md" 2>"$OUT/$peer-$b-$r.log" || echo "$peer llama-bench failed on $b"
            done
            loads+=("$(cut -d' ' -f1 /proc/loadavg)")
        done
        for test in "pp$PP" "tg$TG"; do
            local p l i
            best() { for r in $(seq "$rounds"); do tps "$OUT/$1-$b-$r.md" "$test"; done | sort -g | tail -1; }
            p=$(best pshard)
            l=$(best llama)
            i=$(best ik)
            local rl ri
            rl=$(awk -v a="$p" -v b="$l" 'BEGIN{if (a>0 && b>0) printf "%.2f", a/b; else print "?"}')
            ri=$(awk -v a="$p" -v b="$i" 'BEGIN{if (a>0 && b>0) printf "%.2f", a/b; else print "?"}')
            rows+=("| $b | $test | ${p:-?} | ${l:-?} | ${i:-?} | ${rl}x | ${ri}x |")
        done
    done
    echo
    echo "CPU: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, -t $THREADS, best of $rounds round(s) × $REPS repetitions, $(date -u '+%Y-%m-%d %H:%M UTC'), 1-min load after each round: ${loads[*]}"
    echo "| model | test | pshard t/s | llama.cpp t/s | ik_llama.cpp t/s | vs llama.cpp | vs ik |"
    echo "|---|---|---:|---:|---:|---:|---:|"
    for r in "${rows[@]}"; do echo "$r"; done
}

# Aggregate decode t/s of 1..n sequences (each a PP-token prompt, then TG steps of one token per
# sequence): pshard bench --parallel beside llama-batched-bench with one unified KV cache.
cmd_batched() {
    PP=${PP:-128}
    TG=${TG:-32}
    [ $# -ge 1 ] || die "usage: $0 batched MODEL.gguf..."
    [ -x "$PSHARD" ] || die "$PSHARD missing (cargo build --release -p pshard-cli)"
    [ -x "$LLAMA_BATCHED" ] || die "$LLAMA_BATCHED missing (cmake --build $PEERS/llama.cpp/build --target llama-batched-bench)"
    mkdir -p "$OUT"
    local maxpl
    maxpl=$(echo "$NPL" | tr ',' '\n' | sort -n | tail -1)
    local rows=()
    for m in "$@"; do
        [ -s "$m" ] || die "model $m not found"
        local b
        b=$(basename "$m" .gguf)
        cat "$m" >/dev/null
        "$PSHARD" bench -m "$m" -p "$PP" -n "$TG" -t "$THREADS" -r 1 --parallel "$NPL" --device cpu \
            -o json >"$OUT/pshard-batched-$b.json" 2>"$OUT/pshard-batched-$b.log" \
            || echo "pshard bench failed on $b (see $OUT/pshard-batched-$b.log)"
        cat "$m" >/dev/null
        LD_LIBRARY_PATH=$(dirname "$LLAMA_BATCHED") "$LLAMA_BATCHED" -m "$m" -c $((maxpl * (PP + TG))) \
            -b 2048 -ub 512 -npp "$PP" -ntg "$TG" -npl "$NPL" -t "$THREADS" -kvu --output-format jsonl \
            >"$OUT/llama-batched-$b.log" 2>&1 || echo "llama-batched-bench failed on $b"
        grep -h '^{' "$OUT/llama-batched-$b.log" >"$OUT/llama-batched-$b.jsonl"
        rows+=("$(python3 - "$b" "$NPL" "$OUT/pshard-batched-$b.json" "$OUT/llama-batched-$b.jsonl" <<'PY'
import json, sys
b, npl, ours, peer = sys.argv[1], [int(x) for x in sys.argv[2].split(",")], sys.argv[3], sys.argv[4]
p, l = {}, {}
try:
    for x in json.load(open(ours)):
        p[x["n_parallel"]] = x["tg_avg_ts"]
except Exception:
    pass
try:
    for line in open(peer):
        x = json.loads(line)
        l[x["pl"]] = x["speed_tg"]
except Exception:
    pass
for n in npl:
    a, c = p.get(n), l.get(n)
    r = f"{a / c:.2f}x" if a and c else "?"
    fa = f"{a:.1f}" if a else "?"
    fc = f"{c:.1f}" if c else "?"
    print(f"| {b} | {n} | {fa} | {fc} | {r} |")
PY
)")
    done
    echo
    echo "CPU: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, -t $THREADS, prompt $PP, $TG steps, $(date -u '+%Y-%m-%d %H:%M UTC'), load: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "| model | sequences | pshard t/s | llama.cpp t/s | vs llama.cpp |"
    echo "|---|---:|---:|---:|---:|"
    for r in "${rows[@]}"; do echo "$r"; done
}

# pshard capped at AVX2 beside the AVX2-only llama.cpp: ROUNDS rounds, each running pshard then
# llama.cpp (REPS repetitions each), and per program and test the best round's mean. On a shared
# machine the best round is the least disturbed one; llama.cpp's spinning threads lose most under
# load, so single rounds understate it.
cmd_avx2() {
    PP=${PP:-512}
    TG=${TG:-64}
    local rounds=${ROUNDS:-3}
    [ $# -ge 1 ] || die "usage: $0 avx2 MODEL.gguf..."
    [ -x "$PSHARD" ] || die "$PSHARD missing (cargo build --release -p pshard)"
    [ -x "$LLAMA_AVX2_BIN" ] || die "$LLAMA_AVX2_BIN missing ($0 build-avx2 LLAMA_SRC)"
    mkdir -p "$OUT"
    local rows=() loads=()
    for m in "$@"; do
        [ -s "$m" ] || die "model $m not found"
        local b
        b=$(basename "$m" .gguf)
        cat "$m" >/dev/null
        for r in $(seq "$rounds"); do
            PSHARD_CPU_SIMD=avx2 "$PSHARD" bench -m "$m" -p "$PP" -n "$TG" -t "$THREADS" -r "$REPS" \
                --device cpu -o md >"$OUT/avx2-pshard-$b-$r.md" 2>"$OUT/avx2-pshard-$b-$r.log" \
                || echo "pshard bench failed on $b (see $OUT/avx2-pshard-$b-$r.log)"
            LD_LIBRARY_PATH=$(dirname "$LLAMA_AVX2_BIN") "$LLAMA_AVX2_BIN" -m "$m" -p "$PP" -n "$TG" \
                -t "$THREADS" -r "$REPS" -o md >"$OUT/avx2-llama-$b-$r.md" 2>"$OUT/avx2-llama-$b-$r.log" \
                || echo "llama-bench (AVX2) failed on $b"
            loads+=("$(cut -d' ' -f1 /proc/loadavg)")
        done
        for test in "pp$PP" "tg$TG"; do
            local p l
            p=$(for r in $(seq "$rounds"); do tps "$OUT/avx2-pshard-$b-$r.md" "$test"; done | sort -g | tail -1)
            l=$(for r in $(seq "$rounds"); do tps "$OUT/avx2-llama-$b-$r.md" "$test"; done | sort -g | tail -1)
            local rl
            rl=$(awk -v a="$p" -v b="$l" 'BEGIN{if (a>0 && b>0) printf "%.2f", a/b; else print "?"}')
            rows+=("| $b | $test | ${p:-?} | ${l:-?} | ${rl}x |")
        done
    done
    echo
    echo "CPU: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, -t $THREADS, pshard PSHARD_CPU_SIMD=avx2 vs llama.cpp AVX2-only build, best of $rounds rounds × $REPS repetitions, $(date -u '+%Y-%m-%d %H:%M UTC'), 1-min load after each round: ${loads[*]}"
    echo "| model | test | pshard t/s | llama.cpp-AVX2 t/s | vs llama.cpp-AVX2 |"
    echo "|---|---|---:|---:|---:|"
    for r in "${rows[@]}"; do echo "$r"; done
}

case "${1:-}" in
build) shift; cmd_build "$@" ;;
build-avx2) shift; cmd_build_avx2 "$@" ;;
table) shift; cmd_table "$@" ;;
batched) shift; cmd_batched "$@" ;;
avx2) shift; cmd_avx2 "$@" ;;
*) die "usage: $0 build LLAMA_SRC IK_SRC | build-avx2 LLAMA_SRC | table MODEL.gguf... | batched MODEL.gguf... | avx2 MODEL.gguf..." ;;
esac
