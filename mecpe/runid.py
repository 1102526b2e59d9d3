"""Run identity: a run is named by a hash of everything that shapes its result.

A re-run with the same inputs and settings finds the same run (a training run resumes from its checkpoints or returns
its finished adapter; an inference output folder resumes from its shards), and a run with anything different gets a
new name (training) or is refused (an inference output holding another run). Input files count by content (sha256),
so the same data in another place is the same training run.
"""

from __future__ import annotations

from typing import Any, Iterable

from mecpe import storage
from mecpe.config import ModelConfig, config_hash


def file_digests(uris: Iterable[str]) -> dict[str, str]:
    """sha256 of every .json/.jsonl file under each URI (file, folder or prefix), by file URI, in listing order."""
    return {f: storage.sha256(f) for uri in uris for f in storage.list_files(uri)}


def model_part(model: ModelConfig) -> dict[str, Any]:
    """The model settings that shape outputs (not where the weights are cached), a GGUF's content hash, and the tiny
    model's recipe when it is built here."""
    from mecpe.sources import weights_identity

    part = {k: getattr(model, k) for k in ("base", "revision", "trust_remote_code", "attn_implementation")}
    part.update(weights_identity(model.base))  # a GGUF's content hash
    if model.build_tiny_if_missing:
        part["tiny"] = model.tiny.model_dump()
    return part


def run_id(parts: dict[str, Any], length: int = 10) -> str:
    return config_hash(parts, length=length)
