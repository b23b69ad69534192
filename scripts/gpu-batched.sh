#!/usr/bin/env bash
# Aggregate decode of several sequences on the lent GPU machine: `pshard bench --parallel` beside
# llama.cpp's `llama-batched-bench`, all on the GPU and at a VRAM budget (llama.cpp placed by its
# own `llama-fit-params` at that budget), in one run. Use kind: nvidia-h200 for compared numbers.
#
#   Here:   scripts/gpu-race.sh --build        # carry/pshard and the peer's source
#   There:  scripts/gpu-batched.sh [MODEL]     # carry: ["carry"]; MODEL default llama3-8b (q4_k
#                                              # synth, reused from /tmp/pshard-synth when there)
# Each sequence gets a prompt of PP tokens, then TG decode steps of one token per sequence are
# timed; aggregate t/s = sequences × TG / decode time (llama-batched-bench's S_TG).
# Env: NPL (1,4,16,64), PP (128), TG (64), BUDGET (3072 MiB), OUT (logs), SYNTH_DIR.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pshard-gpu-batched}
mkdir -p "$OUT"
M=${1:-llama3-8b}
NPL=${NPL:-1,4,16,64}
PP=${PP:-128}
TG=${TG:-64}
BUDGET=${BUDGET:-3072}
DIR=${SYNTH_DIR:-/tmp/pshard-synth}
BIN=carry/pshard
PEER=/tmp/llama.cpp
mkdir -p "$DIR"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader | tee "$OUT/device.txt"
f="$DIR/$M-q4_k.gguf"
if [ ! -s "$f" ]; then
    "$BIN" synth "$M" --quant q4_k -o "$f.part" >"$OUT/synth.log" 2>&1 && mv "$f.part" "$f" &
fi
OUT=$OUT scripts/gpu-peer.sh llama-batched-bench llama-fit-params
wait
[ -s "$f" ] || { echo "synth $M failed (see $OUT/synth.log)"; exit 1; }
maxpl=$(echo "$NPL" | tr ',' '\n' | sort -n | tail -1)
CTX=$((maxpl * (PP + TG)))

set -f   # the -ot patterns hold [...]: never glob them
# llama.cpp: one unified KV cache for all sequences, flash attention; all layers on the GPU, then
# what its fit chooses at the budget (overrides comma-separated, as batched-bench takes them).
peer() { # label, extra args...
    local label=$1; shift
    # shellcheck disable=SC2068
    "$PEER/build/bin/llama-batched-bench" -m "$f" -c "$CTX" -b 2048 -ub 512 -npp "$PP" -ntg "$TG" \
        -npl "$NPL" -fa on -kvu --output-format jsonl $@ >"$OUT/peer-$label.log" 2>&1
    grep -h '^{' "$OUT/peer-$label.log" >"$OUT/peer-$label.jsonl"
}
peer gpu -ngl 99
free=$(nvidia-smi --query-gpu=memory.free --format=csv,noheader,nounits | head -1)
"$PEER/build/bin/llama-fit-params" -m "$f" -c "$CTX" -fa on -fitt $((free - BUDGET)) >"$OUT/fit.log" 2>&1
fit=$(grep -Eo -- '-ngl [0-9]+( -ot "?[^ ]+)?' "$OUT/fit.log" | tail -1 | tr -d '"')
echo "llama.cpp fit at $BUDGET MiB, ctx $CTX: ${fit:-nothing (see $OUT/fit.log)}"
# shellcheck disable=SC2086
peer budget $fit
# pshard: the same sequence counts, prompt and decode steps.
"$BIN" bench -m "$f" -p "$PP" -n "$TG" -r 1 --parallel "$NPL" --device cuda -o json \
    >"$OUT/pshard-gpu.json" 2>"$OUT/pshard-gpu.log"
"$BIN" bench -m "$f" -p "$PP" -n "$TG" -r 1 --parallel "$NPL" --device cuda --vram-budget "$BUDGET" \
    -o json >"$OUT/pshard-budget.json" 2>"$OUT/pshard-budget.log"
grep -hE "^plans:|^warning|error" "$OUT"/pshard-*.log | head -6

echo
echo "device: $(cat "$OUT/device.txt"), $(date -u +%Y-%m-%d), $M q4_k, prompt $PP, $TG decode steps"
python3 - "$OUT" "$BUDGET" "$NPL" <<'PY'
import json, sys
out, budget, npl = sys.argv[1], sys.argv[2], [int(x) for x in sys.argv[3].split(",")]
def peer(label):
    r = {}
    try:
        for line in open(f"{out}/peer-{label}.jsonl"):
            x = json.loads(line)
            r[x["pl"]] = x["speed_tg"]
    except Exception:
        pass
    return r
strategies = {}
def ours(label):
    r = {}
    try:
        for x in json.load(open(f"{out}/pshard-{label}.json")):
            r[x["n_parallel"]] = x["tg_avg_ts"]
            strategies.setdefault(label, set()).add(x.get("strategy") or "?")
    except Exception:
        pass
    return r
print("| placement | side | " + " | ".join(f"{n} seq t/s" for n in npl) + " | pshard strategy |")
print("| --- | --- | " + " | ".join("---:" for _ in npl) + " | --- |")
for label, name in (("gpu", "all on the GPU"), ("budget", f"{budget} MiB")):
    for side, r in (("llama.cpp", peer(label)), ("pshard", ours(label))):
        cells = [f"{r[n]:,.1f}" if n in r else "-" for n in npl]
        note = ", ".join(sorted(strategies.get(label, []))) if side == "pshard" else ""
        print(f"| {name} | {side} | " + " | ".join(cells) + f" | {note} |")
PY
