"""The two stages on one model, no Ray (``mecpe.infer`` wraps them in actors): emotions by label scoring (or
decoding), causes by constrained decoding. This module turns conversations into prompt blocks and answers back
into results; ``mecpe.engine`` runs the blocks. Every call returns its results with its own ``StageStats``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Mapping, Protocol, Sequence, TypeVar

from mecpe.data import Conversation
from mecpe.engine import decoding, scoring
from mecpe.engine.packing import Block, common_prefix
from mecpe.engine.stats import StageStats
from mecpe.labels import EMOTIONS
from mecpe.prompts import PromptIds, parse_causes, parse_emotion

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ("EmotionResult", "CauseResult", "StageOutput", "StageStats", "PromptSource", "predict_emotions",
           "pick_label", "average_emotions", "predict_causes", "score_emotion_labels", "cause_answer_ids",
           "prefix_shared_logits")

T = TypeVar("T")


class PromptSource(Protocol):
    """What the stages need of a prompt builder (``mecpe.prompts.PromptBuilder``)."""

    def emotion_prompt(self, conv: Conversation, utt_id: int) -> PromptIds: ...

    def emotion_answer(self, utt_id: int, label: str) -> list[int]: ...

    def cause_prompt(self, conv: Conversation, utt_id: int, emotions: Mapping[int, str]) -> PromptIds: ...

    def cause_answer(self, cause_ids: Sequence[int]) -> list[int]: ...


@dataclass(frozen=True)
class EmotionResult:
    label: str
    status: str  # "scored" | "ok" | "repaired" | "invalid" (invalid -> label "neutral")
    dropped: int  # utterances dropped from the prompt to fit max_prompt_tokens
    scores: list[float] | None = None  # method "score": each label's answer log-probability (EMOTIONS order)


@dataclass(frozen=True)
class CauseResult:
    causes: list[int]
    status: str  # "ok" | "repaired" | "invalid"
    dropped: int


@dataclass(frozen=True)
class StageOutput(Generic[T]):
    """One call's results, per conversation ``{utt_id: result}``, and the work it took."""

    results: list[dict[int, T]]
    stats: StageStats


Key = tuple[int, int]  # (conversation index in the call, utterance id)


class _PrefixKeys:
    """``tuple(prefix)`` (the engine groups blocks by it) once per distinct prefix list of one call: the builder hands
    all targets of a conversation the same list, so a conversation costs one tuple, not one per utterance."""

    def __init__(self):
        self._seen: dict[int, tuple[list[int], tuple[int, ...]]] = {}

    def __call__(self, prefix: list[int]) -> tuple[int, ...]:
        hit = self._seen.get(id(prefix))
        if hit is None or hit[0] is not prefix:
            hit = self._seen[id(prefix)] = (prefix, tuple(prefix))  # holding the list keeps its id unique
        return hit[1]


def pick_label(scores: Sequence[float], bias: Sequence[float] | None = None) -> str:
    """The label whose answer log-probability plus its bias (``inference.emotion_bias``; none: 0) is highest; ties go to
    the first in ``EMOTIONS`` order."""
    total = [s + (bias[k] if bias is not None else 0.0) for k, s in enumerate(scores)]
    return EMOTIONS[max(range(len(total)), key=total.__getitem__)]


def _log_mean_exp(logs: Sequence[float]) -> float:
    """log(mean(exp(x))) without overflow: the log of the members' mean probability."""
    top = max(logs)
    return top + math.log(sum(math.exp(x - top) for x in logs) / len(logs))


def average_emotions(outputs: Sequence[StageOutput[EmotionResult]], bias: Sequence[float] | None = None
                     ) -> StageOutput[EmotionResult]:
    """An ensemble's emotions: per utterance, each label's probability averaged over the members' scored results
    (kept as a log-probability, the scale ``emotion_bias`` is fitted on), then ``pick_label`` with ``bias``. The
    members scored the same conversations, so their results line up; the work is the sum of theirs."""
    if not outputs:
        raise ValueError("an ensemble needs at least one member's results")
    stats = StageStats()
    for out in outputs:
        stats.add(out.stats)
    results = []
    for convs in zip(*(out.results for out in outputs)):
        merged = {}
        for uid, first in convs[0].items():
            members = [conv[uid].scores for conv in convs]
            if any(s is None for s in members):
                raise ValueError(f"utterance {uid}: an ensemble averages label scores, and a member has none")
            mean = [_log_mean_exp([s[k] for s in members]) for k in range(len(first.scores))]
            merged[uid] = EmotionResult(pick_label(mean, bias), "scored", first.dropped, mean)
        results.append(merged)
    return StageOutput(results, stats)


def label_blocks(builder: PromptSource, conversations: Sequence[Conversation], labels: Sequence[str] = EMOTIONS
                 ) -> tuple[list[tuple[tuple[int, ...], Block]], dict[Key, int], int]:
    """Label scoring's work for the engine: per utterance (prefix ids, ``Block`` keyed (conversation index, utterance
    id) with its question, the labels' common answer start and one continuation per label); the utterances each
    prompt dropped, by key; and the prompt tokens an unshared run would feed."""
    items, dropped, prompt_tokens = [], {}, 0
    prefix_key = _PrefixKeys()
    parts: dict[int, tuple[list[int], list[list[int]]]] = {}  # utterance id -> (common answer start, continuations)
    for ci, conv in enumerate(conversations):
        for u in conv.utterances:
            p = builder.emotion_prompt(conv, u.id)
            if u.id not in parts:  # the answers depend on the utterance id only (``utterance_N :: label``)
                answers = [list(builder.emotion_answer(u.id, lab)) for lab in labels]
                common = common_prefix(answers)
                conts = [a[len(common):] for a in answers]
                if any(not c for c in conts):
                    raise ValueError(f"answers of utterance {u.id} are not distinct after their common part")
                parts[u.id] = (common, conts)
            common, conts = parts[u.id]
            items.append((prefix_key(p.prefix), Block((ci, u.id), list(p.question), common, conts)))
            dropped[(ci, u.id)] = p.dropped_utterances
            prompt_tokens += len(p)
    return items, dropped, prompt_tokens


def score_emotion_labels(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, builder: PromptSource,
                         conversations: Sequence[Conversation], *, labels: Sequence[str] = EMOTIONS,
                         max_batch_tokens: int = 16384, reuse_prefix: bool = True, prefill_attention: str = "sdpa"
                         ) -> StageOutput[tuple[list[float], int]]:
    """Total log-probability of each label's whole answer (``builder.emotion_answer``, EOS included) for every
    utterance: per conversation ``{utt_id: ([logprob per label], dropped)}``. ``reuse_prefix=False``: every
    utterance's full prompt on its own (for comparison). ``prefill_attention``: how the prefills attend
    (``inference.prefill_attention``'s values)."""
    stats = StageStats()
    start = time.perf_counter()
    items, dropped, prompt_tokens = label_blocks(builder, conversations, labels)
    stats.prompts += len(items)
    stats.prompt_tokens += prompt_tokens
    got = scoring.score_blocks(model, tokenizer, items, reuse_prefix=reuse_prefix, max_batch_tokens=max_batch_tokens,
                               stats=stats, prefill=prefill_attention)
    stats.seconds += time.perf_counter() - start
    return StageOutput([{u.id: (got[(ci, u.id)], dropped[(ci, u.id)]) for u in conv.utterances}
                        for ci, conv in enumerate(conversations)], stats)


def predict_emotions(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, builder: PromptSource,
                     conversations: Sequence[Conversation], *, method: str = "score", max_new_tokens: int = 8,
                     max_batch_tokens: int = 16384, reuse_prefix: bool = True, bias: Sequence[float] | None = None,
                     prefill_attention: str = "sdpa") -> StageOutput[EmotionResult]:
    """Emotion of every utterance, per conversation ``{utt_id: EmotionResult}``.

    ``score`` (default): best total answer log-probability over the seven labels, each plus its ``bias`` (EMOTIONS
    order; a calibration fitted on validation data, ``mecpe.calibrate``), status "scored", the raw scores kept.
    ``generate``: greedy decoding until EOS/newline, parsed by ``parse_emotion`` (unparseable -> "neutral",
    "invalid"). ``constrained_generate``: greedy decoding restricted to the seven answers (a trie), status "ok".
    ``prefill_attention``: how the prefills attend (``inference.prefill_attention``'s values)."""
    if method == "score":
        scored = score_emotion_labels(model, tokenizer, builder, conversations, max_batch_tokens=max_batch_tokens,
                                      reuse_prefix=reuse_prefix, prefill_attention=prefill_attention)
        return StageOutput([{u: EmotionResult(pick_label(s, bias), "scored", d, list(s)) for u, (s, d) in conv.items()}
                            for conv in scored.results], scored.stats)
    if method not in ("generate", "constrained_generate"):
        raise ValueError(f"unknown emotion method {method!r}")
    if bias is not None:
        raise ValueError(f"an emotion bias needs label scores (method 'score'), not method {method!r}")
    stats = StageStats()
    t0 = time.perf_counter()
    prompts = [((ci, u.id), builder.emotion_prompt(conv, u.id))
               for ci, conv in enumerate(conversations) for u in conv.utterances]
    eos = tokenizer.eos_token_id
    answers: dict[Key, list[list[int]]] = {}
    if method == "generate":
        decoder, steps = decoding.Decoder(eos, decoding.newline_ids(tokenizer)), max_new_tokens
    else:
        decoder = decoding.TrieDecoder(eos)
        answers = {k: [list(builder.emotion_answer(k[1], lab)) for lab in EMOTIONS] for k, _ in prompts}
        steps = max(len(a) for v in answers.values() for a in v)
    prefix_key = _PrefixKeys()
    items = [(prefix_key(p.prefix), Block(k, list(p.question), room=steps, data=answers.get(k))) for k, p in prompts]
    gen = decoding.generate(model, tokenizer, items, reuse_prefix=reuse_prefix, max_batch_tokens=max_batch_tokens,
                            max_new_tokens=steps, decoder=decoder, stats=stats, prefill=prefill_attention)
    out: list[dict[int, EmotionResult]] = [{} for _ in conversations]
    for (ci, uid), p in prompts:
        g = gen[(ci, uid)]
        if method == "constrained_generate":
            out[ci][uid] = EmotionResult(EMOTIONS[answers[(ci, uid)].index(g)], "ok", p.dropped_utterances)
            continue
        label, status = parse_emotion(decoding.answer_text(tokenizer, g), uid)
        out[ci][uid] = EmotionResult(label or "neutral", status if label else "invalid", p.dropped_utterances)
    stats.prompts += len(prompts)
    stats.prompt_tokens += sum(len(p) for _, p in prompts)
    stats.seconds += time.perf_counter() - t0
    return StageOutput(out, stats)


def forced_cause_start(builder: PromptSource) -> list[int]:
    """Tokens every cause answer starts with (``utterance_ids :: [`` or as far as the tokenizer shares it)."""
    return common_prefix([list(builder.cause_answer(ids)) for ids in ([], [1], [1, 2], [2, 10], [12])])


def cause_literal(tokenizer: PreTrainedTokenizerBase, builder: PromptSource, forced: list[int]) -> str:
    """Text every cause answer has between the forced tokens and the list, ``[`` included (`` [`` for Llama)."""
    full = tokenizer.decode(list(builder.cause_answer([1]))[:-1], skip_special_tokens=True)
    done = tokenizer.decode(forced, skip_special_tokens=True)
    rest = full[len(done):] if full.startswith(done) else full.partition("::")[2]
    return rest[:rest.index("[") + 1] if "[" in rest else ""


def cause_answer_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, builder: PromptSource,
                     conversations: Sequence[Conversation], emotions: Sequence[Mapping[int, str]], *,
                     max_new_tokens: int = 24, max_batch_tokens: int = 16384, reuse_prefix: bool = True,
                     constrained: bool = True, decode_step: str = "dynamic", prefill_attention: str = "sdpa"
                     ) -> StageOutput[tuple[list[int], int]]:
    """Raw cause answers: per conversation ``{utt_id: (answer token ids, dropped)}`` for the non-neutral
    utterances; the ids are the forced start + the generated tokens (EOS last when the answer finished).
    ``decode_step``: how the decoding steps run (``mecpe.engine.steps``); ``prefill_attention``: sdpa or flex
    (``inference.prefill_attention``)."""
    stats = StageStats()
    t0 = time.perf_counter()
    prompts = [((ci, u.id), builder.cause_prompt(conv, u.id, emotions[ci]))
               for ci, conv in enumerate(conversations) for u in conv.utterances
               if emotions[ci].get(u.id, "neutral") != "neutral"]
    eos = tokenizer.eos_token_id
    if constrained:
        forced = forced_cause_start(builder)
        decoder: decoding.Decoder = decoding.list_decoder(tokenizer, cause_literal(tokenizer, builder, forced))
    else:
        forced, decoder = [], decoding.Decoder(eos, decoding.newline_ids(tokenizer))
    prefix_key = _PrefixKeys()
    items = [(prefix_key(p.prefix), Block(k, list(p.question) + forced, room=max_new_tokens,
                                     data=len(conversations[k[0]].utterances))) for k, p in prompts]
    gen = decoding.generate(model, tokenizer, items, reuse_prefix=reuse_prefix, max_batch_tokens=max_batch_tokens,
                            max_new_tokens=max_new_tokens, decoder=decoder, stats=stats, step=decode_step,
                            prefill=prefill_attention)
    out: list[dict[int, tuple[list[int], int]]] = [{} for _ in conversations]
    for (ci, uid), p in prompts:
        out[ci][uid] = (list(forced) + gen[(ci, uid)], p.dropped_utterances)
    stats.prompts += len(prompts)
    stats.prompt_tokens += sum(len(p) for _, p in prompts)
    stats.seconds += time.perf_counter() - t0
    return StageOutput(out, stats)


def predict_causes(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, builder: PromptSource,
                   conversations: Sequence[Conversation], emotions: Sequence[Mapping[int, str]], *,
                   max_new_tokens: int = 24, max_batch_tokens: int = 16384, reuse_prefix: bool = True,
                   constrained: bool = True, decode_step: str = "dynamic", prefill_attention: str = "sdpa"
                   ) -> StageOutput[CauseResult]:
    """Cause utterance ids of every non-neutral utterance (given ``emotions``, e.g. stage 1's predictions), per
    conversation ``{utt_id: CauseResult}``; neutral utterances get no entry. Parsed by ``parse_causes``."""
    answers = cause_answer_ids(model, tokenizer, builder, conversations, emotions, max_new_tokens=max_new_tokens,
                               max_batch_tokens=max_batch_tokens, reuse_prefix=reuse_prefix, constrained=constrained,
                               decode_step=decode_step, prefill_attention=prefill_attention)
    out = []
    for conv, got in zip(conversations, answers.results):
        res = {}
        for uid, (ids, dropped) in got.items():
            causes, status = parse_causes(decoding.answer_text(tokenizer, ids), len(conv.utterances))
            res[uid] = CauseResult(causes, status, dropped)
        out.append(res)
    return StageOutput(out, answers.stats)


def prefix_shared_logits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[PromptIds], *,
                         reuse_prefix: bool = True, max_batch_tokens: int = 16384) -> list[torch.Tensor]:
    """Next-token logits (fp32, vocab) after each full prompt (``PromptIds``), computed by the packed prefill that
    decoding uses (prompts with equal prefixes share one copy of it): for exactness tests and diagnostics."""
    items = [(tuple(p.prefix), Block((i, 0), list(p.question))) for i, p in enumerate(prompts)]
    out: dict[Any, torch.Tensor] = scoring.prefix_shared_logits(model, tokenizer, items, reuse_prefix=reuse_prefix,
                                                                max_batch_tokens=max_batch_tokens)
    return [out[(i, 0)] for i in range(len(prompts))]
