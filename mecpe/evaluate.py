"""Official SemEval-2024 Task 3 Subtask 2 metric, a rule baseline, and evaluation reports.

The metric reproduces the organisers' CodaLab scorer (``NUSTM/SemEval-2024_ECAC``,
``CodaLab/evaluation/evaluate.py``; definition in ``docs/metric.md``) to the last float: the same
parsing rules, the same 7x7 confusion matrix and the same numpy formulas with eps = 1e-8, so our
numbers can be compared with the leaderboard. Where the scorer calls ``sys.exit`` or crashes,
we raise :class:`EvaluationError` with a message naming the file, conversation and pair.

Everything beyond the six official numbers (per-emotion counts, utterance emotion accuracy,
report files, learning curves) is diagnostic and never changes the official ones. Report files are written through
``mecpe.storage``, so an ``s3://`` output folder works like a local one.
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from typing import Any, Iterable

import numpy as np

from mecpe import layout, storage
from mecpe.data import EMOTIONS  # the scorer's index order

EMOTION_IDX = {e: i for i, e in enumerate(EMOTIONS)}
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


class EvaluationError(ValueError):
    """Input the official scorer rejects (it would exit or crash); the message says where."""


# --------------------------------------------------------------------------- parsing


def _conversation_dict(conversations: Any, source: str) -> dict[int, Any]:
    """Key conversations by ``int(conversation_ID)`` like the scorer; duplicates are fatal."""
    try:
        items = iter(conversations)
    except TypeError:
        raise EvaluationError(
            f"{source}: expected a list of conversations, got {type(conversations).__name__}"
        ) from None
    out: dict[int, Any] = {}
    for pos, conv in enumerate(items):
        try:
            raw = conv["conversation_ID"]
        except (TypeError, KeyError, IndexError):
            raise EvaluationError(
                f"{source}: entry {pos} is not a conversation with a 'conversation_ID'"
            ) from None
        try:
            key = int(raw)
        except (TypeError, ValueError, OverflowError):
            raise EvaluationError(f"{source}: entry {pos} has a non-integer conversation_ID {raw!r}") from None
        if key in out:
            raise EvaluationError(f"{source}: Instance repeat! conversation_ID {key} occurs more than once")
        out[key] = conv
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


def _read_json(uri: str, what: str) -> Any:
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
    """Read a Subtask_2_pred.json and a gold file and score them (errors name the file)."""
    pred = _read_json(pred_path, "prediction file")
    gold = _read_json(gold_path, "gold file")
    return score_subtask2(pred, gold, pred_source=pred_path, gold_source=gold_path)


# --------------------------------------------------------------------------- baseline


def baseline_predictions(gold: list[dict], *, emotions: str = "gold") -> list[dict]:
    """Rule baseline: every emotional utterance is caused by itself and by the utterance before it.

    ``emotions="gold"`` uses the gold utterance emotions (an upper-bound-ish cause baseline).
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
        prev_uid = None
        for u in conv.get("conversation", []):
            uid = int(u["utterance_ID"])
            emo = u.get("emotion", "neutral") if emotions == "gold" else (majority or "neutral")
            utts.append({k: u[k] for k in ("utterance_ID", "text", "speaker") if k in u} | {"emotion": emo})
            if emo in EMOTIONS[1:]:
                pairs.append([f"{uid}_{emo}", str(uid)])
                if prev_uid is not None:
                    pairs.append([f"{uid}_{emo}", str(prev_uid)])
            prev_uid = uid
        out.append({"conversation_ID": conv["conversation_ID"], "conversation": utts, "emotion-cause_pairs": pairs})
    return out


# --------------------------------------------------------------------------- reporting


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.4f}"
    return str(x)


def format_table(metrics: dict) -> str:
    """Plain-text table: the six official metrics, then per-emotion P/R/F1/support."""
    lines = ["official Subtask 2 metrics (ranking metric: weighted_f1)"]
    lines += [f"  {k:<20} {_fmt(metrics.get(k, float('nan')))}" for k in OFFICIAL_KEYS]
    per = metrics.get("per_emotion") or {}
    if per:
        lines.append("")
        lines.append(f"  {'emotion':<10} {'P':>7} {'R':>7} {'F1':>7} {'support':>8} {'weight':>7}")
        for emo in EMOTIONS[1:]:
            m = per.get(emo)
            if m:
                lines.append(
                    f"  {emo:<10} {_fmt(m['precision']):>7} {_fmt(m['recall']):>7} {_fmt(m['f1']):>7} "
                    f"{m['gold_pairs']:>8} {_fmt(m['weight']):>7}"
                )
    if "emotion_accuracy" in metrics:
        lines.append("")
        lines.append(
            f"  utterance emotions: accuracy {_fmt(metrics['emotion_accuracy'])}, "
            f"weighted F1 {_fmt(metrics['emotion_weighted_f1'])} over {metrics['num_utterances_scored']} utterances"
        )
    return "\n".join(lines)


def _md_table(header: list[str], rows: Iterable[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _figure(width: float, height: float):
    """A matplotlib figure on the Agg canvas (object API: no global pyplot/backend state is touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_confusion(matrix: list[list[int]], title: str, xlabel: str, ylabel: str) -> bytes:
    """A 7x7 confusion matrix as PNG bytes."""
    m = np.asarray(matrix, dtype=float)
    fig = _figure(7, 6)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(m, cmap="Blues")
    fig.colorbar(im, ax=ax)
    ax.set_xticks(range(7), labels=list(EMOTIONS), rotation=45, ha="right")
    ax.set_yticks(range(7), labels=list(EMOTIONS))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    hi = m.max() if m.size and m.max() > 0 else 1.0
    for i in range(7):
        for j in range(7):
            ax.text(j, i, str(int(m[i, j])), ha="center", va="center", fontsize=8,
                    color="white" if m[i, j] > hi / 2 else "black")
    return _png(fig)


def learning_curves(training: dict[str, dict]) -> dict[str, dict[str, list]]:
    """Per task, the (step, loss) points of training and validation from an adapter's logged history
    (``mecpe_train.json``: ``log_history``)."""
    out = {}
    for task, info in training.items():
        hist = info.get("log_history") or []
        out[task] = {"train": [(h["step"], h["loss"]) for h in hist if "loss" in h and "step" in h],
                     "validation": [(h["step"], h["eval_loss"]) for h in hist if "eval_loss" in h and "step" in h]}
    return out


def plot_learning_curves(curves: dict[str, dict[str, list]]) -> bytes:
    """Training and validation loss per step, one panel per task, as PNG bytes."""
    fig = _figure(5 * max(1, len(curves)), 4)
    for k, (task, c) in enumerate(curves.items(), 1):
        ax = fig.add_subplot(1, max(1, len(curves)), k)
        for name, style in (("train", "-"), ("validation", "o--")):
            if c[name]:
                steps, losses = zip(*c[name])
                ax.plot(steps, losses, style, label=f"{name} loss")
        ax.set_title(f"{task} adapter")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (answer tokens)")
        ax.set_yscale("log")
        ax.legend()
    return _png(fig)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _ordered(metrics: dict) -> dict:
    return {k: metrics[k] for k in OFFICIAL_KEYS if k in metrics} | {
        k: v for k, v in metrics.items() if k not in OFFICIAL_KEYS
    }


def metrics_json(metrics: dict) -> bytes:
    """Metrics as JSON bytes, the six official keys first."""
    return (json.dumps(_ordered(metrics), indent=2, default=_json_default) + "\n").encode()


def write_report(
    metrics: dict,
    out_dir: str,
    *,
    baselines: dict[str, dict] | None = None,
    parse_status: dict | None = None,
    training: dict[str, dict] | None = None,
    notes: list[str] | None = None,
    validation: dict | None = None,
    title: str = "mecpe evaluation",
) -> dict[str, str]:
    """Write metrics.json, report.md, confusion_matrix.png and (given the adapters' ``training`` info: run name,
    adapter URI, log history per task) learning_curves.png into ``out_dir`` (local or s3://); return their URIs.
    ``notes`` (e.g. the scope of a limited run) head the report and go into metrics.json; ``validation`` (the
    pipeline's validation step: metrics on the validation split, the fitted emotion bias) gets its own section."""
    paths = {name: storage.join(out_dir, file) for name, file in
             (("metrics", layout.METRICS_FILE), ("report", layout.REPORT_FILE),
              ("confusion_matrix", layout.CONFUSION_FILE))}
    baselines = baselines or {}
    payload = _ordered(metrics)
    if notes:
        payload["notes"] = list(notes)
    if baselines:
        payload["baselines"] = {name: _ordered(b) for name, b in baselines.items()}
    if parse_status is not None:
        payload["parse_status"] = parse_status
    if validation:
        payload["validation"] = validation
    curves = None
    if training:
        payload["adapters"] = {task: {k: info.get(k) for k in ("run_name", "adapter", "global_step")}
                               for task, info in training.items()}
        curves = learning_curves(training)
        paths["learning_curves"] = storage.join(out_dir, layout.CURVES_FILE)
    storage.write_bytes(paths["metrics"], (json.dumps(payload, indent=2, default=_json_default) + "\n").encode())

    names = list(baselines)
    md = [f"# {title}", ""] + [f"> {n}" for n in notes or []] + ([""] if notes else [])
    md += ["## Official Subtask 2 metrics", "",
           "Ranking metric: `weighted_f1` (w-avg. F1); `f1_pair` is the micro F1 over the six emotions.", ""]
    md.append(_md_table(["metric", "system"] + [f"baseline: {n}" for n in names],
                        [[k, metrics.get(k, float("nan"))] + [baselines[n].get(k, float("nan")) for n in names]
                         for k in OFFICIAL_KEYS]))
    per = metrics.get("per_emotion") or {}
    if per:
        md += ["", "## Per emotion (pairs)", ""]
        rows = []
        for emo in EMOTIONS[1:]:
            m = per[emo]
            rows.append([emo, m["gold_pairs"], m["weight"], m["tp"], m["fp"], m["fn"], m["precision"], m["recall"], m["f1"]]
                        + [(baselines[n].get("per_emotion") or {}).get(emo, {}).get("f1", float("nan")) for n in names])
        md.append(_md_table(["emotion", "gold pairs", "weight", "TP", "FP", "FN", "P", "R", "F1"]
                            + [f"F1 {n}" for n in names], rows))
    if "emotion_confusion" in metrics:
        md += ["", "## Utterance emotions (diagnostic, not part of the official metric)", "",
               f"Accuracy {_fmt(metrics['emotion_accuracy'])}, weighted F1 {_fmt(metrics['emotion_weighted_f1'])} "
               f"over {metrics['num_utterances_scored']} utterances"
               f" ({metrics.get('emotion_unknown_labels', 0)} predicted labels outside the 7 classes).", "",
               "Rows: gold, columns: predicted.", ""]
        md.append(_md_table(["gold \\ pred"] + list(EMOTIONS),
                            [[e] + list(row) for e, row in zip(EMOTIONS, metrics["emotion_confusion"])]))
    if validation:
        md += ["", "## Validation split (where choices are made; the test set never is)", ""]
        runs = [(name, validation[name]) for name in ("before_calibration", "metrics") if validation.get(name)]
        md.append(_md_table(["metric"] + [("uncalibrated" if n == "before_calibration" else "this system")
                                          for n, _ in runs],
                            [[k] + [m.get(k, float("nan")) for _, m in runs] for k in OFFICIAL_KEYS]))
        cal = validation.get("calibration")
        if cal:
            md += ["", f"Emotion bias fitted on {cal['utterances']} validation utterances ({cal['objective']}: "
                       f"{_fmt(cal['before'])} -> {_fmt(cal['after'])}; 2-fold by conversation "
                       f"{_fmt(cal['two_fold']['before'])} -> {_fmt(cal['two_fold']['after'])}); utterances "
                       f"predicted neutral {cal['predicted_neutral']['before']} -> "
                       f"{cal['predicted_neutral']['after']} (gold {cal['predicted_neutral']['gold']}); "
                       + ("applied to the test set:" if cal.get("applied", True) else
                          "**not applied** (no gain out of sample):"), ""]
            md.append(_md_table(["label", "bias"], [[e, b] for e, b in cal["bias"].items()]))
    if parse_status:
        md += ["", "## Parse status", ""]
        nested = all(isinstance(v, dict) for v in parse_status.values())
        rows = [[stage, k, v] for stage, st in parse_status.items() for k, v in st.items()] if nested else \
            [["", k, v] for k, v in parse_status.items()]
        md.append(_md_table(["stage", "status", "count"], rows))
    counts = [k for k in ("num_conversations_scored", "num_pred_conversations_ignored", "num_gold_pairs",
                          "num_pred_pairs", "num_neutral_pred_pairs_ignored") if k in metrics]
    if counts:
        md += ["", "## Counts", ""]
        md.append(_md_table(["count", "value"], [[k, metrics[k]] for k in counts]))
    md += ["", f"![confusion matrix]({layout.CONFUSION_FILE})", ""]
    if training:
        md += ["## Training", ""]
        md.append(_md_table(["task", "run", "steps", "final train loss", "final validation loss", "adapter"],
                            [[task, info.get("run_name"), info.get("global_step"),
                              curves[task]["train"][-1][1] if curves[task]["train"] else float("nan"),
                              curves[task]["validation"][-1][1] if curves[task]["validation"] else float("nan"),
                              info.get("adapter")] for task, info in training.items()]))
        md += ["", f"![learning curves]({layout.CURVES_FILE})", ""]
    storage.write_bytes(paths["report"], "\n".join(md).encode("utf-8"))

    if "emotion_confusion" in metrics:
        png = plot_confusion(metrics["emotion_confusion"], "Utterance emotion confusion", "predicted", "gold")
    else:
        conf = metrics.get("pair_confusion") or np.zeros((7, 7), dtype=int).tolist()
        png = plot_confusion(conf, "Pair confusion (scorer): [e][e] hit, row 0 wrong pred, col 0 missed gold",
                             "predicted pair emotion", "gold pair emotion")
    storage.write_bytes(paths["confusion_matrix"], png)
    if curves is not None:
        storage.write_bytes(paths["learning_curves"], plot_learning_curves(curves))
    return paths
