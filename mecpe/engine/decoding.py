"""Greedy "tree" decoding on packed rows, and the decoders that say which tokens may come next.

After one prefill of a batch, each step feeds one token per unfinished block of a row (slot j of row i is the
row's j-th block) and appends their keys and values to the row's cache (``mecpe.engine.cache``); a new token sees
its segment's prefix, its own question and its own earlier answer tokens only, at the positions of its own full
prompt. Finished blocks feed padding (invisible to the others); rows whose blocks all finished leave the batch;
when EOS is the only allowed token it is appended without a forward.
"""

from __future__ import annotations

import functools
from typing import Any, Hashable, Sequence

import torch

from mecpe.engine.cache import room_cache, select_rows
from mecpe.engine.packing import Block, Segment, batches, layout, prefill_visible, segments, visible
from mecpe.engine.runtime import attention_mask, forward, inference, pad_id, synced
from mecpe.engine.stats import StageStats

FINISHED = -3  # the segment and block of a slot that is empty or whose block finished


# ---------------------------------------------------------------- decoders

class Decoder:
    """Greedy decoding policy: ``allowed(state)`` -> token ids or None (all), ``advance`` -> (state, done)."""

    def __init__(self, eos: int, stop: frozenset[int] = frozenset()):
        self.eos, self.stop = eos, stop

    def start(self, block: Block) -> Any:
        return None

    def allowed(self, state: Any) -> Sequence[int] | None:
        return None

    def advance(self, state: Any, tok: int) -> tuple[Any, bool]:
        return state, tok == self.eos or tok in self.stop


class TrieDecoder(Decoder):
    """Greedy decoding restricted to a block's candidate answers (``block.data``: token lists ending with EOS)."""

    def start(self, block: Block) -> Any:
        return (block.data, ())

    def allowed(self, state: Any) -> Sequence[int]:
        answers, gen = state
        n = len(gen)
        return sorted({a[n] for a in answers if len(a) > n and tuple(a[:n]) == gen})

    def advance(self, state: Any, tok: int) -> tuple[Any, bool]:
        answers, gen = state
        return (answers, gen + (tok,)), tok == self.eos


class ListDecoder(Decoder):
    """Greedy decoding restricted to canonical cause answers, the exact language of the training targets
    (``cause_target``): after the forced start, the rest of the literal (e.g. `` [``), then strictly increasing
    ids in 1..N (no leading zeros) separated by commas, ``]``, EOS. Lookahead keeps every prefix completable: a digit
    only if some id > the last one and <= N starts that way, a comma only if a larger id exists; EOS only after
    ``]``. State: (literal chars consumed, partial number, last id, N), or ``CLOSED``; ``block.data`` is N."""

    CLOSED = ("]",)

    def __init__(self, eos: int, pieces: Sequence[str], literal: str, specials: set[int]):
        super().__init__(eos)
        chars = set(literal) | set("0123456789,]")
        self.literal = literal
        self.cands = [(t, p) for t, p in enumerate(pieces) if p and t not in specials and set(p) <= chars]
        self.table: dict[Any, dict[int, Any]] = {self.CLOSED: {eos: self.CLOSED}}

    def _char(self, state: Any, ch: str) -> Any:
        if state == self.CLOSED:
            return None
        pos, cur, last, n = state
        if pos < len(self.literal):
            return (pos + 1, cur, last, n) if ch == self.literal[pos] else None
        if ch.isdigit():
            new = cur + ch
            ok = new[0] != "0" and any(str(x).startswith(new) for x in range(last + 1, n + 1))
            return (pos, new, last, n) if ok else None
        if ch == ",":
            return (pos, "", int(cur), n) if cur and last < int(cur) < n else None
        if ch == "]":
            return self.CLOSED if (not cur and last == 0) or (cur and last < int(cur) <= n) else None
        return None

    def _next(self, state: Any) -> dict[int, Any]:
        hit = self.table.get(state)
        if hit is None:
            hit = {}
            for tok, piece in self.cands:
                s = state
                for ch in piece:
                    s = self._char(s, ch)
                    if s is None:
                        break
                if s is not None:
                    hit[tok] = s
            if not hit:  # a tokenizer lacking the needed pieces: end the row rather than loop
                hit = {self.eos: self.CLOSED}
            self.table[state] = hit
        return hit

    def start(self, block: Block) -> Any:
        return (0, "", 0, int(block.data))

    def allowed(self, state: Any) -> Sequence[int]:
        return list(self._next(state))

    def advance(self, state: Any, tok: int) -> tuple[Any, bool]:
        return self._next(state).get(tok, self.CLOSED), tok == self.eos


# ---------------------------------------------------------------- token text

@functools.lru_cache(maxsize=8)
def token_pieces(tokenizer: Any) -> list[str]:
    """Decoded text of every token id in context (after an anchor token, so leading spaces survive SentencePiece
    and byte-level decoders alike); memoized per tokenizer object (decoding a vocabulary takes a while)."""
    anchor = tokenizer("a", add_special_tokens=False)["input_ids"][-1]
    base = tokenizer.decode([anchor])
    texts = tokenizer.batch_decode([[anchor, t] for t in range(len(tokenizer))], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    return [s[len(base):] if s.startswith(base) else s for s in texts]


def newline_ids(tokenizer: Any) -> frozenset[int]:
    return frozenset(i for i, p in enumerate(token_pieces(tokenizer)) if "\n" in p)


def answer_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """The answer's text without EOS and special tokens, as the parsers read it."""
    ids = [t for t in ids if t != tokenizer.eos_token_id]
    return tokenizer.decode(ids, skip_special_tokens=True)


# ---------------------------------------------------------------- decoding

def _decode_batch(model: Any, batch: list[list[Segment]], pad: int, dev, max_new_tokens: int, decoder: Decoder,
                  stats: StageStats) -> dict[Hashable, list[int]]:
    """Greedy decoding of every block of a batch of packed rows at once (the module's docstring says how)."""
    lay = layout(batch, pad, dev)
    n_rows = len(batch)
    row_blocks: list[list[int]] = [[] for _ in range(n_rows)]  # the blocks of each row, in slot order
    for block, (i, _) in enumerate(lay.ends):
        row_blocks[i].append(block)
    n_slots = max(map(len, row_blocks))
    cols = torch.tensor(sorted({c for _, c in lay.ends}), device=dev)
    cache = room_cache(model, n_slots * max_new_tokens)
    t0 = synced(dev)
    logits, cache = forward(model, lay.ids, attention_mask(model, prefill_visible(lay)), lay.pos, cache, cols)
    stats.forward_passes += 1
    t1 = synced(dev)
    stats.prefill_s += t1 - t0
    colidx = {c: k for k, c in enumerate(cols.tolist())}
    first = {block: logits[i, colidx[c]] for block, (i, c) in enumerate(lay.ends)}
    # what each slot (rows x slots) feeds next: its segment, its block (FINISHED when empty or done), its position
    slot_segment = torch.full((n_rows, n_slots), FINISHED, dtype=torch.long)
    slot_block = torch.full((n_rows, n_slots), FINISHED, dtype=torch.long)
    slot_position = torch.zeros((n_rows, n_slots), dtype=torch.long)
    for i, blocks in enumerate(row_blocks):
        for j, block in enumerate(blocks):
            slot_segment[i, j] = lay.block_seg[block]
            slot_block[i, j] = block
            slot_position[i, j] = lay.next_pos[block]
    slot_segment, slot_block, slot_position = slot_segment.to(dev), slot_block.to(dev), slot_position.to(dev)
    col_segment, col_block, col_alt = lay.seg, lay.blk, lay.alt  # the owners of the cached columns
    states = {block: decoder.start(b) for block, b in enumerate(lay.blocks)}
    generated: dict[int, list[int]] = {block: [] for block in range(len(lay.blocks))}
    vocab = logits.shape[-1]
    masks: dict[tuple[int, ...] | None, torch.Tensor] = {}  # allowed-token rows, built once per distinct set

    def vocab_mask(allowed_ids: Sequence[int] | None) -> torch.Tensor:
        key = None if allowed_ids is None else tuple(allowed_ids)
        if key not in masks:
            mk = torch.zeros(vocab, dtype=torch.bool) if key is not None else torch.ones(vocab, dtype=torch.bool)
            if key is not None:
                mk[list(key)] = True
            masks[key] = mk.to(dev)
        return masks[key]

    live = [(i, j, block) for i, blocks in enumerate(row_blocks) for j, block in enumerate(blocks)]
    last = torch.stack([first[block] for _, _, block in live]).float()  # next-token logits of each live slot
    for step in range(max_new_tokens):
        allowed = [decoder.allowed(states[block]) for _, _, block in live]
        if any(a is not None for a in allowed):
            last = last.masked_fill(~torch.stack([vocab_mask(a) for a in allowed]), float("-inf"))
        toks = last.argmax(-1).tolist()
        stats.generated_tokens += len(live)
        continuing, finished = [], []
        for (i, j, block), tok in zip(live, toks):
            generated[block].append(tok)
            states[block], fin = decoder.advance(states[block], tok)
            if (not fin and len(generated[block]) < max_new_tokens
                    and list(decoder.allowed(states[block]) or ()) == [decoder.eos]):
                generated[block].append(decoder.eos)  # EOS is the only way on (after "]", a label): no forward needed
                fin = True
            (finished if fin else continuing).append((i, j, block, tok))
        if not continuing or step == max_new_tokens - 1:
            break
        for i, j, _, _ in finished:
            slot_segment[i, j] = slot_block[i, j] = FINISHED
        keep_rows = sorted({i for i, _, _, _ in continuing})
        if len(keep_rows) < slot_segment.shape[0]:  # drop rows with nothing left to decode
            sel = torch.tensor(keep_rows, device=dev)
            cache = select_rows(cache, sel)
            col_segment, col_block, col_alt = (col_segment.index_select(0, sel), col_block.index_select(0, sel),
                                               col_alt.index_select(0, sel))
            slot_segment, slot_block, slot_position = (slot_segment.index_select(0, sel),
                                                       slot_block.index_select(0, sel),
                                                       slot_position.index_select(0, sel))
            new_row = {old: new for new, old in enumerate(keep_rows)}
            continuing = [(new_row[i], j, block, tok) for i, j, block, tok in continuing]
        feed = torch.full(slot_segment.shape, pad, dtype=torch.long)
        for i, j, _, tok in continuing:
            feed[i, j] = tok
        active = slot_segment >= 0
        col_segment = torch.cat([col_segment, torch.where(active, slot_segment, torch.full_like(slot_segment, -1))], 1)
        col_block = torch.cat([col_block, torch.where(active, slot_block, torch.full_like(slot_block, -1))], 1)
        col_alt = torch.cat([col_alt, torch.zeros_like(slot_block)], 1)
        may_see = visible(slot_segment, slot_block, torch.zeros_like(slot_block), col_segment, col_block, col_alt)
        width = col_segment.shape[1]
        # each slot sees its own new column (a finished slot only that, so its softmax row is never empty)
        may_see[:, torch.arange(n_slots), width - n_slots + torch.arange(n_slots)] = True
        logits, cache = forward(model, feed.to(dev), attention_mask(model, may_see[:, None]), slot_position, cache,
                                n_slots)
        stats.forward_passes += 1
        stats.decode_steps += 1
        slot_position = slot_position + 1
        live = [(i, j, block) for i, j, block, _ in continuing]
        last = logits[[i for i, _, _ in live], [j for _, j, _ in live]].float()
    stats.decode_s += synced(dev) - t1
    return {lay.blocks[block].key: toks for block, toks in generated.items()}


def generate(model: Any, tokenizer: Any, items: Sequence[tuple[tuple[int, ...], Block]], *, reuse_prefix: bool,
             max_batch_tokens: int, max_new_tokens: int, decoder: Decoder, stats: StageStats
             ) -> dict[Hashable, list[int]]:
    """The greedy answer tokens of every block by its key (``items``: (prefix ids, block)); adds the work to
    ``stats``."""
    pad = pad_id(tokenizer)
    out: dict[Hashable, list[int]] = {}
    with inference(model) as dev:
        for batch in batches(segments(items, reuse_prefix, max_batch_tokens), max_batch_tokens):
            stats.computed_tokens += sum(len(p) + sum(len(b.question) for b in bl) for row in batch for p, bl in row)
            out.update(_decode_batch(model, batch, pad, dev, max_new_tokens, decoder, stats))
    return out
