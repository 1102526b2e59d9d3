"""Splits and the prepare step: the seeded train/val split (or the reference system's), the counts of each split, and
``prepare``, which validates, splits and writes a data folder with its manifest."""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np

from mecpe import storage
from mecpe.data import Conversation, conversation_to_json, id_order
from mecpe.errors import ConfigError, InputError
from mecpe.labels import EMOTIONS
from mecpe.layout import REJECTS_FILE, DataLayout
from mecpe.readers import read_conversations

def _sklearn_split(items: list, test_size: float, seed: int) -> tuple[list, list]:
    """scikit-learn's ``train_test_split(items, test_size=..., random_state=seed)`` (ShuffleSplit), no sklearn."""
    n = len(items)
    n_test = math.ceil(test_size * n)
    perm = np.random.RandomState(seed).permutation(n)
    return [items[i] for i in perm[n_test:]], [items[i] for i in perm[:n_test]]


def split_train_val(convs: Sequence[Conversation], *, val_fraction: float = 0.1, seed: int = 42,
                    method: str = "random") -> dict[str, list[Conversation]]:
    """Split by conversation.

    random: sort by id, ``numpy.random.default_rng(seed).permutation``, first ceil(fraction·n) are val
    (at least one conversation stays in train); both splits sorted by id.
    reference: the reference system's split, scikit-learn ``train_test_split(test_size=0.1, random_state=42)``
    twice in file order: first test part -> "reference_test", test part of the rest -> "val"; lists keep
    sklearn's permutation order.
    """
    convs = list(convs)
    if method == "reference":
        rest, ref_test = _sklearn_split(convs, val_fraction, seed)
        train, val = _sklearn_split(rest, val_fraction, seed)
        return {"train": train, "val": val, "reference_test": ref_test}
    if method != "random":
        raise ConfigError(f"unknown split method {method!r} (random | reference)")
    ordered = sorted(convs, key=lambda c: id_order(c.id))
    n = len(ordered)
    n_val = min(math.ceil(val_fraction * n - 1e-9), max(n - 1, 0))
    val_idx = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    return {"train": [c for i, c in enumerate(ordered) if i not in val_idx],
            "val": [c for i, c in enumerate(ordered) if i in val_idx]}


# --------------------------------------------------------------------------- counts + prepare


def counts(convs: Iterable[Conversation]) -> dict:
    out = {"conversations": 0, "utterances": 0, "pairs": 0, "emotions": dict.fromkeys(EMOTIONS, 0)}
    for c in convs:
        out["conversations"] += 1
        out["utterances"] += len(c.utterances)
        out["pairs"] += len(c.pairs or ())
        for u in c.utterances:
            if u.emotion is not None:
                out["emotions"][u.emotion] += 1
    return out


def counts_table(by_split: dict[str, dict]) -> str:
    """Text table of ``counts`` per split: conversations, utterances, pairs and utterances per emotion."""
    names = list(by_split)
    rows = [(key, [by_split[s][key] for s in names]) for key in ("conversations", "utterances", "pairs")]
    rows += [(e, [by_split[s]["emotions"][e] for s in names]) for e in EMOTIONS]
    width = max(8, *(len(s) for s in names))
    lines = [f"{'':<14}" + "".join(f"{s:>{width + 1}}" for s in names)]
    lines += [f"{key:<14}" + "".join(f"{v:>{width + 1}}" for v in values) for key, values in rows]
    return "\n".join(lines)


def _dump(convs: Iterable[Conversation]) -> bytes:
    return storage.dumps_json([conversation_to_json(c) for c in convs], indent=4)


@dataclass(frozen=True)
class PrepareResult:
    """A prepared data folder: the counts of each split written (``splits``), the conversations and files set
    aside, and how many of those were training files (which fail the step)."""

    output: str
    splits: dict[str, dict]  # train, val (reference_test), (test) -> counts
    rejects: int
    file_errors: list[str]
    train_file_errors: int

    @property
    def rejects_file(self) -> str:
        return DataLayout(self.output).rejects

    def counts_json(self) -> dict:
        """The manifest's ``counts``: each split's, then what was set aside."""
        out = dict(self.splits)
        out.update({k: v for k, v in asdict(self).items() if k not in ("output", "splits")})
        return out


def prepare(train_uri: str | Sequence[str], test_uri: str | Sequence[str] | None, out_dir: str, *,
            split: str = "random", val_fraction: float = 0.1, seed: int = 42) -> PrepareResult:
    """Validate, split, write ``train/val/test.json`` (+ ``reference_test.json``), ``rejects.jsonl``, ``manifest.json``.

    Everything is rewritten on every run (no skipping on existence) and outputs a run does not produce are
    deleted, so stale files from other inputs or settings never survive; same inputs give identical bytes.
    ``manifest.json`` (inputs' sha256, settings, outputs' sha256, counts) is written last. Raises ``InputError``
    when no training conversation survives.
    """
    train = read_conversations(train_uri, require_labels=True)
    if not train.conversations:
        raise InputError(f"no valid training conversation in {train_uri} "
                         f"({len(train.rejects)} rejects, {len(train.file_errors)} file errors: "
                         f"{'; '.join(map(str, train.file_errors[:3]))})")
    test = read_conversations(test_uri, require_labels=True) if test_uri else None
    splits = split_train_val(train.conversations, val_fraction=val_fraction, seed=seed, method=split)
    if test is not None:
        splits["test"] = test.conversations

    outputs = {DataLayout.split_file(name): _dump(convs) for name, convs in splits.items()}
    problems = [{"input": role, **r.to_json()} for role, res in (("train", train), ("test", test)) if res
                for r in [*(e.as_reject() for e in res.file_errors), *res.rejects]]
    outputs[REJECTS_FILE] = storage.dumps_jsonl(problems)
    for name in map(DataLayout.split_file, ("test", "reference_test")):
        if name not in outputs:
            storage.delete(storage.join(out_dir, name))
    for name, blob in outputs.items():
        storage.write_bytes(storage.join(out_dir, name), blob)

    result = PrepareResult(out_dir, {name: counts(convs) for name, convs in splits.items()}, len(problems),
                           [str(e) for r in (train, test) if r for e in r.file_errors], len(train.file_errors))
    storage.write_json(DataLayout(out_dir).manifest, {
        "inputs": {"train": train.sources, "test": test.sources if test else {}},
        "settings": {"split": split, "val_fraction": val_fraction, "seed": seed},
        "outputs": {name: hashlib.sha256(blob).hexdigest() for name, blob in outputs.items()},
        "counts": result.counts_json(),
    }, indent=2)
    return result


