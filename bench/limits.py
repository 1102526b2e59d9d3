"""How close a stage comes to the hardware's physical limit, from the counters ``mecpe infer`` writes.

FLOPs a stage needed = 2 x (non-embedding parameters) x (prompt tokens it computed + answer tokens it ran) + 2 x
(vocabulary x hidden) x answer tokens (the output layer runs only where a logit is read). Attention's own FLOPs and
the unmerged LoRA matmuls are not counted: this is the work the model needs, not the work an implementation does, so
a share is an upper bound on useful utilisation. Limits: H100/H200 SXM dense bf16 989 TFLOP/s (spec sheet) and, for
one-token decoding steps, the bytes bound: every step reads all weights once at 4.8 TB/s (H200 HBM3e spec; KV-cache
reads not counted, so again an optimistic limit).
"""

from __future__ import annotations

import json
import os

PEAK_BF16_FLOPS = 989e12  # dense bf16, H100/H200 SXM spec
PEAK_HBM_BYTES = 4.8e12  # H200 HBM3e spec


def model_shape(config: dict) -> dict:
    """Parameter counts of a Llama-style decoder from its ``config.json`` (no weights loaded)."""
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or h // heads
    kv = config.get("num_key_value_heads") or heads
    vocab = config["vocab_size"]
    per_layer = h * heads * head_dim * 2 + 2 * h * kv * head_dim + 3 * h * inter + 2 * h
    emb = vocab * h
    tied = bool(config.get("tie_word_embeddings"))
    body = layers * per_layer + h
    return {"layers": layers, "hidden": h, "vocab": vocab, "non_embedding_params": body,
            "params": body + emb * (1 if tied else 2), "lm_head_params": emb}


def read_model_shape(model_dir: str) -> dict | None:
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        cfg = json.load(fh)
    return model_shape(cfg.get("text_config", cfg))


def stage_flops(shape: dict, counters: dict) -> float:
    """FLOPs a stage needed, from its engine counters (``computed_tokens``, ``generated_tokens``)."""
    computed, answers = counters.get("computed_tokens", 0), counters.get("generated_tokens", 0)
    return 2.0 * shape["non_embedding_params"] * (computed + answers) + 2.0 * shape["lm_head_params"] * answers


def decode_bytes_limit_s(shape: dict, decode_steps: int, bytes_per_param: int = 2) -> float:
    """Seconds the decoding steps need at the least: each step reads every weight once."""
    return decode_steps * shape["params"] * bytes_per_param / PEAK_HBM_BYTES


def stage_limits(shape: dict | None, engine: dict, busy_s: dict) -> dict:
    """Per stage: FLOPs, share of 989 TFLOP/s over its busy seconds and over its prefill seconds, and for decoding
    the share of the bytes-bound limit (limit seconds / decode seconds)."""
    if not shape:
        return {}
    out = {}
    for stage in ("emotion", "cause"):
        c = engine.get(stage) or {}
        flops = stage_flops(shape, c)
        busy, prefill, decode = busy_s.get(stage) or 0.0, c.get("prefill_s") or 0.0, c.get("decode_s") or 0.0
        steps = int(c.get("decode_steps") or 0)
        bound = decode_bytes_limit_s(shape, steps)
        out[stage] = {"flops": flops, "busy_s": busy,
                      "share_of_peak_busy": flops / (busy * PEAK_BF16_FLOPS) if busy else None,
                      "prefill_s": prefill, "share_of_peak_prefill": _prefill_share(shape, c, prefill),
                      "decode_s": decode, "decode_steps": steps, "decode_bytes_limit_s": bound,
                      "share_of_bytes_limit_decode": bound / decode if decode else None}
    return out


def _prefill_share(shape: dict, c: dict, prefill_s: float) -> float | None:
    """Prefill FLOPs (computed prompt tokens; for scoring also the label tokens) over prefill seconds at peak."""
    if not prefill_s:
        return None
    scored = c.get("generated_tokens", 0) if not c.get("decode_steps") else 0
    flops = stage_flops(shape, {"computed_tokens": c.get("computed_tokens", 0), "generated_tokens": scored})
    return flops / (prefill_s * PEAK_BF16_FLOPS)


def measured_matmul_flops(n: int = 8192, repeats: int = 10) -> float | None:
    """bf16 n x n x n matmul FLOP/s on this GPU (the measured ceiling, beside the spec); None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2.0 * n ** 3 * repeats / (start.elapsed_time(end) / 1e3)
