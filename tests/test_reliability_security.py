"""Security (issue #7, part 4): credentials only from the environment and never written anywhere, trust_remote_code
off unless configured, object keys only from sanitized ids, Ray token authentication left on and the embedded
default's dashboard / job server bound to loopback. Real Ray, real S3 server (moto), real model loading."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mecpe import storage
from mecpe.config import Config, dump_config, load_config

from _faults import BUCKET, SECRETS, FAKE_KEY_ID, fake_cloud, local_ray, ray_session_dir
from _tiny import REPO, tiny_model_dir, train_records

pytestmark = pytest.mark.slow  # Ray, training or subprocess pipelines: outside the quick tier (README)

TEST_FILE = "NUSTM_SemEval-2024_ECAC/data/Subtask_2_test.json"
ESCAPING = ["../../outside", "a/b/c", "/absolute", "..", "%2e%2e%2fx", "C:\\\\win", "z" * 900]


@pytest.fixture(scope="module")
def cloud():
    with fake_cloud() as server:
        yield server


@pytest.fixture(scope="module")
def ray_address(cloud):
    """Started after the fake credentials are in the environment: every Ray process inherits them."""
    with local_ray() as address:
        yield address


def _scan(blob: bytes) -> list[str]:
    return [s for s in SECRETS if s.encode() in blob]


@pytest.mark.reliability(
    fault="Credentials: a full train + infer against S3 with (fake) AWS credentials in the environment",
    behaviour="Credentials are read from the environment by the AWS SDK only (filesystems are built without keys, "
              "so pickles sent to Ray tasks carry none); no output, log, config dump, S3 object, Ray session log or "
              "console line contains them")
def test_credentials_never_written(ray_address, cloud, data_dir, tmp_path, capfd):
    import boto3

    from mecpe.infer import run_inference
    from mecpe.pipeline import step_train

    tiny = tiny_model_dir()
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    gold = json.loads((data_dir / TEST_FILE).read_text(encoding="utf-8"))
    train_recs = train_records()
    (out / "data" / "train.json").write_text(json.dumps(train_recs[:8]))
    (out / "data" / "val.json").write_text(json.dumps(train_recs[200:201]))
    cfg = load_config(None, [f"output_dir={out}", f"model.base={tiny}", f"model.cache_dir={tmp_path / 'cache'}",
                             "quantization.mode=nf4", "prompt.max_prompt_tokens=512", "training.max_steps=2",
                             "training.per_device_batch_size=2", "training.grad_accum=1", "training.save_steps=2",
                             "training.optim=adamw_torch", "training.logging_steps=1",
                             "scaling.resources_per_worker={CPU: 2}", f"storage.path=s3://{BUCKET}/sec/runs"])
    s3 = boto3.session.Session().client("s3", endpoint_url=cloud.endpoint, region_name="us-east-1")
    before = {o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
              for o in page.get("Contents", [])}  # other tests' objects (moto's backend is per process)
    res = step_train(cfg, "emotion")
    assert res.adapter_uri.startswith(f"s3://{BUCKET}/sec/runs/")

    lines = [json.dumps(c) for c in gold[:3]]
    lines += [json.dumps({**gold[3], "conversation_ID": cid}) for cid in ESCAPING]
    s3.put_object(Bucket=BUCKET, Key="sec/in/part-1.jsonl", Body=("\n".join(lines) + "\n").encode())
    icfg = load_config(None, [f"model.base={tiny}", f"model.cache_dir={tmp_path / 'cache'}", "quantization.mode=none",
                              "prompt.max_prompt_tokens=512", f"inference.emotion_adapter={res.adapter_uri}",
                              "inference.batch_size=4", "inference.num_cpus=0.5", "inference.share_base=true"])
    summary = run_inference(icfg, f"s3://{BUCKET}/sec/in", f"s3://{BUCKET}/sec/infer")
    assert summary.conversations == 3 + len(ESCAPING) and summary.rejects == 0
    # gold-labelled input with string ids: predictions written, scoring skipped with the reason (it used to crash)
    # gold-labelled input with string ids: predictions and gold.json written; the official metric cannot score
    # string ids, and says so (it used to crash) instead of failing the run
    from mecpe.metric import EvaluationError, evaluate_files

    assert summary.has_gold is True
    with pytest.raises(EvaluationError, match="non-integer conversation_ID"):
        evaluate_files(f"s3://{BUCKET}/sec/infer/Subtask_2_pred.json", f"s3://{BUCKET}/sec/infer/gold.json")
    # the credentials really flowed from the environment to every S3 client (driver, Train workers, Data tasks)
    assert cloud.key_ids == {FAKE_KEY_ID}

    leaks: dict[str, list[str]] = {}
    # 1. every local output: prepared data, run outputs, model cache (adapters fetched from S3)
    for path in [p for p in tmp_path.rglob("*") if p.is_file()]:
        if found := _scan(path.read_bytes()):
            leaks[str(path)] = found
    # 2. every object in the bucket: checkpoints, adapter (config.yaml, mecpe_train.json), shards, summary, run id
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for o in page.get("Contents", [])]
    assert any(k.endswith("adapter/config.yaml") for k in keys) and "sec/infer/summary.json" in keys
    for key in keys:
        if found := _scan(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()):
            leaks[f"s3://{BUCKET}/{key}"] = found
    # 3. Ray's session logs (driver, raylet, GCS, every worker and actor)
    logs = ray_session_dir() / "logs"
    log_files = [p for p in logs.rglob("*") if p.is_file()]
    assert log_files
    for path in log_files:
        if found := _scan(path.read_bytes()):
            leaks[str(path)] = found
    # 4. the console (our process and what Ray forwards from workers)
    captured = capfd.readouterr()
    assert "[mecpe" in captured.out + captured.err
    if found := _scan((captured.out + captured.err).encode()):
        leaks["stdout/stderr"] = found
    # 5. config dumps and a pickled S3 filesystem (what Ray ships to tasks)
    for name, blob in {"dump_config": dump_config(cfg).encode(), "model_dump": json.dumps(cfg.model_dump()).encode(),
                       "pickled S3FileSystem": pickle.dumps(storage.get_filesystem(f"s3://{BUCKET}/x")[0])}.items():
        if found := _scan(blob):
            leaks[name] = found
    assert not leaks, leaks
    # object keys: everything this test wrote is under the prefixes it was given; ids that would escape stay inside
    new = [k for k in keys if k not in before]
    assert all(k == "sec/" or k.startswith(("sec/runs/", "sec/in/", "sec/infer/")) for k in new), new
    assert all(".." not in k.split("/") for k in keys)


@pytest.mark.reliability(
    fault="Credentials in code or config",
    behaviour="mecpe has no credential setting and never names the AWS key variables: S3 credentials come only from "
              "the environment / instance profile via the AWS SDK's default chain")
def test_credentials_only_from_environment():
    """No code path reads or writes AWS keys itself: mecpe never names the credential variables or passes keys."""
    pattern = re.compile(r"(environ|getenv)\W+(AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|AWS_SESSION_TOKEN)"
                         r"|(access_key|secret_key|session_token|aws_secret_access_key)\s*=")
    hits = [f"{p.name}:{n}" for p in (REPO / "mecpe").glob("*.py")
            for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []
    assert not any(name in Config.model_fields["storage"].annotation.model_fields
                   for name in ("access_key", "secret_key", "session_token", "aws_access_key_id"))


# ============================================================================================ remote code


def _evil_model(tmp_path: Path) -> tuple[Path, Path]:
    """The tiny model plus an ``auto_map`` pointing at custom code that leaves a marker file when imported."""
    model = tmp_path / "evil-model"
    shutil.copytree(tiny_model_dir(), model)
    marker = tmp_path / "remote-code-ran"
    (model / "evil.py").write_text(textwrap.dedent(f"""
        open({str(marker)!r}, "w").write("ran")
        from transformers import LlamaConfig, LlamaForCausalLM
        class EvilConfig(LlamaConfig):
            model_type = "llama"
        class EvilModel(LlamaForCausalLM):
            config_class = EvilConfig
    """))
    for name in ("config.json", "tokenizer_config.json"):
        cfg = json.loads((model / name).read_text())
        cfg["auto_map"] = ({"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
                           if name == "config.json" else {"AutoTokenizer": ["evil.EvilTokenizer", None]})
        (model / name).write_text(json.dumps(cfg))
    return model, marker


@pytest.mark.reliability(
    fault="Model folder that ships its own code (auto_map) loaded with the default config",
    behaviour="trust_remote_code is False unless model.trust_remote_code says otherwise: the folder's code is never "
              "imported (the built-in architecture is used); with model.trust_remote_code=true it is")
def test_trust_remote_code_off_unless_configured(tmp_path):
    from mecpe import modeling

    model, marker = _evil_model(tmp_path)
    cfg = Config.model_validate({"model": {"base": str(model)}, "quantization": {"mode": "none"}})
    assert cfg.model.trust_remote_code is False
    loaded, _ = modeling.load(cfg.model, cfg.quantization, device="cpu")
    assert type(loaded).__name__ == "LlamaForCausalLM" and not marker.exists()
    # the switch is real: with model.trust_remote_code=true the same folder's code does run
    trusting = Config.model_validate({"model": {"base": str(model), "trust_remote_code": True},
                                      "quantization": {"mode": "none"}})
    try:
        modeling.load(trusting.model, trusting.quantization, device="cpu")
    except Exception:  # noqa: BLE001 - the custom classes need not load; that their code was imported is the point
        pass
    assert marker.exists()


# ============================================================================================ object keys

NASTY_IDS = ["../x", "../../etc/passwd", "a/b", "/", "/abs", "", ".", "..", ".hidden", "-dash", "x" * 5000,
             "nul\x00byte", "new\nline", "ünïcödé", "%2e%2e%2f", "C:\\win\\path", "a b", "s3://bucket/key", "é" * 200,
             "\udcff"]


@pytest.mark.reliability(
    fault="Conversation ids used as object keys / file names (../, /, empty, very long, control and non-ASCII)",
    behaviour="Keys come only from storage.safe_key: [A-Za-z0-9][A-Za-z0-9._-]{0,99}, never '..' or '/', a hash "
              "suffix whenever the id was altered, so distinct ids keep distinct keys")
def test_object_keys_are_sanitized():
    keys = [storage.safe_key(i) for i in NASTY_IDS]
    safe = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    assert all(safe.fullmatch(k) for k in keys), keys
    assert len(set(keys)) == len(NASTY_IDS)
    for k in keys:
        assert storage.join("s3://b/out", k).startswith("s3://b/out/") and "/" not in k
        assert os.path.dirname(os.path.normpath(os.path.join("/out", k))) == "/out"
    assert storage.safe_key("12345") == "12345" and storage.safe_key(7) == "7"  # ordinary ids stay readable


# ============================================================================================ Ray


def test_embedded_default_ignores_a_stale_cluster_address_file():
    """A ``ray start`` killed on this machine leaves ``ray_current_cluster`` naming a GCS that is gone; Ray's own
    default would try to join it and hang (seen 2026-12-02: a learn run stuck for 15 minutes). The embedded default
    starts its own local Ray instead, within seconds. The address file lives under RAY_TMPDIR, so the machine's
    ``/tmp/ray`` is left alone."""
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths live under it
    try:
        (tmp / "ray").mkdir()
        (tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9\n")  # the discard port: nothing listens
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        probe = ("from mecpe.cluster import connect; import ray; connect(None); "
                 "print('GCS', ray.get_runtime_context().gcs_address); ray.shutdown()")
        proc = subprocess.run([sys.executable, "-c", probe], env=dict(env, RAY_TMPDIR=str(tmp)), cwd=REPO,
                              capture_output=True, text=True, timeout=90)
        assert proc.returncode == 0, proc.stderr[-3000:]
        gcs = next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("GCS "))
        assert gcs != "127.0.0.1:9"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_PROBE = textwrap.dedent("""
    import json, os, sys, urllib.parse
    import psutil, ray
    from ray._raylet import AuthenticationMode, get_authentication_mode
    from mecpe.config import load_config
    from mecpe.cluster import connect
    cfg = load_config(None, [])  # the embedded default: no ray_address, no RAY_ADDRESS -> a new local Ray
    connect(cfg.ray_address)  # the one way training and inference join Ray
    url = ray._private.worker.get_dashboard_url()
    port = int(url.rsplit(":", 1)[1]) if url else None
    binds = set()
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and port and c.laddr.port == port:
            binds.add(c.laddr.ip)
    print("PROBE " + json.dumps({"auth": str(get_authentication_mode()),
                                  "token": get_authentication_mode() == AuthenticationMode.TOKEN,
                                  "dashboard": url, "binds": sorted(binds)}))
    ray.shutdown()
""")


@pytest.mark.reliability(
    fault="Embedded default Ray (no cluster address): token authentication and network exposure",
    behaviour="mecpe starts local Ray with Ray's defaults and never disables them: token authentication on, "
              "dashboard and job server (same HTTP server) listening on 127.0.0.1 only")
def test_embedded_ray_token_auth_and_loopback(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("PROBE ")), None)
    assert proc.returncode == 0 and line, proc.stdout[-2000:] + proc.stderr[-3000:]
    probe = json.loads(line[len("PROBE "):])
    assert probe["token"], probe
    assert probe["dashboard"] and probe["dashboard"].split("://")[-1].startswith("127.0.0.1:"), probe
    assert probe["binds"] == ["127.0.0.1"], probe
    # and nothing in mecpe, the job configs or the cluster file turns authentication off
    texts = [p.read_text() for p in [*(REPO / "mecpe").rglob("*.py"), *(REPO / "jobs").rglob("*.*"),
                                     REPO / "cluster.yaml"] if p.is_file()]
    assert not any(re.search(r"RAY_AUTH_MODE\W+disabled|dashboard_host\W+0\.0\.0\.0", t) for t in texts)
