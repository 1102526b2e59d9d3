"""Inference throughput: mecpe's two-stage Ray Data pipeline against a reference-style strategy, on one GPU.

Both strategies run the same model (the 13B-shaped NF4 stand-in, or any model folder) on the ECF test set. With
random weights the emotion stage's output is arbitrary, so the cause stage of both reads the *gold* non-neutral
utterances (1,821 on the official test). The reference-style strategy stops at EOS as the reference does (no
``min_new_tokens``); a random model rarely says EOS, so it mostly runs its 15 / 25 tokens (the answer tokens it ran
are recorded).

    (a) reference-style (kept here only): one prompt per utterance, ``generate`` with up to 15 new tokens at batch 2
        (emotion) and 25 at batch 1 (cause), stopping at EOS; timed on a sample (at least 200 emotion and 100 cause
        utterances), rate = utterances / second.
    (b) mecpe default: ``mecpe.infer.run_inference`` (Ray Data, label scoring, shared conversation prefixes,
        constrained cause decoding, token-budget batches), whole test set.

mecpe's wall figure runs from before ``ray.init`` (Ray start included) to the end of inference. MFU = the FLOPs the
model needed (``bench/limits.py``: 2 x non-embedding parameters x tokens computed) / (GPU busy seconds x 989 TFLOP/s,
the dense bf16 spec); the same over the bf16 matmul rate measured on this GPU is printed beside it, labelled as such.

Also: prefill ceiling (tokens/s of one large forward batch → the prefill-bound limit = unique prompt tokens mecpe
computed ÷ that rate), and the T4 fit (fp16 compute, memory capped at 15 GiB, largest token budget that runs).

    python bench/bench_infer.py --model /tmp/standin-13b --data DIR --out OUT [--sample 200] [--cause-sample 100]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import limits  # noqa: E402


def _cfg(model: str, overrides: list[str]):
    from mecpe.config import load_config

    return load_config(None, [f"model.base={model}", *overrides])


def _conversations(test_file: str, limit: int | None = None):
    from mecpe.readers import read_conversations

    convs = read_conversations([test_file], require_labels=True).conversations
    return convs[:limit] if limit else convs


def run_mecpe(model: str, test_file: str, out: str, use_gpu: bool, extra: list[str]) -> dict:
    import ray

    from mecpe.infer import run_inference

    overrides = ["inference.cause_input=gold", "inference.share_base=true", "quantization.mode=nf4",
                 f"inference.num_gpus={1 if use_gpu else 0}", *extra]
    cfg = _cfg(model, overrides)
    t0 = time.time()  # before ray.init: the wall figure includes Ray's start
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=True)
    summary = run_inference(cfg, test_file, out)
    summary["bench_wall_s"] = time.time() - t0
    summary["bench_wall_from"] = "before ray.init"  # runs before #29 timed from after it
    return summary


def load(model: str, device: str, overrides: list[str] | None = None):
    """Tokenizer + 4-bit model through the product's loading code (what the actors load too)."""
    from mecpe import modeling

    cfg = _cfg(model, overrides or [])
    m, tok = modeling.load(cfg.model, cfg.quantization, device=device)
    return cfg, tok, m


def unique_prompt_tokens(tok, cfg, test_file: str) -> dict:
    """Prompt tokens mecpe's strategy must run at the least: each conversation prefix once per stage plus every
    question (emotion: all utterances; cause: the gold non-neutral ones, as in this benchmark)."""
    from mecpe.prompts import PromptBuilder

    builder = PromptBuilder(tok, **cfg.prompt.builder_kwargs())
    total = full = 0
    for c in _conversations(test_file):
        gold = {u.id: u.emotion for u in c.utterances}
        for stage in ("emotion", "cause"):
            prompts = [builder.emotion_prompt(c, u.id) if stage == "emotion" else builder.cause_prompt(c, u.id, gold)
                       for u in c.utterances if stage == "emotion" or gold[u.id] != "neutral"]
            prefixes = {tuple(p.prefix) for p in prompts}
            total += sum(map(len, prefixes)) + sum(len(p.question) for p in prompts)
            full += sum(len(p) for p in prompts)
    return {"unique_prompt_tokens": total, "full_prompt_tokens": full}


def run_reference_style(loaded, test_file: str, sample: int, cause_sample: int, device: str) -> dict:
    """One prompt per utterance, HF ``generate`` with the reference's token limits and batch sizes, stopping at
    EOS like the reference (no ``min_new_tokens``)."""
    import torch

    from mecpe.prompts import PromptBuilder

    cfg, tok, m = loaded
    builder = PromptBuilder(tok, **cfg.prompt.builder_kwargs())
    convs = _conversations(test_file)
    emo_prompts = [builder.emotion_prompt(c, u.id).ids for c in convs for u in c.utterances][:sample]
    gold = [{u.id: u.emotion for u in c.utterances} for c in convs]
    cause_prompts = [builder.cause_prompt(c, u.id, g).ids for c, g in zip(convs, gold)
                     for u in c.utterances if g[u.id] != "neutral"][:cause_sample]

    ran = {}  # answer tokens generate ran per stage (batch columns after the prompt)

    def timed(prompts, batch, new_tokens, stage=None):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.time()
        for i in range(0, len(prompts), batch):
            chunk = prompts[i:i + batch]
            width = max(map(len, chunk))
            ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in chunk], device=m.device)
            mask = (torch.arange(width, device=m.device)[None, :] >= torch.tensor(
                [width - len(p) for p in chunk], device=m.device)[:, None]).long()
            with torch.inference_mode():
                gen = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            if stage:
                ran[stage] = ran.get(stage, 0) + (gen.shape[1] - width) * len(chunk)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return len(prompts) / (time.time() - t0)

    timed(emo_prompts[:2], 2, 2)  # warm-up
    emo = timed(emo_prompts, 2, 15, "emotion")
    cause = timed(cause_prompts, 1, 25, "cause")
    n_utt = sum(len(c.utterances) for c in convs)
    n_cause = sum(1 for g in gold for e in g.values() if e != "neutral")
    wall = n_utt / emo + n_cause / cause
    return {"emotion_utt_s": emo, "cause_utt_s": cause, "utterances": n_utt, "cause_utterances": n_cause,
            "pipeline_utt_s": n_utt / wall, "extrapolated_wall_s": wall,
            "sampled": {"emotion": len(emo_prompts), "cause": len(cause_prompts)},
            "mean_answer_tokens": {k: ran.get(k, 0) / max(n, 1) for k, n in
                                   (("emotion", len(emo_prompts)), ("cause", len(cause_prompts)))}}


def prefill_rate(loaded, device: str, batch: int = 32, length: int = 512) -> float:
    """Prompt tokens/s of plain batched forwards (no padding): the prefill ceiling on this GPU."""
    import torch

    _, tok, m = loaded
    ids = torch.randint(10, min(len(tok), 2000), (batch, length), device=m.device)
    with torch.inference_mode():
        m(input_ids=ids, use_cache=False, logits_to_keep=1)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.time()
        for _ in range(3):
            m(input_ids=ids, use_cache=False, logits_to_keep=1)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return 3 * batch * length / (time.time() - t0)


def t4_fit(model: str, test_file: str) -> dict:
    """fp16 compute with the process capped at 15 GiB (a T4 has 15 GiB usable), the 4-bit base with both LoRA
    adapters: the largest token budget the emotion + cause stages run."""
    import torch

    from mecpe import modeling
    from mecpe.predict import predict_causes, predict_emotions
    from mecpe.prompts import PromptBuilder

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(15 * 2**30 / total)
    cfg = _cfg(model, ["quantization.compute_dtype=float16"])
    m, tok = modeling.load(cfg.model, cfg.quantization, device="cuda:0")
    # Both adapters attached, as in an inference actor with inference.share_base (random LoRA weights, real shapes)
    from peft import get_peft_model

    from mecpe.modeling import get_peft_config

    m = get_peft_model(m, get_peft_config(cfg.lora), adapter_name="emotion")
    m.add_adapter("cause", get_peft_config(cfg.lora))
    m.eval()
    builder = PromptBuilder(tok, **cfg.prompt.builder_kwargs())
    convs = _conversations(test_file, 40)
    gold = [{u.id: u.emotion for u in c.utterances} for c in convs]
    best, results = 0, {}
    for budget in (4096, 8192, 16384, 32768, 65536):
        try:
            torch.cuda.reset_peak_memory_stats()
            t0 = time.time()
            m.set_adapter("emotion")
            predict_emotions(m, tok, builder, convs, max_batch_tokens=budget)
            m.set_adapter("cause")
            predict_causes(m, tok, builder, convs, gold, max_batch_tokens=budget)
            results[budget] = {"ok": True, "s": round(time.time() - t0, 2),
                               "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
            best = budget
        except torch.OutOfMemoryError:
            results[budget] = {"ok": False}
            torch.cuda.empty_cache()
            break
    return {"largest_max_batch_tokens": best, "by_budget": results,
            "weights_gib": round(m.get_memory_footprint() / 2**30, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    from mecpe.config import DataConfig  # the data folder by mecpe's own rule
    ap.add_argument("--data", default=DataConfig().resolved_dir(),
                    help="ECF folder (default: MECPE_DATA, else ../shared/data/ecf)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--sample", type=int, default=200, help="emotion utterances timed for the reference-style strategy")
    ap.add_argument("--cause-sample", type=int, default=100, help="cause utterances timed for it")
    ap.add_argument("--limit", type=int, default=None, help="first N test conversations (default: all)")
    ap.add_argument("--part", choices=["all", "mecpe", "reference", "prefill", "t4"], default="all")
    ap.add_argument("--override", action="append", default=[], help="extra config overrides for mecpe")
    ap.add_argument("--skip-t4", action="store_true")
    ap.add_argument("--from-json", help="no run: print the table of a saved bench_infer.json")
    a = ap.parse_args()
    if a.from_json:
        print_table(json.load(open(a.from_json)))
        return
    import torch

    use_gpu = torch.cuda.is_available()
    device = "cuda:0" if use_gpu else "cpu"
    os.makedirs(a.out, exist_ok=True)
    test_file = os.path.join(a.data, "NUSTM_SemEval-2024_ECAC/data/Subtask_2_test.json")
    if a.limit:
        from mecpe import storage

        test_json = storage.read_json(test_file)[: a.limit]
        test_file = os.path.join(a.out, "test_subset.json")
        storage.write_json(test_file, test_json)
    res: dict = {"date": time.strftime("%Y-%m-%d"), "model": a.model, "device": torch.cuda.get_device_name(0)
                 if use_gpu else "cpu", "command": " ".join(sys.argv)}
    def save():  # after every part: a run cut short still leaves what it measured
        json.dump(res, open(os.path.join(a.out, "bench_infer.json"), "w"), indent=1, default=str)

    if a.part in ("all", "mecpe"):
        res["mecpe"] = run_mecpe(a.model, test_file, os.path.join(a.out, "mecpe-run"), use_gpu, a.override)
        res["model_shape"] = limits.read_model_shape(a.model)
        res["matmul_flops"] = limits.measured_matmul_flops() if use_gpu else None
        res["mecpe_rates"] = mecpe_rates(res["mecpe"], res["model_shape"], res["matmul_flops"])
        save()
    if a.part in ("all", "reference", "prefill"):
        loaded = load(a.model, device)
        res["tokens"] = unique_prompt_tokens(loaded[1], loaded[0], test_file)
        if a.part in ("all", "reference"):
            res["reference"] = run_reference_style(loaded, test_file, a.sample, a.cause_sample, device)
        res["prefill_tok_s"] = prefill_rate(loaded, device)
        save()
        del loaded
        if use_gpu:
            torch.cuda.empty_cache()
    if a.part == "all" and use_gpu and not a.skip_t4:
        # a fresh process: the memory cap must not limit the runs above
        proc = subprocess.run([sys.executable, __file__, "--model", a.model, "--data", a.data, "--out", a.out,
                               "--part", "t4"], capture_output=True, text=True)
        print(proc.stdout[-2000:], proc.stderr[-4000:])
        path = os.path.join(a.out, "t4.json")
        res["t4"] = json.load(open(path)) if os.path.exists(path) else {"error": proc.stderr[-1000:]}
    if a.part == "t4":
        json.dump(t4_fit(a.model, test_file), open(os.path.join(a.out, "t4.json"), "w"), indent=1)
        return
    save()
    print_table(res)


def mecpe_rates(m: dict, shape: dict | None = None, matmul_flops: float | None = None) -> dict:
    """utt/s of mecpe's run: steady (time inside the predictor actors, one GPU shared by both stages) and wall
    (``ray.init`` to the end: Ray start, actor start-up, the 4-bit model load, both stages, writes); MFU of the busy
    time against the 989 TFLOP/s spec and against the measured matmul rate."""
    st = m["this_run"]["stages"]
    emo, cau = st["emotion"], st["cause"]
    busy = emo["actor_s"] + cau["actor_s"]
    engine = m["this_run"].get("engine") or {}
    flops = sum(limits.stage_flops(shape, engine.get(s) or {}) for s in ("emotion", "cause")) if shape else None
    wall = m.get("bench_wall_s") if m.get("bench_wall_from") == "before ray.init" else None
    return {"model_flops": flops, "mfu_spec": flops / (busy * limits.PEAK_BF16_FLOPS) if flops and busy else None,
            "mfu_measured_matmul": flops / (busy * matmul_flops) if flops and busy and matmul_flops else None,
            "matmul_flops": matmul_flops, "ray_wall_s": wall,
            "ray_wall_utt_s": emo["utterances"] / wall if wall else None,
            "pipeline_utt_s": emo["utterances"] / busy if busy else None,
            "emotion_utt_s": emo["utt_per_s_per_actor"], "cause_utt_s": cau["utt_per_s_per_actor"],
            "wall_utt_s": m["this_run"]["utt_per_s"], "utterances": emo["utterances"], "busy_s": busy,
            "pipeline_s": m["this_run"]["pipeline_s"], "gpu_peak_gib": m["this_run"].get("gpu_peak_gib"),
            "actor_load_s": engine.get("load_s"),
            "emotion_prefill_s": (engine.get("emotion") or {}).get("prefill_s"),
            "cause_prefill_s": (engine.get("cause") or {}).get("prefill_s"),
            "cause_decode_s": (engine.get("cause") or {}).get("decode_s"),
            "cause_decode_steps": (engine.get("cause") or {}).get("decode_steps")}


def print_table(res: dict) -> None:
    rows = []
    m, r = res.get("mecpe"), res.get("reference")
    thr = mecpe_rates(m, res.get("model_shape"), res.get("matmul_flops")) if m else {}
    if m:
        rows.append(("mecpe pipeline utt/s (emotion+cause, GPU busy time)", thr["pipeline_utt_s"]))
        rows.append(("mecpe pipeline utt/s (wall from ray.init: Ray start, actor start, model load, writes)",
                     thr.get("ray_wall_utt_s")))
        rows.append(("mecpe pipeline utt/s (wall of the Ray Data pipeline, Ray already up)", thr["wall_utt_s"]))
        rows.append(("mecpe MFU, GPU busy time, against 989 TFLOP/s dense bf16 spec", thr.get("mfu_spec")))
        rows.append(("mecpe MFU, GPU busy time, against the measured bf16 matmul rate (not the spec)",
                     thr.get("mfu_measured_matmul")))
        rows.append(("measured bf16 matmul TFLOP/s (8192^3)", (thr.get("matmul_flops") or 0) / 1e12 or None))
        rows.append(("mecpe emotion stage utt/s", thr["emotion_utt_s"]))
        rows.append(("mecpe cause stage utt/s", thr["cause_utt_s"]))
        rows.append(("mecpe predictor peak GPU memory GiB", thr["gpu_peak_gib"]))
        rows.append(("mecpe pipeline s (wall: Ray Data start, actor start, model load, both stages, writes)",
                     thr["pipeline_s"]))
        rows.append(("mecpe predictor actor start s (model + adapters loaded)", thr["actor_load_s"]))
        for key in ("emotion_prefill_s", "cause_prefill_s", "cause_decode_s", "cause_decode_steps"):
            rows.append((f"mecpe engine {key.replace('_', ' ')}", thr[key]))
    if r:
        rows += [("reference-style emotion utt/s (batch 2, up to 15 tok, stops at EOS)", r["emotion_utt_s"]),
                 ("reference-style cause utt/s (batch 1, up to 25 tok, stops at EOS)", r["cause_utt_s"]),
                 ("reference-style utterances timed (emotion / cause)",
                  f"{r['sampled']['emotion']} / {r['sampled']['cause']}"),
                 ("reference-style pipeline utt/s", r["pipeline_utt_s"])]
    if m and r and thr.get("pipeline_utt_s"):
        rows.append(("speed-up vs reference-style (GPU busy time)", thr["pipeline_utt_s"] / r["pipeline_utt_s"]))
        wall = thr.get("ray_wall_utt_s") or thr["wall_utt_s"]
        rows.append(("speed-up vs reference-style (wall-clock from ray.init, actor start and model load included)",
                     wall / r["pipeline_utt_s"]))
    if "prefill_tok_s" in res:
        rows.append(("prefill ceiling tok/s", res["prefill_tok_s"]))
        if m and thr.get("pipeline_utt_s") and "tokens" in res:
            limit = thr["utterances"] / (res["tokens"]["unique_prompt_tokens"] / res["prefill_tok_s"])
            rows.append(("unique prompt tokens (both stages)", res["tokens"]["unique_prompt_tokens"]))
            rows.append(("prefill-bound limit utt/s", limit))
            rows.append(("share of prefill-bound limit", thr["pipeline_utt_s"] / limit))
    if "t4" in res:
        rows.append(("T4 fit (15 GiB, fp16): largest max_batch_tokens", res["t4"].get("largest_max_batch_tokens")))
    print(f"\n{res['date']} {res['device']}  {res['command']}")
    print("| figure | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |")


if __name__ == "__main__":
    main()
