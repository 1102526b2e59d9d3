"""Model plumbing of the engine: the device, the compute dtype, inference mode, masks in the form the attention
implementation takes, and one forward pass."""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import time
from typing import Any, Sequence

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from mecpe.engine.attention import NAME as GROUPED_SDPA, aligned_empty, grouped
from mecpe.engine.cache import cache_argument, returned_cache
from mecpe.engine.packing import to_device


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
    """inference_mode + eval (LoRA dropout off, restored after) + autocast to the compute dtype on CUDA + grouped-query
    SDPA without KV copies (``mecpe.engine.attention``)."""
    was_training = model.training
    model.eval()
    dev, dt = device_of(model), compute_dtype(model)
    amp = (torch.autocast("cuda", dtype=dt) if dev.type == "cuda" and dt in (torch.float16, torch.bfloat16)
           else contextlib.nullcontext())
    try:
        with torch.inference_mode(), amp, grouped(model):
            yield dev
    finally:
        if was_training:
            model.train()


def _attn_impl(model: Any) -> str:
    cfg = model.config
    return getattr(cfg, "_attn_implementation", None) or getattr(cfg, "attn_implementation", None) or "eager"


_LAYER_TYPES = ("full_attention", "sliding_attention")


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def sliding_window(config: Any) -> int | None:
    """The window of the model's sliding-window layers (keys at most window - 1 positions back), None where no layer
    slides. Refuses layer types other than full and sliding attention (chunked, linear, ...): a 4D mask of packed
    rows cannot make them exact."""
    cfg = _text_config(config)
    types = getattr(cfg, "layer_types", None)
    if types is not None and set(types) - set(_LAYER_TYPES):
        raise ValueError(f"packed rows: model type {getattr(cfg, 'model_type', '?')!r} has layer_types "
                         f"{sorted(set(types) - set(_LAYER_TYPES))}, which a 4D mask cannot make exact; set "
                         "training.reuse_prefix=false (inference has no unpacked engine for it)")
    if types is not None and "sliding_attention" not in types:
        return None
    return getattr(cfg, "sliding_window", None)


def layer_masks(config: Any, allowed: torch.Tensor, pos_q: torch.Tensor, pos_k: torch.Tensor):
    """``allowed`` (B, 1, Q, K, bool) as the model's layers need it: the tensor itself, or a dict by layer type.

    transformers applies a 4D mask as given to every layer, so sliding-window layers (Gemma-2/3, Qwen2 with
    ``use_sliding_window``, Mistral) would attend past their window. Packed rows put several prompts in a row and
    share prefixes, so columns are not positions: the window is measured by position ids (query position - key
    position < ``sliding_window``, transformers' rule). Models listing ``layer_types`` get ``{type: mask}`` (they take
    such a dict as it is); a model without them slides on every layer (Mistral) and gets the windowed tensor. No
    window, or one no row can exceed (positions < K <= window), leaves ``allowed`` as it is."""
    window = sliding_window(config)
    if window is None or allowed.shape[-1] <= window:
        return allowed
    windowed = allowed & ((pos_q[:, None, :, None] - pos_k[:, None, None, :]) < window)
    types = getattr(_text_config(config), "layer_types", None)
    if types is None:
        return windowed
    return {t: windowed if t == "sliding_attention" else allowed for t in set(types)}


def block_mask(allowed: torch.Tensor) -> BlockMask:
    """FlexAttention's ``BlockMask`` of a boolean (B, 1, Q, K) 'may attend' mask: the same mask, read per element
    where a 128 x 128 block is partly visible, and blocks it hides wholly are skipped."""
    b, _, q, k = allowed.shape
    seen = allowed[:, 0]

    def mask_mod(row, _head, q_idx, kv_idx):
        return seen[row, q_idx, kv_idx]

    return create_block_mask(mask_mod, b, None, q, k, device=allowed.device)


def mask_form(allowed: torch.Tensor, impl: str, additive: torch.dtype | None = None, form: str = "sdpa"
              ) -> torch.Tensor | BlockMask:
    """A boolean 'may attend' mask in the form ``impl`` takes as-is: bool for SDPA, additive float for eager.
    Flash-attention kernels take no arbitrary masks.

    ``form="flex"``: a ``BlockMask`` (``block_mask``) for a prefill, which ``mecpe.engine.attention``'s registered
    function runs through FlexAttention (``inference.prefill_attention``); it needs the model on SDPA, switched to
    that function (``runtime.inference``).

    ``additive``: SDPA gets an additive mask of that dtype (the queries' dtype) instead of the bool one. SDPA turns a
    bool mask into that very tensor in every layer's call; built once per forward, it is one tensor instead of one
    per layer (issue #29 profile: the conversions were among the top host operators of every decoding step). The
    minimum of the dtype, not -inf: the same softmax where a row may attend anywhere, no NaN where it may not.
    ``impl`` may be ``mecpe.engine.attention``'s grouped SDPA, which takes SDPA's masks."""
    if form == "flex":
        if impl != GROUPED_SDPA:
            raise ValueError(f"inference.prefill_attention=flex needs a model on attn_implementation 'sdpa' (run in "
                             f"runtime.inference), not {impl!r}")
        return block_mask(allowed)
    if form != "sdpa":
        raise ValueError(f"unknown prefill attention {form!r}: 'sdpa' or 'flex'")
    if impl == GROUPED_SDPA:
        impl = "sdpa"
    if impl == "sdpa" and additive is None:
        return allowed
    if impl in ("sdpa", "eager"):
        dt = additive if impl == "sdpa" else torch.float32
        # rows padded to 16 columns: SDPA would otherwise pad a copy of the mask in every layer (issue #29 profile)
        out = aligned_empty(tuple(allowed.shape), dt, allowed.device) if impl == "sdpa" else torch.empty(
            allowed.shape, dtype=dt, device=allowed.device)
        return out.fill_(0).masked_fill_(~allowed, torch.finfo(dt).min)
    raise ValueError(f"packed rows need attn_implementation 'sdpa' or 'eager' (arbitrary 4D masks), not {impl!r}")


def additive_dtype(model: Any, dev: torch.device) -> torch.dtype | None:
    """The dtype of the additive SDPA mask for ``inference``: the autocast dtype on CUDA; None (bool) elsewhere."""
    dt = compute_dtype(model)
    return dt if dev.type == "cuda" and dt in (torch.float16, torch.bfloat16) else None


def attention_mask(model: Any, allowed: torch.Tensor, pos_q: torch.Tensor, pos_k: torch.Tensor,
                   additive: torch.dtype | None = None, form: str = "sdpa"):
    """The boolean (B, 1, Q, K) 'may attend' mask of queries at positions ``pos_q`` (B, Q) over keys at ``pos_k``
    (B, K) as the model takes it: per layer type where it has sliding-window layers (``layer_masks``), each in the
    attention implementation's form (``mask_form``; ``additive``, ``form``: see there)."""
    impl = _attn_impl(model)
    masks = layer_masks(model.config, allowed, pos_q, pos_k)
    if isinstance(masks, dict):
        return {t: mask_form(m, impl, additive, form) for t, m in masks.items()}
    return mask_form(masks, impl, additive, form)


def forward(model: Any, ids, mask, pos, cache, keep: int | torch.Tensor, use_cache: bool = True):
    """One forward; ``keep``: logits of the last ``keep`` positions, or of the given positions (1D tensor).
    Returns (logits, the cache or None)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kw = {} if cache is None else {cache_argument(type(base)): cache}
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=use_cache, logits_to_keep=keep, **kw)
    return (out.logits, returned_cache(out)) if use_cache else (out.logits, None)


@functools.lru_cache(maxsize=None)
def keeps_positions(cls: type) -> bool:
    """Whether ``cls.forward`` takes a 2D boolean ``logits_to_keep`` (transformers' ``slice_logits_to_keep`` with
    mask support, newer than 5.17): the logits of chosen (row, column) positions only, flattened."""
    fn = getattr(sys.modules.get(cls.__module__), "slice_logits_to_keep", None)
    try:
        return fn is not None and "torch.bool" in inspect.getsource(fn)
    except (OSError, TypeError):
        return False


def forward_at(model: Any, ids, mask, pos, cache, at: Sequence[tuple[int, int]], use_cache: bool = True):
    """One forward; the logits of the (row, column) positions ``at`` (sorted, distinct) only, as (len(at), vocab).

    A packed batch needs a few positions of each row, at different columns: keeping whole columns (the union over
    rows) ran lm_head at rows x union positions, most of a batch (issue #29: up to ~30x the positions needed, and a
    rows x union x vocab logits tensor). With a 2D boolean ``logits_to_keep`` only ``at`` goes through lm_head.
    Older transformers keep the union of columns, and a pre-hook on the output layer picks ``at`` out of those hidden
    states before it runs (whatever the model does to the logits after, softcapping included, still applies).
    Returns (logits, the cache or None)."""
    rows = [i for i, _ in at]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if keeps_positions(type(base)):
        keep = torch.zeros(tuple(ids.shape), dtype=torch.bool)
        keep[rows, [c for _, c in at]] = True
        return forward(model, ids, mask, pos, cache, to_device(keep, ids.device), use_cache)
    cols = sorted({c for _, c in at})
    where = {c: k for k, c in enumerate(cols)}
    pick = to_device(torch.tensor([rows, [where[c] for _, c in at]]), ids.device)

    def gather(_module, args):
        return (args[0][pick[0], pick[1]][None], *args[1:])

    hook = base.get_output_embeddings().register_forward_pre_hook(gather)
    try:
        logits, cache = forward(model, ids, mask, pos, cache, to_device(torch.tensor(cols), ids.device), use_cache)
    finally:
        hook.remove()
    return logits[0], cache


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def synced(dev) -> float:
    """A wall-clock mark after the device's queued work (a sync on CUDA; one per phase, not per step)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter()
