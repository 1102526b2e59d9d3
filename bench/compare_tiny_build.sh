#!/usr/bin/env bash
# Time the tiny model's build (2 layers, 100 recap-pretraining steps on the same training file) with the code of two
# checkouts and the same venv: tells a code regression from a slower machine. Prints a table.
#   bash bench/compare_tiny_build.sh OLD_TREE NEW_TREE [DATA_FILE]
set -euo pipefail
data="${3:-${MECPE_DATA:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data/ecf}/NUSTM_MECPE/data/all_data_pair.txt}"
py="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python"
echo "| tree | commit | seconds | exit |"
echo "|---|---|---|---|"
for tree in "$1" "$2"; do
  out="$(mktemp -d)"
  start=$(date +%s.%N)
  rc=0
  (cd "$tree" && PYTHONPATH="$tree" "$py" -m mecpe.cli tiny-model --out "$out/tiny" --layers 2 --pretrain-steps 100 \
     --data "$data" > "$out/log" 2>&1) || rc=$?
  secs=$(python3 -c "import time; print(round(time.time() - $start, 1))")
  echo "| $tree | $(git -C "$tree" rev-parse --short HEAD) | $secs | $rc |"
  rm -rf "$out"
done
