"""Reading ECF conversations from files, one reader per format: a JSON array in the SemEval schema, JSON Lines (one
conversation per line), and the ECF 1.0 release's text format; each yields (location, raw conversation object |
``Reject``) for ``mecpe.data`` to validate, and ``read_conversations`` validates whole files and folders (local or
s3://). A file that cannot be read as a whole is a ``FileError``; undecodable bytes reject only their conversation.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Iterator, Sequence

from mecpe import storage
from mecpe.data import (
    BAD_UTF8, DIGITS, SURROGATE, Conversation, FileError, InvalidConversation, LoadResult, Reject, clean_text,
    conversation_from_json, quoted, video_name,
)

def _id_text(obj: Any) -> str | None:
    if isinstance(obj, dict) and obj.get("conversation_ID") is not None:
        return clean_text(str(obj["conversation_ID"]), 200)
    return None


def _has_surrogates(obj: Any) -> bool:
    """Lone surrogates come from undecodable bytes (surrogateescape) or \\udXXX escapes: not writable as UTF-8."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


# --------------------------------------------------------------------------- JSON array and JSON Lines


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
        reason = BAD_UTF8 if bad_bytes else f"invalid JSON: {clean_text(str(exc), 200)}"
        return location, Reject(source, location, None, reason, stage="read")
    if _has_surrogates(obj):
        return location, Reject(source, location, _id_text(obj), BAD_UTF8, stage="read")
    return location, obj


def record_from_line(line: bytes, location: str, source: str) -> tuple[str, Any]:
    """One JSON Lines line (undecoded bytes) -> (location, raw conversation object | Reject): invalid UTF-8 or JSON
    rejects only this line."""
    try:
        raw, bad = line.decode("utf-8"), False
    except UnicodeDecodeError:
        raw, bad = line.decode("utf-8", "surrogateescape"), True
    return _record(location, raw, bad, source)


# --------------------------------------------------------------------------- the ECF 1.0 text format

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
                                              f"{quoted(lines[n])}")
        cid, count = int(head.group(1)), int(head.group(2))
        pair_line = lines[n + 1].strip() if n + 1 < len(lines) else ""
        body = lines[n + 2:n + 2 + count]
        n += 2 + count
        utts, problem = [], None
        for k, line in enumerate(body):
            parts = [p.strip() for p in line.split(" | ")]
            if len(parts) < 4 or not DIGITS.fullmatch(parts[0]):
                problem = (f"utterance line {k + 1} is not '<utt> | <speaker> | <emotion> | <text> | <clip>': "
                           f"{quoted(line)}", f"conversation[{k}]")
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
            problem = (f"pair line is not '(<emotion utt>,<cause utt>),...': {quoted(pair_line)}",
                       "emotion-cause_pairs")
        if problem is not None:
            yield location, Reject(source, location, str(cid), problem[0], problem[1], stage="read")
            continue
        label = {u["utterance_ID"]: u["emotion"] for u in utts}
        pairs = [[f"{e}_{label.get(int(e), '?')}", c] for e, c in raw_pairs]
        yield location, {"conversation_ID": cid, "conversation": utts, "emotion-cause_pairs": pairs}


# --------------------------------------------------------------------------- any file


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
            yield location, Reject(source, location, _id_text(obj), BAD_UTF8, stage="read")
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
            rejects.append(Reject(source, location, clean_text(str(conv.id), 200),
                                  f"duplicate conversation_ID {quoted(conv.id)}: first seen in "
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


