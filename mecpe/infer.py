"""Two-stage batch inference with Ray Data: emotions, then causes, streamed from input files to JSON shards.

One streaming Ray Data execution per run::

    read_datasource(_RawInput)       JSON Lines: one row per line, as bytes (Ray never decodes them, so a bad line
                                     or invalid UTF-8 cannot fail the file); JSON arrays: one row per element
                                     (mecpe.data.iter_records splits them; an unreadable file is one error row).
                                     Blocks hold at most one predictor batch (see build_dataset).
    map_batches(ParseStage)          tasks: validate with mecpe.data -> a conversation row or a reject row; rows an
                                     earlier run of the same output already finished are dropped here (resume)
    map_batches(EmotionPredictor)    actors: model + emotion adapter loaded once; mecpe.predict.predict_emotions
    map_batches(CausePredictor)      actors: model + cause adapter; predict_causes on the predicted emotions
      (inference.share_base: one EmotionCausePredictor holds one 4-bit base with both adapters and does both)
    map_batches(ShardWriter)         one atomic shard per batch: records/part-<uuid>.jsonl (+ rejects/part-<uuid>.jsonl)
                                     returns one small row per shard, which the driver consumes as they come

Shards are written by our own stage rather than ``Dataset.write_json``: each shard must be atomic (it is the
completion marker for resume), and the driver needs a per-batch signal (counts, timings) while the run streams.

The driver never holds the dataset: it iterates over the writer's per-shard rows (counts and timings) only. Then it
assembles, from the shards, ``Subtask_2_pred.json`` (streamed, via mecpe.data.write_sorted_predictions), ``rejects.jsonl``,
``summary.json`` and, when every conversation carries gold labels, ``metrics.json`` (+ report files if local).
Assembly streams too: records are spilled to a local temp file and written out in conversation-id order one at a
time, with a small index entry per conversation in memory. Only scoring (inputs with gold labels) holds the gold
conversations, since ``score_subtask2`` takes lists; evaluation sets are small.

Resume (exactly once after de-duplication):

* Every input position has a stable ``uid`` (hash of file URI + line / array index). Every run has a ``run_id``, a
  hash of everything that shapes predictions (model, revision, quantization, prompt, inference method settings,
  adapter URIs + their training config hashes, input file URIs + sha256). It is written to ``<output>/_run.json``
  before any work; an output holding a different run id (or shards without ``_run.json``) is refused with
  :class:`RunMismatchError` unless ``overwrite`` (then the old results are deleted first). Runs are never mixed.
* A shard is written in one atomic ``storage.write_bytes`` (local temp + rename, S3 single PUT): it exists
  completely or not at all, and it is the only completion marker. At start the uids in existing shards are read
  (a set of short strings; fine well past millions of conversations), put in the object store once, and
  ``ParseStage`` drops those rows before the models see them. A crash loses at most the batches in flight.
* A task retried by Ray after its shard was written writes the same uids again under a new name; assembly keeps
  the first copy of each uid. Conversations whose prediction raised are written as *retryable* rejects: they are
  not counted as done, so the next run retries them, and a later record for the same uid supersedes the reject.
* Two input conversations with the same ``conversation_ID`` (``storage.safe_key``) are both predicted; at assembly
  the first in input order (file order, then position) is kept and the others become rejects, so the choice does
  not depend on scheduling or on where a crash happened.

Test-only fault injection: ``MECPE_TEST_CRASH_AFTER_SHARDS=N`` makes the driver ``os._exit(3)`` once it has seen N
shards written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import pyarrow as pa

from mecpe import storage
from mecpe.config import Config, config_hash, load_config

RUN_FILE = "_run.json"
RECORDS_DIR = "records"
REJECTS_DIR = "rejects"
PRED_FILE = "Subtask_2_pred.json"
REJECTS_FILE = "rejects.jsonl"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.json"
META = "_mecpe"  # per-record bookkeeping in the shards; stripped from Subtask_2_pred.json
CRASH_ENV = "MECPE_TEST_CRASH_AFTER_SHARDS"
_LIGHT_CPUS = 0.25  # read / parse / write stages: JSON and I/O only
_STAGES = ("emotion", "cause")

# Rows between stages. ``conversation`` is the validated conversation (input schema JSON); ``reject`` a JSON object
# {stage, reason, field, retryable} for rows that will end in rejects; ``emotions`` / ``causes`` the predictions.
ROW_SCHEMA = pa.schema([
    ("uid", pa.string()),
    ("key", pa.string()),
    ("conversation_id", pa.string()),
    ("source", pa.string()),
    ("location", pa.string()),
    ("file_index", pa.int64()),
    ("position", pa.int64()),
    ("conversation", pa.large_string()),
    ("reject", pa.string()),
    ("emotions", pa.large_string()),
    ("causes", pa.large_string()),
    ("emotion_s", pa.float64()),
    ("cause_s", pa.float64()),
    ("gpu_peak_gib", pa.float64()),  # peak GPU memory of the predictor actors that handled the row (0: CPU)
])
SHARD_SCHEMA = pa.schema([
    ("records", pa.int64()),
    ("rejects", pa.int64()),
    ("emotion_utterances", pa.int64()),
    ("cause_utterances", pa.int64()),
    ("emotion_s", pa.float64()),
    ("cause_s", pa.float64()),
    ("gpu_peak_gib", pa.float64()),
])
_RAW_SCHEMA = pa.schema([
    ("source", pa.string()),
    ("file_index", pa.int64()),
    # line: a JSONL line, undecoded | item: one element of a JSON array (re-serialized) | reject: an element
    # mecpe.data already rejected (raw = the reject as JSON) | error: the file is unreadable (raw = message)
    ("kind", pa.string()),
    ("position", pa.int64()),
    ("location", pa.string()),
    ("raw", pa.large_binary()),
])


class RunMismatchError(RuntimeError):
    """The output location holds results of a different run (other config, adapters or input)."""


def _uid(source: str, position: int) -> str:
    return hashlib.sha256(f"{source}\n{position}".encode()).hexdigest()[:24]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# =============================================================================================== input


def list_inputs(input_uri: str | list[str], *, exclude: str | None = None) -> list[str]:
    """Input files: each URI is a .json/.jsonl file or a folder / prefix of them (sorted, de-duplicated; local
    paths made absolute so run ids and uids do not depend on the working directory). Files under ``exclude``
    (the output location, if it lies inside an input folder) are left out."""
    uris = [input_uri] if isinstance(input_uri, str) else list(input_uri)
    skip = None
    if exclude:
        skip = (exclude if storage.is_remote(exclude) else os.path.abspath(exclude)).rstrip("/") + "/"
    out: dict[str, None] = {}
    for uri in uris:
        found = storage.list_files(uri, suffixes=(".json", ".jsonl"))
        for f in found:
            f = f if storage.is_remote(f) else os.path.abspath(f.removeprefix("file://"))
            if skip is None or not f.startswith(skip):
                out[f] = None
        if not found:
            raise FileNotFoundError(f"no .json/.jsonl input files at {uri}")
    return list(out)


def _rows_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


def _make_raw_datasource(members: list[tuple[str, str, int]], filesystem, lines_per_block: int):
    """A Ray ``FileBasedDatasource`` (Ray's documented way to read a custom file format) yielding raw rows.
    ``members``: (uri, filesystem path, global file index) of the files on ``filesystem``."""
    from ray.data.datasource import FileBasedDatasource

    class _RawInput(FileBasedDatasource):
        """JSON Lines: lines as bytes, ``lines_per_block`` per block, streamed (a huge file never sits in memory).
        JSON arrays (.json, or a .jsonl whose first byte is ``[``): the whole file as one row, parsed downstream."""

        def __init__(self, paths, *, index: dict[str, tuple[str, int]], per_block: int, **kwargs):
            super().__init__(paths, **kwargs)
            self._index = index
            self._per_block = max(1, per_block)

        def get_name(self) -> str:
            return "ReadECF"

        def _where(self, path: str) -> tuple[str, int]:
            norm = path.lstrip("/")
            for p in (path, norm, "/" + norm):
                if p in self._index:
                    return self._index[p]
            return path, -1

        def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
            source, file_index = self._where(path)
            rows: list[dict] = []

            seen_line = [False]

            def add(kind, position, location, raw):
                seen_line[0] = True
                rows.append({"source": source, "file_index": file_index, "kind": kind, "position": position,
                             "location": location, "raw": raw})
                return len(rows) >= self._per_block

            def flush():
                block = pa.Table.from_pylist(rows, schema=_RAW_SCHEMA)
                rows.clear()
                return block

            try:
                head = f.read(1 << 16)
                whole = not source.endswith(".jsonl") or head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")
                if whole:
                    yield from self._array(head + f.readall(), source, add, flush)
                lineno = 0
                carry: list[bytes] = []  # pieces of the current, unfinished line (no quadratic re-scanning)
                chunk = b"" if whole else head
                while chunk:
                    *lines, rest = chunk.split(b"\n")
                    for line in lines:
                        if carry:
                            line = b"".join(carry) + line
                            carry = []
                        lineno += 1
                        if lineno == 1:
                            line = line.removeprefix(b"\xef\xbb\xbf")
                        # blank lines are not conversations
                        if line.strip() and add("line", lineno, f"line {lineno}", line.rstrip(b"\r")):
                            yield flush()
                    carry.append(rest)
                    chunk = f.read(1 << 20)
                last = b"".join(carry)
                if last.strip():  # no newline at the end of the file
                    lineno += 1
                    if lineno == 1:
                        last = last.removeprefix(b"\xef\xbb\xbf")
                    add("line", lineno, f"line {lineno}", last.rstrip(b"\r"))
                if not whole and not seen_line[0]:  # as mecpe.data: an empty file is an error, not zero rows
                    add("error", -1, "byte 0", b"unreadable file: empty file (no JSON Lines)")
            except OSError as exc:  # an I/O error mid-file: a file-level reject, the job goes on
                add("error", -1, "file", f"cannot read: {type(exc).__name__}: {exc}".encode())
            if rows:
                yield flush()

        @staticmethod
        def _array(data_bytes: bytes, source: str, add, flush) -> Iterator[pa.Table]:
            """A whole JSON document (one array; or JSON Lines in a .json): split into items by mecpe.data."""
            from mecpe import data

            try:
                for index, (location, item) in enumerate(data.iter_records(data_bytes, source)):
                    if isinstance(item, data.Reject):
                        full = add("reject", index, location, json.dumps(
                            {"conversation_id": item.conversation_id, "reason": item.reason, "field": item.field},
                            ensure_ascii=False).encode())
                    else:
                        full = add("item", index, location, json.dumps(item, ensure_ascii=False).encode())
                    if full:
                        yield flush()
            except data.FileError as exc:
                add("error", -1, exc.position or "file", f"unreadable file: {exc.message}".encode())

    index = {path: (uri, i) for uri, path, i in members}
    return _RawInput([m[1] for m in members], index=index, per_block=lines_per_block, filesystem=filesystem)


def read_raw(files: list[str], *, lines_per_block: int = 256):
    """Raw-row dataset over ``files`` (local and/or s3://: one read per filesystem, unioned), in blocks of at most
    ``lines_per_block`` rows."""
    import ray

    groups: dict[bool, tuple[Any, list[tuple[str, str, int]]]] = {}
    for i, uri in enumerate(files):
        fs, path = storage.get_filesystem(uri)
        groups.setdefault(storage.is_remote(uri), (fs, []))[1].append((uri, path, i))
    datasets = [ray.data.read_datasource(_make_raw_datasource(members, fs, lines_per_block), num_cpus=_LIGHT_CPUS)
                for fs, members in groups.values()]
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]


# =============================================================================================== stages


def _reject_json(stage: str, reason: str, field: str | None = None, *, retryable: bool = False) -> str:
    return json.dumps({"stage": stage, "reason": reason, "field": field, "retryable": retryable})


def _id_text(value: Any) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:200]


_DONE_CACHE: dict[str, frozenset] = {}  # per worker process: ref id -> finished uids


class ParseStage:
    """Raw rows -> validated conversation rows or reject rows (mecpe.data does the validating); drops rows whose
    uid an earlier run of this output already finished (resume).

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
        return {"uid": _uid(source, position), "key": None if conversation is None else storage.safe_key(conv_id),
                "conversation_id": _id_text(conv_id), "source": source, "location": location,
                "file_index": file_index, "position": position, "conversation": conversation, "reject": reject,
                "emotions": None, "causes": None, "emotion_s": 0.0, "cause_s": 0.0}

    def _item(self, item, source, file_index, position, location) -> dict:
        """One (raw object | data.Reject) from ``data.iter_records`` -> a row."""
        from mecpe import data

        if isinstance(item, data.Reject):
            return self._row(source, file_index, position, location, conv_id=item.conversation_id,
                             reject=_reject_json("read", item.reason, item.field))
        try:
            conv = data.conversation_from_json(item, source=source, location=location)
        except data.InvalidConversation as exc:
            cid = item.get("conversation_ID") if isinstance(item, dict) else None
            return self._row(source, file_index, position, location, conv_id=cid,
                             reject=_reject_json("validate", exc.reason, exc.field))
        return self._row(source, file_index, position, location, conv_id=conv.id,
                         conversation=json.dumps(data.conversation_to_json(conv), ensure_ascii=False))

    def _parse(self, r: dict) -> dict:
        """One raw row -> a conversation row or a reject row."""
        from mecpe import data

        source, fi, pos, loc, kind = r["source"], r["file_index"], r["position"], r["location"], r["kind"]
        if kind == "line":  # undecoded bytes: mecpe.data decodes and parses (invalid UTF-8 -> a reject)
            _, item = next(iter(data.iter_records(r["raw"], source)))
            return self._item(item, source, fi, pos, loc)
        if kind == "item":
            return self._item(json.loads(r["raw"]), source, fi, pos, loc)
        if kind == "reject":
            rej = json.loads(r["raw"])
            return self._row(source, fi, pos, loc, conv_id=rej["conversation_id"],
                             reject=_reject_json("read", rej["reason"], rej["field"]))
        return self._row(source, fi, pos, loc, reject=_reject_json("read", r["raw"].decode("utf-8", "replace")))

    def _safe_parse(self, r: dict) -> dict:
        try:
            return self._parse(r)
        except Exception as exc:  # noqa: BLE001 - one odd record must not fail the job, nor get lost
            return self._row(r["source"], r["file_index"], r["position"], r["location"],
                             reject=_reject_json("read", f"cannot parse: {type(exc).__name__}: {exc}"))

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [self._safe_parse(r) for r in batch.to_pylist()]
        done = self.done
        return _rows_table([x for x in rows if x["uid"] not in done], ROW_SCHEMA)


class _Predictor:
    """Loads the base model (4-bit per config) with the adapters of ``stages`` once, in the actor."""

    stages: tuple[str, ...] = ()

    def __init__(self, cfg: dict):
        from mecpe import modeling
        from mecpe.prompts import PromptBuilder

        self.cfg = Config.model_validate(cfg)
        inf = self.cfg.inference
        wanted = {"emotion": inf.emotion_adapter, "cause": inf.cause_adapter}
        self.adapters = {s: wanted[s] for s in self.stages if wanted[s]}
        self.device = modeling.pick_device()
        self.model, self.tokenizer = modeling.load_for_inference(self.cfg.model, self.cfg.quantization,
                                                                 self.adapters, self.device)
        self.builder = PromptBuilder(self.tokenizer, self.cfg.prompt.max_prompt_tokens, cut_target=True)

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

    def _predict(self, stage: str, convs: list, rows: list[dict]):
        from mecpe import predict

        inf = self.cfg.inference
        with self._adapter(stage):
            if stage == "emotion":
                return predict.predict_emotions(self.model, self.tokenizer, self.builder, convs,
                                                method=inf.emotion_method, max_batch_tokens=inf.max_batch_tokens,
                                                reuse_prefix=inf.reuse_prefix)
            emotions = [self._cause_emotions(c, r) for c, r in zip(convs, rows)]
            return predict.predict_causes(self.model, self.tokenizer, self.builder, convs, emotions,
                                          max_new_tokens=inf.max_new_tokens, max_batch_tokens=inf.max_batch_tokens,
                                          reuse_prefix=inf.reuse_prefix)

    def _cause_emotions(self, conv, row: dict) -> dict[int, str]:
        """The emotions the cause stage reads: stage 1's predictions (the method), or with
        ``inference.cause_input=gold`` the input's labels (oracle analysis; unlabelled utterances keep the
        prediction)."""
        predicted = {int(k): v["label"] for k, v in json.loads(row["emotions"]).items()}
        if self.cfg.inference.cause_input != "gold":
            return predicted
        return {u.id: u.emotion if u.emotion is not None else predicted.get(u.id, "neutral") for u in conv.utterances}

    def _encode(self, stage: str, result: dict, conv, row: dict) -> str:
        if stage == "emotion":
            return json.dumps({str(u): {"label": r.label, "status": r.status, "dropped": int(r.dropped)}
                               for u, r in sorted(result.items())})
        read = self._cause_emotions(conv, row)  # the pair's emotion is the one the cause model was shown
        return json.dumps({str(u): {"emotion": read[u], "causes": [int(c) for c in r.causes], "status": r.status,
                                    "dropped": int(r.dropped)} for u, r in sorted(result.items())})

    def _run_stage(self, stage: str, rows: list[dict]) -> None:
        """Fill ``rows[i][stage + "s"]``; a conversation whose prediction raises becomes a retryable reject."""
        from mecpe import data

        col = "emotions" if stage == "emotion" else "causes"
        todo = [r for r in rows if r["reject"] is None and r["conversation"] is not None and r[col] is None]
        if not todo:
            return
        convs = [data.conversation_from_json(json.loads(r["conversation"]), source=r["source"],
                                             location=r["location"]) for r in todo]
        sizes = [max(1, len(c.utterances)) for c in convs]
        start = time.perf_counter()
        try:
            results = self._predict(stage, convs, todo)
            groups = [(todo, convs, results)]
        except Exception:  # isolate the failing conversation(s); the rest of the batch goes on
            self._free_memory()
            groups = []
            for r, c in zip(todo, convs):
                try:
                    groups.append(([r], [c], self._predict(stage, [c], [r])))
                except Exception as exc:  # noqa: BLE001 - recorded in the reject, retried by the next run
                    self._free_memory()
                    r["reject"] = _reject_json(stage, f"{stage} prediction failed: {type(exc).__name__}: {exc}",
                                               retryable=True)
        elapsed = time.perf_counter() - start
        total = sum(sizes)
        share = {id(r): elapsed * s / total for r, s in zip(todo, sizes)}
        for grp_rows, grp_convs, results in groups:
            for r, c, res in zip(grp_rows, grp_convs, results):
                r[col] = self._encode(stage, res, c, r)
                r[f"{stage}_s"] = share[id(r)]

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        for stage in self.stages:
            self._run_stage(stage, rows)
        peak = _gpu_peak_gib()
        for r in rows:
            r["gpu_peak_gib"] = max(r.get("gpu_peak_gib") or 0.0, peak)
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


def build_record(row: dict) -> dict:
    """Output record of a predicted row: the conversation in input schema with predicted ``emotion`` per
    utterance, official ``emotion-cause_pairs``, per-utterance ``parse_status`` / ``dropped_utterances``, and
    bookkeeping under ``_mecpe`` (uid, key, source, location, order, gold labels when present)."""
    from mecpe import data

    conv = data.conversation_from_json(json.loads(row["conversation"]), source=row["source"],
                                       location=row["location"])
    emo = {int(k): v for k, v in json.loads(row["emotions"]).items()}
    cau = {int(k): v for k, v in json.loads(row["causes"] or "{}").items()}
    labels = {u: (v["label"] if v["label"] in data.EMOTIONS else "neutral") for u, v in emo.items()}
    # The pair's emotion is the one the cause stage read: the predicted label, or the gold one with cause_input=gold.
    pairs = [data.Pair(u, cau[u].get("emotion", labels.get(u)), int(c)) for u in sorted(cau)
             if cau[u].get("emotion", labels.get(u)) in data.EMOTIONS[1:] for c in cau[u]["causes"]]
    rec = data.conversation_to_json(conv, emotions=labels, pairs=pairs)
    for utt in rec["conversation"]:
        u = int(utt["utterance_ID"])
        status = {"emotion": emo[u]["status"]} if u in emo else {}
        dropped = {"emotion": emo[u]["dropped"]} if u in emo else {}
        if u in cau:
            status["cause"] = cau[u]["status"]
            dropped["cause"] = cau[u]["dropped"]
        utt["parse_status"] = status
        utt["dropped_utterances"] = dropped
    gold = None
    if conv.pairs is not None and all(u.emotion is not None for u in conv.utterances):
        gold = data.conversation_to_json(conv)
        gold = {"emotions": {str(u["utterance_ID"]): u["emotion"] for u in gold["conversation"]},
                "emotion-cause_pairs": gold["emotion-cause_pairs"]}
    rec[META] = {"uid": row["uid"], "key": row["key"], "source": row["source"], "location": row["location"],
                 "file_index": row["file_index"], "position": row["position"], "gold": gold}
    return rec


def reject_record(row: dict) -> dict:
    rej = json.loads(row["reject"])
    return {"source": row["source"], "location": row["location"], "conversation_id": row["conversation_id"],
            "reason": rej["reason"], "field": rej.get("field"), "stage": rej["stage"],
            "retryable": bool(rej.get("retryable")), "uid": row["uid"], "key": row["key"],
            "file_index": row["file_index"], "position": row["position"]}


def _jsonl(objs: Iterable[dict]) -> bytes:
    return "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs).encode("utf-8")


class ShardWriter:
    """One atomic shard per batch (records and, if any, rejects); returns one row of counts and timings."""

    def __init__(self, output_uri: str):
        self.output_uri = output_uri

    def __call__(self, batch: pa.Table) -> pa.Table:
        if batch.num_rows == 0:
            return _rows_table([], SHARD_SCHEMA)
        records, rejects = [], []
        emo_u = cau_u = 0
        emo_s = cau_s = gpu = 0.0
        for row in batch.to_pylist():
            gpu = max(gpu, row.get("gpu_peak_gib") or 0.0)
            emo_s += row["emotion_s"] or 0.0
            cau_s += row["cause_s"] or 0.0
            if row["reject"] is not None:
                rejects.append(reject_record(row))
                continue
            try:
                rec = build_record(row)
            except Exception as exc:  # noqa: BLE001 - never lose a conversation to a bookkeeping bug
                row["reject"] = _reject_json("write", f"cannot build record: {type(exc).__name__}: {exc}",
                                             retryable=True)
                rejects.append(reject_record(row))
                continue
            records.append(rec)
            emo_u += len(rec["conversation"])
            cau_u += sum(1 for u in rec["conversation"] if "cause" in u["parse_status"])
        name = f"part-{uuid.uuid4().hex}.jsonl"
        if records:
            storage.write_bytes(storage.join(self.output_uri, RECORDS_DIR, name), _jsonl(records))
        if rejects:
            storage.write_bytes(storage.join(self.output_uri, REJECTS_DIR, name), _jsonl(rejects))
        return _rows_table([{"records": len(records), "rejects": len(rejects), "emotion_utterances": emo_u,
                             "cause_utterances": cau_u, "emotion_s": emo_s, "cause_s": cau_s,
                             "gpu_peak_gib": gpu}], SHARD_SCHEMA)


# =============================================================================================== shards


def _iter_shard_lines(prefix: str) -> Iterator[dict]:
    """Every JSON object in the shards under ``prefix`` (shard order, then line order); unreadable lines skipped."""
    if not storage.exists(prefix):
        return
    for uri in storage.list_files(prefix, suffixes=(".jsonl",)):
        try:
            raw = storage.read_bytes(uri)
        except FileNotFoundError:
            continue
        for line in raw.splitlines():
            try:
                obj = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue  # shards are written atomically; this is only defence against foreign files
            if isinstance(obj, dict):
                yield obj


def done_uids(output_uri: str) -> set[str]:
    """uids finished by earlier runs: every record, and every reject that is not retryable."""
    done = {r[META]["uid"] for r in _iter_shard_lines(storage.join(output_uri, RECORDS_DIR)) if META in r}
    done |= {r["uid"] for r in _iter_shard_lines(storage.join(output_uri, REJECTS_DIR))
             if "uid" in r and not r.get("retryable")}
    return done


@dataclass
class Assembly:
    conversations: int  # written to the predictions file
    gold: list[dict] | None  # gold conversations in prediction order, when every input had labels
    rejects: list[dict]
    utterances: int
    parse_status: dict[str, dict[str, int]]
    dropped: dict[str, int]
    duplicates_in_shards: int


def assemble(output_uri: str, pred_uri: str) -> Assembly:
    """Read the shards back and write ``pred_uri`` (``Subtask_2_pred.json``): one record per uid (the first copy;
    a retried batch may have written another), one per conversation id (the first in input order; later ones
    become rejects), sorted by conversation id.

    Streams: records are spilled to a local temp file while a few small fields per conversation are indexed in
    memory, then written out in order one at a time, so the driver's memory does not grow with the corpus' text.
    Inputs with gold labels keep their gold conversations for scoring (evaluation sets are small)."""
    from mecpe import data

    index: dict[str, tuple] = {}  # uid -> (file_index, position, conversation_ID, source, location, offset, length)
    copies = 0
    with tempfile.TemporaryFile(prefix="mecpe-assemble-") as spill:
        for rec in _iter_shard_lines(storage.join(output_uri, RECORDS_DIR)):
            meta = rec.get(META) or {}
            uid = meta.get("uid")
            if uid is None:
                continue
            if uid in index:
                copies += 1
                continue
            line = json.dumps(rec, ensure_ascii=False).encode("utf-8")
            index[uid] = (meta["file_index"], meta["position"], rec["conversation_ID"], meta["source"],
                          meta["location"], spill.tell(), len(line))
            spill.write(line)
        rejects: dict[str, dict] = {}
        for rej in _iter_shard_lines(storage.join(output_uri, REJECTS_DIR)):
            uid = rej.get("uid")
            if uid is None or uid in index or uid in rejects:
                copies += uid in rejects
                continue
            rejects[uid] = rej
        winners: dict[tuple, tuple] = {}
        for uid, e in sorted(index.items(), key=lambda kv: (kv[1][0], kv[1][1])):
            key = data.id_order(e[2])
            first = winners.get(key)
            if first is None:
                winners[key] = (uid, e)
                continue
            fe = first[1]
            rejects[uid] = {
                "source": e[3], "location": e[4], "conversation_id": str(e[2]),
                "reason": f"duplicate conversation_ID {e[2]!r}: kept the one in {fe[3]} at {fe[4]}",
                "field": "conversation_ID", "stage": "assemble", "retryable": False,
                "uid": uid, "key": storage.safe_key(e[2]), "file_index": e[0], "position": e[1]}
        index.clear()
        status: dict[str, Counter] = {s: Counter() for s in _STAGES}
        dropped: Counter = Counter()
        count = {"utterances": 0}
        golds: list[dict] | None = []

        def ordered_records() -> Iterator[dict]:
            nonlocal golds
            for key in sorted(winners):
                _, e = winners[key]
                spill.seek(e[5])
                rec = json.loads(spill.read(e[6]))
                for utt in rec["conversation"]:
                    count["utterances"] += 1
                    for stage, st in (utt.get("parse_status") or {}).items():
                        status[stage][st] += 1
                    for stage, n in (utt.get("dropped_utterances") or {}).items():
                        dropped[stage] += int(n or 0)
                g = rec.pop(META).get("gold")
                if g is None:
                    golds = None
                elif golds is not None:
                    utts = [{**{k: v for k, v in u.items() if k not in ("parse_status", "dropped_utterances")},
                             "emotion": g["emotions"].get(str(u["utterance_ID"]))} for u in rec["conversation"]]
                    golds.append({"conversation_ID": rec["conversation_ID"], "conversation": utts,
                                  "emotion-cause_pairs": g["emotion-cause_pairs"]})
                yield rec

        written = data.write_sorted_predictions(ordered_records(), pred_uri)
    reject_list = sorted(rejects.values(), key=lambda r: (r.get("file_index", -1), r.get("position", -1)))
    return Assembly(written, golds if written else None, reject_list, count["utterances"],
                    {s: dict(c) for s, c in status.items()}, dict(dropped), copies)


def _adapter_info(uri: str | None) -> dict | None:
    if not uri:
        return None
    info: dict[str, Any] = {"uri": uri, "config_hash": None}
    meta_uri = storage.join(uri, "mecpe_train.json")
    try:
        if storage.exists(meta_uri):
            meta = storage.read_json(meta_uri)
            info["config_hash"] = (meta.get("config_hash") if isinstance(meta, dict) else None) or config_hash(meta)
    except Exception as exc:  # noqa: BLE001 - provenance only; the adapter itself is loaded in the actors
        info["config_hash_error"] = f"{type(exc).__name__}: {exc}"
    return info


def run_identity(cfg: Config, files: list[str], shas: dict[str, str]) -> dict:
    """Everything that shapes the predictions, and its hash (the run id)."""
    inf = cfg.inference
    parts = {
        "model": {k: getattr(cfg.model, k) for k in ("base", "revision", "trust_remote_code", "attn_implementation")},
        "quantization": cfg.quantization.model_dump(mode="json"),
        "prompt": cfg.prompt.model_dump(mode="json"),
        "inference": {"emotion_method": inf.emotion_method, "cause_input": inf.cause_input,
                      "max_new_tokens": inf.max_new_tokens, "reuse_prefix": inf.reuse_prefix},
        "adapters": {"emotion": _adapter_info(inf.emotion_adapter), "cause": _adapter_info(inf.cause_adapter)},
        "inputs": [{"uri": f, "sha256": shas[f]} for f in files],
    }
    return {"run_id": config_hash(parts, length=16), **parts}


def _check_run(output_uri: str, ident: dict, overwrite: bool) -> bool:
    """Claim ``output_uri`` for this run; returns True when resuming the same run."""
    run_uri = storage.join(output_uri, RUN_FILE)
    existing = storage.read_json(run_uri) if storage.exists(run_uri) else None
    has_shards = any(storage.exists(storage.join(output_uri, d)) and
                     storage.list_files(storage.join(output_uri, d), suffixes=(".jsonl",))
                     for d in (RECORDS_DIR, REJECTS_DIR))
    same = isinstance(existing, dict) and existing.get("run_id") == ident["run_id"]
    if not same and (existing is not None or has_shards):
        if not overwrite:
            if isinstance(existing, dict):
                differs = [k for k in ident if k != "run_id" and existing.get(k) != ident[k]]
                what = f"run {existing.get('run_id')!r}, which differs in: {', '.join(differs) or '?'}"
            else:
                what = "shards but no _run.json"
            raise RunMismatchError(
                f"refusing to write into {output_uri}: it holds the results of another run ({what}); this run is "
                f"{ident['run_id']!r}. Runs are never mixed: choose another --output, or pass overwrite=true to "
                f"delete the old results.")
        for d in (RECORDS_DIR, REJECTS_DIR):
            if storage.exists(storage.join(output_uri, d)):
                storage.delete_dir(storage.join(output_uri, d))
        for name in (PRED_FILE, REJECTS_FILE, SUMMARY_FILE, METRICS_FILE, "report.md", "confusion_matrix.png",
                     RUN_FILE):
            if storage.exists(storage.join(output_uri, name)):
                storage.delete(storage.join(output_uri, name))
    if not same:
        storage.write_json(run_uri, {**ident, "created": _now()}, indent=2)
    return same


def _git_commit() -> str | None:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


# =============================================================================================== Ray


def _connect(cfg: Config) -> None:
    """Use the running Ray, else ``ray.init(address=cfg.ray_address or $RAY_ADDRESS)`` (a local instance when
    neither is set), passing the S3 endpoint (not a secret) to the workers; credentials never travel this way."""
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in ("MECPE_S3_ENDPOINT",) if os.environ.get(k)}
    try:  # inside `ray job submit`: variables the job's runtime_env already sets would be a merge conflict
        job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("runtime_env") or {}
        env = {k: v for k, v in env.items() if k not in (job_env.get("env_vars") or {})}
    except (ValueError, AttributeError):
        pass
    ray.init(address=cfg.ray_address or os.environ.get("RAY_ADDRESS"),
             runtime_env={"env_vars": env} if env else None, log_to_driver=True)


@dataclass
class StageResources:
    num_actors: int
    num_gpus: float
    num_cpus: float
    accelerator_type: str | None
    batch_size: int


def stage_resources(cfg: Config) -> StageResources:
    """Per-actor resources of the predictor stages: ``inference_scaling`` when set, else ``inference``."""
    inf, sc = cfg.inference, cfg.inference_scaling
    if sc is None:
        res = StageResources(inf.num_actors, inf.num_gpus, inf.num_cpus, inf.accelerator_type, inf.batch_size)
    else:
        per = sc.resources_per_worker or {}
        gpus = float(per.get("GPU", 1.0 if sc.use_gpu else 0.0))
        res = StageResources(sc.num_workers, gpus, float(per.get("CPU", inf.num_cpus)),
                             sc.accelerator_type or inf.accelerator_type, inf.batch_size)
    if res.num_gpus <= 0:
        res.accelerator_type = None  # CPU inference: no accelerator to ask for
    return res


def _fit_cpu_actors(res: StageResources, pools: int) -> StageResources:
    """On a CPU-only cluster too small for the configured actors (e.g. a 2-core laptop), shrink their CPU request
    so the light read/parse/write stages can still be scheduled (otherwise the pipeline waits forever)."""
    import ray

    if res.num_gpus > 0:
        return res
    total = float(ray.cluster_resources().get("CPU", 0.0))
    need = res.num_cpus * res.num_actors * pools + 3 * _LIGHT_CPUS
    if total and need > total:
        per = max(0.05, round((total - 3 * _LIGHT_CPUS) / (res.num_actors * pools), 2))
        print(f"[mecpe infer] {total:g} CPUs cannot hold {res.num_actors * pools} predictor actors x "
              f"{res.num_cpus:g} CPU + the I/O stages; asking {per:g} CPU per actor", flush=True)
        res = StageResources(res.num_actors, res.num_gpus, per, res.accelerator_type, res.batch_size)
    return res


def build_dataset(cfg: Config, files: list[str], output_uri: str, done_ref, res: StageResources):
    """The lazy Ray Data pipeline (nothing runs until it is iterated)."""
    from ray.data import ActorPoolStrategy

    cfg_dict = cfg.model_dump(mode="json")
    # Read blocks hold at most one predictor batch: a map task hands its output on only when it ends, so bigger
    # blocks would move through every stage, and reach the writer, as a whole. This keeps memory flat and makes
    # shards, and so resume, per batch. (Ray's streaming repartition would do it too, but as 1-CPU tasks that a
    # small CPU-only node cannot schedule next to the actors.)
    ds = read_raw(files, lines_per_block=max(1, min(cfg.inference.lines_per_block, res.batch_size)))
    ds = ds.map_batches(ParseStage(done_ref), batch_format="pyarrow", num_cpus=_LIGHT_CPUS)
    predictor_kw = dict(batch_size=res.batch_size, batch_format="pyarrow", num_cpus=res.num_cpus,
                        compute=ActorPoolStrategy(size=res.num_actors), fn_constructor_kwargs={"cfg": cfg_dict},
                        udf_modifying_row_count=False)
    if res.num_gpus > 0:
        predictor_kw["num_gpus"] = res.num_gpus
    if res.accelerator_type:
        predictor_kw["accelerator_type"] = res.accelerator_type
    if cfg.inference.share_base:
        ds = ds.map_batches(EmotionCausePredictor, **predictor_kw)
    else:
        ds = ds.map_batches(EmotionPredictor, **predictor_kw)
        ds = ds.map_batches(CausePredictor, **predictor_kw)
    ds = ds.map_batches(ShardWriter, fn_constructor_kwargs={"output_uri": output_uri}, batch_size=res.batch_size,
                        batch_format="pyarrow", compute=ActorPoolStrategy(min_size=1, max_size=max(1, res.num_actors)),
                        num_cpus=_LIGHT_CPUS)
    return ds


# =============================================================================================== driver


def _rate(n: int, s: float) -> float | None:
    return round(n / s, 2) if s > 0 else None


def run_inference(cfg: Config, input_uri: str | list[str], output_uri: str, *, overwrite: bool = False) -> dict:
    """Predict emotions and causes for every conversation of ``input_uri``; write everything under ``output_uri``
    (see the module docstring); resume a crashed run of the same configuration. Returns the summary."""
    import ray

    t0 = time.time()
    if cfg.storage.s3_endpoint:  # mecpe.storage reads the endpoint from the environment (driver and workers)
        os.environ.setdefault("MECPE_S3_ENDPOINT", cfg.storage.s3_endpoint)
    files = list_inputs(input_uri, exclude=output_uri)
    shas = {f: storage.sha256(f) for f in files}
    ident = run_identity(cfg, files, shas)
    resumed = _check_run(output_uri, ident, overwrite)
    _connect(cfg)
    done = done_uids(output_uri) if resumed else set()
    if done:
        print(f"[mecpe infer] resuming run {ident['run_id']}: {len(done)} conversations already done", flush=True)
    pools = 1 if cfg.inference.share_base else 2
    res = _fit_cpu_actors(stage_resources(cfg), pools)
    done_ref = ray.put(frozenset(done)) if done else None
    ds = build_dataset(cfg, files, output_uri, done_ref, res)

    crash_after = int(os.environ.get(CRASH_ENV) or 0)
    this_run = Counter()
    secs = {"emotion": 0.0, "cause": 0.0}
    gpu_peak = 0.0
    t_pipe = time.time()
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in batch.to_pylist():
            this_run["shards"] += 1
            for k in ("records", "rejects", "emotion_utterances", "cause_utterances"):
                this_run[k] += row[k]
            secs["emotion"] += row["emotion_s"]
            secs["cause"] += row["cause_s"]
            gpu_peak = max(gpu_peak, row["gpu_peak_gib"] or 0.0)
            if crash_after and this_run["shards"] >= crash_after:
                print(f"[mecpe infer] {CRASH_ENV}={crash_after}: exiting after {this_run['shards']} shards",
                      flush=True)
                os._exit(3)
    pipe_s = time.time() - t_pipe
    del done_ref

    asm = assemble(output_uri, storage.join(output_uri, PRED_FILE))
    public_rejects = [{k: r.get(k) for k in ("source", "location", "conversation_id", "reason", "field", "stage",
                                             "retryable")} for r in asm.rejects]
    storage.write_bytes(storage.join(output_uri, REJECTS_FILE), _jsonl(public_rejects))

    metrics = metrics_error = None
    if asm.gold is not None:  # score the file as written, like the organisers would
        from mecpe import evaluate

        pred_uri = storage.join(output_uri, PRED_FILE)
        try:
            metrics = evaluate.score_subtask2(storage.read_json(pred_uri), asm.gold, pred_source=pred_uri,
                                              gold_source="gold labels of the input")
        except evaluate.EvaluationError as exc:  # e.g. string ids: the official metric cannot score them
            metrics_error = str(exc)  # the predictions are written all the same; scoring is an extra
            print(f"[mecpe infer] not scored: {metrics_error}", flush=True)
    wall = time.time() - t0
    import mecpe

    summary = {
        "run_id": ident["run_id"],
        "output": output_uri,
        "conversations": asm.conversations,
        "utterances": asm.utterances,
        "rejects": len(asm.rejects),
        "rejects_by_stage": dict(Counter(r["stage"] for r in asm.rejects)),
        "retryable_rejects": sum(1 for r in asm.rejects if r.get("retryable")),
        "parse_status": asm.parse_status,
        "dropped_utterances": asm.dropped,
        "duplicate_shard_copies_ignored": asm.duplicates_in_shards,
        "resumed": bool(done),
        "done_before_this_run": len(done),
        "this_run": {
            "shards": this_run["shards"], "records": this_run["records"], "rejects": this_run["rejects"],
            "pipeline_s": round(pipe_s, 2),
            "stages": {
                "emotion": {"utterances": this_run["emotion_utterances"], "actor_s": round(secs["emotion"], 2),
                            "utt_per_s_per_actor": _rate(this_run["emotion_utterances"], secs["emotion"])},
                "cause": {"utterances": this_run["cause_utterances"], "actor_s": round(secs["cause"], 2),
                          "utt_per_s_per_actor": _rate(this_run["cause_utterances"], secs["cause"])},
            },
            "utt_per_s": _rate(this_run["emotion_utterances"], pipe_s),
            "gpu_peak_gib": gpu_peak,  # the largest predictor actor's peak allocated GPU memory
            "resources": {"num_actors": res.num_actors, "num_gpus": res.num_gpus, "num_cpus": res.num_cpus,
                          "accelerator_type": res.accelerator_type, "batch_size": res.batch_size,
                          "share_base": cfg.inference.share_base},
        },
        "wall_s": round(wall, 2),
        "has_gold": metrics is not None,
        "metrics_error": metrics_error,
        "provenance": {
            "base_model": cfg.model.base, "revision": cfg.model.revision,
            "adapters": ident["adapters"], "quantization": ident["quantization"],
            "mecpe_version": mecpe.__version__, "git_commit": _git_commit(),
            "inputs": ident["inputs"], "python": sys.version.split()[0], "ray": ray.__version__,
        },
        "finished": _now(),
    }
    storage.write_json(storage.join(output_uri, SUMMARY_FILE), summary, indent=2)
    if metrics is not None:
        from mecpe import evaluate

        if storage.is_remote(output_uri):
            storage.write_json(storage.join(output_uri, METRICS_FILE),
                               {**metrics, "parse_status": asm.parse_status}, indent=2)
        else:
            evaluate.write_report(metrics, output_uri, parse_status=asm.parse_status,
                                  title="mecpe inference (input gold labels)")
        summary["metrics"] = {k: metrics[k] for k in evaluate.OFFICIAL_KEYS}

    st = summary["this_run"]["stages"]
    print(f"[mecpe infer] read+parse: {len(files)} file(s), {summary['conversations']} conversations, "
          f"{summary['rejects']} rejects ({len(done)} done before this run)", flush=True)
    for stage in _STAGES:
        print(f"[mecpe infer] {stage}: {st[stage]['utterances']} utterances this run, "
              f"{st[stage]['utt_per_s_per_actor']} utt/s per actor, parse status {asm.parse_status[stage]}",
              flush=True)
    print(f"[mecpe infer] write: {this_run['shards']} shards this run; {PRED_FILE}, {REJECTS_FILE}, {SUMMARY_FILE}"
          f"{', ' + METRICS_FILE if metrics is not None else ''} in {output_uri} ({summary['wall_s']} s)", flush=True)
    return summary


def main_infer(config_path: str | None, input_uri: str, output_uri: str, overrides: list[str]) -> int:
    """``mecpe infer --config FILE --input URI --output URI [key=value ...]``; ``overwrite=true`` (not a config
    key) replaces another run's results at the output."""
    overwrite = False
    rest = []
    for item in overrides or []:
        if item.split("=", 1)[0].strip() == "overwrite":
            overwrite = str(item.split("=", 1)[1]).strip().lower() in ("1", "true", "yes", "on")
        else:
            rest.append(item)
    cfg = load_config(config_path, rest)
    try:
        summary = run_inference(cfg, input_uri, output_uri, overwrite=overwrite)
    except (RunMismatchError, FileNotFoundError) as exc:
        print(f"mecpe infer: error: {exc}", file=sys.stderr)
        return 2
    if "metrics" in summary:
        print(f"[mecpe infer] weighted_f1 {summary['metrics']['weighted_f1']:.4f}")
    return 0
