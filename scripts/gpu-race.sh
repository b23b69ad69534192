#!/usr/bin/env bash
# The budget race on the lent GPU machine: pshard and llama.cpp's auto-fit at the same VRAM budget
# and context (16384), side by side in one run (use kind: nvidia-h200 for numbers compared with
# the published ones).
#
#   Here:   scripts/gpu-race.sh --build   # builds + strips pshard into carry/pshard and packs the
#                                         # llama.cpp peer (llama-cpp-python 0.3.36 sdist, vendored
#                                         # llama.cpp without models/docs/media/benches) into
#                                         # carry/llama.cpp.tar.gz
#   There:  scripts/gpu-race.sh [CASES]   # carry: ["carry"]; builds the peer's llama-bench and
#                                         # llama-fit-params there (~3 min, CUDA, sm_90; pshard
#                                         # itself is never built there), synthesizes the models,
#                                         # runs both sides, prints the table last
#
# CASES: model@MiB, default "llama3-8b@3072 qwen2.5-32b@8192 qwen3-30b-a3b@4096" (q4_k synth).
# For each case llama.cpp's `llama-fit-params -c 16384 -fa on -fitt (free - budget)` picks -ngl/-ot,
# then `llama-bench -fa 1 -ub 2048` measures pp512, pp4096, pp16384 and tg64 with them; pshard runs
# `pshard bench --vram-budget MiB -c 16384` through its plans (in-process with the machine's profiles
# when present under ~/.cache/pshard/profiles, else the committed H200 ones). TTFT = 16384 / pp16384.
# Env: REPS (2), PP (the prompt tests, default 512,4096,16384), CTX (16384; a model trained on a shorter
# context runs at its training context on both sides, without the prompt tests past it), OUT (logs), SYNTH_DIR,
# PROFILE (1: profile this machine first, `pshard profile cpu` and `gpu`, unless it has profiles under
# ~/.cache/pshard/profiles; ~5 min on an H100 machine, copied to $OUT/profiles: with the peer's
# build a first call may reach its time limit; call again on the warm machine, which keeps the
# profiles, the peer and the models), STRATEGIES (the strategies whose tg64 pshard also runs forced
# at the same budget, beside the planned one, to show whether the planner picked the fastest;
# default the four hybrid decode strategies, "" for none).
set -u
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--build" ]; then
    set -e
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
    mkdir -p carry
    cargo build -p pshard --release
    cp "$CARGO_TARGET_DIR/release/pshard" carry/pshard
    strip carry/pshard
    if [ ! -s carry/llama.cpp.tar.gz ]; then
        tmp=$(mktemp -d)
        # The sdist straight from the index: `pip download` of an sdist prepares its metadata,
        # which builds cmake from source on a fresh machine (many minutes).
        url=$(curl -fsSL https://pypi.org/simple/llama-cpp-python/ |
            grep -o 'https://[^"#]*/llama_cpp_python-0\.3\.36\.tar\.gz' | head -1)
        curl -fsSL -o "$tmp"/llama_cpp_python-0.3.36.tar.gz "$url"
        tar -xzf "$tmp"/llama_cpp_python-0.3.36.tar.gz -C "$tmp"
        src="$tmp/llama_cpp_python-0.3.36/vendor/llama.cpp"
        rm -rf "$src/models" "$src/docs" "$src/media" "$src/benches"
        mkdir -p "$src/app" && touch "$src/app/CMakeLists.txt"
        tar -czf carry/llama.cpp.tar.gz -C "$(dirname "$src")" llama.cpp
        rm -rf "$tmp"
    fi
    du -h carry/pshard carry/llama.cpp.tar.gz
    exit 0
fi

OUT=${OUT:-/tmp/pshard-gpu-race}
mkdir -p "$OUT"
CASES=${*:-llama3-8b@3072 qwen2.5-32b@8192 qwen3-30b-a3b@4096}
REPS=${REPS:-2}
CTX=${CTX:-16384}
PP=${PP:-512,4096,16384}
DIR=${SYNTH_DIR:-/tmp/pshard-synth}
mkdir -p "$DIR"
BIN=carry/pshard
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader | tee "$OUT/device.txt"

# The models, synthesized in the background while the peer builds (both take minutes; the
# device is held the whole time). Each is written under a temporary name and renamed when done.
synth_pids=()
for c in $CASES; do
    m=${c%@*}
    f="$DIR/$m-q4_k.gguf"
    [ -s "$f" ] && continue
    ( t0=$(date +%s)
      "$BIN" synth "$m" --quant q4_k -o "$f.part" >"$OUT/synth-$m.log" 2>&1 && mv "$f.part" "$f" &&
          echo "synth $m: $(( $(date +%s) - t0 )) s" ) &
    synth_pids+=($!)
done

# This machine's profiles, so the plans price its own CPU and GPU (the committed ones are the H200
# machine's).
if [ "${PROFILE:-0}" = 1 ]; then
    mkdir -p ~/.cache/pshard/profiles "$OUT/profiles"
    for half in cpu gpu; do
        f=~/.cache/pshard/profiles/$half.toml
        if [ ! -s "$f" ]; then
            t0=$(date +%s)
            "$BIN" profile "$half" --no-progress -o "$f" >"$OUT/profile-$half.log" 2>&1
            echo "profile $half: rc=$? in $(( $(date +%s) - t0 )) s"
        fi
        cp "$f" "$OUT/profiles/" 2>/dev/null
    done
fi

# The peer, built for this GPU.
PEER=/tmp/llama.cpp
OUT=$OUT scripts/gpu-peer.sh llama-bench llama-fit-params

[ ${#synth_pids[@]} -gt 0 ] && wait "${synth_pids[@]}"

declare -a rows srows
set -f   # the -ot patterns hold [...]: never glob them
for c in $CASES; do
    m=${c%@*}
    budget=${c#*@}
    f="$DIR/$m-q4_k.gguf"
    if [ ! -s "$f" ]; then
        t0=$(date +%s)
        "$BIN" synth "$m" --quant q4_k -o "$f" >"$OUT/synth-$m.log" 2>&1 || { echo "synth $m failed"; continue; }
        echo "synth $m: $(( $(date +%s) - t0 )) s"
    fi
    # Both sides at CTX or the model's training context where that is shorter (pshard refuses
    # a longer one), and only the prompt tests that fit it.
    train=$("$BIN" inspect -m "$f" --json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["hparams"]["n_ctx_train"])')
    ctx=$CTX
    [ -n "$train" ] && [ "$train" -lt "$ctx" ] && ctx=$train
    pp=$(echo "$PP" | tr ',' '\n' | awk -v c="$ctx" '$1 + 64 <= c' | paste -sd, -)
    [ -n "$pp" ] || { echo "$m: no prompt test of $PP fits its context $ctx"; continue; }
    # llama.cpp: its own fit at the budget, then llama-bench with what it chose.
    free=$(nvidia-smi --query-gpu=memory.free --format=csv,noheader,nounits | head -1)
    "$PEER/build/bin/llama-fit-params" -m "$f" -c "$ctx" -fa on -fitt $((free - budget)) \
        >"$OUT/fit-$m.log" 2>&1
    # It prints `-c N -ngl N [-ot "pat=CPU,pat=CPU"]`: drop the quotes (the value is passed as one
    # word below) and separate the overrides with `;` (llama-bench's `,` separates test values).
    fit=$(grep -Eo -- '-ngl [0-9]+( -ot "?[^ ]+)?' "$OUT/fit-$m.log" | tail -1 | tr -d '"')
    fit=$(echo "$fit" | sed -E ':a; s/(-ot [^ ,]*),/\1;/; ta')
    echo "$m @ $budget MiB: llama.cpp fit chose: ${fit:-nothing (see $OUT/fit-$m.log)}"
    # shellcheck disable=SC2086
    "$PEER/build/bin/llama-bench" -m "$f" -p "$pp" -n 64 -fa 1 -ub 2048 -r "$REPS" $fit \
        -o json >"$OUT/peer-$m.json" 2>"$OUT/peer-$m.log"
    # pshard at the same budget and context.
    "$BIN" bench -m "$f" -p "$pp" -n 64 -r "$REPS" --device cuda --vram-budget "$budget" \
        -c "$ctx" -o json >"$OUT/pshard-$m.json" 2>"$OUT/pshard-$m.log"
    grep -E "^plans:|^warning|VRAM|error" "$OUT/pshard-$m.log" | head -5
    # The decode of each forced strategy beside the planned one: measured and predicted t/s.
    for s in ${STRATEGIES-DYNAMIC_FFNCPU_ATTNSTREAM BANDWIDTH_AGGREGATION STATIC_FITPARAMS_DENSEPRIO_MOEONLY STATIC_ATTNPRIO_ALLMODELS}; do
        "$BIN" bench -m "$f" -p 0 -n 64 -r "$REPS" --device cuda --vram-budget "$budget" -c "$ctx" \
            --strategy "$s" -o json >"$OUT/strategy-$m-$s.json" 2>"$OUT/strategy-$m-$s.log"
        srows+=("$(python3 - "$m" "$budget" "$s" "$OUT/strategy-$m-$s.json" <<'PY'
import json, sys
m, budget, s, path = sys.argv[1:5]
try:
    x = [r for r in json.load(open(path)) if r.get("n_gen")][0]
    print(f"| {m} | {budget} | {s} | {x['avg_ts']:,.1f} | {x.get('predicted_ts') or 0:,.1f} |")
except Exception:
    print(f"| {m} | {budget} | {s} | failed (see strategy-{m}-{s}.log) | |")
PY
)")
    done
    rows+=("$(python3 - "$m" "$budget" "$OUT/peer-$m.json" "$OUT/pshard-$m.json" "$fit" "$ctx" <<'PY'
import json, sys
m, budget, peer, ours, fit, ctx = sys.argv[1:7]
def load(p):
    try:
        return json.load(open(p))
    except Exception:
        return []
def rates(rows):
    r = {}
    for x in rows:
        key = f"pp{x['n_prompt']}" if x.get("n_gen", 0) == 0 else f"tg{x['n_gen']}"
        r[key] = (x["avg_ts"], x.get("strategy"), x.get("predicted_ts"))
    return r
a, b = rates(load(peer)), rates(load(ours))
# A MoE fit overrides dozens of tensors: the table counts them (the full text is in fit-MODEL.log).
ngl, _, ot = (fit or "?").partition(" -ot ")
fit = ngl + (f" -ot ({len(ot.split(';'))} patterns)" if ot else "")
cells = []
for side, r in (("llama.cpp fit " + fit, a), ("pshard", b)):
    vals = [f"{r[k][0]:,.1f}" if k in r else "-" for k in ("pp512", "pp4096", "pp16384", "tg64")]
    ttft = f"{16384 / r['pp16384'][0]:.2f} s" if "pp16384" in r else "-"
    strat = r.get("tg64", (0, None, None))[1] or ""
    cells.append(f"| {m} | {budget} | {ctx} | {side} | " + " | ".join(vals) + f" | {ttft} | {strat} |")
print("\n".join(cells))
PY
)")
done
echo
echo "device: $(cat "$OUT/device.txt"), $(date -u +%Y-%m-%d)"
echo "| model | budget MiB | ctx | side | pp512 | pp4096 | pp16384 | tg64 | TTFT 16k | decode strategy |"
echo "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"
for r in "${rows[@]}"; do echo "$r"; done
if [ ${#srows[@]} -gt 0 ]; then
    echo
    echo "| model | budget MiB | pshard strategy (forced) | tg64 t/s | predicted t/s |"
    echo "| --- | ---: | --- | ---: | ---: |"
    for r in "${srows[@]}"; do echo "$r"; done
fi
