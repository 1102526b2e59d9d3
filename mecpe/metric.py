"""The official SemEval-2024 Task 3 Subtask 2 metric, and the rule baseline.

The metric reproduces the organisers' CodaLab scorer (``NUSTM/SemEval-2024_ECAC``,
``CodaLab/evaluation/evaluate.py``; definition in ``docs/metric.md``) to the last float: the same
parsing rules, the same 7x7 confusion matrix and the same numpy formulas with eps = 1e-8, so our
numbers can be compared with the leaderboard. Where the scorer calls ``sys.exit`` or crashes,
we raise :class:`EvaluationError` with a message naming the file, conversation and pair.

Everything beyond the six official numbers (per-emotion counts, utterance emotion accuracy) is diagnostic and never
changes the official ones. ``score_subtask2`` returns plain dicts (the scorer's view, for scripts and tests);
``mecpe.evaluate.score`` gives the typed ``Metrics`` the steps use, ``mecpe.report`` writes them.
"""

from __future__ import annotations

from types import MappingProxyType
import json
from collections import Counter
from typing import Any

import numpy as np

from mecpe import storage
from mecpe.errors import EvaluationError
from mecpe.labels import EMOTIONS, rule_causes  # EMOTIONS: the scorer's index order

EMOTION_IDX = MappingProxyType({e: i for i, e in enumerate(EMOTIONS)})
OFFICIAL_KEYS = (
    "precision_pair",
    "recall_pair",
    "f1_pair",
    "weighted_precision",
    "weighted_recall",
    "weighted_f1",
)
EPS = 1e-8  # the scorer's smoothing constant; kept so results agree to the last digit

Pair = tuple[int, int, int, int]  # (conversation_ID, emotion utterance, cause utterance, emotion index)


# --------------------------------------------------------------------------- parsing


def _keyed(conversations: Any, source: str) -> tuple[dict[int, Any], str | None]:
    """Conversations by ``int(conversation_ID)`` like the scorer, and the first reason it would stop on (not a list,
    an entry without an integer id, a repeated id) or None."""
    try:
        items = iter(conversations)
    except TypeError:
        return {}, f"{source}: expected a list of conversations, got {type(conversations).__name__}"
    out: dict[int, Any] = {}
    for pos, conv in enumerate(items):
        try:
            raw = conv["conversation_ID"]
        except (TypeError, KeyError, IndexError):
            return out, f"{source}: entry {pos} is not a conversation with a 'conversation_ID'"
        try:
            key = int(raw)
        except (TypeError, ValueError, OverflowError):
            return out, f"{source}: entry {pos} has a non-integer conversation_ID {raw!r}"
        if key in out:
            return out, f"{source}: Instance repeat! conversation_ID {key} occurs more than once"
        out[key] = conv
    return out, None


def id_problem(conversations: Any, source: str) -> str | None:
    """Why the official scorer cannot even key these conversations (string ids, say), or None: what ``mecpe infer``
    on labelled input reports instead of scoring."""
    return _keyed(conversations, source)[1]


def _conversation_dict(conversations: Any, source: str) -> dict[int, Any]:
    """Key conversations by ``int(conversation_ID)`` like the scorer; duplicates are fatal."""
    out, problem = _keyed(conversations, source)
    if problem is not None:
        raise EvaluationError(problem)
    return out


def _parse_pair(conv_id: int, pair: Any, source: str) -> Pair:
    """One pair -> 4-tuple, with exactly the scorer's leniency (see docs/metric.md, Parsing 3)."""
    where = f"{source}: conversation {conv_id}, pair {pair!r}"
    try:
        parts = pair[0].split("_")
    except (TypeError, KeyError, IndexError, AttributeError):
        raise EvaluationError(f"{where}: expected [\"<utt>_<emotion>\", \"<cause utt>\"]") from None
    if len(parts) != 2:
        raise EvaluationError(f"{where}: emotion field must be '<utt>_<emotion>' with exactly one '_'")
    emo_id, emotion = parts
    if emotion not in EMOTION_IDX:
        raise EvaluationError(
            f"{where}: Unknown emotion category {emotion!r} (case-sensitive; one of {', '.join(EMOTIONS)})"
        )
    emo_id = emo_id.replace("U", "")  # the scorer accepts "U3_joy"
    try:
        eu = int(emo_id)
    except (TypeError, ValueError):
        raise EvaluationError(f"{where}: emotion utterance id {emo_id!r} is not an integer") from None
    try:
        cu = int(pair[1])  # no 'U' removal here: the scorer crashes on "U3"
    except (TypeError, KeyError, IndexError):
        raise EvaluationError(f"{where}: missing cause utterance id") from None
    except (ValueError, OverflowError):
        raise EvaluationError(f"{where}: cause utterance id {pair[1]!r} is not an integer") from None
    return (conv_id, eu, cu, EMOTION_IDX[emotion])


def _parse_pair_list(conv_id: int, conv: Any, source: str) -> set[Pair]:
    try:
        pairs = conv["emotion-cause_pairs"]
    except (TypeError, KeyError):
        raise EvaluationError(
            f"{source}: conversation {conv_id}: Cannot find the key 'emotion-cause_pairs'"
        ) from None
    try:
        items = iter(pairs)
    except TypeError:
        raise EvaluationError(
            f"{source}: conversation {conv_id}: 'emotion-cause_pairs' is not a list ({type(pairs).__name__})"
        ) from None
    return {_parse_pair(conv_id, p, source) for p in items}


def parse_pairs(conversations: list[dict], *, source: str) -> set[Pair]:
    """All pairs of a file as a de-duplicated set of (conv_id, eu, cu, emotion_idx) tuples.

    Parses every conversation given (the scorer itself parses only those whose id is in gold;
    :func:`score_subtask2` does that).
    """
    convs = _conversation_dict(conversations, source)
    out: set[Pair] = set()
    for cid, conv in convs.items():
        out |= _parse_pair_list(cid, conv, source)
    return out


# --------------------------------------------------------------------------- scoring


def _pair_confusion(gold: set[Pair], pred: set[Pair]) -> np.ndarray:
    """The scorer's 7x7 matrix: [e][e] correct, [0][e_pred] wrong prediction, [e_gold][0] missed gold."""
    conf = np.zeros([7, 7])
    for p in pred:
        if p in gold:
            conf[p[3]][p[3]] += 1
        else:
            conf[0][p[3]] += 1
    for g in gold:
        if g not in pred:
            conf[g[3]][0] += 1
    return conf


def _scores_from_confusion(conf: np.ndarray) -> tuple[dict[str, float], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Same numpy expressions, in the same order, as the scorer, so floats agree bit for bit.

    Without non-neutral gold pairs the weights are 0/0 = NaN, as in the scorer.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.diagonal(conf / np.reshape(np.sum(conf, axis=0) + EPS, [1, 7]))
        r = np.diagonal(conf / np.reshape(np.sum(conf, axis=1) + EPS, [7, 1]))
        f = 2 * p * r / (p + r + EPS)
        weight0 = np.sum(conf, axis=1)
        weight = weight0[1:] / np.sum(weight0[1:])
        w_avg_p = np.sum(p[1:] * weight)
        w_avg_r = np.sum(r[1:] * weight)
        w_avg_f1 = np.sum(f[1:] * weight)
        micro_acc = np.sum(np.diagonal(conf)[1:])
        micro_p = micro_acc / (sum(np.sum(conf, axis=0)[1:]) + EPS)
        micro_r = micro_acc / (sum(np.sum(conf, axis=1)[1:]) + EPS)
        micro_f1 = 2 * micro_p * micro_r / (micro_p + micro_r + EPS)
    official = {
        "precision_pair": float(micro_p),
        "recall_pair": float(micro_r),
        "f1_pair": float(micro_f1),
        "weighted_precision": float(w_avg_p),
        "weighted_recall": float(w_avg_r),
        "weighted_f1": float(w_avg_f1),
    }
    return official, p, r, f, weight


def _utterance_emotions(conv: Any) -> dict[int, Any]:
    """utterance_ID -> 'emotion' value for utterances that have one; malformed entries skipped."""
    out: dict[int, Any] = {}
    utts = conv.get("conversation") if isinstance(conv, dict) else None
    if not isinstance(utts, list):
        return out
    for u in utts:
        if not isinstance(u, dict) or "emotion" not in u:
            continue
        try:
            out[int(u["utterance_ID"])] = u["emotion"]
        except (KeyError, TypeError, ValueError):
            continue
    return out


def _emotion_scores(gold_convs: dict[int, Any], pred_convs: dict[int, Any]) -> dict[str, Any] | None:
    """Utterance emotion accuracy / weighted F1 / confusion, diagnostic only (the scorer ignores them).

    Predicted labels outside the 7 classes count as wrong for accuracy and as a miss for the gold
    class in F1 (sklearn's ``labels=`` semantics), and are left out of the 7x7 confusion matrix.
    """
    y_true: list[int] = []
    y_pred: list[int] = []  # -1 = not one of the 7 labels
    for cid, gconv in gold_convs.items():
        pred_emos = _utterance_emotions(pred_convs[cid])
        if not pred_emos:
            continue
        for uid, gemo in _utterance_emotions(gconv).items():
            if gemo not in EMOTION_IDX or uid not in pred_emos:
                continue
            pemo = pred_emos[uid]
            y_true.append(EMOTION_IDX[gemo])
            y_pred.append(EMOTION_IDX.get(pemo, -1) if isinstance(pemo, str) else -1)
    if not y_true:
        return None
    t = np.asarray(y_true)
    q = np.asarray(y_pred)
    cm = np.zeros((7, 7), dtype=np.int64)
    known = q >= 0
    np.add.at(cm, (t[known], q[known]), 1)
    support = np.bincount(t, minlength=7).astype(float)
    tp = np.diag(cm).astype(float)
    pred_count = cm.sum(axis=0).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        prec = np.where(pred_count > 0, tp / pred_count, 0.0)
        rec = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(prec + rec > 0, 2 * prec * rec / (prec + rec), 0.0)
    weighted_f1 = float(np.sum(f1 * support) / np.sum(support)) if support.sum() > 0 else 0.0
    return {
        "emotion_accuracy": float(np.mean(t == q)),
        "emotion_weighted_f1": weighted_f1,
        "emotion_confusion": cm.tolist(),
        "num_utterances_scored": int(len(t)),
        "emotion_unknown_labels": int((~known).sum()),
        "emotion_per_class": {
            e: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, e in enumerate(EMOTIONS)
        },
    }


def score_subtask2(pred: list[dict], gold: list[dict], *, pred_source: str = "pred", gold_source: str = "gold") -> dict:
    """Score a Subtask 2 prediction against gold exactly like the official scorer.

    Returns the six official metrics at top level (floats), ``per_emotion`` counts and scores for
    the six non-neutral emotions, the scorer's ``pair_confusion`` matrix, counts, and, when the
    prediction carries utterance ``emotion`` fields, utterance-level emotion metrics.
    """
    gold_convs = _conversation_dict(gold, gold_source)
    pred_convs = _conversation_dict(pred, pred_source)
    gold_pairs: set[Pair] = set()
    pred_pairs: set[Pair] = set()
    for cid, gconv in gold_convs.items():  # the scorer's order: presence, gold pairs, pred pairs
        if cid not in pred_convs:
            raise EvaluationError(f"{pred_source}: Conversation {cid} is missing (it is in {gold_source})")
        gold_pairs |= _parse_pair_list(cid, gconv, gold_source)
        pred_pairs |= _parse_pair_list(cid, pred_convs[cid], pred_source)

    conf = _pair_confusion(gold_pairs, pred_pairs)
    metrics: dict[str, Any] = {}
    official, p, r, f, weight = _scores_from_confusion(conf)
    metrics.update(official)
    metrics["per_emotion"] = {
        emo: {
            "precision": float(p[i]),
            "recall": float(r[i]),
            "f1": float(f[i]),
            "tp": int(conf[i][i]),
            "fp": int(conf[0][i]),
            "fn": int(conf[i][0]),
            "gold_pairs": int(conf[i][i] + conf[i][0]),
            "weight": float(weight[i - 1]),
        }
        for i, emo in enumerate(EMOTIONS)
        if i > 0
    }
    metrics["pair_confusion"] = conf.astype(int).tolist()
    metrics["num_conversations_scored"] = len(gold_convs)
    metrics["num_pred_conversations_ignored"] = sum(1 for c in pred_convs if c not in gold_convs)
    metrics["num_gold_pairs"] = sum(1 for g in gold_pairs if g[3] != 0)
    metrics["num_pred_pairs"] = sum(1 for q in pred_pairs if q[3] != 0)
    metrics["num_neutral_pred_pairs_ignored"] = sum(1 for q in pred_pairs if q[3] == 0)
    emo = _emotion_scores(gold_convs, pred_convs)
    if emo is not None:
        metrics.update(emo)
    return metrics


def read_json_file(uri: str, what: str) -> Any:
    """A JSON file (local or s3://) or an EvaluationError naming it."""
    try:
        raw = storage.read_bytes(uri)
    except Exception as exc:  # storage backends raise many types; report them uniformly
        raise EvaluationError(f"{what} {uri}: cannot read ({type(exc).__name__}: {exc})") from None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvaluationError(f"{what} {uri}: not valid JSON ({exc})") from None


def evaluate_files(pred_path: str, gold_path: str) -> dict:
    """Read a Subtask_2_pred.json and a gold file and score them (errors name the file); the scorer's dict view."""
    pred = read_json_file(pred_path, "prediction file")
    gold = read_json_file(gold_path, "gold file")
    return score_subtask2(pred, gold, pred_source=pred_path, gold_source=gold_path)


# --------------------------------------------------------------------------- baseline


def baseline_predictions(gold: list[dict], *, emotions: str = "gold") -> list[dict]:
    """Rule baseline: every emotional utterance is caused by itself and by the utterance before it.

    ``emotions="gold"`` uses the conversations' own utterance emotions: of a gold file, the gold ones (an
    upper-bound-ish cause baseline); of a prediction, the predicted ones (``mecpe.evaluate.rule_on_own_emotions``).
    ``emotions="majority"`` labels *every* utterance with the most frequent **non-neutral**
    emotion of ``gold`` (ties -> scorer order). The plain majority label is neutral, which would
    yield no pairs at all, so the non-neutral majority is the informative trivial baseline.
    Output follows the Subtask_2_pred.json format, with predicted utterance emotions included.
    """
    if emotions not in ("gold", "majority"):
        raise ValueError(f"emotions must be 'gold' or 'majority', not {emotions!r}")
    majority = None
    if emotions == "majority":
        counts = Counter(
            u.get("emotion") for c in gold for u in c.get("conversation", []) if u.get("emotion") in EMOTIONS[1:]
        )
        if counts:
            majority = max(EMOTIONS[1:], key=lambda e: (counts[e], -EMOTION_IDX[e]))
    out = []
    for conv in gold:
        utts, pairs = [], []
        turns = conv.get("conversation", [])
        causes = rule_causes([int(u["utterance_ID"]) for u in turns])
        for u in turns:
            uid = int(u["utterance_ID"])
            emo = u.get("emotion", "neutral") if emotions == "gold" else (majority or "neutral")
            utts.append({k: u[k] for k in ("utterance_ID", "text", "speaker") if k in u} | {"emotion": emo})
            if emo in EMOTIONS[1:]:
                pairs += [[f"{uid}_{emo}", str(c)] for c in causes[uid]]
        out.append({"conversation_ID": conv["conversation_ID"], "conversation": utts, "emotion-cause_pairs": pairs})
    return out
