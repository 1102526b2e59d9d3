"""Prompt tokens the engine computes per utterance under each ``prompt.layout`` (issue #29): per conversation its
prefix once, then every utterance's question (prefix sharing), for both stages, on the ECF test conversations with a
real tokenizer. Not a test: it prints a table.

    MECPE_DATA=../shared/data/ecf python bench/prompt_tokens.py --tokenizer .cache/models/gguf-b179c9523d0e6a0f
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True, help="a model folder (SmolLM2's converted GGUF under .cache/models)")
    ap.add_argument("--max-prompt-tokens", type=int, default=1024)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from mecpe import readers
    from mecpe.prompts import LAYOUTS, PromptBuilder

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    test = Path(os.environ["MECPE_DATA"]) / "NUSTM_SemEval-2024_ECAC" / "data" / "Subtask_2_test.json"
    convs = readers.read_conversations(str(test)).conversations
    n = sum(len(c.utterances) for c in convs)
    print(f"# {len(convs)} ECF test conversations, {n} utterances, tokenizer {args.tokenizer}, "
          f"max_prompt_tokens {args.max_prompt_tokens}; the cause stage shown with every utterance's gold emotion")
    print(f"{'layout':<10}{'stage':<9}{'prefix/utt':>11}{'question/utt':>13}{'computed/utt':>13}")
    for layout in LAYOUTS:
        b = PromptBuilder(tok, args.max_prompt_tokens, cut_target=True, layout=layout)
        for stage in ("emotion", "cause"):
            prefix = question = 0
            for c in convs:
                emotions = {u.id: u.emotion or "neutral" for u in c.utterances}
                seen: set[tuple] = set()
                for u in c.utterances:
                    p = (b.emotion_prompt(c, u.id) if stage == "emotion" else b.cause_prompt(c, u.id, emotions))
                    key = tuple(p.prefix)
                    if key not in seen:  # a shortened prompt has its own prefix
                        seen.add(key)
                        prefix += len(p.prefix)
                    question += len(p.question)
            print(f"{layout:<10}{stage:<9}{prefix / n:>11.1f}{question / n:>13.1f}{(prefix + question) / n:>13.1f}")


if __name__ == "__main__":
    main()
