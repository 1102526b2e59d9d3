"""``mecpe.engine.packing.layout`` against a reference written token by token: the layout is filled by numpy from
its pieces' lengths (issue #29: host time between two GPU forwards), so every column's id, position and owner, each
block's end and every scoring target are checked here on random batches, padded shapes included. The model-level
exactness of what follows from the layout is ``tests/test_predict.py``'s."""

from __future__ import annotations

import random

import pytest
import torch

from mecpe.engine.packing import Block, batches, layout, segments


def reference_layout(batch, pad: int, shape=None) -> dict:
    """Column by column: each row right-aligned (left padding), a segment's prefix, then per block its question, its
    answer start and its label continuations; a target per answer token with the column that predicts it (the column
    before it, except a continuation's first token: the block's last shared column)."""
    widths = [sum(len(p) + sum(b.width for b in bl) for p, bl in row) for row in batch]
    width = max(widths + ([shape[1]] if shape else []))
    n_rows = max(len(batch), shape[0] if shape else 0)
    cols = {k: [[v] * width for _ in range(n_rows)] for k, v in
            (("ids", pad), ("pos", 0), ("seg", -1), ("blk", -1), ("alt", 0))}
    ends, block_seg, next_pos, targets = [], [], [], []
    g = nseg = 0

    def put(i, c, tok, pos, seg, blk, alt):
        for key, v in (("ids", tok), ("pos", pos), ("seg", seg), ("blk", blk), ("alt", alt)):
            cols[key][i][c] = v

    for i, row in enumerate(batch):
        c = width - widths[i]
        for prefix, bl in row:
            for k, tok in enumerate(prefix):
                put(i, c, tok, k, nseg, -1, 0)
                c += 1
            for b in bl:
                pos = len(prefix)
                for tok in b.question:
                    put(i, c, tok, pos, nseg, g, 0)
                    c, pos = c + 1, pos + 1
                ends.append((i, c - 1))
                block_seg.append(nseg)
                next_pos.append(pos)
                for tok in b.common:
                    targets.append((i, c - 1, tok, g, -1))
                    put(i, c, tok, pos, nseg, g, 0)
                    c, pos = c + 1, pos + 1
                last_shared, shared_pos = c - 1, pos
                for j, cont in enumerate(b.conts):
                    for k, tok in enumerate(cont):
                        targets.append((i, last_shared if k == 0 else c - 1, tok, g, j))
                        put(i, c, tok, shared_pos + k, nseg, g, j + 1)
                        c += 1
                g += 1
            nseg += 1
    return {**{k: torch.tensor(v) for k, v in cols.items()}, "ends": ends, "block_seg": block_seg,
            "next_pos": next_pos, "targets": targets}


def random_batches(rng: random.Random, scoring: bool, budget: int = 300):
    items = []
    for conv in range(rng.randint(1, 12)):
        prefix = tuple(rng.randrange(100) for _ in range(rng.randint(1, 40)))
        for u in range(rng.randint(1, 6)):
            question = [rng.randrange(100) for _ in range(rng.randint(1, 9))]
            if scoring:
                common = [rng.randrange(100) for _ in range(rng.randint(0, 3))]
                conts = [[rng.randrange(100) for _ in range(rng.randint(1, 4))] for _ in range(rng.randint(1, 7))]
                block = Block((conv, u), question, common, conts)
            else:  # decoding: a question and room for the answer
                block = Block((conv, u), question, room=rng.randint(1, 5))
            items.append((prefix, block))
    return batches(segments(items, rng.random() < 0.8, budget), budget)


@pytest.mark.parametrize("scoring", [True, False], ids=["scoring", "decoding"])
def test_layout_equals_the_token_by_token_reference(scoring):
    rng = random.Random(29)
    checked = 0
    for _ in range(60):
        for batch in random_batches(rng, scoring):
            shape = (rng.randint(1, 9), rng.randint(1, 200)) if rng.random() < 0.3 else None
            got, want = layout(batch, 7, "cpu", shape), reference_layout(batch, 7, shape)
            for key in ("ids", "pos", "seg", "blk", "alt"):
                assert torch.equal(getattr(got, key), want[key]), key
            assert (got.ends, got.block_seg, got.next_pos) == (want["ends"], want["block_seg"], want["next_pos"])
            assert [tuple(t) for t in got.targets.tolist()] == want["targets"]
            assert [b.key for b in got.blocks] == [b.key for _, bl in (s for row in batch for s in row) for b in bl]
            checked += 1
    assert checked > 60
