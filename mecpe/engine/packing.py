"""Packed rows, pure (no model): targets grouped by prefix into segments, segments packed into rows and rows into
batches within a token budget, the batch's layout (left-padded ids, positions, the owner of every column), and which
column may see which. ``mecpe.engine`` says why rows are packed this way."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch

BUCKET_COLUMNS = 128  # static_shape's column step: FlexAttention's block size
ROW_TOKENS = 2048  # rows are filled with several conversations up to this many tokens (longer ones: own row)


@dataclass
class Block:
    """One target in a packed row: its question ids and, for scoring, the answers' common start and one
    continuation per label; ``room``: positions reserved for decoding after the question."""

    key: tuple[int, int]
    question: list[int]
    common: list[int] = field(default_factory=list)
    conts: list[list[int]] = field(default_factory=list)
    room: int = 0
    data: Any = None

    @property
    def width(self) -> int:  # tokens present at the first forward
        return len(self.question) + len(self.common) + sum(map(len, self.conts))


Segment = tuple[tuple[int, ...], list[Block]]  # a prefix and the blocks that share it


def _row_shape(segs: Sequence[Segment]) -> tuple[int, int, int]:
    """(prefill tokens, blocks, largest decoding room) of a row made of ``segs``."""
    return (sum(len(p) + sum(b.width for b in bl) for p, bl in segs), sum(len(bl) for _, bl in segs),
            max((b.room for _, bl in segs for b in bl), default=0))


def _cost(tokens: int, blocks: int, room: int) -> int:
    """Padded columns of a row: prefill tokens + decoding room (every block of the row adds one column a step)."""
    return tokens + blocks * room


def row_cost(segs: Sequence[Segment]) -> int:
    return _cost(*_row_shape(segs))


def segments(items: Iterable[tuple[tuple[int, ...], Block]], reuse_prefix: bool, budget: int) -> list[Segment]:
    """Blocks grouped by identical prefix ids (each block alone without reuse), split so a segment stays within
    ``budget`` (at least one block per segment)."""
    groups: dict[Any, Segment] = {}
    for prefix, b in items:
        groups.setdefault(prefix if reuse_prefix else b.key, (prefix, []))[1].append(b)
    out: list[Segment] = []
    for prefix, blocks in groups.values():
        cur: list[Block] = []
        tokens, room = len(prefix), 0  # the row shape of (prefix, cur), kept as it grows (not re-summed per block)
        for b in blocks:
            grown = (tokens + b.width, max(room, b.room))
            if cur and _cost(grown[0], len(cur) + 1, grown[1]) > budget:
                out.append((prefix, cur))
                cur, grown = [], (len(prefix) + b.width, b.room)
            cur.append(b)
            tokens, room = grown
        out.append((prefix, cur))
    return out


def batches(segs: list[Segment], budget: int) -> list[list[list[Segment]]]:
    """Segments packed into rows (first-fit decreasing, up to ``ROW_TOKENS`` or the longest segment: little
    padding), rows sorted by size and cut into batches of at most ``budget`` padded tokens."""
    stats = sorted(((_row_shape([s]), s) for s in segs), key=lambda x: -_cost(*x[0]))
    cap = max([min(budget, ROW_TOKENS)] + [_cost(*st) for st, _ in stats])
    rows: list[list[Segment]] = []
    acc: list[tuple[int, int, int]] = []  # running _stats of each row
    for (t, nb, rm), s in stats:
        for k, (rt, rb, rr) in enumerate(acc):
            new = (rt + t, rb + nb, max(rr, rm))
            if _cost(*new) <= cap:
                rows[k].append(s)
                acc[k] = new
                break
        else:
            rows.append([s])
            acc.append((t, nb, rm))
    rows.sort(key=row_cost)
    out: list[list[list[Segment]]] = []
    for row in rows:
        if out and (len(out[-1]) + 1) * row_cost(row) > budget:
            out.append([])
        if not out:
            out.append([])
        out[-1].append(row)
    return out


@dataclass
class Layout:
    """Left-padded ids and positions of a batch of packed rows, the owner of every column (segment, block,
    continuation) from which the attention mask follows, each block's (row, last question column), and for
    scoring the (row, predicting column, token, block, label or -1) targets, one per row of ``targets``."""

    ids: torch.Tensor
    pos: torch.Tensor
    seg: torch.Tensor  # -1 padding, else segment number (unique in the batch)
    blk: torch.Tensor  # -1 prefix, else block number (unique in the batch)
    alt: torch.Tensor  # 0 shared, j + 1 label continuation j
    blocks: list[Block]
    ends: list[tuple[int, int]]
    block_seg: list[int]  # segment of each block
    next_pos: list[int]  # position of each block's first answer token
    targets: np.ndarray  # (n, 5) int64: row, predicting column, token, block, label (-1: the shared answer start)


def row_width(batch: list[list[Segment]]) -> int:
    """Columns of the batch's widest row at its first forward (``layout``'s width before any padding)."""
    return max(_row_shape(row)[0] for row in batch)


def static_shape(rows: int, width: int) -> tuple[int, int]:
    """The (rows, width) bucket a batch is padded to where a compiled kernel wants few shapes (the flex prefill of
    label scoring): rows up to a power of two, columns up to a multiple of ``BUCKET_COLUMNS`` (flex's block), so a
    corpus meets a few shapes (full batches of one budget: rows filled to about ``ROW_TOKENS``, mostly one), each
    compiled once, instead of one per batch."""
    return 1 << max(0, rows - 1).bit_length(), -(-width // BUCKET_COLUMNS) * BUCKET_COLUMNS


def layout(batch: list[list[Segment]], pad: int, dev, shape: tuple[int, int] | None = None) -> Layout:
    """The batch's ``Layout``, moved to the device as one tensor. ``shape``: at least this many (rows, columns), the
    extra ones padding (more left padding, then rows of padding only: their queries see themselves only).

    Host cost (issue #29: it runs between two GPU forwards; token by token it took ~0.1 s a batch of 256
    conversations on this project's CPU, ~0.25 s on the H100's host): one Python step per *piece* (a prefix, a
    block's question, its answer start, one label continuation), a run of columns with one owner and consecutive
    positions; numpy fills the columns from the pieces' lengths."""
    widths = [_row_shape(row)[0] for row in batch]
    width = max(widths + ([shape[1]] if shape else []))
    n_rows = max(len(batch), shape[0] if shape else 0)
    tokens: list[int] = []
    # per piece: (length, first position, segment, block, alt, the column that predicts its first token, -1 for a
    # piece that is no answer); each later token of an answer piece is predicted by the column before it
    pieces: list[tuple[int, int, int, int, int, int]] = []
    blocks, ends, block_seg, next_pos = [], [], [], []
    nseg = 0
    for i, row in enumerate(batch):
        c = width - widths[i]  # the row's first column
        for prefix, bl in row:
            plen = len(prefix)
            tokens += prefix
            pieces.append((plen, 0, nseg, -1, 0, -1))
            c += plen
            for b in bl:
                g = len(blocks)
                blocks.append(b)
                qlen, shared = len(b.question), len(b.question) + len(b.common)
                tokens += b.question
                tokens += b.common
                pieces.append((qlen, plen, nseg, g, 0, -1))
                pieces.append((len(b.common), plen + qlen, nseg, g, 0, c + qlen - 1))
                ends.append((i, c + qlen - 1))
                block_seg.append(nseg)
                next_pos.append(plen + qlen)
                c += shared
                last_shared = c - 1  # predicts the first token of every label's continuation
                for j, cont in enumerate(b.conts):
                    tokens += cont
                    pieces.append((len(cont), plen + shared, nseg, g, j + 1, last_shared))
                    c += len(cont)
            nseg += 1
    n, pos0, seg, blk, alt, first = np.asarray(pieces, dtype=np.int64).reshape(-1, 6).T
    total = int(n.sum())
    offset = within(n)  # each token's index in its piece
    # each token's flat column (row * width + column): a row's tokens are contiguous and right-aligned
    row_len = np.asarray(widths, dtype=np.int64)
    row_first = np.arange(len(batch), dtype=np.int64) * width + (width - row_len)
    flat = np.repeat(row_first - (np.cumsum(row_len) - row_len), row_len) + np.arange(total, dtype=np.int64)
    grid = np.empty((5, n_rows * width), dtype=np.int64)
    for k, fill in enumerate((pad, 0, -1, -1, 0)):  # ids, pos, seg, blk, alt of padding
        grid[k].fill(fill)
    grid[:, flat] = np.stack([np.asarray(tokens, dtype=np.int64), np.repeat(pos0, n) + offset, np.repeat(seg, n),
                              np.repeat(blk, n), np.repeat(alt, n)])
    # scoring targets: every token of an answer piece, with the column that predicts it
    opening = np.repeat(first, n)
    answer = opening >= 0
    col = np.where(offset == 0, opening, flat % width - 1)[answer]
    at = flat[answer]
    targets = np.stack([at // width, col, grid[0, at], grid[3, at], grid[4, at] - 1], axis=1)
    packed = to_device(torch.from_numpy(grid.reshape(5, n_rows, width)), dev)
    return Layout(*packed.unbind(0), blocks, ends, block_seg, next_pos, targets)


def within(lengths: np.ndarray) -> np.ndarray:
    """Each element's index within its run, for runs of ``lengths`` laid end to end (numpy layouts, no Python step
    per token: ``layout`` and ``mecpe.engine.ragged``)."""
    return np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def to_device(t: torch.Tensor, dev) -> torch.Tensor:
    """A host tensor on ``dev``: through pinned memory without a host sync on CUDA, as-is on the CPU."""
    if torch.device(dev).type != "cuda":
        return t
    return t.pin_memory().to(dev, non_blocking=True)


def visible(seg_q, blk_q, alt_q, seg_k, blk_k, alt_k) -> torch.Tensor:
    """(n, Q, K) may-attend: same segment, and the key is prefix or the query's own block (its shared tokens or
    the query's own continuation). Causality comes separately."""
    sk, bk, ak = seg_k[:, None, :], blk_k[:, None, :], alt_k[:, None, :]
    return (sk == seg_q[:, :, None]) & (sk >= 0) & (
        (bk == -1) | ((bk == blk_q[:, :, None]) & ((ak == 0) | (ak == alt_q[:, :, None]))))


def prefill_visible(lay: Layout) -> torch.Tensor:
    """(n, 1, W, W) may-attend of a whole batch's first pass: ``visible`` and causal; padding queries see
    themselves only."""
    width = lay.ids.shape[1]
    allowed = visible(lay.seg, lay.blk, lay.alt, lay.seg, lay.blk, lay.alt)
    allowed &= torch.ones((width, width), dtype=torch.bool, device=allowed.device).tril()
    allowed |= torch.eye(width, dtype=torch.bool, device=allowed.device)  # padding queries: themselves only
    return allowed[:, None]



def common_prefix(seqs: Sequence[Sequence[int]]) -> list[int]:
    out = []
    for toks in zip(*seqs):
        if any(t != toks[0] for t in toks):
            break
        out.append(toks[0])
    return out
