#!/bin/sh
# tests/_equivalence.sh with the harness's WORK/RUNS/SMOKE moved to /tmp/eq29s_* (another engineer runs the stock paths)
set -eu
rev=$1 out=$2 repo=/work/wt29s
src=/tmp/eq29s_src_$(git -C "$repo" rev-parse --short "$rev")
rm -rf "$src" && mkdir -p "$src"
git -C "$repo" archive "$rev" | tar -x -C "$src"
cp /tmp/eq29s_harness.py "$src/tests/_equivalence.py"
mkdir -p "$src/.cache" && cp -r "$repo/.cache/tiny-model" "$src/.cache/" 2>/dev/null || true
cd "$src" && PYTHONPATH="$src" OMP_NUM_THREADS=1 MECPE_DATA=/work/shared/data/ecf "$repo/.venv/bin/python" tests/_equivalence.py run "$out"
