"""What the evaluate step returns, and the one scoring function every route calls (an inference output, any pair of
files, the validation split, the pipeline's test set): ``score(pred, gold) -> Metrics``.

``Metrics`` holds the six official figures, the per-emotion pair counts, the diagnostics, and, where asked, the rule
baselines and the scope of a limited run; ``Validation`` what the pipeline's validation step measured. Their JSON
files are written from them (``as_json``, built on ``dataclasses.asdict``) by ``mecpe.report`` and
``mecpe.pipeline``, so a reader sees the fields here rather than keys spelled across modules.
"""

from __future__ import annotations

from types import MappingProxyType
from dataclasses import asdict, dataclass, field
from typing import Any

from mecpe import metric
from mecpe.calibrate import Calibration
from mecpe.labels import EMOTIONS

BASELINES = MappingProxyType({  # the rule baselines beside the system in the pipeline's report: name -> emotions
    "majority emotion + self/previous causes": "majority",
    "gold emotions + self/previous causes (oracle)": "gold",
})
# beside the rule baselines, where the prediction carries emotions: its own emotions with the rule's causes, what
# the cause stage must beat (the SmolLM2 cause model did not: bench/RESULTS.md, "The cause model against the rule")
OWN_EMOTIONS_RULE = "the prediction's emotions + self/previous causes"
ONE_CLASS_SHARE = 0.9  # Metrics.one_class_warning: more than this share of one predicted emotion is a collapse
UTTERANCE_FIELDS = ("emotion_accuracy", "emotion_weighted_f1", "emotion_confusion", "num_utterances_scored",
                    "emotion_unknown_labels", "emotion_per_class")  # None where the prediction has no emotions


@dataclass(frozen=True)
class PairScores:
    """One emotion's pairs, as the scorer counts them."""

    precision: float
    recall: float
    f1: float
    tp: int
    fp: int
    fn: int
    gold_pairs: int
    weight: float


@dataclass(frozen=True)
class Official:
    """The six official Subtask 2 figures (bit-equal to the organisers' scorer), in its order."""

    precision_pair: float
    recall_pair: float
    f1_pair: float
    weighted_precision: float
    weighted_recall: float
    weighted_f1: float

    def official(self) -> dict[str, float]:
        """The six official figures by name, in the scorer's order."""
        return {k: getattr(self, k) for k in metric.OFFICIAL_KEYS}


@dataclass(frozen=True)
class Metrics(Official):
    """The official figures, per emotion, the scorer's counts, the utterance emotion diagnostics (None without
    predicted emotions); the rule ``baselines`` by name and the ``scope`` note of a limited run where the step asks
    for them."""

    per_emotion: dict[str, PairScores]
    pair_confusion: list[list[int]]
    num_conversations_scored: int
    num_pred_conversations_ignored: int
    num_gold_pairs: int
    num_pred_pairs: int
    num_neutral_pred_pairs_ignored: int
    emotion_accuracy: float | None = None
    emotion_weighted_f1: float | None = None
    emotion_confusion: list[list[int]] | None = None
    num_utterances_scored: int | None = None
    emotion_unknown_labels: int | None = None
    emotion_per_class: dict[str, dict[str, float]] | None = None
    baselines: dict[str, "Metrics"] = field(default_factory=dict)
    scope: str | None = None

    @property
    def has_emotions(self) -> bool:
        return self.emotion_accuracy is not None

    def one_class_warning(self, share: float = ONE_CLASS_SHARE) -> str | None:
        """A warning when the predictions give one emotion to more than ``share`` of the utterances scored: the
        symptom of an emotion model collapsed to its prior (Gemma-3-270m on ECF called every validation utterance
        neutral), which the official figures alone hide behind a low score. None otherwise, or without emotions."""
        if not self.emotion_confusion:
            return None
        predicted = [sum(col) for col in zip(*self.emotion_confusion)]
        gold = [sum(row) for row in self.emotion_confusion]
        total = sum(predicted)
        top = max(range(len(predicted)), key=predicted.__getitem__)
        if not total or predicted[top] / total <= share:
            return None
        return (f"{EMOTIONS[top]} predicted for {predicted[top] / total:.1%} of {total:,} utterances (gold: "
                f"{gold[top] / max(sum(gold), 1):.1%}): the emotion model answers one class; check the recipe "
                "(learning rate, epochs) and the prompt format before trusting any figure of this run")

    def as_json(self) -> dict[str, Any]:
        """The figures as ``metrics.json`` holds them (official first; no utterance fields where there are none);
        baselines and scope are the report's to place."""
        out = asdict(self)
        del out["baselines"], out["scope"]
        return {k: v for k, v in out.items() if not (k in UTTERANCE_FIELDS and v is None)}


@dataclass(frozen=True)
class ValidationScores(Official):
    """What the validation split is judged by: the official figures and the utterance emotions."""

    emotion_accuracy: float | None = None
    emotion_weighted_f1: float | None = None

    @classmethod
    def of(cls, m: Metrics) -> "ValidationScores":
        return cls(*m.official().values(), m.emotion_accuracy, m.emotion_weighted_f1)


@dataclass(frozen=True)
class Validation:
    """The pipeline's validation step: the system on the validation split (``metrics``), and with
    ``validation.fit_emotion_bias`` the uncalibrated run and the fitted bias."""

    conversations: int
    scope: str | None
    metrics: ValidationScores
    before_calibration: ValidationScores | None = None
    calibration: Calibration | None = None
    rule_on_own_emotions: float | None = None  # weighted_f1 of the system's emotions with the rule's causes

    def as_json(self) -> dict[str, Any]:
        """``validation/metrics.json`` (and the ``validation`` of ``metrics.json`` and ``pipeline.json``)."""
        out = asdict(self)
        for scores in ("metrics", "before_calibration"):
            if out[scores] is not None:
                out[scores] = {k: v for k, v in out[scores].items() if v is not None}
        ordered = {"conversations": out["conversations"], "scope": out["scope"]}
        ordered |= {k: out[k] for k in ("before_calibration", "calibration", "rule_on_own_emotions")
                    if out[k] is not None}
        return ordered | {"metrics": out["metrics"]}


def _metrics(raw: dict[str, Any], baselines: dict[str, Metrics] | None = None, scope: str | None = None) -> Metrics:
    per = {emo: PairScores(**v) for emo, v in raw.pop("per_emotion").items()}
    return Metrics(per_emotion=per, baselines=baselines or {}, scope=scope, **raw)


def score(pred: list[dict], gold: list[dict], *, pred_source: str = "pred", gold_source: str = "gold",
          baselines: bool = False, scope: str | None = None) -> Metrics:
    """The official metric of ``pred`` against ``gold`` (``mecpe.metric.score_subtask2``: errors name the sources);
    with ``baselines`` also the rule baselines' (``BASELINES``) on the same gold; ``scope`` carried along."""
    system = metric.score_subtask2(pred, gold, pred_source=pred_source, gold_source=gold_source)
    rules = {name: _metrics(metric.score_subtask2(metric.baseline_predictions(gold, emotions=emotions), gold))
             for name, emotions in BASELINES.items()} if baselines else {}
    if baselines and system.get("emotion_accuracy") is not None:
        rules[OWN_EMOTIONS_RULE] = rule_on_own_emotions(pred, gold)
    return _metrics(system, rules, scope)


def rule_on_own_emotions(pred: list[dict], gold: list[dict]) -> Metrics:
    """The rule's causes (self, previous) for the emotions ``pred`` predicted, scored against ``gold``: the
    prediction's emotion stage with a trivial cause stage."""
    return _metrics(metric.score_subtask2(metric.baseline_predictions(pred, emotions="gold"), gold))


def score_uris(pred_uri: str, gold_uri: str, *, baselines: bool = False, scope: str | None = None) -> Metrics:
    """``score`` of a prediction file against a gold file (local or s3://); an unreadable one is an
    ``EvaluationError`` naming it."""
    pred = metric.read_json_file(pred_uri, "prediction file")
    gold = metric.read_json_file(gold_uri, "gold file")
    return score(pred, gold, pred_source=pred_uri, gold_source=gold_uri, baselines=baselines, scope=scope)
