"""Inference at corpus scale with a real model (issue #29): ``mecpe infer`` end to end over N copies of the ECF test
set, one GPU, through the CLI only; prints a table and writes every figure to ``--json``.

Steps (each optional, in this order):

* adapters: reused from ``--work`` when there, else ``mecpe data prepare`` + ``mecpe train --task emotion|cause``
  with ``--config`` (``--train``), or given (``--emotion-adapter`` / ``--cause-adapter``); ``--emotion-members N``
  also trains (or reuses) the emotion ensemble's members 1..N-1 (``mecpe.pipeline.ensemble_member``'s seeds), whose
  label scores the emotion stage then averages (``inference.emotion_ensemble``: N scoring passes, as the committed
  SmolLM2 config's pipeline runs with 3); by default one emotion adapter;
* scales: for each N of ``--scales``, a fresh ``mecpe infer`` process over the corpus (``bench/ecf_corpus.py``;
  1 = the official test JSON itself, 3,101 utterances, labelled, so it is scored too). Measured from outside:
  ``wall_s`` from the command's start to the last output file written (Ray start and model load included), GPU busy
  fraction (an ``nvidia-smi`` sampling thread; null without one), peak RSS of the driver, of the largest predictor
  actor and of the whole process tree (psutil, every 0.25 s). From its ``summary.json``: per-stage utterances, busy
  (actor) seconds and rates, engine counters, from which the share of the physical limit (``bench/limits.py``).
  Every input conversation must end exactly once in ``Subtask_2_pred.json`` or the rejects (``ecf_corpus.check``),
  and copy 1 of each corpus is compared with the 1x run (emotion labels and cause lists equal);
* kill: ``--kill-scale N`` runs that corpus, SIGKILLs the driver once ``--kill-at`` of the conversations are written,
  reruns the same command (it must resume) and checks counts and uniqueness;
* profile: ``--profile-s S`` samples one predictor actor with py-spy for S seconds during the largest run.

    python bench/bench_corpus.py --work /tmp/c --json /tmp/c/corpus.json --train --scales 1,10,100
    python bench/bench_corpus.py --from-json bench/results/DATE-corpus/corpus.json     # reprint the table
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import ecf_corpus  # noqa: E402
import limits  # noqa: E402

CONFIG = "jobs/configs/ecf-smollm2.yaml"
OUTPUT_FILES = (ecf_corpus.PRED_FILE, ecf_corpus.REJECTS_FILE, ecf_corpus.SUMMARY_FILE)


# ---------------------------------------------------------------- samplers


class GpuSampler:
    """``nvidia-smi`` every 250 ms in a thread: utilisation (busy fraction) and memory used; empty without one."""

    def __init__(self):
        self.util: list[float] = []
        self.mem_mib: list[float] = []
        self.proc = None
        self.thread = None

    def start(self) -> "GpuSampler":
        if shutil.which("nvidia-smi") is None:
            return self
        self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                      "--format=csv,noheader,nounits", "-lms", "250"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            parts = [p.strip() for p in line.split(",")]
            try:  # one line per GPU: this bench uses one, the first
                self.util.append(float(parts[0]))
                self.mem_mib.append(float(parts[1]))
            except (ValueError, IndexError):
                continue

    def stop(self) -> dict:
        if self.proc is None:
            return {"gpu_busy_fraction": None, "gpu_samples": 0, "gpu_mem_peak_mib": None}
        self.proc.terminate()
        self.proc.wait()
        self.thread.join(timeout=5)
        n = len(self.util)
        return {"gpu_busy_fraction": round(sum(self.util) / n / 100, 3) if n else None, "gpu_samples": n,
                "gpu_mem_peak_mib": max(self.mem_mib) if self.mem_mib else None}


class TreeSampler:
    """Resident memory of a process and its descendants (the driver, Ray's processes, the model actors) every
    250 ms in a thread; remembers every pid seen, so a killed run's leftovers can be found."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak = {"driver": 0, "actor": 0, "tree": 0}
        self.seen: dict[int, str] = {}
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "TreeSampler":
        self.thread.start()
        return self

    def _run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop.is_set():
            self._sample(root, psutil)
            self._stop.wait(0.25)

    def _sample(self, root, psutil) -> None:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        total = 0
        for p in procs:
            try:  # the title is read each time: a Ray worker starts as ray::IDLE and becomes an actor later
                rss = p.memory_info().rss
                self.seen[p.pid] = " ".join(p.cmdline())[:160]
            except psutil.Error:
                continue
            total += rss
            if p.pid == self.pid:
                self.peak["driver"] = max(self.peak["driver"], rss)
            elif "Predictor" in self.seen[p.pid]:
                self.peak["actor"] = max(self.peak["actor"], rss)
        self.peak["tree"] = max(self.peak["tree"], total)

    def predictor_pids(self) -> list[int]:
        return [pid for pid, cmd in self.seen.items() if "Predictor" in cmd]

    def stop(self) -> dict:
        self._stop.set()
        self.thread.join(timeout=5)
        return {f"{k}_peak_rss_mib": round(v / 2**20, 1) for k, v in self.peak.items()}


# ---------------------------------------------------------------- running the CLI


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mecpe.cli", *args]


def last_output_time(out_dir: str) -> float | None:
    """When the last of the run's result files was written (summary.json comes last)."""
    times = [os.path.getmtime(os.path.join(out_dir, f)) for f in OUTPUT_FILES
             if os.path.exists(os.path.join(out_dir, f))]
    return max(times) if times else None


def run_measured(cmd: list[str], log_path: str, out_dir: str, profile=None) -> dict:
    """Run ``cmd`` (a ``mecpe infer``) with the GPU and memory samplers; wall from start to the last output file."""
    gpu = GpuSampler().start()
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=_env())
        tree = TreeSampler(proc.pid).start()
        prof = profile(tree, proc) if profile else None
        rc = proc.wait()
    end = last_output_time(out_dir)
    res = {"rc": rc, "wall_s": round((end if rc == 0 and end else time.time()) - t0, 2),
           "command_s": round(time.time() - t0, 2), **tree.stop(), **gpu.stop()}
    if prof is not None:
        prof.join()
    return res


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def run_cli(args: list[str], log_path: str) -> str:
    """A short CLI step (prepare, train); its output, raising with the log's tail when it fails."""
    proc = subprocess.run(cli(*args), cwd=REPO, capture_output=True, text=True, env=_env())
    with open(log_path, "w") as fh:
        fh.write(proc.stdout + proc.stderr)
    if proc.returncode:
        raise RuntimeError(f"mecpe {' '.join(args)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout


# ---------------------------------------------------------------- adapters


def adapters_file(work: str) -> str:
    return os.path.join(work, "adapters.json")


def saved_adapters(work: str, members: int = 1) -> dict | None:
    """Adapters a previous call trained into ``work`` (with ``members`` emotion adapters in all) and that are still
    on disk (the machine may be new)."""
    try:
        with open(adapters_file(work)) as fh:
            saved = json.load(fh)
    except (OSError, ValueError):
        return None
    paths = [saved.get("emotion"), saved.get("cause"), *saved.get("emotion_ensemble", [])]
    if len(paths) != members + 1 or not all(os.path.isdir(p or "") for p in paths):
        return None
    return saved


def member_seeds(config: str, sets: list[str], members: int) -> list[int]:
    """``training.seed`` of emotion-ensemble members 1..members-1, as the pipeline trains them."""
    sys.path.insert(0, REPO)
    from mecpe.config import load_config
    from mecpe.pipeline import ensemble_member

    cfg = load_config(config, sets)
    return [ensemble_member(cfg, k).training.seed for k in range(1, members)]


def train_adapters(work: str, config: str, sets: list[str], members: int = 1) -> dict:
    """``mecpe data prepare`` then ``mecpe train`` for both tasks and the emotion members beyond the first (the CLI
    reuses a finished run); the adapter paths it prints, and how long each step took."""
    pipe = os.path.join(work, "pipeline")
    common = ["--config", config, *sets, f"output_dir={pipe}", f"storage.path={pipe}/runs"]
    out: dict = {"seconds": {}}
    t = time.time()
    run_cli(["data", "prepare", *common], os.path.join(work, "prepare.log"))
    out["seconds"]["prepare"] = round(time.time() - t, 1)
    jobs = [("emotion", "emotion", []), ("cause", "cause", [])]
    jobs += [(f"emotion_{k}", "emotion", [f"training.seed={seed}"])
             for k, seed in enumerate(member_seeds(config, sets, members), 1)]
    for name, task, extra in jobs:
        t = time.time()
        text = run_cli(["train", "--task", task, *common, *extra], os.path.join(work, f"train-{name}.log"))
        out["seconds"][f"train_{name}"] = round(time.time() - t, 1)
        path = re.search(rf"{task} adapter: (\S+) \(run", text).group(1)
        if name.startswith("emotion_"):
            out.setdefault("emotion_ensemble", []).append(path)
        else:
            out[task] = path
    with open(adapters_file(work), "w") as fh:
        json.dump(out, fh, indent=1)
    return out


def resolve_adapters(a) -> dict | None:
    if a.emotion_adapter and a.cause_adapter:
        return {"emotion": a.emotion_adapter, "cause": a.cause_adapter, "seconds": {}}
    saved = saved_adapters(a.work, a.emotion_members)
    if saved:
        return {**saved, "reused": True}
    return train_adapters(a.work, a.config, a.set, a.emotion_members) if a.train else None


# ---------------------------------------------------------------- one inference run


def infer_overrides(a, adapters: dict) -> list[str]:
    members = adapters.get("emotion_ensemble") or []
    return [*a.set, f"inference.emotion_adapter={adapters['emotion']}", f"inference.cause_adapter={adapters['cause']}",
            f"inference.emotion_ensemble=[{','.join(members)}]",
            f"inference.num_actors={a.actors}", f"inference.num_gpus={a.num_gpus}",
            f"inference.max_batch_tokens={a.max_batch_tokens}", f"inference.batch_size={a.batch_size}"]


def input_for(a, scale: int) -> tuple[str, dict]:
    """Scale 1: the official test JSON (labelled, scored); N > 1: the N-times JSONL corpus."""
    if scale == 1:
        path = os.path.join(a.data, ecf_corpus.TEST_FILE)
        convs = ecf_corpus.test_conversations(a.data)
        return path, {"conversations": len(convs), "utterances": sum(len(c["conversation"]) for c in convs)}
    path = os.path.join(a.work, f"corpus-x{scale}.jsonl")
    return path, ecf_corpus.ensure_corpus(a.data, scale, path)


def infer_cmd(a, adapters: dict, inp: str, out: str) -> list[str]:
    return cli("infer", "--config", a.config, "--input", inp, "--output", out, *infer_overrides(a, adapters))


def run_scale(a, adapters: dict, scale: int, name: str, profile_s: float = 0) -> dict:
    """One fresh ``mecpe infer`` over the scale's input; its measured and reported figures and the checks."""
    inp, counts = input_for(a, scale)
    out = os.path.join(a.work, f"out-{name}")
    shutil.rmtree(out, ignore_errors=True)
    cmd = infer_cmd(a, adapters, inp, out)
    profile = (lambda tree, proc: start_profile(tree, proc, profile_s, os.path.join(a.work, "profile-raw.txt"))) \
        if profile_s else None
    measured = run_measured(cmd, os.path.join(a.work, f"infer-{name}.log"), out, profile)
    rec = {"name": name, "scale": scale, "input": counts, "command": " ".join(cmd), **measured}
    if measured["rc"]:
        rec["log_tail"] = _tail(os.path.join(a.work, f"infer-{name}.log"))
        return rec
    rec.update(from_summary(out, counts, measured["wall_s"]))
    rec["check"] = ecf_corpus.check_output(inp, out)
    if scale > 1 and os.path.exists(os.path.join(a.work, "out-x1", ecf_corpus.PRED_FILE)):
        rec["agreement_with_x1"] = agreement(os.path.join(a.work, "out-x1"), out)
    if scale == 1:
        rec["metrics"] = _metrics(out)
    return rec


def _tail(path: str, n: int = 3000) -> str:
    with open(path, errors="replace") as fh:
        return fh.read()[-n:]


def _metrics(out: str) -> dict | None:
    path = os.path.join(out, "metrics.json")
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        m = json.load(fh)
    return {k: m.get(k) for k in ("weighted_f1", "f1_pair", "emotion_accuracy")}


def from_summary(out: str, counts: dict, wall_s: float) -> dict:
    """Figures of the run's ``summary.json``: counts, per-stage work and rates, engine counters, load times."""
    with open(os.path.join(out, ecf_corpus.SUMMARY_FILE)) as fh:
        s = json.load(fh)
    tr = s["this_run"]
    stages = {k: {"utterances": v["utterances"], "busy_s": v["actor_s"], "utt_per_s_busy": v["utt_per_s_per_actor"]}
              for k, v in tr["stages"].items()}
    return {"conversations": s["conversations"], "utterances": s["utterances"], "rejects": s["rejects"],
            "utt_per_s": round(counts["utterances"] / wall_s, 1) if wall_s else None,
            "pipeline_s": tr["pipeline_s"], "mecpe_wall_s": s.get("wall_s"), "stages": stages,
            "engine": tr.get("engine") or {}, "actor_load_s": (tr.get("engine") or {}).get("load_s"),
            "gpu_peak_gib_torch": tr.get("gpu_peak_gib"), "resources": tr.get("resources"),
            "resumed": s.get("resumed"), "done_before_this_run": s.get("done_before_this_run"),
            "commit": (s.get("provenance") or {}).get("code")}


# ---------------------------------------------------------------- agreement with the 1x run


def utterance_answers(out_dir: str, copy: int | None) -> dict[tuple[int, int], tuple[str, tuple[int, ...]]]:
    """{(official conversation id, utterance id): (emotion, cause ids)} of an output; ``copy``: keep only that
    copy of a corpus (ids mapped back), None: ids as they are (the 1x run)."""
    with open(os.path.join(out_dir, ecf_corpus.PRED_FILE), encoding="utf-8") as fh:
        pred = json.load(fh)
    out = {}
    for c in pred:
        cid = int(c["conversation_ID"])
        if copy is not None:
            k, cid = ecf_corpus.original_id(cid)
            if k != copy:
                continue
        causes: dict[int, list[int]] = {}
        for emo, cause in c.get("emotion-cause_pairs") or []:
            causes.setdefault(int(emo.split("_", 1)[0]), []).append(int(cause))
        for u in c["conversation"]:
            uid = int(u["utterance_ID"])
            out[(cid, uid)] = (u.get("emotion"), tuple(sorted(causes.get(uid, []))))
    return out


def agreement(x1_dir: str, corpus_dir: str) -> dict:
    """Share of utterances of copy 1 whose emotion label, and whose cause list, equal the 1x run's."""
    ref, got = utterance_answers(x1_dir, None), utterance_answers(corpus_dir, 1)
    keys = [k for k in ref if k in got]
    n = len(keys)
    emo = sum(ref[k][0] == got[k][0] for k in keys)
    cau = sum(ref[k][1] == got[k][1] for k in keys)
    return {"utterances_compared": n, "missing": len(ref) - n, "emotion_equal": round(emo / n, 4) if n else None,
            "causes_equal": round(cau / n, 4) if n else None}


# ---------------------------------------------------------------- kill and resume


def written_conversations(out_dir: str) -> int:
    """Conversations in the shards written so far (records and rejects, one line each)."""
    n = 0
    for sub in ("records", "rejects"):
        d = os.path.join(out_dir, sub)
        for name in os.listdir(d) if os.path.isdir(d) else []:
            if name.endswith(".jsonl"):
                with open(os.path.join(d, name), "rb") as fh:
                    n += sum(1 for _ in fh)
    return n


def kill_midway(cmd: list[str], out: str, total: int, at: float, log_path: str, timeout: float) -> dict:
    """Start ``cmd``, SIGKILL the driver once ``at`` of ``total`` conversations are written; then wait for its
    processes (Ray's included) to go, ending by pid those of its tree still there after 60 s."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=_env())
        tree = TreeSampler(proc.pid).start()
        t0, done = time.time(), 0
        while proc.poll() is None and time.time() - t0 < timeout:
            done = written_conversations(out)
            if done >= at * total:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.5)
        killed = proc.poll() is None or proc.returncode == -signal.SIGKILL
        proc.wait()
    tree.stop()
    leftovers = end_leftovers(list(tree.seen), 60)
    return {"killed": killed, "killed_after_s": round(time.time() - t0, 1), "written_at_kill": done,
            "leftover_processes": leftovers}


def end_leftovers(pids: list[int], grace: float) -> list[str]:
    """Processes of the killed run's tree still alive after ``grace`` seconds: named, then killed by pid."""
    import psutil

    alive = []
    for pid in pids:
        try:
            alive.append(psutil.Process(pid))
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(alive, timeout=grace)
    names = []
    for p in alive:
        try:
            names.append(" ".join(p.cmdline())[:120])
            p.kill()
        except psutil.Error:
            pass
    return names


def kill_and_resume(a, adapters: dict, scale: int) -> dict:
    """The corpus run killed mid-way and rerun: it must resume and end with every conversation once."""
    inp, counts = input_for(a, scale)
    out = os.path.join(a.work, f"out-kill-x{scale}")
    shutil.rmtree(out, ignore_errors=True)
    cmd = infer_cmd(a, adapters, inp, out)
    first = kill_midway(cmd, out, counts["conversations"], a.kill_at, os.path.join(a.work, "kill-first.log"),
                        a.kill_timeout)
    rerun = run_measured(cmd, os.path.join(a.work, "kill-rerun.log"), out)
    rec = {"scale": scale, "input": counts, "kill_at": a.kill_at, "first": first, "rerun": rerun}
    if rerun["rc"] == 0:
        rec["rerun"].update(from_summary(out, counts, rerun["wall_s"]))
        rec["check"] = ecf_corpus.check_output(inp, out)
        rec["ok"] = bool(first["killed"] and rec["rerun"]["resumed"] and rec["check"]["ok"])
    else:
        rec["ok"], rec["log_tail"] = False, _tail(os.path.join(a.work, "kill-rerun.log"))
    return rec


# ---------------------------------------------------------------- profile (py-spy, outside mecpe)


def start_profile(tree: TreeSampler, proc, seconds: float, raw_path: str) -> threading.Thread:
    """A thread that waits for the first shard (model loaded, batches flowing), then samples the predictor actor
    with ``py-spy record`` (collapsed stacks, idle included: waiting for input shows)."""

    def run():
        out = os.path.dirname(raw_path)
        while proc.poll() is None and not (tree.predictor_pids() and _any_shard(out)):
            time.sleep(0.5)
        pids = tree.predictor_pids()
        if proc.poll() is not None or not pids or shutil.which("py-spy") is None:
            return
        subprocess.run(["py-spy", "record", "--pid", str(pids[0]), "--duration", str(int(seconds)), "--rate", "100",
                        "--format", "raw", "--idle", "--nonblocking", "--output", raw_path],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _any_shard(work: str) -> bool:
    for name in os.listdir(work):
        d = os.path.join(work, name, "records")
        if name.startswith("out-") and os.path.isdir(d) and os.listdir(d):
            return True
    return False


def summarize_profile(raw_path: str, top: int = 15) -> dict | None:
    """Share of samples per function, by self time (the innermost frame) and inclusive (anywhere on the stack)."""
    if not os.path.exists(raw_path):
        return None
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    with open(raw_path) as fh:
        for line in fh:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n, frames = int(count), stack.split(";")
            total += n
            own[frames[-1]] = own.get(frames[-1], 0) + n
            for f in set(frames):
                incl[f] = incl.get(f, 0) + n

    def ranked(d):
        return [(f, round(n / total, 3)) for f, n in sorted(d.items(), key=lambda x: -x[1])[:top]]

    return {"samples": total, "self": ranked(own), "inclusive": ranked(incl)} if total else None


# ---------------------------------------------------------------- results


def update_json(path: str, key: str, value) -> dict:
    """Merge ``value`` under ``key`` into the JSON file (several calls of this script build one file)."""
    res = {}
    if os.path.exists(path):
        with open(path) as fh:
            res = json.load(fh)
    if key == "runs":
        res.setdefault("runs", {}).update(value)
    else:
        res[key] = value
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(res, fh, indent=1, default=str)
    os.replace(tmp, path)
    return res


def environment(a) -> dict:
    """What ran: the GPU (nvidia-smi), the code (git), the model's shape, the command."""
    return {"date": time.strftime("%Y-%m-%d"), "gpu": _gpu_name(), "cpus": os.cpu_count(), "commit": _commit(),
            "command": " ".join(sys.argv), "config": a.config, "sets": a.set}


def _gpu_name() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.strip() or None


def _commit() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip() or None

    return {"head": git("rev-parse", "--short", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", "mecpe",
                                                                             "bench"))}


def model_shape(a) -> dict | None:
    """The base model's shape from its config.json: ``--model-dir``, else the folder mecpe resolves ``model.base``
    to (the converted GGUF lives in ``model.cache_dir``)."""
    if a.model_dir:
        return limits.read_model_shape(a.model_dir)
    try:
        from mecpe.config import load_config
        from mecpe.sources import resolve_base

        cfg = load_config(os.path.join(REPO, a.config), a.set).model
        return limits.read_model_shape(resolve_base(cfg.base, cfg.revision, cfg.cache_dir)[0])
    except Exception as exc:  # noqa: BLE001 - the table shows no limit rather than failing the run
        print(f"no model shape ({type(exc).__name__}: {exc}): limits not computed", file=sys.stderr)
        return None


def f(x, d: int = 1) -> str:
    return "-" if x is None else f"{x:,.{d}f}" if isinstance(x, float) else f"{x:,}" if isinstance(x, int) else str(x)


def print_table(res: dict) -> None:
    env = res.get("environment", {})
    print(f"\n{env.get('date')}  gpu: {env.get('gpu')}  commit {env.get('commit')}  {env.get('cpus')} CPUs")
    members = 1 + len((res.get("adapters") or {}).get("emotion_ensemble") or [])
    print(f"emotion adapters: {members} ({members} label-scoring passes per utterance), cause adapter: 1")
    print("| run | conv. | utterances | wall s | utt/s (end to end) | emotion utt / busy s / utt/s | "
          "cause utt / busy s / utt/s | GPU busy | driver / actor / tree peak RSS MiB | in pred + rejects once | "
          "agreement with 1x (emotion / causes) |")
    print("|" + "---|" * 11)
    for name, r in res.get("runs", {}).items():
        if r.get("rc"):
            print(f"| {name} | failed rc={r['rc']} |" + " |" * 9)
            continue
        st, chk, ag = r.get("stages", {}), r.get("check") or {}, r.get("agreement_with_x1") or {}
        cells = [f"{f(s.get('utterances'))} / {f(s.get('busy_s'))} / {f(s.get('utt_per_s_busy'))}"
                 for s in (st.get("emotion", {}), st.get("cause", {}))]
        print(f"| {name} | {f(r.get('conversations'))} | {f(r.get('utterances'))} | {f(r.get('wall_s'))} | "
              f"{f(r.get('utt_per_s'))} | {cells[0]} | {cells[1]} | {f(r.get('gpu_busy_fraction'), 3)} | "
              f"{f(r.get('driver_peak_rss_mib'))} / {f(r.get('actor_peak_rss_mib'))} / {f(r.get('tree_peak_rss_mib'))}"
              f" | {chk.get('ok')} ({chk.get('predicted')} + {chk.get('rejected')}) | "
              f"{f(ag.get('emotion_equal'), 4)} / {f(ag.get('causes_equal'), 4)} |")
    print_memory(res)
    print_limits(res)
    print_kill(res.get("kill"))
    print_baseline(res)
    print_profile(res.get("profile"))


def print_memory(res: dict) -> None:
    """Peak RSS of the largest corpus against the smallest (memory must not grow with the corpus)."""
    runs = [r for r in res.get("runs", {}).values() if not r.get("rc") and r.get("scale", 1) > 1]
    if len(runs) < 2:
        return
    lo, hi = min(runs, key=lambda r: r["scale"]), max(runs, key=lambda r: r["scale"])
    print(f"\nmemory, {hi['scale']}x against {lo['scale']}x: " + ", ".join(
        f"{k} {f(hi.get(f'{k}_peak_rss_mib'))} / {f(lo.get(f'{k}_peak_rss_mib'))} MiB = "
        f"{hi[f'{k}_peak_rss_mib'] / lo[f'{k}_peak_rss_mib']:.2f}x" for k in ("driver", "actor", "tree")
        if lo.get(f"{k}_peak_rss_mib")))


def print_limits(res: dict) -> None:
    shape = res.get("model_shape")
    if not shape:
        return
    print(f"\nshare of the physical limit (model: {shape['params']:,} parameters, {shape['non_embedding_params']:,} "
          f"non-embedding; FLOPs = 2 x non-embedding params x tokens + output layer; peak 989 TFLOP/s dense bf16; "
          f"decode bytes bound 4.8 TB/s)")
    print("| run | stage | TFLOPs needed | busy s | share of peak (busy) | prefill s | share of peak (prefill) | "
          "decode s / steps | bytes-bound limit s | share of bytes limit (decode) |\n|" + "---|" * 10)
    for name, r in res.get("runs", {}).items():
        lim = limits.stage_limits(shape, r.get("engine") or {}, {k: v["busy_s"] for k, v in
                                                                 (r.get("stages") or {}).items()})
        for stage, x in lim.items():
            print(f"| {name} | {stage} | {x['flops'] / 1e12:,.1f} | {f(x['busy_s'])} | "
                  f"{f(x['share_of_peak_busy'], 4)} | {f(x['prefill_s'])} | {f(x['share_of_peak_prefill'], 4)} | "
                  f"{f(x['decode_s'])} / {x['decode_steps']} | {f(x['decode_bytes_limit_s'], 3)} | "
                  f"{f(x['share_of_bytes_limit_decode'], 3)} |")


def print_kill(k: dict | None) -> None:
    if not k:
        return
    first, chk = k["first"], k.get("check") or {}
    print(f"\nkill and resume ({k['scale']}x, {k['input']['conversations']:,} conversations): driver SIGKILLed after "
          f"{first['killed_after_s']} s with {first['written_at_kill']:,} written (killed: {first['killed']}; "
          f"leftover processes: {len(first['leftover_processes'])}); rerun resumed: {k['rerun'].get('resumed')} "
          f"({f(k['rerun'].get('done_before_this_run'))} done before), wall {k['rerun'].get('wall_s')} s; final: "
          f"{chk.get('predicted')} predicted + {chk.get('rejected')} rejected, missing {chk.get('missing')}, more than "
          f"once {chk.get('more_than_once')} -> {'OK' if k.get('ok') else 'FAILED'}")


def print_baseline(res: dict) -> None:
    """mecpe's end-to-end rate on each corpus against the baseline's (bench_generate_baseline.py)."""
    b = res.get("baseline")
    if not b:
        return
    rate = b["utt_per_s_generate"]
    print(f"\nbaseline (merged adapters, transformers generate per utterance prompt, batch {b['batch_size']}, stop at "
          f"EOS; {b['utterances']:,} utterances): {rate:.1f} utt/s generate time, {b['utt_per_s_with_load']:.1f} "
          f"with model load")
    for name, r in res.get("runs", {}).items():
        if r.get("utt_per_s"):
            print(f"  mecpe {name}: {r['utt_per_s']:,.1f} utt/s end to end = {r['utt_per_s'] / rate:.1f}x the baseline")


def print_profile(p: dict | None) -> None:
    if not p:
        return
    print(f"\npy-spy, one predictor actor, {p['samples']:,} samples (idle included); share of samples by function:")
    print("| self | share | inclusive | share |\n|---|---|---|---|")
    for (s, a), (i, b) in zip(p["self"], p["inclusive"]):
        print(f"| {s[:90]} | {a} | {i[:90]} | {b} |")


# ---------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/mecpe-corpus", help="corpora, adapters, outputs and logs")
    ap.add_argument("--json", help="results merged into this file (default: WORK/corpus.json)")
    ap.add_argument("--data", default=os.environ.get("MECPE_DATA", os.path.join(REPO, "..", "shared", "data", "ecf")))
    ap.add_argument("--config", default=CONFIG)
    ap.add_argument("--set", action="append", default=[], help="config override for every mecpe command (k=v)")
    ap.add_argument("--train", action="store_true", help="prepare + train the adapters when WORK has none")
    ap.add_argument("--emotion-adapter")
    ap.add_argument("--cause-adapter")
    ap.add_argument("--emotion-members", type=int, default=1,
                    help="emotion adapters whose label scores are averaged (the ensemble; 1: one adapter)")
    ap.add_argument("--model-dir", help="the base model folder (config.json) for the FLOP estimates")
    ap.add_argument("--scales", default="1,10", help="corpus sizes in copies of the test set (1 = the test JSON)")
    ap.add_argument("--label", default="", help="suffix of the run names (e.g. an actor setting)")
    ap.add_argument("--actors", type=int, default=1)
    ap.add_argument("--num-gpus", type=float, default=1.0, help="GPUs per actor (0 on CPU)")
    ap.add_argument("--max-batch-tokens", type=int, default=262144)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--kill-scale", type=int, default=0, help="kill-and-resume on this corpus (0: skip)")
    ap.add_argument("--kill-at", type=float, default=0.4, help="share of conversations written before the kill")
    ap.add_argument("--kill-timeout", type=float, default=500)
    ap.add_argument("--profile-s", type=float, default=0, help="py-spy on one actor during the largest scale")
    ap.add_argument("--from-json", help="no run: print the table of a saved corpus.json")
    a = ap.parse_args()
    if a.from_json:
        with open(a.from_json) as fh:
            print_table(json.load(fh))
        return 0
    os.makedirs(a.work, exist_ok=True)
    path = a.json or os.path.join(a.work, "corpus.json")
    adapters = resolve_adapters(a)
    if adapters is None:
        print("no adapters: pass --train, or --emotion-adapter and --cause-adapter", file=sys.stderr)
        return 2
    update_json(path, "environment", environment(a))
    update_json(path, "adapters", adapters)
    update_json(path, "model_shape", model_shape(a))
    scales = [int(s) for s in a.scales.split(",") if s]
    if any(s > 1 for s in scales) and 1 not in scales and saved_x1(a.work) is None:
        scales.insert(0, 1)  # the agreement needs the 1x run's predictions
    ok = True
    for s in scales:
        name = f"x{s}{a.label}"
        rec = run_scale(a, adapters, s, name, a.profile_s if s == max(scales) else 0)
        ok &= rec.get("rc") == 0 and rec["check"]["ok"]
        update_json(path, "runs", {name: rec})
        if a.profile_s and s == max(scales):
            update_json(path, "profile", summarize_profile(os.path.join(a.work, "profile-raw.txt")))
    if a.kill_scale:
        k = kill_and_resume(a, adapters, a.kill_scale)
        ok &= k["ok"]
        update_json(path, "kill", k)
    with open(path) as fh:
        print_table(json.load(fh))
    return 0 if ok else 1


def saved_x1(work: str) -> str | None:
    p = os.path.join(work, "out-x1", ecf_corpus.PRED_FILE)
    return p if os.path.exists(p) else None


if __name__ == "__main__":
    sys.exit(main())
