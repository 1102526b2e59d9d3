"""Training examples: pre-tokenized prompt + answer with the loss on the answer only, and token-budget batches.

Examples are pre-tokenized here from ``mecpe.prompts`` pieces (this module never builds prompt text) with labels = -100
on the prompt, so the loss is on the answer and its EOS only (the reference trained on the prompt too and masked EOS
out). Nothing is truncated: an example still longer than ``prompt.max_prompt_tokens + prompt.max_answer_tokens``
after the prompt builder's shortening is trained as is and reported (count and ids).

Which emotions the cause model sees (``training.cause_emotions``): ``gold`` (the method); ``noised`` (each
utterance's label replaced by a random other label with probability ``training.cause_noise_rate``, seeded per
conversation); ``predicted`` (an emotion model's predictions). Cause examples are the utterances whose *shown*
emotion is not neutral (what inference asks about), each with its gold causes as target (``[]`` for an utterance
that is neutral in gold).
"""

from __future__ import annotations

import logging
import os
import random
from typing import Any, Mapping, Sequence

from mecpe import storage
from mecpe.data import EMOTIONS, read_conversations

TASKS = ("emotion", "cause")
_MAX_LISTED = 50  # over-budget example ids kept in the stats

log = logging.getLogger(__name__)


def shown_emotions(conv: Any, mode: str = "gold", *, noise_rate: float = 0.2, seed: int = 42,
                   predicted: Mapping[str, Mapping[int, str]] | None = None) -> dict[int, str]:
    """The emotion labels the cause model reads for one conversation (see the module docstring)."""
    gold = {u.id: u.emotion for u in conv.utterances}
    if mode == "gold":
        return gold
    if mode == "noised":
        rng = random.Random(f"{seed}:{conv.id}")  # str seeds are hashed with sha512: stable across processes
        return {uid: (rng.choice([x for x in EMOTIONS if x != lab]) if rng.random() < noise_rate else lab)
                for uid, lab in gold.items()}
    if mode == "predicted":
        pred = (predicted or {}).get(str(conv.id))
        missing = [uid for uid in gold if not pred or pred.get(uid) not in EMOTIONS]
        if missing:
            raise ValueError(f"conversation {conv.id}: no predicted emotion for utterances {missing[:10]}")
        return {uid: pred[uid] for uid in gold}
    raise ValueError(f"unknown cause_emotions mode {mode!r}")


def normalize_predictions(obj: Any) -> dict[str, dict[int, str]]:
    """``{conversation_id: {utterance_id: label}}`` from that mapping (str or int keys), or from a list of
    prediction records in the official format (``Subtask_2_pred.json``), or from a JSON file (local or s3://)."""
    if isinstance(obj, (str, os.PathLike)):
        obj = storage.read_json(str(obj))
    if isinstance(obj, list):
        obj = {rec["conversation_ID"]: {u["utterance_ID"]: u.get("emotion") for u in rec["conversation"]}
               for rec in obj}
    if not isinstance(obj, Mapping):
        raise TypeError(f"predicted emotions: expected a mapping or a list of records, got {type(obj).__name__}")
    return {str(cid): {int(uid): lab for uid, lab in utts.items()} for cid, utts in obj.items()}


def build_examples(task: str, convs: Sequence[Any], builder: Any, *, max_answer_tokens: int = 64,
                   emotions_of: Any = None) -> tuple[list[dict], dict]:
    """Pre-tokenized examples (``input_ids``, ``labels`` = -100 on the prompt, ``length``, ids) and their stats.

    ``builder`` is a ``mecpe.prompts.PromptBuilder``; ``emotions_of(conv) -> {utt: label}`` gives the emotions
    the cause model reads (default: gold). Over-budget examples are kept (never cut) and listed in the stats."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    budget = builder.max_prompt_tokens + max_answer_tokens
    rows: list[dict] = []
    shortened = dropped = 0
    over: list[str] = []
    for conv in convs:
        if task == "emotion":
            items = [(u.id, builder.emotion_prompt(conv, u.id), builder.emotion_answer(u.id, u.emotion))
                     for u in conv.utterances]
        else:
            shown = emotions_of(conv) if emotions_of else {u.id: u.emotion for u in conv.utterances}
            items = [(u.id, builder.cause_prompt(conv, u.id, shown), builder.cause_answer(conv.causes_of(u.id)))
                     for u in conv.utterances if shown[u.id] != "neutral"]
        for uid, prompt, answer in items:
            ids = prompt.ids + answer
            rows.append({"input_ids": ids, "labels": [-100] * len(prompt) + list(answer), "length": len(ids),
                         "conv_id": str(conv.id), "utt_id": int(uid)})
            if prompt.dropped_utterances:
                shortened += 1
                dropped += prompt.dropped_utterances
            if len(ids) > budget:
                over.append(f"{conv.id}:{uid}")
    lengths = [r["length"] for r in rows]
    stats = {"examples": len(rows), "conversations": len(convs), "shortened_prompts": shortened,
             "dropped_utterances": dropped, "over_budget": len(over), "over_budget_ids": over[:_MAX_LISTED],
             "token_budget": budget, "max_length": max(lengths, default=0),
             "mean_length": round(sum(lengths) / len(lengths), 1) if lengths else 0.0}
    return rows, stats


def read_split(uri: str | None, limit: int | None) -> list:
    """Conversations of a split (the first ``limit``). An unreadable file is an error; invalid conversations are
    skipped with a count (a prepared split has none: ``prepare`` already set them aside)."""
    if not uri:
        return []
    res = read_conversations(uri, require_labels=True)
    if res.file_errors:
        raise ValueError(f"{uri}: unreadable: {'; '.join(str(e) for e in res.file_errors[:3])}")
    if res.rejects:
        log.warning("%s: %d invalid conversations skipped, e.g. %s: %s", uri, len(res.rejects),
                    res.rejects[0].location, res.rejects[0].reason)
    return res.conversations[:limit] if limit is not None else res.conversations


class TokenBudgetBatchSampler:
    """Micro-batches under a token budget: examples sorted by length are cut into runs whose padded size
    (count x longest) stays within ``max_tokens``; the runs are shuffled (seed + epoch). Short examples come many
    to a batch and long ones few, so every step does about the same work at almost no padding, and a 4-bit base
    dequantizes its weights once per ``max_tokens`` tokens instead of once per fixed example count.

    Deterministic for a seed, so a resumed run skips exactly the batches it already trained on."""

    def __init__(self, lengths: Sequence[int], max_tokens: int, seed: int = 0):
        if max_tokens < 1:
            raise ValueError(f"training.max_batch_tokens must be positive, got {max_tokens}")
        self.batches: list[list[int]] = []
        batch: list[int] = []
        for i in sorted(range(len(lengths)), key=lambda k: (lengths[k], k)):
            # ascending order: the newest example is the longest, so the padded size is count x its length
            if batch and (len(batch) + 1) * lengths[i] > max_tokens:
                self.batches.append(batch)
                batch = []
            batch.append(i)  # an example longer than the budget alone is a batch of one (reported, never cut)
        if batch:
            self.batches.append(batch)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        order = list(range(len(self.batches)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return (self.batches[k] for k in order)
