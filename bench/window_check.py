"""Sliding-window exactness of the packed engine on the tiny random Gemma-3 of the tests (issue #30 item 1): the
largest difference between prefix-shared next-token logits and the plain forward of each full prompt, with the
per-layer-type masks (``runtime.layer_masks``, the fix) and with one 4D mask for every layer (as before the fix:
``layer_masks`` replaced by the identity for the second run only). Prints a table; CPU, fp32.

    MECPE_DATA=/path/to/ecf OMP_NUM_THREADS=1 python bench/window_check.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def main() -> int:
    import _tiny
    from test_predict import LENGTHS, TEST_FILE, _load, _sharpen

    from mecpe import modeling, predict, readers
    from mecpe.engine import runtime
    from mecpe.prompts import PromptBuilder

    tok = modeling.load_tokenizer(_tiny.tiny_model_dir(), for_inference=True)
    builder = PromptBuilder(tok, max_prompt_tokens=1024)
    convs = readers.read_conversations(str(TEST_FILE)).conversations
    convs = [next(c for c in convs if len(c.utterances) == n) for n in LENGTHS]
    prompts = [builder.emotion_prompt(c, u.id) for c in convs for u in c.utterances]
    print(f"tiny Gemma-3, window {_tiny.GEMMA3_WINDOW}, {len(prompts)} emotion prompts of "
          f"{min(len(p.ids) for p in prompts)}-{max(len(p.ids) for p in prompts)} tokens")
    print(f"{'attn':<7}{'masks':<24}{'max |logit diff|':>18}")
    fixed = runtime.layer_masks
    for attn in ("sdpa", "eager"):
        model = _sharpen(_load(attn, "gemma3"))
        with torch.inference_mode():
            ref = [model(torch.tensor([p.ids])).logits[0, -1].float() for p in prompts]
        for name, fn in (("per layer type (fix)", fixed), ("one for all (before)", lambda c, a, q, k: a)):
            runtime.layer_masks = fn
            try:
                got = predict.prefix_shared_logits(model, tok, prompts, max_batch_tokens=16384)
            finally:
                runtime.layer_masks = fixed
            diff = max((a - b).abs().max().item() for a, b in zip(got, ref))
            print(f"{attn:<7}{name:<24}{diff:>18.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
