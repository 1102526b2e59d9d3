#!/usr/bin/env bash
# All GPU benchmarks in one go (the device machine is lent for minutes at a time), most important first, each part
# under its own time limit so a slow part cannot take the others' results with it. Logs and JSON go to $OUT.
#
#   OUT=/tmp/bench MECPE_DATA=device_data/ecf bash bench/run_gpu.sh [deadline_seconds]
#   PARTS="standin train" ... bash bench/run_gpu.sh 200      (a subset of: standin infer train t4)
#
# Needs: ray, trl, bitsandbytes importable (see README, "GPU benchmarks"); a tokenizer folder at
# $TOKENIZER (default device_data/tokenizer: the project's tiny ECF tokenizer, `mecpe tiny-model`).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mecpe-bench}
DATA=${MECPE_DATA:-device_data/ecf}
TOKENIZER=${TOKENIZER:-device_data/tokenizer}
MODEL=${MODEL:-/tmp/standin-13b}
DEADLINE=$(( $(date +%s) + ${1:-560} ))
mkdir -p "$OUT"
left() { echo $(( DEADLINE - $(date +%s) )); }
PARTS=${PARTS:-standin infer train t4}
part() {  # part NAME MIN_SECONDS CMD...: run CMD with the time left (if at least MIN_SECONDS), log to $OUT/NAME.log
  local name=$1 min=$2; shift 2
  [[ " $PARTS " == *" $name "* ]] || return 0
  local t; t=$(left)
  if (( t < min )); then echo "[run_gpu] skip $name: ${t}s left" | tee -a "$OUT/run_gpu.log"; return; fi
  echo "[run_gpu] $name (limit ${t}s): $*" | tee -a "$OUT/run_gpu.log"
  local s; s=$(date +%s)
  timeout --signal=KILL "$t" "$@" > "$OUT/$name.log" 2>&1
  echo "[run_gpu] $name rc=$? in $(( $(date +%s) - s ))s" | tee -a "$OUT/run_gpu.log"
  tail -25 "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
part standin 60 python3 bench/standin.py --out "$MODEL" --tokenizer "$TOKENIZER"
part infer 150 python3 bench/bench_infer.py --model "$MODEL" --data "$DATA" --out "$OUT/infer" --sample 40 --skip-t4 --override inference.max_batch_tokens=65536 --override inference.batch_size=128
part train 90 python3 bench/bench_train.py --model "$MODEL" --data "$DATA" --out "$OUT/train" --steps 24 \
    --batch ${TRAIN_BATCH:-8} --max-batch-tokens ${TRAIN_TOKENS:-8192}
part t4 60 python3 bench/bench_infer.py --model "$MODEL" --data "$DATA" --out "$OUT/infer" --part t4
# each script starts and stops its own local Ray (ray.init / process exit); nothing else is stopped here
echo "[run_gpu] done, $(left)s before the deadline" | tee -a "$OUT/run_gpu.log"
