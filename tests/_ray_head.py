"""A real Ray head on loopback for tests that need the job server (``ray job submit``) or a fake autoscaling cluster.

The head runs as ``ray start --head --block`` in its own process session: every Ray process it starts (GCS, raylet,
dashboard, agents, workers, job drivers, and the fake cluster's worker nodes, which the autoscaler starts) is a
descendant of that one process, so stopping kills exactly that tree, never another Ray instance of the same user (a
``ray stop --force`` would end a pipeline running beside the test suite)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    """``ray start --head --block`` with its own ports and temp dir; ``stop()`` ends its process tree only."""

    def __init__(self, *, num_cpus: int = 2, env: dict | None = None, extra_args: list[str] | None = None,
                 port: int | None = None):
        self.port, self.dashboard_port = port or free_port(), free_port()
        # short: Ray's socket paths have a length limit
        self.temp_dir = Path("/tmp") / f"mecpe-ray-{os.getpid()}-{self.port}"
        self.env = dict(env or os.environ, PATH=f"{BIN}:{os.environ['PATH']}", RAY_AUTH_MODE="token")
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.gcs_address = f"127.0.0.1:{self.port}"
        self.log = self.temp_dir.with_suffix(".log")
        cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--port={self.port}", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={self.dashboard_port}", f"--num-cpus={num_cpus}", f"--temp-dir={self.temp_dir}",
               "--include-dashboard=true", "--disable-usage-stats",
               # the agents' fixed default ports (52365, ...) would collide with another Ray on this machine (a
               # second test run, a local instance): the job server then never gets an agent
               *(f"--{flag}={free_port()}" for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                        "runtime-env-agent-port", "metrics-export-port")),
               *(extra_args or [])]
        self._log_fh = open(self.log, "wb")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self._log_fh, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_for_job_server(self, timeout: float = 180) -> None:
        """Block until the job server takes a job: right after ``ray start`` the head's job agent may not be up yet
        and ``ray job submit`` fails with "No available agent to submit job". A trivial job is submitted until it
        succeeds; after ``timeout`` seconds the error names the last answer and the head's log."""
        end = time.monotonic() + timeout
        last = ""
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the Ray head exited ({self.proc.returncode}); log: {self.log}")
            try:
                proc = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", self.address, "--", "true"],
                                      env=self.env, capture_output=True, text=True, timeout=60)
            except subprocess.TimeoutExpired:
                last = "ray job submit timed out"
                continue
            if proc.returncode == 0:
                return
            last = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
            last = last[0]
            time.sleep(1.0)
        raise TimeoutError(f"the Ray job server at {self.address} took no job within {timeout:.0f} s "
                           f"(last answer: {last}); head log: {self.log}")

    def stop(self) -> None:
        """SIGTERM to ``ray start --block`` (it stops what it started), then SIGKILL to whatever of its tree is
        left. Only descendants of this head are touched."""
        try:
            root = psutil.Process(self.proc.pid)
            tree = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)  # it drains the node first; nothing of a test's needs draining
            except subprocess.TimeoutExpired:
                pass
        for p in tree:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(tree, timeout=30)
        self._log_fh.close()
