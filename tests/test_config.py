"""Typed configs: YAML + key=value overrides, strict keys, the run hash, and the README's generated reference."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_readme_holds_the_current_config_reference():
    from mecpe.config import config_reference_markdown

    readme = (REPO / "README.md").read_text()
    m = re.search(r"<!-- config-reference:start -->\n(.*?)\n<!-- config-reference:end -->", readme, re.S)
    assert m, "README lacks the config reference markers"
    assert m.group(1) == config_reference_markdown(), "README config table is stale: regenerate it from mecpe.config"


def test_overrides_are_typed_and_unknown_keys_fail(tmp_path):
    from mecpe.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("training:\n  max_steps: 5\nlora:\n  r: 8\n")
    cfg = load_config(str(path), ["training.max_steps=7", "lora.target_modules=all-linear", "inference.num_gpus=0.5"])
    assert cfg.training.max_steps == 7 and cfg.lora.r == 8
    assert cfg.lora.target_modules == "all-linear" and cfg.inference.num_gpus == 0.5
    # YAML turns a bare on / off into booleans: the settings that take those words still read them
    assert load_config(None, ["training.gradient_checkpointing=off"]).training.gradient_checkpointing == "off"
    assert load_config(None, ["training.gradient_checkpointing=on"]).training.gradient_checkpointing == "on"
    with pytest.raises(Exception, match="no_such_key"):
        load_config(str(path), ["training.no_such_key=1"])
    with pytest.raises(Exception, match="max_steps"):
        load_config(str(path), ["training.max_steps=lots"])


def test_config_hash_is_stable_and_sensitive():
    from mecpe.config import config_hash, load_config

    a, b = load_config(None, []), load_config(None, [])
    c = load_config(None, ["training.learning_rate=0.1"])
    assert config_hash(a) == config_hash(b) != config_hash(c)
    assert config_hash({"x": 1, "y": 2}) == config_hash({"y": 2, "x": 1})


def test_ci_runs_the_readme_test_command():
    """The README's test command (set-up command 2) is, verbatim, what .ci/run executes."""
    readme = (REPO / "README.md").read_text()
    m = re.search(r"# 2\. [^\n]*\n(.+)\n", readme)
    assert m, "README lacks set-up command 2"
    ci = (REPO / ".ci" / "run").read_text()
    assert f"\n{m.group(1)} || status=$?\n" in ci, "the README's test command and .ci/run differ"


def _attribute_reads(root: Path, skip: set[str]) -> set[str]:
    """Names read as attributes (``x.name``) or through ``getattr(x, "name")`` in mecpe/ outside ``skip``."""
    import ast

    names: set[str] = set()
    for path in root.rglob("*.py"):
        if path.name in skip:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" and len(node.args) > 1 \
                    and isinstance(node.args[1], ast.Constant):
                names.add(node.args[1].value)
    return names


def test_every_documented_key_is_read_outside_config():
    """A key in the README's table that no code reads does nothing: it must be implemented or removed (the check
    that failed on ``data.limit_test``, declared, documented and read by nothing)."""
    from mecpe.config import config_keys

    import ast

    read = _attribute_reads(REPO / "mecpe", {"config.py"})
    # a config model's method that code outside config.py calls reads its fields there (data.path -> data_dir)
    for cls in ast.parse((REPO / "mecpe" / "config.py").read_text()).body:
        for fn in (n for n in getattr(cls, "body", []) if isinstance(n, ast.FunctionDef) and n.name in read):
            read |= {n.attr for n in ast.walk(fn) if isinstance(n, ast.Attribute)
                     and isinstance(n.value, ast.Name) and n.value.id == "self"}
    unread = [k for k in config_keys() if k.split(".")[-1] not in read]
    assert not unread, f"documented config keys that nothing reads: {unread}"
