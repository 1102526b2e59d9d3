"""Packed rows, pure (no model): targets grouped by prefix into segments, segments packed into rows and rows into
batches within a token budget, the batch's layout (left-padded ids, positions, the owner of every column), and which
column may see which. ``mecpe.engine`` says why rows are packed this way."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

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
    scoring the (row, predicting column, token, block, label or -1) targets."""

    ids: torch.Tensor
    pos: torch.Tensor
    seg: torch.Tensor  # -1 padding, else segment number (unique in the batch)
    blk: torch.Tensor  # -1 prefix, else block number (unique in the batch)
    alt: torch.Tensor  # 0 shared, j + 1 label continuation j
    blocks: list[Block]
    ends: list[tuple[int, int]]
    block_seg: list[int]  # segment of each block
    next_pos: list[int]  # position of each block's first answer token
    targets: list[tuple[int, int, int, int, int]]


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
    """The batch's ``Layout``, built as Python lists and moved to the device as one tensor (slicing tensors per
    block cost ~1 ms a batch of host time: issue #29). ``shape``: at least this many (rows, columns), the extra
    ones padding (more left padding, then rows of padding only: their queries see themselves only)."""
    widths = [_row_shape(row)[0] for row in batch]
    width = max(widths + ([shape[1]] if shape else []))
    ids, pos, seg, blk, alt = [], [], [], [], []
    blocks, ends, block_seg, next_pos, targets = [], [], [], [], []
    nseg = 0
    for i, row in enumerate(batch):
        c = width - widths[i]
        r_ids, r_pos, r_seg, r_blk, r_alt = [pad] * c, [0] * c, [-1] * c, [-1] * c, [0] * c
        for prefix, bl in row:
            plen = len(prefix)
            r_ids += prefix
            r_seg += [nseg] * plen
            r_blk += [-1] * plen
            r_alt += [0] * plen
            r_pos += range(plen)
            c += plen
            for b in bl:
                g = len(blocks)
                blocks.append(b)
                qlen, shared = len(b.question), len(b.question) + len(b.common)
                r_ids += b.question
                r_ids += b.common
                r_seg += [nseg] * shared
                r_blk += [g] * shared
                r_alt += [0] * shared
                r_pos += range(plen, plen + shared)
                ends.append((i, c + qlen - 1))
                block_seg.append(nseg)
                next_pos.append(plen + qlen)
                targets += [(i, c + qlen + k - 1, tok, g, -1) for k, tok in enumerate(b.common)]
                d = c + shared
                for j, cont in enumerate(b.conts):
                    n = len(cont)
                    r_ids += cont
                    r_seg += [nseg] * n
                    r_blk += [g] * n
                    r_alt += [j + 1] * n
                    r_pos += range(plen + shared, plen + shared + n)
                    targets += [(i, (c + shared - 1) if k == 0 else (d + k - 1), tok, g, j)
                                for k, tok in enumerate(cont)]
                    d += n
                c = d
            nseg += 1
        for full, part in ((ids, r_ids), (pos, r_pos), (seg, r_seg), (blk, r_blk), (alt, r_alt)):
            full.append(part)
    for _ in range(len(batch), shape[0] if shape else 0):
        for full, value in ((ids, pad), (pos, 0), (seg, -1), (blk, -1), (alt, 0)):
            full.append([value] * width)
    packed = to_device(torch.tensor([ids, pos, seg, blk, alt], dtype=torch.long), dev)
    return Layout(*packed.unbind(0), blocks, ends, block_seg, next_pos, targets)


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
