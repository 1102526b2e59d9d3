"""The real-model runs: ``mecpe pipeline`` with SmolLM2-135M-Instruct on real ECF (``jobs/configs/ecf-smollm2.yaml``),
one run per (variant, training seed), several at once on one GPU, then one table.

Every run is the real job, a subprocess ``python -m mecpe.cli pipeline --config CONFIG <variant overrides>
training.seed=S output_dir=... storage.path=...`` with its own local Ray, so runs share nothing but the GPU and the
node's converted-model cache. Choices are made on the validation split only: the table's ``val`` columns come from the
pipeline's validation step (``validation.score``; ``val raw`` is before the emotion bias is fitted, where it is), and
``--select`` picks the variant with the best mean validation weighted_f1 over its seeds. The test columns are
reported, never used to choose.

    python bench/sweep_smollm2.py --variants base,lr2e-3 --seeds 0 --parallel 4 --work /tmp/sweep --results $OUT \\
        --select /tmp/sweep/selected.json
    python bench/sweep_smollm2.py --variants @/tmp/sweep/selected.json --seeds 0,1 ...     # the chosen one, 2 seeds
    python bench/sweep_smollm2.py --from-json bench/results/DATE/sweep.json    # reprint a saved table (+ the logged
                                                                                 # validation losses of runs.tar.gz)

Writes ``sweep.json`` (every figure, the commands), ``sweep.md`` (the table) and ``runs.tar.gz`` (per run: log,
config, pipeline.json, metrics.json, report.md, validation metrics and calibration, inference summary, the adapters'
mecpe_train.json) into ``--results``, and ``records-not-for-commit.tar.gz``: the validation and test predictions with
every utterance's label scores, for analysis without a GPU; it holds ECF text (research-only licence), so it is never
committed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = "jobs/configs/ecf-smollm2.yaml"

# Overrides on top of the config, one lever each (bench/RESULTS.md has a row per variant).
VARIANTS: dict[str, list[str]] = {
    "base": [],
    "config": [],  # the config as committed
    "lr2e-3": ["training.learning_rate=0.002"],
    "lr5e-4": ["training.learning_rate=0.0005"],
    "ep3": ["training.epochs=3"],
    "ep4": ["training.epochs=4"],
    "bf16": ["quantization.mode=none"],
    "noised": ["training.cause_emotions=noised", "training.cause_noise_rate=0.2"],
    "budget16k": ["training.max_batch_tokens=16384"],
    "r16-qkvo": ["lora.r=16", "lora.alpha=32", "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]"],
    "no-calibration": ["validation.fit_emotion_bias=false"],
    # the instruction once in the conversation prefix, a few tokens per question (issue #29: ~30 fewer tokens per
    # utterance and stage); does the model learn it as well?
    "prefix": ["prompt.layout=prefix"],
    # class-balanced emotion targets (the model calls ~69% of test utterances neutral, gold 41%)
    "balance0.5": ["training.emotion_balance=0.5"],
    "balance1": ["training.emotion_balance=1.0"],
    # three emotion adapters (seeds S, S+1000, S+2000) on one base, their label probabilities averaged (issue #30;
    # the config itself since 2026-12-07)
    "ens3": ["training.emotion_ensemble=3"],
    # ablations of the config since 2026-12-07 (ensemble of 3 + the rule's self/previous causes added)
    "ens1": ["training.emotion_ensemble=1"],
    "no-rule-causes": ["inference.rule_causes=[]"],
    # five members instead of three (seeds S .. S+4000): the next lever of issue #30 (the config: test 0.2670 over 2 seeds)
    "ens5": ["training.emotion_ensemble=5"],
    # the ensemble as one model of the members' mean weights: one emotion scoring pass instead of three (issue #29)
    "soup": ["inference.emotion_ensemble_mode=soup"],
    # the reference system's recipe (docs: reference-system.md): r16/alpha16 q,k,v,o, dropout 0.1, 1 epoch, lr 1e-3,
    # 16 examples a step (as one micro-batch: the same token-weighted loss as its 4 x 4), one example per target, no
    # emotion bias
    "reference": ["lora.r=16", "lora.alpha=16", "lora.dropout=0.1", "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]",
                  "training.epochs=1", "training.learning_rate=0.001", "training.reuse_prefix=false",
                  "training.max_batch_tokens=null", "training.per_device_batch_size=16", "training.grad_accum=1",
                  "training.warmup_ratio=0.03", "validation.fit_emotion_bias=false"],
}
OFFICIAL = ("precision_pair", "recall_pair", "f1_pair", "weighted_precision", "weighted_recall", "weighted_f1")


def _variants(spec: str) -> dict[str, list[str]]:
    """``a,b``: variants by name; ``@FILE``: the one a --select file names; ``@FILE+c``: it with c's overrides."""
    out: dict[str, list[str]] = {}
    for item in spec.split(","):
        if item.startswith("@"):  # a selection file written by --select
            path, _, extra = item[1:].partition("+")
            sel = json.loads(Path(path).read_text())
            name = sel["variant"] + (f"+{extra}" if extra else "")
            out[name] = sel["overrides"] + (VARIANTS[extra] if extra else [])
        else:
            out[item] = VARIANTS[item]
    return out


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_one(name: str, overrides: list[str], seed: int, args) -> dict:
    out = Path(args.work) / f"{name}-s{seed}"
    cmd = [sys.executable, "-m", "mecpe.cli", "pipeline", "--config", args.config, *overrides, *args.extra,
           f"training.seed={seed}", f"output_dir={out}", f"storage.path={out}/runs", f"model.cache_dir={args.cache}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    left = args.deadline - t0
    rec = {"variant": name, "seed": seed, "overrides": overrides, "command": " ".join(cmd), "out": str(out)}
    if left < 60:
        return {**rec, "status": f"skipped: {left:.0f} s left"}
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "run.log", "wb") as log:
        try:
            rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=left).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    rec.update(status="ok" if rc == 0 else f"failed ({rc})", wall_s=round(time.time() - t0, 1))
    pipe = _read(out / "pipeline.json") or {}
    metrics = _read(out / "metrics.json") or {}
    val = pipe.get("validation") or {}
    rec.update(
        test={k: metrics.get(k) for k in OFFICIAL} | {k: metrics.get(k) for k in ("emotion_accuracy",
                                                                                  "emotion_weighted_f1")},
        val=val.get("metrics"), val_raw=val.get("before_calibration"), val_rule=val.get("rule_on_own_emotions"),
        calibration=val.get("calibration"), timings=pipe.get("timings_s"),
        baselines={n: b.get("weighted_f1") for n, b in (metrics.get("baselines") or {}).items()},
        predicted_neutral=_neutral(out / "Subtask_2_pred.json"),
        training={name: _training(folder / "mecpe_train.json") for name, folder in _adapter_dirs(pipe).items()})
    return rec


def _adapter_dirs(pipe: dict) -> dict[str, Path]:
    """pipeline.json's adapters by name: emotion, cause, and an ensemble's further members as emotion_1, emotion_2."""
    adapters = dict(pipe.get("adapters") or {})
    members = adapters.pop("emotion_ensemble", None) or []
    return {**{k: Path(v) for k, v in adapters.items()},
            **{f"emotion_{k}": Path(v) for k, v in enumerate(members, 1)}}


def _neutral(pred: Path) -> int | None:
    data = _read(pred)
    return None if data is None else sum(u.get("emotion") == "neutral" for c in data for u in c["conversation"])


def _training(meta_path: Path) -> dict | None:
    meta = _read(meta_path)
    if meta is None:
        return None
    m = meta.get("metrics", {})
    return {"global_step": meta.get("global_step"), "train_loss": m.get("train_loss"), "eval_loss": m.get("eval_loss"),
            "train_runtime": m.get("train_runtime"), "throughput": m.get("throughput"),
            "examples": {k: (m.get("examples") or {}).get("train", {}).get(k)
                         for k in ("examples", "rows", "computed_tokens", "example_tokens")}}


def pack(runs: list[dict], dest: Path, records: Path) -> None:
    """Small files of every run into ``dest`` (committed with the results); the inference shards of the validation
    and test runs into ``records`` (per utterance label scores and predictions, so calibration and error analysis need
    no GPU). The shards hold ECF text, whose licence is research-only: ``records`` is never committed. The adapters
    stay behind."""
    names = ("run.log", "config.yaml", "pipeline.json", "metrics.json", "report.md", "validation/metrics.json",
             "validation/calibration.json", "validation/inference/report.md", "inference/summary.json")
    with tarfile.open(dest, "w:gz") as tar, tarfile.open(records, "w:gz") as shards:
        for r in runs:
            out = Path(r["out"])
            for n in names:
                if (out / n).exists():
                    tar.add(out / n, arcname=f"{out.name}/{n}")
            shard_files = sorted(out.glob("validation/*/records/*.jsonl")) + sorted(out.glob("inference/records/*.jsonl"))
            for shard in shard_files:
                shards.add(shard, arcname=f"{out.name}/{shard.relative_to(out)}")
            for name, folder in _adapter_dirs(_read(out / "pipeline.json") or {}).items():
                meta = folder / "mecpe_train.json"
                if meta.exists():
                    tar.add(meta, arcname=f"{out.name}/{name}_mecpe_train.json")


def _f(x, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _emotion_training_s(timings: dict) -> float | None:
    """Seconds of the emotion training step, all members of an ensemble (train-emotion, train-emotion-1, ...)."""
    parts = [v for k, v in timings.items() if k == "train-emotion" or k.startswith("train-emotion-")]
    return float(sum(parts)) if parts else None


def table(runs: list[dict]) -> str:
    rows = ["| variant | seed | status | val wF1 (raw) | val wF1 | val: its emotions + rule causes | test wF1 | "
            "test P | test R | emotion acc | pred. neutral | train s (emo/cause) | total s |", "|" + "---|" * 13]
    for r in runs:
        t, v, raw, tm = r.get("test") or {}, r.get("val") or {}, r.get("val_raw") or {}, r.get("timings") or {}
        rows.append(f"| {r['variant']} | {r['seed']} | {r['status']} | {_f(raw.get('weighted_f1'))} | "
                    f"{_f(v.get('weighted_f1'))} | {_f(r.get('val_rule'))} | {_f(t.get('weighted_f1'))} | "
                    f"{_f(t.get('weighted_precision'))} | "
                    f"{_f(t.get('weighted_recall'))} | {_f(t.get('emotion_accuracy'))} | "
                    f"{_f(r.get('predicted_neutral'))} | "
                    f"{_f(_emotion_training_s(tm), 0)}/{_f(tm.get('train-cause'), 0)}"
                    f" | {_f(tm.get('total'), 0)} |")
    return "\n".join(rows)


def eval_losses(archive: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Per run of ``runs.tar.gz``: the validation losses each adapter's training logged, (step, loss), from its log
    (what is known of a run that ended before inference)."""
    import re

    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if not member.name.endswith("/run.log"):
                continue
            task, seen = None, out.setdefault(member.name.split("/")[0], {})
            for line in tar.extractfile(member).read().decode("utf-8", "replace").splitlines():
                m = re.search(r"training (emotion|cause) run ", line)
                if m:
                    task = m.group(1)
                m = re.search(r"step (\d+)/\d+: eval_loss=([0-9.]+)", line)
                if m and task and (int(m.group(1)), float(m.group(2))) not in seen.get(task, []):
                    seen.setdefault(task, []).append((int(m.group(1)), float(m.group(2))))
    return out


def losses_table(losses: dict) -> str:
    rows = ["| run | emotion validation loss (step: loss) | cause validation loss (step: loss) |", "|---|---|---|"]
    for run, by_task in sorted(losses.items()):
        rows.append(f"| {run} | " + " | ".join(", ".join(f"{s}: {v:.4f}" for s, v in by_task.get(t, [])) or "-"
                                              for t in ("emotion", "cause")) + " |")
    return "\n".join(rows)


def select(runs: list[dict], variants: dict[str, list[str]]) -> dict | None:
    """The variant with the best mean validation weighted_f1 over its finished seeds (never the test set)."""
    by: dict[str, list[float]] = {}
    for r in runs:
        if r["status"] == "ok" and (r.get("val") or {}).get("weighted_f1") is not None:
            by.setdefault(r["variant"], []).append(r["val"]["weighted_f1"])
    if not by:
        return None
    best = max(by, key=lambda k: sum(by[k]) / len(by[k]))
    return {"variant": best, "overrides": variants[best], "val_weighted_f1": by[best],
            "candidates": {k: sum(v) / len(v) for k, v in by.items()}, "criterion": "mean validation weighted_f1"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=CONFIG)
    ap.add_argument("--variants", default="base")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--work", default="/tmp/mecpe-sweep")
    ap.add_argument("--results", default=os.environ.get("OUT", "/tmp/mecpe-sweep-results"))
    ap.add_argument("--cache", default="/tmp/mecpe-models", help="model.cache_dir of every run (converted GGUF)")
    ap.add_argument("--deadline", type=float, default=540,
                    help="seconds from now after which no run is started or kept")
    ap.add_argument("--select", help="write the chosen variant (best mean validation weighted_f1) here")
    ap.add_argument("--extra", nargs="*", default=[], help="overrides added to every run (after the variant's)")
    ap.add_argument("--from-json", help="reprint the table of a saved sweep.json")
    args = ap.parse_args()
    if args.from_json:
        saved = Path(args.from_json)
        print(table(json.loads(saved.read_text())["runs"]))
        archive = saved.with_name(saved.name.replace("sweep", "runs").replace(".json", ".tar.gz"))
        if archive.exists():
            print("\n" + losses_table(eval_losses(archive)))
        return 0
    args.deadline += time.time()
    variants = _variants(args.variants)
    jobs = [(n, o, int(s)) for n, o in variants.items() for s in args.seeds.split(",")]
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with ThreadPoolExecutor(args.parallel) as pool:
        runs = list(pool.map(lambda j: run_one(*j, args), jobs))
    chosen = select(runs, variants)
    from mecpe.provenance import code_version

    payload = {"started": started, "config": args.config, "parallel": args.parallel, **code_version(),
               "gpu": _gpu(), "runs": runs, "selected": chosen}
    (results / "sweep.json").write_text(json.dumps(payload, indent=2))
    md = table(runs)
    (results / "sweep.md").write_text(md + "\n")
    pack(runs, results / "runs.tar.gz", results / "records-not-for-commit.tar.gz")
    if args.select and chosen:
        Path(args.select).write_text(json.dumps(chosen, indent=2))
    print(md)
    print(f"selected (validation only): {json.dumps(chosen)}")
    return 0 if all(r["status"] == "ok" for r in runs) else 1


def _gpu() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


if __name__ == "__main__":
    sys.exit(main())
