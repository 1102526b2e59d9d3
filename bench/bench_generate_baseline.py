"""The baseline a user would write (issue #29.5): each adapter merged into the base, transformers' batched
``generate`` on one prompt per utterance (no prefix sharing), greedy, stopping at EOS; prompts from mecpe's own
builders (``mecpe.prompts.PromptBuilder``, as mecpe's actors build them) and answers read by mecpe's parsers, so the
prompts are identical and only the method differs.

Emotion: every utterance of the first conversations of the official test set (at least ``--utterances``). Cause:
the utterances the baseline itself predicted non-neutral, with its own emotions shown. Prompts are batched in
length order (less padding: the favourable choice for the baseline). The rate is utterances / (emotion + cause
generate seconds); model loading and merging are reported apart. Writes ``baseline`` into ``--json`` (the file
``bench_corpus.py`` writes, which then prints mecpe's ratio to it).

    python bench/bench_generate_baseline.py --work /tmp/mecpe-corpus --utterances 2000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

import ecf_corpus  # noqa: E402
from bench_corpus import CONFIG, saved_adapters, update_json  # noqa: E402


def first_conversations(data_dir: str, utterances: int) -> list:
    """Whole test conversations, file order, until at least ``utterances`` utterances (mecpe's Conversation)."""
    from mecpe.data import conversation_from_json

    out, n = [], 0
    for c in ecf_corpus.test_conversations(data_dir):
        if n >= utterances:
            break
        conv = conversation_from_json(ecf_corpus.unlabelled(c, c["conversation_ID"]), source="test")
        out.append(conv)
        n += len(conv.utterances)
    return out


def merged_model(cfg, adapter: str, device: str):
    """Base + one adapter through mecpe's load sequence (tokenizer special tokens as mecpe sets them), merged."""
    from mecpe import modeling

    model, tok = modeling.load(cfg.model, cfg.quantization, device=device, adapters={"task": adapter})
    model = model.merge_and_unload()
    model.eval()
    return model, tok


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def generate_all(model, tok, prompts: list[list[int]], batch: int, max_new_tokens: int, device: str) -> list[str]:
    """Greedy batched ``generate`` over the prompts (length-sorted batches, left padding), stopping at EOS; the
    decoded answers in input order."""
    import torch

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    pad = tok.pad_token_id
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in idx], device=device)
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx], device=device)
        with torch.inference_mode():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=pad)
        for i, row in zip(idx, gen[:, width:].tolist()):
            out[i] = tok.decode(row, skip_special_tokens=True)
    return out


def emotion_stage(cfg, adapter: str, convs: list, a, device: str) -> tuple[list[dict], dict]:
    from mecpe.prompts import PromptBuilder, parse_emotion

    t = time.time()
    model, tok = merged_model(cfg, adapter, device)
    load_s = time.time() - t
    builder = PromptBuilder(tok, **cfg.prompt.builder_kwargs(), cut_target=True)
    keys = [(ci, u.id) for ci, c in enumerate(convs) for u in c.utterances]
    prompts = [builder.emotion_prompt(convs[ci], uid).ids for ci, uid in keys]
    sync(device)
    t = time.time()
    answers = generate_all(model, tok, prompts, a.batch_size, a.emotion_new_tokens, device)
    sync(device)
    gen_s = time.time() - t
    emotions: list[dict] = [{} for _ in convs]
    invalid = 0
    for (ci, uid), text in zip(keys, answers):
        label, _ = parse_emotion(text, uid)
        invalid += label is None
        emotions[ci][uid] = label or "neutral"
    del model
    return emotions, {"prompts": len(prompts), "prompt_tokens": sum(map(len, prompts)), "load_s": round(load_s, 2),
                      "generate_s": round(gen_s, 2), "invalid": invalid}


def cause_stage(cfg, adapter: str, convs: list, emotions: list[dict], a, device: str) -> tuple[list[dict], dict]:
    from mecpe.prompts import PromptBuilder, parse_causes

    t = time.time()
    model, tok = merged_model(cfg, adapter, device)
    load_s = time.time() - t
    builder = PromptBuilder(tok, **cfg.prompt.builder_kwargs(), cut_target=True)
    keys = [(ci, u.id) for ci, c in enumerate(convs) for u in c.utterances if emotions[ci][u.id] != "neutral"]
    prompts = [builder.cause_prompt(convs[ci], uid, emotions[ci]).ids for ci, uid in keys]
    sync(device)
    t = time.time()
    answers = generate_all(model, tok, prompts, a.batch_size, a.cause_new_tokens, device)
    sync(device)
    gen_s = time.time() - t
    causes: list[dict] = [{} for _ in convs]
    for (ci, uid), text in zip(keys, answers):
        causes[ci][uid] = parse_causes(text, len(convs[ci].utterances))[0]
    del model
    return causes, {"prompts": len(prompts), "prompt_tokens": sum(map(len, prompts)), "load_s": round(load_s, 2),
                    "generate_s": round(gen_s, 2)}


def agreement_with_mecpe(x1_dir: str, convs: list, emotions: list[dict], causes: list[dict]) -> dict | None:
    """Share of the baseline's utterances whose emotion / cause list equal mecpe's 1x run (same adapters)."""
    from bench_corpus import utterance_answers

    if not os.path.exists(os.path.join(x1_dir, ecf_corpus.PRED_FILE)):
        return None
    ref = utterance_answers(x1_dir, None)
    pairs = [(ref.get((int(c.id), u.id)), emotions[ci][u.id], tuple(causes[ci].get(u.id, [])))
             for ci, c in enumerate(convs) for u in c.utterances]
    pairs = [p for p in pairs if p[0] is not None]
    n = len(pairs)
    return {"utterances": n, "emotion_equal": round(sum(r[0] == e for r, e, _ in pairs) / n, 4) if n else None,
            "causes_equal": round(sum(r[1] == c for r, _, c in pairs) / n, 4) if n else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/mecpe-corpus", help="bench_corpus.py's folder (adapters.json, out-x1)")
    ap.add_argument("--json", help="default: WORK/corpus.json")
    ap.add_argument("--data", default=os.environ.get("MECPE_DATA", os.path.join(REPO, "..", "shared", "data", "ecf")))
    ap.add_argument("--config", default=CONFIG)
    ap.add_argument("--set", action="append", default=[], help="config override (k=v), as for bench_corpus.py")
    ap.add_argument("--utterances", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--emotion-new-tokens", type=int, default=16, help="answer `utterance_N :: label` + EOS fits")
    ap.add_argument("--cause-new-tokens", type=int, default=24, help="mecpe's inference.max_new_tokens")
    a = ap.parse_args()
    import torch

    from mecpe.config import load_config

    adapters = saved_adapters(a.work)
    if adapters is None:
        print(f"no adapters in {a.work}: run bench_corpus.py --train first", file=sys.stderr)
        return 2
    cfg = load_config(os.path.join(REPO, a.config), a.set)
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    convs = first_conversations(a.data, a.utterances)
    n = sum(len(c.utterances) for c in convs)
    emotions, emo = emotion_stage(cfg, adapters["emotion"], convs, a, device)
    causes, cau = cause_stage(cfg, adapters["cause"], convs, emotions, a, device)
    gen_s = emo["generate_s"] + cau["generate_s"]
    res = {"utterances": n, "conversations": len(convs), "device": device, "batch_size": a.batch_size,
           "emotion": emo, "cause": cau, "utt_per_s_generate": round(n / gen_s, 2),
           "utt_per_s_with_load": round(n / (gen_s + emo["load_s"] + cau["load_s"]), 2),
           "agreement_with_mecpe_x1": agreement_with_mecpe(os.path.join(a.work, "out-x1"), convs, emotions, causes),
           "command": " ".join(sys.argv)}
    update_json(a.json or os.path.join(a.work, "corpus.json"), "baseline", res)
    print("| figure | value |\n|---|---|")
    for k, v in [("utterances (conversations)", f"{n} ({len(convs)})"), ("device", device),
                 ("emotion: prompts / generate s / load+merge s", f"{emo['prompts']} / {emo['generate_s']} / "
                                                                  f"{emo['load_s']}"),
                 ("emotion answers without a label", emo["invalid"]),
                 ("cause: prompts / generate s / load+merge s", f"{cau['prompts']} / {cau['generate_s']} / "
                                                                f"{cau['load_s']}"),
                 ("baseline utt/s (generate time)", res["utt_per_s_generate"]),
                 ("baseline utt/s (with model load + merge)", res["utt_per_s_with_load"]),
                 ("agreement with mecpe's 1x run (emotion / causes)", res["agreement_with_mecpe_x1"])]:
        print(f"| {k} | {v} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
