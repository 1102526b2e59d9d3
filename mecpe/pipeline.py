"""The whole method, step by step: prepare → train emotion → train cause → infer → evaluate.

Each step is also its own ``ray job submit`` entrypoint (``jobs/*.py``); they share these functions so a step run
alone and a step run inside the pipeline do the same thing. Every step reads and writes under ``output_dir``:

    <output_dir>/data/{train,val,test}.json, rejects.jsonl      prepare
    <storage.path>/<run>/adapter/                              train (one run per task)
    <output_dir>/inference/{records/,Subtask_2_pred.json,summary.json,...}
    <output_dir>/Subtask_2_pred.json, metrics.json, report.md, confusion_matrix.png
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from mecpe import storage
from mecpe.config import Config, dump_config, load_config


def data_dir(cfg: Config) -> str:
    return storage.join(cfg.output_dir, "data")


def ensure_model(cfg: Config) -> None:
    """Build the tiny local model at ``model.base`` when the config asks for it and it is absent."""
    if not cfg.model.build_tiny_if_missing or storage.is_remote(cfg.model.base):
        return
    if os.path.exists(os.path.join(cfg.model.base, "config.json")):
        return
    from mecpe.modeling import build_tiny_model

    print(f"[mecpe] building the tiny local model at {cfg.model.base}", flush=True)
    build_tiny_model(cfg.model.base, [cfg.data.path(cfg.data.train_file)])


def step_prepare(cfg: Config) -> dict:
    from mecpe.data import prepare

    d = cfg.data
    counts = prepare(d.path(d.train_file), d.path(d.test_file), data_dir(cfg),
                     split=d.split, val_fraction=d.val_fraction, seed=d.seed)
    return counts


def step_train(cfg: Config, task: str):
    from mecpe.train import run_training

    ensure_model(cfg)
    return run_training(cfg, task,
                        train_convs_uri=storage.join(data_dir(cfg), "train.json"),
                        val_convs_uri=storage.join(data_dir(cfg), "val.json"))


def step_infer(cfg: Config, input_uri: str | None = None) -> dict:
    from mecpe.infer import run_inference

    ensure_model(cfg)
    input_uri = input_uri or storage.join(data_dir(cfg), "test.json")
    return run_inference(cfg, input_uri, storage.join(cfg.output_dir, "inference"))


def step_evaluate(cfg: Config, pred_uri: str | None = None, gold_uri: str | None = None) -> dict:
    """Score the predictions, write metrics.json, report.md and confusion_matrix.png into ``output_dir``."""
    from mecpe.evaluate import baseline_predictions, format_table, score_subtask2, write_report

    pred_uri = pred_uri or storage.join(cfg.output_dir, "inference", "Subtask_2_pred.json")
    gold_uri = gold_uri or storage.join(data_dir(cfg), "test.json")
    pred, gold = storage.read_json(pred_uri), storage.read_json(gold_uri)
    metrics = score_subtask2(pred, gold, pred_source=pred_uri, gold_source=gold_uri)
    baselines = {
        "majority emotion + self/previous causes": score_subtask2(baseline_predictions(gold, emotions="majority"), gold),
        "gold emotions + self/previous causes (oracle)": score_subtask2(baseline_predictions(gold, emotions="gold"), gold),
    }
    summary_uri = storage.join(cfg.output_dir, "inference", "summary.json")
    parse_status = storage.read_json(summary_uri).get("parse_status") if storage.exists(summary_uri) else None
    if storage.is_remote(cfg.output_dir):
        with tempfile.TemporaryDirectory() as tmp:
            write_report(metrics, tmp, baselines=baselines, parse_status=parse_status)
            storage.upload_dir(tmp, cfg.output_dir)
    else:
        write_report(metrics, cfg.output_dir, baselines=baselines, parse_status=parse_status)
    if pred_uri != storage.join(cfg.output_dir, "Subtask_2_pred.json"):
        storage.write_bytes(storage.join(cfg.output_dir, "Subtask_2_pred.json"), storage.read_bytes(pred_uri))
    print(format_table(metrics), flush=True)
    return metrics


def run_pipeline(cfg: Config) -> dict:
    """prepare → train emotion → train cause → infer (with the new adapters) → evaluate."""
    t0 = time.time()
    timings: dict[str, float] = {}

    def timed(name, fn, *args):
        start = time.time()
        print(f"[mecpe] step {name} ...", flush=True)
        out = fn(*args)
        timings[name] = round(time.time() - start, 1)
        print(f"[mecpe] step {name} done in {timings[name]} s", flush=True)
        return out

    timed("prepare", step_prepare, cfg)
    emotion = timed("train-emotion", step_train, cfg, "emotion")
    cause = timed("train-cause", step_train, cfg, "cause")
    cfg = cfg.model_copy(deep=True)
    cfg.inference.emotion_adapter = emotion.adapter_uri
    cfg.inference.cause_adapter = cause.adapter_uri
    summary = timed("infer", step_infer, cfg)
    metrics = timed("evaluate", step_evaluate, cfg)
    timings["total"] = round(time.time() - t0, 1)
    storage.write_json(storage.join(cfg.output_dir, "pipeline.json"), {
        "timings_s": timings,
        "adapters": {"emotion": emotion.adapter_uri, "cause": cause.adapter_uri},
        "inference_summary": storage.join(cfg.output_dir, "inference", "summary.json"),
        "metrics": {k: metrics[k] for k in ("precision_pair", "recall_pair", "f1_pair",
                                            "weighted_precision", "weighted_recall", "weighted_f1")},
    }, indent=2)
    storage.write_bytes(storage.join(cfg.output_dir, "config.yaml"), dump_config(cfg).encode())
    out = cfg.output_dir
    print("\n[mecpe] outputs:")
    for name in ("Subtask_2_pred.json", "metrics.json", "report.md", "confusion_matrix.png", "pipeline.json",
                 "data/", "inference/"):
        print(f"  {storage.join(out, name)}")
    print(f"  emotion adapter: {emotion.adapter_uri}\n  cause adapter:   {cause.adapter_uri}")
    print(f"[mecpe] pipeline finished in {timings['total']} s; results in {out}", flush=True)
    return {"metrics": metrics, "summary": summary, "timings": timings}


STEPS = ("prepare", "train-emotion", "train-cause", "infer", "evaluate", "pipeline")


def main_step(step: str, argv: list[str] | None = None) -> int:
    """Entry for ``jobs/<step>.py --config FILE [key=value ...]``."""
    import argparse

    p = argparse.ArgumentParser(prog=f"jobs/{step}.py")
    p.add_argument("--config")
    p.add_argument("--task", choices=["emotion", "cause"], help="train only: which model")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    print(dump_config(cfg), flush=True)
    if step == "prepare":
        print(json.dumps(step_prepare(cfg), indent=2))
    elif step == "train":
        if not args.task:
            p.error("--task emotion|cause is required")
        res = step_train(cfg, args.task)
        print(f"[mecpe] adapter: {res.adapter_uri}")
    elif step == "infer":
        step_infer(cfg)
    elif step == "evaluate":
        step_evaluate(cfg)
    elif step == "pipeline":
        run_pipeline(cfg)
    else:
        p.error(f"unknown step {step}")
    return 0


def main_pipeline(config: str | None, overrides: list[str]) -> int:
    return main_step("pipeline", ([ "--config", config] if config else []) + list(overrides))


if __name__ == "__main__":
    sys.exit(main_step(sys.argv[1], sys.argv[2:]))
