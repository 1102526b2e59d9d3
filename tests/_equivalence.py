"""Byte-for-byte equivalence of a refactor: every file the CLI writes, and what it prints, on the tiny model.

    tests/_equivalence.sh REV OUT                # export commit REV and run the commands below from that copy
    python tests/_equivalence.py compare A B    # compare two such folders; exit 1 on any difference

``run`` works in one fixed folder (``WORK``, moved to OUT when done), with the tiny model and the config at fixed
paths (``TINY``, ``SMOKE``), so the paths inside the files are the same in every run and for every checkout; it
trains into one fixed ``RUNS`` folder that later runs reuse (training is not what a refactor of the inference and
evaluation steps changes, and the adapters must be the same for the outputs to be comparable). Run it from an
exported copy of the commit (``tests/_equivalence.sh``): Ray's workers import mecpe from the driver's checkout, so
editing the working tree during a run would mix code.

Commands, through ``mecpe.cli.main`` in one process (one local Ray):
  data prepare --out, pipeline (smoke config, emotion bias fitted on the validation split), infer on the labelled
  validation file (scored beside the output), evaluate --config, evaluate --pred --gold --json --out-dir, and two
  user errors (a missing prediction file; an output folder of another run) with their exit codes and messages.

``compare`` compares every file byte for byte, except what legitimately differs between runs, each named here:
  * ``summary.json``: wall-clock fields (``wall_s``, ``finished``, ``this_run.pipeline_s``, per-stage ``actor_s``
    and ``utt_per_s_per_actor``, ``this_run.utt_per_s``, the engine's seconds and actor load times) and
    ``provenance.code`` (the commit and tree that ran);
  * ``_run.json``: ``created``;
  * ``pipeline.json``: ``timings_s``;
  * ``records/`` and ``rejects/`` shards: their names are uuid4s and their batching follows Ray's scheduling, so
    each folder is compared as the sorted lines of all its shards;
  * the CLI's printed output: the line ``pipeline finished in N s``, and in what went to stderr Ray Data's own
    progress lines (each starting with a timestamp: ``2026-12-05 06:27:03,378\tINFO logging_progress.py:174 --``).
Every other byte must be equal.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = Path("/tmp/eq_work")
RUNS = Path("/tmp/eq_runs")
TINY = Path("/tmp/eq_tiny")
SMOKE = Path("/tmp/eq_smoke.yaml")

SUMMARY_TIMES = {("wall_s",), ("finished",), ("this_run", "pipeline_s"), ("this_run", "utt_per_s"),
                 ("provenance", "code")}
STAGE_TIMES = {"actor_s", "utt_per_s_per_actor"}
RAY_LOG = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\t(DEBUG|INFO|WARNING) ")
ENGINE_TIMES = {"seconds", "prefill_s", "decode_s", "prompts_per_s"}


def _commands(tiny: str) -> list[tuple[str, list[str]]]:
    w = str(WORK)
    common = [f"storage.path={RUNS}", f"model.base={tiny}"]
    pipe_cfg = f"{w}/pipe/config.yaml"
    return [
        ("prepare", ["data", "prepare", "--config", str(SMOKE), f"--out={w}/prepared", f"output_dir={w}/x", *common]),
        ("pipeline", ["pipeline", "--config", str(SMOKE), f"output_dir={w}/pipe", *common,
                      "validation.fit_emotion_bias=true"]),
        ("infer", ["infer", "--config", pipe_cfg, "--input", f"{w}/pipe/data/val-first-8.json",
                   "--output", f"{w}/infer_val"]),
        ("evaluate-config", ["evaluate", "--config", pipe_cfg, f"output_dir={w}/eval",
                             "--pred", f"{w}/pipe/Subtask_2_pred.json", "--gold", f"{w}/pipe/data/test-first-12.json"]),
        ("evaluate-files", ["evaluate", "--pred", f"{w}/pipe/Subtask_2_pred.json",
                            "--gold", f"{w}/pipe/data/test-first-12.json", "--json", f"{w}/ev_files/m.json",
                            "--out-dir", f"{w}/ev_files"]),
        ("error-missing-pred", ["evaluate", "--pred", f"{w}/nothing.json", "--gold", f"{w}/pipe/data/test.json"]),
        ("error-other-run", ["infer", "--config", pipe_cfg, "--input", f"{w}/pipe/data/test-first-12.json",
                             "--output", f"{w}/infer_val"]),
    ]


def run(out: Path) -> None:
    import ray

    sys.path.insert(0, str(REPO / "tests"))
    from _tiny import tiny_model_dir

    import mecpe
    from mecpe.cli import main

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    if not (TINY / "config.json").exists():
        shutil.copytree(tiny_model_dir(), TINY)
    shutil.copyfile(REPO / "jobs" / "configs" / "smoke.yaml", SMOKE)
    tiny = str(TINY)
    mecpe.log_to_stdout()  # progress lines to the real stdout, not into the captured CLI output
    ray.init(address="local", log_to_driver=False)
    printed = {}
    for name, argv in _commands(tiny):
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            rc = main(argv)
        printed[name] = {"argv": argv, "rc": rc, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}
        print(f"== {name}: rc {rc}\n{stdout.getvalue()}{stderr.getvalue()}", flush=True)
    (WORK / "cli_output.json").write_text(json.dumps(printed, indent=2) + "\n")
    ray.shutdown()
    shutil.rmtree(out, ignore_errors=True)
    shutil.move(str(WORK), str(out))


def _drop(obj: dict, path: tuple[str, ...]) -> None:
    for key in path[:-1]:
        obj = obj.get(key) or {}
    if path[-1] in obj:
        obj[path[-1]] = "<normalized>"


def _normalize_summary(raw: bytes) -> bytes:
    s = json.loads(raw)
    for path in SUMMARY_TIMES:
        _drop(s, path)
    for stage in (s.get("this_run", {}).get("stages") or {}).values():
        for k in STAGE_TIMES & set(stage):
            stage[k] = "<normalized>"
    engine = s.get("this_run", {}).get("engine") or {}
    for key, counters in engine.items():
        if key == "load_s":
            engine[key] = "<normalized>"
        else:
            for k in ENGINE_TIMES & set(counters):
                counters[k] = "<normalized>"
    return json.dumps(s, indent=2, sort_keys=False).encode()


def _normalize_cli(raw: bytes) -> bytes:
    runs = json.loads(raw)
    for r in runs.values():
        r["stdout"] = re.sub(r"pipeline finished in [0-9.]+ s", "pipeline finished in <normalized> s", r["stdout"])
        r["stderr"] = "".join(line for line in r["stderr"].splitlines(keepends=True) if not RAY_LOG.match(line))
    return json.dumps(runs, indent=2).encode()


def _normalized(rel: str, raw: bytes) -> bytes:
    name = rel.rsplit("/", 1)[-1]
    if name == "summary.json":
        return _normalize_summary(raw)
    if name == "_run.json":
        d = json.loads(raw)
        d["created"] = "<normalized>"
        return json.dumps(d, indent=2).encode()
    if name == "pipeline.json":
        d = json.loads(raw)
        d["timings_s"] = "<normalized>"
        return json.dumps(d, indent=2).encode()
    if name == "cli_output.json":
        return _normalize_cli(raw)
    return raw


def _contents(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes as compared; shard folders (records/, rejects/) become one entry of sorted lines."""
    out: dict[str, bytes] = {}
    shards: dict[str, list[bytes]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        parent = path.parent.name
        if parent in ("records", "rejects") and path.suffix == ".jsonl":
            shards.setdefault(path.parent.relative_to(root).as_posix() + "/*.jsonl", []).extend(
                path.read_bytes().splitlines())
            continue
        out[rel] = _normalized(rel, path.read_bytes())
    for key, lines in shards.items():
        out[key] = b"\n".join(sorted(lines))
    return out


def compare(a: Path, b: Path) -> int:
    ca, cb = _contents(a), _contents(b)
    bad = 0
    for rel in sorted(set(ca) | set(cb)):
        if rel not in ca or rel not in cb:
            print(f"ONLY IN {'B' if rel in cb else 'A'}: {rel}")
            bad += 1
        elif ca[rel] != cb[rel]:
            print(f"DIFFERS: {rel}")
            bad += 1
        else:
            print(f"same: {rel} ({len(ca[rel])} bytes)")
    print(f"{len(set(ca) | set(cb))} entries compared, {bad} differ")
    return 1 if bad else 0


if __name__ == "__main__":
    cmd, *paths = sys.argv[1:]
    if cmd == "run":
        run(Path(paths[0]))
    else:
        sys.exit(compare(Path(paths[0]), Path(paths[1])))
