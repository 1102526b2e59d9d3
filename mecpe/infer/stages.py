"""The map stages of the inference pipeline, each a small callable class for ``Dataset.map_batches``:

    ParseStage              tasks: raw rows -> validated conversation rows or reject rows (mecpe.data validates);
                            rows an earlier run of the same output already finished are dropped here (resume)
    EmotionPredictor        actors: model + emotion adapter loaded once; mecpe.predict.predict_emotions
    CausePredictor          actors: model + cause adapter; predict_causes on the predicted emotions
    EmotionCausePredictor   inference.share_base: one 4-bit base with both adapters, both stages
    ShardWriter             one atomic shard per batch: records/part-<uuid>.jsonl (+ rejects/part-<uuid>.jsonl);
                            returns one small row of counts and timings, which the driver consumes as they come

Shards are written by our own stage rather than ``Dataset.write_json``: each shard must be atomic (it is the
completion marker for resume), and the driver needs a per-batch signal (counts, timings) while the run streams.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from mecpe import data, storage
from mecpe.config import ModelConfig, QuantizationConfig
from mecpe.infer.resume import META
from mecpe.layout import InferenceLayout

log = logging.getLogger("mecpe.infer")

# Rows between stages carry parsed, typed columns: the validated conversation as a struct (read back without
# validating again), the reject as a ``mecpe.data.Reject`` struct, the predictions as lists of structs. Only an
# utterance's unknown input fields (``extra``) stay a JSON text: they are passed through to the output, never read.
UTTERANCE = pa.struct([("id", pa.int64()), ("text", pa.large_string()), ("speaker", pa.string()),
                       ("emotion", pa.string()), ("extra", pa.string())])
PAIR = pa.struct([("emotion_utt", pa.int64()), ("emotion", pa.string()), ("cause_utt", pa.int64())])
CONVERSATION = pa.struct([("id_int", pa.int64()), ("id_str", pa.string()),  # conversation_ID: one of them is set
                          ("utterances", pa.list_(UTTERANCE)),
                          ("pairs", pa.list_(PAIR))])  # null: the input had no labels
REJECT = pa.struct([("source", pa.string()), ("location", pa.string()), ("conversation_id", pa.string()),
                    ("reason", pa.string()), ("field", pa.string()), ("stage", pa.string()),
                    ("retryable", pa.bool_())])
EMOTION = pa.struct([("utterance", pa.int64()), ("label", pa.string()), ("status", pa.string()),
                     ("dropped", pa.int64()), ("scores", pa.list_(pa.float64()))])  # scores: score method only
CAUSE = pa.struct([("utterance", pa.int64()), ("emotion", pa.string()),  # the emotion the cause model was shown
                   ("causes", pa.list_(pa.int64())), ("status", pa.string()), ("dropped", pa.int64())])
# Engine counters of one batch (set on its first row): {stage: {counter: value}}, each actor's load seconds.
ENGINE = pa.struct([("emotion", pa.map_(pa.string(), pa.float64())), ("cause", pa.map_(pa.string(), pa.float64())),
                    ("load_s", pa.list_(pa.float64()))])
ROW_SCHEMA = pa.schema([
    ("uid", pa.string()),
    ("key", pa.string()),
    ("conversation_id", pa.string()),
    ("source", pa.string()),
    ("location", pa.string()),
    ("file_index", pa.int64()),
    ("position", pa.int64()),
    ("conversation", CONVERSATION),
    ("reject", REJECT),  # set: the row ends in rejects
    ("emotions", pa.list_(EMOTION)),
    ("causes", pa.list_(CAUSE)),
    ("emotion_s", pa.float64()),
    ("cause_s", pa.float64()),
    ("gpu_peak_gib", pa.float64()),  # peak GPU memory of the predictor actors that handled the row (0: CPU)
    ("engine", ENGINE),
])
SHARD_SCHEMA = pa.schema([
    ("records", pa.int64()),
    ("rejects", pa.int64()),
    ("emotion_utterances", pa.int64()),
    ("cause_utterances", pa.int64()),
    ("emotion_s", pa.float64()),
    ("cause_s", pa.float64()),
    ("gpu_peak_gib", pa.float64()),
    ("engine", ENGINE),  # the engine counters of the shard's rows, summed (merge_engine)
])


def conversation_row(conv: data.Conversation) -> dict:
    """A validated conversation as a ``CONVERSATION`` struct."""
    return {"id_int": conv.id if isinstance(conv.id, int) else None,
            "id_str": conv.id if isinstance(conv.id, str) else None,
            "utterances": [{"id": u.id, "text": u.text, "speaker": u.speaker, "emotion": u.emotion,
                            "extra": json.dumps(u.extra, ensure_ascii=False) if u.extra else None}
                           for u in conv.utterances],
            "pairs": None if conv.pairs is None else [{"emotion_utt": p.emotion_utt, "emotion": p.emotion,
                                                       "cause_utt": p.cause_utt} for p in conv.pairs]}


def conversation_of(row: dict) -> data.Conversation:
    """The row's conversation, as ``ParseStage`` validated it (no second validation)."""
    c = row["conversation"]
    return data.Conversation(
        id=c["id_int"] if c["id_int"] is not None else c["id_str"],
        utterances=tuple(data.Utterance(u["id"], u["text"], u["speaker"], u["emotion"],
                                        json.loads(u["extra"]) if u["extra"] else {}) for u in c["utterances"]),
        pairs=None if c["pairs"] is None else tuple(data.Pair(p["emotion_utt"], p["emotion"], p["cause_utt"])
                                                    for p in c["pairs"]),
        source=row["source"])


def merge_engine(total: dict, part: dict | None) -> dict:
    """Sum engine counters ({stage: {counter: n}}, "load_s": [actor load seconds]) into ``total``; ``part`` as an
    ``ENGINE`` struct reads back (maps as lists of pairs, absent stages as None)."""
    for key, value in (part or {}).items():
        if value is None:
            continue
        if key == "load_s":
            total.setdefault("load_s", []).extend(value)
        else:
            stage = total.setdefault(key, {})
            for k, v in (value.items() if isinstance(value, dict) else value):
                stage[k] = stage.get(k, 0) + v
    return total


def uid(source: str, position: int) -> str:
    """Stable id of an input position (file URI + line / array index): what resume counts as done."""
    return hashlib.sha256(f"{source}\n{position}".encode()).hexdigest()[:24]


def _rows_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


def _reject(row: dict, stage: str, reason: str, field: str | None = None, *, retryable: bool = False) -> dict:
    return data.Reject(row["source"], row["location"], row.get("conversation_id"), reason, field,
                       stage=stage, retryable=retryable).to_json()


def _id_text(value: Any) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:200]


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
               "conversation_id": _id_text(conv_id), "source": source, "location": location,
               "file_index": file_index, "position": position, "conversation": conversation, "reject": None,
               "emotions": None, "causes": None, "emotion_s": 0.0, "cause_s": 0.0, "engine": None}
        if reject is not None:
            row["reject"] = _reject(row, *reject)
        return row

    def _item(self, item, source, file_index, position, location) -> dict:
        """One (raw object | data.Reject) from ``data.iter_records`` / ``data.record_from_line`` -> a row."""
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
            _, item = data.record_from_line(r["raw"], loc, source)
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
        return _rows_table([x for x in rows if x["uid"] not in done], ROW_SCHEMA)


# ----------------------------------------------------------------------------------------------- predict


@dataclass(frozen=True)
class PredictorSpec:
    """Everything a predictor actor uses, built once by the driver (``mecpe.infer.driver.predictor_spec``): the
    model to load, the adapters, the prompt budget and the engine settings. Only this crosses into the actors (as
    ``ray.data.llm``'s processor config does), not the experiment's config."""

    model: ModelConfig
    quantization: QuantizationConfig
    adapters: dict[str, str]  # stage -> adapter URI; a stage without one runs on the plain base
    max_prompt_tokens: int
    emotion_method: str  # score | generate
    emotion_bias: tuple[float, ...] | None  # added to each label's score, in EMOTIONS order
    cause_input: str  # predicted (the method) | gold (oracle analysis)
    max_new_tokens: int
    max_batch_tokens: int
    reuse_prefix: bool
    storage_settings: dict


class _Predictor:
    """Loads the base model (4-bit per the spec) with the adapters of ``stages`` once, in the actor."""

    stages: tuple[str, ...] = ()

    def __init__(self, spec: PredictorSpec):
        from mecpe import log_to_stdout, modeling
        from mecpe.prompts import PromptBuilder

        log_to_stdout()
        t0 = time.perf_counter()
        storage.configure(spec.storage_settings)
        self.spec = spec
        self.adapters = {s: spec.adapters[s] for s in self.stages if spec.adapters.get(s)}
        self.device = modeling.pick_device()
        self.model, self.tokenizer = modeling.load(spec.model, spec.quantization, device=self.device,
                                                   adapters=self.adapters)
        self.builder = PromptBuilder(self.tokenizer, spec.max_prompt_tokens, cut_target=True)
        self._load_s: float | None = round(time.perf_counter() - t0, 2)  # reported once, with the first batch

    def _free_memory(self) -> None:
        """After a failed batch (e.g. CUDA out of memory), give the cached blocks back before retrying smaller."""
        if str(self.device).startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    @contextlib.contextmanager
    def _adapter(self, stage: str):
        if stage in self.adapters:
            self.model.set_adapter(stage)
            yield
        elif self.adapters and hasattr(self.model, "disable_adapter"):
            with self.model.disable_adapter():  # this stage runs on the plain base
                yield
        else:
            yield

    def _predict(self, stage: str, convs: list, shown: list):
        from mecpe import predict

        spec = self.spec
        with self._adapter(stage):
            if stage == "emotion":
                return predict.predict_emotions(self.model, self.tokenizer, self.builder, convs,
                                                method=spec.emotion_method, max_batch_tokens=spec.max_batch_tokens,
                                                reuse_prefix=spec.reuse_prefix,
                                                bias=list(spec.emotion_bias) if spec.emotion_bias else None)
            return predict.predict_causes(self.model, self.tokenizer, self.builder, convs, shown,
                                          max_new_tokens=spec.max_new_tokens, max_batch_tokens=spec.max_batch_tokens,
                                          reuse_prefix=spec.reuse_prefix)

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

    def _run_stage(self, stage: str, rows: list[dict], parsed: dict[int, data.Conversation]) -> None:
        """Fill ``rows[i][stage + "s"]``; a conversation whose prediction raises becomes a retryable reject.
        ``parsed``: each row's conversation by ``id(row)``, read from its columns once per batch."""
        col = "emotions" if stage == "emotion" else "causes"
        todo = [r for r in rows if id(r) in parsed and r["reject"] is None and r[col] is None]
        if not todo:
            return
        convs = [parsed[id(r)] for r in todo]
        shown = [self._cause_emotions(c, r) if stage == "cause" else None for c, r in zip(convs, todo)]
        sizes = [max(1, len(c.utterances)) for c in convs]
        start = time.perf_counter()
        try:
            results = self._predict(stage, convs, shown)
            groups = [(todo, shown, results)]
        except Exception:  # isolate the failing conversation(s); the rest of the batch goes on
            self._free_memory()
            groups = []
            for r, c, e in zip(todo, convs, shown):
                try:
                    groups.append(([r], [e], self._predict(stage, [c], [e])))
                except Exception as exc:  # noqa: BLE001 - recorded in the reject, retried by the next run
                    self._free_memory()
                    r["reject"] = _reject(r, stage, f"{stage} prediction failed: {type(exc).__name__}: {exc}",
                                          retryable=True)
        elapsed = time.perf_counter() - start
        total = sum(sizes)
        share = {id(r): elapsed * s / total for r, s in zip(todo, sizes)}
        for grp_rows, grp_shown, results in groups:
            for r, e, res in zip(grp_rows, grp_shown, results):
                r[col] = self._encode(stage, res, e)
                r[f"{stage}_s"] = share[id(r)]

    def __call__(self, batch: pa.Table) -> pa.Table:
        from dataclasses import asdict

        from mecpe.predict import STATS

        rows = batch.to_pylist()
        parsed = {id(r): conversation_of(r) for r in rows if r["reject"] is None and r["conversation"] is not None}
        before = {s: asdict(STATS[s]) for s in self.stages}
        for stage in self.stages:
            self._run_stage(stage, rows, parsed)
        peak = _gpu_peak_gib()
        for r in rows:
            r["gpu_peak_gib"] = max(r.get("gpu_peak_gib") or 0.0, peak)
        if rows:
            engine = {s: {k: v - before[s][k] for k, v in asdict(STATS[s]).items()} for s in self.stages}
            if self._load_s is not None:
                engine["load_s"], self._load_s = [self._load_s], None
            rows[0]["engine"] = merge_engine(merge_engine({}, rows[0].get("engine")), engine)
        return _rows_table(rows, ROW_SCHEMA)


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


# ----------------------------------------------------------------------------------------------- write


def build_record(row: dict) -> dict:
    """Output record of a predicted row: the conversation in input schema with predicted ``emotion`` per
    utterance, official ``emotion-cause_pairs``, per-utterance ``parse_status`` / ``dropped_utterances`` (and
    ``label_scores``, each label's answer log-probability, with the score method), and
    bookkeeping under ``_mecpe`` (uid, key, source, location, order, gold labels when present)."""
    conv = conversation_of(row)
    emo = {e["utterance"]: e for e in row["emotions"]}
    cau = {c["utterance"]: c for c in row["causes"] or []}
    labels = {u: (e["label"] if e["label"] in data.EMOTIONS else "neutral") for u, e in emo.items()}
    # The pair's emotion is the one the cause stage read: the predicted label, or the gold one with cause_input=gold.
    pairs = [data.Pair(u, cau[u]["emotion"], c) for u in sorted(cau) if cau[u]["emotion"] in data.EMOTIONS[1:]
             for c in cau[u]["causes"]]
    rec = data.conversation_to_json(conv, emotions=labels, pairs=pairs)
    for utt in rec["conversation"]:
        u = int(utt["utterance_ID"])
        if u in emo and emo[u]["scores"] is not None:  # what mecpe.calibrate fits a bias on
            utt["label_scores"] = emo[u]["scores"]
        status = {"emotion": emo[u]["status"]} if u in emo else {}
        dropped = {"emotion": emo[u]["dropped"]} if u in emo else {}
        if u in cau:
            status["cause"] = cau[u]["status"]
            dropped["cause"] = cau[u]["dropped"]
        utt["parse_status"] = status
        utt["dropped_utterances"] = dropped
    gold = None
    if conv.pairs is not None and all(u.emotion is not None for u in conv.utterances):
        gold = {"emotions": {str(u.id): u.emotion for u in conv.utterances},
                "emotion-cause_pairs": [p.to_json() for p in conv.pairs]}
    rec[META] = {"uid": row["uid"], "key": row["key"], "source": row["source"], "location": row["location"],
                 "file_index": row["file_index"], "position": row["position"], "gold": gold}
    return rec


def reject_record(row: dict) -> dict:
    """The row's ``mecpe.data.Reject`` and the bookkeeping resume and assembly need (uid, key, input order)."""
    return {**row["reject"], "uid": row["uid"], "key": row["key"], "file_index": row["file_index"],
            "position": row["position"]}


class ShardWriter:
    """One atomic shard per batch (records and, if any, rejects); returns one row of counts and timings."""

    def __init__(self, output_uri: str, storage_settings: dict):
        storage.configure(storage_settings)
        self.out = InferenceLayout(output_uri)

    def __call__(self, batch: pa.Table) -> pa.Table:
        if batch.num_rows == 0:
            return _rows_table([], SHARD_SCHEMA)
        records, rejects = [], []
        emo_u = cau_u = 0
        emo_s = cau_s = gpu = 0.0
        engine: dict = {}
        for row in batch.to_pylist():
            merge_engine(engine, row.get("engine"))
            gpu = max(gpu, row.get("gpu_peak_gib") or 0.0)
            emo_s += row["emotion_s"] or 0.0
            cau_s += row["cause_s"] or 0.0
            if row["reject"] is not None:
                rejects.append(reject_record(row))
                continue
            try:
                rec = build_record(row)
            except Exception as exc:  # noqa: BLE001 - never lose a conversation to a bookkeeping bug
                row["reject"] = _reject(row, "write", f"cannot build record: {type(exc).__name__}: {exc}",
                                        retryable=True)
                rejects.append(reject_record(row))
                continue
            records.append(rec)
            emo_u += len(rec["conversation"])
            cau_u += sum(1 for u in rec["conversation"] if "cause" in u["parse_status"])
        name = f"part-{uuid.uuid4().hex}.jsonl"
        if records:
            storage.write_bytes(storage.join(self.out.records, name), storage.dumps_jsonl(records))
        if rejects:
            storage.write_bytes(storage.join(self.out.rejects_dir, name), storage.dumps_jsonl(rejects))
        return _rows_table([{"records": len(records), "rejects": len(rejects), "emotion_utterances": emo_u,
                             "cause_utterances": cau_u, "emotion_s": emo_s, "cause_s": cau_s,
                             "gpu_peak_gib": gpu, "engine": engine or None}], SHARD_SCHEMA)
