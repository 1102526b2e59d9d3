"""Model plumbing of the engine: the device, the compute dtype, inference mode, masks in the form the attention
implementation takes, and one forward pass."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch

from mecpe.engine.cache import cache_argument, returned_cache


def device_of(model: Any) -> torch.device:
    dev = getattr(model, "device", None)
    return dev if isinstance(dev, torch.device) else next(model.parameters()).device


def compute_dtype(model: Any) -> torch.dtype:
    """bitsandbytes 4-bit layers carry their compute dtype; otherwise the model's parameter dtype."""
    for mod in model.modules():
        dt = getattr(mod, "compute_dtype", None)
        if isinstance(dt, torch.dtype):
            return dt
    return getattr(model, "dtype", None) or next(model.parameters()).dtype


@contextlib.contextmanager
def inference(model: Any):
    """inference_mode + eval (LoRA dropout off, restored after) + autocast to the compute dtype on CUDA."""
    was_training = model.training
    model.eval()
    dev, dt = device_of(model), compute_dtype(model)
    amp = (torch.autocast("cuda", dtype=dt) if dev.type == "cuda" and dt in (torch.float16, torch.bfloat16)
           else contextlib.nullcontext())
    try:
        with torch.inference_mode(), amp:
            yield dev
    finally:
        if was_training:
            model.train()


def _attn_impl(model: Any) -> str:
    cfg = model.config
    return getattr(cfg, "_attn_implementation", None) or getattr(cfg, "attn_implementation", None) or "eager"


def attention_mask(model: Any, allowed: torch.Tensor) -> torch.Tensor:
    """A boolean (B, 1, Q, K) 'may attend' mask in the form the attention implementation expects as-is:
    bool for SDPA, additive float for eager. Flash-attention kernels take no arbitrary masks."""
    impl = _attn_impl(model)
    if impl == "sdpa":
        return allowed
    if impl == "eager":
        return torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device).masked_fill_(
            ~allowed, torch.finfo(torch.float32).min)
    raise ValueError(f"packed rows need attn_implementation 'sdpa' or 'eager' (arbitrary 4D masks), not {impl!r}")


def forward(model: Any, ids, mask, pos, cache, keep: int | torch.Tensor, use_cache: bool = True):
    """One forward; ``keep``: logits of the last ``keep`` positions, or of the given positions (1D tensor).
    Returns (logits, the cache or None)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kw = {} if cache is None else {cache_argument(type(base)): cache}
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=use_cache, logits_to_keep=keep, **kw)
    return (out.logits, returned_cache(out)) if use_cache else (out.logits, None)


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def synced(dev) -> float:
    """A wall-clock mark after the device's queued work (a sync on CUDA; one per phase, not per step)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter()
