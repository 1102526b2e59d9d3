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
        [--adapter OUT/runs/emotion-.../adapter] [--liger] [--limit 40] --json $OUT/probe.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

from mecpe.config import load_config
from mecpe.labels import EMOTIONS


def score(model, tok, builder, convs, budget: int) -> list[list[float]]:
    from mecpe.predict import score_emotion_labels

    out = score_emotion_labels(model, tok, builder, convs, max_batch_tokens=budget)
    return [per[u.id][0] for conv, per in zip(convs, out.results) for u in conv.utterances]


def per_emotion(gold: list[str], pred: list[str]) -> dict:
    rows = {}
    for e in EMOTIONS:
        tp = sum(g == p == e for g, p in zip(gold, pred))
        p_n, g_n = pred.count(e), gold.count(e)
        prec, rec = (tp / p_n if p_n else 0.0), (tp / g_n if g_n else 0.0)
        rows[e] = {"gold": g_n, "predicted": p_n, "precision": round(prec, 4), "recall": round(rec, 4),
                   "f1": round(2 * prec * rec / (prec + rec), 4) if prec + rec else 0.0}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--split", required=True, help="conversations JSON (e.g. <output_dir>/data/val.json)")
    ap.add_argument("--adapter", help="emotion adapter folder to score with")
    ap.add_argument("--liger", action="store_true", help="compare plain and Liger-patched scoring")
    ap.add_argument("--limit", type=int, help="first N conversations")
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from mecpe import modeling
    from mecpe.prompts import PromptBuilder
    from mecpe.train.examples import read_split

    cfg = load_config(args.config, args.overrides)
    device = modeling.pick_device()
    t0 = time.perf_counter()
    model, tok = modeling.load(cfg.model, cfg.quantization, device=device,
                               adapters={"emotion": args.adapter} if args.adapter else None)
    convs = read_split(args.split, args.limit)
    builder = PromptBuilder(tok, cfg.prompt.max_prompt_tokens, cut_target=True)  # as the inference actor builds
    gold = [u.emotion for c in convs for u in c.utterances]
    budget = cfg.inference.max_batch_tokens or 16384
    plain = score(model, tok, builder, convs, budget)
    pred = [EMOTIONS[max(range(7), key=s.__getitem__)] for s in plain]
    result: dict = {"config": args.config, "adapter": args.adapter, "model": type(model).__name__,
                    "device": device, "conversations": len(convs), "utterances": len(gold),
                    "load_and_score_s": round(time.perf_counter() - t0, 1),
                    "accuracy": round(sum(g == p for g, p in zip(gold, pred)) / len(gold), 4),
                    "predicted": dict(Counter(pred)), "gold": dict(Counter(gold)),
                    "per_emotion": per_emotion(gold, pred)}
    f1s = result["per_emotion"]
    result["weighted_f1_6"] = round(sum(f1s[e]["f1"] * f1s[e]["gold"] for e in EMOTIONS[1:])
                                    / max(sum(f1s[e]["gold"] for e in EMOTIONS[1:]), 1), 4)
    if args.liger:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        _apply_liger_kernel_to_instance(model=base)
        liger = score(model, tok, builder, convs, budget)
        lpred = [EMOTIONS[max(range(7), key=s.__getitem__)] for s in liger]
        deltas = [abs(a - b) for s, t in zip(plain, liger) for a, b in zip(s, t)]
        result["liger"] = {"max_abs_delta": round(max(deltas), 4), "mean_abs_delta": round(sum(deltas) / len(deltas), 4),
                           "label_agreement": round(sum(a == b for a, b in zip(pred, lpred)) / len(pred), 4),
                           "accuracy": round(sum(g == p for g, p in zip(gold, lpred)) / len(gold), 4),
                           "predicted": dict(Counter(lpred))}
    print(f"{result['model']} {'+ adapter' if args.adapter else '(base)'}: {len(convs)} conversations, "
          f"{len(gold)} utterances, accuracy {result['accuracy']}, six-emotion weighted F1 {result['weighted_f1_6']}")
    print("| emotion | gold | predicted | P | R | F1 |\n|---|---|---|---|---|---|")
    for e, r in f1s.items():
        print(f"| {e} | {r['gold']} | {r['predicted']} | {r['precision']} | {r['recall']} | {r['f1']} |")
    if "liger" in result:
        lg = result["liger"]
        print(f"Liger-patched vs plain: label log-prob |delta| max {lg['max_abs_delta']} mean {lg['mean_abs_delta']}; "
              f"same label {lg['label_agreement']:.2%}; accuracy {lg['accuracy']}; predicted {lg['predicted']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
