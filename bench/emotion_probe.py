"""Where a model's emotion stage goes wrong (issue #30: Gemma-3-270m reached emotion validation loss 0.073 in
training, then label scoring called every validation utterance neutral). Two questions, one GPU process:

1. Does the model the trainer trains compute what inference computes? transformers' Trainer applies Liger's kernels
   to the model instance (``training.use_liger_kernel``: RMSNorm, RoPE, GeGLU/SwiGLU, fused cross-entropy); inference
   runs the plain model. ``--liger`` scores the same prompts with mecpe's label scoring on the plain model, then on
   the same instance after ``_apply_liger_kernel_to_instance`` (what the Trainer calls), and prints how far the
   seven label log-probabilities move and how often the chosen label changes.
2. What does an adapter predict on the validation split? ``--adapter DIR`` scores every validation utterance (the
   inference builder, the actor's token budget) and prints accuracy, the predicted count of each emotion beside gold,
   and per-emotion F1.

    python bench/emotion_probe.py --config jobs/configs/ecf-gemma3-270m.yaml --split OUT/data/val.json \\
        [--adapter OUT/runs/emotion-.../adapter] [--liger [--liger-kernels rms_norm]] [--compare-budget 2048] \\
        [--limit 40] --json $OUT/probe.json [quantization.compute_dtype=float32 ...]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

from mecpe.config import load_config


def score(model, tok, builder, convs, budget: int) -> list[list[float]]:
    from mecpe.predict import score_emotion_labels

    out = score_emotion_labels(model, tok, builder, convs, max_batch_tokens=budget)
    return [per[u.id][0] for conv, per in zip(convs, out.results) for u in conv.utterances]


LIGER_KERNELS = ("rope", "rms_norm", "geglu", "swiglu", "fused_linear_cross_entropy", "cross_entropy")


def deltas(a: list[list[float]], b: list[list[float]]) -> dict:
    """How far two scorings of the same utterances lie apart (nats, over every label of every utterance)."""
    d = [abs(x - y) for s, t in zip(a, b) for x, y in zip(s, t)]
    return {"max_abs_delta": round(max(d), 4), "mean_abs_delta": round(sum(d) / len(d), 6)}


def emotion_scores(convs, pred: list[str]) -> dict:
    """Accuracy, confusion and per-emotion P/R/F1 of ``pred`` (flat, in utterance order) against the conversations'
    gold labels, by the official metric module's diagnostic (``mecpe.metric``)."""
    from mecpe.metric import _emotion_scores

    labels = iter(pred)
    gold = {i: {"conversation": [{"utterance_ID": u.id, "emotion": u.emotion} for u in c.utterances]}
            for i, c in enumerate(convs)}
    got = {i: {"conversation": [{"utterance_ID": u.id, "emotion": next(labels)} for u in c.utterances]}
           for i, c in enumerate(convs)}
    return _emotion_scores(gold, got)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--split", required=True, help="conversations JSON (e.g. <output_dir>/data/val.json)")
    ap.add_argument("--adapter", help="emotion adapter folder to score with")
    ap.add_argument("--liger", action="store_true", help="compare plain and Liger-patched scoring")
    ap.add_argument("--liger-kernels", default=None,
                    help="with --liger: only these of Liger's kernels, comma-separated (rope, rms_norm, geglu, swiglu, "
                         "fused_linear_cross_entropy); default: what the Trainer applies")
    ap.add_argument("--compare-budget", type=int, default=None,
                    help="also score with this max_batch_tokens (other rows, other summation order) and print how "
                         "far the plain model's scores move: the rounding floor the Liger deltas are read against")
    ap.add_argument("--limit", type=int, help="first N conversations")
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from mecpe import modeling
    from mecpe.predict import pick_label
    from mecpe.prompts import PromptBuilder
    from mecpe.train.examples import read_split

    cfg = load_config(args.config, args.overrides)
    device = modeling.pick_device()
    t0 = time.perf_counter()
    model, tok = modeling.load(cfg.model, cfg.quantization, device=device,
                               adapters={"emotion": args.adapter} if args.adapter else None)
    convs = read_split(args.split, args.limit)
    builder = PromptBuilder(tok, **cfg.prompt.builder_kwargs(), cut_target=True)  # as the inference actor
    gold = [u.emotion for c in convs for u in c.utterances]
    budget = cfg.inference.max_batch_tokens or 16384
    plain = score(model, tok, builder, convs, budget)
    pred = [pick_label(s) for s in plain]
    scores = emotion_scores(convs, pred)
    result: dict = {"config": args.config, "adapter": args.adapter, "model": type(model).__name__,
                    "device": device, "conversations": len(convs), "utterances": len(gold),
                    "load_and_score_s": round(time.perf_counter() - t0, 1),
                    "accuracy": round(scores["emotion_accuracy"], 4),
                    "emotion_weighted_f1": round(scores["emotion_weighted_f1"], 4),
                    "predicted": dict(Counter(pred)), "gold": dict(Counter(gold)),
                    "per_emotion": scores["emotion_per_class"]}
    if args.compare_budget:
        result["budget"] = {"max_batch_tokens": [budget, args.compare_budget],
                            **deltas(plain, score(model, tok, builder, convs, args.compare_budget))}
    if args.liger:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        kernels = ({k: k in args.liger_kernels.split(",") for k in LIGER_KERNELS} if args.liger_kernels else {})
        _apply_liger_kernel_to_instance(model=base, **kernels)
        liger = score(model, tok, builder, convs, budget)
        lpred = [pick_label(s) for s in liger]
        result["liger"] = {"kernels": args.liger_kernels or "all", **deltas(plain, liger),
                           "label_agreement": round(sum(a == b for a, b in zip(pred, lpred)) / len(pred), 4),
                           "accuracy": round(emotion_scores(convs, lpred)["emotion_accuracy"], 4),
                           "predicted": dict(Counter(lpred))}
    print(f"{result['model']} {'+ adapter' if args.adapter else '(base)'}: {len(convs)} conversations, "
          f"{len(gold)} utterances, accuracy {result['accuracy']}, emotion weighted F1 {result['emotion_weighted_f1']}")
    print("| emotion | gold | predicted | P | R | F1 |\n|---|---|---|---|---|---|")
    for e, r in result["per_emotion"].items():
        print(f"| {e} | {r['support']} | {pred.count(e)} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1']:.4f} |")
    if "budget" in result:
        bd = result["budget"]
        print(f"plain, max_batch_tokens {bd['max_batch_tokens'][0]} vs {bd['max_batch_tokens'][1]}: label log-prob "
              f"|delta| max {bd['max_abs_delta']} mean {bd['mean_abs_delta']}")
    if "liger" in result:
        lg = result["liger"]
        print(f"Liger-patched ({lg['kernels']}) vs plain: label log-prob |delta| max {lg['max_abs_delta']} "
              f"mean {lg['mean_abs_delta']}; same label {lg['label_agreement']:.2%}; accuracy {lg['accuracy']}; "
              f"predicted {lg['predicted']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
