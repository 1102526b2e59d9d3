"""The model's decoder stack under ``torch.compile`` for prefill forwards: the elementwise work around the matmuls
(RMSNorm, RoPE, SiLU, residual adds, dtype copies: ~35% of a prefill's GPU time after attention in
``bench/results/2026-12-06-engine-h100``) fused into a few kernels.

Two forms, by what the batches' shapes allow:

* static (``inference.prefill_attention``: flex, compiled): batches padded to ``packing.static_shape``'s buckets,
  one graph each, flex attention inside the graph;
* dynamic (``ragged_compiled``): the ragged engine's one flat sequence, whose length changes every batch, traced
  once with a symbolic length. Its attention function (``ragged.ragged_attention``) is opaque to dynamo (it reads
  the batch's plan, a Python object, and calls the varlen kernels), so each layer is two graphs around an eager
  call; the graphs are compiled once per process whatever the batch.

Decoding steps keep the eager path (their shapes change every step; ``inference.decode_step: graph`` captures them
as CUDA graphs instead)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from mecpe.engine.attention import allow_static_shapes

ENABLED = True  # the static form for flex (bench/profile_gpu.py's A/B key compile=0)
CPU_BACKEND: str | None = None  # backend on the CPU (None: not compiled; tests: eager, the graph dynamo captures)


def backend(dev: torch.device) -> str | None:
    return "inductor" if dev.type == "cuda" else CPU_BACKEND


@contextlib.contextmanager
def compiled_decoder(model: Any, dev: torch.device, dynamic: bool = False):
    """Within the block the model's decoder stack (``base.model``: embeddings, layers, final norm) runs compiled,
    for static shapes or for ``dynamic`` ones. The compiled callable is kept on the module, so each form compiles
    once per process (and each static bucket once); the module's own forward is restored after."""
    name = backend(dev)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", None)
    if name is None or not (ENABLED or dynamic) or not isinstance(inner, torch.nn.Module):
        yield
        return
    compiled = inner.__dict__.setdefault("_mecpe_compiled", {})
    if (name, dynamic) not in compiled:
        allow_static_shapes()  # several graphs per function: static buckets, adapters, models
        compiled[name, dynamic] = torch.compile(inner.forward, dynamic=dynamic, backend=name)
    inner.forward = compiled[name, dynamic]
    try:
        yield
    finally:
        del inner.forward
