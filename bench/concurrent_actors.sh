#!/usr/bin/env bash
# Issue #29: N copies of bench/profile_gpu.py at once on one GPU (N actors, each as one mecpe actor runs), one
# variant each; prints every process's table and the aggregate rate: all utterances / (last variant end - first
# variant start). Use on the GPU machine after bench/run_corpus_gpu.sh setup / part / part model:
#   bash bench/concurrent_actors.sh N OUTDIR [profile_gpu.py arguments...]
set -uo pipefail
n=$1; out=$2; shift 2
cd "$(dirname "$0")/.."
# convert the GGUF once before the processes start (each would otherwise race to write the cache)
python3 bench/profile_gpu.py --conversations 4 --copies 1 --batch-size 4 "$@" > "$out/convert.log" 2>&1 || exit 1
for k in $(seq 1 "$n"); do
  python3 bench/profile_gpu.py "$@" --out "$out/actor$k.txt" --json "$out/actor$k.json" > "$out/actor$k.log" 2>&1 &
done
wait
python3 - "$out" "$n" <<'PY'
import json, sys, pathlib
out, n = pathlib.Path(sys.argv[1]), int(sys.argv[2])
runs = [json.loads((out / f"actor{k}.json").read_text()) for k in range(1, n + 1)]
names = list(runs[0]["variants"])
for name in names:
    vs = [r["variants"][name] for r in runs]
    span = max(v["epoch_end"] for v in vs) - min(v["epoch_start"] for v in vs)
    utt = sum(v["utterances"] for v in vs)
    print(f"{name}: {n} actors, {utt} utterances in {span:.2f} s = {utt / span:.1f} utt/s together; each alone "
          f"{[v['utt_per_s'] for v in vs]} utt/s over its own wall; peak GiB {[v['peak_gib'] for v in vs]}")
PY
