"""An emotion ensemble against its members (issue #30): the run's test split inferred again with each member's
emotion adapter alone (the same cause adapter, the same emotion bias, every other setting of the run), official
metric, beside the ensemble's own figures. Says whether averaging beat the members it averages.

    python bench/ensemble_members.py --run OUTPUT_DIR [--json FILE]

OUTPUT_DIR: the output folder of a ``mecpe pipeline`` run with ``training.emotion_ensemble`` > 1 (its
``pipeline.json``, ``config.yaml`` and ``metrics.json``). The members' inference goes to OUTPUT_DIR/members/<k>/.
Prints a table: member | weighted_f1 | emotion accuracy | predicted neutral (utterances).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sweep_smollm2 import _neutral  # noqa: E402 - the sweep's count of predicted-neutral utterances


def members_table(run: Path) -> list[dict]:
    from mecpe import pipeline
    from mecpe.config import load_config

    cfg = load_config(str(run / "config.yaml"))
    members = [cfg.inference.emotion_adapter, *cfg.inference.emotion_ensemble]
    if len(members) < 2:
        raise SystemExit(f"{run}: one emotion adapter, no ensemble (training.emotion_ensemble)")
    metrics = json.loads((run / "metrics.json").read_text())
    rows = [{"member": "ensemble", "adapter": f"{len(members)} adapters", "weighted_f1": metrics["weighted_f1"],
             "emotion_accuracy": metrics.get("emotion_accuracy"), "predicted_neutral": _neutral(
                 run / "Subtask_2_pred.json")}]
    for k, adapter in enumerate(members):
        one = cfg.model_copy(deep=True)
        one.inference.emotion_adapter, one.inference.emotion_ensemble = adapter, []
        out = run / "members" / str(k)
        got = pipeline.step_infer(one, None, str(out), score=True).metrics
        rows.append({"member": str(k), "adapter": adapter, "weighted_f1": got.weighted_f1,
                     "emotion_accuracy": got.emotion_accuracy, "predicted_neutral": _neutral(
                         out / "Subtask_2_pred.json")})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, type=Path, help="the pipeline run's output folder")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    a = ap.parse_args()
    rows = members_table(a.run.resolve())
    print("| member | weighted_f1 | emotion accuracy | predicted neutral | adapter |\n|---|---|---|---|---|")
    for r in rows:
        acc = "-" if r["emotion_accuracy"] is None else f"{r['emotion_accuracy']:.4f}"
        print(f"| {r['member']} | {r['weighted_f1']:.4f} | {acc} | {r['predicted_neutral']} | {r['adapter']} |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
