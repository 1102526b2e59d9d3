"""ECF Subtask 2 records: the emotion labels, parse + validate (bad conversations become rejects), the one ECF
reader, splits, ``prepare``, and the ``Subtask_2_pred.json`` writer.

Two levels of failure. A file that cannot be read as a whole (not JSON, truncated, wrong top-level type)
is a ``FileError``; one bad conversation is a ``Reject`` and never stops the others. Size is never a reason
to reject. Inputs are a JSON array in the SemEval schema or JSON Lines (one conversation per line). A ``Reject`` is
also what inference writes to its ``rejects.jsonl`` (with the stage that set it aside): one record, one format.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from mecpe import storage
from mecpe.errors import ConfigError, InputError
from mecpe.labels import EMOTIONS
from mecpe.layout import REJECTS_FILE, DataLayout

MAX_ID_CHARS = 1000
_KNOWN_UTT_KEYS = ("utterance_ID", "text", "speaker", "emotion", "video_name")
_DIGITS = re.compile(r"[0-9]+")
_PAIR_EMOTION = re.compile(r"([0-9]+)_(.*)", re.S)
_SURROGATE = re.compile("[\ud800-\udfff]")
_BAD_UTF8 = "invalid UTF-8 (undecodable bytes or lone surrogate)"


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


def _clean(text: str, limit: int) -> str:
    """Bounded and always encodable as UTF-8 (rejects must be writable)."""
    text = _SURROGATE.sub("\ufffd", text)
    return text if len(text) <= limit else text[:limit] + "…"


def _short(value: Any, limit: int = 80) -> str:
    """A bad value quoted for a reject reason, on one line."""
    return _clean(json.dumps(value, ensure_ascii=False, default=str), limit)


def _int_id(value: Any) -> int | None:
    """An int, or a string of ASCII digits; bools and floats are not ids."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _DIGITS.fullmatch(value):
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
        f"got {_short(raw)}", "conversation_ID")


def _utterance(obj: Any, index: int, require_labels: bool) -> Utterance:
    where = f"conversation[{index}]"
    if not isinstance(obj, dict):
        raise InvalidConversation(f"utterance {index + 1} is not a JSON object", where)
    if "utterance_ID" not in obj:
        raise InvalidConversation("missing utterance_ID", f"{where}.utterance_ID")
    uid = _int_id(obj["utterance_ID"])
    if uid is None:
        raise InvalidConversation(f"utterance_ID must be an integer, got {_short(obj['utterance_ID'])}",
                                  f"{where}.utterance_ID")
    for key in ("text", "speaker"):
        if key not in obj:
            raise InvalidConversation(f"missing {key}", f"{where}.{key}")
        if not isinstance(obj[key], str):
            raise InvalidConversation(f"{key} must be a string, got {_short(obj[key])}", f"{where}.{key}")
    emotion = obj.get("emotion")
    if emotion is None and require_labels:
        raise InvalidConversation("missing emotion", f"{where}.emotion")
    if emotion is not None and emotion not in EMOTIONS:
        raise InvalidConversation(f"unknown emotion {_short(emotion)} (expected one of {', '.join(EMOTIONS)})",
                                  f"{where}.emotion")
    extra = {k: v for k, v in obj.items() if k not in _KNOWN_UTT_KEYS}
    return Utterance(uid, obj["text"], obj["speaker"], emotion, extra)


def _pair(raw: Any, k: int, utts: dict[int, Utterance]) -> Pair:
    where = f"emotion-cause_pairs[{k}]"
    strings = isinstance(raw, list) and len(raw) >= 2 and all(isinstance(x, str) for x in raw)
    m = _PAIR_EMOTION.fullmatch(raw[0]) if strings else None
    if not (m and m.group(2) in EMOTIONS and _DIGITS.fullmatch(raw[1])):
        raise InvalidConversation(f"malformed pair {_short(raw)}: expected [\"<utt>_<emotion>\", \"<utt>\"]", where)
    pair = Pair(int(m.group(1)), m.group(2), int(raw[1]))
    for uid in (pair.emotion_utt, pair.cause_utt):
        if uid not in utts:
            raise InvalidConversation(f"pair {_short(raw)} points outside the conversation "
                                      f"(utterances 1..{len(utts)})", where)
    label = utts[pair.emotion_utt].emotion
    if pair.emotion == "neutral" or label == "neutral":
        raise InvalidConversation(f"pair {_short(raw)} on a neutral utterance", where)
    if label is not None and label != pair.emotion:
        raise InvalidConversation(f"pair {_short(raw)} disagrees with utterance {pair.emotion_utt}'s "
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
        raise InvalidConversation(f"utterance ids must be 1..{len(ids)} in order, got {_short(ids)}", "conversation")
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


# --------------------------------------------------------------------------- reading


def _id_text(obj: Any) -> str | None:
    if isinstance(obj, dict) and obj.get("conversation_ID") is not None:
        return _clean(str(obj["conversation_ID"]), 200)
    return None


def _has_surrogates(obj: Any) -> bool:
    """Lone surrogates come from undecodable bytes (surrogateescape) or \\udXXX escapes: not writable as UTF-8."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _is_jsonl(text: str, source: str) -> bool:
    """``.jsonl``/``.ndjson`` by name; else by content: JSON Lines starts with "{".

    A pretty-printed single object (one JSON value spanning several lines) is not JSON Lines but a
    wrong top-level type, so it is a FileError rather than a reject per line.
    """
    if source.lower().endswith((".jsonl", ".ndjson")):
        return True
    if not text.startswith("{"):
        return False
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return True
    if "\n" in text.strip():
        raise FileError(source, "1:1", "top level is a JSON object spanning several lines; "
                                       "expected an array of conversations or JSON Lines")
    return True


def _record(location: str, raw: str, bad_bytes: bool, source: str) -> tuple[str, Any]:
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        reason = _BAD_UTF8 if bad_bytes else f"invalid JSON: {_clean(str(exc), 200)}"
        return location, Reject(source, location, None, reason, stage="read")
    if _has_surrogates(obj):
        return location, Reject(source, location, _id_text(obj), _BAD_UTF8, stage="read")
    return location, obj


def record_from_line(line: bytes, location: str, source: str) -> tuple[str, Any]:
    """One JSON Lines line (undecoded bytes) -> (location, raw conversation object | Reject): invalid UTF-8 or JSON
    rejects only this line."""
    try:
        raw, bad = line.decode("utf-8"), False
    except UnicodeDecodeError:
        raw, bad = line.decode("utf-8", "surrogateescape"), True
    return _record(location, raw, bad, source)


_ECF_HEADER = re.compile(r"([0-9]+) ([0-9]+)")
_ECF_PAIR = re.compile(r"\(([0-9]+),([0-9]+)\)")
_ECF_CLIP = re.compile(r"Friends_S([0-9]+)E([0-9]+): *([0-9:.]+) *- *([0-9:.]+)")


def _is_ecf_text(text: str, source: str) -> bool:
    """The ECF 1.0 release's text format (``NUSTM/MECPE`` ``data/*.txt``): by name, or a first line ``<id> <count>``."""
    return source.lower().endswith(".txt") or bool(_ECF_HEADER.fullmatch(text.split("\n", 1)[0].strip()))


def iter_ecf_text(text: str, source: str) -> Iterator[tuple[str, Any]]:
    """(location, raw conversation object | Reject) from the ECF 1.0 text format, one record per conversation::

        <conversation_ID> <number of utterances>
        (<emotion utt>,<cause utt>),(...)        (an empty line when there are none)
        <utt> | <speaker> | <emotion> | <text> | Friends_S1E1: 00:01:19.037 - 00:01:25.417

    into the schema of the SemEval JSON files (pairs ``["3_surprise", "1"]`` carry the emotion utterance's label;
    ``video_name`` and ``video_source`` as there), so the one validator checks both. A header that is not
    ``<id> <count>`` ends the file (FileError: nothing after it can be placed); a bad pair or utterance line rejects
    its conversation only."""
    lines = text.split("\n")
    n = 0
    while n < len(lines):
        if not lines[n].strip():
            n += 1
            continue
        location = f"line {n + 1}"
        head = _ECF_HEADER.fullmatch(lines[n].strip())
        if head is None:
            raise FileError(source, location, f"expected '<conversation_ID> <number of utterances>', got "
                                              f"{_short(lines[n])}")
        cid, count = int(head.group(1)), int(head.group(2))
        pair_line = lines[n + 1].strip() if n + 1 < len(lines) else ""
        body = lines[n + 2:n + 2 + count]
        n += 2 + count
        utts, problem = [], None
        for k, line in enumerate(body):
            parts = [p.strip() for p in line.split(" | ")]
            if len(parts) < 4 or not _DIGITS.fullmatch(parts[0]):
                problem = (f"utterance line {k + 1} is not '<utt> | <speaker> | <emotion> | <text> | <clip>': "
                           f"{_short(line)}", f"conversation[{k}]")
                break
            clip = _ECF_CLIP.fullmatch(parts[-1]) if len(parts) >= 5 else None
            text_parts = parts[3:-1] if clip or len(parts) >= 5 else parts[3:]
            utt = {"utterance_ID": int(parts[0]), "text": " | ".join(text_parts), "speaker": parts[1],
                   "emotion": parts[2], "video_name": video_name(cid, int(parts[0]))}
            if clip:
                utt["video_source"] = [f"S{int(clip.group(1)):02d}E{int(clip.group(2)):02d}", clip.group(3),
                                       clip.group(4)]
            utts.append(utt)
        if problem is None and len(body) < count:
            problem = (f"{count} utterances announced, the file ends after {len(body)}", "conversation")
        raw_pairs = _ECF_PAIR.findall(pair_line)
        if problem is None and _ECF_PAIR.sub("", pair_line).replace(",", "").strip():
            problem = (f"pair line is not '(<emotion utt>,<cause utt>),...': {_short(pair_line)}",
                       "emotion-cause_pairs")
        if problem is not None:
            yield location, Reject(source, location, str(cid), problem[0], problem[1], stage="read")
            continue
        label = {u["utterance_ID"]: u["emotion"] for u in utts}
        pairs = [[f"{e}_{label.get(int(e), '?')}", c] for e, c in raw_pairs]
        yield location, {"conversation_ID": cid, "conversation": utts, "emotion-cause_pairs": pairs}


def iter_records(data: bytes, source: str) -> Iterator[tuple[str, Any]]:
    """(location, raw conversation object | Reject) for a JSON array, JSON Lines or the ECF 1.0 text format
    (``iter_ecf_text``); raises FileError.

    Locations are "index N" (0-based) in arrays and "line N" (1-based) in JSON Lines. Undecodable bytes
    reject only the conversation (or line) they are in.
    """
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    text = data.decode("utf-8", "surrogateescape")
    stripped = text.lstrip()
    if not stripped:
        raise FileError(source, "byte 0", "empty file")
    if _is_ecf_text(stripped, source):
        yield from iter_ecf_text(text, source)
        return
    if _is_jsonl(stripped, source):
        for n, line in storage.iter_lines([data]):
            yield record_from_line(line, f"line {n}", source)
        return
    try:
        top = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FileError(source, f"{exc.lineno}:{exc.colno}", f"not valid JSON: {exc.msg}") from None
    except RecursionError:
        raise FileError(source, "", "JSON nested too deeply") from None
    if not isinstance(top, list):
        raise FileError(source, "1:1", f"top level is a JSON {type(top).__name__}; expected an array of conversations")
    for i, obj in enumerate(top):
        location = f"index {i}"
        if _has_surrogates(obj):
            yield location, Reject(source, location, _id_text(obj), _BAD_UTF8, stage="read")
        else:
            yield location, obj


def _parse(data: bytes, source: str, require_labels: bool, seen: dict,
           convs: list[Conversation], rejects: list[Reject]) -> None:
    """Validate all records of one file; ``seen`` (id -> (source, location)) makes the first of an id win."""
    for location, obj in iter_records(data, source):
        if isinstance(obj, Reject):
            rejects.append(obj)
            continue
        try:
            conv = conversation_from_json(obj, source=source, location=location, require_labels=require_labels)
        except InvalidConversation as exc:
            rejects.append(Reject(source, location, _id_text(obj), exc.reason, exc.field))
            continue
        if conv.id in seen:
            first_source, first_location = seen[conv.id]
            rejects.append(Reject(source, location, _clean(str(conv.id), 200),
                                  f"duplicate conversation_ID {_short(conv.id)}: first seen in "
                                  f"{first_source} ({first_location})", "conversation_ID"))  # stage validate
            continue
        seen[conv.id] = (source, location)
        convs.append(conv)


def parse_conversations(data: bytes, source: str, *, require_labels: bool = False
                        ) -> tuple[list[Conversation], list[Reject]]:
    """One file's bytes -> (valid conversations in file order, rejects); raises FileError."""
    convs: list[Conversation] = []
    rejects: list[Reject] = []
    _parse(data, source, require_labels, {}, convs, rejects)
    return convs, rejects


def read_conversations(uris: str | Sequence[str], *, require_labels: bool = False) -> LoadResult:
    """Files, folders or prefixes (local or s3://). File errors are recorded and the other files still load."""
    result = LoadResult([], [], [])
    seen: dict = {}
    for uri in [uris] if isinstance(uris, str) else uris:
        try:
            files = storage.list_files(uri)
        except OSError as exc:
            result.file_errors.append(FileError(str(uri), "", f"cannot list: {exc}"))
            continue
        for source in files:
            try:
                data = storage.read_bytes(source)
            except OSError as exc:
                result.file_errors.append(FileError(source, "", f"cannot read: {exc}"))
                continue
            result.sources[source] = hashlib.sha256(data).hexdigest()
            try:
                _parse(data, source, require_labels, seen, result.conversations, result.rejects)
            except FileError as exc:
                result.file_errors.append(exc)
    return result


# --------------------------------------------------------------------------- splits


def _id_order(cid: int | str) -> tuple:
    """Ints numerically, then strings."""
    return (0, cid, "") if isinstance(cid, int) else (1, 0, cid)


def _sklearn_split(items: list, test_size: float, seed: int) -> tuple[list, list]:
    """scikit-learn's ``train_test_split(items, test_size=..., random_state=seed)`` (ShuffleSplit), no sklearn."""
    n = len(items)
    n_test = math.ceil(test_size * n)
    perm = np.random.RandomState(seed).permutation(n)
    return [items[i] for i in perm[n_test:]], [items[i] for i in perm[:n_test]]


def split_train_val(convs: Sequence[Conversation], *, val_fraction: float = 0.1, seed: int = 42,
                    method: str = "random") -> dict[str, list[Conversation]]:
    """Split by conversation.

    random: sort by id, ``numpy.random.default_rng(seed).permutation``, first ceil(fraction·n) are val
    (at least one conversation stays in train); both splits sorted by id.
    reference: the reference system's split, scikit-learn ``train_test_split(test_size=0.1, random_state=42)``
    twice in file order: first test part -> "reference_test", test part of the rest -> "val"; lists keep
    sklearn's permutation order.
    """
    convs = list(convs)
    if method == "reference":
        rest, ref_test = _sklearn_split(convs, val_fraction, seed)
        train, val = _sklearn_split(rest, val_fraction, seed)
        return {"train": train, "val": val, "reference_test": ref_test}
    if method != "random":
        raise ConfigError(f"unknown split method {method!r} (random | reference)")
    ordered = sorted(convs, key=lambda c: _id_order(c.id))
    n = len(ordered)
    n_val = min(math.ceil(val_fraction * n - 1e-9), max(n - 1, 0))
    val_idx = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    return {"train": [c for i, c in enumerate(ordered) if i not in val_idx],
            "val": [c for i, c in enumerate(ordered) if i in val_idx]}


# --------------------------------------------------------------------------- counts + prepare


def counts(convs: Iterable[Conversation]) -> dict:
    out = {"conversations": 0, "utterances": 0, "pairs": 0, "emotions": dict.fromkeys(EMOTIONS, 0)}
    for c in convs:
        out["conversations"] += 1
        out["utterances"] += len(c.utterances)
        out["pairs"] += len(c.pairs or ())
        for u in c.utterances:
            if u.emotion is not None:
                out["emotions"][u.emotion] += 1
    return out


def counts_table(by_split: dict[str, dict]) -> str:
    """Text table of ``counts`` per split: conversations, utterances, pairs and utterances per emotion."""
    names = list(by_split)
    rows = [(key, [by_split[s][key] for s in names]) for key in ("conversations", "utterances", "pairs")]
    rows += [(e, [by_split[s]["emotions"][e] for s in names]) for e in EMOTIONS]
    width = max(8, *(len(s) for s in names))
    lines = [f"{'':<14}" + "".join(f"{s:>{width + 1}}" for s in names)]
    lines += [f"{key:<14}" + "".join(f"{v:>{width + 1}}" for v in values) for key, values in rows]
    return "\n".join(lines)


def _dump(convs: Iterable[Conversation]) -> bytes:
    return storage.dumps_json([conversation_to_json(c) for c in convs], indent=4)


@dataclass(frozen=True)
class PrepareResult:
    """A prepared data folder: the counts of each split written (``splits``), the conversations and files set
    aside, and how many of those were training files (which fail the step)."""

    output: str
    splits: dict[str, dict]  # train, val (reference_test), (test) -> counts
    rejects: int
    file_errors: list[str]
    train_file_errors: int

    @property
    def rejects_file(self) -> str:
        return DataLayout(self.output).rejects

    def counts_json(self) -> dict:
        """The manifest's ``counts``: each split's, then what was set aside."""
        out = dict(self.splits)
        out.update({k: v for k, v in asdict(self).items() if k not in ("output", "splits")})
        return out


def prepare(train_uri: str | Sequence[str], test_uri: str | Sequence[str] | None, out_dir: str, *,
            split: str = "random", val_fraction: float = 0.1, seed: int = 42) -> PrepareResult:
    """Validate, split, write ``train/val/test.json`` (+ ``reference_test.json``), ``rejects.jsonl``, ``manifest.json``.

    Everything is rewritten on every run (no skipping on existence) and outputs a run does not produce are
    deleted, so stale files from other inputs or settings never survive; same inputs give identical bytes.
    ``manifest.json`` (inputs' sha256, settings, outputs' sha256, counts) is written last. Raises ``InputError``
    when no training conversation survives.
    """
    train = read_conversations(train_uri, require_labels=True)
    if not train.conversations:
        raise InputError(f"no valid training conversation in {train_uri} "
                         f"({len(train.rejects)} rejects, {len(train.file_errors)} file errors: "
                         f"{'; '.join(map(str, train.file_errors[:3]))})")
    test = read_conversations(test_uri, require_labels=True) if test_uri else None
    splits = split_train_val(train.conversations, val_fraction=val_fraction, seed=seed, method=split)
    if test is not None:
        splits["test"] = test.conversations

    outputs = {DataLayout.split_file(name): _dump(convs) for name, convs in splits.items()}
    problems = [{"input": role, **r.to_json()} for role, res in (("train", train), ("test", test)) if res
                for r in [*(e.as_reject() for e in res.file_errors), *res.rejects]]
    outputs[REJECTS_FILE] = storage.dumps_jsonl(problems)
    for name in map(DataLayout.split_file, ("test", "reference_test")):
        if name not in outputs:
            storage.delete(storage.join(out_dir, name))
    for name, blob in outputs.items():
        storage.write_bytes(storage.join(out_dir, name), blob)

    result = PrepareResult(out_dir, {name: counts(convs) for name, convs in splits.items()}, len(problems),
                           [str(e) for r in (train, test) if r for e in r.file_errors], len(train.file_errors))
    storage.write_json(DataLayout(out_dir).manifest, {
        "inputs": {"train": train.sources, "test": test.sources if test else {}},
        "settings": {"split": split, "val_fraction": val_fraction, "seed": seed},
        "outputs": {name: hashlib.sha256(blob).hexdigest() for name, blob in outputs.items()},
        "counts": result.counts_json(),
    }, indent=2)
    return result


# --------------------------------------------------------------------------- predictions


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
