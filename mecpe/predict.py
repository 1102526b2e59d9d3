"""Batched, exact inference for the two stages on one model (no Ray; ``mecpe.infer`` wraps it in actors).

Everything runs on *packed rows*: a row holds a conversation prefix (``PromptIds.prefix``: chat head +
conversation, identical for all targets of a conversation) once, followed by one block per target utterance, and
usually several conversations (first-fit up to ``ROW_TOKENS``, so there is little padding). A 4D attention mask lets
a block see its own prefix and itself only, and explicit positions put every token where it would be in its own
full prompt, so each prefix is computed and held once, never copied per question. Prompts shortened to fit
``max_prompt_tokens`` have their own prefix and form their own segments (grouping is by prefix token ids).

* **Emotion = scoring the seven answers** (default). A block is ``question + common answer tokens + the seven label
  continuations`` side by side; each continuation sees the block's shared tokens and itself only. One forward
  without KV cache gives every log-probability needed; the label whose whole answer (``utterance_N :: label</s>``,
  EOS included) is most probable wins, so the answer is always a valid label.
* **Decoding** (causes; emotions with ``method="generate"``) is "tree" decoding on the same rows: prefill, then
  each step feeds one token per unfinished block of a row and appends it to the row's cache, whose layers write
  into reserved room instead of concatenating (``DynamicCache`` copies the whole cache every step). Rows whose
  blocks all finished leave the batch; when EOS is the only allowed token it is appended without a forward.
* **Cause = constrained greedy decoding**: the answer's fixed start (``utterance_ids ::`` as far as the tokenizer
  makes it common to all answers) is forced into the prompt, then a state machine over the decoded text admits only
  canonical lists (`` [``, strictly increasing ids in 1..N, commas, ``]``) and EOS only after ``]``.

Memory: a forward holds at most ``max_batch_tokens`` padded columns (rows x (prefill tokens + decoding room)) of
activations / KV cache, plus a rows x columns^2 boolean mask.

Exactness: in fp32 the packed computation equals running every full prompt alone up to float reassociation
(tests: 1e-4). Padding keys are always masked; padding queries attend to themselves only, so no fully-masked
softmax row makes NaNs that could leak. Deterministic: greedy argmax, dropout off (eval mode). Needs
``attn_implementation`` "sdpa" (default) or "eager": flash-attention kernels take no arbitrary masks.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import torch

from mecpe.data import EMOTIONS
from mecpe.prompts import parse_causes, parse_emotion

__all__ = ["EmotionResult", "CauseResult", "StageStats", "STATS", "predict_emotions", "pick_label",
           "predict_causes", "score_emotion_labels", "cause_answer_ids", "prefix_shared_logits"]


# ---------------------------------------------------------------- results and counters

@dataclass
class EmotionResult:
    label: str
    status: str  # "scored" | "ok" | "repaired" | "invalid" (invalid -> label "neutral")
    dropped: int  # utterances dropped from the prompt to fit max_prompt_tokens
    scores: list[float] | None = None  # method "score": each label's answer log-probability (EMOTIONS order)


@dataclass
class CauseResult:
    causes: list[int]
    status: str  # "ok" | "repaired" | "invalid"
    dropped: int


@dataclass
class StageStats:
    """Work counters of one stage. ``prompt_tokens`` is what running every full prompt would cost;
    ``computed_tokens`` the prompt tokens actually run (each distinct prefix once + questions + forced answer
    starts); ``generated_tokens`` the answer tokens run (scored label tokens, or decoding steps)."""

    prompts: int = 0
    prompt_tokens: int = 0
    computed_tokens: int = 0
    generated_tokens: int = 0
    forward_passes: int = 0
    seconds: float = 0.0
    prefill_s: float = 0.0  # device time of the passes over whole prompts (scoring, decoding's first pass)
    decode_s: float = 0.0  # device time of the one-token-per-block decoding passes after it
    decode_steps: int = 0

    def add(self, other: "StageStats") -> "StageStats":
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)
        return self

    def as_dict(self) -> dict[str, float]:
        d = asdict(self)
        d["prompts_per_s"] = self.prompts / self.seconds if self.seconds else 0.0
        return d


# Accumulated over the process (infer's actors report and reset them); each call also accepts ``stats=``.
STATS: dict[str, StageStats] = {"emotion": StageStats(), "cause": StageStats()}


# ---------------------------------------------------------------- KV cache with room for decoding

@functools.lru_cache(maxsize=None)
def _room_layer_class() -> type:
    """A ``DynamicLayer`` with reserved room: ``update`` writes into spare capacity instead of ``torch.cat``, so a
    decoding step costs no copy of the whole cache."""
    from transformers.cache_utils import DynamicLayer

    class RoomLayer(DynamicLayer):
        reserve = 0

        def update(self, key_states, value_states, *args, **kwargs):
            n = key_states.shape[-2]
            used = self.keys.shape[-2] if self.is_initialized and self.keys is not None and self.keys.dim() == 4 else 0
            kb = getattr(self, "_kb", None)
            if kb is None or used + n > kb.shape[-2] or (used and self.keys.data_ptr() != kb.data_ptr()):
                cap = used + n + self.reserve
                kb = key_states.new_empty((*key_states.shape[:2], cap, key_states.shape[-1]))
                vb = value_states.new_empty((*value_states.shape[:2], cap, value_states.shape[-1]))
                if used:
                    kb[:, :, :used] = self.keys
                    vb[:, :, :used] = self.values
                self._kb, self._vb = kb, vb
                self.is_initialized, self.device, self.dtype = True, key_states.device, key_states.dtype
            self._kb[:, :, used:used + n] = key_states
            self._vb[:, :, used:used + n] = value_states
            self.keys, self.values = self._kb[:, :, :used + n], self._vb[:, :, :used + n]
            return self.keys, self.values

        def batch_select_indices(self, indices):
            if getattr(self, "_kb", None) is None or not self.is_initialized:
                return super().batch_select_indices(indices)
            used = self.keys.shape[-2]
            self._kb, self._vb = self._kb.index_select(0, indices), self._vb.index_select(0, indices)
            self.keys, self.values = self._kb[:, :, :used], self._vb[:, :, :used]

    return RoomLayer


def _room_cache(model: Any, reserve: int) -> Any:
    """An empty cache whose layers keep ``reserve`` positions of room after the first (prefill) update."""
    from transformers import DynamicCache

    cls = _room_layer_class()
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = []
    for _ in range(cfg.num_hidden_layers):
        layer = cls()
        layer.reserve = reserve
        layers.append(layer)
    cache = DynamicCache()
    cache.layers = layers
    return cache


def _select_rows(cache: Any, idx: torch.Tensor) -> Any:
    """Keep batch rows ``idx``, layer by layer in place (old rows freed as it goes, so the peak is one layer more,
    not a second cache)."""
    cache.batch_select_indices(idx)
    return cache


# ---------------------------------------------------------------- model plumbing

def _device(model: Any) -> torch.device:
    dev = getattr(model, "device", None)
    return dev if isinstance(dev, torch.device) else next(model.parameters()).device


def _compute_dtype(model: Any) -> torch.dtype:
    """bitsandbytes 4-bit layers carry their compute dtype; otherwise the model's parameter dtype."""
    for mod in model.modules():
        dt = getattr(mod, "compute_dtype", None)
        if isinstance(dt, torch.dtype):
            return dt
    return getattr(model, "dtype", None) or next(model.parameters()).dtype


@contextlib.contextmanager
def _inference(model: Any):
    """inference_mode + eval (LoRA dropout off, restored after) + autocast to the compute dtype on CUDA."""
    was_training = model.training
    model.eval()
    dev, dt = _device(model), _compute_dtype(model)
    amp = (torch.autocast("cuda", dtype=dt) if dev.type == "cuda" and dt in (torch.float16, torch.bfloat16)
           else contextlib.nullcontext())
    try:
        with torch.inference_mode(), amp:
            yield dev
    finally:
        if was_training:
            model.train()


def _attn_impl(model: Any) -> str:
    cfg = model.config
    return getattr(cfg, "_attn_implementation", None) or getattr(cfg, "attn_implementation", None) or "eager"


def _mask4d(model: Any, allowed: torch.Tensor) -> torch.Tensor:
    """A boolean (B, 1, Q, K) 'may attend' mask in the form the attention implementation expects as-is:
    bool for SDPA, additive float for eager. Flash-attention kernels take no arbitrary masks."""
    impl = _attn_impl(model)
    if impl == "sdpa":
        return allowed
    if impl == "eager":
        return torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device).masked_fill_(
            ~allowed, torch.finfo(torch.float32).min)
    raise ValueError(f"packed rows need attn_implementation 'sdpa' or 'eager' (arbitrary 4D masks), not {impl!r}")


@functools.lru_cache(maxsize=None)
def _cache_kw(cls: type) -> str:
    """transformers >= 5.2x calls the KV cache argument ``cache`` (``past_key_values`` deprecated); 5.17 only knows
    ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def _forward(model: Any, ids, mask, pos, cache, keep: int | torch.Tensor, use_cache: bool = True):
    """One forward; ``keep``: logits of the last ``keep`` positions, or of the given positions (1D tensor)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kw = {} if cache is None else {_cache_kw(type(base)): cache}
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=use_cache, logits_to_keep=keep, **kw)
    if not use_cache:
        return out.logits, None
    new = getattr(out, "cache", None)
    return out.logits, new if new is not None else out.past_key_values


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


# ---------------------------------------------------------------- packing

ROW_TOKENS = 2048  # rows are filled with several conversations up to this many tokens (longer ones: own row)


@dataclass
class _Block:
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


_Seg = tuple[tuple[int, ...], list[_Block]]  # a prefix and the blocks that share it


def _stats(segs: Sequence[_Seg]) -> tuple[int, int, int]:
    """(prefill tokens, blocks, largest decoding room) of a row made of ``segs``."""
    return (sum(len(p) + sum(b.width for b in bl) for p, bl in segs), sum(len(bl) for _, bl in segs),
            max((b.room for _, bl in segs for b in bl), default=0))


def _cost(tokens: int, blocks: int, room: int) -> int:
    """Padded columns of a row: prefill tokens + decoding room (every block of the row adds one column a step)."""
    return tokens + blocks * room


def _size(segs: Sequence[_Seg]) -> int:
    return _cost(*_stats(segs))


def _segments(items: Iterable[tuple[tuple[int, ...], _Block]], reuse_prefix: bool, budget: int) -> list[_Seg]:
    """Blocks grouped by identical prefix ids (each block alone without reuse), split so a segment stays within
    ``budget`` (at least one block per segment)."""
    groups: dict[Any, _Seg] = {}
    for prefix, b in items:
        groups.setdefault(prefix if reuse_prefix else b.key, (prefix, []))[1].append(b)
    out: list[_Seg] = []
    for prefix, blocks in groups.values():
        cur: list[_Block] = []
        for b in blocks:
            if cur and _size([(prefix, cur + [b])]) > budget:
                out.append((prefix, cur))
                cur = []
            cur.append(b)
        out.append((prefix, cur))
    return out


def _batches(segs: list[_Seg], budget: int) -> list[list[list[_Seg]]]:
    """Segments packed into rows (first-fit decreasing, up to ``ROW_TOKENS`` or the longest segment: little
    padding), rows sorted by size and cut into batches of at most ``budget`` padded tokens."""
    stats = sorted(((_stats([s]), s) for s in segs), key=lambda x: -_cost(*x[0]))
    cap = max([min(budget, ROW_TOKENS)] + [_cost(*st) for st, _ in stats])
    rows: list[list[_Seg]] = []
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
    rows.sort(key=_size)
    out: list[list[list[_Seg]]] = []
    for row in rows:
        if out and (len(out[-1]) + 1) * _size(row) > budget:
            out.append([])
        if not out:
            out.append([])
        out[-1].append(row)
    return out


@dataclass
class _Layout:
    """Left-padded ids and positions of a batch of packed rows, the owner of every column (segment, block,
    continuation) from which the attention mask follows, each block's (row, last question column), and for
    scoring the (row, predicting column, token, block, label or -1) targets."""

    ids: torch.Tensor
    pos: torch.Tensor
    seg: torch.Tensor  # -1 padding, else segment number (unique in the batch)
    blk: torch.Tensor  # -1 prefix, else block number (unique in the batch)
    alt: torch.Tensor  # 0 shared, j + 1 label continuation j
    blocks: list[_Block]
    ends: list[tuple[int, int]]
    block_seg: list[int]  # segment of each block
    next_pos: list[int]  # position of each block's first answer token
    targets: list[tuple[int, int, int, int, int]]


def _layout(batch: list[list[_Seg]], pad: int, dev) -> _Layout:
    widths = [sum(len(p) + sum(b.width for b in bl) for p, bl in row) for row in batch]
    n, width = len(batch), max(widths)
    ids = torch.full((n, width), pad, dtype=torch.long)
    seg = torch.full((n, width), -1, dtype=torch.long)
    blk = torch.full((n, width), -1, dtype=torch.long)
    alt = torch.zeros((n, width), dtype=torch.long)
    pos = torch.zeros((n, width), dtype=torch.long)
    blocks, ends, block_seg, next_pos, targets = [], [], [], [], []
    nseg = 0
    for i, row in enumerate(batch):
        c = width - widths[i]
        toks: list[int] = []
        for prefix, bl in row:
            plen = len(prefix)
            toks += prefix
            seg[i, c:c + plen] = nseg
            pos[i, c:c + plen] = torch.arange(plen)
            c += plen
            for b in bl:
                g = len(blocks)
                blocks.append(b)
                qlen, shared = len(b.question), len(b.question) + len(b.common)
                toks += b.question + b.common
                seg[i, c:c + shared], blk[i, c:c + shared] = nseg, g
                pos[i, c:c + shared] = torch.arange(shared) + plen
                ends.append((i, c + qlen - 1))
                block_seg.append(nseg)
                next_pos.append(plen + qlen)
                targets += [(i, c + qlen + k - 1, tok, g, -1) for k, tok in enumerate(b.common)]
                d = c + shared
                for j, cont in enumerate(b.conts):
                    toks += cont
                    seg[i, d:d + len(cont)], blk[i, d:d + len(cont)], alt[i, d:d + len(cont)] = nseg, g, j + 1
                    pos[i, d:d + len(cont)] = torch.arange(len(cont)) + plen + shared
                    targets += [(i, (c + shared - 1) if k == 0 else (d + k - 1), tok, g, j)
                                for k, tok in enumerate(cont)]
                    d += len(cont)
                c = d
            nseg += 1
        ids[i, width - widths[i]:] = torch.tensor(toks, dtype=torch.long)
    return _Layout(ids.to(dev), pos.to(dev), seg.to(dev), blk.to(dev), alt.to(dev), blocks, ends, block_seg, next_pos,
                   targets)


def _visible(seg_q, blk_q, alt_q, seg_k, blk_k, alt_k) -> torch.Tensor:
    """(n, Q, K) may-attend: same segment, and the key is prefix or the query's own block (its shared tokens or
    the query's own continuation). Causality comes separately."""
    sk, bk, ak = seg_k[:, None, :], blk_k[:, None, :], alt_k[:, None, :]
    return (sk == seg_q[:, :, None]) & (sk >= 0) & (
        (bk == -1) | ((bk == blk_q[:, :, None]) & ((ak == 0) | (ak == alt_q[:, :, None]))))


def _prefill_mask(model: Any, lay: _Layout) -> torch.Tensor:
    width = lay.ids.shape[1]
    allowed = _visible(lay.seg, lay.blk, lay.alt, lay.seg, lay.blk, lay.alt)
    allowed &= torch.ones((width, width), dtype=torch.bool, device=allowed.device).tril()
    allowed |= torch.eye(width, dtype=torch.bool, device=allowed.device)  # padding queries: themselves only
    return _mask4d(model, allowed[:, None])


# ---------------------------------------------------------------- label scoring

def _lcp(seqs: Sequence[Sequence[int]]) -> list[int]:
    out = []
    for toks in zip(*seqs):
        if any(t != toks[0] for t in toks):
            break
        out.append(toks[0])
    return out


def _score_batch(model: Any, batch: list[list[_Seg]], pad: int, dev) -> dict[tuple[int, int], list[float]]:
    """One forward without cache over packed rows; total answer log-probability of every label of every block
    (shared tokens + the label's continuation, EOS included). Only the needed positions go through lm_head."""
    lay = _layout(batch, pad, dev)
    t = torch.tensor(lay.targets, dtype=torch.long, device=dev)
    cols, where = torch.unique(t[:, 1], return_inverse=True)
    logits, _ = _forward(model, lay.ids, _prefill_mask(model, lay), lay.pos, None, cols, use_cache=False)
    picked = logits[t[:, 0], where].float()
    lp = picked.gather(-1, t[:, 2:3]).squeeze(-1) - picked.logsumexp(-1)
    scores = torch.zeros((len(lay.blocks), len(lay.blocks[0].conts) + 1), dtype=torch.float64, device=dev)
    scores.index_put_((t[:, 3], t[:, 4] + 1), lp.double(), accumulate=True)  # column 0: the shared tokens
    return dict(zip((b.key for b in lay.blocks), (scores[:, 1:] + scores[:, :1]).tolist()))


def score_emotion_labels(model: Any, tokenizer: Any, builder: Any, conversations: Sequence[Any], *,
                         labels: Sequence[str] = EMOTIONS, max_batch_tokens: int = 16384, reuse_prefix: bool = True,
                         stats: StageStats | None = None) -> list[dict[int, tuple[list[float], int]]]:
    """Total log-probability of each label's whole answer (``builder.emotion_answer``, EOS included) for every
    utterance: per conversation ``{utt_id: ([logprob per label], dropped)}``. ``reuse_prefix=False``: every
    utterance's full prompt on its own (for comparison)."""
    stats = stats if stats is not None else StageStats()
    start = time.perf_counter()
    items, dropped = [], {}
    for ci, conv in enumerate(conversations):
        for u in conv.utterances:
            p = builder.emotion_prompt(conv, u.id)
            answers = [list(builder.emotion_answer(u.id, lab)) for lab in labels]
            common = _lcp(answers)
            conts = [a[len(common):] for a in answers]
            if any(not c for c in conts):
                raise ValueError(f"answers of utterance {u.id} are not distinct after their common part")
            items.append((tuple(p.prefix), _Block((ci, u.id), list(p.question), common, conts)))
            dropped[(ci, u.id)] = p.dropped_utterances
            stats.prompts += 1
            stats.prompt_tokens += len(p)
    pad = _pad_id(tokenizer)
    got: dict[tuple[int, int], list[float]] = {}
    with _inference(model) as dev:
        for batch in _batches(_segments(items, reuse_prefix, max_batch_tokens), max_batch_tokens):
            t0 = _synced(dev)
            got.update(_score_batch(model, batch, pad, dev))
            stats.prefill_s += _synced(dev) - t0
            stats.forward_passes += 1
            stats.computed_tokens += sum(len(p) + sum(len(b.question) for b in bl) for row in batch for p, bl in row)
            stats.generated_tokens += sum(b.width - len(b.question) for row in batch for _, bl in row for b in bl)
    stats.seconds += time.perf_counter() - start
    return [{u.id: (got[(ci, u.id)], dropped[(ci, u.id)]) for u in conv.utterances}
            for ci, conv in enumerate(conversations)]


# ---------------------------------------------------------------- greedy decoding

class _Decoder:
    """Greedy decoding policy: ``allowed(state)`` -> token ids or None (all), ``advance`` -> (state, done)."""

    def __init__(self, eos: int, stop: frozenset[int] = frozenset()):
        self.eos, self.stop = eos, stop

    def start(self, row: _Block) -> Any:
        return None

    def allowed(self, state: Any) -> Sequence[int] | None:
        return None

    def advance(self, state: Any, tok: int) -> tuple[Any, bool]:
        return state, tok == self.eos or tok in self.stop


class _TrieDecoder(_Decoder):
    """Greedy decoding restricted to a row's candidate answers (``row.data``: token lists ending with EOS)."""

    def start(self, row: _Block) -> Any:
        return (row.data, ())

    def allowed(self, state: Any) -> Sequence[int]:
        answers, gen = state
        n = len(gen)
        return sorted({a[n] for a in answers if len(a) > n and tuple(a[:n]) == gen})

    def advance(self, state: Any, tok: int) -> tuple[Any, bool]:
        answers, gen = state
        return (answers, gen + (tok,)), tok == self.eos


class _ListDecoder(_Decoder):
    """Greedy decoding restricted to canonical cause answers, the exact language of the training targets
    (``cause_target``): after the forced start, the rest of the literal (e.g. `` [``), then strictly increasing
    ids in 1..N (no leading zeros) separated by commas, ``]``, EOS. Lookahead keeps every prefix completable: a digit
    only if some id > the last one and <= N starts that way, a comma only if a larger id exists; EOS only after
    ``]``. State: (literal chars consumed, partial number, last id, N), or ``CLOSED``."""

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

    def start(self, row: _Block) -> Any:
        return (0, "", 0, int(row.data))

    def allowed(self, state: Any) -> Sequence[int]:
        return list(self._next(state))

    def advance(self, state: Any, tok: int) -> tuple[Any, bool]:
        return self._next(state).get(tok, self.CLOSED), tok == self.eos


def _cause_literal(tokenizer: Any, builder: Any, forced: list[int]) -> str:
    """Text every cause answer has between the forced tokens and the list, ``[`` included (`` [`` for Llama)."""
    full = tokenizer.decode(list(builder.cause_answer([1]))[:-1], skip_special_tokens=True)
    done = tokenizer.decode(forced, skip_special_tokens=True)
    rest = full[len(done):] if full.startswith(done) else full.partition("::")[2]
    return rest[:rest.index("[") + 1] if "[" in rest else ""


def _decode_batch(model: Any, batch: list[list[_Seg]], pad: int, dev, max_new_tokens: int, decoder: _Decoder,
                  stats: StageStats) -> dict[tuple[int, int], list[int]]:
    """Greedy decoding of every block of packed rows at once ("tree" decoding): after the prefill, each step
    feeds one token per block of a row (slot j of row i = its j-th block) and appends their keys/values to the
    row's cache; a new token sees its segment's prefix, its own question and its own earlier answer tokens only,
    at the positions of its own full prompt. The prefix is therefore computed and stored once per row, not copied
    per question. Finished blocks feed padding (invisible); rows whose blocks all finished leave the batch."""
    lay = _layout(batch, pad, dev)
    n = len(batch)
    slots: list[list[int]] = [[] for _ in range(n)]
    for g, (i, _) in enumerate(lay.ends):
        slots[i].append(g)
    m = max(map(len, slots))
    cols = torch.tensor(sorted({c for _, c in lay.ends}), device=dev)
    cache = _room_cache(model, m * max_new_tokens)
    t0 = _synced(dev)
    logits, cache = _forward(model, lay.ids, _prefill_mask(model, lay), lay.pos, cache, cols)
    stats.forward_passes += 1
    t1 = _synced(dev)
    stats.prefill_s += t1 - t0
    colidx = {c: k for k, c in enumerate(cols.tolist())}
    first = {g: logits[i, colidx[c]] for g, (i, c) in enumerate(lay.ends)}
    # per-slot bookkeeping (rows x slots); -3 marks a slot that is empty or finished
    sseg = torch.full((n, m), -3, dtype=torch.long)
    sblk = torch.full((n, m), -3, dtype=torch.long)
    spos = torch.zeros((n, m), dtype=torch.long)
    for i, gs in enumerate(slots):
        for j, g in enumerate(gs):
            sseg[i, j] = lay.block_seg[g]
            sblk[i, j] = g
            spos[i, j] = lay.next_pos[g]
    sseg, sblk, spos = sseg.to(dev), sblk.to(dev), spos.to(dev)
    kseg, kblk, kalt = lay.seg, lay.blk, lay.alt  # owners of the cached columns
    states = {g: decoder.start(b) for g, b in enumerate(lay.blocks)}
    gen: dict[int, list[int]] = {g: [] for g in range(len(lay.blocks))}
    vocab = logits.shape[-1]
    masks: dict[tuple[int, ...] | None, torch.Tensor] = {}  # allowed-token rows, built once per distinct set

    def row_mask(a: Sequence[int] | None) -> torch.Tensor:
        key = None if a is None else tuple(a)
        if key not in masks:
            mk = torch.zeros(vocab, dtype=torch.bool) if key is not None else torch.ones(vocab, dtype=torch.bool)
            if key is not None:
                mk[list(key)] = True
            masks[key] = mk.to(dev)
        return masks[key]

    live = [(i, j, g) for i, gs in enumerate(slots) for j, g in enumerate(gs)]  # (batch row, slot, block)
    last = torch.stack([first[g] for _, _, g in live]).float()
    for step in range(max_new_tokens):
        allowed = [decoder.allowed(states[g]) for _, _, g in live]
        if any(a is not None for a in allowed):
            last = last.masked_fill(~torch.stack([row_mask(a) for a in allowed]), float("-inf"))
        toks = last.argmax(-1).tolist()
        stats.generated_tokens += len(live)
        nxt, done = [], []
        for (i, j, g), tok in zip(live, toks):
            gen[g].append(tok)
            states[g], fin = decoder.advance(states[g], tok)
            if not fin and len(gen[g]) < max_new_tokens and list(decoder.allowed(states[g]) or ()) == [decoder.eos]:
                gen[g].append(decoder.eos)  # EOS is the only way on (after "]", after a label): no forward needed
                fin = True
            (done if fin else nxt).append((i, j, g, tok))
        if not nxt or step == max_new_tokens - 1:
            break
        for i, j, _, _ in done:
            sseg[i, j] = sblk[i, j] = -3
        keep_rows = sorted({i for i, _, _, _ in nxt})
        if len(keep_rows) < sseg.shape[0]:  # drop rows with nothing left to decode
            sel = torch.tensor(keep_rows, device=dev)
            cache = _select_rows(cache, sel)
            kseg, kblk, kalt = kseg.index_select(0, sel), kblk.index_select(0, sel), kalt.index_select(0, sel)
            sseg, sblk, spos = sseg.index_select(0, sel), sblk.index_select(0, sel), spos.index_select(0, sel)
            remap = {old: new for new, old in enumerate(keep_rows)}
            nxt = [(remap[i], j, g, tok) for i, j, g, tok in nxt]
        inp = torch.full(sseg.shape, pad, dtype=torch.long)
        for i, j, _, tok in nxt:
            inp[i, j] = tok
        active = sseg >= 0
        new_seg = torch.where(active, sseg, torch.full_like(sseg, -1))
        kseg = torch.cat([kseg, new_seg], 1)
        kblk = torch.cat([kblk, torch.where(active, sblk, torch.full_like(sblk, -1))], 1)
        kalt = torch.cat([kalt, torch.zeros_like(sblk)], 1)
        allowed = _visible(sseg, sblk, torch.zeros_like(sblk), kseg, kblk, kalt)
        width = kseg.shape[1]
        allowed[:, torch.arange(m), width - m + torch.arange(m)] = True  # itself (finished slots: only itself)
        logits, cache = _forward(model, inp.to(dev), _mask4d(model, allowed[:, None]), spos, cache, m)
        stats.forward_passes += 1
        stats.decode_steps += 1
        spos = spos + 1
        live = [(i, j, g) for i, j, g, _ in nxt]
        last = logits[[i for i, _, _ in live], [j for _, j, _ in live]].float()
    stats.decode_s += _synced(dev) - t1
    return {lay.blocks[g].key: toks for g, toks in gen.items()}


def _synced(dev) -> float:
    """A wall-clock mark after the device's queued work (a sync on CUDA; one per phase, not per step)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter()


def _generate(model: Any, tokenizer: Any, items: list[tuple[tuple[int, ...], _Block]], reuse_prefix: bool,
              max_batch_tokens: int, max_new_tokens: int, decoder: _Decoder, stats: StageStats
              ) -> dict[tuple[int, int], list[int]]:
    pad = _pad_id(tokenizer)
    out: dict[tuple[int, int], list[int]] = {}
    with _inference(model) as dev:
        for batch in _batches(_segments(items, reuse_prefix, max_batch_tokens), max_batch_tokens):
            stats.computed_tokens += sum(len(p) + sum(len(b.question) for b in bl) for row in batch for p, bl in row)
            out.update(_decode_batch(model, batch, pad, dev, max_new_tokens, decoder, stats))
    return out


_PIECES: dict[int, tuple[Any, list[str]]] = {}


def _pieces(tokenizer: Any) -> list[str]:
    """Decoded text of every token id in context (after an anchor token, so leading spaces survive SentencePiece
    and byte-level decoders alike); memoized per tokenizer object."""
    hit = _PIECES.get(id(tokenizer))
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    anchor = tokenizer("a", add_special_tokens=False)["input_ids"][-1]
    base = tokenizer.decode([anchor])
    texts = tokenizer.batch_decode([[anchor, t] for t in range(len(tokenizer))], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    pieces = [s[len(base):] if s.startswith(base) else s for s in texts]
    _PIECES[id(tokenizer)] = (tokenizer, pieces)
    return pieces


def _newline_ids(tokenizer: Any) -> frozenset[int]:
    return frozenset(i for i, p in enumerate(_pieces(tokenizer)) if "\n" in p)


def _text(tokenizer: Any, ids: Sequence[int]) -> str:
    ids = [t for t in ids if t != tokenizer.eos_token_id]
    return tokenizer.decode(ids, skip_special_tokens=True)


# ---------------------------------------------------------------- the two stages

def pick_label(scores: Sequence[float], bias: Sequence[float] | None = None) -> str:
    """The label whose answer log-probability plus its bias (``inference.emotion_bias``; none: 0) is highest; ties go to
    the first in ``EMOTIONS`` order."""
    total = [s + (bias[k] if bias is not None else 0.0) for k, s in enumerate(scores)]
    return EMOTIONS[max(range(len(total)), key=total.__getitem__)]


def predict_emotions(model: Any, tokenizer: Any, builder: Any, conversations: Sequence[Any], *,
                     method: str = "score", max_new_tokens: int = 8, max_batch_tokens: int = 16384,
                     reuse_prefix: bool = True, bias: Sequence[float] | None = None,
                     stats: StageStats | None = None) -> list[dict[int, EmotionResult]]:
    """Emotion of every utterance, per conversation ``{utt_id: EmotionResult}``.

    ``score`` (default): best total answer log-probability over the seven labels, each plus its ``bias`` (EMOTIONS
    order; a calibration fitted on validation data, ``mecpe.calibrate``), status "scored", the raw scores kept.
    ``generate``: greedy decoding until EOS/newline, parsed by ``parse_emotion`` (unparseable -> "neutral",
    "invalid"). ``constrained_generate``: greedy decoding restricted to the seven answers (a trie), status "ok"."""
    st = StageStats()
    try:
        if method == "score":
            scores = score_emotion_labels(model, tokenizer, builder, conversations, max_batch_tokens=max_batch_tokens,
                                          reuse_prefix=reuse_prefix, stats=st)
            return [{u: EmotionResult(pick_label(s, bias), "scored", d, list(s)) for u, (s, d) in conv.items()}
                    for conv in scores]
        if method not in ("generate", "constrained_generate"):
            raise ValueError(f"unknown emotion method {method!r}")
        if bias is not None:
            raise ValueError(f"an emotion bias needs label scores (method 'score'), not method {method!r}")
        t0 = time.perf_counter()
        prompts = [((ci, u.id), builder.emotion_prompt(conv, u.id))
                   for ci, conv in enumerate(conversations) for u in conv.utterances]
        eos = tokenizer.eos_token_id
        if method == "generate":
            decoder, data, steps = _Decoder(eos, _newline_ids(tokenizer)), (lambda k: None), max_new_tokens
        else:
            decoder = _TrieDecoder(eos)
            answers = {k: [list(builder.emotion_answer(k[1], lab)) for lab in EMOTIONS] for k, _ in prompts}
            data, steps = answers.__getitem__, max(len(a) for v in answers.values() for a in v)
        items = [(tuple(p.prefix), _Block(k, list(p.question), room=steps, data=data(k))) for k, p in prompts]
        gen = _generate(model, tokenizer, items, reuse_prefix, max_batch_tokens, steps, decoder, st)
        out: list[dict[int, EmotionResult]] = [{} for _ in conversations]
        for (ci, uid), p in prompts:
            g = gen[(ci, uid)]
            if method == "constrained_generate":
                label = EMOTIONS[data((ci, uid)).index(g)]
                out[ci][uid] = EmotionResult(label, "ok", p.dropped_utterances)
                continue
            label, status = parse_emotion(_text(tokenizer, g), uid)
            out[ci][uid] = EmotionResult(label or "neutral", status if label else "invalid", p.dropped_utterances)
        st.prompts += len(prompts)
        st.prompt_tokens += sum(len(p) for _, p in prompts)
        st.seconds += time.perf_counter() - t0
        return out
    finally:
        STATS["emotion"].add(st)
        if stats is not None:
            stats.add(st)


def _forced_cause_start(builder: Any) -> list[int]:
    """Tokens every cause answer starts with (``utterance_ids :: [`` or as far as the tokenizer shares it)."""
    return _lcp([list(builder.cause_answer(ids)) for ids in ([], [1], [1, 2], [2, 10], [12])])


def cause_answer_ids(model: Any, tokenizer: Any, builder: Any, conversations: Sequence[Any],
                     emotions: Sequence[dict[int, str]], *, max_new_tokens: int = 24, max_batch_tokens: int = 16384,
                     reuse_prefix: bool = True, constrained: bool = True, stats: StageStats | None = None
                     ) -> list[dict[int, tuple[list[int], int]]]:
    """Raw cause answers: per conversation ``{utt_id: (answer token ids, dropped)}`` for the non-neutral
    utterances; the ids are the forced start + the generated tokens (EOS last when the answer finished)."""
    st = stats if stats is not None else StageStats()
    t0 = time.perf_counter()
    prompts = [((ci, u.id), builder.cause_prompt(conv, u.id, emotions[ci]))
               for ci, conv in enumerate(conversations) for u in conv.utterances
               if emotions[ci].get(u.id, "neutral") != "neutral"]
    eos = tokenizer.eos_token_id
    if constrained:
        forced = _forced_cause_start(builder)
        decoder: _Decoder = _ListDecoder(eos, _pieces(tokenizer), _cause_literal(tokenizer, builder, forced),
                                         set(tokenizer.all_special_ids))
    else:
        forced, decoder = [], _Decoder(eos, _newline_ids(tokenizer))
    items = [(tuple(p.prefix), _Block(k, list(p.question) + forced, room=max_new_tokens,
                                      data=len(conversations[k[0]].utterances))) for k, p in prompts]
    gen = _generate(model, tokenizer, items, reuse_prefix, max_batch_tokens, max_new_tokens, decoder, st)
    out: list[dict[int, tuple[list[int], int]]] = [{} for _ in conversations]
    for (ci, uid), p in prompts:
        out[ci][uid] = (list(forced) + gen[(ci, uid)], p.dropped_utterances)
    st.prompts += len(prompts)
    st.prompt_tokens += sum(len(p) for _, p in prompts)
    st.seconds += time.perf_counter() - t0
    return out


def predict_causes(model: Any, tokenizer: Any, builder: Any, conversations: Sequence[Any],
                   emotions: Sequence[dict[int, str]], *, max_new_tokens: int = 24, max_batch_tokens: int = 16384,
                   reuse_prefix: bool = True, constrained: bool = True, stats: StageStats | None = None
                   ) -> list[dict[int, CauseResult]]:
    """Cause utterance ids of every non-neutral utterance (given ``emotions``, e.g. stage 1's predictions), per
    conversation ``{utt_id: CauseResult}``; neutral utterances get no entry. Parsed by ``parse_causes``."""
    st = StageStats()
    try:
        answers = cause_answer_ids(model, tokenizer, builder, conversations, emotions, max_new_tokens=max_new_tokens,
                                   max_batch_tokens=max_batch_tokens, reuse_prefix=reuse_prefix,
                                   constrained=constrained, stats=st)
        out = []
        for conv, got in zip(conversations, answers):
            res = {}
            for uid, (ids, dropped) in got.items():
                causes, status = parse_causes(_text(tokenizer, ids), len(conv.utterances))
                res[uid] = CauseResult(causes, status, dropped)
            out.append(res)
        return out
    finally:
        STATS["cause"].add(st)
        if stats is not None:
            stats.add(st)


# ---------------------------------------------------------------- checking tool

def prefix_shared_logits(model: Any, tokenizer: Any, prompts: Sequence[Any], *, reuse_prefix: bool = True,
                         max_batch_tokens: int = 16384) -> list[torch.Tensor]:
    """Next-token logits (fp32, vocab) after each full prompt (``PromptIds``), computed by the packed prefill that
    decoding uses (prompts with equal prefixes share one copy of it): for exactness tests and diagnostics."""
    items = [(tuple(p.prefix), _Block((i, 0), list(p.question))) for i, p in enumerate(prompts)]
    pad, out = _pad_id(tokenizer), {}
    with _inference(model) as dev:
        for batch in _batches(_segments(items, reuse_prefix, max_batch_tokens), max_batch_tokens):
            lay = _layout(batch, pad, dev)
            cols = torch.tensor(sorted({c for _, c in lay.ends}), device=dev)
            logits, _ = _forward(model, lay.ids, _prefill_mask(model, lay), lay.pos, None, cols, use_cache=False)
            colidx = {c: k for k, c in enumerate(cols.tolist())}
            for b, (i, c) in zip(lay.blocks, lay.ends):
                out[b.key[0]] = logits[i, colidx[c]].float().cpu()
    return [out[i] for i in range(len(prompts))]
