"""Training examples: pre-tokenized prompt + answer with the loss on the answer only, packed rows that compute each
conversation's prefix once (``training.reuse_prefix``), and token-budget batches.

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
from collections import Counter
from typing import Any, Mapping, Sequence

from mecpe import storage
from mecpe.readers import read_conversations
from mecpe.errors import ConfigError, InputError
from mecpe.labels import EMOTIONS

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
            raise InputError(f"conversation {conv.id}: no predicted emotion for utterances {missing[:10]}")
        return {uid: pred[uid] for uid in gold}
    raise ConfigError(f"unknown cause_emotions mode {mode!r}")


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


def _targets(task: str, conv: Any, builder: Any, emotions_of: Any,
             repeats: Mapping[str, int] | None = None) -> list[tuple[int, Any, list[int]]]:
    """(utterance id, prompt ``PromptIds``, answer ids ending with EOS) of every training target of ``conv``; an
    emotion target ``repeats[label]`` times in a row (a repeated answer block in a packed row: the same as
    weighting its loss)."""
    if task == "emotion":
        return [target for u in conv.utterances
                for target in [(u.id, builder.emotion_prompt(conv, u.id), builder.emotion_answer(u.id, u.emotion))]
                * (repeats.get(u.emotion, 1) if repeats else 1)]
    shown = emotions_of(conv) if emotions_of else {u.id: u.emotion for u in conv.utterances}
    return [(u.id, builder.cause_prompt(conv, u.id, shown), builder.cause_answer(conv.causes_of(u.id)))
            for u in conv.utterances if shown[u.id] != "neutral"]


def _stats(convs: Sequence[Any], targets: list[tuple[Any, int, Any, list[int]]], budget: int) -> dict:
    """Counts over every target (``(conv, utt, prompt, answer)``): examples, shortened prompts, over-budget ones."""
    lengths = [len(p) + len(a) for _, _, p, a in targets]
    over = [f"{c.id}:{u}" for (c, u, _, _), n in zip(targets, lengths) if n > budget]
    return {"examples": len(targets), "conversations": len(convs),
            "shortened_prompts": sum(1 for _, _, p, _ in targets if p.dropped_utterances),
            "dropped_utterances": sum(p.dropped_utterances for _, _, p, _ in targets),
            "over_budget": len(over), "over_budget_ids": over[:_MAX_LISTED], "token_budget": budget,
            "max_length": max(lengths, default=0),
            "mean_length": round(sum(lengths) / len(lengths), 1) if lengths else 0.0,
            "example_tokens": sum(lengths)}


def emotion_repeats(convs: Sequence[Any], balance: float) -> dict[str, int]:
    """How many times each emotion's training targets are trained (``training.emotion_balance``): round((n_max /
    n_label) ** balance), at least once, n counted over ``convs``' utterances (labels absent from them: once)."""
    counts = Counter(u.emotion for conv in convs for u in conv.utterances)
    top = max(counts.values(), default=0)
    return {label: max(1, round((top / counts[label]) ** balance)) if counts[label] else 1 for label in EMOTIONS}


def _all_targets(task: str, convs: Sequence[Any], builder: Any, emotions_of: Any,
                 repeats: Mapping[str, int] | None = None):
    if task not in TASKS:
        raise ConfigError(f"task must be one of {TASKS}, got {task!r}")
    return [(conv, uid, prompt, answer) for conv in convs
            for uid, prompt, answer in _targets(task, conv, builder, emotions_of, repeats)]


def build_examples(task: str, convs: Sequence[Any], builder: Any, *, max_answer_tokens: int = 64,
                   emotions_of: Any = None, repeats: Mapping[str, int] | None = None) -> tuple[list[dict], dict]:
    """One pre-tokenized example per target (``input_ids``, ``labels`` = -100 on the prompt, ``length``, ids) and
    their stats.

    ``builder`` is a ``mecpe.prompts.PromptBuilder``; ``emotions_of(conv) -> {utt: label}`` gives the emotions
    the cause model reads (default: gold); ``repeats``: ``emotion_repeats``. Over-budget examples are kept (never
    cut) and listed in the stats."""
    targets = _all_targets(task, convs, builder, emotions_of, repeats)
    rows = [{"input_ids": p.ids + list(a), "labels": [-100] * len(p) + list(a), "length": len(p) + len(a),
             "conv_id": str(conv.id), "utt_id": int(uid)} for conv, uid, p, a in targets]
    stats = _stats(convs, targets, builder.max_prompt_tokens + max_answer_tokens)
    stats["computed_tokens"] = stats["example_tokens"]
    return rows, stats


ROW_TOKENS = 2048  # a packed row holds one prefix and as many of its targets as fit (more only for one long target)


def build_packed_rows(task: str, convs: Sequence[Any], builder: Any, *, max_answer_tokens: int = 64,
                      emotions_of: Any = None, row_tokens: int = ROW_TOKENS,
                      repeats: Mapping[str, int] | None = None) -> tuple[list[dict], dict]:
    """The same examples as ``build_examples``, with each conversation's prompt prefix (chat head + conversation,
    identical for all its targets) computed once: a row is ``prefix, question_1 answer_1, question_2 answer_2, ...``.

    ``block_ids`` says who owns each column (-1 the prefix, k the k-th target) and ``position_ids`` put every token
    where it is in its own full prompt, so ``PackedCollator``'s mask (a target sees the prefix and itself) gives every
    answer token the logits of its own example: the same loss and gradients as one row per example, at a fraction
    of the tokens (a conversation of 10 utterances: ~750 tokens instead of ~4,000). Prompts shortened to fit the
    budget have a prefix of their own and start their own row."""
    targets = _all_targets(task, convs, builder, emotions_of, repeats)
    rows: list[dict] = []

    def flush(conv, prefix, blocks) -> None:
        ids, labels, pos, owner = list(prefix), [-100] * len(prefix), list(range(len(prefix))), [-1] * len(prefix)
        for k, (uid, question, answer) in enumerate(blocks):
            block = question + answer
            ids += block
            labels += [-100] * len(question) + answer
            pos += range(len(prefix), len(prefix) + len(block))
            owner += [k] * len(block)
        rows.append({"input_ids": ids, "labels": labels, "position_ids": pos, "block_ids": owner,
                     "length": len(ids), "conv_id": str(conv.id), "utt_ids": [b[0] for b in blocks],
                     "example_tokens": sum(len(prefix) + len(q) + len(a) for _, q, a in blocks)})

    groups: dict[tuple[str, tuple[int, ...]], tuple[Any, list]] = {}
    for conv, uid, p, a in targets:  # insertion order: conversation order, then first target of each prefix
        groups.setdefault((str(conv.id), tuple(p.prefix)), (conv, []))[1].append((uid, list(p.question), list(a)))
    for (_, prefix), (conv, blocks) in groups.items():
        cur: list = []
        width = len(prefix)
        for b in blocks:
            n = len(b[1]) + len(b[2])
            if cur and width + n > row_tokens:
                flush(conv, prefix, cur)
                cur, width = [], len(prefix)
            cur.append(b)
            width += n
        flush(conv, prefix, cur)
    stats = _stats(convs, targets, builder.max_prompt_tokens + max_answer_tokens)
    stats.update(rows=len(rows), computed_tokens=sum(r["length"] for r in rows))
    return rows, stats


class PackedCollator:
    """Pads packed rows (``build_packed_rows``) on the right and builds their attention mask: a column sees the
    columns before it that are its row's prefix or its own target block; padding sees only itself (no empty softmax
    row). The mask is 4D (rows, 1, columns, columns), boolean for SDPA and additive for eager attention, the form
    transformers uses as given; one tensor for every layer, since trl counts tokens by summing it (a model with
    sliding-window layers gets its per-layer masks from ``window_packed_masks``). Counts the tokens an unshared run
    would have fed (``example_tokens``) for the throughput log."""

    def __init__(self, pad_token_id: int, attn_implementation: str = "sdpa"):
        if attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"packed rows need attn_implementation 'sdpa' or 'eager' (arbitrary 4D masks), not "
                             f"{attn_implementation!r}: set training.reuse_prefix=false or model.attn_implementation")
        self.pad, self.attn = pad_token_id, attn_implementation
        self.example_tokens = 0

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        from mecpe.engine.runtime import mask_form

        width = max(len(r["input_ids"]) for r in rows)

        def padded(key: str, value: int) -> "torch.Tensor":
            return torch.tensor([list(r[key]) + [value] * (width - len(r[key])) for r in rows], dtype=torch.long)

        owner = padded("block_ids", -2)
        causal = torch.ones((width, width), dtype=torch.bool).tril()
        ok, oq = owner[:, None, :], owner[:, :, None]
        allowed = causal & (ok != -2) & ((ok == -1) | (ok == oq))
        allowed |= torch.eye(width, dtype=torch.bool)
        self.example_tokens += sum(int(r["example_tokens"]) for r in rows)
        return {"input_ids": padded("input_ids", self.pad), "labels": padded("labels", -100),
                "position_ids": padded("position_ids", 0), "attention_mask": mask_form(allowed[:, None], self.attn)}


def window_packed_masks(model: Any) -> Any:
    """Packed rows on a model with sliding-window layers (Gemma-2/3, Mistral, Qwen2 with a window): transformers
    would apply ``PackedCollator``'s one mask to every layer, so sliding layers would see past their window. A
    forward pre-hook on the decoder (which trl's fused head and PEFT both call) hands it per-layer-type masks instead,
    windowed by ``position_ids`` (``mecpe.engine.runtime.attention_mask``); the batch keeps its tensor, which trl
    sums to count tokens. Returns the hook's handle, or None where no layer slides."""
    import torch

    from mecpe.engine.runtime import attention_mask, sliding_window

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if sliding_window(base.config) is None:
        return None

    def per_layer(module, args, kwargs):
        mask, pos = kwargs.get("attention_mask"), kwargs.get("position_ids")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[-2] != mask.shape[-1]:
            return None  # not a packed batch (a 2D padding mask: transformers windows it itself)
        if pos is None:
            raise ValueError("packed rows on a sliding-window model need position_ids (the window is by position)")
        allowed = mask if mask.dtype == torch.bool else mask == 0
        return args, {**kwargs, "attention_mask": attention_mask(module, allowed, pos, pos)}

    return base.get_decoder().register_forward_pre_hook(per_layer, with_kwargs=True)


def read_split(uri: str | None, limit: int | None) -> list:
    """Conversations of a split (the first ``limit``). An unreadable file is an error; invalid conversations are
    skipped with a count (a prepared split has none: ``prepare`` already set them aside)."""
    if not uri:
        return []
    res = read_conversations(uri, require_labels=True)
    if res.file_errors:
        raise InputError(f"{uri}: unreadable: {'; '.join(str(e) for e in res.file_errors[:3])}")
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
            raise ConfigError(f"training.max_batch_tokens must be positive, got {max_tokens}")
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
