"""Fault-injection helpers for the reliability suite: a restartable S3 server (moto, loopback) with fake credentials,
a real local Ray started after it, and ways to find real Ray processes (actors) to SIGKILL from outside.

Nothing here changes what mecpe does: faults are delivered from outside (signals, a stopped server, a truncated
file), the way a spot reclaim, an S3 outage or a full disk would deliver them."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

# Fake credentials: moto accepts anything; the security test greps every output and log for these strings.
FAKE_KEY_ID = "AKIAFAKEMECPE0000000"
FAKE_SECRET = "fakeSecretMecpe/DoNotLeak+0123456789abcdef"
FAKE_TOKEN = "FakeSessionTokenMecpe/DoNotLeak+abcdefABCDEF0123"
SECRETS = (FAKE_KEY_ID, FAKE_SECRET, FAKE_TOKEN)
BUCKET = "mecpe-reliability"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RestartableS3:
    """A moto S3 server on a fixed loopback port that can be stopped (socket closed: connections are refused) and
    started again on the same port; moto's in-process backend keeps the buckets and objects across restarts.

    ``on_request(method, path)`` (optional) is called for every request before moto handles it: the S3-outage test
    uses it to stop the server while a checkpoint is being uploaded."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.on_request: Callable[[str, str], None] | None = None
        self.key_ids: set[str] = set()  # access key ids of the signed requests seen (never the secret: not sent)
        self._server = None
        self._thread: threading.Thread | None = None
        self.stops = 0

    def _app(self):
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

        inner = DomainDispatcherApplication(create_backend_app)

        def app(environ, start_response):
            auth = environ.get("HTTP_AUTHORIZATION", "")
            if "Credential=" in auth:
                self.key_ids.add(auth.split("Credential=", 1)[1].split("/", 1)[0])
            hook = self.on_request
            if hook is not None:
                hook(environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", ""))
            return inner(environ, start_response)

        return app

    def start(self) -> None:
        from moto.moto_server.werkzeug_app import MotoRequestHandler
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._server = make_server("127.0.0.1", self.port, self._app(), True, request_handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()  # close the listening socket: new connections are refused, as in an outage
        self._thread.join(timeout=30)
        self._server = None
        self.stops += 1

    @property
    def running(self) -> bool:
        return self._server is not None


@contextlib.contextmanager
def fake_cloud() -> Iterator[RestartableS3]:
    """Fake AWS credentials in the environment (the only place mecpe may read them from) and a restartable S3
    server with one bucket. Environment restored afterwards."""
    import boto3

    server = RestartableS3()
    env = {"AWS_ACCESS_KEY_ID": FAKE_KEY_ID, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET, "AWS_SESSION_TOKEN": FAKE_TOKEN,
           "AWS_DEFAULT_REGION": "us-east-1", "MECPE_S3_ENDPOINT": server.endpoint,
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_PROFILE": None}
    saved = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.start()
    try:
        # a fresh session: boto3's default one caches the credentials it first saw (an earlier test's)
        s3 = boto3.session.Session().client("s3", endpoint_url=server.endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        yield server
    finally:
        server.on_request = None
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def local_ray() -> Iterator[str]:
    """A real local Ray (2 CPUs, no dashboard), started now so its workers inherit the current environment."""
    import ray

    assert not ray.is_initialized(), "another test module left Ray running"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def ray_session_dir() -> Path:
    import ray

    return Path(ray._private.worker._global_node.get_session_dir_path())


def alive_actor_pids(class_substring: str) -> list[int]:
    """PIDs of ALIVE actors whose class name contains ``class_substring`` (the GCS actor table: no dashboard
    needed). Ray Data names its actors ``MapWorker(MapBatches(<Class>))``; Ray Train's are ``RayTrainWorker``."""
    import ray

    table = ray._private.state.actors()
    return sorted({a["Pid"] for a in table.values()
                   if a.get("State") == "ALIVE" and class_substring in (a.get("ActorClassName") or "") and a.get("Pid")})


def sigkill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.2,
              alive: Callable[[], bool] | None = None):
    """Poll until ``predicate()`` is truthy (returns it); fails after ``timeout`` s or when ``alive()`` turns False."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        if alive is not None and not alive():
            value = predicate()
            if value:
                return value
            raise AssertionError(f"the job ended before {what}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def tree_files(root: Path) -> list[Path]:
    return [p for p in Path(root).rglob("*") if p.is_file()]
