"""Where one predictor actor's time goes on a GPU (issue #29): the real actor (``EmotionCausePredictor``, share_base)
called in this process on Ray Data-sized batches of ECF test conversations, as each actor of ``mecpe infer`` is
called, without Ray. Not a test: it prints tables (and writes them with ``--out``).

    MECPE_DATA=/tmp/ecf python bench/profile_gpu.py --copies 3 --variant base \\
        --variant rows1024:row_tokens=1024 --variant mbt16k:max_batch_tokens=16384 --torch-profile --out FILE

Each variant runs the same batches (``--batch-size`` conversations, as ``inference.batch_size``; copies get new
conversation ids, so no two copies share a batch or a prefix) and reports per stage: utterances, wall seconds
(synced), utt/s, forward passes, decoding steps, the engine's prefill and decode seconds. A variant sets
PredictorSpec fields (``max_batch_tokens=16384``, ``prefill_attention=flex``), ``prompt_layout=prefix``
(``prompt.layout``: the instruction once in the shared prefix; with the base model the cause stage's answers, so its
decoding steps, change with the prompt: compare its steps), ``row_tokens`` (``mecpe.engine.packing.ROW_TOKENS``),
``grouped=0`` (decoding steps on transformers' SDPA with its KV repeat instead of ``mecpe.engine.attention``'s
folded grouped heads), ``liger=1`` (``inference.liger_kernels``: Liger's fused RMSNorm, SwiGLU and RoPE patched into
the actor's models; they stay patched for the variants after it, so name it last) or ``compile=0`` (with
``prefill_attention=flex``: flex without the compiled decoder, ``mecpe.engine.compiled.ENABLED``) or ``cpu_backend=inductor``
(on the CPU, compile where a GPU would: ``mecpe.engine.compiled.CPU_BACKEND``; uncompiled by default). A
variant's first batches carry its compilations: name it twice to see both. The base model is SmolLM2-135M-Instruct
without adapters (a merged adapter costs what the base costs); the cause stage reads the gold emotions
(``inference.cause_input=gold``), so its share of utterances is gold's non-neutral share.

``--torch-profile``: the first variant once more under ``torch.profiler``: the top CUDA kernels by total time, the
top host operators by self time, and the GPU-busy share (sum of kernel time / wall). ``--forward-check``: one forward
of a synthetic (rows x 2048) batch with a causal mask (``is_causal``), a dense boolean mask as the engine builds,
and tokens/s of each: what the model alone can do, and what the dense mask costs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    return name, {k: _value(v) for k, _, v in (kv.partition("=") for kv in rest.split(",") if kv)}


def batches_of(convs, copies: int, batch_size: int):
    """Ray Data-sized input tables of the actor: ``copies`` of the conversations under new ids, in order."""
    from mecpe.infer.rows import ROW_SCHEMA, conversation_row, rows_table
    from mecpe.infer.stages import ParseStage

    rows = []
    for k in range(copies):
        for c in convs:
            conv = dataclasses.replace(c, id=f"{c.id}-{k}") if k else c
            rows.append(ParseStage._row("bench", 0, len(rows), f"item {len(rows)}", conv_id=conv.id,
                                        conversation=conversation_row(conv)))
    return [rows_table(rows[i:i + batch_size], ROW_SCHEMA) for i in range(0, len(rows), batch_size)]


def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run_variant(actor, tables, dev) -> dict:
    """Every table through the actor; per-stage figures summed from the engine stats the actor reports."""
    from mecpe.infer.rows import merge_engine

    engine: dict = {}
    utt = {"emotion": 0, "cause": 0}
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0, epoch0 = time.perf_counter(), time.time()
    answers, rejects = {}, {}
    for table in tables:
        out = actor(table).to_pylist()
        for r in out:
            if r.get("reject"):  # the actor rejects a conversation whose batch failed: say why, not just 0 utt/s
                reason = f"{r['reject']['stage']}: {r['reject']['reason']}"[:300]
                rejects[reason] = rejects.get(reason, 0) + 1
            utt["emotion"] += len(r["emotions"] or [])
            utt["cause"] += len(r["causes"] or [])
            answers[r["uid"]] = ([(e["utterance"], e["label"]) for e in r["emotions"] or []],
                                 [(c["utterance"], c["causes"]) for c in r["causes"] or []])
        engine = merge_engine(engine, out[0]["engine"])
    sync(dev)
    wall = time.perf_counter() - t0
    stages = {}
    for stage in ("emotion", "cause"):
        e = engine.get(stage, {})
        stages[stage] = {"utterances": utt[stage], "seconds": round(e.get("seconds", 0.0), 3),
                         "prefill_s": round(e.get("prefill_s", 0.0), 3), "decode_s": round(e.get("decode_s", 0.0), 3),
                         "forward_passes": e.get("forward_passes"), "decode_steps": e.get("decode_steps"),
                         **{k: round(e.get(k, 0.0), 3) for k in ("decode_wait_s", "decode_host_s", "decode_launch_s")},
                         "computed_tokens": e.get("computed_tokens"), "generated_tokens": e.get("generated_tokens")}
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0.0
    return {"wall_s": round(wall, 3), "utterances": utt["emotion"], "utt_per_s": round(utt["emotion"] / wall, 1),
            "peak_gib": round(peak, 2), "stages": stages, "answers": answers, "rejects": rejects,
            "epoch_start": round(epoch0, 3), "epoch_end": round(epoch0 + wall, 3)}


def torch_profile(actor, tables, dev, top: int) -> tuple[str, dict]:
    from torch.profiler import ProfilerActivity, profile

    sync(dev)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for table in tables:
            actor(table)
        sync(dev)
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    ranges = sorted((e for e in events if e.key.startswith("mecpe.")), key=lambda e: e.key)
    named = [f"{'range (mecpe.engine)':<24}{'calls':>7}{'host s':>9}{'GPU s':>9}  (GPU: kernels launched inside)"]
    named += [f"{e.key:<24}{e.count:>7}{e.cpu_time_total / 1e6:>9.3f}{e.device_time_total / 1e6:>9.3f}"
              for e in ranges]
    text = "\n".join([
        f"torch.profiler over {len(tables)} batches: wall {wall:.2f} s (profiler overhead included), GPU kernel time "
        f"{kernel_us / 1e6:.2f} s = {kernel_us / 1e6 / wall:.1%} of wall, kernel launches {launches}",
        "", *named,
        "", "top CUDA kernels by total time",
        events.table(sort_by="self_cuda_time_total", row_limit=top, max_name_column_width=70),
        "", "top host operators by self CPU time",
        events.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=70)])
    return text, {"wall_s": round(wall, 3), "kernel_s": round(kernel_us / 1e6, 3), "launches": launches,
                  "ranges": {e.key: {"calls": e.count, "host_s": round(e.cpu_time_total / 1e6, 3),
                                     "gpu_s": round(e.device_time_total / 1e6, 3)} for e in ranges}}


def forward_check(model, dev, rows: int, width: int = 2048) -> dict:
    """Tokens/s of one forward over (rows x width) random ids: causal (``is_causal``, no mask tensor) against the
    dense boolean (rows, 1, width, width) mask of the engine's packed rows, and the mask's build time."""
    from mecpe.engine.packing import visible

    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (rows, width), device=dev)
    pos = torch.arange(width, device=dev).repeat(rows, 1)
    seg = (torch.arange(width, device=dev) // 512).repeat(rows, 1)  # four 512-token conversations a row
    blk = torch.full_like(seg, -1)
    out = {}

    def timed(fn, n=5):
        fn()
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync(dev)
        return (time.perf_counter() - t0) / n

    def build():
        m = visible(seg, blk, blk, seg, blk, blk)
        m &= torch.ones((width, width), dtype=torch.bool, device=dev).tril()
        return m[:, None]

    mask = build()
    keep = torch.zeros((rows, width), dtype=torch.bool, device=dev)
    keep[:, -1] = True
    with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        out["mask_build_s"] = timed(build)
        out["causal_s"] = timed(lambda: model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=1))
        out["dense_mask_s"] = timed(lambda: model(input_ids=ids, attention_mask=mask, position_ids=pos,
                                                  use_cache=False, logits_to_keep=1))
    tokens = rows * width
    return {"rows": rows, "width": width, **{k: round(v, 5) for k, v in out.items()},
            "causal_tok_per_s": round(tokens / out["causal_s"]), "dense_tok_per_s": round(tokens / out["dense_mask_s"])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "jobs/configs/ecf-smollm2.yaml"))
    ap.add_argument("--set", action="append", default=[], help="config override key=value")
    ap.add_argument("--conversations", type=int, default=0, help="the first N test conversations (0: all 341)")
    ap.add_argument("--copies", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--variant", action="append", default=[], help="name:field=value,... (first: the base)")
    ap.add_argument("--torch-profile", action="store_true")
    ap.add_argument("--forward-check", type=int, default=0, help="rows of the synthetic forward check (0: none)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--trace", default=None, help="a Chrome trace (.json.gz) of the second batch of the first variant")
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from mecpe import modeling, readers, storage
    from mecpe.config import load_config
    from mecpe.engine import attention, compiled, packing
    from mecpe.infer.driver import predictor_spec
    from mecpe.infer.stages import EmotionCausePredictor
    from mecpe.prompts import PromptBuilder

    cfg = load_config(args.config, ["inference.cause_input=gold", *args.set])
    test = Path(os.environ["MECPE_DATA"]) / "NUSTM_SemEval-2024_ECAC" / "data" / "Subtask_2_test.json"
    convs = readers.read_conversations(str(test)).conversations[:args.conversations or None]
    spec = dataclasses.replace(predictor_spec(cfg, storage.S3Settings()), adapters={})
    t0 = time.perf_counter()
    actor = EmotionCausePredictor(spec)
    load_s = time.perf_counter() - t0
    dev = torch.device(actor.device)
    tables = batches_of(convs, args.copies, args.batch_size)
    actor(tables[0])  # warm-up: vocabulary pieces, decoder tables, allocator, kernels
    variants = [parse_variant(v) for v in (args.variant or ["base"])]
    default_rows = packing.ROW_TOKENS
    report = {"gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "load_s": round(load_s, 1),
              "conversations": len(convs) * args.copies, "batch_size": args.batch_size, "variants": {}}
    lines = [f"# profile_gpu: {report['gpu']}, torch {torch.__version__}, {platform.node()}, actor load {load_s:.1f} s",
             f"# {len(convs)} x {args.copies} ECF test conversations in batches of {args.batch_size}; "
             f"base max_batch_tokens {spec.max_batch_tokens}, ROW_TOKENS {default_rows}; overrides {args.set}", "",
             f"{'variant':<14}{'stage':<9}{'utt':>8}{'wall s':>9}{'utt/s':>9}{'stage s':>9}{'prefill':>9}"
             f"{'decode':>9}{'passes':>8}{'steps':>7}"]
    first: dict = {}
    for name, fields in variants:
        packing.ROW_TOKENS = int(fields.pop("row_tokens", default_rows))
        attention.ENABLED = bool(fields.pop("grouped", True))
        compiled.ENABLED = bool(fields.pop("compile", True))
        compiled.CPU_BACKEND = fields.pop("cpu_backend", None)
        layout = fields.pop("prompt_layout", spec.prompt.layout)
        if fields.pop("liger", 0):  # the actor's models from here on: list liger variants last
            fused = [modeling.fuse_kernels(m, actor.device) for m in {id(m): m for m in actor.models.values()}.values()]
            fields["liger_kernels"] = all(fused)
        actor.spec = dataclasses.replace(spec, prompt=spec.prompt.model_copy(update={"layout": layout}), **fields)
        actor.builder = PromptBuilder(actor.tokenizer, **actor.spec.prompt.builder_kwargs(), cut_target=True)
        try:
            got = run_variant(actor, tables, dev)
        except Exception as exc:  # one variant failing (a compile on this GPU) must not lose the others' figures
            traceback.print_exc()
            report["variants"][name] = {"error": f"{type(exc).__name__}: {exc}"[:2000], "settings": fields}
            lines.append(f"{name:<14}failed: {type(exc).__name__}: {str(exc)[:200]}")
            write(args, lines, report)
            continue
        got["settings"] = {**fields, "prompt_layout": layout, "row_tokens": packing.ROW_TOKENS,
                           "grouped": attention.ENABLED, "compile": compiled.ENABLED,
                           "cpu_backend": compiled.CPU_BACKEND}
        answers = got.pop("answers")
        first = first if report["variants"] else answers
        same = [answers.get(k) == v for k, v in first.items()]
        got["same_answers_as_first"] = round(sum(same) / len(same), 4)  # whole conversations: emotions and causes
        report["variants"][name] = got
        lines.append(f"{name:<14}{'all':<9}{got['utterances']:>8}{got['wall_s']:>9.2f}{got['utt_per_s']:>9.1f}"
                     f"   peak {got['peak_gib']:.2f} GiB allocated; answers as the first variant's: "
                     f"{got['same_answers_as_first']:.2%} of conversations")
        for stage, s in got["stages"].items():
            rate = s["utterances"] / s["seconds"] if s["seconds"] else 0.0
            lines.append(f"{'':<14}{stage:<9}{s['utterances']:>8}{'':>9}{rate:>9.1f}{s['seconds']:>9.2f}"
                         f"{s['prefill_s']:>9.2f}{s['decode_s']:>9.2f}{s['forward_passes'] or 0:>8}"
                         f"{s['decode_steps'] or 0:>7}")
        lines += [f"{'':<14}rejected {n} conversations: {reason}" for reason, n in got["rejects"].items()]
        c = got["stages"]["cause"]
        lines.append(f"{'':<14}decoding host time: waiting for tokens {c['decode_wait_s']:.2f} s, bookkeeping "
                     f"{c['decode_host_s']:.2f} s, issuing forwards {c['decode_launch_s']:.2f} s")
        print("\n".join(lines[-4 - len(got['rejects']):]), flush=True)
        write(args, lines, report)  # so far: a run cut off by its time limit keeps the variants it finished
    packing.ROW_TOKENS = default_rows
    attention.ENABLED = True
    compiled.ENABLED, compiled.CPU_BACKEND = True, None
    actor.spec = spec
    if args.forward_check:
        model = next(iter(actor.models.values()))
        fc = forward_check(model, dev, args.forward_check)
        report["forward_check"] = fc
        lines += ["", f"forward check {fc}"]
        print(lines[-1], flush=True)
    if args.trace:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            actor(tables[min(1, len(tables) - 1)])
            sync(dev)
        raw = str(Path(args.trace).with_suffix(""))
        prof.export_chrome_trace(raw)
        import gzip
        import shutil
        with open(raw, "rb") as src, gzip.open(args.trace, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(raw)
    if args.torch_profile:
        text, prof = torch_profile(actor, tables[:max(1, len(tables) // 3)], dev, args.top)
        report["torch_profile"] = prof
        lines += ["", text]
    print("\n".join(lines))
    write(args, lines, report)
    return 0


def write(args, lines: list[str], report: dict) -> None:
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
