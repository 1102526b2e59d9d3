"""Fault-injection helpers for the reliability suite: a restartable S3 server (moto, loopback) with fake credentials,
a real local Ray started after it, and ways to find real Ray processes (actors) to SIGKILL from outside.

Nothing here changes what mecpe does: faults are delivered from outside (signals, a stopped server, a truncated
file), the way a spot reclaim, an S3 outage or a full disk would deliver them."""

from __future__ import annotations

import contextlib
import logging
import os
import re
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

    ``on_request(method, path, query)`` (optional) is called for every request before moto handles it: the S3-outage
    tests use it to stop the server while a checkpoint is being uploaded or recorded. When it returns True, that
    request and every one until the socket closes fail with 503, as a server going down answers the requests in
    flight: stopping the server alone lets the accepted requests finish, so the fault could miss the upload it was
    aimed at."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.on_request: Callable[[str, str, str], bool | None] | None = None
        self.key_ids: set[str] = set()  # access key ids of the signed requests seen (never the secret: not sent)
        self._server = None
        self._thread: threading.Thread | None = None
        self.stops = 0
        self._going_down = False

    def _app(self):
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

        inner = DomainDispatcherApplication(create_backend_app)

        def app(environ, start_response):
            auth = environ.get("HTTP_AUTHORIZATION", "")
            if "Credential=" in auth:
                self.key_ids.add(auth.split("Credential=", 1)[1].split("/", 1)[0])
            hook = self.on_request
            if hook is not None and hook(environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", ""),
                                         environ.get("QUERY_STRING", "")):
                self._going_down = True
            if self._going_down:  # from the hook's True until the socket closes (shutdown polls every 0.5 s)
                start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
                return [b"the server is going down"]
            return inner(environ, start_response)

        return app

    def start(self) -> None:
        from moto.moto_server.werkzeug_app import MotoRequestHandler
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._going_down = False
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
def local_ray(dashboard: bool = False) -> Iterator[str]:
    """A real local Ray (2 CPUs; the dashboard only where a test reads Ray's state API), started now so its workers
    inherit the current environment."""
    import ray

    assert not ray.is_initialized(), "another test module left Ray running"
    ray.init(num_cpus=2, include_dashboard=dashboard, log_to_driver=True)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def state_address() -> str:
    """The GCS address of the Ray this process is connected to, for Ray's state API: without one it looks for a Ray
    on this machine and fails when it finds several ("Found multiple active Ray instances"), as when two test runs
    share the machine."""
    import ray

    return ray.get_runtime_context().gcs_address


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


RAY_FORWARDED = re.compile(r"^(\x1b\[\d+m)?\([^)]*\)")  # "(pid=gcs_server) ...": a line Ray's log monitor forwards


def own_lines(err: str) -> list[str]:
    """The lines of a captured stderr that mecpe printed: without those Ray forwards from its processes to every
    driver (a GCS error about an earlier test's actor, say), which no code of a refused command can hold back."""
    return [line for line in err.strip().splitlines() if not RAY_FORWARDED.match(line)]


def sigkill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def wait_job_gone(driver_pid: int, timeout: float = 60) -> None:
    """After a driver's SIGKILL: wait until Ray has marked its job dead and every actor of the job is dead with its
    process gone (the GCS tables of the Ray this process is connected to). Until then a writer actor of the killed
    job may still finish the shard it had in flight, so what a test reads as "done before the rerun" could grow."""
    import ray

    def job_id():
        return next((j["JobID"] for j in ray._private.state.jobs() if j.get("DriverPid") == driver_pid), None)

    jid = wait_for(job_id, timeout, f"the job of driver pid {driver_pid} in the GCS job table")

    def gone() -> bool:
        if not next(j["IsDead"] for j in ray._private.state.jobs() if j["JobID"] == jid):
            return False
        actors = [a for a in ray._private.state.actors().values() if a.get("JobID") == jid]
        return all(a.get("State") == "DEAD" and not _process_alive(a.get("Pid")) for a in actors)

    t0 = time.monotonic()
    wait_for(gone, timeout, f"job {jid}'s actors to be dead after its driver was killed", interval=0.1)
    print(f"job {jid} of driver pid {driver_pid}: dead, its actors' processes gone, after {time.monotonic() - t0:.1f} s")


def _process_alive(pid: int | None) -> bool:
    """A process of this machine that has not exited (a zombie has)."""
    try:
        return bool(pid) and Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


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


def registered_step(run_dir: str) -> int:
    """Global step of Ray Train's latest *registered* checkpoint of a run (its controller snapshot in storage; 0 when
    none): a checkpoint is complete in storage once registered."""
    from mecpe import storage

    snap_uri = storage.join(run_dir, "checkpoint_manager_snapshot.json")
    try:
        latest = storage.read_json(snap_uri).get("latest_checkpoint_result")
        if not latest:
            return 0
        state = storage.join(run_dir, latest["checkpoint_dir_name"], "checkpoint", "trainer_state.json")
        return int(storage.read_json(state)["global_step"])
    except (FileNotFoundError, OSError, ValueError, KeyError):
        return 0


def kill_when(ready: Callable[[], object], workers: str, timeout: float, what: str,
              alive: Callable[[], bool], interval: float = 0.1) -> tuple[object, list[int]]:
    """SIGKILL one process of the actors of ``workers`` as soon as ``ready()`` is truthy; returns (its value, the
    pids seen). Each poll SIGSTOPs those processes before it asks ``ready()`` and SIGCONTs them if it is not yet, so
    the state the predicate sees (checkpoints written, say) is the state the kill lands on: a worker stepping faster
    than the poll cannot run past it (CI once saw a run write two more checkpoints between seeing and killing)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not alive():
            raise AssertionError(f"the job ended before {what}")
        pids = alive_actor_pids(workers)
        if pids:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
            value = None
            try:
                value = ready()
            finally:
                if value:
                    sigkill(pids[0])
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)  # the other ranks; a no-op on the killed one
            if value:
                return value, pids
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def registered_at_least(run_dir: str, step: int) -> Callable[[], int]:
    """A ``ready`` for ``train_with_worker_kill``: the step of Ray Train's latest registered checkpoint once it is
    at least ``step`` (else 0)."""
    def ready() -> int:
        registered = registered_step(run_dir)
        return registered if registered >= step else 0
    return ready


def train_with_worker_kill(fit: Callable[[], object], ready: Callable[[], object], timeout: float = 600,
                           workers: str = "RayTrainWorker") -> tuple[object, dict]:
    """Run ``fit()`` (a training run) in a thread; once ``ready()`` is truthy (``registered_at_least``, say),
    SIGKILL one training worker process from outside (what a spot reclaim of a worker does; ``kill_when``). Returns
    (fit's result, {"pid" killed, "pids" of the workers, "ready": ready()'s value at the kill, "at": its time}).
    Re-raises fit's exception."""
    box: dict = {}

    def run():
        try:
            box["res"] = fit()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            box["err"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    value, pids = kill_when(ready, workers, timeout, f"{workers} and a checkpoint to kill it after",
                            alive=thread.is_alive)
    killed_at = time.time()
    thread.join(timeout)
    assert not thread.is_alive(), "the training run did not finish after the kill"
    if "err" in box:
        raise box["err"]
    return box["res"], {"pid": pids[0], "pids": pids, "ready": value, "at": killed_at}


def kill_busy_actor_task(class_substring: str, alive: Callable[[], bool], timeout: float = 300, tries: int = 5):
    """SIGKILL the process of an actor of ``class_substring`` *while it runs a task* (Ray's state API: a RUNNING
    actor task), so the kill takes work with it. Returns that task attempt (task_id, attempt_number, worker_pid).
    If the attempt had finished by the time the signal landed (the state API lags a little), or its process was
    gone already, it tries again on the next running task, up to ``tries`` times."""
    from ray.util.state import list_tasks

    def running():
        tasks = list_tasks(address=state_address(), filters=[("state", "=", "RUNNING"), ("type", "=", "ACTOR_TASK")],
                           detail=True, raise_on_missing_output=False)
        # a process already gone: the attempt ended and Ray Data stopped its idle actor, the state API lagging
        return [t for t in tasks if class_substring in (t.name or "") and t.name.endswith(".submit")
                and _process_alive(t.worker_pid)]

    def final_state(task):
        attempts = list_tasks(address=state_address(), filters=[("task_id", "=", task.task_id)], detail=True,
                              raise_on_missing_output=False)
        return next((a.state for a in attempts if a.attempt_number == task.attempt_number
                     and a.state in ("FAILED", "FINISHED")), None)

    for _ in range(tries):
        task = wait_for(running, timeout, f"a running {class_substring} task", interval=0.05, alive=alive)[0]
        try:
            sigkill(task.worker_pid)
        except ProcessLookupError:  # gone since running() looked (CI at e551298 failed on this)
            continue
        if wait_for(lambda: final_state(task), 60, "the killed attempt's final state") == "FAILED":
            return task
    raise AssertionError(f"every kill of a {class_substring} actor landed after its batch had finished")


def task_attempts(task_id: str) -> list:
    from ray.util.state import list_tasks

    return list_tasks(address=state_address(), filters=[("task_id", "=", task_id)], detail=True,
                      raise_on_missing_output=False)
