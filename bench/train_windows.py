"""The logged throughput windows of training benchmark runs, as RESULTS.md quotes them: per variant, the steady rate
(median of the second half of the windows, ``bench_train.steady_rate``) and the second half's lowest and highest
window. Reads ``bench_train.json`` files, or the ``train.log`` of a run whose JSON did not come back (the worker's
``step N/M: ... useful_tokens_per_s=X`` lines; each ``step 1/M`` starts the next variant of its command line).

    python bench/train_windows.py bench/results/2026-11-29-run4/train/bench_train.json \
        bench/results/2026-12-03-h200-run1/train.log bench/results/2026-12-03-h200-run2/train/bench_train.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import steady_rate  # noqa: E402

STEP = re.compile(r"step (\d+)/\d+: .*?useful_tokens_per_s=([\d.]+)")
VARIANTS = re.compile(r"--variants (\S+)")


def runs_of(path: Path) -> list[tuple[str, list[float]]]:
    """(variant, windows) of every run in a bench_train.json or a train.log."""
    if path.suffix == ".json":
        return [(v["variant"], v["useful_tok_s_windows"]) for v in json.loads(path.read_text())["variants"]]
    text = path.read_text(errors="replace")
    runs: list[list[float]] = []
    for step, rate in STEP.findall(text):
        if step == "1":
            runs.append([])
        runs[-1].append(float(rate))
    names = VARIANTS.search(text).group(1).split(",")
    return list(zip(names, runs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path)
    args = ap.parse_args()
    print("| file | variant | windows | steady tok/s | second half min | second half max |")
    print("|---|---|---|---|---|---|")
    for path in args.files:
        for name, windows in runs_of(path):
            half = windows[len(windows) // 2:]
            print(f"| {path} | {name} | {len(windows)} | {steady_rate(windows):,.0f} | {min(half):,.0f} | "
                  f"{max(half):,.0f} |")


if __name__ == "__main__":
    main()
