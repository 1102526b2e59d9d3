#!/usr/bin/env bash
# All GPU benchmarks in one go (the device machine is lent for minutes at a time), most important first, each part
# under its own time limit so a slow part cannot take the others' results with it. Logs and JSON go to $OUT.
#
#   OUT=/tmp/bench MECPE_DATA=device_data/ecf bash bench/run_gpu.sh [deadline_seconds]
#   PARTS="standin train" ... bash bench/run_gpu.sh 200
#       (a subset of: standin train infer profile train40 inferbig t4; default: standin train infer)
#
# Needs: ray, trl, bitsandbytes importable (see README, "GPU benchmarks"); a tokenizer folder at
# $TOKENIZER (default device_data/tokenizer: the project's tiny ECF tokenizer, `mecpe tiny-model`).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mecpe-bench}
# the benchmarks' own folders (training runs, checkpoints, inference shards) stay on the machine: the device tool
# brings back at most 8 files of $OUT, so only each part's figures (bench_*.json, t4.json, profile tables) are copied
# there when it ends, beside the logs
WORK=${WORK:-/tmp/mecpe-bench-work}
DATA=${MECPE_DATA:-device_data/ecf}
TOKENIZER=${TOKENIZER:-device_data/tokenizer}
MODEL=${MODEL:-/tmp/standin-13b}
DEADLINE=$(( $(date +%s) + ${1:-560} ))
mkdir -p "$OUT" "$WORK"
left() { echo $(( DEADLINE - $(date +%s) )); }
PARTS=${PARTS:-standin train infer}
part() {  # part NAME MIN_SECONDS CMD...: run CMD with the time left (if at least MIN_SECONDS), log to $OUT/NAME.log
  local name=$1 min=$2; shift 2
  [[ " $PARTS " == *" $name "* ]] || return 0
  local t; t=$(left)
  if (( t < min )); then echo "[run_gpu] skip $name: ${t}s left" | tee -a "$OUT/run_gpu.log"; return; fi
  echo "[run_gpu] $name (limit ${t}s): $*" | tee -a "$OUT/run_gpu.log"
  local s; s=$(date +%s)
  timeout --signal=KILL "$t" "$@" > "$OUT/$name.log" 2>&1
  echo "[run_gpu] $name rc=$? in $(( $(date +%s) - s ))s" | tee -a "$OUT/run_gpu.log"
  (cd "$WORK" && find . -maxdepth 3 -type f \( -name 'bench_*.json' -o -name 't4.json' \
    -o -path './*/profile/*' \) | xargs -r cp --parents -t "$OUT")  # the figures, never the runs' folders
  tail -25 "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
part standin 60 python3 bench/standin.py --out "$MODEL" --tokenizer "$TOKENIZER"
# training: the reference LoRA with and without Liger's kernels, 8,192-token micro-batches, a whole 64-step run
part train 200 python3 bench/bench_train.py --model "$MODEL" --data "$DATA" --out "$WORK/train" --steps ${TRAIN_STEPS:-64} \
    --variants ${TRAIN_VARIANTS:-ref,ref-liger} --budgets ${TRAIN_TOKENS:-8192} --logging-steps 2 ${TRAIN_FLAGS:-}
part infer 150 python3 bench/bench_infer.py --model "$MODEL" --data "$DATA" --out "$WORK/infer" --sample 200 --cause-sample 100 --skip-t4 \
    --override inference.max_batch_tokens=65536 --override inference.batch_size=128
# where a training step's time goes, early (warm-up) and later: torch.profiler tables in $OUT/profile/profile/ (copied)
part profile 60 python3 bench/bench_train.py --model "$MODEL" --data "$DATA" --out "$WORK/profile" --steps 12 --variants ref \
    --budgets ${TRAIN_TOKENS:-8192} --logging-steps 1 --profile-steps 2-4,9-11 --no-epoch
# the cluster recipe's GPU: every process capped at 39.5 GiB (an A100 40 GB less its CUDA context)
part train40 60 python3 bench/bench_train.py --model "$MODEL" --data "$DATA" --out "$WORK/train40" --steps 12 \
    --variants ${TRAIN40_VARIANTS:-ref-liger} --budgets ${TRAIN40_TOKENS:-2048,4096} --ckpt off --memory-cap-gib 39.5 \
    --logging-steps 2 --no-epoch
part train40ckpt 45 python3 bench/bench_train.py --model "$MODEL" --data "$DATA" --out "$WORK/train40ckpt" --steps 12 \
    --variants ${TRAIN40_VARIANTS:-ref-liger} --budgets ${TRAIN40CKPT_TOKENS:-8192,16384} --ckpt on --memory-cap-gib 39.5 \
    --logging-steps 2 --no-epoch
# inference with larger batches (fewer, wider decoding passes)
part inferbig 120 python3 bench/bench_infer.py --model "$MODEL" --data "$DATA" --out "$WORK/inferbig" --part mecpe \
    --override inference.max_batch_tokens=${BIG_TOKENS:-131072} --override inference.batch_size=${BIG_BATCH:-512}
part t4 60 python3 bench/bench_infer.py --model "$MODEL" --data "$DATA" --out "$WORK/infer" --part t4
# each script starts and stops its own local Ray (ray.init / process exit); nothing else is stopped here
echo "[run_gpu] done, $(left)s before the deadline" | tee -a "$OUT/run_gpu.log"
