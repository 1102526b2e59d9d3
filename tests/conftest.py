"""Shared fixtures: the ECF data folder (never copied into the repo) and a real S3 server on loopback."""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import shutil
import tempfile
from pathlib import Path

import pytest

# One compute thread per process (this one, and every Ray worker and node it starts: Ray keeps an OMP_NUM_THREADS it
# inherits). The suite's models are tiny and its Ray processes share 2 cores: with Ray's default (a thread per CPU
# the worker holds) the threads of one op wait on each other while another process holds a core; a tiny-model
# training step measured 0.09 s with 1 thread against 0.26-1.5 s with 2 on this machine under load.
_SUITE_SETS_THREADS = "OMP_NUM_THREADS" not in os.environ
os.environ.setdefault("OMP_NUM_THREADS", "1")
# ... except this process: the tests that run models in it (engine, predict, modeling, tiny, the packed-row training
# steps) start no other process, so a thread per core is theirs. Measured on this machine: test_predict, test_engine,
# test_modeling and test_tiny took 131.7 s with one thread and 87.7 s with two (docs/testing.md). Where a test
# starts Ray, this process mostly waits on it.
if _SUITE_SETS_THREADS:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)

# Ray Train's controller polls its workers every 2 s by default, so a finished run is noticed up to 2 s late (and
# each worker-group start waits on a poll too): the smoke pipeline's two fits took 18.8 and 17.0 s with the default
# and 16.6 and 14.3 s with 0.2 s on this machine. The suite starts dozens of fits; what they prove does not depend
# on the poll's period. Inherited by every Ray process the suite starts.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

# Ray Train starts a PreemptionWatcher actor per run (~1.6 s of CPU here; 28 per suite) that polls the GCS for
# drained nodes. A one-node Ray has no node to lose, so the suite's single-node Rays run without it; the static
# cluster, whose tests drain nodes, turns it back on (tests/test_cluster.py: its A100 preemption test fails without).
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

# Ray stops an idle worker beyond its soft limit (one per CPU) after 1 s, and the suite's pipelines run a few short
# tasks at once (read, parse) several times a minute, so workers were started, stopped and started again, each start
# ~1 s of CPU: tests/test_infer.py started 29 idle-pool workers with the default and 3 with 60 s (docs/testing.md).
os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "60000")

# Ray heads started by tests (tests/_ray_head.py) use token authentication, Ray's default; this process must speak it
# to join them. Ray reads the mode once, at import, so it is set before any test module imports ray.
os.environ.setdefault("RAY_AUTH_MODE", "token")
# ... and the token: the suite's own, in a file every Ray process it starts inherits (RAY_AUTH_TOKEN_PATH). A head of
# ray.cluster_utils does not create ~/.ray/auth_token on a fresh machine (its GCS then fails to start), and nodes
# with their own HOME would not find it; the user's token is neither needed nor touched.
if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
    _token_dir = tempfile.mkdtemp(prefix="mecpe-test-ray-token-")
    atexit.register(shutil.rmtree, _token_dir, True)
    _token = Path(_token_dir) / "auth_token"
    _token.write_text(secrets.token_hex(32))  # as Ray generates its own
    _token.chmod(0o600)
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(_token)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ.get("MECPE_DATA", REPO.parent / "shared" / "data" / "ecf"))
    assert path.is_dir(), f"ECF data not found at {path}; set MECPE_DATA"
    return path


def _set_env(values: dict[str, str | None]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 with one bucket; credentials and endpoint go into ``os.environ``.

    Session-wide environment (not monkeypatch) so subprocesses started by tests (ray job submit) see it too.
    """
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server.get_host_and_port()[1]}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "MECPE_S3_ENDPOINT": endpoint, "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_SESSION_TOKEN": None, "AWS_PROFILE": None}
    saved = {k: os.environ.get(k) for k in env}
    _set_env(env)
    try:
        bucket = "mecpe-test"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
        yield {"endpoint": endpoint, "bucket": bucket}
    finally:
        _set_env(saved)
        server.stop()


# docs/reliability.md is generated from the reliability suite's results (tests/_reliability_report.py).
from _reliability_report import (  # noqa: E402,F401
    pytest_collection_modifyitems, pytest_runtest_logreport, pytest_sessionfinish,
)
