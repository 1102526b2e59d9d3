#!/usr/bin/env bash
# Time `mecpe infer` on CPU with the code of two checkouts and the same venv, model, adapters and input, in
# alternating rounds: tells a code change's cost from a slower (or, on a shared VM, CPU-starved) machine. Prints a
# table: wall seconds, the run's own pipeline / stage / actor-load seconds (summary.json), and the CPU time the
# hypervisor stole from this VM during the run (/proc/stat "steal").
#   bash bench/compare_infer_cpu.sh OLD_TREE NEW_TREE CONFIG MODEL EMOTION_ADAPTER CAUSE_ADAPTER INPUT [ROUNDS]
# (an adapter given as null: that stage runs on the plain base)
# e.g. after README command 1, with its learn.yaml outputs (tiny model, both adapters, the synthetic test split).
set -euo pipefail
old=$1 new=$2 config=$3 model=$4 emo=$5 cause=$6 input=$7 rounds=${8:-2}
py="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python"
steal() { awk '/^cpu /{print $9}' /proc/stat; }  # jiffies stolen from all CPUs so far
echo "| round | tree | commit | wall s | pipeline s | emotion actor s | cause actor s | actor load s | stolen CPU % | exit |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for round in $(seq "$rounds"); do
  for tree in "$old" "$new"; do
    out="$(mktemp -d)"
    s0=$(steal); start=$(date +%s.%N); rc=0
    (cd "$tree" && PYTHONPATH="$tree" "$py" -m mecpe.cli infer --config "$config" --input "$input" --output "$out/run" \
       "model.base=$model" "inference.emotion_adapter=$emo" "inference.cause_adapter=$cause" > "$out/log" 2>&1) || rc=$?
    wall=$(python3 -c "import time; print(round(time.time() - $start, 1))")
    stolen=$(python3 -c "print(round(100 * ($(steal) - $s0) / ($wall * $(nproc) * $(getconf CLK_TCK)), 1))")
    figures=$(python3 - "$out/run/summary.json" <<'PY'
import json, sys
try:
    s = json.load(open(sys.argv[1]))["this_run"]
except OSError:
    print("| - | - | - | -"); sys.exit()
st, load = s["stages"], s["engine"].get("load_s") or []
print(f"| {s['pipeline_s']} | {st['emotion']['actor_s']} | {st['cause']['actor_s']} | {' + '.join(map(str, load))}")
PY
)
    echo "| $round | $tree | $(git -C "$tree" rev-parse --short HEAD) | $wall $figures | $stolen | $rc |"
    rm -rf "$out"
  done
done
