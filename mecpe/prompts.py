"""Prompt token ids for the emotion and cause models, and parsers for their answers. Pure: a tokenizer in, ids out.

Structure (after the reference system, our own wording):

* emotion prompt: the whole conversation, one block per utterance (``utterance_3 (Ross): "text"``), then a
  question asking the emotion of utterance N; target ``utterance_N :: <label>``.
* cause prompt: the same with each utterance's emotion in its block (``utterance_3 (Ross) [joy]: "text"``), then a
  question asking which utterances cause utterance N's emotion; target ``utterance_ids :: [i,j]``.

Where the instruction goes is ``prompt.layout``: ``question`` (the reference's) repeats it in every utterance's
question; ``prefix`` states it once, after the intro, in the prefix that a conversation's questions share, and asks
each utterance in a few tokens (``utterance_3?``). The engine computes the prefix once per conversation and each
question once per utterance, so ``prefix`` computes ~30 fewer tokens per utterance and stage (issue #29: 71.1 ->
41.9 for the emotion stage on the ECF test set with SmolLM2's tokenizer, ``bench/prompt_tokens.py``).

A prompt is always built from two token pieces, ``prefix`` (chat-template head + conversation) and ``question``
(instruction + chat-template tail), tokenized separately in training and inference alike: the prefix of a
conversation is then identical for all its targets, so inference can share one KV cache of it exactly.

Special tokens are never written as text here: the chat template's head and tail are found by rendering a sentinel
message and splitting around it, and every piece of user-derived text (utterances, speakers) is tokenized with
``split_special_tokens=True``, so an utterance containing ``</s>`` cannot end the prompt.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from mecpe.labels import EMOTIONS

MARKER = "::"
_SENTINEL = "\x00MECPE_CONTENT\x00"
_INTRO = "Here is a conversation from the TV show Friends, one utterance per line"
_CAUSE_INTRO = "Here is a conversation from the TV show Friends, one utterance per line with its emotion"
_OMITTED = "...\n"
LAYOUTS = ("question", "prefix")
_EMOTION_RULE = ("For the utterance named after it, choose exactly one emotion of: {labels}. Answer with that "
                 "utterance and its emotion.\n")
_CAUSE_RULE = ("For the utterance named after it, with its emotion, find the utterances that cause that emotion (the "
               "named utterance itself may be one). Answer with utterance_ids and the list of their numbers, [] if "
               "none.\n")
_GEMMA_TURN = ("<start_of_turn>", "<end_of_turn>")  # Gemma's turn markers (the format of a template-less Gemma)
_TEXT_MEMO = 65536  # memoized question / answer texts per builder (a few per distinct utterance id)


@dataclass(frozen=True)
class PromptIds:
    prefix: list[int]
    question: list[int]
    dropped_utterances: int
    cut_tokens: int = 0  # tokens cut from the target utterance itself (``cut_target``; 0 otherwise)

    @property
    def ids(self) -> list[int]:
        return self.prefix + self.question

    def __len__(self) -> int:
        return len(self.prefix) + len(self.question)


# ---------------------------------------------------------------- text (no tokenizer)

def emotion_block(utt: Any) -> str:
    return f'utterance_{utt.id} ({utt.speaker}): "{utt.text}"\n'


def cause_block(utt: Any, emotion: str) -> str:
    return f'utterance_{utt.id} ({utt.speaker}) [{emotion}]: "{utt.text}"\n'


def emotion_question(utt_id: int) -> str:
    return (f"Which emotion does utterance_{utt_id} express? Choose exactly one of: {', '.join(EMOTIONS)}. "
            f"Answer with utterance_{utt_id} and the emotion.")


def cause_question(utt_id: int, emotion: str) -> str:
    return (f"The emotion of utterance_{utt_id} is {emotion}. Which utterances cause it (utterance_{utt_id} itself "
            f"may be one)? Answer with utterance_ids and the list of their numbers, [] if none.")


def intro(kind: str, layout: str = "question") -> str:
    """The text before the conversation's blocks: what it is, and under the ``prefix`` layout the instruction."""
    if layout not in LAYOUTS:
        raise ValueError(f"prompt layout {layout!r} is not one of {LAYOUTS}")
    what = _INTRO if kind == "emotion" else _CAUSE_INTRO
    if layout == "question":
        return what + ":\n"
    rule = _EMOTION_RULE.format(labels=", ".join(EMOTIONS)) if kind == "emotion" else _CAUSE_RULE
    return f"{what}. {rule}"


def emotion_short_question(utt_id: int) -> str:
    """The ``prefix`` layout's question: the instruction is in the prefix."""
    return f"utterance_{utt_id}?"


def cause_short_question(utt_id: int, emotion: str) -> str:
    return f"utterance_{utt_id} [{emotion}]?"


def question_text(kind: str, layout: str, utt_id: int, emotion: str | None = None) -> str:
    """The question of ``kind`` under ``layout`` (looked up at call time, so a test may swap one wording)."""
    if kind == "emotion":
        return emotion_question(utt_id) if layout == "question" else emotion_short_question(utt_id)
    return cause_question(utt_id, emotion) if layout == "question" else cause_short_question(utt_id, emotion)


def emotion_target(utt_id: int, label: str) -> str:
    return f"utterance_{utt_id} {MARKER} {label}"


def cause_target(ids: Sequence[int]) -> str:
    return f"utterance_ids {MARKER} [{','.join(str(i) for i in sorted(set(int(i) for i in ids)))}]"


def emotion_prompt_text(conv: Any, utt_id: int, layout: str = "question") -> str:
    """The user message of an emotion prompt as plain text (tokenizer training, debugging)."""
    return (intro("emotion", layout) + "".join(emotion_block(u) for u in conv.utterances)
            + question_text("emotion", layout, utt_id))


def cause_prompt_text(conv: Any, utt_id: int, emotions: Mapping[int, str], layout: str = "question") -> str:
    return (intro("cause", layout) + "".join(cause_block(u, emotions[u.id]) for u in conv.utterances)
            + question_text("cause", layout, utt_id, emotions[utt_id]))


# ---------------------------------------------------------------- token ids

def drop_order(ids: Sequence[int], target: int) -> list[int]:
    """Utterance ids in the order they are dropped: farthest from the target first, ties: the later one first.

    The target itself is never dropped; its neighbours come last, so they go only when nothing else is left."""
    return sorted((i for i in ids if i != target), key=lambda i: (-abs(i - target), -i))


class PromptBuilder:
    """Tokenizes prompts in two pieces and shortens those over ``max_prompt_tokens``.

    The chat-template head/tail and each conversation's block tokens are computed once and memoized (per
    conversation object and emotion assignment), so building all targets of a conversation costs one tokenizer call
    for the conversation; its unshortened prefix is assembled once and shared by its targets (the same list). The
    question and answer ids depend on the utterance id (and the cause question on its emotion) but not on the
    conversation: memoized by those, so a corpus costs a few short tokenizer calls per distinct utterance id, not
    eight per utterance (issue #29: the seven answers were 0.8 ms per utterance). Treat returned lists as
    read-only."""

    def __init__(self, tokenizer: Any, max_prompt_tokens: int = 1024, cache_size: int = 256,
                 cut_target: bool = False, layout: str = "question"):
        """``cut_target``: when the target utterance alone is over the budget (every other utterance dropped), keep
        the head of its block and mark the cut with the omission marker (inference: an input is never rejected for
        its size). Off for training, where such an example is kept whole and reported instead. ``layout``:
        ``prompt.layout`` (where the instruction goes; see the module docstring)."""
        self.tok = tokenizer
        self.layout = layout
        self.max_prompt_tokens = max_prompt_tokens
        self.cut_target = cut_target
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError("tokenizer has no eos token")
        head, tail = chat_head_tail(tokenizer)
        self.head, self.tail = head, tail
        self.intro = {kind: self._user(intro(kind, layout)) for kind in ("emotion", "cause")}
        self.omitted = self._user(_OMITTED)
        self._cache: OrderedDict[tuple, tuple[Any, list[int], list[list[int]]]] = OrderedDict()
        self._cache_size = cache_size
        self._full: OrderedDict[tuple, tuple[list[list[int]], list[int]]] = OrderedDict()  # unshortened prefixes
        self._texts: dict[str, list[int]] = {}  # question / answer text -> ids (bounded by _TEXT_MEMO)

    def _user(self, text: str | list[str]) -> Any:
        """Token ids of user-derived text: special-token strings inside it stay plain text."""
        out = self.tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return list(out) if isinstance(text, str) else [list(x) for x in out]

    def _memo(self, text: str) -> list[int]:
        """``_user(text)``, memoized: questions and answers repeat across conversations (same utterance ids)."""
        hit = self._texts.get(text)
        if hit is None:
            if len(self._texts) >= _TEXT_MEMO:
                self._texts.clear()
            hit = self._texts[text] = self._user(text)
        return hit

    def blocks(self, conv: Any, kind: str = "emotion",
               emotions: Mapping[int, str] | None = None) -> tuple[list[int], list[list[int]]]:
        """(utterance ids, token ids of each utterance's block) as prompts of ``kind`` show them (memoized)."""
        shown = None if emotions is None else tuple(emotions[u.id] for u in conv.utterances)
        key = (id(conv), kind, shown)
        hit = self._cache.get(key)
        if hit is not None and hit[0] is conv:
            self._cache.move_to_end(key)
            return hit[1], hit[2]
        if kind == "emotion":
            texts = [emotion_block(u) for u in conv.utterances]
        else:
            texts = [cause_block(u, e) for u, e in zip(conv.utterances, shown)]
        ids = [u.id for u in conv.utterances]
        blocks = self._user(texts) if texts else []
        self._cache[key] = (conv, ids, blocks)  # holding conv keeps id(conv) from being reused while cached
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return ids, blocks

    def _assemble(self, kind: str, utt_ids: list[int], blocks: list[list[int]], target: int,
                  question: list[int]) -> PromptIds:
        if target not in utt_ids:
            raise ValueError(f"utterance {target} is not in the conversation (ids {utt_ids[:3]}...)")
        fixed = len(self.head) + len(self.intro[kind]) + len(question)
        lengths = dict(zip(utt_ids, map(len, blocks)))
        kept = set(utt_ids)
        total = fixed + sum(lengths.values())
        dropped = regions = 0
        if total > self.max_prompt_tokens:
            # Omitted regions (runs of dropped utterances) counted incrementally, not re-scanned per drop: a
            # 10,000-utterance conversation would otherwise cost O(n^2) per target. Dropping one utterance opens a
            # region, extends one, or joins two (1 minus the number of dropped neighbours); == _regions().
            pos = {uid: k for k, uid in enumerate(utt_ids)}
            for uid in drop_order(utt_ids, target):
                k = pos[uid]
                left = k > 0 and utt_ids[k - 1] not in kept
                right = k + 1 < len(utt_ids) and utt_ids[k + 1] not in kept
                kept.discard(uid)
                regions += 1 - left - right
                dropped += 1
                total -= lengths[uid]
                if total + regions * len(self.omitted) <= self.max_prompt_tokens:
                    break
        target_block, cut = None, 0
        over = total + regions * len(self.omitted) - self.max_prompt_tokens
        if over > 0 and self.cut_target:
            block = blocks[utt_ids.index(target)]
            keep = max(len(block) - over - len(self.omitted), 1)
            target_block, cut = block[:keep] + self.omitted, len(block) - keep
        if not dropped and target_block is None:  # the whole conversation: one prefix for all its targets
            return PromptIds(prefix=self._full_prefix(kind, blocks), question=question, dropped_utterances=0)
        prefix = self.head + self.intro[kind]
        gap = False
        for uid, block in zip(utt_ids, blocks):
            if uid in kept:
                prefix += target_block if uid == target and target_block is not None else block
                gap = False
            elif not gap:
                prefix += self.omitted
                gap = True
        return PromptIds(prefix=prefix, question=question, dropped_utterances=dropped, cut_tokens=cut)

    def _full_prefix(self, kind: str, blocks: list[list[int]]) -> list[int]:
        """head + intro + every block, built once per ``blocks`` list (``blocks()``'s memo holds it alive)."""
        key = (kind, id(blocks))
        hit = self._full.get(key)
        if hit is not None and hit[0] is blocks:
            return hit[1]
        prefix = self.head + self.intro[kind]
        for block in blocks:
            prefix += block
        self._full[key] = (blocks, prefix)  # holding blocks keeps id(blocks) from being reused while cached
        if len(self._full) > self._cache_size:
            self._full.popitem(last=False)
        return prefix

    @staticmethod
    def _regions(utt_ids: list[int], kept: set[int]) -> int:
        regions, gap = 0, False
        for uid in utt_ids:
            if uid not in kept and not gap:
                regions += 1
            gap = uid not in kept
        return regions

    def emotion_prompt(self, conv: Any, utt_id: int) -> PromptIds:
        ids, blocks = self.blocks(conv, "emotion", None)
        return self._assemble("emotion", ids, blocks, utt_id,
                              self._memo(question_text("emotion", self.layout, utt_id)) + self.tail)

    def cause_prompt(self, conv: Any, utt_id: int, emotions: Mapping[int, str]) -> PromptIds:
        missing = [u.id for u in conv.utterances if not emotions.get(u.id)]
        if missing:
            raise ValueError(f"conversation {conv.id}: no emotion for utterances {missing}")
        ids, blocks = self.blocks(conv, "cause", emotions)
        return self._assemble("cause", ids, blocks, utt_id,
                              self._memo(question_text("cause", self.layout, utt_id, emotions[utt_id])) + self.tail)

    def _answer(self, text: str) -> list[int]:
        return self._memo(text) + [self.eos_id]

    def emotion_answer(self, utt_id: int, label: str) -> list[int]:
        """``utterance_N :: label`` + eos, tokenized on its own (no BOS), so training teaches the model to stop."""
        return self._answer(emotion_target(utt_id, label))

    def cause_answer(self, cause_ids: Sequence[int]) -> list[int]:
        return self._answer(cause_target(cause_ids))


def chat_head_tail(tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids before and after the user message in the tokenizer's chat template (generation prompt included).

    Rendered with a sentinel content and split around it; head and tail come from the template, so special-token
    text in them (e.g. ``bos_token``) is parsed. Without a template (a base model, e.g. Gemma-3-270m's GGUF): the
    family's own turn markers where the vocabulary has Gemma's (``<start_of_turn>user\\n ... <end_of_turn>\\n
    <start_of_turn>model\\n``, as Gemma's template renders one user turn), else Llama-2 chat ``[INST] ... [/INST]``;
    both after the tokenizer's bos id."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False,
                                             add_generation_prompt=True)
        if text.count(_SENTINEL) != 1:
            raise ValueError("chat template does not render the user message verbatim exactly once")
        head, tail = text.split(_SENTINEL)
        enc = lambda s: list(tokenizer(s, add_special_tokens=False)["input_ids"]) if s else []  # noqa: E731
        return enc(head), enc(tail)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    enc = lambda s: list(tokenizer(s, add_special_tokens=False, split_special_tokens=True)["input_ids"])  # noqa: E731
    vocab = tokenizer.get_vocab()
    if all(t in vocab for t in _GEMMA_TURN):
        start, end = (vocab[t] for t in _GEMMA_TURN)
        return bos + [start] + enc("user\n"), [end] + enc("\n") + [start] + enc("model\n")
    return bos + enc("[INST] "), enc(" [/INST]")


# ---------------------------------------------------------------- parsers

_LABEL_RE = re.compile(r"\b(" + "|".join(EMOTIONS) + r")\b", re.IGNORECASE)
_UTT_RE = re.compile(r"utterance_([0-9]{1,6})", re.IGNORECASE)
_INT_RE = re.compile(r"-?[0-9]+")


def _after_marker(text: Any) -> tuple[str | None, str]:
    """(text after the first ``::`` up to the end of that line, text before it); (None, text) without a marker."""
    text = text if isinstance(text, str) else ("" if text is None else str(text))
    head, sep, rest = text.partition(MARKER)
    if not sep:
        return None, text
    return rest.lstrip().split("\n", 1)[0], head


def parse_emotion(text: Any, utt_id: int | None = None) -> tuple[str | None, str]:
    """Label from generated text (not the prompt): only the answer after ``::`` counts.

    ``ok``: exactly a lowercase label after the marker (and, given ``utt_id``, no other utterance named before it);
    ``repaired``: the first label word after the marker despite case, punctuation or extra words, or a bare label
    with no marker; ``invalid``: no label there -> None (never a silent neutral)."""
    answer, head = _after_marker(text)
    if answer is None:
        bare = head.strip().strip(".,;:!\"'`").strip().lower()
        return (bare, "repaired") if bare in EMOTIONS else (None, "invalid")
    m = _LABEL_RE.search(answer)
    if not m:
        return None, "invalid"
    label = m.group(1).lower()
    status = "ok" if answer.rstrip() == label else "repaired"
    if utt_id is not None:
        named = _UTT_RE.findall(head)
        if named and int(named[-1]) != int(utt_id):
            status = "repaired"
    return label, status


def parse_causes(text: Any, num_utterances: int) -> tuple[list[int], str]:
    """Cause utterance ids from generated text: the (possibly truncated) list after ``::``.

    ``ok``: a well-formed ``[i,j]`` / ``[]`` of sorted, unique, in-range ids; ``repaired``: ids read despite spaces,
    duplicates, wrong order, out-of-range ids (dropped), a missing bracket or trailing text; ``invalid``: no marker
    or no list -> []."""
    answer, _ = _after_marker(text)
    if answer is None:
        return [], "invalid"
    answer = answer.strip()
    start = answer.find("[")
    if start < 0:
        body = answer
    else:
        end = answer.find("]", start)
        body = answer[start + 1:] if end < 0 else answer[start + 1:end]
    raw = _INT_RE.findall(body)
    if not raw and (start < 0 or end < 0):
        return [], "invalid"
    # ids longer than 6 digits are out of range anyway (and int() of huge digit strings is slow or refused)
    ids = sorted({int(t) for t in raw if len(t) <= 6 and 1 <= int(t) <= num_utterances})
    canonical = "[" + ",".join(map(str, ids)) + "]"
    return ids, "ok" if answer == canonical else "repaired"
