"""Typed configs: YAML + key=value overrides, strict keys, the run hash, and the generated reference in docs/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_docs_hold_the_current_config_reference():
    from mecpe.config import config_reference_markdown

    doc = (REPO / "docs" / "configuration.md").read_text()
    m = re.search(r"<!-- config-reference:start -->\n(.*?)\n<!-- config-reference:end -->", doc, re.S)
    assert m, "docs/configuration.md lacks the config reference markers"
    assert m.group(1) == config_reference_markdown(), \
        "docs/configuration.md's config table is stale: regenerate it from mecpe.config"


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


# Config classes by the key prefix they hold, and parameter names bound to a section by convention where no
# annotation says it (storage.settings_from takes ``storage_cfg: Any``).
_CLASSES = {"Config": "", "DataConfig": "data", "ModelConfig": "model", "TinyModelSettings": "model.tiny",
            "QuantizationConfig": "quantization", "LoraSettings": "lora", "PromptConfig": "prompt",
            "TrainingConfig": "training", "ScalingSettings": "scaling", "StorageConfig": "storage",
            "InferenceConfig": "inference", "ValidationConfig": "validation"}
_NAMED = {"cfg": "", "raw_cfg": "", "storage_cfg": "storage", "model_cfg": "model", "quant_cfg": "quantization",
          "lora_cfg": "lora", "spec": ""}  # a step's spec holds config sections under their own names (spec.training)


def config_reads(sources: dict[str, str]) -> set[str]:
    """Full keys (``data.split``) read through the config object in ``sources`` (file name -> code): attribute chains
    from a config (``cfg.data.split``, ``self.cfg.inference.max_batch_tokens``), names bound to a section
    (``d = cfg.data`` then ``d.split``; a parameter annotated ``TrainingConfig``), ``getattr`` with constant names,
    and the fields a section's own method reads when code calls it (``d.path(...)`` reads ``data.data_dir``).
    An attribute of the same name on anything else (``args.split``, ``self.args.seed``) is not a read."""
    import ast

    from mecpe.config import config_keys

    keys = set(config_keys())
    sections = {k.rsplit(".", 1)[0] for k in keys if "." in k} | {"model.tiny", ""}
    methods: dict[str, dict[str, set[str]]] = {}  # section -> method -> fields it reads from self
    for cls in ast.parse(sources["config.py"]).body:
        if isinstance(cls, ast.ClassDef) and cls.name in _CLASSES:
            methods[_CLASSES[cls.name]] = {
                fn.name: {n.attr for n in ast.walk(fn) if isinstance(n, ast.Attribute)
                          and isinstance(n.value, ast.Name) and n.value.id == "self"}
                for fn in cls.body if isinstance(fn, ast.FunctionDef)}

    def join(prefix: str, name: str) -> str:
        return f"{prefix}.{name}" if prefix else name

    reads: set[str] = set()
    for name, code in sources.items():
        if name == "config.py":
            continue
        for scope in [n for n in ast.walk(ast.parse(code)) if isinstance(n, (ast.FunctionDef, ast.Module))]:
            alias = dict(_NAMED)
            if isinstance(scope, ast.FunctionDef):
                for arg in scope.args.args + scope.args.kwonlyargs:
                    hints = {n.id for n in ast.walk(arg.annotation) if isinstance(n, ast.Name)} if arg.annotation \
                        else set()
                    hit = [_CLASSES[h] for h in hints if h in _CLASSES]
                    if hit:
                        alias[arg.arg] = hit[0]

            def path(node) -> str | None:
                if isinstance(node, ast.Name):
                    return alias.get(node.id)
                if isinstance(node, ast.Attribute):
                    if node.attr in ("cfg", "spec"):  # self.cfg, w.spec
                        return ""
                    base = path(node.value)
                    if base is not None and join(base, node.attr) in sections:
                        return join(base, node.attr)
                return None

            for node in ast.walk(scope):  # names bound to a section
                if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                    sec = path(node.value)
                    if sec is not None:
                        alias[node.targets[0].id] = sec
            for node in ast.walk(scope):
                if isinstance(node, ast.Attribute):
                    base = path(node.value)
                    if base is not None and join(base, node.attr) in keys:
                        reads.add(join(base, node.attr))
                    if base is not None and node.attr in methods.get(base, {}):
                        reads |= {join(base, f) for f in methods[base][node.attr]}
                elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" and len(node.args) > 1:
                    base = path(node.args[0])
                    if base is not None and isinstance(node.args[1], ast.Constant):
                        reads.add(join(base, node.args[1].value))
                elif isinstance(node, (ast.DictComp, ast.ListComp, ast.GeneratorExp, ast.SetComp)):
                    names = [c.value for g in node.generators if isinstance(g.iter, ast.Tuple)
                             for c in g.iter.elts if isinstance(c, ast.Constant)]
                    for call in ast.walk(node):  # getattr(section, k) for k in ("a", "b")
                        if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "getattr" \
                                and len(call.args) > 1 and path(call.args[0]) is not None:
                            reads |= {join(path(call.args[0]), n) for n in names}
    return reads & keys


def _mecpe_sources() -> dict[str, str]:
    return {str(p.relative_to(REPO / "mecpe")): p.read_text() for p in (REPO / "mecpe").rglob("*.py")}


def test_the_quick_tier_starts_no_ray_and_trains_nothing():
    """`pytest -m "not slow"` (the README's edit-loop tier) stays quick: a test file that starts Ray, trains through
    the recipe or runs a pipeline in a subprocess carries ``pytestmark = pytest.mark.slow``."""
    heavy = re.compile(r"\bimport ray\b|ray\.init\(|run_training\(|run_pipeline\(|run_inference\(|"
                       r"_ray_head|_cluster\b|\[str\(BIN / \"mecpe\"\)")
    unmarked = [p.name for p in sorted((REPO / "tests").glob("test_*.py"))
                if heavy.search(p.read_text()) and "pytestmark = pytest.mark.slow" not in p.read_text()]
    assert not unmarked, f"start Ray or train but are not marked slow: {unmarked}"


def test_every_documented_key_is_read_outside_config():
    """A key in the configuration table (docs/configuration.md) that no code reads does nothing: it must be implemented or removed (the check
    that failed on ``data.limit_test``, declared, documented and read by nothing). Keys are matched by their full
    path through the config object: removing every read of ``data.split`` (``d.split`` in pipeline.py, cli.py and
    train/driver.py) or of ``inference.max_batch_tokens`` (``inf.max_batch_tokens`` in infer/driver.py, where the predictors' spec is built) fails it,
    though ``args.split`` and a ``max_batch_tokens`` parameter are still read (the next test applies both
    mutations)."""
    from mecpe.config import config_keys

    read = config_reads(_mecpe_sources())
    unread = [k for k in config_keys() if k not in read]
    assert not unread, f"documented config keys that nothing reads: {unread}"


def test_the_key_check_catches_removed_reads():
    import re

    src = _mecpe_sources()
    assert {"data.split", "inference.max_batch_tokens", "training.max_batch_tokens"} <= config_reads(src)
    mutated = {name: re.sub(r"\bd\.split\b", "'random'", code) for name, code in src.items()}
    mutated["infer/driver.py"] = src["infer/driver.py"].replace("inf.max_batch_tokens", "16384")
    reads = config_reads(mutated)
    assert "data.split" not in reads and "inference.max_batch_tokens" not in reads
    assert "training.max_batch_tokens" in reads  # a read of the same field name in another section still counts


def test_a_missing_local_model_is_named_before_any_work(tmp_path, capsys):
    """train and infer only read the model (the prepare step builds the tiny one): a local model.base that is not
    there ends the step at once, exit 2, naming the key and the prepare step, instead of a worker trying the path as
    a hub id."""
    from mecpe.cli import main

    missing = tmp_path / "no-model"
    for argv in (["train", "--task", "emotion"], ["infer", "--input", str(tmp_path / "in.json")]):
        assert main([*argv, f"model.base={missing}", f"output_dir={tmp_path / 'out'}"]) == 2
        err = capsys.readouterr().err
        assert f"model.base '{missing}': no such folder" in err and "prepare step" in err, err
    assert not (tmp_path / "out").exists()


def test_an_adapter_of_another_prompt_layout_is_refused_before_any_work(tmp_path, capsys):
    """An adapter answers the prompt layout it was trained on (``prompt.layout``, recorded in its mecpe_train.json;
    adapters from before the key record none: ``question``). ``mecpe infer`` with another layout exits 2 naming the
    adapter, its record and both layouts, before Ray starts or anything is written."""
    import json

    from mecpe.cli import main
    from mecpe.layout import TRAIN_META_FILE

    from _tiny import DATA_DIR, tiny_model_dir

    test_file = DATA_DIR / "NUSTM_SemEval-2024_ECAC" / "data" / "Subtask_2_test.json"
    old, new = tmp_path / "old-adapter", tmp_path / "prefix-adapter"
    for folder, meta in ((old, {"task": "emotion"}), (new, {"task": "cause", "prompt": {"layout": "prefix"}})):
        folder.mkdir()
        (folder / TRAIN_META_FILE).write_text(json.dumps(meta))
    for layout, key, adapter, trained in (("prefix", "emotion", old, "question"), ("question", "cause", new, "prefix")):
        assert main(["infer", "--input", str(test_file), f"model.base={tiny_model_dir()}", f"prompt.layout={layout}",
                     f"inference.{key}_adapter={adapter}", f"output_dir={tmp_path / 'out'}"]) == 2
        err = capsys.readouterr().err
        assert (f"inference.{key}_adapter={adapter} was trained with prompt.layout={trained}" in err
                and str(adapter / TRAIN_META_FILE) in err and f"asks prompt.layout={layout}" in err), err
    # an ensemble's further emotion adapters are held to it too
    assert main(["infer", "--input", str(test_file), f"model.base={tiny_model_dir()}", "prompt.layout=question",
                 f"inference.emotion_adapter={old}", f"inference.emotion_ensemble=[{new}]",
                 f"output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert f"inference.emotion_ensemble[0]={new} was trained with prompt.layout=prefix" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("overrides, message", [
    (["inference.emotion_adapter=a", "inference.emotion_ensemble=[b]", "inference.emotion_method=generate"],
     "emotion_ensemble averages label scores: it needs emotion_method score"),
    (["inference.emotion_ensemble=[b]"], "emotion_ensemble adds adapters to emotion_adapter, which is not set"),
    (["training.emotion_ensemble=0"], "training.emotion_ensemble"),
    (["inference.emotion_ensemble_mode=soup", "quantization.mode=nf4"],
     "emotion_ensemble_mode=soup averages the adapters merged into the base's weights: it needs quantization.mode "
     "none (not 'nf4')"),
    (["inference.emotion_ensemble_mode=soup", "quantization.mode=none", "inference.merge_adapters=false"],
     "and inference.merge_adapters auto or true (not False)"),
])
def test_an_emotion_ensemble_needs_label_scores_and_a_first_adapter(overrides, message):
    from mecpe.config import load_config
    from mecpe.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_emotion_ensemble_members_differ_by_their_seed_only(tmp_path):
    """training.emotion_ensemble: member k trains with training.seed + 1000 k and nothing else changed; each is a
    run of its own, and member 0 is the very run a single-adapter config trains (the count is not hashed), so
    adding members to a finished recipe trains only the new ones."""
    from mecpe.config import load_config
    from mecpe.pipeline import ensemble_member
    from mecpe.train.driver import run_identity

    train = tmp_path / "train.json"
    train.write_text("[]")
    cfg = load_config(None, ["training.seed=3", "training.emotion_ensemble=3"])
    members = [ensemble_member(cfg, k) for k in range(3)]
    assert [m.training.seed for m in members] == [3, 1003, 2003] and cfg.training.seed == 3
    for m in members[1:]:
        m.training.seed = 3
        assert m == cfg
    names = [run_identity(ensemble_member(cfg, k), "emotion", str(train), None)[0] for k in range(3)]
    assert len(set(names)) == 3
    assert run_identity(load_config(None, ["training.seed=3"]), "emotion", str(train), None)[0] == names[0]


def test_the_pipeline_refuses_one_run_name_for_its_several_trainings(tmp_path, capsys):
    """storage.run_name names one Ray Train run; the pipeline trains the emotion adapter(s) and the cause adapter, so
    the cause training would find the emotion run finished under that name and reuse its adapter. Refused, exit 2,
    before any work."""
    from mecpe.cli import main

    assert main(["pipeline", "--config", str(REPO / "jobs/configs/local.yaml"), "storage.run_name=mine",
                 f"output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert "storage.run_name='mine' names one training run, and the pipeline trains 2" in err, err
    assert not (tmp_path / "out").exists()


def test_trainings_at_once_return_in_order_and_raise_after_all_ran():
    """scaling.concurrent_trainings: the pipeline's trainings run in threads, their results in job order; a failing
    one is raised only after the others ran to their end (what they trained is kept for the rerun)."""
    import threading
    import time

    from mecpe.pipeline import at_once

    started, ended, lock = [], [], threading.Lock()

    def job(k, fail=False, wait=0.2):
        def run():
            with lock:
                started.append(k)
            time.sleep(wait)
            with lock:
                ended.append(k)
            if fail:
                raise RuntimeError(f"job {k} failed")
            return k * 10
        return run

    t0 = time.perf_counter()
    assert at_once([job(0), job(1), job(2)], 3) == [0, 10, 20]
    assert time.perf_counter() - t0 < 0.5  # at once: ~0.2 s, not 0.6
    assert at_once([job(0, wait=0), job(1, wait=0)], 1) == [0, 10]
    ended.clear()
    with pytest.raises(RuntimeError, match="job 1 failed"):
        at_once([job(0, wait=0.3), job(1, fail=True, wait=0), job(2, fail=True, wait=0.1)], 2)
    assert sorted(ended) == [0, 1, 2]  # every job ran to its end; the first failure in job order was raised
