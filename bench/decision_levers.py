"""Two levers of issue #30 that need no GPU, checked on a run's records and the training split:

1. Cause offsets per emotion (training split, gold): how often the utterance k places before (or after) an emotional
   one is among its causes, and how that depends on the speaker. A pair is worth predicting where it is more likely
   than about half the F1 reached (~0.3 here), so this says whether any rule beyond self + previous could pay.
2. Neighbour smoothing of the emotion stage's label scores: each utterance's seven log-probabilities plus ``alpha``
   times the log-probabilities of its neighbour (the utterance before, the speaker's own previous one, the one
   after), scored like the validation step's bias objective (predicted emotions + self/previous causes,
   ``mecpe.calibrate.rule_weighted_f1``). Choose on the validation records; the test records are reported only.

    python bench/decision_levers.py --train DATA/NUSTM_MECPE/data/all_data_pair.txt \\
        --records RUN/validation/raw/records RUN/inference/records [--json FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from cause_sources import read_records  # noqa: E402
from mecpe.calibrate import rule_weighted_f1, utterances_from_records  # noqa: E402
from mecpe.readers import read_conversations  # noqa: E402
from mecpe.splits import split_train_val  # noqa: E402

ALPHAS = (0.1, 0.2, 0.3, 0.5)


def cause_offsets(train) -> dict:
    """Per emotion: emotional utterances, causes per utterance, share with a cause at each offset; and per (offset,
    same/other speaker, neighbour neutral/emotional) the share of neighbours that are causes."""
    by_emotion: dict = collections.defaultdict(collections.Counter)
    count: collections.Counter = collections.Counter()
    hits, seen = collections.Counter(), collections.Counter()
    for conv in train:
        us = conv.utterances
        for i, u in enumerate(us):
            if not u.emotion or u.emotion == "neutral":
                continue
            count[u.emotion] += 1
            causes = set(conv.causes_of(u.id))
            for c in causes:
                by_emotion[u.emotion][[x.id for x in us].index(c) - i] += 1
            for off in (-1, -2):
                if i + off >= 0:
                    nb = us[i + off]
                    key = f"{off} {'same' if nb.speaker == u.speaker else 'other'} speaker, " \
                          f"{'neutral' if nb.emotion == 'neutral' else 'emotional'}"
                    seen[key] += 1
                    hits[key] += nb.id in causes
    return {"per_emotion": {e: {"utterances": count[e], "causes_per_utterance": round(sum(by_emotion[e].values())
                                                                                     / count[e], 2),
                                "offset_share": {str(k): round(v / count[e], 3)
                                                 for k, v in by_emotion[e].most_common(6)}} for e in sorted(count)},
            "neighbour_is_cause": {k: {"neighbours": seen[k], "share": round(hits[k] / seen[k], 3)}
                                   for k in sorted(seen)}}


def neighbours(records: list[dict]) -> dict[str, np.ndarray]:
    """Index of each utterance's neighbour in the flattened records (-1: none)."""
    prev, own, nxt = [], [], []
    k = 0
    for rec in records:
        utts, last = rec["conversation"], {}
        for i, u in enumerate(utts):
            prev.append(k + i - 1 if i else -1)
            own.append(last.get(u["speaker"], -1))
            last[u["speaker"]] = k + i
            nxt.append(k + i + 1 if i + 1 < len(utts) else -1)
        k += len(utts)
    return {"before": np.array(prev), "speaker's previous": np.array(own), "after": np.array(nxt)}


def smoothing(folder: Path) -> dict:
    records = read_records(folder)
    u = utterances_from_records(records)
    raw = u.scores.copy()
    logp = raw - np.logaddexp.reduce(raw, axis=1, keepdims=True)
    out = {"none": round(rule_weighted_f1(u, [0.0] * 7), 4)}
    for name, idx in neighbours(records).items():
        nb = np.where(idx[:, None] >= 0, logp[np.maximum(idx, 0)], np.log(1 / 7))
        for alpha in ALPHAS:
            u.scores = raw + alpha * nb
            out[f"{name}, alpha {alpha}"] = round(rule_weighted_f1(u, [0.0] * 7), 4)
    u.scores = raw
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", required=True, help="ECF all_data_pair.txt (split as prepare splits it: seed 42)")
    ap.add_argument("--records", nargs="+", type=Path, required=True, help="records folders: validation first")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    train = split_train_val(read_conversations(args.train, require_labels=True).conversations)["train"]
    out = {"cause_offsets": cause_offsets(train), "smoothing": {str(f): smoothing(f) for f in args.records}}
    off = out["cause_offsets"]
    print(f"Cause offsets on the training split ({len(train)} conversations, gold): share of emotional utterances "
          f"with a cause at each offset")
    for e, row in off["per_emotion"].items():
        shares = "  ".join(f"{k:>3}: {v:.2f}" for k, v in row["offset_share"].items())
        print(f"  {e:9s} {row['utterances']:5d} utt, {row['causes_per_utterance']:.2f} causes each  {shares}")
    print("A neighbour among the causes, by position, speaker and its own emotion:")
    for k, v in off["neighbour_is_cause"].items():
        print(f"  {k:34s} {v['share']:.3f} of {v['neighbours']}")
    print("\nNeighbour smoothing of the label scores (predicted emotions + self/previous causes, weighted_f1):")
    folders = list(out["smoothing"])
    print(f"  {'smoothing':34s}" + "".join(f"{'validation' if k == 0 else 'test':>14s}" for k in range(len(folders))))
    for key in out["smoothing"][folders[0]]:
        print(f"  {key:34s}" + "".join(f"{out['smoothing'][f][key]:14.4f}" for f in folders))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
