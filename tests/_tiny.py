"""Shared helpers for tests: the ECF data location, conversations, and a cached tiny model.

The tiny model is built once and kept under ``<repo>/.cache/tiny-model/<key>``, the key hashing the builder's
sources and the training file, so later test runs reuse it and a change to the builder rebuilds it."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("MECPE_DATA", REPO.parent / "shared" / "data" / "ecf"))
TRAIN_FILE = DATA_DIR / "reconstructed" / "Subtask_2_train.json"


@functools.lru_cache(maxsize=None)
def tiny_model_dir(seed: int = 0) -> str:
    from mecpe.tiny import build_tiny_model

    h = hashlib.sha256()
    for src in (REPO / "mecpe" / "tiny.py", REPO / "mecpe" / "modeling.py", REPO / "mecpe" / "prompts.py"):
        h.update(src.read_bytes())
    st = TRAIN_FILE.stat()
    h.update(f"{TRAIN_FILE}|{st.st_size}|{st.st_mtime_ns}|{seed}".encode())
    out = REPO / ".cache" / "tiny-model" / h.hexdigest()[:16]
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return str(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build_tiny_model(str(tmp), [str(TRAIN_FILE)], seed=seed)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


@dataclass(frozen=True)
class _Utt:
    id: int
    text: str
    speaker: str
    emotion: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class _Conv:
    id: int | str
    utterances: tuple
    pairs: tuple | None = None
    source: str = ""


def make_conversation(obj: dict, source: str = "test"):
    """A ``mecpe.data.Conversation`` when data.py is there, else a stand-in with the same attributes."""
    try:
        from mecpe.data import conversation_from_json
    except ImportError:
        utts = tuple(_Utt(int(u["utterance_ID"]), u["text"], u["speaker"], u.get("emotion"))
                     for u in obj["conversation"])
        return _Conv(obj["conversation_ID"], utts, None, source)
    return conversation_from_json(obj, source=source)


@functools.lru_cache(maxsize=None)
def train_records() -> tuple:
    return tuple(json.loads(TRAIN_FILE.read_text(encoding="utf-8")))


def conversations(n: int | None = None) -> list:
    recs = train_records()
    return [make_conversation(r, str(TRAIN_FILE)) for r in (recs if n is None else recs[:n])]
