"""Which code ran: the files decide, not a HEAD a copied working tree may carry from before its last commits."""

from __future__ import annotations

import subprocess

from mecpe.provenance import code_version


def _git(repo, *args):
    return subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_tree_names_the_files_that_ran(tmp_path):
    repo = str(tmp_path)
    _git(repo, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / ".gitignore").write_text("out/\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "one")
    first = code_version(repo)
    assert first == {"commit": _git(repo, "rev-parse", "HEAD"), "tree": _git(repo, "rev-parse", "HEAD^{tree}"),
                     "dirty": False}
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "result.json").write_text("{}")  # ignored files are not code
    assert code_version(repo) == first
    (tmp_path / "a.py").write_text("x = 2\n")
    (tmp_path / "b.py").write_text("y = 1\n")  # untracked, not ignored: it travels and runs too
    changed = code_version(repo)
    assert changed["dirty"] and changed["tree"] != first["tree"] and changed["commit"] == first["commit"]
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "two")
    assert _git(repo, "rev-parse", "HEAD^{tree}") == changed["tree"]
    _git(repo, "reset", "-q", "--soft", "HEAD~1")  # a copy whose HEAD is older than its files
    stale = code_version(repo)
    assert stale["commit"] == first["commit"] and stale["tree"] == changed["tree"] and stale["dirty"]
    assert (tmp_path / ".git" / "index").exists() and _git(repo, "status", "--porcelain")  # own index untouched
