"""Where a command's CPU goes, by kind of process (issue #27: the suite is CPU-bound on 2 cores, and most of its
processes are Ray's, which ``time`` does not count). Polls every process of this machine while the command runs and
keeps each one's last-seen user+system CPU, then prints a table by kind: the pytest process, Ray's daemons (GCS,
raylet, dashboard, its agents, monitors), Ray workers by actor class (``ray::Name``), idle workers, other processes.
A process that exits between two polls loses at most one interval of its CPU.

    python bench/cpu_by_process.py --interval 0.5 -- .venv/bin/pytest tests/test_cluster.py -q
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import time

import psutil

DAEMONS = (("gcs_server", "gcs_server"), ("raylet", "raylet"), ("dashboard/agent.py", "dashboard agent"),
           ("runtime_env/agent", "runtime-env agent"), ("dashboard/dashboard.py", "dashboard"),
           ("log_monitor.py", "log monitor"), ("autoscaler/_private/monitor.py", "autoscaler monitor"),
           ("plasma", "plasma"), ("moto_server", "moto S3"), ("ThreadedMotoServer", "moto S3"))


def kind_of(proc: psutil.Process) -> str:
    """A short label for ``proc`` from its name and command line."""
    try:
        name, cmd = proc.name(), " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "?"
    if name.startswith("ray::") or cmd.startswith("ray::"):
        label = (cmd or name).split()[0]
        return "ray worker (idle)" if label in ("ray::IDLE", "ray::IDLE_SPILL_WORKER") else re.sub(r"\..*", "", label)
    for needle, label in DAEMONS:
        if needle in cmd or needle in name:
            return label
    if "default_worker.py" in cmd:
        return "ray worker (starting)"
    if "pytest" in cmd:
        return "pytest"
    return name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    me = os.getpid()
    before = {p.pid for p in psutil.process_iter()}
    seen: dict[int, tuple[str, float]] = {}
    kinds: dict[int, str] = {}
    t0 = time.time()
    child = subprocess.Popen(command)
    while child.poll() is None:
        for p in psutil.process_iter():
            if p.pid in before or p.pid == me:
                continue
            try:
                c = p.cpu_times()
                label = kind_of(p)  # a worker's name changes once it holds an actor: keep the latest known one
                if label not in ("?", "ray worker (starting)") or p.pid not in kinds:
                    kinds[p.pid] = label
                seen[p.pid] = (kinds[p.pid], c.user + c.system)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        time.sleep(args.interval)
    wall = time.time() - t0
    by_kind: dict[str, list[float]] = collections.defaultdict(list)
    for label, cpu in seen.values():
        by_kind[label].append(cpu)
    total = sum(sum(v) for v in by_kind.values())
    print(f"command: {' '.join(command)}\nexit {child.returncode}; wall {wall:.1f} s on {psutil.cpu_count()} cores; "
          f"CPU of the processes it started {total:.1f} s ({total / max(wall, 1e-9) / psutil.cpu_count():.0%} of the cores); "
          f"{len(seen)} processes")
    print(f"{'kind':<40}{'processes':>10}{'CPU s':>9}{'share':>8}")
    for label, cpus in sorted(by_kind.items(), key=lambda kv: -sum(kv[1])):
        print(f"{label[:39]:<40}{len(cpus):>10}{sum(cpus):>9.1f}{sum(cpus) / (total or 1):>8.1%}")


if __name__ == "__main__":
    main()
