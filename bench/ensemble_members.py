"""An emotion ensemble against its members (issue #30): the run's test (or validation) split inferred again with each
member's emotion adapter alone (the same cause adapter, the same emotion bias, every other setting of the run), and
with ``--soup`` as one model of the members' mean weights (``inference.emotion_ensemble_mode=soup``: one scoring
pass instead of one per member), official metric, beside the ensemble. Says whether averaging beat the members it
averages, and whether the soup keeps the ensemble's gain.

    python bench/ensemble_members.py --run OUTPUT_DIR [--split val|test] [--soup] [--json FILE]

OUTPUT_DIR: the output folder of a ``mecpe pipeline`` run with ``training.emotion_ensemble`` > 1 (its
``pipeline.json``, ``config.yaml``, ``data/`` and ``metrics.json``). Inference goes to OUTPUT_DIR/members/<split>-<row>/.
Prints a table: member | weighted_f1 | emotion accuracy | predicted neutral (utterances). Choose on ``--split val``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sweep_smollm2 import _neutral  # noqa: E402 - the sweep's count of predicted-neutral utterances


def _row(name: str, adapter: str, weighted_f1: float, emotion_accuracy: float | None, pred: Path) -> dict:
    return {"member": name, "adapter": adapter, "weighted_f1": weighted_f1, "emotion_accuracy": emotion_accuracy,
            "predicted_neutral": _neutral(pred)}


def members_table(run: Path, split: str = "test", soup: bool = False) -> list[dict]:
    """Rows: the ensemble as the run used it, (``soup``) the members' mean weights as one model, each member alone;
    on the run's prepared ``split`` (test: the ensemble's own figures are the run's; val: inferred again)."""
    from mecpe import pipeline
    from mecpe.config import load_config
    from mecpe.layout import RunLayout

    cfg = load_config(str(run / "config.yaml"))
    members = [cfg.inference.emotion_adapter, *cfg.inference.emotion_ensemble]
    if len(members) < 2:
        raise SystemExit(f"{run}: one emotion adapter, no ensemble (training.emotion_ensemble)")
    input_uri = RunLayout(cfg.output_dir).data.split(split)
    variants = [("ensemble", f"{len(members)} adapters, {cfg.inference.emotion_ensemble_mode}", {})]
    if soup:
        variants.append(("soup", f"{len(members)} adapters' mean weights", {"emotion_ensemble_mode": "soup"}))
    variants += [(str(k), adapter, {"emotion_adapter": adapter, "emotion_ensemble": []})
                 for k, adapter in enumerate(members)]
    rows = []
    for name, adapter, changes in variants:
        if split == "test" and name == "ensemble":  # the run's own test inference
            metrics = json.loads((run / "metrics.json").read_text())
            rows.append(_row(name, adapter, metrics["weighted_f1"], metrics.get("emotion_accuracy"),
                             run / "Subtask_2_pred.json"))
            continue
        one = cfg.model_copy(deep=True)
        for key, value in changes.items():
            setattr(one.inference, key, value)
        out = run / "members" / f"{split}-{name}"
        got = pipeline.step_infer(one, input_uri, str(out), score=True).metrics
        rows.append(_row(name, adapter, got.weighted_f1, got.emotion_accuracy, out / "Subtask_2_pred.json"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, type=Path, help="the pipeline run's output folder")
    ap.add_argument("--split", choices=("val", "test"), default="test",
                    help="the run's prepared split to infer (choose on val; test is reported only)")
    ap.add_argument("--soup", action="store_true", help="also the members' mean weights as one model "
                                                        "(inference.emotion_ensemble_mode=soup)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    a = ap.parse_args()
    rows = members_table(a.run.resolve(), a.split, a.soup)
    print("| member | weighted_f1 | emotion accuracy | predicted neutral | adapter |\n|---|---|---|---|---|")
    for r in rows:
        acc = "-" if r["emotion_accuracy"] is None else f"{r['emotion_accuracy']:.4f}"
        print(f"| {r['member']} | {r['weighted_f1']:.4f} | {acc} | {r['predicted_neutral']} | {r['adapter']} |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
