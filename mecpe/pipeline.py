"""The whole method, step by step: prepare -> train emotion -> train cause -> infer -> evaluate.

Each step is also its own command (``mecpe data prepare|train|infer|evaluate --config``) and ``ray job submit``
entrypoint (``jobs/*.py``); they share these functions, so a step run alone and a step run inside the pipeline do the
same thing. Every step reads and writes under ``output_dir``:

    <output_dir>/data/                 prepare
    <storage.path>/<run>/adapter/      train (one run per task)
    <output_dir>/validation/           validate (when asked)
    <output_dir>/inference/            infer
    <output_dir>/ (report files)       evaluate

(``mecpe.layout`` names every file.)
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable, Sequence, TypeVar

from mecpe import layout, storage
from mecpe.config import Config, dump_config
from mecpe.errors import ConfigError
from mecpe.splits import PrepareResult
from mecpe.evaluate import Metrics, Validation, ValidationScores, rule_on_own_emotions
from mecpe.infer.summary import InferenceSummary
from mecpe.layout import InferenceLayout, RunLayout

log = logging.getLogger("mecpe.pipeline")


def ensure_data(cfg: Config) -> None:
    """Write the learnable synthetic corpus into ``data.data_dir`` when the config asks for it and the training file
    is absent (``data.synthesize_if_missing``)."""
    d = cfg.data
    if not d.synthesize_if_missing or storage.exists(d.path(d.train_file)):
        return
    from mecpe import synth

    log.info("writing the synthetic corpus to %s", d.resolved_dir())
    synth.write_corpus(d.resolved_dir(), seed=d.seed)


def ensure_model(cfg: Config) -> None:
    """Build the tiny local model at ``model.base`` from the training file when the config asks for it and it is
    absent (``model.build_tiny_if_missing``)."""
    if not cfg.model.build_tiny_if_missing or storage.is_remote(cfg.model.base):
        return
    from mecpe.tiny import BUILD_FILE, build_tiny_model

    tiny = cfg.model.tiny
    if os.path.exists(os.path.join(cfg.model.base, "config.json")):
        built = os.path.join(cfg.model.base, BUILD_FILE)
        recipe = storage.read_state(built) if os.path.exists(built) else {}
        wanted = tiny.model_dump()
        have = {k: recipe.get(k) for k in wanted}
        if recipe and have != wanted:
            raise ConfigError(f"{cfg.model.base} holds a tiny model built with {have}, the config asks for model.tiny "
                             f"{wanted}: delete the folder or set model.base to another one")
        return

    ensure_data(cfg)
    log.info("building the tiny local model at %s (%d layers, %d pretraining steps)", cfg.model.base,
             tiny.num_layers, tiny.pretrain_steps)
    build_tiny_model(cfg.model.base, [cfg.data.path(cfg.data.train_file)], seed=tiny.seed, num_layers=tiny.num_layers,
                     output_scale=tiny.output_scale, pretrain_steps=tiny.pretrain_steps)


def step_prepare(cfg: Config, train_uri: str | None = None, test_uri: str | None = None, out_uri: str | None = None,
                 *, split: str | None = None, val_fraction: float | None = None, seed: int | None = None
                 ) -> PrepareResult:
    """Validate and split the training file (``data.train_file``, or ``train_uri`` with ``test_uri`` or no test
    file), copy the gold test file, into ``out_uri`` (default ``<output_dir>/data``); arguments left None come from
    ``cfg.data``. Also where the config's own inputs are made when it asks for them: the synthetic corpus
    (``data.synthesize_if_missing``) and the tiny model (``model.build_tiny_if_missing``); train and infer only read.
    Returns ``mecpe.data.prepare``'s counts of the folder written."""
    from mecpe.splits import prepare

    d = cfg.data
    ensure_model(cfg)
    if train_uri is None:
        ensure_data(cfg)
        train_uri, test_uri = d.path(d.train_file), test_uri or d.path(d.test_file)
    out = out_uri or RunLayout(cfg.output_dir).data.root
    result = prepare(train_uri, test_uri, out, split=split or d.split,
                     val_fraction=d.val_fraction if val_fraction is None else val_fraction,
                     seed=d.seed if seed is None else seed)
    prepared = RunLayout(cfg.output_dir).data
    if out == prepared.root:  # the scoped splits the later steps read (data.limit_*)
        for name, n in (("val", d.limit_val), ("test", d.limit_test)):
            if n is not None and storage.exists(prepared.split(name)):
                _limited(cfg, name, n, write=True)
    return result


def _limited(cfg: Config, split: str, n: int | None, *, write: bool = False) -> tuple[str, str | None]:
    """(URI of the prepared ``split``, or of its first ``n`` conversations beside it; a note or None). The prepare
    step writes that file (``write``); later steps only read it, writing it only where an older prepare did not."""
    prepared = RunLayout(cfg.output_dir).data
    full = prepared.split(split)
    if n is None:
        return full, None
    convs = storage.read_state(full)
    uri = prepared.first(split, n)
    if write or not storage.exists(uri):
        storage.write_json(uri, convs[:n], indent=4)
    return uri, (f"Scope: the first {min(n, len(convs))} of the {len(convs)} {split} conversations "
                 f"(data.limit_{split}={n}); metrics on the whole {split} set will differ.")


def test_split(cfg: Config) -> tuple[str, str | None]:
    """(URI of the test conversations to infer and score, a note on the scope or None). With ``data.limit_test=N``
    the first N conversations of the prepared test split (``data/test-first-N.json``, written by the prepare step)."""
    return _limited(cfg, "test", cfg.data.limit_test)


ENSEMBLE_SEED_STRIDE = 1000  # member k of training.emotion_ensemble trains with training.seed + 1000 k


def ensemble_member(cfg: Config, k: int) -> Config:
    """The config of emotion-ensemble member ``k`` (``training.emotion_ensemble``): the same recipe with seed
    ``training.seed + 1000 k``, so member 0 is the single-adapter run and two recipes' members never share a seed
    when their seeds differ by less than 1000."""
    if k == 0:
        return cfg
    member = cfg.model_copy(deep=True)
    member.training.seed += ENSEMBLE_SEED_STRIDE * k
    return member


T = TypeVar("T")


def at_once(jobs: Sequence[Callable[[], T]], concurrent: int) -> list[T]:
    """Each job's result in order, ``concurrent`` of them running at a time (threads: each mostly waits on its Ray
    Train run). Every job runs to its end before the first failure (in job order) is raised, so what the others
    trained is kept and a rerun reuses it."""
    if concurrent <= 1:
        return [job() for job in jobs]
    with ThreadPoolExecutor(max_workers=concurrent, thread_name_prefix="mecpe-train") as pool:
        futures = [pool.submit(job) for job in jobs]
    for f in futures:
        if f.exception() is not None:
            raise f.exception()
    return [f.result() for f in futures]


def step_train(cfg: Config, task: str):
    from mecpe.sources import require_local
    from mecpe.train import run_training

    require_local(cfg.model.base)  # here, not after Ray Train started a worker that finds it missing
    run = RunLayout(cfg.output_dir)
    return run_training(cfg, task, train_convs_uri=run.split("train"), val_convs_uri=run.split("val"))


@dataclass(frozen=True)
class Inferred:
    """``mecpe infer``: the run's summary and, for labelled input asked to be scored, its metrics (report files
    beside the output) or why the official metric cannot score it (string ids)."""

    summary: InferenceSummary
    metrics: Metrics | None = None
    not_scored: str | None = None


def step_infer(cfg: Config, input_uri: str | None = None, output_uri: str | None = None, *,
               overwrite: bool = False, score: bool = False) -> Inferred:
    """Inference over ``input_uri`` (default: the prepared test split); with ``score`` and labelled input, scored
    like the organisers would."""
    from mecpe.infer import run_inference
    from mecpe.metric import id_problem
    from mecpe.sources import require_local

    require_local(cfg.model.base)
    summary = run_inference(cfg, input_uri or test_split(cfg)[0],
                            output_uri or RunLayout(cfg.output_dir).inference.root, overwrite=overwrite)
    if not (score and summary.has_gold):
        return Inferred(summary)
    out = InferenceLayout(summary.output)
    problem = id_problem(storage.read_state(out.gold), out.gold)
    if problem is not None:
        return Inferred(summary, not_scored=problem)
    return Inferred(summary, score_output(out, "mecpe inference (input gold labels)"))


def adapter_uris(cfg: Config) -> dict[str, str | list[str]]:
    """The adapters a run used, as ``pipeline.json`` records them (the ensemble's only when there is one)."""
    inf = cfg.inference
    uris: dict[str, str | list[str]] = {"emotion": inf.emotion_adapter, "cause": inf.cause_adapter}
    if inf.emotion_ensemble:
        uris["emotion_ensemble"] = list(inf.emotion_ensemble)
    return uris


def adapter_training(cfg: Config) -> dict[str, dict]:
    """Per task whose adapter the config names: its run name, step and logged history (``mecpe_train.json``), for
    the report's learning curves and metrics.json."""
    out = {}
    for task, uri in (("emotion", cfg.inference.emotion_adapter), ("cause", cfg.inference.cause_adapter)):
        meta = layout.read_training_meta(uri)
        if meta is not None:
            out[task] = {"run_name": meta.get("run_name"), "adapter": uri, "global_step": meta.get("global_step"),
                         "log_history": meta.get("log_history") or []}
    return out


def score_output(out: InferenceLayout, title: str) -> Metrics:
    """Official metrics (and utterance emotion scores) of an inference output on labelled input (its ``gold.json``);
    report files beside it: validation, and ``mecpe infer`` on labelled input."""
    from mecpe.evaluate import score_uris
    from mecpe.report import write_report

    metrics = score_uris(out.pred, out.gold)
    write_report(metrics, out.root, parse_status=storage.read_state(out.summary)["parse_status"], title=title)
    return metrics


@dataclass(frozen=True)
class Evaluated:
    """The metrics of an evaluation and where its report went (None: not asked for)."""

    metrics: Metrics
    report: str | None


def score_files(pred_uri: str, gold_uri: str, *, json_out: str | None = None,
                out_dir: str | None = None) -> Evaluated:
    """The official metrics of any Subtask_2_pred.json against a gold file (``mecpe evaluate --pred --gold``);
    optionally the metrics as JSON at ``json_out`` and the report files in ``out_dir``."""
    from mecpe.evaluate import score_uris
    from mecpe.report import metrics_json, write_report

    metrics = score_uris(pred_uri, gold_uri)
    if json_out:
        storage.write_bytes(json_out, metrics_json(metrics))
    return Evaluated(metrics, write_report(metrics, out_dir)["report"] if out_dir else None)


def step_validate(cfg: Config) -> tuple[Config, Validation | None]:
    """The trained system on the validation split (``validation.score``), after fitting the emotion bias there
    (``validation.fit_emotion_bias``: an uncalibrated run, ``mecpe.calibrate.fit`` on its label scores, then, where
    the bias gains out of sample, a calibrated run). Returns the config the test set is inferred with (the bias in it
    when applied) and what was measured (None when neither is asked), also in ``<output_dir>/validation/``."""
    from mecpe import calibrate
    from mecpe.infer import run_inference
    from mecpe.infer.resume import iter_shard_lines

    v = cfg.validation
    if not (v.score or v.fit_emotion_bias):
        return cfg, None
    val_uri, note = _limited(cfg, "val", cfg.data.limit_val)
    run = RunLayout(cfg.output_dir)
    conversations = len(storage.read_state(val_uri))
    before = fitted = None
    if v.fit_emotion_bias:
        raw_cfg = cfg.model_copy(deep=True)
        raw_cfg.inference.emotion_bias = None
        raw = run.validation_raw
        run_inference(raw_cfg, val_uri, raw.root)
        raw_metrics = score_output(raw, "mecpe on the validation split")
        _warn_one_class(raw_metrics)
        before = ValidationScores.of(raw_metrics)
        fitted = calibrate.fit(calibrate.utterances_from_records(iter_shard_lines(raw.records)))
        storage.write_json(run.calibration, asdict(fitted), indent=2)
        log.info("emotion bias fitted on %d validation utterances: %s (objective %.4f -> %.4f; 2-fold %.4f -> %.4f): "
                 "%s", fitted.utterances, {k: b for k, b in fitted.bias.items() if b}, fitted.before, fitted.after,
                 fitted.two_fold.before or 0.0, fitted.two_fold.after or 0.0,
                 "applied" if fitted.applied else "not applied (no gain out of sample)")
        cfg = cfg.model_copy(deep=True)
        cfg.inference.emotion_bias = fitted.bias if fitted.applied else None
    if before is not None and cfg.inference.emotion_bias is None:
        scores, system = before, run.validation_raw  # the uncalibrated run is the system
    else:
        system = run.validation_inference
        run_inference(cfg, val_uri, system.root)
        metrics = score_output(system, "mecpe on the validation split")
        if before is None:  # no bias: this run is the uncalibrated one
            _warn_one_class(metrics)
        scores = ValidationScores.of(metrics)
    rule = rule_on_own_emotions(storage.read_state(system.pred), storage.read_state(system.gold)).weighted_f1
    result = Validation(conversations, note, scores, before, fitted, rule)
    storage.write_json(run.validation_metrics, result.as_json(), indent=2)
    log.info("validation split (%d conversations): weighted_f1 %.4f%s; its emotions with the self/previous rule's "
             "causes instead: %.4f", conversations, scores.weighted_f1,
             f" (uncalibrated {before.weighted_f1:.4f})" if before is not None else "", rule)
    return cfg, result


def _warn_one_class(metrics: Metrics) -> None:
    """The sanity gate on the uncalibrated validation run: loud, since a calibrated bias can hide the collapse."""
    warning = metrics.one_class_warning()
    if warning:
        log.warning("WARNING: validation split: %s", warning)


def step_evaluate(cfg: Config, pred_uri: str | None = None, gold_uri: str | None = None,
                  validation: Validation | None = None) -> Evaluated:
    """Score the predictions beside the rule baselines; write metrics.json, report.md, confusion_matrix.png,
    learning_curves.png (when the config names trained adapters) and a copy of Subtask_2_pred.json into
    ``output_dir``."""
    from mecpe.evaluate import score_uris
    from mecpe.report import write_report

    run = RunLayout(cfg.output_dir)
    note = None
    if gold_uri is None:
        gold_uri, note = test_split(cfg)
    pred_uri = pred_uri or run.inference.pred
    metrics = score_uris(pred_uri, gold_uri, baselines=True, scope=note)
    summary_uri = run.inference.summary
    parse_status = storage.read_state(summary_uri).get("parse_status") if storage.exists(summary_uri) else None
    paths = write_report(metrics, cfg.output_dir, parse_status=parse_status, training=adapter_training(cfg),
                         validation=validation)
    if pred_uri != run.pred:
        storage.write_bytes(run.pred, storage.read_bytes(pred_uri))
    return Evaluated(metrics, paths["report"])


@dataclass(frozen=True)
class PipelineResult:
    """A whole run of the method: the test set's metrics (with baselines and scope), the inference summary, the
    validation step, the adapters trained, the emotion bias used, the step timings; ``pipeline.json`` holds it."""

    output_dir: str
    test_file: str
    metrics: Metrics
    summary: InferenceSummary
    validation: Validation | None
    adapters: dict[str, str | list[str]]  # emotion, cause; emotion_ensemble when training.emotion_ensemble > 1
    emotion_bias: dict[str, float] | None
    timings: dict[str, float]

    @property
    def outputs(self) -> list[str]:
        """What the run left in ``output_dir``."""
        return [f"{self.output_dir.rstrip('/')}/{name}"
                for name in RunLayout(self.output_dir).listing(validation=self.validation is not None)]

    def as_json(self) -> dict:
        """``pipeline.json``."""
        return {"timings_s": self.timings, "adapters": self.adapters,
                "inference_summary": RunLayout(self.output_dir).inference.summary,
                "metrics": self.metrics.official(), "scope": self.metrics.scope,
                "validation": self.validation.as_json() if self.validation else None,
                "emotion_bias": self.emotion_bias}


def run_pipeline(cfg: Config) -> PipelineResult:
    """prepare -> train emotion -> train cause -> validate -> infer (with the new adapters) -> evaluate."""
    from mecpe import cluster

    if cfg.storage.run_name:
        raise ConfigError(f"storage.run_name={cfg.storage.run_name!r} names one training run, and the pipeline trains "
                          f"{cfg.training.emotion_ensemble + 1} (emotion, cause): every run would be that one; leave "
                          "it null (each run is named by its task and config hash)")
    t0 = time.time()
    timings: dict[str, float] = {}
    cluster.connect(cfg.ray_address)  # before any work: outputs on one machine's disk fail a multi-node cluster now
    cluster.check_shared_paths({"output_dir": cfg.output_dir, "storage.path": cfg.storage.path,
                                "model.base": cfg.model.base}, cfg.storage.shared_filesystem)

    def timed(name, fn, *args):
        start = time.time()
        log.info("step %s ...", name)
        out = fn(*args)
        timings[name] = round(time.time() - start, 1)
        log.info("step %s done in %s s", name, timings[name])
        return out

    timed("prepare", step_prepare, cfg)
    trainings = [(f"train-emotion-{k}" if k else "train-emotion", ensemble_member(cfg, k), "emotion")
                 for k in range(cfg.training.emotion_ensemble)] + [("train-cause", cfg, "cause")]
    *emotion, cause = timed("train", at_once, [lambda n=n, c=c, t=t: timed(n, step_train, c, t)
                                               for n, c, t in trainings], cfg.scaling.concurrent_trainings)
    cfg = cfg.model_copy(deep=True)
    cfg.inference.emotion_adapter = emotion[0].adapter_uri
    cfg.inference.emotion_ensemble = [member.adapter_uri for member in emotion[1:]]
    cfg.inference.cause_adapter = cause.adapter_uri
    cfg, validation = timed("validate", step_validate, cfg)
    inferred = timed("infer", step_infer, cfg)
    evaluated = timed("evaluate", step_evaluate, cfg, None, None, validation)
    timings["total"] = round(time.time() - t0, 1)
    result = PipelineResult(cfg.output_dir, cfg.data.path(cfg.data.test_file), evaluated.metrics, inferred.summary,
                            validation, adapter_uris(cfg),
                            cfg.inference.emotion_bias, timings)
    run = RunLayout(cfg.output_dir)
    storage.write_json(run.pipeline_record, result.as_json(), indent=2)
    storage.write_bytes(run.config, dump_config(cfg).encode())
    return result
