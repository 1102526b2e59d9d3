"""Decoding steps of fixed shapes, optionally replayed as one CUDA graph.

The dynamic loop of ``mecpe.engine.decoding`` grows its mask and cache by a column per slot each step and drops
finished rows, so every step has new shapes and the host issues every operator of the forward again: on an H100 a
SmolLM2 step costs ~40 ms of host time for ~10 ms of kernels (issue #29, ``bench/results/2026-12-06-decode-h100``).
Here the shapes are fixed for a whole batch: the rows stay (finished slots feed padding that only they see), the KV
cache hands attention its whole preallocated room (``cache.fix_room``), and the mask is one preallocated tensor over
that room in which each step opens one column per slot, its own new token. The inputs (tokens, positions, the
columns written) live in device buffers updated in place, so the same forward can be captured once as a CUDA graph
and replayed each step: one launch instead of ~1,100.

Models with sliding-window layers keep the dynamic loop (their per-layer masks depend on positions that move).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from mecpe.engine.cache import fix_room
from mecpe.engine.runtime import attention_mask, compute_dtype, forward, sliding_window

log = logging.getLogger(__name__)


def supports_fixed_shapes(model: Any) -> bool:
    """Fixed-shape steps need one mask for every layer: not a model with sliding-window layers."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return sliding_window(base.config) is None


class FixedStep:
    """The decoding forwards of one batch at fixed shapes. ``allowed`` (B, S, W) says which prefill columns each of
    the S slots of each row may see, ``pos`` (B, S) the position of each slot's first fed token; the cache was
    prefilled with room for ``steps`` more tokens per slot. ``graph``: capture the forward as a CUDA graph at the
    second step (the first runs eagerly: lazy initialisation must not happen during capture) and replay it after;
    where capture fails, the steps run eagerly and the reason is logged once."""

    def __init__(self, model: Any, cache: Any, allowed: torch.Tensor, pos: torch.Tensor, pad: int,
                 additive: torch.dtype | None, graph: bool = False):
        b, s, w = allowed.shape
        dev = allowed.device
        self.model, self.cache, self.s = model, cache, s
        self.own = torch.arange(s, device=dev)
        self.write_at = w + self.own  # the columns this step's tokens go to, advanced in place
        width = fix_room(cache, self.write_at)
        full = torch.zeros((b, 1, s, width), dtype=torch.bool, device=dev)
        full[:, 0, :, :w] = allowed
        self.mask = attention_mask(model, full, pos, pos, additive)  # one tensor: no sliding layers here
        self.open = True if self.mask.dtype == torch.bool else 0.0
        self.ids = torch.full((b, s), pad, dtype=torch.long, device=dev)
        self.pos = pos.clone()
        self.t = 0
        self.graph_wanted = graph and dev.type == "cuda"
        self.graph: Any = None
        self.out: torch.Tensor | None = None

    def _forward(self) -> torch.Tensor:
        self.mask.__dict__.pop("_mecpe_stacked", None)  # grouped SDPA's per-forward copy: stale after an update
        logits, _ = forward(self.model, self.ids, self.mask, self.pos, self.cache, self.s)
        return logits

    def _capture(self) -> None:
        dt = compute_dtype(self.model)
        try:
            graph = torch.cuda.CUDAGraph()
            self.mask.__dict__.pop("_mecpe_stacked", None)
            with torch.autocast("cuda", dtype=dt, enabled=dt in (torch.float16, torch.bfloat16), cache_enabled=False):
                with torch.cuda.graph(graph):
                    self.out, _ = forward(self.model, self.ids, self.mask, self.pos, self.cache, self.s)
            self.graph = graph
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager steps
            log.warning("decoding steps run without a CUDA graph: capture failed (%s: %s)", type(exc).__name__, exc)
            self.graph_wanted = False

    def __call__(self, feed: list[list[int]]) -> torch.Tensor:
        """One step: ``feed`` (B x S token ids, padding where a slot finished) in, logits (B, S, vocab) out (a
        graph's output buffer: read it before the next step)."""
        self.ids.copy_(torch.tensor(feed, dtype=torch.long), non_blocking=True)
        self.mask[:, 0, self.own, self.write_at] = self.open  # each slot sees its own new token from now on
        if self.graph_wanted and self.t >= 1 and self.graph is None:
            self._capture()
        if self.graph is not None:
            self.graph.replay()
            logits = self.out
        else:
            logits = self._forward()
        self.t += 1
        self.pos += 1
        self.write_at += self.s
        return logits
