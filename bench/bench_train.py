"""Training throughput of the real ``mecpe train`` job (Ray Train + trl SFTTrainer) on one GPU.

Runs ``mecpe.train.run_training`` (the product path: TorchTrainer, 4-bit NF4 base loaded by ``mecpe.modeling``,
LoRA, completion-only SFT on the real ECF emotion prompts) for a few steps per LoRA variant and reads the
``useful_tokens_per_s`` that the job itself logs (non-pad tokens / wall second, ``ThroughputCallback``):

    ref        the reference LoRA settings: r 16, alpha 16, q/k/v/o; token-budget micro-batches (--budgets)
    ref-liger  the same with Liger's fused Triton kernels (training.use_liger_kernel)
    r64        r 64, alpha 16, all linear layers; token-budget micro-batches
    ref-b8     the reference LoRA settings, fixed micro-batches of --batch examples, length-grouped (the before)

Every variant runs for each token budget of ``--budgets`` and each gradient-checkpointing setting of ``--ckpt``;
``--memory-cap-gib`` caps every process's CUDA memory (bench/benchsite/sitecustomize.py), to find what fits a
smaller GPU (an A100 40 GB) on a larger one; ``--profile-steps 2-4,40-42`` writes torch.profiler tables of those steps
to OUT/profile/.

MFU = 4 x 13e9 x useful tok/s / 790e12 (LoRA on a frozen base: forward + input-gradient backward, no weight
gradients; 790 TFLOP/s = H200 dense bf16). Padding waste = 1 - useful / padded tokens. One-epoch wall time is the
useful tokens of each training set (tokenized with the model's tokenizer) over the measured rate.

    python bench/bench_train.py --model /tmp/standin-13b --out OUT [--steps 64] [--budgets 8192] [--ckpt auto]
        [--batch 8] [--variants ref,ref-liger] [--memory-cap-gib 39.5] [--logging-steps 4]
    python bench/bench_train.py --model - --out - --from-json OUT/bench_train.json     (reprint a saved run)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

REF = ["lora.r=16", "lora.alpha=16", "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]"]
R64 = ["lora.r=64", "lora.alpha=16", "lora.target_modules=all-linear"]
LIGER = ["training.use_liger_kernel=true"]
VARIANTS = {"ref": (REF, "tokens"), "ref-liger": (REF + LIGER, "tokens"), "r64": (R64, "tokens"),
            "ref-b8": (REF, "examples")}
PEAK_FLOPS = 790e12  # H200 dense bf16
PARAMS = 13e9


def prepare(data: str, out: str) -> dict[str, str]:
    from mecpe.splits import prepare as prepare_data

    from mecpe.config import DataConfig

    train = os.path.join(data, DataConfig().train_file)  # the ECF 1.0 text a user downloads
    dest = os.path.join(out, "data")
    prepare_data(train, None, dest)
    return {"train": os.path.join(dest, "train.json"), "val": os.path.join(dest, "val.json")}


def epoch_tokens(model: str, train_uri: str, max_prompt_tokens: int) -> dict[str, int]:
    """Useful tokens of one epoch of each task's training set (what the job trains on)."""
    from mecpe.config import ModelConfig
    from mecpe.modeling import load_base_tokenizer
    from mecpe.prompts import PromptBuilder
    from mecpe.train.examples import build_examples, read_split

    tok = load_base_tokenizer(ModelConfig(base=model))  # the training tokenizer, as train_loop loads it
    builder = PromptBuilder(tok, max_prompt_tokens)
    convs = read_split(train_uri, None)
    out = {}
    for task in ("emotion", "cause"):
        rows, _ = build_examples(task, convs, builder)
        out[task] = sum(len(r["input_ids"]) for r in rows)
        out[f"{task}_examples"] = len(rows)
    return out


def steady_rate(windows: list[float]) -> float | None:
    """Median of the logged windows of the run's second half: the warm-up of the first steps excluded."""
    return statistics.median(windows[len(windows) // 2:]) if windows else None


def run_variant(name: str, model: str, splits: dict, out: str, steps: int, batch: int, max_tokens: int,
                use_gpu: bool, extra: list[str], ckpt: str = "auto", logging_steps: int = 4) -> dict:
    from mecpe.config import load_config
    from mecpe.train import run_training

    overrides = [f"model.base={model}", "quantization.mode=nf4", f"scaling.use_gpu={str(use_gpu).lower()}",
                 f"training.max_steps={steps}", f"training.per_device_batch_size={batch}", "training.grad_accum=1",
                 f"training.max_batch_tokens={max_tokens if VARIANTS[name][1] == 'tokens' else 'null'}",
                 f"training.gradient_checkpointing={ckpt}",
                 f"training.save_steps={steps}", f"training.logging_steps={logging_steps}", "training.eval_steps=null",
                 f"storage.path={out}/runs", f"storage.run_name=bench-{name}-{max_tokens}-{ckpt}-{int(time.time())}",
                 *VARIANTS[name][0], *extra]
    if not use_gpu:
        overrides.append("training.optim=adamw_torch")
    cfg = load_config(None, overrides)
    t0 = time.time()
    res = run_training(cfg, "emotion", train_convs_uri=splits["train"], val_convs_uri=None)
    wall = time.time() - t0
    m = res.metrics
    windows = [h["useful_tokens_per_s"] for h in m.get("log_history", []) if "useful_tokens_per_s" in h]
    tput = m.get("throughput", {})
    rate = steady_rate(windows) or tput.get("useful_tokens_per_s", 0.0)
    return {"variant": name, "budget": max_tokens if VARIANTS[name][1] == "tokens" else None, "ckpt_setting": ckpt,
            "overrides": overrides, "steps": m.get("global_step"), "job_wall_s": round(wall, 1),
            "useful_tok_s": rate, "useful_tok_s_windows": windows,
            "useful_tok_s_whole_run": tput.get("useful_tokens_per_s"),
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True (mecpe default)"),
            "useful_token_fraction": tput.get("useful_token_fraction"),
            "gradient_checkpointing": m.get("gradient_checkpointing"), "compute_dtype": m.get("compute_dtype"),
            "optimizer": m.get("optimizer"), "train_loss": m.get("train_loss"), "gpu_peak_gib": m.get("gpu_peak_gib"),
            "model_load_s": m.get("model_load_s"), "use_liger_kernel": m.get("use_liger_kernel"),
            "steps_log": [{k: h.get(k) for k in ("step", "useful_tokens_per_s", "cuda_mallocs", "cuda_alloc_retries",
                                                 "cuda_reserved_gib", "loss")}
                          for h in m.get("log_history", []) if "useful_tokens_per_s" in h],
            "mfu": 4 * PARAMS * rate / PEAK_FLOPS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    from mecpe.config import DataConfig  # the data folder by mecpe's own rule
    ap.add_argument("--data", default=DataConfig().resolved_dir(),
                    help="ECF folder (default: MECPE_DATA, else ../shared/data/ecf)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch", type=int, default=8, help="per-device batch (grad_accum 1); 16 OOMs an H200 "
                    "without gradient checkpointing when length grouping puts 16 ~1,000-token examples together")
    ap.add_argument("--budgets", default="8192", help="token budgets per micro-batch (comma list)")
    ap.add_argument("--ckpt", default="auto", help="gradient checkpointing settings (comma list of auto,on,off)")
    ap.add_argument("--variants", default="ref,ref-liger")
    ap.add_argument("--memory-cap-gib", type=float, default=None, help="cap every process's CUDA memory")
    ap.add_argument("--logging-steps", type=int, default=4)
    ap.add_argument("--profile-steps", help="optimizer step windows to profile, e.g. 2-4,40-42")
    ap.add_argument("--no-epoch", action="store_true", help="skip the one-epoch token count")
    ap.add_argument("--override", action="append", default=[], help="extra config overrides")
    ap.add_argument("--from-json", help="no run: print the table of a saved bench_train.json, steady rates "
                    "recomputed from its logged windows")
    a = ap.parse_args()
    if a.from_json:
        res = json.load(open(a.from_json))
        for v in res["variants"]:
            if "error" not in v:
                v["useful_tok_s"] = steady_rate(v["useful_tok_s_windows"])
                v["mfu"] = 4 * PARAMS * v["useful_tok_s"] / PEAK_FLOPS
        print_table(res)
        return
    import ray
    import torch

    use_gpu = torch.cuda.is_available()
    os.makedirs(a.out, exist_ok=True)
    res: dict = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "model": a.model,
                 "device": torch.cuda.get_device_name(0) if use_gpu else "cpu", "variants": []}
    splits = prepare(a.data, a.out)
    env = {}
    if a.memory_cap_gib:
        env["MECPE_BENCH_GPU_CAP_GIB"] = str(a.memory_cap_gib)
        res["memory_cap_gib"] = a.memory_cap_gib
    if a.profile_steps:
        env.update(MECPE_BENCH_PROFILE_STEPS=a.profile_steps, MECPE_BENCH_PROFILE_DIR=os.path.join(a.out, "profile"))
    if env:  # bench/benchsite/sitecustomize.py acts on them in every process of the cluster
        site = os.path.join(REPO, "bench", "benchsite")
        env["PYTHONPATH"] = os.pathsep.join([site, *filter(None, [os.environ.get("PYTHONPATH")])])
    ray.init(include_dashboard=False, runtime_env={"env_vars": env} if env else None)
    for name in a.variants.split(","):
        for budget in [int(b) for b in a.budgets.split(",")]:
            for ckpt in a.ckpt.split(","):
                try:
                    v = run_variant(name, a.model, splits, a.out, a.steps, a.batch, budget, use_gpu, a.override, ckpt,
                                    a.logging_steps)
                except Exception as exc:  # e.g. out of GPU memory: record it, go on with the next variant
                    v = {"variant": name, "budget": budget, "ckpt_setting": ckpt,
                         "error": f"{type(exc).__name__}: {exc}"[:2000]}
                    print(f"[bench_train] {name} {budget} {ckpt} failed: {v['error']}", flush=True)
                res["variants"].append(v)
                json.dump(res, open(os.path.join(a.out, "bench_train.json"), "w"), indent=1, default=str)
    if not a.no_epoch:
        res["epoch_tokens"] = epoch_tokens(a.model, splits["train"], 1024)  # CPU only: after the GPU work
    json.dump(res, open(os.path.join(a.out, "bench_train.json"), "w"), indent=1, default=str)
    print_table(res)


def print_table(res: dict) -> None:
    et = res.get("epoch_tokens")
    cap = f", CUDA memory capped at {res['memory_cap_gib']} GiB" if res.get("memory_cap_gib") else ""
    print(f"\n{res['date']} {res['device']}{cap}  {res['command']}")
    print("| variant | budget | useful tok/s (steady) | MFU | useful tok/s (whole run) | padding waste | grad ckpt "
          "| peak GPU GiB | 1 epoch emotion | 1 epoch cause |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for v in res["variants"]:
        if "error" in v:
            why = "out of memory" if "out of GPU memory" in v["error"] else v["error"][:150]
            print(f"| {v['variant']} | {v.get('budget')} | failed: {why} ||||| {v.get('ckpt_setting')} ||||")
            continue
        rate = v["useful_tok_s"] or float("nan")
        waste = 1 - (v["useful_token_fraction"] or 0)
        epochs = (f"{et['emotion'] / rate / 60:.1f} min | {et['cause'] / rate / 60:.1f} min" if et else " | ")
        print(f"| {v['variant']} | {v.get('budget')} | {rate:.0f} | {v['mfu']:.3f} | {v['useful_tok_s_whole_run']:.0f} | "
              f"{waste:.2%} | {v['gradient_checkpointing']} | {v['gpu_peak_gib']} | {epochs} |")


if __name__ == "__main__":
    main()
