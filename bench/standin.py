"""Build the stand-in model for GPU benchmarks: Llama-2-13B-shaped, random weights, saved to disk.

The benchmarks then load it through mecpe's own loading code (``mecpe.modeling.load`` with NF4), exactly as the
real Llama-2-13b-chat would be loaded. The tokenizer is the project's tiny ECF tokenizer (its ids fit the 32,000-token
vocabulary), so prompts are the real ECF prompts.

    python bench/standin.py --out /tmp/standin-13b --tokenizer outputs/tiny-model [--layers 40]
"""

from __future__ import annotations

import argparse
import json
import os
import time


def build(out: str, tokenizer_dir: str, layers: int = 40, seed: int = 0) -> dict:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if os.path.exists(os.path.join(out, "config.json")):
        return {"out": out, "reused": True}
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=layers,
                      num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096,
                      rms_norm_eps=1e-5, torch_dtype="bfloat16")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    t0 = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    t_init = time.time() - t0
    model.save_pretrained(out, safe_serialization=True, max_shard_size="4GB")
    tok.save_pretrained(out)
    info = {"out": out, "params": sum(p.numel() for p in model.parameters()), "init_s": round(t_init, 1),
            "save_s": round(time.time() - t0 - t_init, 1), "reused": False}
    with open(os.path.join(out, "standin.json"), "w") as fh:
        json.dump(info, fh)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return info


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--layers", type=int, default=40)
    a = ap.parse_args()
    print(json.dumps(build(a.out, a.tokenizer, a.layers)))
