"""The figures mecpe's results are compared with, computed here from the files, never typed in: the seed team's (JMI)
published submissions and the rule baselines, each scored by mecpe's implementation of the official metric on the
released gold test set (341 conversations).

    python bench/published_baselines.py [--data DIR] [--json OUT.json]

Prints one table. The JMI files cover the 665-conversation evaluation-phase input; the scorer ignores the 324 that
are not in the gold file, as the official one does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mecpe.config import DataConfig
from mecpe.metric import OFFICIAL_KEYS, baseline_predictions, evaluate_files, score_subtask2
from mecpe.storage import read_json

JMI = "cmooncs_SemEval-2024_MultiModal_ECPE/jmi_gpt_submissions"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", help="the ECF data folder (default: MECPE_DATA, else ../shared/data/ecf)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    d = DataConfig(data_dir=args.data)
    gold_path = d.path(d.test_file)
    gold = read_json(gold_path)
    rows = {
        "JMI GPT-4V + GPT-3.5 RAG + self-causes (seed team's best)": evaluate_files(
            d.path(f"{JMI}/gpt-out-self-added/Subtask_2_pred.json"), gold_path),
        "JMI GPT-4V + GPT-3.5 RAG": evaluate_files(d.path(f"{JMI}/gpt-output/Subtask_2_pred.json"), gold_path),
        "majority emotion + self/previous causes": score_subtask2(baseline_predictions(gold, emotions="majority"),
                                                                 gold),
        "gold emotions + self/previous causes (oracle)": score_subtask2(baseline_predictions(gold, emotions="gold"),
                                                                       gold),
    }
    print("| system | " + " | ".join(OFFICIAL_KEYS) + " |")
    print("|---|" + "---|" * len(OFFICIAL_KEYS))
    for name, m in rows.items():
        print(f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k in OFFICIAL_KEYS) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({n: {k: m[k] for k in OFFICIAL_KEYS} for n, m in rows.items()},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
