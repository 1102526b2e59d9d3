"""Grouped-query attention over the engine's masks without copying the KV cache per layer.

transformers' SDPA path repeats every key/value head ``num_key_value_groups`` times (``repeat_kv``) whenever an
attention mask is given and more than one query position is asked: on CUDA, SDPA's kernels that take a mask have
no grouped-query mode. A decoding step of the engine feeds a few tokens per packed row (one per unfinished block)
with a mask, so every layer of every step copied the whole cache to three times its size and the attention read the
copy. Here the queries of the heads that share a key/value head are stacked along the query axis instead
(``(B, H, Q, D)`` -> ``(B, H_kv, g*Q, D)``), and the mask rows with them: the same dot products and softmax rows,
over the cache as it is. Used where few queries meet many keys (decoding); a prefill
(queries as many as keys) would have to stack a mask as large as the keys squared, so it keeps transformers' path.
SmolLM2-135M on an H100, 256 conversations a batch: a step's kernels 25.2 -> 9.6 ms, the same answers; the cause
stage 715 -> 855 utt/s in one run, 797 -> 832 in another, since the host issuing a step (~30 ms) sets its pace
(``bench/results/2026-12-06-decode-h100/how.txt``).

The same registered function runs a prefill through FlexAttention where its mask is a ``BlockMask``
(``inference.prefill_attention: flex``; ``runtime.mask_form``): SDPA with a dense mask of packed rows takes the
mem-efficient kernel over every block, while flex skips the blocks the mask hides wholly (one SmolLM2-shaped call on
8 rows x 2048 on an H100, compiled for that shape: 0.303 -> 0.112 ms, causal SDPA 0.109:
``bench/results/2026-12-06-flex-h100``). Compiled for dynamic shapes it lost: the emotion stage ran 2,005 -> 716
utt/s (``bench/results/2026-12-06-engine-h100``). So label scoring pads its batches to a few static shapes
(``packing.static_shape``) and those compile statically. Measured so (``bench/results/2026-12-07-flex-h100``):
the whole actor 938.0 -> 946.5 utt/s once compiled (~90 s of compiling first), 6% of conversations answered
otherwise (bf16), peak 13.0 -> 18.7 GiB; flex without the compiled decoder made the prefill 2x slower, so the gain
was the decoder's fusion, not flex. Hence opt-in.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

NAME = "mecpe_grouped_sdpa"  # the attention implementation's name in transformers' registry
FOLD_MAX_QUERIES = 4096  # fold when g * Q is at most this (decoding steps: tens to hundreds of queries a row)
ENABLED = True  # fold grouped heads in decoding; bench/profile_gpu.py's A/B switch (variant key grouped=0)
_ALIGN = 16  # SDPA's mem-efficient kernel wants the mask's row stride a multiple of this (else it pads a copy)



def aligned_empty(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` whose last dimension lives in a buffer padded to a multiple of 16, so
    SDPA takes it as a mask without padding a copy of it in every layer (its mem-efficient kernel's rule)."""
    last = shape[-1]
    padded = -(-last // _ALIGN) * _ALIGN
    return torch.empty((*shape[:-1], padded), dtype=dtype, device=device)[..., :last]


def _stacked_mask(mask: torch.Tensor, g: int, keys: int) -> torch.Tensor:
    """(B, 1, Q, K) -> (B, 1, g*Q, keys): row j*Q + s is query s's row, for each of the g stacked heads. Built once
    per forward and kept on the mask itself (every layer of a forward gets the same mask object; it goes with it)."""
    cached = getattr(mask, "_mecpe_stacked", None)
    if cached is not None and cached[0] == (g, keys):
        return cached[1]
    b, _, q, _ = mask.shape
    out = aligned_empty((b, 1, g * q, keys), mask.dtype, mask.device)
    out.view(b, 1, g, q, keys).copy_(mask[:, :, None, :, :keys])
    mask._mecpe_stacked = ((g, keys), out)
    return out


STATIC_FLEX_SHAPES = 64  # compiled graphs a statically compiled function may hold (torch._dynamo's recompile limit)


def allow_static_shapes() -> None:
    """Raises dynamo's recompile limit (8 by default, after which a function falls back to eager: for flex, one that
    materialises every score) to ``STATIC_FLEX_SHAPES``: each bucket of ``packing.static_shape`` is a graph."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, STATIC_FLEX_SHAPES)


def _bucketed(rows: int, width: int) -> bool:
    """Shapes of ``packing.static_shape``'s buckets, which label scoring pads its batches to."""
    from mecpe.engine.packing import static_shape

    return static_shape(rows, width) == (rows, width)


@functools.lru_cache(maxsize=None)
def _compiled_flex(static: bool) -> Any:
    """flex_attention compiled once per process. Static for bucketed shapes: a kernel specialised to each of a few
    shapes (compiled for dynamic shapes, one call at 128 rows x 2,048 took 12.9 ms against 4.5 ms for the dense
    mask: ``bench/results/2026-12-06-decode-h100``); dynamic for any other (the decoding prefill's rows), which a
    static compile would recompile for at every batch (``allow_static_shapes`` for the static one)."""
    if static:
        allow_static_shapes()
    return torch.compile(flex_attention, dynamic=not static)


def flex_prefill(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask,
                 dropout: float = 0.0, scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """One layer's attention through ``flex_attention`` over ``block_mask``, output in transformers' (B, Q, H, D).
    Compiled on CUDA; on the CPU it runs uncompiled (materialising the scores: exact, for tests on tiny models).
    Refuses what the engine's SDPA path would not compute the same way (softcapping, sinks, a position bias,
    dropout) rather than answer differently."""
    unsupported = [k for k in ("softcap", "s_aux", "position_bias") if kwargs.get(k) is not None]
    if dropout or kwargs.get("output_attentions"):
        unsupported.append("dropout" if dropout else "output_attentions")
    if unsupported:
        raise ValueError(f"inference.prefill_attention=flex: {type(module).__name__} asks for {unsupported}, which "
                         "the flex prefill does not compute; use prefill_attention=sdpa")
    if query.device.type != "cuda" or torch.compiler.is_compiling():
        fn = flex_attention  # the CPU's exact path, or inside the compiled decoder (scoring.compiled_decoder)
    else:
        fn = _compiled_flex(_bucketed(query.shape[0], query.shape[2]))
    out = fn(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def grouped_sdpa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | BlockMask | None, dropout: float = 0.0, scaling: float | None = None,
                 is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature. A ``BlockMask`` goes to ``flex_prefill``; grouped query heads are
    stacked where a mask shared by all heads meets few queries (decoding); anything else goes to transformers' own
    SDPA function unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if isinstance(attention_mask, BlockMask):
        return flex_prefill(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    g = getattr(module, "num_key_value_groups", 1)
    b, h, q, d = query.shape
    plain = (not ENABLED or g == 1 or q == 1 or attention_mask is None or not isinstance(attention_mask, torch.Tensor)
             or attention_mask.dim() != 4 or attention_mask.shape[1] != 1 or g * q > FOLD_MAX_QUERIES
             or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None
             or kwargs.get("output_attentions"))
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    kv = key.shape[1]
    mask = _stacked_mask(attention_mask, g, key.shape[-2])
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(b, kv, g * q, d), key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return out.reshape(b, h, q, value.shape[-1]).transpose(1, 2).contiguous(), None


@functools.lru_cache(maxsize=None)
def register() -> str:
    """Adds ``grouped_sdpa`` to transformers' attention registry (and SDPA's mask format under the same name, for
    the masks transformers would build itself); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, grouped_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


@contextlib.contextmanager
def grouped(model: Any):
    """Within the block, a model on transformers' SDPA attends through ``grouped_sdpa``; other implementations and
    models whose attention cannot be switched are left as they are. Restored after (a training model scored by the
    validation callback goes back to training on plain SDPA). Switched whatever ``ENABLED`` says: a flex prefill
    needs the function, and without folding it is transformers' SDPA function."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(base, "config", None)
    switch = (getattr(cfg, "_attn_implementation", None) == "sdpa"
              and hasattr(base, "set_attn_implementation")
              and getattr(base, "_can_set_attn_implementation", lambda: False)())
    if switch:
        base.set_attn_implementation(register())
    try:
        yield
    finally:
        if switch:
            base.set_attn_implementation("sdpa")
