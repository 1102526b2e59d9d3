"""The ECF Subtask 2 schema: records, their validation (a bad conversation becomes a ``Reject``), the JSON they are
written back as, and the ``Subtask_2_pred.json`` writer. Reading files is ``mecpe.readers``; splits and ``prepare``
are ``mecpe.splits``.

Two levels of failure. A file that cannot be read as a whole (not JSON, truncated, wrong top-level type)
is a ``FileError``; one bad conversation is a ``Reject`` and never stops the others. Size is never a reason
to reject. A ``Reject`` is also what inference writes to its ``rejects.jsonl`` (with the stage that set it aside):
one record, one format.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from mecpe import storage
from mecpe.labels import EMOTIONS

MAX_ID_CHARS = 1000
_KNOWN_UTT_KEYS = ("utterance_ID", "text", "speaker", "emotion", "video_name")
DIGITS = re.compile(r"[0-9]+")
_PAIR_EMOTION = re.compile(r"([0-9]+)_(.*)", re.S)
SURROGATE = re.compile("[\ud800-\udfff]")
BAD_UTF8 = "invalid UTF-8 (undecodable bytes or lone surrogate)"


def video_name(conversation_id: int | str, utterance_id: int) -> str:
    return f"dia{conversation_id}utt{utterance_id}.mp4"


@dataclass(frozen=True)
class Utterance:
    id: int
    text: str
    speaker: str
    emotion: str | None
    extra: dict = field(default_factory=dict, hash=False)  # unknown input fields, written back as given


@dataclass(frozen=True)
class Pair:
    emotion_utt: int
    emotion: str
    cause_utt: int

    def to_json(self) -> list[str]:
        return [f"{self.emotion_utt}_{self.emotion}", str(self.cause_utt)]


@dataclass(frozen=True)
class Conversation:
    id: int | str
    utterances: tuple[Utterance, ...]
    pairs: tuple[Pair, ...] | None  # None: the input had no labels
    source: str = ""

    def emotions(self) -> dict[int, str | None]:
        return {u.id: u.emotion for u in self.utterances}

    def causes_of(self, utt_id: int) -> list[int]:
        return list(dict.fromkeys(p.cause_utt for p in self.pairs or () if p.emotion_utt == utt_id))

    def video_name(self, utt_id: int) -> str:
        return video_name(self.id, utt_id)


@dataclass
class Reject:
    """A conversation (or a whole file: ``conversation_id`` None) set aside, naming file, place, field and reason.
    ``stage``: where it happened (read, validate, emotion, cause, write, assemble); ``retryable``: a prediction
    failure that a re-run tries again (not counted as done)."""

    source: str
    location: str
    conversation_id: str | None
    reason: str
    field: str | None = None
    stage: str = "validate"
    retryable: bool = False

    def to_json(self) -> dict:
        return asdict(self)


class FileError(Exception):
    """The whole file is unreadable; ``position`` is "line:col" or "byte N" where known."""

    def __init__(self, source: str, position: str, message: str):
        self.source, self.position, self.message = source, position, message
        super().__init__(f"{source}:{position}: {message}" if position else f"{source}: {message}")

    def as_reject(self) -> Reject:
        return Reject(self.source, self.position or "file", None, f"unreadable file: {self.message}", stage="read")


class InvalidConversation(ValueError):
    def __init__(self, reason: str, field: str | None = None):
        self.reason, self.field = reason, field
        super().__init__(f"{reason} ({field})" if field else reason)


@dataclass
class LoadResult:
    conversations: list[Conversation]
    rejects: list[Reject]
    file_errors: list[FileError]
    sources: dict[str, str] = field(default_factory=dict)  # uri -> sha256 of the bytes that were parsed


# --------------------------------------------------------------------------- validation


def clean_text(text: str, limit: int) -> str:
    """Bounded and always encodable as UTF-8 (rejects must be writable)."""
    text = SURROGATE.sub("\ufffd", text)
    return text if len(text) <= limit else text[:limit] + "…"


def quoted(value: Any, limit: int = 80) -> str:
    """A bad value quoted for a reject reason, on one line."""
    return clean_text(json.dumps(value, ensure_ascii=False, default=str), limit)


def _int_id(value: Any) -> int | None:
    """An int, or a string of ASCII digits; bools and floats are not ids."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and DIGITS.fullmatch(value):
        return int(value)
    return None


def _conversation_id(obj: dict) -> int | str:
    if "conversation_ID" not in obj:
        raise InvalidConversation("missing conversation_ID", "conversation_ID")
    raw = obj["conversation_ID"]
    cid = _int_id(raw)
    if cid is not None:
        return cid
    if isinstance(raw, str) and 0 < len(raw) <= MAX_ID_CHARS:
        return raw  # wild corpora: kept as given; object keys come from storage.safe_key
    raise InvalidConversation(
        f"conversation_ID must be an integer or a non-empty string of at most {MAX_ID_CHARS} characters, "
        f"got {quoted(raw)}", "conversation_ID")


def _utterance(obj: Any, index: int, require_labels: bool) -> Utterance:
    where = f"conversation[{index}]"
    if not isinstance(obj, dict):
        raise InvalidConversation(f"utterance {index + 1} is not a JSON object", where)
    if "utterance_ID" not in obj:
        raise InvalidConversation("missing utterance_ID", f"{where}.utterance_ID")
    uid = _int_id(obj["utterance_ID"])
    if uid is None:
        raise InvalidConversation(f"utterance_ID must be an integer, got {quoted(obj['utterance_ID'])}",
                                  f"{where}.utterance_ID")
    for key in ("text", "speaker"):
        if key not in obj:
            raise InvalidConversation(f"missing {key}", f"{where}.{key}")
        if not isinstance(obj[key], str):
            raise InvalidConversation(f"{key} must be a string, got {quoted(obj[key])}", f"{where}.{key}")
    emotion = obj.get("emotion")
    if emotion is None and require_labels:
        raise InvalidConversation("missing emotion", f"{where}.emotion")
    if emotion is not None and emotion not in EMOTIONS:
        raise InvalidConversation(f"unknown emotion {quoted(emotion)} (expected one of {', '.join(EMOTIONS)})",
                                  f"{where}.emotion")
    extra = {k: v for k, v in obj.items() if k not in _KNOWN_UTT_KEYS}
    return Utterance(uid, obj["text"], obj["speaker"], emotion, extra)


def _pair(raw: Any, k: int, utts: dict[int, Utterance]) -> Pair:
    where = f"emotion-cause_pairs[{k}]"
    strings = isinstance(raw, list) and len(raw) >= 2 and all(isinstance(x, str) for x in raw)
    m = _PAIR_EMOTION.fullmatch(raw[0]) if strings else None
    if not (m and m.group(2) in EMOTIONS and DIGITS.fullmatch(raw[1])):
        raise InvalidConversation(f"malformed pair {quoted(raw)}: expected [\"<utt>_<emotion>\", \"<utt>\"]", where)
    pair = Pair(int(m.group(1)), m.group(2), int(raw[1]))
    for uid in (pair.emotion_utt, pair.cause_utt):
        if uid not in utts:
            raise InvalidConversation(f"pair {quoted(raw)} points outside the conversation "
                                      f"(utterances 1..{len(utts)})", where)
    label = utts[pair.emotion_utt].emotion
    if pair.emotion == "neutral" or label == "neutral":
        raise InvalidConversation(f"pair {quoted(raw)} on a neutral utterance", where)
    if label is not None and label != pair.emotion:
        raise InvalidConversation(f"pair {quoted(raw)} disagrees with utterance {pair.emotion_utt}'s "
                                  f"emotion {label!r}", where)
    return pair


def conversation_from_json(obj: Any, *, source: str, location: str = "",
                           require_labels: bool = False) -> Conversation:
    """Validate one conversation object; raises InvalidConversation(reason, field) on the first problem.

    ``require_labels``: every utterance needs an emotion and the pair list must be present (gold data).
    """
    if not isinstance(obj, dict):
        raise InvalidConversation(f"conversation is not a JSON object (got {type(obj).__name__})")
    cid = _conversation_id(obj)
    turns = obj.get("conversation")
    if turns is None:
        raise InvalidConversation("missing conversation", "conversation")
    if not isinstance(turns, list):
        raise InvalidConversation(f"conversation must be a list, got {type(turns).__name__}", "conversation")
    if not turns:
        raise InvalidConversation("empty conversation", "conversation")
    utts = [_utterance(u, i, require_labels) for i, u in enumerate(turns)]
    ids, seen = [u.id for u in utts], set()
    for i, uid in enumerate(ids):
        if uid in seen:
            raise InvalidConversation(f"duplicate utterance_ID {uid}", f"conversation[{i}].utterance_ID")
        seen.add(uid)
    if ids != list(range(1, len(ids) + 1)):
        raise InvalidConversation(f"utterance ids must be 1..{len(ids)} in order, got {quoted(ids)}", "conversation")
    raw_pairs = obj.get("emotion-cause_pairs")
    pairs = None
    if raw_pairs is None:
        if require_labels:
            raise InvalidConversation("missing emotion-cause_pairs", "emotion-cause_pairs")
    elif not isinstance(raw_pairs, list):
        raise InvalidConversation(f"emotion-cause_pairs must be a list, got {type(raw_pairs).__name__}",
                                  "emotion-cause_pairs")
    else:
        by_id = {u.id: u for u in utts}
        pairs = tuple(_pair(p, k, by_id) for k, p in enumerate(raw_pairs))
    return Conversation(cid, tuple(utts), pairs, source)


def _pair_json(p: Any) -> list[str]:
    if isinstance(p, Pair):
        return p.to_json()
    if len(p) == 3 and not isinstance(p[0], str):  # (emotion_utt, emotion, cause_utt)
        return Pair(int(p[0]), str(p[1]), int(p[2])).to_json()
    return [str(p[0]), str(p[1])]


def conversation_to_json(conv: Conversation, *, emotions: dict[int, str] | None = None,
                         pairs: Iterable[Any] | None = None) -> dict:
    """The input schema again, ``video_name`` on every utterance; ``emotions``/``pairs`` replace the labels.

    Utterance keys: utterance_ID, text, speaker, emotion (when known), unknown input fields, video_name.
    """
    utts = []
    for u in conv.utterances:
        emotion = emotions.get(u.id) if emotions is not None else u.emotion
        d = {"utterance_ID": u.id, "text": u.text, "speaker": u.speaker}
        if emotion is not None:
            d["emotion"] = emotion
        d.update(u.extra)
        d["video_name"] = video_name(conv.id, u.id)
        utts.append(d)
    out = {"conversation_ID": conv.id, "conversation": utts}
    pairs = conv.pairs if pairs is None else list(pairs)
    if pairs is not None:
        out["emotion-cause_pairs"] = [_pair_json(p) for p in pairs]
    return out


# --------------------------------------------------------------------------- predictions


def _id_order(cid: int | str) -> tuple:
    """Ints numerically, then strings."""
    return (0, cid, "") if isinstance(cid, int) else (1, 0, cid)


def official_id(conversation_id: Any) -> int | str:
    """The id as the official files hold it: an int when it is one (or a string of digits), else the string."""
    i = _int_id(conversation_id)
    return conversation_id if i is None else i


def id_order(conversation_id: Any) -> tuple:
    """Sort key of ``Subtask_2_pred.json``: int ids numerically, then string ids."""
    return _id_order(official_id(conversation_id))


def prediction_json(rec: dict) -> dict:
    """One conversation in the official format: only conversation_ID, conversation[utterance_ID, text, speaker,
    emotion, video_name] and emotion-cause_pairs are kept."""
    cid = official_id(rec["conversation_ID"])
    utts = []
    for u in rec["conversation"]:
        uid = int(u["utterance_ID"])
        d = {"utterance_ID": uid, "text": u["text"], "speaker": u["speaker"]}
        if u.get("emotion") is not None:
            d["emotion"] = u["emotion"]
        d["video_name"] = video_name(cid, uid)
        utts.append(d)
    return {"conversation_ID": cid, "conversation": utts,
            "emotion-cause_pairs": [_pair_json(p) for p in rec.get("emotion-cause_pairs") or []]}


def write_predictions(records: Iterable[dict], uri: str) -> None:
    """``Subtask_2_pred.json`` in the official format (``prediction_json``), sorted by conversation id, indent=4.

    Holds all records in memory to sort them; ``write_sorted_predictions`` streams records already in order."""
    out = {}
    for rec in records:
        pred = prediction_json(rec)
        if pred["conversation_ID"] in out:
            raise ValueError(f"duplicate conversation_ID {pred['conversation_ID']!r} in predictions")
        out[pred["conversation_ID"]] = pred
    write_sorted_predictions((out[k] for k in sorted(out, key=_id_order)), uri)


def write_sorted_predictions(records: Iterable[dict], uri: str) -> int:
    """Stream records sorted by ``id_order`` (no duplicates) into ``uri``: the same bytes as dumping the whole
    list with indent=4, with one conversation in memory at a time. Returns the number written."""
    import textwrap

    state = {"n": 0, "last": None}

    def chunks():
        for rec in records:
            pred = prediction_json(rec)
            key = _id_order(pred["conversation_ID"])
            if state["last"] is not None and key <= state["last"]:
                what = "duplicate" if key == state["last"] else "unsorted"
                raise ValueError(f"{what} conversation_ID {pred['conversation_ID']!r} in predictions")
            state["last"] = key
            body = textwrap.indent(json.dumps(pred, indent=4, ensure_ascii=False), "    ")
            yield (("[\n" if state["n"] == 0 else ",\n") + body).encode("utf-8")
            state["n"] += 1
        yield b"\n]\n" if state["n"] else b"[]\n"

    storage.write_chunks(uri, chunks())
    return state["n"]
