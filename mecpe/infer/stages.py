"""The map stages of the inference pipeline, each a small callable class for ``Dataset.map_batches``:

    ParseStage              tasks: raw rows -> validated conversation rows or reject rows (mecpe.data validates);
                            rows an earlier run of the same output already finished are dropped here (resume)
    EmotionPredictor        actors: model + emotion adapter loaded once; mecpe.predict.predict_emotions
    CausePredictor          actors: model + cause adapter; predict_causes on the predicted emotions
    EmotionCausePredictor   inference.share_base: one 4-bit base with both adapters, both stages

The rows they exchange are ``mecpe.infer.rows``; the last stage, the shard writer, is ``mecpe.infer.writer``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import pyarrow as pa

from mecpe import data, readers, storage
from mecpe.config import ModelConfig, PromptConfig, QuantizationConfig
from mecpe.engine.stats import StageStats
from mecpe.infer.rows import (
    ROW_SCHEMA, conversation_of, conversation_row, id_text, merge_engine, reject_of, rows_table, uid,
)

if TYPE_CHECKING:
    from mecpe.predict import StageOutput

log = logging.getLogger("mecpe.infer")

# ----------------------------------------------------------------------------------------------- parse

_DONE_CACHE: dict[str, frozenset] = {}  # per worker process: ref id -> finished uids


class ParseStage:
    """Raw rows -> validated conversation rows or reject rows; drops rows whose uid an earlier run of this output
    already finished (resume).

    Runs as Ray *tasks* (an instance is passed, not the class: parsing needs no state worth an actor, and tasks
    can be fused with the read). The finished uids were put in the object store once by the driver; the ref
    travels wrapped in a list (so Ray hands over the ref, not the set, with every task) and is fetched once per
    worker process. The driver holds the ref until the run ends."""

    def __init__(self, done_ref=None):
        self._ref = [done_ref] if done_ref is not None else []

    @property
    def done(self) -> frozenset:
        if not self._ref:
            return frozenset()
        key = self._ref[0].hex()
        if key not in _DONE_CACHE:
            import ray

            _DONE_CACHE.clear()
            _DONE_CACHE[key] = ray.get(self._ref[0])
        return _DONE_CACHE[key]

    @staticmethod
    def _row(source, file_index, position, location, *, conv_id=None, conversation=None, reject=None) -> dict:
        row = {"uid": uid(source, position), "key": None if conversation is None else storage.safe_key(conv_id),
               "conversation_id": id_text(conv_id), "source": source, "location": location,
               "file_index": file_index, "position": position, "conversation": conversation, "reject": None,
               "emotions": None, "causes": None, "emotion_s": 0.0, "cause_s": 0.0, "engine": None}
        if reject is not None:
            row["reject"] = reject_of(row, *reject)
        return row

    def _item(self, item, source, file_index, position, location) -> dict:
        """One (raw object | data.Reject) from ``readers.iter_records`` / ``readers.record_from_line`` -> a row."""
        if isinstance(item, data.Reject):
            return self._row(source, file_index, position, location, conv_id=item.conversation_id,
                             reject=("read", item.reason, item.field))
        try:
            conv = data.conversation_from_json(item, source=source, location=location)
        except data.InvalidConversation as exc:
            cid = item.get("conversation_ID") if isinstance(item, dict) else None
            return self._row(source, file_index, position, location, conv_id=cid,
                             reject=("validate", exc.reason, exc.field))
        return self._row(source, file_index, position, location, conv_id=conv.id,
                         conversation=conversation_row(conv))

    def _parse(self, r: dict) -> dict:
        """One raw row -> a conversation row or a reject row."""
        source, fi, pos, loc, kind = r["source"], r["file_index"], r["position"], r["location"], r["kind"]
        if kind == "line":  # undecoded bytes: mecpe.data decodes and parses (invalid UTF-8 -> a reject)
            _, item = readers.record_from_line(r["raw"], loc, source)
            return self._item(item, source, fi, pos, loc)
        if kind == "item":
            return self._item(json.loads(r["raw"]), source, fi, pos, loc)
        if kind == "reject":
            rej = json.loads(r["raw"])
            return self._row(source, fi, pos, loc, conv_id=rej["conversation_id"],
                             reject=("read", rej["reason"], rej["field"]))
        return self._row(source, fi, pos, loc, reject=("read", r["raw"].decode("utf-8", "replace")))

    def _safe_parse(self, r: dict) -> dict:
        try:
            return self._parse(r)
        except Exception as exc:  # noqa: BLE001 - one odd record must not fail the job, nor get lost
            return self._row(r["source"], r["file_index"], r["position"], r["location"],
                             reject=("read", f"cannot parse: {type(exc).__name__}: {exc}"))

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [self._safe_parse(r) for r in batch.to_pylist()]
        done = self.done
        return rows_table([x for x in rows if x["uid"] not in done], ROW_SCHEMA)


# ----------------------------------------------------------------------------------------------- predict


@dataclass(frozen=True)
class PredictorSpec:
    """Everything a predictor actor uses, built once by the driver (``mecpe.infer.driver.predictor_spec``): the
    model to load, the adapters, the prompt budget and the engine settings. Only this crosses into the actors (as
    ``ray.data.llm``'s processor config does), not the experiment's config."""

    model: ModelConfig
    quantization: QuantizationConfig
    adapters: dict[str, str]  # stage -> adapter URI; a stage without one runs on the plain base
    prompt: PromptConfig  # the prompt budget and layout the adapters were trained with
    emotion_method: str  # score | generate
    emotion_bias: tuple[float, ...] | None  # added to each label's score, in EMOTIONS order
    cause_input: str  # predicted (the method) | gold (oracle analysis)
    max_new_tokens: int
    max_batch_tokens: int
    reuse_prefix: bool
    storage_settings: dict
    merge_adapters: bool | str = "auto"  # inference.merge_adapters: each stage its own base, adapter merged
    gpu_memory_gib: float | None = None  # inference.gpu_memory_gib: this actor's CUDA memory cap
    decode_step: str = "dynamic"  # inference.decode_step: how decoding steps run (mecpe.engine.steps)
    prefill_attention: str = "sdpa"  # inference.prefill_attention: how the prefills attend
    emotion_ensemble: tuple[str, ...] = ()  # inference.emotion_ensemble: further emotion adapters, scores averaged
    emotion_ensemble_mode: str = "average"  # inference.emotion_ensemble_mode: average | soup (one merged model)
    liger_kernels: bool = False  # inference.liger_kernels: Liger's fused kernels in the forwards (CUDA)


def stage_adapters(spec: PredictorSpec, stages: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """Per stage, the adapters it runs by name: ``emotion`` then the ensemble's ``emotion_1``, ``emotion_2``, ...;
    ``cause``; {} for a stage on the plain base."""
    out: dict[str, dict[str, str]] = {}
    for stage in stages:
        uri = spec.adapters.get(stage)
        out[stage] = {stage: uri} if uri else {}
        if stage == "emotion" and uri:
            out[stage].update({f"emotion_{k}": member for k, member in enumerate(spec.emotion_ensemble, 1)})
    return out


class _Predictor:
    """Loads the base model (4-bit per the spec) with the adapters of ``stages`` once, in the actor: one base with
    the adapters switched per stage, or (``merge_adapters``) one base per adapter with it merged in. The emotion
    stage of an ensemble (``emotion_ensemble``) scores the labels with each of its adapters and averages, or runs
    one model holding their mean weights (``emotion_ensemble_mode`` soup, merged adapters only)."""

    stages: tuple[str, ...] = ()

    def __init__(self, spec: PredictorSpec):
        from mecpe import log_to_stdout, modeling
        from mecpe.prompts import PromptBuilder

        log_to_stdout()
        t0 = time.perf_counter()
        storage.configure(spec.storage_settings)
        self.spec = spec
        self.names = stage_adapters(spec, self.stages)
        self.adapters = {name: uri for named in self.names.values() for name, uri in named.items()}
        self.device = modeling.pick_device()
        self.memory_fraction = modeling.cap_gpu_memory(self.device, spec.gpu_memory_gib)
        self.merged = bool(self.adapters) and modeling.merges_adapters(spec.merge_adapters, spec.quantization)
        if self.merged:
            self.models = {}
            soup = self.names.get("emotion", {}) if spec.emotion_ensemble_mode == "soup" else {}
            if len(soup) > 1:  # the ensemble as one model: the emotion stage runs it like a single adapter
                self.models["emotion"], self.tokenizer = modeling.load_soup(
                    spec.model, spec.quantization, device=self.device, adapters=list(soup.values()))
                self.names["emotion"] = {"emotion": soup["emotion"]}
            for name in [n for stage in self.stages for n in (self.names[stage] or [stage])]:
                if name not in self.models:
                    self.models[name], self.tokenizer = modeling.load_merged(
                        spec.model, spec.quantization, device=self.device, adapter=self.adapters.get(name),
                        name=name)
        else:
            model, self.tokenizer = modeling.load(spec.model, spec.quantization, device=self.device,
                                                  adapters=self.adapters)
            self.models = dict.fromkeys([*self.stages, *self.adapters], model)
        self.fused_kernels = spec.liger_kernels and all(
            [modeling.fuse_kernels(m, self.device) for m in {id(m): m for m in self.models.values()}.values()])
        self.builder = PromptBuilder(self.tokenizer, **spec.prompt.builder_kwargs(), cut_target=True)
        self._load_s: float | None = round(time.perf_counter() - t0, 2)  # reported once, with the first batch

    def _free_memory(self) -> None:
        """After a failed batch (e.g. CUDA out of memory), give the cached blocks back before retrying smaller."""
        if str(self.device).startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    @contextlib.contextmanager
    def _adapter(self, name: str):
        """The model of adapter ``name`` (or of a stage without one): its own merged copy, or the shared base with
        that adapter switched on (none: the plain base)."""
        model = self.models[name]
        if self.merged:
            yield model
        elif name in self.adapters:
            model.set_adapter(name)
            yield model
        elif self.adapters and hasattr(model, "disable_adapter"):
            with model.disable_adapter():  # this stage runs on the plain base
                yield model
        else:
            yield model

    def _predict(self, stage: str, convs: list[data.Conversation], shown: list) -> StageOutput:
        from mecpe.predict import average_emotions, predict_causes, predict_emotions  # torch: in the actors only

        spec = self.spec
        bias = list(spec.emotion_bias) if spec.emotion_bias else None
        if stage == "emotion" and len(self.names[stage]) > 1:  # an ensemble: label scores averaged, then the bias
            outs = []
            for name in self.names[stage]:
                with self._adapter(name) as model:
                    outs.append(predict_emotions(model, self.tokenizer, self.builder, convs, method="score",
                                                 max_batch_tokens=spec.max_batch_tokens,
                                                 reuse_prefix=spec.reuse_prefix,
                                                 prefill_attention=spec.prefill_attention))
            return average_emotions(outs, bias)
        with self._adapter(stage) as model:
            if stage == "emotion":
                return predict_emotions(model, self.tokenizer, self.builder, convs, method=spec.emotion_method,
                                        max_batch_tokens=spec.max_batch_tokens, reuse_prefix=spec.reuse_prefix,
                                        bias=bias, prefill_attention=spec.prefill_attention)
            return predict_causes(model, self.tokenizer, self.builder, convs, shown,
                                  max_new_tokens=spec.max_new_tokens, max_batch_tokens=spec.max_batch_tokens,
                                  reuse_prefix=spec.reuse_prefix, decode_step=spec.decode_step,
                                  prefill_attention=spec.prefill_attention)

    def _cause_emotions(self, conv, row: dict) -> dict[int, str]:
        """The emotions the cause stage reads: stage 1's predictions (the method), or with
        ``inference.cause_input=gold`` the input's labels (oracle analysis; unlabelled utterances keep the
        prediction)."""
        predicted = {e["utterance"]: e["label"] for e in row["emotions"]}
        if self.spec.cause_input != "gold":
            return predicted
        return {u.id: u.emotion if u.emotion is not None else predicted.get(u.id, "neutral") for u in conv.utterances}

    @staticmethod
    def _encode(stage: str, result: dict, shown: dict[int, str] | None) -> list[dict]:
        if stage == "emotion":
            return [{"utterance": u, "label": r.label, "status": r.status, "dropped": int(r.dropped),
                     "scores": None if r.scores is None else [round(x, 4) for x in r.scores]}
                    for u, r in sorted(result.items())]
        # the pair's emotion is the one the cause model was shown
        return [{"utterance": u, "emotion": shown[u], "causes": [int(c) for c in r.causes], "status": r.status,
                 "dropped": int(r.dropped)} for u, r in sorted(result.items())]

    def _run_stage(self, stage: str, rows: list[dict], parsed: dict[int, data.Conversation]) -> StageStats:
        """Fill ``rows[i][stage + "s"]``; a conversation whose prediction raises becomes a retryable reject.
        ``parsed``: each row's conversation by ``id(row)``, read from its columns once per batch. Returns the
        engine's work on the batch (the calls that succeeded)."""
        col = "emotions" if stage == "emotion" else "causes"
        todo = [r for r in rows if id(r) in parsed and r["reject"] is None and r[col] is None]
        stats = StageStats()
        if not todo:
            return stats
        convs = [parsed[id(r)] for r in todo]
        shown = [self._cause_emotions(c, r) if stage == "cause" else None for c, r in zip(convs, todo)]
        sizes = [max(1, len(c.utterances)) for c in convs]
        start = time.perf_counter()
        try:
            out = self._predict(stage, convs, shown)
            groups = [(todo, shown, out.results)]
            stats.add(out.stats)
        except Exception:  # isolate the failing conversation(s); the rest of the batch goes on
            self._free_memory()
            groups = []
            for r, c, e in zip(todo, convs, shown):
                try:
                    out = self._predict(stage, [c], [e])
                    groups.append(([r], [e], out.results))
                    stats.add(out.stats)
                except Exception as exc:  # noqa: BLE001 - recorded in the reject, retried by the next run
                    self._free_memory()
                    r["reject"] = reject_of(r, stage, f"{stage} prediction failed: {type(exc).__name__}: {exc}",
                                          retryable=True)
        elapsed = time.perf_counter() - start
        total = sum(sizes)
        share = {id(r): elapsed * s / total for r, s in zip(todo, sizes)}
        for grp_rows, grp_shown, results in groups:
            for r, e, res in zip(grp_rows, grp_shown, results):
                r[col] = self._encode(stage, res, e)
                r[f"{stage}_s"] = share[id(r)]
        return stats

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        parsed = {id(r): conversation_of(r) for r in rows if r["reject"] is None and r["conversation"] is not None}
        work = {stage: self._run_stage(stage, rows, parsed) for stage in self.stages}
        peak = _gpu_peak_gib()
        for r in rows:
            r["gpu_peak_gib"] = max(r.get("gpu_peak_gib") or 0.0, peak)
        if rows:
            engine = {stage: asdict(stats) for stage, stats in work.items()}
            if self._load_s is not None:
                engine["load_s"], self._load_s = [self._load_s], None
            rows[0]["engine"] = merge_engine(merge_engine({}, rows[0].get("engine")), engine)
        return rows_table(rows, ROW_SCHEMA)


def _gpu_peak_gib() -> float:
    """Peak GPU memory this process has allocated (weights, activations, KV cache), 0.0 without CUDA."""
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return 0.0
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


class EmotionPredictor(_Predictor):
    """Stage 1: the emotion of every utterance."""

    stages = ("emotion",)


class CausePredictor(_Predictor):
    """Stage 2: the causes of every non-neutral utterance, given the predicted emotions."""

    stages = ("cause",)


class EmotionCausePredictor(_Predictor):
    """``inference.share_base``: one 4-bit base with both adapters; emotion then cause on each batch."""

    stages = ("emotion", "cause")


