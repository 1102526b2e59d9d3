"""A deterministic, *learnable* synthetic corpus in the ECF Subtask 2 JSON format.

The real ECF data is too hard for the tiny local model to show that the pipeline learns anything; this corpus has
simple fixed rules (``RULES``) that the tiny model (pretrained, ``mecpe.tiny``) learns with LoRA in a few minutes of
CPU, so a run on it shows that training, the two-stage inference and the scorer fit together
(``jobs/configs/learn.yaml``; ``tests/test_learn.py`` also shows that mismatched prompts or ids fall below 0.3).

``generate`` returns records in the same schema as ``Subtask_2_test.json`` (``conversation_ID``, ``conversation``
with ``utterance_ID``/``text``/``speaker``/``emotion``/``video_name``, ``emotion-cause_pairs``); train ids are
``1..num_train``, test ids follow. Each conversation is drawn from its own generator seeded with (seed, id), so the
output is the same for a seed on every machine and Python version, and a conversation does not depend on how many
others were generated before it.
"""

from __future__ import annotations

import random
from types import MappingProxyType
from typing import Any, Mapping

from mecpe import storage
from mecpe.errors import ConfigError

SPEAKERS: tuple[str, ...] = ("Chandler", "Joey", "Monica", "Phoebe", "Rachel", "Ross")
MIN_UTTERANCES, MAX_UTTERANCES = 3, 10
MIN_WORDS, MAX_WORDS = 3, 6  # words per utterance, the cue word included
EMOTIONAL_RATE = 0.42  # probability that an utterance is emotional: ~58% neutral
# One cue word per emotion; it never appears in a neutral utterance. One word (not two) and never the first word of
# the text (so always the same token, with its leading space): the tiny model learns the word -> emotion map fast.
CUES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "anger": ("furious",),
    "disgust": ("gross",),
    "fear": ("scared",),
    "joy": ("happy",),
    "sadness": ("sad",),
    "surprise": ("wow",),
})
# Emotion mix of the emotional utterances (joy and surprise most common, as in ECF).
EMOTION_WEIGHTS: Mapping[str, float] = MappingProxyType({"anger": 0.15, "disgust": 0.12, "fear": 0.12, "joy": 0.25,
                                                          "sadness": 0.15, "surprise": 0.21})
NEUTRAL_WORDS: tuple[str, ...] = (
    "okay", "so", "we", "went", "to", "the", "coffee", "house", "today", "what", "about", "it", "yeah", "you",
    "know", "i", "think", "maybe", "later", "tomorrow", "apartment", "dinner", "just", "then", "there", "this",
    "that", "call", "me", "guess", "right", "well", "here", "now", "with", "him", "her", "they", "said", "come",
)
CUE_TO_EMOTION: Mapping[str, str] = MappingProxyType({w: e for e, words in CUES.items() for w in words})

RULES = (
    "Synthetic corpus rules (mecpe.synth): conversations of 3-10 utterances; speakers drawn from the six Friends "
    "names (Chandler, Joey, Monica, Phoebe, Rachel, Ross); each text is 3-6 lowercase words from a 40-word neutral "
    "vocabulary, ending with a full stop. About 58% of utterances are neutral and contain no cue word. An emotional "
    "utterance contains exactly one cue word (never its first word), which decides its emotion: anger (furious), "
    "disgust (gross), fear (scared), joy (happy), sadness (sad), surprise (wow). Causes: every emotional utterance N is caused by itself and by the utterance before it "
    "(pairs N-1 and N; utterance 1 only by itself); neutral utterances have no causes."
)


def cue_words(text: str) -> list[str]:
    """The cue words in a text, in order (a rule-abiding text has none if neutral, else exactly one)."""
    return [w for w in text.rstrip(".").split() if w in CUE_TO_EMOTION]


def expected_causes(utt_id: int) -> list[int]:
    """The cause utterances of an emotional utterance under the rules: the one before it (if any) and itself."""
    return [utt_id - 1, utt_id] if utt_id > 1 else [utt_id]


def _text(rng: random.Random, emotion: str) -> str:
    n = rng.randint(MIN_WORDS, MAX_WORDS)
    if emotion == "neutral":
        words = [rng.choice(NEUTRAL_WORDS) for _ in range(n)]
    else:
        words = [rng.choice(NEUTRAL_WORDS) for _ in range(n - 1)]
        words.insert(rng.randint(1, n - 1), rng.choice(CUES[emotion]))  # never first
    return " ".join(words) + "."


def conversation(conversation_id: int, seed: int = 0) -> dict:
    """One conversation in the Subtask 2 schema, a function of (conversation_id, seed) only."""
    rng = random.Random(f"mecpe-synth:{seed}:{conversation_id}")  # str seeds hash with sha512: stable everywhere
    length = rng.randint(MIN_UTTERANCES, MAX_UTTERANCES)
    cast = rng.sample(SPEAKERS, rng.randint(2, 4))
    emotions_, weights = list(EMOTION_WEIGHTS), list(EMOTION_WEIGHTS.values())
    utts, pairs = [], []
    for uid in range(1, length + 1):
        emotion = rng.choices(emotions_, weights)[0] if rng.random() < EMOTIONAL_RATE else "neutral"
        utts.append({"utterance_ID": uid, "text": _text(rng, emotion), "speaker": rng.choice(cast),
                     "emotion": emotion, "video_name": f"dia{conversation_id}utt{uid}.mp4"})
        if emotion != "neutral":
            pairs += [[f"{uid}_{emotion}", str(c)] for c in expected_causes(uid)]
    return {"conversation_ID": conversation_id, "conversation": utts, "emotion-cause_pairs": pairs}


def generate(num_train: int = 400, num_test: int = 100, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, test) conversation records; train ids 1..num_train, test ids num_train+1..num_train+num_test."""
    if num_train < 0 or num_test < 0:
        raise ConfigError("num_train and num_test must be >= 0")
    train = [conversation(cid, seed) for cid in range(1, num_train + 1)]
    test = [conversation(cid, seed) for cid in range(num_train + 1, num_train + num_test + 1)]
    return train, test


def write_corpus(out_dir: str, num_train: int = 400, num_test: int = 100, seed: int = 0) -> dict[str, Any]:
    """Write ``train.json`` and ``test.json`` under ``out_dir`` (local folder or s3:// prefix); returns counts."""
    train, test = generate(num_train, num_test, seed)
    out: dict[str, Any] = {"seed": seed}
    for name, recs in (("train", train), ("test", test)):
        uri = storage.join(out_dir, f"{name}.json")
        storage.write_json(uri, recs)
        utts = [u for r in recs for u in r["conversation"]]
        out[name] = {"uri": uri, "conversations": len(recs), "utterances": len(utts),
                     "emotional_utterances": sum(u["emotion"] != "neutral" for u in utts),
                     "pairs": sum(len(r["emotion-cause_pairs"]) for r in recs)}
    return out

