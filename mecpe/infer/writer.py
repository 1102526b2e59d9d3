"""The last inference stage: one atomic shard per batch, ``records/part-<uuid>.jsonl`` (+ ``rejects/part-<uuid>.jsonl``),
and one small row of counts and timings per shard, which the driver consumes as they come.

Shards are written by our own stage rather than ``Dataset.write_json``: each shard must be atomic (it is the
completion marker for resume), and the driver needs a per-batch signal (counts, timings) while the run streams.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import pyarrow as pa

from mecpe import data, storage
from mecpe.infer.resume import META
from mecpe.labels import EMOTIONS, RuleCause, rule_causes
from mecpe.infer.rows import SHARD_SCHEMA, conversation_of, merge_engine, reject_of, rows_table
from mecpe.layout import InferenceLayout


def build_record(row: dict, rules: Sequence[RuleCause] = ()) -> dict:
    """Output record of a predicted row: the conversation in input schema with predicted ``emotion`` per
    utterance, official ``emotion-cause_pairs``, per-utterance ``parse_status`` / ``dropped_utterances`` (and
    ``label_scores``, each label's answer log-probability, with the score method), and
    bookkeeping under ``_mecpe`` (uid, key, source, location, order, gold labels when present).
    ``rules`` (``inference.rule_causes``): causes added to the model's answer of each emotional utterance; the
    model's own answer stays in the utterance's ``model_causes``."""
    conv = conversation_of(row)
    emo = {e["utterance"]: e for e in row["emotions"]}
    cau = {c["utterance"]: c for c in row["causes"] or []}
    labels = {u: (e["label"] if e["label"] in EMOTIONS else "neutral") for u, e in emo.items()}
    added = rule_causes([u.id for u in conv.utterances], rules) if rules else {}
    causes = {u: list(dict.fromkeys([*c["causes"], *added.get(u, ())])) for u, c in cau.items()}
    # The pair's emotion is the one the cause stage read: the predicted label, or the gold one with cause_input=gold.
    pairs = [data.Pair(u, cau[u]["emotion"], c) for u in sorted(cau) if cau[u]["emotion"] in EMOTIONS[1:]
             for c in causes[u]]
    rec = data.conversation_to_json(conv, emotions=labels, pairs=pairs)
    for utt in rec["conversation"]:
        u = int(utt["utterance_ID"])
        if u in emo and emo[u]["scores"] is not None:  # what mecpe.calibrate fits a bias on
            utt["label_scores"] = emo[u]["scores"]
        if rules and u in cau:
            utt["model_causes"] = list(cau[u]["causes"])
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

    def __init__(self, output_uri: str, storage_settings: dict, rules: Sequence[RuleCause] = ()):
        storage.configure(storage_settings)
        self.out = InferenceLayout(output_uri)
        self.rules = tuple(rules)  # inference.rule_causes

    def __call__(self, batch: pa.Table) -> pa.Table:
        if batch.num_rows == 0:
            return rows_table([], SHARD_SCHEMA)
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
                rec = build_record(row, self.rules)
            except Exception as exc:  # noqa: BLE001 - never lose a conversation to a bookkeeping bug
                row["reject"] = reject_of(row, "write", f"cannot build record: {type(exc).__name__}: {exc}",
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
        return rows_table([{"records": len(records), "rejects": len(rejects), "emotion_utterances": emo_u,
                             "cause_utterances": cau_u, "emotion_s": emo_s, "cause_s": cau_s,
                             "gpu_peak_gib": gpu, "engine": engine or None}], SHARD_SCHEMA)
