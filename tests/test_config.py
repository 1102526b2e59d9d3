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
