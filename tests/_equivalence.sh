#!/bin/sh
# Run tests/_equivalence.py's commands on commit $1 from an exported copy (see its docstring); files into $2.
set -eu
rev=$1 out=$2 repo=$(cd "$(dirname "$0")/.." && pwd)
src=/tmp/eq_src_$(git -C "$repo" rev-parse --short "$rev")
rm -rf "$src" && mkdir -p "$src"
git -C "$repo" archive "$rev" | tar -x -C "$src"
cp "$repo/tests/_equivalence.py" "$src/tests/_equivalence.py"  # the harness as it is now, on any commit
mkdir -p "$src/.cache" && cp -r "$repo/.cache/tiny-model" "$src/.cache/" 2>/dev/null || true
cd "$src" && PYTHONPATH="$src" OMP_NUM_THREADS=1 "$repo/.venv/bin/python" tests/_equivalence.py run "$out"
