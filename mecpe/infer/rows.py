"""The rows that flow between the inference stages: their Arrow schemas and the conversions to and from them.

Rows carry parsed, typed columns, so a stage reads what the one before it validated without parsing it again.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa

from mecpe import data

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


def rows_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


def reject_of(row: dict, stage: str, reason: str, field: str | None = None, *, retryable: bool = False) -> dict:
    return data.Reject(row["source"], row["location"], row.get("conversation_id"), reason, field,
                       stage=stage, retryable=retryable).to_json()


def id_text(value: Any) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:200]
