"""Label scoring over ragged sequences instead of packed rows' dense masks (``inference.prefill_attention: ragged``).

A packed row's mask lets each block see its prefix and itself, but SDPA's masked kernel still computes every query
against every key of the row: a row of ~2,000 columns holding two or three conversations does ~(prefix + blocks)^2
work per conversation where prefix^2 / 2 + blocks x prefix is needed (SmolLM2 on the ECF test set: prefixes of ~240
tokens, ~9 blocks of ~64; ~9x the attention FLOPs, and the mem-efficient kernel, since flash takes no mask). Here a
batch is one flat sequence without padding, ordered by kind of token: every prefix, then every block's shared tokens
(question + common answer start), then every label continuation. Each layer attends in six variable-length calls,
each a contiguous slice against a contiguous slice with no mask (causal or not), and merges a token's parts by their
log-sum-exp (the softmax over the union of the key sets, exactly):

    prefix tokens        its prefix, causal
    shared tokens        their conversation's prefix  +  their block's shared tokens, causal
    continuation tokens  their conversation's prefix  +  their block's shared tokens  +  their continuation, causal

On CUDA the calls are FlashAttention's varlen kernel (``aten._flash_attention_forward``: sm80+, bf16/fp16, grouped
query heads natively), elsewhere the mem-efficient kernel's varlen mode (a T4); on the CPU a reference loop computes
the same (exactness tests on tiny models). Positions
come from position ids, so each token sits where it would in its own full prompt. Models with sliding-window layers
or attention softcapping are refused (the kernels here apply neither by position).

A decoding prefill (blocks without continuations) runs the same way without a cache of its own: each layer's keys
and values go from its attention call straight into the packed rows' cache (``prefill_rows``, ``cache.RowWriter``),
over which the decoding steps attend with their masks as after a dense-mask prefill.

``ragged_compiled`` runs the same with the decoder stack compiled for the flat sequence's dynamic length
(``mecpe.engine.compiled``); the attention function stays outside the graphs (``torch.compiler.disable``)."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from mecpe.engine.attention import NAME as GROUPED_SDPA
from mecpe.engine.cache import RowWriter
from mecpe.engine.compiled import compiled_decoder
from mecpe.engine.packing import Block, Segment, to_device, within
from mecpe.engine.runtime import forward_at, sliding_window

NAME = "mecpe_ragged"  # the attention implementation's name in transformers' registry
RAGGED = ("ragged", "ragged_compiled")  # the inference.prefill_attention values that run here
CUDA_KERNEL = "auto"  # auto (flash on sm80+ in bf16/fp16, else mem-efficient) | flash | efficient: tests' A/B switch
Keep = Callable[[int, torch.Tensor, torch.Tensor], None]  # (layer index, keys, values) of a decoding prefill
_PLAN: contextvars.ContextVar["tuple[RaggedPlan, Keep | None] | None"] = contextvars.ContextVar("mecpe_ragged_plan",
                                                                                               default=None)


@dataclass(frozen=True)
class Seqs:
    """Variable-length sequences within one region of the flat batch: boundaries on the device (int32, for the
    kernel) and on the host (for the reference), and the longest length."""

    cu: torch.Tensor
    host: tuple[int, ...]
    longest: int

    @functools.cached_property
    def token_at(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per token, its sequence and its offset in it (device tensors): where a kernel that returns per-sequence
        rows (the mem-efficient kernel's log-sum-exp) keeps it. Built once per batch, read by every layer."""
        lengths = np.diff(np.asarray(self.host, dtype=np.int64))
        seq = np.repeat(np.arange(len(lengths)), lengths)
        return tuple(to_device(torch.from_numpy(a), self.cu.device) for a in (seq, within(lengths)))


def _seqs(lengths: Sequence[int] | np.ndarray, dev) -> Seqs:
    host = np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))])
    return Seqs(to_device(torch.from_numpy(host.astype(np.int32)), dev), tuple(host.tolist()), int(np.max(lengths)))


@dataclass(frozen=True)
class RaggedPlan:
    """Which slice attends to which, for every layer of one forward: token counts of the three regions (prefixes,
    shared, continuations) and the sequences of each call (by segment, block or continuation)."""

    regions: tuple[int, int, int]
    prefix: Seqs  # per segment, in the prefix region
    shared_seg: Seqs  # per segment, in the shared region
    shared_blk: Seqs  # per block, in the shared region
    cont_seg: Seqs | None  # per segment, in the continuation region (None: no continuations)
    cont_blk: Seqs | None  # per block, in the continuation region
    cont: Seqs | None  # per continuation

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """(T, H, D) queries, (T, H_kv, D) keys and values of the flat batch -> (T, H, D) attention output."""
        n_p, n_s, _ = self.regions
        cut = (slice(0, n_p), slice(n_p, n_p + n_s), slice(n_p + n_s, None))
        (qp, qs, qc), (kp, ks, kc), (vp, vs, vc) = ([t[c] for c in cut] for t in (q, k, v))
        op, _ = _attend(qp, kp, vp, self.prefix, self.prefix, True, scale)
        os_ = _merge([_attend(qs, kp, vp, self.shared_seg, self.prefix, False, scale),
                      _attend(qs, ks, vs, self.shared_blk, self.shared_blk, True, scale)])
        if self.cont is None:  # decoding prefills: no label continuations
            return torch.cat([op, os_])
        oc = _merge([_attend(qc, kp, vp, self.cont_seg, self.prefix, False, scale),
                     _attend(qc, ks, vs, self.cont_blk, self.shared_blk, False, scale),
                     _attend(qc, kc, vc, self.cont, self.cont, True, scale)])
        return torch.cat([op, os_, oc])


@dataclass
class RaggedLayout:
    """A batch as one flat sequence (``ids``, ``pos``: (1, T)), its ``plan``, the blocks in order (``packing.layout``'s
    order), the scoring targets in ``packing.Layout``'s form (row 0, predicting column, token, block, label or -1),
    which ``scoring.label_targets`` reads, and for a decoding prefill where each token sits in the packed rows."""

    ids: torch.Tensor
    pos: torch.Tensor
    plan: RaggedPlan
    blocks: list[Block]
    targets: np.ndarray
    ends: np.ndarray  # each block's last question token (its column in the flat sequence)
    cells: np.ndarray | None  # (T, 2): each token's (row, column) in ``packing.layout``'s rows, where asked for


def ragged_layout(batch: list[list[Segment]], dev, width: int | None = None) -> RaggedLayout:
    """The flat layout of a batch of packed rows (``packing.batches``' output; rows only group segments here).
    ``width``: the rows' width in ``packing.layout`` (right-aligned rows), to fill ``cells``. Host cost: one Python
    step per segment, block and continuation to collect lengths and ids; numpy does the rest (it runs between two GPU
    forwards, as ``packing.layout`` does)."""
    segs = [s for row in batch for s in row]
    blocks = [b for _, bl in segs for b in bl]
    if not blocks:
        raise ValueError("ragged layout of an empty batch")
    plen = np.fromiter((len(p) for p, _ in segs), np.int64, len(segs))
    per_seg = np.fromiter((len(bl) for _, bl in segs), np.int64, len(segs))
    qlen = np.fromiter((len(b.question) for b in blocks), np.int64, len(blocks))
    shared = qlen + np.fromiter((len(b.common) for b in blocks), np.int64, len(blocks))
    n_conts = np.fromiter((len(b.conts) for b in blocks), np.int64, len(blocks))
    clen = np.fromiter((len(c) for b in blocks for c in b.conts), np.int64, int(n_conts.sum()))
    ids = np.fromiter(itertools.chain(itertools.chain.from_iterable(p for p, _ in segs),
                                      itertools.chain.from_iterable(itertools.chain(b.question, b.common)
                                                                    for b in blocks),
                                      itertools.chain.from_iterable(c for b in blocks for c in b.conts)), np.int64)
    n_p, n_s, n_c = int(plen.sum()), int(shared.sum()), int(clen.sum())
    blk_plen = np.repeat(plen, per_seg)  # each block's prefix length
    cont_blk = np.repeat(np.arange(len(blocks)), n_conts)  # each continuation's block
    cont_start = blk_plen[cont_blk] + shared[cont_blk]  # the position of each continuation's first token
    pos = np.concatenate([within(plen), np.repeat(blk_plen, shared) + within(shared),
                          np.repeat(cont_start, clen) + within(clen)])
    # scoring targets (row 0, predicting column, token, block, label or -1): the common answer tokens, predicted by
    # the token before them; a continuation's first token by its block's last shared token, the others by theirs
    s_blk = np.repeat(np.arange(len(blocks)), shared)
    s_off = within(shared)
    common = np.nonzero(s_off >= qlen[s_blk])[0]
    c_blk = np.repeat(cont_blk, clen)
    c_off = within(clen)
    last_shared = n_p + np.cumsum(shared) - 1
    c_col = n_p + n_s + np.arange(n_c)
    c_label = np.repeat(np.arange(len(clen)) - np.repeat(np.cumsum(n_conts) - n_conts, n_conts), clen)
    targets = np.concatenate([
        np.stack([np.zeros_like(common), n_p + common - 1, ids[n_p + common], s_blk[common], np.full_like(common, -1)],
                 axis=1),
        np.stack([np.zeros(n_c, np.int64), np.where(c_off == 0, last_shared[c_blk], c_col - 1), ids[n_p + n_s:],
                  c_blk, c_label], axis=1)])
    blk_conts = np.bincount(cont_blk, weights=clen, minlength=len(blocks)).astype(np.int64)  # per block
    first_blk = np.cumsum(per_seg) - per_seg
    if n_c and not n_conts.all():
        raise ValueError("ragged layout: every block or none must have label continuations")
    conts = ((_seqs(np.add.reduceat(blk_conts, first_blk), dev), _seqs(blk_conts, dev), _seqs(clen, dev)) if n_c
             else (None, None, None))
    plan = RaggedPlan((n_p, n_s, n_c), _seqs(plen, dev), _seqs(np.add.reduceat(shared, first_blk), dev),
                      _seqs(shared, dev), *conts)
    ends = n_p + np.cumsum(shared) - shared + qlen - 1
    cells = None if width is None else _cells(batch, width, plen, per_seg, shared, clen, cont_blk)
    ids_t, pos_t = to_device(torch.from_numpy(np.stack([ids, pos])), dev)[:, None, :].unbind(0)
    return RaggedLayout(ids_t, pos_t, plan, blocks, targets, ends, cells)


def _cells(batch: list[list[Segment]], width: int, plen: np.ndarray, per_seg: np.ndarray, shared: np.ndarray,
           clen: np.ndarray, cont_blk: np.ndarray) -> np.ndarray:
    """(row, column) in ``packing.layout``'s right-aligned rows of each flat token (prefixes, shared, continuations
    in the flat order): in a row, each segment's prefix, then its blocks, each block's shared tokens followed by its
    continuations."""
    seg_row = np.repeat(np.arange(len(batch)), [len(row) for row in batch])
    blk_width = shared + np.bincount(cont_blk, weights=clen, minlength=len(shared)).astype(np.int64)
    seg_width = plen + np.add.reduceat(blk_width, np.cumsum(per_seg) - per_seg)
    row_width = np.bincount(seg_row, weights=seg_width, minlength=len(batch)).astype(np.int64)
    # a segment's first column: its row's first column + the segments before it in the row
    seg_col = (width - row_width)[seg_row] + _within_runs(seg_width, np.asarray([len(row) for row in batch]))
    blk_seg = np.repeat(np.arange(len(plen)), per_seg)
    blk_col = seg_col[blk_seg] + plen[blk_seg] + _within_runs(blk_width, per_seg)
    cont_col = blk_col[cont_blk] + shared[cont_blk] + _within_runs(clen, np.bincount(cont_blk, minlength=len(shared)))
    rows = np.concatenate([np.repeat(seg_row, plen), np.repeat(seg_row[blk_seg], shared),
                           np.repeat(seg_row[blk_seg][cont_blk], clen)])
    cols = np.concatenate([np.repeat(seg_col, plen) + within(plen), np.repeat(blk_col, shared) + within(shared),
                           np.repeat(cont_col, clen) + within(clen)])
    return np.stack([rows, cols], axis=1)


def _within_runs(values: np.ndarray, runs: np.ndarray) -> np.ndarray:
    """For ``values`` grouped in consecutive runs of ``runs`` elements: the sum of the values before each one in its
    run (an exclusive cumulative sum restarting at every run)."""
    total = np.cumsum(values) - values
    first = np.cumsum(runs) - runs
    return total - np.repeat(total[first[runs > 0]], runs[runs > 0])


def _merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Attention outputs of one set of queries over disjoint key sets, (out (T, H, D), lse (H, T)) each, combined
    into the output over their union: each part weighted by exp(its lse - the union's lse)."""
    lse = torch.stack([lse for _, lse in parts])
    w = torch.exp(lse - torch.logsumexp(lse, 0)).transpose(1, 2)[..., None]  # (n, T, H, 1)
    out = sum(w[i] * o.float() for i, (o, _) in enumerate(parts))
    return out.to(parts[0][0].dtype)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qs: Seqs, ks: Seqs, causal: bool, scale: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence i of ``q`` (rows qs.host[i]:qs.host[i+1]) attends to sequence i of ``k``/``v``; (out, lse (H, T))."""
    if q.device.type != "cuda":
        return _reference(q, k, v, qs, ks, causal, scale)
    flash = q.dtype in (torch.float16, torch.bfloat16) and torch.cuda.get_device_capability(q.device) >= (8, 0)
    if CUDA_KERNEL == "flash" or (CUDA_KERNEL == "auto" and flash):
        return _flash(q, k, v, qs, ks, causal, scale)
    return _efficient(q, k, v, qs, ks, causal, scale)


def _flash(q, k, v, qs: Seqs, ks: Seqs, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        q, k.to(q.dtype), v.to(q.dtype), qs.cu, ks.cu, qs.longest,
        ks.longest, 0.0, causal, False, scale=scale)
    if lse.shape != (q.shape[1], q.shape[0]):
        raise RuntimeError(f"FlashAttention's varlen log-sum-exp has shape {tuple(lse.shape)}, expected "
                           f"{(q.shape[1], q.shape[0])} (this torch's kernel differs); use prefill_attention=sdpa")
    return out, lse


def _efficient(q, k, v, qs: Seqs, ks: Seqs, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The mem-efficient (cutlass) kernel's varlen mode, for GPUs flash does not serve (a T4: sm75, fp16). It takes
    as many key/value heads as query heads, so grouped heads are repeated. Its log-sum-exp comes per sequence, (n
    sequences, H, longest rounded up to 32), and is read back per token: token t of sequence i at [i, :, t - start]."""
    g = q.shape[1] // k.shape[1]
    k, v = (t.to(q.dtype).repeat_interleave(g, 1) if g > 1 else t.to(q.dtype) for t in (k, v))
    out, lse, *_ = torch.ops.aten._efficient_attention_forward(
        q[None], k[None], v[None], None, qs.cu, ks.cu, qs.longest, ks.longest, 0.0, 1 if causal else 0, True,
        scale=scale)
    seq, offset = qs.token_at
    return out[0], lse[seq, :, offset].transpose(0, 1)


def _reference(q, k, v, qs: Seqs, ks: Seqs, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The same in plain torch, one sequence at a time (CPU: exact, slow; for tests and tiny models)."""
    g = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
    for i in range(len(qs.host) - 1):
        a, b, c, d = qs.host[i], qs.host[i + 1], ks.host[i], ks.host[i + 1]
        qq = q[a:b].transpose(0, 1).float()
        kk, vv = (t[c:d].repeat_interleave(g, 1).transpose(0, 1).float() for t in (k, v))
        s = qq @ kk.transpose(1, 2) * scale  # (H, n, m)
        if causal:  # queries and keys are the same positions here
            s = s.masked_fill(torch.ones(b - a, d - c, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        lse[:, a:b] = s.logsumexp(-1)
        out[a:b] = (s.softmax(-1) @ vv).transpose(0, 1).to(out.dtype)
    return out, lse


def ragged_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
                     dropout: float = 0.0, scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; the layout comes from ``attending``'s plan, not from a mask, and
    the layer's keys and values go to its ``keep`` where one is given. Output in transformers' (1, T, H, D)."""
    got = _PLAN.get()
    if got is None:
        raise RuntimeError("mecpe's ragged attention ran outside ragged.attending (no layout to attend by)")
    plan, keep = got
    unsupported = [k for k in ("softcap", "s_aux", "position_bias", "sliding_window") if kwargs.get(k) is not None]
    if dropout or unsupported or query.shape[0] != 1:
        raise ValueError(f"inference.prefill_attention=ragged: {type(module).__name__} asks for "
                         f"{unsupported or ['dropout' if dropout else 'a batch of rows']}; use prefill_attention=sdpa")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # (T, H, D) contiguous once per layer, so each call's slice along T is contiguous as the kernel wants it; in the
    # autocast dtype where one is on (SDPA is on autocast's lower-precision list: the dense path computes in it too)
    dt = torch.get_autocast_dtype("cuda") if query.is_cuda and torch.is_autocast_enabled("cuda") else query.dtype
    if keep is not None:
        keep(module.layer_idx, key, value)
    q, k, v = (t[0].transpose(0, 1).to(dt).contiguous() for t in (query, key, value))
    out = plan.attend(q, k, v, scale)
    return out[None], None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """The registered mask function: transformers builds no mask (the plan says who sees whom)."""
    return None


@functools.lru_cache(maxsize=None)
def register() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, torch.compiler.disable(ragged_attention))  # eager inside compiled decoders
    AttentionMaskInterface.register(NAME, _no_mask)
    return NAME


@contextlib.contextmanager
def attending(model: Any, plan: RaggedPlan, keep: Keep | None = None):
    """Within the block the model attends by ``plan`` (its attention implementation switched to ``NAME``, restored
    after), each layer's keys and values handed to ``keep`` if given. Refuses models this cannot compute exactly:
    sliding-window layers, attention other than SDPA."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    was = getattr(base.config, "_attn_implementation", None)
    if sliding_window(base.config) is not None:
        raise ValueError(f"inference.prefill_attention=ragged: {base.config.model_type} has sliding-window layers, "
                         "which the ragged kernels do not window by position; use prefill_attention=sdpa")
    if was not in ("sdpa", GROUPED_SDPA):
        raise ValueError(f"inference.prefill_attention=ragged needs a model on attn_implementation 'sdpa', not {was!r}")
    if not getattr(base, "_can_set_attn_implementation", lambda: False)():
        raise ValueError(f"inference.prefill_attention=ragged: {type(base).__name__} cannot switch its attention "
                         "implementation; use prefill_attention=sdpa")
    base.set_attn_implementation(register())
    token = _PLAN.set((plan, keep))
    try:
        yield
    finally:
        _PLAN.reset(token)
        base.set_attn_implementation(was)


def prefill_rows(model: Any, batch: list[list[Segment]], lay: Any, reserve: int, dev, compiled: bool = False
                 ) -> tuple[torch.Tensor, Any]:
    """A decoding prefill through the ragged calls: the next-token logits at every block's end, in the order of
    ``sorted(lay.ends)`` (as the dense prefill's ``forward_at`` returns them), and the ``room_cache`` of ``lay``'s
    packed rows with ``reserve`` columns of room, which the decoding steps then extend as after a dense prefill.
    ``compiled``: the decoder stack compiled for dynamic lengths (``ragged_compiled``)."""
    rl = ragged_layout(batch, dev, lay.ids.shape[1])
    rows = RowWriter(model, lay.ids.shape[0], lay.ids.shape[1], reserve, to_device(torch.from_numpy(rl.cells), dev))
    with (attending(model, rl.plan, rows.put),  # the flat ends are in block order, increasing
          compiled_decoder(model, dev, dynamic=True) if compiled else contextlib.nullcontext()):
        logits, _ = forward_at(model, rl.ids, None, rl.pos, None, [(0, int(e)) for e in rl.ends], use_cache=False)
    order = sorted(range(len(rl.ends)), key=lambda g: tuple(lay.ends[g]))  # block order -> (row, column) order
    return logits[to_device(torch.tensor(order), dev)], rows.done()
