"""The inference output folder: its layout, which run owns it, what is already done, and the assembly of the final
files from the shards.

Resume (exactly once after de-duplication):

* Every input position has a stable ``uid`` (hash of file URI + line / array index). Every run has a ``run_id``, a
  hash of everything that shapes predictions (model, revision, quantization, prompt, inference method settings,
  adapter URIs + their training config hashes, input file URIs + sha256). It is written to ``<output>/_run.json``
  before any work; an output holding a different run id (or shards without ``_run.json``) is refused with
  :class:`RunMismatchError` unless ``overwrite`` (then the old results are deleted first). Runs are never mixed.
* A shard is written in one atomic ``storage.write_bytes`` (local temp + rename, S3 single PUT): it exists
  completely or not at all, and it is the only completion marker. At start the uids in existing shards are read
  (a set of short strings; fine well past millions of conversations) and ``ParseStage`` drops those rows before the
  models see them. A crash loses at most the batches in flight.
* A task retried by Ray after its shard was written writes the same uids again under a new name; assembly keeps
  the first copy of each uid. Conversations whose prediction raised are written as *retryable* rejects: they are
  not counted as done, so the next run retries them, and a later record for the same uid supersedes the reject.
* Two input conversations with the same ``conversation_ID`` (``storage.safe_key``) are both predicted; at assembly
  the first in input order (file order, then position) is kept and the others become rejects, so the choice does
  not depend on scheduling or on where a crash happened.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

from mecpe import data, layout, runid, storage
from mecpe.config import Config
from mecpe.errors import RunMismatchError
from mecpe.layout import InferenceLayout

META = "_mecpe"  # per-record bookkeeping in the shards; stripped from Subtask_2_pred.json
STAGES = ("emotion", "cause")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _adapter_info(uri: str | None) -> dict | None:
    if not uri:
        return None
    info: dict[str, Any] = {"uri": uri, "config_hash": None}
    try:
        meta = layout.read_training_meta(uri)
        if meta is not None:
            info["config_hash"] = (meta.get("config_hash") if isinstance(meta, dict) else None) or runid.run_id(meta)
    except Exception as exc:  # noqa: BLE001 - provenance only; the adapter itself is loaded in the actors
        info["config_hash_error"] = f"{type(exc).__name__}: {exc}"
    return info


def run_identity(cfg: Config, files: list[str], shas: dict[str, str]) -> dict:
    """Everything that shapes the predictions, and its hash (the run id)."""
    inf = cfg.inference
    parts = {
        "model": runid.model_part(cfg.model),
        "quantization": cfg.quantization.model_dump(mode="json"),
        "prompt": cfg.prompt.model_dump(mode="json"),
        "inference": {"emotion_method": inf.emotion_method, "emotion_bias": inf.emotion_bias,
                      "cause_input": inf.cause_input, "max_new_tokens": inf.max_new_tokens,
                      "reuse_prefix": inf.reuse_prefix},
        "adapters": {"emotion": _adapter_info(inf.emotion_adapter), "cause": _adapter_info(inf.cause_adapter)},
        "inputs": [{"uri": f, "sha256": shas[f]} for f in files],
    }
    if inf.emotion_ensemble:  # absent without one: the identity of runs from before ensembles stays the same
        parts["adapters"]["emotion_ensemble"] = [_adapter_info(uri) for uri in inf.emotion_ensemble]
        if inf.emotion_ensemble_mode != "average":
            parts["adapters"]["emotion_ensemble_mode"] = inf.emotion_ensemble_mode
    if inf.rule_causes:  # likewise
        parts["inference"]["rule_causes"] = sorted(inf.rule_causes)
    return {"run_id": runid.run_id(parts, length=16), **parts}


def _has_shards(out: InferenceLayout) -> bool:
    return any(storage.exists(d) and storage.list_files(d, suffixes=(".jsonl",)) for d in (out.records, out.rejects_dir))


def claim_output(output_uri: str, ident: dict, overwrite: bool) -> bool:
    """Claim ``output_uri`` for this run; returns True when resuming the same run. Another run's results are
    refused (``RunMismatchError``, naming what differs) unless ``overwrite``, which deletes them first."""
    out = InferenceLayout(output_uri)
    run_uri = out.run_file
    existing = storage.read_state(run_uri) if storage.exists(run_uri) else None
    same = isinstance(existing, dict) and existing.get("run_id") == ident["run_id"]
    if not same and (existing is not None or _has_shards(out)):
        if not overwrite:
            if isinstance(existing, dict):
                differs = [k for k in ident if k != "run_id" and existing.get(k) != ident[k]]
                what = f"run {existing.get('run_id')!r}, which differs in: {', '.join(differs) or '?'}"
            else:
                what = f"shards but no {out.RUN_FILE}"
            raise RunMismatchError(
                f"refusing to write into {output_uri}: it holds the results of another run ({what}); this run is "
                f"{ident['run_id']!r}. Runs are never mixed: choose another --output, or pass --overwrite to "
                f"delete the old results.")
        for d in (out.records, out.rejects_dir):
            storage.delete_dir(d)
        for name in out.result_files():  # of a finished run, deleted with its shards
            storage.delete(storage.join(output_uri, name))
    if not same:
        storage.write_json(run_uri, {**ident, "created": _now()}, indent=2)
    return same


def iter_shard_lines(prefix: str) -> Iterator[dict]:
    """Every JSON object in the shards under ``prefix`` (shard order, then line order); unreadable lines skipped
    (shards are written atomically; this is only defence against foreign files)."""
    if not storage.exists(prefix):
        return
    for uri in storage.list_files(prefix, suffixes=(".jsonl",)):
        try:
            chunks = list(storage.read_chunks(uri))
        except FileNotFoundError:
            continue
        for _, line in storage.iter_lines(chunks):
            try:
                obj = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(obj, dict):
                yield obj


def done_uids(output_uri: str) -> set[str]:
    """uids finished by earlier runs: every record, and every reject that is not retryable."""
    out = InferenceLayout(output_uri)
    done = {r[META]["uid"] for r in iter_shard_lines(out.records) if META in r}
    done |= {r["uid"] for r in iter_shard_lines(out.rejects_dir)
             if "uid" in r and not r.get("retryable")}
    return done


@dataclass
class Assembly:
    conversations: int  # written to the predictions file
    has_gold: bool  # every predicted conversation carried gold labels: gold.json was written
    rejects: list[dict]
    utterances: int
    parse_status: dict[str, dict[str, int]]
    dropped: dict[str, int]
    duplicates_in_shards: int


def assemble(output_uri: str) -> Assembly:
    """Read the shards back and write ``Subtask_2_pred.json``: one record per uid (the first copy; a retried batch
    may have written another), one per conversation id (the first in input order; later ones become rejects), sorted
    by conversation id; and, when every predicted conversation carried gold labels, ``gold.json`` with them in the
    same order (what ``mecpe evaluate`` scores against).

    Streams: records are spilled to a local temp file while a few small fields per conversation are indexed in
    memory, then written out in order one at a time, so the driver's memory does not grow with the corpus' text.
    Gold conversations are kept in memory (labelled sets are evaluation sets: small)."""
    index: dict[str, tuple] = {}  # uid -> (file_index, position, conversation_ID, source, location, offset, length)
    copies = 0
    out = InferenceLayout(output_uri)
    with tempfile.TemporaryFile(prefix="mecpe-assemble-") as spill:
        for rec in iter_shard_lines(out.records):
            meta = rec.get(META) or {}
            key = meta.get("uid")
            if key is None:
                continue
            if key in index:
                copies += 1
                continue
            line = json.dumps(rec, ensure_ascii=False).encode("utf-8")
            index[key] = (meta["file_index"], meta["position"], rec["conversation_ID"], meta["source"],
                          meta["location"], spill.tell(), len(line))
            spill.write(line)
        rejects: dict[str, dict] = {}
        for rej in iter_shard_lines(out.rejects_dir):
            key = rej.get("uid")
            if key is None or key in index or key in rejects:
                copies += key in rejects
                continue
            rejects[key] = rej
        winners: dict[tuple, tuple] = {}
        for key, e in sorted(index.items(), key=lambda kv: (kv[1][0], kv[1][1])):
            order = data.id_order(e[2])
            first = winners.get(order)
            if first is None:
                winners[order] = (key, e)
                continue
            fe = first[1]
            rejects[key] = {
                **data.Reject(e[3], e[4], str(e[2]), f"duplicate conversation_ID {e[2]!r}: kept the one in {fe[3]} at "
                              f"{fe[4]}", "conversation_ID", stage="assemble").to_json(),
                "uid": key, "key": storage.safe_key(e[2]), "file_index": e[0], "position": e[1]}
        index.clear()
        status: dict[str, Counter] = {s: Counter() for s in STAGES}
        dropped: Counter = Counter()
        count = {"utterances": 0}
        golds: list[dict] | None = []

        def ordered_records() -> Iterator[dict]:
            nonlocal golds
            for order in sorted(winners):
                _, e = winners[order]
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
                    utts = [{**{k: v for k, v in u.items()
                                if k not in ("parse_status", "dropped_utterances", "label_scores")},
                             "emotion": g["emotions"].get(str(u["utterance_ID"]))} for u in rec["conversation"]]
                    golds.append({"conversation_ID": rec["conversation_ID"], "conversation": utts,
                                  "emotion-cause_pairs": g["emotion-cause_pairs"]})
                yield rec

        written = data.write_sorted_predictions(ordered_records(), out.pred)
    has_gold = bool(written) and golds is not None
    if has_gold:
        storage.write_json(out.gold, golds, indent=4)
    else:
        storage.delete(out.gold)
    reject_list = sorted(rejects.values(), key=lambda r: (r.get("file_index", -1), r.get("position", -1)))
    return Assembly(written, has_gold, reject_list, count["utterances"],
                    {s: dict(c) for s, c in status.items()}, dict(dropped), copies)
