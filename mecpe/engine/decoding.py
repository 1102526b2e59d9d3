"""Greedy "tree" decoding on packed rows, and the decoders that say which tokens may come next.

After one prefill of a batch, each step feeds one token per unfinished block of a row (slot j of row i is the
row's j-th block) and appends their keys and values to the row's cache (``mecpe.engine.cache``); a new token sees
its segment's prefix, its own question and its own earlier answer tokens only, at the positions of its own full
prompt. Finished blocks feed padding (invisible to the others); rows whose blocks all finished leave the batch;
when EOS is the only allowed token it is appended without a forward.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Hashable, Sequence

import torch
from torch.profiler import record_function

from mecpe.engine.cache import room_cache, select_rows
from mecpe.engine.packing import (Block, Segment, batches, layout, prefill_visible, row_width, segments, static_shape,
                                  to_device, visible)
from mecpe.engine.ragged import RAGGED, prefill_rows
from mecpe.engine.runtime import additive_dtype, attention_mask, forward, forward_at, inference, pad_id, synced
from mecpe.engine.scoring import mask_kind
from mecpe.engine.stats import StageStats
from mecpe.engine.steps import FixedStep, supports_fixed_shapes

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

    def mask_key(self, state: Any) -> tuple[int, ...] | None:
        """The allowed token ids as a sorted tuple (the decoding loop keeps one device mask row per distinct
        key), None for all; decoders with a state table override it to skip rebuilding the tuple every step."""
        allowed = self.allowed(state)
        return None if allowed is None else tuple(sorted(allowed))


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
        self.keys: dict[Any, tuple[int, ...]] = {}  # state -> sorted allowed ids (``mask_key``)

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

    def mask_key(self, state: Any) -> tuple[int, ...]:
        key = self.keys.get(state)
        if key is None:
            key = self.keys[state] = tuple(sorted(self._next(state)))
        return key


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


@functools.lru_cache(maxsize=8)
def list_decoder(tokenizer: Any, literal: str) -> ListDecoder:
    """The cause ``ListDecoder`` of a tokenizer and answer literal, built once: its candidate pieces come from a scan
    of the whole vocabulary and its state table fills as it is used, so every stage call reusing it saves both
    (states are immutable and the table a pure memo, so sharing it changes no answer)."""
    return ListDecoder(tokenizer.eos_token_id, token_pieces(tokenizer), literal, set(tokenizer.all_special_ids))


def newline_ids(tokenizer: Any) -> frozenset[int]:
    return frozenset(i for i, p in enumerate(token_pieces(tokenizer)) if "\n" in p)


def answer_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """The answer's text without EOS and special tokens, as the parsers read it."""
    ids = [t for t in ids if t != tokenizer.eos_token_id]
    return tokenizer.decode(ids, skip_special_tokens=True)


# ---------------------------------------------------------------- decoding

class _MaskTable:
    """Allowed-token masks as rows of one device table (row 0: everything allowed), one row per distinct
    ``Decoder.mask_key``: a step selects every live slot's row in one ``index_select``, instead of stacking a mask
    tensor per slot."""

    def __init__(self, vocab: int, dev):
        self.vocab, self.dev = vocab, dev
        self.rows: dict[tuple[int, ...] | None, int] = {None: 0}
        self.blocked = torch.zeros((1, vocab), dtype=torch.bool, device=dev)  # True: not allowed

    def row(self, key: tuple[int, ...] | None) -> int:
        hit = self.rows.get(key)
        if hit is None:
            new = torch.ones((1, self.vocab), dtype=torch.bool)
            new[0, list(key)] = False
            self.blocked = torch.cat([self.blocked, to_device(new, self.dev)])
            hit = self.rows[key] = len(self.rows)
        return hit


def _decode_batch(model: Any, batch: list[list[Segment]], pad: int, dev, max_new_tokens: int, decoder: Decoder,
                  stats: StageStats, step: str = "dynamic", prefill: str = "sdpa") -> dict[Hashable, list[int]]:
    """Greedy decoding of every block of a batch of packed rows at once (the module's docstring says how). Per step
    the host does one dict lookup or two per live slot and a constant number of tensor operations, and syncs once
    (reading the chosen tokens, which the decoders' state machines need). ``step``: ``dynamic`` grows the mask and
    drops finished rows; ``static`` and ``graph`` run every step at the batch's fixed shapes
    (``mecpe.engine.steps``), ``graph`` as one CUDA graph replayed per step on CUDA. ``prefill``: the prefill's
    attention (``inference.prefill_attention``; ``compiled`` runs it on SDPA uncompiled: the compiled decoder is label
    scoring's; ``ragged`` over one flat sequence, its keys and values laid out in the rows: ``ragged.prefill_rows``;
    ``ragged_compiled`` the same, the decoder compiled for dynamic lengths); the
    cache it fills is the same, and the steps attend as they do after either. A flex prefill runs
    at a static bucket of rows and columns (``packing.static_shape``, as label scoring's), so its statically compiled
    kernel meets a few shapes; the bucket's rows of padding leave the cache after it."""
    n_rows = len(batch)
    with record_function("mecpe.decode.layout"):  # named ranges: bench/profile_gpu.py --torch-profile
        lay = layout(batch, pad, dev, static_shape(n_rows, row_width(batch)) if prefill == "flex" else None)
    row_blocks: list[list[int]] = [[] for _ in range(n_rows)]  # the blocks of each row, in slot order
    for block, (i, _) in enumerate(lay.ends):
        row_blocks[i].append(block)
    n_slots = max(map(len, row_blocks))
    at = sorted(lay.ends)  # one (row, column) per block, distinct
    index = {p: k for k, p in enumerate(at)}
    additive = additive_dtype(model, dev)
    t0 = synced(dev)
    with record_function("mecpe.decode.prefill"):
        if prefill in RAGGED:  # one flat sequence, no mask; its keys and values laid out in the rows (engine.ragged)
            logits, cache = prefill_rows(model, batch, lay, n_slots * max_new_tokens, dev,
                                         compiled=prefill == "ragged_compiled")
        else:
            mask = attention_mask(model, prefill_visible(lay), lay.pos, lay.pos, additive, mask_kind(prefill))
            logits, cache = forward_at(model, lay.ids, mask, lay.pos, room_cache(model, n_slots * max_new_tokens), at)
        if lay.ids.shape[0] > n_rows:  # the flex bucket's padding rows: no block, no decoding
            cache = select_rows(cache, torch.arange(n_rows, device=dev))
            lay = dataclasses.replace(lay, **{f: getattr(lay, f)[:n_rows] for f in ("ids", "pos", "seg", "blk", "alt")})
    stats.forward_passes += 1
    t1 = synced(dev)
    stats.prefill_s += t1 - t0
    # what each slot (rows x slots) feeds next: its segment, its block (FINISHED when empty or done), its position
    slots = [[FINISHED] * n_slots for _ in range(n_rows)]
    slot_segs = [[FINISHED] * n_slots for _ in range(n_rows)]
    slot_pos = [[0] * n_slots for _ in range(n_rows)]
    for i, blocks in enumerate(row_blocks):
        for j, block in enumerate(blocks):
            slots[i][j], slot_segs[i][j], slot_pos[i][j] = block, lay.block_seg[block], lay.next_pos[block]
    slot_block, slot_segment, slot_position = to_device(torch.tensor([slots, slot_segs, slot_pos]), dev).unbind(0)
    col_segment, col_block, col_alt = lay.seg, lay.blk, lay.alt  # the owners of the cached columns
    col_pos = lay.pos  # and their positions (sliding-window layers: ``runtime.layer_masks``)
    states = [decoder.start(b) for b in lay.blocks]
    generated: list[list[int]] = [[] for _ in lay.blocks]
    masks = _MaskTable(logits.shape[-1], dev)
    own = torch.arange(n_slots, device=dev)
    # the live slots as parallel lists: row, slot, block
    live_i = [i for i, blocks in enumerate(row_blocks) for _ in blocks]
    live_j = [j for blocks in row_blocks for j in range(len(blocks))]
    live_b = [block for blocks in row_blocks for block in blocks]
    # next-token logits of each live slot
    last = logits[to_device(torch.tensor([index[lay.ends[b]] for b in live_b]), dev)].float()
    eos_only = (decoder.eos,)
    fixed = None
    if step != "dynamic" and supports_fixed_shapes(model):
        allowed = visible(slot_segment, slot_block, torch.zeros_like(slot_block), lay.seg, lay.blk, lay.alt)
        fixed = FixedStep(model, cache, allowed, slot_position, pad, additive, graph=step == "graph")
    wait_s = host_s = launch_s = 0.0
    for n_step in range(max_new_tokens):
        ta = time.perf_counter()
        rows = [masks.row(decoder.mask_key(states[b])) for b in live_b]
        if any(rows):
            last = last.masked_fill(masks.blocked[to_device(torch.tensor(rows), dev)], float("-inf"))
        with record_function("mecpe.decode.pick"):
            toks = last.argmax(-1).tolist()  # the step's one host sync
        tb = time.perf_counter()
        wait_s += tb - ta
        stats.generated_tokens += len(live_b)
        cont: list[int] = []  # indices into the live lists
        done_flat: list[int] = []  # row * n_slots + slot of the slots that finished
        for k, (block, tok) in enumerate(zip(live_b, toks)):
            gen = generated[block]
            gen.append(tok)
            states[block], fin = decoder.advance(states[block], tok)
            if not fin and len(gen) < max_new_tokens and decoder.mask_key(states[block]) == eos_only:
                gen.append(decoder.eos)  # EOS is the only way on (after "]", a label): no forward needed
                fin = True
            if fin:
                done_flat.append(live_i[k] * n_slots + live_j[k])
            else:
                cont.append(k)
        if not cont or n_step == max_new_tokens - 1:
            host_s += time.perf_counter() - tb
            break
        if fixed is not None:  # rows stay, finished slots feed padding only they see
            live_i, live_j, live_b = [live_i[k] for k in cont], [live_j[k] for k in cont], [live_b[k] for k in cont]
            feed = [[pad] * n_slots for _ in range(n_rows)]
            for i, j, k in zip(live_i, live_j, cont):
                feed[i][j] = toks[k]
            tc = time.perf_counter()
            host_s += tc - tb
            with record_function("mecpe.decode.forward"):
                logits = fixed(feed)
            launch_s += time.perf_counter() - tc
            stats.forward_passes += 1
            stats.decode_steps += 1
            last = logits.reshape(-1, logits.shape[-1])[
                to_device(torch.tensor([i * n_slots + j for i, j in zip(live_i, live_j)]), dev)].float()
            continue
        if done_flat:
            idx = to_device(torch.tensor(done_flat), dev)
            slot_segment.view(-1).index_fill_(0, idx, FINISHED)
            slot_block.view(-1).index_fill_(0, idx, FINISHED)
        live_i, live_j, live_b = [live_i[k] for k in cont], [live_j[k] for k in cont], [live_b[k] for k in cont]
        toks = [toks[k] for k in cont]
        keep_rows = sorted(set(live_i))
        if len(keep_rows) < slot_segment.shape[0]:  # drop rows with nothing left to decode
            sel = to_device(torch.tensor(keep_rows), dev)
            cache = select_rows(cache, sel)
            col_segment, col_block, col_alt, col_pos = (col_segment.index_select(0, sel),
                                                        col_block.index_select(0, sel),
                                                        col_alt.index_select(0, sel), col_pos.index_select(0, sel))
            slot_segment, slot_block, slot_position = (slot_segment.index_select(0, sel),
                                                       slot_block.index_select(0, sel),
                                                       slot_position.index_select(0, sel))
            new_row = {old: new for new, old in enumerate(keep_rows)}
            live_i = [new_row[i] for i in live_i]
        feed = [[pad] * n_slots for _ in range(len(keep_rows))]
        for i, j, tok in zip(live_i, live_j, toks):
            feed[i][j] = tok
        active = slot_segment >= 0
        col_segment = torch.cat([col_segment, torch.where(active, slot_segment, -1)], 1)
        col_block = torch.cat([col_block, torch.where(active, slot_block, -1)], 1)
        col_alt = torch.cat([col_alt, torch.zeros_like(slot_block)], 1)
        col_pos = torch.cat([col_pos, slot_position], 1)
        may_see = visible(slot_segment, slot_block, torch.zeros_like(slot_block), col_segment, col_block, col_alt)
        width = col_segment.shape[1]
        # each slot sees its own new column (a finished slot only that, so its softmax row is never empty)
        may_see[:, own, width - n_slots + own] = True
        mask = attention_mask(model, may_see[:, None], slot_position, col_pos, additive)
        tc = time.perf_counter()
        host_s += tc - tb
        with record_function("mecpe.decode.forward"):
            logits, cache = forward(model, to_device(torch.tensor(feed), dev), mask, slot_position, cache, n_slots)
        launch_s += time.perf_counter() - tc
        stats.forward_passes += 1
        stats.decode_steps += 1
        slot_position = slot_position + 1
        last = logits.reshape(-1, logits.shape[-1])[
            to_device(torch.tensor([i * n_slots + j for i, j in zip(live_i, live_j)]), dev)].float()
    stats.decode_s += synced(dev) - t1
    stats.decode_wait_s, stats.decode_host_s = stats.decode_wait_s + wait_s, stats.decode_host_s + host_s
    stats.decode_launch_s += launch_s
    return {lay.blocks[block].key: toks for block, toks in enumerate(generated)}


def generate(model: Any, tokenizer: Any, items: Sequence[tuple[tuple[int, ...], Block]], *, reuse_prefix: bool,
             max_batch_tokens: int, max_new_tokens: int, decoder: Decoder, stats: StageStats, step: str = "dynamic",
             prefill: str = "sdpa") -> dict[Hashable, list[int]]:
    """The greedy answer tokens of every block by its key (``items``: (prefix ids, block)); adds the work to
    ``stats``. ``step``, ``prefill``: how decoding steps and the prefill run (``_decode_batch``; the values are
    ``inference.decode_step``'s and ``inference.prefill_attention``'s)."""
    pad = pad_id(tokenizer)
    out: dict[Hashable, list[int]] = {}
    with inference(model) as dev:
        for batch in batches(segments(items, reuse_prefix, max_batch_tokens), max_batch_tokens):
            stats.computed_tokens += sum(len(p) + sum(len(b.question) for b in bl) for row in batch for p, bl in row)
            out.update(_decode_batch(model, batch, pad, dev, max_new_tokens, decoder, stats, step, prefill))
    return out
