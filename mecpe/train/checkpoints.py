"""Checkpoint bookkeeping, in one place: manifests that tell a complete checkpoint from a truncated one, the scan of
a run's stored checkpoints, and the choice of the one to resume from.

``RayTrainReportCallback`` stores each Hugging Face checkpoint folder (adapter, optimizer, scheduler, RNG states,
``trainer_state.json``) as the ``checkpoint/`` sub-folder of a Ray checkpoint. Every such folder carries
``mecpe_checkpoint_rank<r>.json`` (size and sha256 of each file, written by each rank before Ray Train uploads the
folder). A resuming worker verifies the candidates against them: a truncated or partly uploaded folder is passed
over, and a complete folder newer than Ray Train's latest registered checkpoint (a worker killed after uploading it,
before the controller took the report) is used. Stored checkpoints are found by their manifests, not by how Ray
names its folders.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

from mecpe import storage

MANIFEST = "mecpe_checkpoint_rank{rank}.json"
HF_CHECKPOINT = "checkpoint"  # RayTrainReportCallback.CHECKPOINT_NAME: the HF folder inside a Ray checkpoint

log = logging.getLogger(__name__)


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: str, rank: int, step: int, world_size: int = 1) -> str:
    """Size and sha256 of every file in a local HF checkpoint folder (other ranks' manifests excluded)."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, folder).replace(os.sep, "/")
            if rel.startswith("mecpe_checkpoint_rank"):
                continue
            files[rel] = {"size": os.path.getsize(full), "sha256": _file_digest(full)}
    path = os.path.join(folder, MANIFEST.format(rank=rank))
    with open(path, "w", encoding="utf-8") as fh:
        json.dump({"step": step, "rank": rank, "world_size": world_size, "files": files}, fh, indent=1)
    return path


def verify_checkpoint(folder: str) -> str | None:
    """None when the local HF checkpoint folder is complete, else why not: the manifest of every rank (rank 0's
    gives the world size) must be there and every file it lists must have its size and sha256 (a truncated or partly
    copied folder fails)."""
    manifests = sorted(n for n in (os.listdir(folder) if os.path.isdir(folder) else [])
                       if n.startswith("mecpe_checkpoint_rank") and n.endswith(".json"))
    if MANIFEST.format(rank=0) not in manifests:
        return f"no {MANIFEST.format(rank=0)} (incomplete or not written by mecpe)"
    for name in manifests:
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as fh:
                manifest = json.load(fh)
            listed = manifest["files"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"{name} unreadable: {type(exc).__name__}: {exc}"
        if manifest.get("rank") == 0:
            absent = [r for r in range(int(manifest.get("world_size") or 1))
                      if MANIFEST.format(rank=r) not in manifests]
            if absent:
                return f"no manifest of rank(s) {absent} (a rank's upload is missing)"
        for rel, want in listed.items():
            path = os.path.join(folder, rel)
            if not os.path.isfile(path):
                return f"{rel} missing"
            size = os.path.getsize(path)
            if size != want["size"]:
                return f"{rel} has {size} bytes, expected {want['size']} (truncated)"
            if _file_digest(path) != want["sha256"]:
                return f"{rel} sha256 differs from {name}"
    if not os.path.exists(os.path.join(folder, "trainer_state.json")):
        return "no trainer_state.json"
    return None


def stored_checkpoints(run_uri: str) -> list[tuple[int, str]]:
    """(global step, URI of the HF folder) of every checkpoint stored under the run, newest first, found by their
    rank-0 manifests; a manifest that cannot be read leaves its folder out (it cannot be resumed from anyway)."""
    name = MANIFEST.format(rank=0)
    try:
        manifests = storage.list_files(run_uri, suffixes=("/" + name,))
    except FileNotFoundError:
        return []
    out = []
    for uri in manifests:
        try:
            out.append((int(storage.read_state(uri)["step"]), uri[: -len("/" + name)]))
        except Exception:  # noqa: BLE001 - a truncated manifest: not a candidate
            continue
    return sorted(out, key=lambda x: x[0], reverse=True)


def _parent_name(uri: str) -> str:
    """Name of the Ray checkpoint folder holding an HF folder ``.../<ray checkpoint>/checkpoint``."""
    return uri.rstrip("/").rsplit("/", 2)[-2]


def restore_checkpoint(checkpoint: Any, local_dir: str, run_uri: str | None = None,
                       skipped: list | None = None) -> str | None:
    """The local path of the complete HF checkpoint folder to resume from, or None (start from step 0).

    Candidates are the checkpoints stored under ``run_uri``, newest step first, and Ray Train's latest registered
    checkpoint (``checkpoint``). The newest one that verifies against its manifest wins: a truncated or partly
    uploaded folder is passed over (logged, and appended to ``skipped`` as {checkpoint, reason}), and a complete folder
    newer than Ray Train's latest saves recomputing those steps. With none complete, training starts from step 0
    (same seed and data, so the same run); failing instead would only make Ray Train restart the workers into the
    same state."""
    skipped = [] if skipped is None else skipped
    stored = stored_checkpoints(run_uri) if run_uri else []
    latest_name = os.path.basename(str(checkpoint.path).rstrip("/")) if checkpoint is not None else None
    candidates: list[tuple[str, Any]] = [(uri, None) for _, uri in stored]
    if latest_name and not any(_parent_name(uri) == latest_name for uri, _ in candidates):
        candidates.append((storage.join(str(checkpoint.path), HF_CHECKPOINT), checkpoint))  # not listable: last
    for i, (uri, ray_ckpt) in enumerate(candidates):
        local = os.path.join(local_dir, f"resume-{i}")
        try:
            if ray_ckpt is not None:
                local = os.path.join(ray_ckpt.to_directory(local), HF_CHECKPOINT)
            else:
                storage.download_dir(uri, local)
        except OSError as exc:
            problem = f"cannot download: {type(exc).__name__}: {exc}"
        else:
            problem = verify_checkpoint(local)
        if problem is None:
            if latest_name and _parent_name(uri) != latest_name:
                log.info("resuming from %s: complete, and newer than Ray Train's latest registered checkpoint %s",
                         uri, latest_name)
            return local
        skipped.append({"checkpoint": uri, "reason": problem})
        log.warning("checkpoint %s is incomplete (%s); trying an earlier one", uri, problem)
    if candidates:
        log.warning("no complete checkpoint under %s: training starts again from step 0", run_uri)
    return None
