"""The evaluation report: the metrics as a text table, ``metrics.json``, ``report.md``, the confusion matrix and the
learning curves, written through ``mecpe.storage`` (an ``s3://`` folder works like a local one). It reads the typed
``Metrics`` and ``Validation`` of ``mecpe.evaluate``; the official figures themselves come from ``mecpe.metric``.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any, Iterable

import numpy as np

from mecpe import layout, storage
from mecpe.evaluate import Metrics, Validation
from mecpe.labels import EMOTIONS
from mecpe.metric import OFFICIAL_KEYS

def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.4f}"
    return str(x)


def format_table(metrics: Metrics) -> str:
    """Plain-text table: the six official metrics, then per-emotion P/R/F1/support."""
    lines = ["official Subtask 2 metrics (ranking metric: weighted_f1)"]
    lines += [f"  {k:<20} {_fmt(v)}" for k, v in metrics.official().items()]
    if metrics.per_emotion:
        lines.append("")
        lines.append(f"  {'emotion':<10} {'P':>7} {'R':>7} {'F1':>7} {'support':>8} {'weight':>7}")
        for emo in EMOTIONS[1:]:
            m = metrics.per_emotion.get(emo)
            if m:
                lines.append(f"  {emo:<10} {_fmt(m.precision):>7} {_fmt(m.recall):>7} {_fmt(m.f1):>7} "
                             f"{m.gold_pairs:>8} {_fmt(m.weight):>7}")
    if metrics.has_emotions:
        lines.append("")
        lines.append(f"  utterance emotions: accuracy {_fmt(metrics.emotion_accuracy)}, "
                     f"weighted F1 {_fmt(metrics.emotion_weighted_f1)} over {metrics.num_utterances_scored} utterances")
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


def _dumps(payload: dict) -> bytes:
    return (json.dumps(payload, indent=2, default=_json_default) + "\n").encode()


def metrics_json(metrics: Metrics) -> bytes:
    """The metrics alone as JSON bytes, the six official keys first (``mecpe evaluate --json``)."""
    return _dumps(metrics.as_json())


def report_json(metrics: Metrics, *, parse_status: dict | None = None, training: dict[str, dict] | None = None,
                validation: Validation | None = None) -> dict[str, Any]:
    """``metrics.json`` of a report: the metrics, then the scope note, the baselines, the inference's parse status,
    the validation step and the adapters, where there are any."""
    payload = metrics.as_json()
    if metrics.scope:
        payload["notes"] = [metrics.scope]
    if metrics.baselines:
        payload["baselines"] = {name: b.as_json() for name, b in metrics.baselines.items()}
    if parse_status is not None:
        payload["parse_status"] = parse_status
    if validation:
        payload["validation"] = validation.as_json()
    if training:
        payload["adapters"] = {task: {k: info.get(k) for k in ("run_name", "adapter", "global_step")}
                               for task, info in training.items()}
    return payload


def _validation_md(validation: Validation) -> list[str]:
    md = ["", "## Validation split (where choices are made; the test set never is)", ""]
    runs = [(name, scores) for name, scores in (("uncalibrated", validation.before_calibration),
                                                ("this system", validation.metrics)) if scores]
    md.append(_md_table(["metric"] + [name for name, _ in runs],
                        [[k] + [getattr(s, k) for _, s in runs] for k in OFFICIAL_KEYS]))
    cal = validation.calibration
    if cal:
        md += ["", f"Emotion bias fitted on {cal.utterances} validation utterances ({cal.objective}: "
                   f"{_fmt(cal.before)} -> {_fmt(cal.after)}; 2-fold by conversation "
                   f"{_fmt(cal.two_fold.before)} -> {_fmt(cal.two_fold.after)}); utterances "
                   f"predicted neutral {cal.predicted_neutral.before} -> "
                   f"{cal.predicted_neutral.after} (gold {cal.predicted_neutral.gold}); "
                   + ("applied to the test set:" if cal.applied else "**not applied** (no gain out of sample):"), ""]
        md.append(_md_table(["label", "bias"], [[e, b] for e, b in cal.bias.items()]))
    return md


def write_report(metrics: Metrics, out_dir: str, *, parse_status: dict | None = None,
                 training: dict[str, dict] | None = None, validation: Validation | None = None,
                 title: str = "mecpe evaluation") -> dict[str, str]:
    """Write metrics.json, report.md, confusion_matrix.png and (given the adapters' ``training`` info: run name,
    adapter URI, log history per task) learning_curves.png into ``out_dir`` (local or s3://); return their URIs.
    The scope note heads the report; the baselines stand beside the system; ``validation`` gets its own section."""
    paths = {name: storage.join(out_dir, file) for name, file in
             (("metrics", layout.METRICS_FILE), ("report", layout.REPORT_FILE),
              ("confusion_matrix", layout.CONFUSION_FILE))}
    baselines = metrics.baselines
    notes = [metrics.scope] if metrics.scope else []
    curves = learning_curves(training) if training else None
    if curves is not None:
        paths["learning_curves"] = storage.join(out_dir, layout.CURVES_FILE)
    storage.write_bytes(paths["metrics"], _dumps(report_json(metrics, parse_status=parse_status, training=training,
                                                             validation=validation)))

    names = list(baselines)
    md = [f"# {title}", ""] + [f"> {n}" for n in notes] + ([""] if notes else [])
    md += ["## Official Subtask 2 metrics", "",
           "Ranking metric: `weighted_f1` (w-avg. F1); `f1_pair` is the micro F1 over the six emotions.", ""]
    md.append(_md_table(["metric", "system"] + [f"baseline: {n}" for n in names],
                        [[k, v] + [getattr(baselines[n], k) for n in names] for k, v in metrics.official().items()]))
    if metrics.per_emotion:
        md += ["", "## Per emotion (pairs)", ""]
        rows = []
        for emo in EMOTIONS[1:]:
            m = metrics.per_emotion[emo]
            rows.append([emo, m.gold_pairs, m.weight, m.tp, m.fp, m.fn, m.precision, m.recall, m.f1]
                        + [baselines[n].per_emotion[emo].f1 for n in names])
        md.append(_md_table(["emotion", "gold pairs", "weight", "TP", "FP", "FN", "P", "R", "F1"]
                            + [f"F1 {n}" for n in names], rows))
    if metrics.has_emotions:
        md += ["", "## Utterance emotions (diagnostic, not part of the official metric)", "",
               f"Accuracy {_fmt(metrics.emotion_accuracy)}, weighted F1 {_fmt(metrics.emotion_weighted_f1)} "
               f"over {metrics.num_utterances_scored} utterances"
               f" ({metrics.emotion_unknown_labels} predicted labels outside the 7 classes).", "",
               "Rows: gold, columns: predicted.", ""]
        md.append(_md_table(["gold \\ pred"] + list(EMOTIONS),
                            [[e] + list(row) for e, row in zip(EMOTIONS, metrics.emotion_confusion)]))
    if validation:
        md += _validation_md(validation)
    if parse_status:
        md += ["", "## Parse status", ""]
        nested = all(isinstance(v, dict) for v in parse_status.values())
        rows = [[stage, k, v] for stage, st in parse_status.items() for k, v in st.items()] if nested else \
            [["", k, v] for k, v in parse_status.items()]
        md.append(_md_table(["stage", "status", "count"], rows))
    md += ["", "## Counts", ""]
    md.append(_md_table(["count", "value"], [[k, getattr(metrics, k)] for k in (
        "num_conversations_scored", "num_pred_conversations_ignored", "num_gold_pairs", "num_pred_pairs",
        "num_neutral_pred_pairs_ignored")]))
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

    if metrics.has_emotions:
        png = plot_confusion(metrics.emotion_confusion, "Utterance emotion confusion", "predicted", "gold")
    else:
        png = plot_confusion(metrics.pair_confusion, "Pair confusion (scorer): [e][e] hit, row 0 wrong pred, col 0 "
                                                     "missed gold", "predicted pair emotion", "gold pair emotion")
    storage.write_bytes(paths["confusion_matrix"], png)
    if curves is not None:
        storage.write_bytes(paths["learning_curves"], plot_learning_curves(curves))
    return paths
