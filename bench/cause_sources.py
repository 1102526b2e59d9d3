"""Where a run's pairs should come from (issue #30): the cause model's answers, the rule's causes (each emotional
utterance caused by itself and by the one before it), or their union (``inference.rule_causes``), scored by the
official metric on the same predicted emotions. Reads inference records (``records/*.jsonl`` of labelled input:
validation or test), so it needs no GPU. Choose on the validation records; the test records are reported only.

    python bench/cause_sources.py RUN/validation/raw/records RUN/inference/records [--json FILE]

A run made with ``inference.rule_causes`` keeps the model's own answer per utterance (``model_causes``); this reads
it, so every row means the same whatever the run added.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mecpe.labels import RuleCause, rule_causes  # noqa: E402
from mecpe.metric import score_subtask2  # noqa: E402

# (row name, use the model's answer, rule causes added)
SOURCES: tuple[tuple[str, bool, tuple[RuleCause, ...]], ...] = (
    ("model", True, ()),
    ("rule: self", False, ("self",)),
    ("rule: self + previous", False, ("self", "previous")),
    ("model + self", True, ("self",)),
    ("model + self + previous", True, ("self", "previous")),
)


def read_records(folder: Path) -> list[dict]:
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise SystemExit(f"{folder}: no records/*.jsonl")
    return [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]


def model_answers(rec: dict) -> dict[int, list[int]]:
    """The cause model's answer per emotional utterance: ``model_causes`` where the run added rule causes, else the
    record's pairs."""
    utts = rec["conversation"]
    if any("model_causes" in u for u in utts):
        return {int(u["utterance_ID"]): u["model_causes"] for u in utts if "model_causes" in u}
    out: dict[int, list[int]] = {}
    for emo, cause in rec["emotion-cause_pairs"]:
        out.setdefault(int(str(emo).split("_")[0]), []).append(int(cause))
    return out


def predictions(records: list[dict], use_model: bool, rules: tuple[RuleCause, ...]) -> list[dict]:
    out = []
    for rec in records:
        ids = [int(u["utterance_ID"]) for u in rec["conversation"]]
        added = rule_causes(ids, rules)
        model = model_answers(rec) if use_model else {}
        pairs = []
        for u in rec["conversation"]:
            uid, emo = int(u["utterance_ID"]), u["emotion"]
            if emo != "neutral":
                causes = dict.fromkeys([*model.get(uid, []), *added[uid]])
                pairs += [[f"{uid}_{emo}", str(c)] for c in causes]
        out.append({"conversation_ID": rec["conversation_ID"], "emotion-cause_pairs": pairs})
    return out


def gold_of(records: list[dict]) -> list[dict]:
    gold = []
    for rec in records:
        g = (rec.get("_mecpe") or {}).get("gold")
        if g is None:
            raise SystemExit(f"conversation {rec.get('conversation_ID')}: no gold labels in its record")
        gold.append({"conversation_ID": rec["conversation_ID"], "emotion-cause_pairs": g["emotion-cause_pairs"],
                     "conversation": [{"utterance_ID": u["utterance_ID"], "emotion": g["emotions"][str(u["utterance_ID"])]}
                                      for u in rec["conversation"]]})
    return gold


def table(folder: Path) -> list[dict]:
    records = read_records(folder)
    gold = gold_of(records)
    rows = []
    for name, use_model, rules in SOURCES:
        m = score_subtask2(predictions(records, use_model, rules), gold)
        rows.append({"source": name, "weighted_f1": m["weighted_f1"], "weighted_precision": m["weighted_precision"],
                     "weighted_recall": m["weighted_recall"], "pairs": m["num_pred_pairs"],
                     "gold_pairs": m["num_gold_pairs"], "conversations": len(records)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("records", nargs="+", type=Path, help="records folders (validation first, then test)")
    ap.add_argument("--json", type=Path, help="write every figure here")
    args = ap.parse_args()
    out = {}
    for folder in args.records:
        rows = out[str(folder)] = table(folder)
        print(f"\n{folder} ({rows[0]['conversations']} conversations, {rows[0]['gold_pairs']} gold pairs)")
        print(f"{'source':26s} {'weighted_f1':>11s} {'w. P':>7s} {'w. R':>7s} {'pairs':>6s}")
        for r in rows:
            print(f"{r['source']:26s} {r['weighted_f1']:11.4f} {r['weighted_precision']:7.4f} "
                  f"{r['weighted_recall']:7.4f} {r['pairs']:6d}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
