"""Which code ran: the checkout's HEAD and the git tree of the working tree as it is.

A copy of a working tree (the GPU machine gets one) can carry a HEAD older than its files: the files decide. The tree
hash is computed through a temporary index (the checkout's own index is not touched), so it names exactly the files
that ran; ``git rev-parse COMMIT^{tree}`` prints the same hash for the commit that holds them."""

from __future__ import annotations

import os
import subprocess
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(repo: str, *args: str, env: dict | None = None) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=30,
                             env={**os.environ, **(env or {})})
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def code_version(repo: str = REPO, subtrees: tuple[str, ...] = ()) -> dict:
    """``{"commit": HEAD, "tree": tree of the files as they are, "dirty": tree != HEAD's tree}`` of the checkout at
    ``repo`` (mecpe's own by default), plus ``{"subtrees": {folder: its tree}}`` for ``subtrees``: a file written
    after the run (a report) changes the whole tree but not the code's folders. Nones outside a git checkout."""
    head = _git(repo, "rev-parse", "HEAD")
    with tempfile.TemporaryDirectory(prefix="mecpe-index-") as tmp:
        env = {"GIT_INDEX_FILE": os.path.join(tmp, "index")}
        if head:
            _git(repo, "read-tree", "HEAD", env=env)  # start from HEAD: only changed files are hashed again
        _git(repo, "add", "-A", env=env)
        tree = _git(repo, "write-tree", env=env)
    head_tree = _git(repo, "rev-parse", "HEAD^{tree}") if head else None
    out = {"commit": head, "tree": tree, "dirty": None if tree is None else tree != head_tree}
    if subtrees:
        out["subtrees"] = {d: _git(repo, "rev-parse", f"{tree}:{d}") if tree else None for d in subtrees}
    return out
