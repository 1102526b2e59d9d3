"""The emotion bias fitted on validation data: its objective is exactly the official metric of the rule's pairs, the
fit only moves it up, is deterministic, and is read from real inference records."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest

from mecpe import calibrate
from mecpe.metric import baseline_predictions, score_subtask2
from mecpe.labels import EMOTIONS

from _tiny import train_records


def _records(n: int, seed: int, skill: float) -> list[dict]:
    """Inference-shaped records of real ECF conversations with label scores that favour the gold label by
    ``skill`` on average, plus noise, and an extra pull towards neutral (what a fine-tuned model does)."""
    rng = random.Random(seed)
    out = []
    for conv in train_records()[:n]:
        utts = []
        for u in conv["conversation"]:
            scores = [rng.gauss(0, 1) for _ in EMOTIONS]
            scores[EMOTIONS.index(u["emotion"])] += skill
            scores[0] += 1.0
            utts.append({"utterance_ID": u["utterance_ID"], "text": u["text"], "speaker": u["speaker"],
                         "label_scores": scores})
        gold = {"emotions": {str(u["utterance_ID"]): u["emotion"] for u in conv["conversation"]},
                "emotion-cause_pairs": conv["emotion-cause_pairs"]}
        out.append({"conversation_ID": conv["conversation_ID"], "conversation": utts, "_mecpe": {"gold": gold}})
    return out


def _official(records: list[dict], bias) -> float:
    """The official scorer on the rule's pairs for the biased labels (the long way round)."""
    gold, pred = [], []
    for rec in records:
        g = rec["_mecpe"]["gold"]
        gold.append({"conversation_ID": rec["conversation_ID"], "emotion-cause_pairs": g["emotion-cause_pairs"],
                     "conversation": [{**u, "emotion": g["emotions"][str(u["utterance_ID"])]}
                                      for u in rec["conversation"]]})
        labels = [EMOTIONS[int(np.argmax(np.asarray(u["label_scores"]) + np.asarray(bias)))]
                  for u in rec["conversation"]]
        pred.append({"conversation_ID": rec["conversation_ID"], "emotion-cause_pairs": [],
                     "conversation": [{**u, "emotion": lab} for u, lab in zip(rec["conversation"], labels)]})
    rule = baseline_predictions(pred, emotions="gold")  # self/previous causes for the labels pred carries
    return score_subtask2(rule, gold)["weighted_f1"]


def test_objective_equals_the_official_metric_of_the_rule():
    records = _records(80, 0, 1.5)
    u = calibrate.utterances_from_records(records)
    rng = np.random.default_rng(1)
    for bias in [np.zeros(7)] + [np.r_[0, rng.normal(0, 1.5, 6)] for _ in range(5)]:
        assert calibrate.rule_weighted_f1(u, bias) == pytest.approx(_official(records, bias), abs=1e-6)


def test_fit_raises_the_objective_deterministically():
    u = calibrate.utterances_from_records(_records(120, 2, 1.5))
    a, b = calibrate.fit(u), calibrate.fit(u)
    assert a == b
    assert a.after > a.before and a.bias["neutral"] == 0.0 and any(a.bias.values())
    assert calibrate.rule_weighted_f1(u, [a.bias[e] for e in EMOTIONS]) == pytest.approx(a.after)
    assert a.two_fold.before is not None and a.two_fold.after is not None
    assert a.applied == (a.two_fold.after > a.two_fold.before)
    json.dumps(dataclasses.asdict(a))  # plain floats: it goes into calibration.json and the config


def test_records_without_scores_or_gold_are_refused():
    rec = _records(1, 0, 1.0)[0]
    rec["conversation"][0]["label_scores"] = None
    with pytest.raises(ValueError, match="no label scores"):
        calibrate.utterances_from_records([rec])
    rec = _records(1, 0, 1.0)[0]
    rec["_mecpe"]["gold"] = None
    with pytest.raises(ValueError, match="no gold labels"):
        calibrate.utterances_from_records([rec])


def test_cli_says_whether_the_fitted_bias_was_applied():
    """The pipeline's summary line tells a bias that was fitted but left out (no gain out of sample) from one that
    was applied: printing the values alone read as if it had been."""
    from mecpe.cli import _bias_line
    from mecpe.evaluate import Validation, ValidationScores

    u = calibrate.utterances_from_records(_records(120, 2, 1.5))
    fitted = calibrate.fit(u)
    scores = ValidationScores(*[0.0] * 6)
    applied = Validation(120, None, scores, scores, dataclasses.replace(fitted, applied=True))
    left_out = Validation(120, None, scores, scores, dataclasses.replace(fitted, applied=False))
    values = ", ".join(f"{k} {b:+.2f}" for k, b in fitted.bias.items() if b)
    assert _bias_line(applied) == f"emotion bias: {values}"
    line = _bias_line(left_out)
    assert line.startswith("emotion bias: fitted, not applied (2-fold weighted_f1 ") and values in line
    assert _bias_line(Validation(120, None, scores)) is None
