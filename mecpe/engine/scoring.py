"""Label scoring: the total log-probability of every candidate answer of every block, one forward without KV cache
per batch of packed rows (each block's shared answer tokens and its candidates' continuations side by side)."""

from __future__ import annotations

import contextlib
from typing import Any, Hashable, Sequence

import numpy as np
import torch
from torch.profiler import record_function

from mecpe.engine.compiled import compiled_decoder
from mecpe.engine.packing import (Block, Layout, Segment, batches, layout, prefill_visible, row_width, segments,
                                  static_shape, to_device)
from mecpe.engine.runtime import additive_dtype, attention_mask, forward, forward_at, inference, pad_id, synced
from mecpe.engine.ragged import RAGGED, RaggedLayout, attending, ragged_layout
from mecpe.engine.stats import StageStats


STATIC_PREFILLS = ("flex", "compiled")  # inference.prefill_attention values whose label scoring runs compiled


def mask_kind(prefill: str) -> str:
    """``runtime.mask_form``'s form of an ``inference.prefill_attention`` value: a block mask for flex, else SDPA's."""
    return "flex" if prefill == "flex" else "sdpa"


def label_targets(lay: Layout | RaggedLayout) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """What label scoring reads from a batch's forward: the distinct (row, column) positions whose logits it needs,
    sorted, and per target token (a host tensor, n x 4) its position's index among them, the token, its block and
    its label + 1 (0: the block's shared answer start)."""
    tg, width = lay.targets, lay.ids.shape[1]
    where, index = np.unique(tg[:, 0] * width + tg[:, 1], return_inverse=True)
    at = list(zip(*(x.tolist() for x in divmod(where, width))))
    return at, torch.from_numpy(np.stack([index.reshape(-1), tg[:, 2], tg[:, 3], tg[:, 4] + 1], axis=1))


def _score_batch(model: Any, batch: list[list[Segment]], pad: int, dev, prefill: str = "sdpa"
                 ) -> dict[Hashable, list[float]]:
    """One forward without cache over packed rows; total answer log-probability of every candidate of every block
    (shared tokens + the candidate's continuation, EOS included). Only the predicting positions go through lm_head,
    and each one's log-normalizer is computed once (a position predicts the first token of all seven labels).
    ``prefill``: how the forward runs (``inference.prefill_attention``): sdpa, flex (FlexAttention, the decoder
    compiled), compiled (SDPA, the decoder compiled); the last two at static buckets; ragged (one flat sequence,
    variable-length attention calls without a mask: ``mecpe.engine.ragged``), ragged_compiled (the same, the
    decoder compiled for its dynamic length: ``mecpe.engine.compiled``)."""
    if prefill in RAGGED:  # one flat sequence, no mask (mecpe.engine.ragged)
        with record_function("mecpe.score.layout"):
            lay = ragged_layout(batch, dev)
            at, targets = label_targets(lay)
        with (record_function("mecpe.score.forward"), attending(model, lay.plan),
              compiled_decoder(model, dev, dynamic=True) if prefill == "ragged_compiled" else contextlib.nullcontext()):
            logits, _ = forward_at(model, lay.ids, None, lay.pos, None, at, use_cache=False)
        return _label_scores(logits, targets, lay.blocks, dev)
    static = prefill in STATIC_PREFILLS
    with record_function("mecpe.score.layout"):  # named ranges: bench/profile_gpu.py --torch-profile
        # compiled: padded to a bucket of static shapes, so each bucket compiles once (attention.py)
        lay = layout(batch, pad, dev, static_shape(len(batch), row_width(batch)) if static else None)
        at, targets = label_targets(lay)
        mask = attention_mask(model, prefill_visible(lay), lay.pos, lay.pos, additive_dtype(model, dev),
                              mask_kind(prefill))
    with record_function("mecpe.score.forward"), (compiled_decoder(model, dev) if static
                                                  else contextlib.nullcontext()):
        logits, _ = forward_at(model, lay.ids, mask, lay.pos, None, at, use_cache=False)
    return _label_scores(logits, targets, lay.blocks, dev)


def _label_scores(logits: torch.Tensor, targets: torch.Tensor, blocks: list[Block], dev) -> dict[Hashable, list[float]]:
    """Each block's label totals from the logits at ``label_targets``' positions."""
    t = to_device(targets, dev)
    logits = logits.float()
    lp = logits[t[:, 0], t[:, 1]] - logits.logsumexp(-1)[t[:, 0]]
    scores = torch.zeros((len(blocks), len(blocks[0].conts) + 1), dtype=torch.float64, device=dev)
    scores.index_put_((t[:, 2], t[:, 3]), lp.double(), accumulate=True)  # column 0: the shared tokens
    return dict(zip((b.key for b in blocks), (scores[:, 1:] + scores[:, :1]).tolist()))


def score_blocks(model: Any, tokenizer: Any, items: Sequence[tuple[tuple[int, ...], Block]], *, reuse_prefix: bool,
                 max_batch_tokens: int, stats: StageStats, prefill: str = "sdpa") -> dict[Hashable, list[float]]:
    """Each block's candidates' total log-probabilities by block key (``items``: (prefix ids, block with ``common``
    and ``conts``)); adds the forward passes, device time and tokens run to ``stats``. ``prefill``: the attention
    of the forwards (``_score_batch``)."""
    pad = pad_id(tokenizer)
    got: dict[Hashable, list[float]] = {}
    with inference(model) as dev:
        for batch in batches(segments(items, reuse_prefix, max_batch_tokens), max_batch_tokens):
            t0 = synced(dev)
            got.update(_score_batch(model, batch, pad, dev, prefill))
            stats.prefill_s += synced(dev) - t0
            stats.forward_passes += 1
            stats.computed_tokens += sum(len(p) + sum(len(b.question) for b in bl) for row in batch for p, bl in row)
            stats.generated_tokens += sum(b.width - len(b.question) for row in batch for _, bl in row for b in bl)
    return got


def prefix_shared_logits(model: Any, tokenizer: Any, items: Sequence[tuple[tuple[int, ...], Block]], *,
                         reuse_prefix: bool, max_batch_tokens: int) -> dict[Hashable, torch.Tensor]:
    """Next-token logits (fp32, vocab, on the CPU) after each block's question, by block key, computed by the
    packed prefill that decoding uses: for exactness tests and diagnostics."""
    pad, out = pad_id(tokenizer), {}
    with inference(model) as dev:
        for batch in batches(segments(items, reuse_prefix, max_batch_tokens), max_batch_tokens):
            lay = layout(batch, pad, dev)
            cols = torch.tensor(sorted({c for _, c in lay.ends}), device=dev)
            mask = attention_mask(model, prefill_visible(lay), lay.pos, lay.pos)
            logits, _ = forward(model, lay.ids, mask, lay.pos, None, cols, use_cache=False)
            colidx = {c: k for k, c in enumerate(cols.tolist())}
            for b, (i, c) in zip(lay.blocks, lay.ends):
                out[b.key] = logits[i, colidx[c]].float().cpu()
    return out
