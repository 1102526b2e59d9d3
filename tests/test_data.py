"""Tests for mecpe.data: real ECF counts, splits, prepare, every reject class, file errors, size, predictions.

The ECF data is read from MECPE_DATA (default ../shared/data/ecf); it is never copied into the repo.
Crafted bad inputs (tiny, made-up text) live in tests/fixtures/bad_inputs/.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from mecpe import data, readers, splits
from mecpe.config import DataConfig
from mecpe.data import FileError, InvalidConversation, Pair
from mecpe.labels import EMOTIONS

BAD = Path(__file__).parent / "fixtures" / "bad_inputs"
# the reference system's split of ECF's 1,374 training conversation ids (tests/fixtures/reference_split.py wrote it)
REFERENCE_SPLIT = Path(__file__).parent / "fixtures" / "reference_split_ids.json"
TRAIN = DataConfig().train_file  # the ECF 1.0 text a user downloads
TEST = "NUSTM_SemEval-2024_ECAC/data/Subtask_2_test.json"


@pytest.fixture(scope="session")
def train_file(data_dir) -> str:
    return str(data_dir / TRAIN)


@pytest.fixture(scope="session")
def test_file(data_dir) -> str:
    return str(data_dir / TEST)


def _ids(convs):
    return [c.id for c in convs]


# --------------------------------------------------------------------------- real data


def test_ecf_1_0_text_format_is_read_as_written(train_file, tmp_path):
    """``NUSTM/MECPE data/all_data_pair.txt`` (what a user downloads): ids, pairs (emotion from the emotion utterance),
    speaker, emotion, text and the clip's episode and times of each line, as the file writes them; ``prepare`` takes
    it as its training file."""
    res = readers.read_conversations(train_file, require_labels=True)
    assert not res.rejects and not res.file_errors
    first = res.conversations[0]
    assert first.id == 1 and len(first.utterances) == 8
    assert first.pairs[:3] == (Pair(3, "surprise", 1), Pair(3, "surprise", 3), Pair(4, first.utterances[3].emotion, 1))
    u1, u3 = first.utterances[0], first.utterances[2]
    assert (u1.id, u1.speaker, u1.emotion) == (1, "Chandler", "neutral")
    assert u1.text.startswith("Alright , so I am back in high school ,") and u1.text.endswith("totally naked .")
    assert u1.extra["video_source"] == ["S01E01", "00:01:19.037", "00:01:25.417"]
    assert (u3.speaker, u3.emotion, u3.text) == ("Chandler", "surprise",
                                                  "Then I look down , and I realize there is a phone ... there .")
    out = splits.prepare(train_file, None, str(tmp_path / "p"))
    assert out.splits["train"]["conversations"] + out.splits["val"]["conversations"] == 1374


def test_ecf_text_format_errors_name_the_line(tmp_path):
    good = "1 2\n(2,1)\n1 | Ross | neutral | Hi . | Friends_S1E1: 00:00:01.000 - 00:00:02.000\n" \
           "2 | Monica | joy | Yes ! | Friends_S1E1: 00:00:02.000 - 00:00:03.000\n"
    bad_pairs = "2 1\n(1,x)\n1 | Ross | joy | Hey . | Friends_S1E1: 00:00:04.000 - 00:00:05.000\n"
    bad_utt = "3 1\n\nnot an utterance\n"
    pair_on_neutral = "4 1\n(1,1)\n1 | Joey | neutral | Ok . | Friends_S1E1: 00:00:06.000 - 00:00:07.000\n"
    path = tmp_path / "ecf.txt"
    path.write_text(good + bad_pairs + bad_utt + pair_on_neutral)
    res = readers.read_conversations(str(path), require_labels=True)
    assert [c.id for c in res.conversations] == [1]
    assert res.conversations[0].pairs == (Pair(2, "joy", 1),)
    got = {r.conversation_id: (r.location, r.field) for r in res.rejects}
    assert got == {"2": ("line 5", "emotion-cause_pairs"), "3": ("line 8", "conversation[0]"),
                   "4": ("line 11", "emotion-cause_pairs[0]")}
    (tmp_path / "broken.txt").write_text(good + "x y\n")
    res = readers.read_conversations(str(tmp_path / "broken.txt"))
    assert [c.id for c in res.conversations] == [1]
    assert res.file_errors and "line 5" in str(res.file_errors[0]) and "<conversation_ID>" in str(res.file_errors[0])


def test_real_training_and_test_counts(train_file, test_file):
    train = readers.read_conversations(train_file, require_labels=True)
    assert (train.rejects, train.file_errors) == ([], [])
    c = splits.counts(train.conversations)
    assert (c["conversations"], c["utterances"], c["pairs"]) == (1374, 13619, 9794)
    assert c["utterances"] - c["emotions"]["neutral"] == 7690

    test = readers.read_conversations([test_file], require_labels=True)
    assert (test.rejects, test.file_errors) == ([], [])
    c = splits.counts(test.conversations)
    assert (c["conversations"], c["utterances"], c["pairs"]) == (341, 3101, 2462)
    assert c["emotions"] == {"neutral": 1280, "anger": 235, "disgust": 123, "fear": 151, "joy": 700,
                             "sadness": 249, "surprise": 363}


def test_round_trip_reproduces_the_gold_test_file(test_file):
    """Parsed and written back, the test file is the same JSON (key order and video_source included)."""
    original = json.loads(Path(test_file).read_bytes())
    convs, rejects = readers.parse_conversations(Path(test_file).read_bytes(), test_file, require_labels=True)
    assert rejects == []
    assert [data.conversation_to_json(c) for c in convs] == original
    assert list(original[0]["conversation"][0]) == list(data.conversation_to_json(convs[0])["conversation"][0])


def test_reference_split_matches_the_reference_ids(train_file):
    convs = readers.read_conversations(train_file, require_labels=True).conversations
    split = splits.split_train_val(convs, method="reference")
    expected = json.loads(REFERENCE_SPLIT.read_text())
    assert _ids(split["train"]) == expected["train"]  # same order too: sklearn's permutation order
    assert _ids(split["val"]) == expected["val"]
    assert _ids(split["reference_test"]) == expected["test"]
    assert [len(v) for v in split.values()] == [1112, 124, 138]


def test_random_split_is_seeded_disjoint_and_complete():
    convs = [_conv(i) for i in range(1, 201)] + [_conv("wild-id")]
    a = splits.split_train_val(list(reversed(convs)), val_fraction=0.1, seed=7)
    b = splits.split_train_val(convs, val_fraction=0.1, seed=7)
    assert _ids(a["train"]) == _ids(b["train"]) and _ids(a["val"]) == _ids(b["val"])  # input order irrelevant
    assert len(a["val"]) == 21 and not set(_ids(a["train"])) & set(_ids(a["val"]))
    assert sorted(map(str, _ids(a["train"]) + _ids(a["val"]))) == sorted(str(c.id) for c in convs)
    assert _ids(splits.split_train_val(convs, seed=8)["val"]) != _ids(a["val"])
    assert splits.split_train_val([_conv(1)])["train"] and not splits.split_train_val([_conv(1)])["val"]


def test_prepare_is_deterministic_and_splits_are_disjoint(tmp_path, train_file, test_file):
    outs = [tmp_path / "a", tmp_path / "b"]
    results = [splits.prepare(train_file, test_file, str(o), split="random", val_fraction=0.1, seed=42) for o in outs]
    splits.prepare(train_file, test_file, str(outs[0]), split="random", val_fraction=0.1, seed=42)  # same dir again
    names = ["train.json", "val.json", "test.json", "rejects.jsonl", "manifest.json"]
    assert sorted(p.name for p in outs[0].iterdir()) == sorted(names)
    for name in names:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    assert results[0].splits == results[1].splits
    assert (results[0].splits["train"]["conversations"], results[0].splits["val"]["conversations"]) == (1236, 138)
    assert results[0].splits["test"]["pairs"] == 2462 and results[0].rejects == 0

    written = {n: json.loads((outs[0] / f"{n}.json").read_text()) for n in ("train", "val", "test")}
    ids = {n: {c["conversation_ID"] for c in convs} for n, convs in written.items()}
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    assert ids["train"] | ids["val"] == set(range(1, 1375))
    for convs in written.values():
        for c in convs:
            for u in c["conversation"]:
                assert u["video_name"] == f"dia{c['conversation_ID']}utt{u['utterance_ID']}.mp4"
    manifest = json.loads((outs[0] / "manifest.json").read_text())
    assert manifest["settings"] == {"split": "random", "val_fraction": 0.1, "seed": 42}
    assert set(manifest["inputs"]["train"]) == {train_file}
    assert (outs[0] / "rejects.jsonl").read_bytes() == b""


def test_prepare_reference_then_random_removes_stale_outputs(tmp_path, train_file, test_file):
    out = tmp_path / "prep"
    result = splits.prepare(train_file, test_file, str(out), split="reference")
    ref = json.loads(REFERENCE_SPLIT.read_text())
    written = {n: [c["conversation_ID"] for c in json.loads((out / f"{n}.json").read_text())]
               for n in ("train", "val", "reference_test")}
    assert written == {"train": ref["train"], "val": ref["val"], "reference_test": ref["test"]}
    assert result.splits["reference_test"]["conversations"] == 138
    sha_before = json.loads((out / "manifest.json").read_text())["outputs"]["train.json"]

    splits.prepare(train_file, None, str(out), split="random")
    assert not (out / "reference_test.json").exists() and not (out / "test.json").exists()
    assert json.loads((out / "manifest.json").read_text())["outputs"]["train.json"] != sha_before


def _prepare_cli(train, out, *args):
    from mecpe.cli import main

    return main(["data", "prepare", "--train", str(train), "--out", str(out), *args])


def test_cli_prepare_prints_counts_and_returns_exit_codes(tmp_path, capsys):
    assert _prepare_cli(BAD / "pair_on_neutral.json", tmp_path / "ok", "--val-fraction", "0.5", "--seed", "1") == 0
    printed = capsys.readouterr().out
    assert "conversations" in printed and "surprise" in printed and "rejects: 1" in printed
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("duplicate_across_a.json", "not_json.json"):
        (mixed / name).write_bytes((BAD / name).read_bytes())
    assert _prepare_cli(mixed, tmp_path / "bad") == 2
    rejects = [json.loads(line) for line in (tmp_path / "bad" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["conversation_id"]) for r in rejects] == [("read", None)]  # the whole file
    assert "not_json.json" in rejects[0]["source"] and rejects[0]["input"] == "train"
    assert _prepare_cli(BAD / "not_json.json", tmp_path / "none") == 2
    assert "no valid training conversation" in capsys.readouterr().err


# --------------------------------------------------------------------------- rejects

# file -> (ids that still load, number of rejects, reason substring, field prefix)
REJECT_CASES = {
    "not_a_dict.json": ([1], 3, "not a JSON object", None),
    "missing_conversation_id.json": ([1], 1, "missing conversation_ID", "conversation_ID"),
    "mistyped_conversation_id.json": ([1], 5, "conversation_ID must be", "conversation_ID"),
    "missing_conversation.json": ([1], 1, "missing conversation", "conversation"),
    "mistyped_conversation.json": ([1], 2, "conversation must be a list", "conversation"),
    "empty_conversation.json": ([1], 1, "empty conversation", "conversation"),
    "utterance_not_dict.json": ([1], 1, "utterance 2 is not a JSON object", "conversation[1]"),
    "missing_utterance_id.json": ([1], 1, "missing utterance_ID", "conversation[1].utterance_ID"),
    "mistyped_utterance_id.json": ([1], 1, "utterance_ID must be an integer", "conversation[1].utterance_ID"),
    "missing_text.json": ([1], 1, "missing text", "conversation[1].text"),
    "mistyped_text.json": ([1], 1, "text must be a string", "conversation[1].text"),
    "missing_speaker.json": ([1], 1, "missing speaker", "conversation[1].speaker"),
    "mistyped_speaker.json": ([1], 1, "speaker must be a string", "conversation[1].speaker"),
    "duplicate_utterance_ids.json": ([1], 1, "duplicate utterance_ID 1", "conversation[1].utterance_ID"),
    "noncontiguous_utterance_ids.json": ([1], 3, "utterance ids must be 1..", "conversation"),
    "unknown_emotion.json": ([1], 3, "unknown emotion", "conversation[0].emotion"),
    "missing_emotion.json": ([1], 1, "missing emotion", "conversation[0].emotion"),
    "malformed_pair.json": ([1], 7, "malformed pair", "emotion-cause_pairs[0]"),
    "mistyped_pairs.json": ([1], 1, "emotion-cause_pairs must be a list", "emotion-cause_pairs"),
    "pair_outside_conversation.json": ([1], 3, "points outside the conversation", "emotion-cause_pairs[0]"),
    "pair_emotion_mismatch.json": ([1], 1, "disagrees with utterance 1's emotion 'joy'", "emotion-cause_pairs[0]"),
    "pair_on_neutral.json": ([1], 1, "on a neutral utterance", "emotion-cause_pairs[0]"),
    "duplicate_conversation_ids.json": ([1], 3, "duplicate conversation_ID 1: first seen in", "conversation_ID"),
    "broken_lines.jsonl": ([1, 3], 2, "", None),
    "invalid_utf8.jsonl": ([1, 3], 1, "invalid UTF-8", None),
    "invalid_utf8_array.json": ([1, 4], 2, "invalid UTF-8", None),
}


def test_every_fixture_file_is_covered():
    file_errors = {"not_json.json", "truncated_array.json", "top_level_number.json", "top_level_dict.json"}
    extra = {"control_chars.json", "duplicate_across_a.json", "duplicate_across_b.json"}
    assert {p.name for p in BAD.iterdir()} == set(REJECT_CASES) | file_errors | extra


@pytest.mark.parametrize("name", sorted(REJECT_CASES))
def test_reject_class(name):
    good_ids, n_rejects, reason, field = REJECT_CASES[name]
    source = str(BAD / name)
    result = readers.read_conversations(source, require_labels=True)
    assert result.file_errors == []
    assert _ids(result.conversations) == good_ids
    assert len(result.rejects) == n_rejects, result.rejects
    for r in result.rejects:
        assert r.source == source and reason in r.reason and r.location
        assert field is None or (r.field or "").startswith(field), r
        json.dumps(r.__dict__).encode("utf-8")  # a reject is always writable to rejects.jsonl


def test_reject_details():
    names = ("duplicate_conversation_ids.json", "broken_lines.jsonl", "invalid_utf8_array.json", "missing_emotion.json")
    by_name = {n: readers.read_conversations(str(BAD / n)).rejects for n in names}
    first = by_name["duplicate_conversation_ids.json"][0]
    assert first.location == "index 1" and first.conversation_id == "1" and "(index 0)" in first.reason
    assert [(r.location, r.reason[:14]) for r in by_name["broken_lines.jsonl"]] == \
        [("line 3", "invalid JSON: "), ("line 6", "conversation i")]
    assert [r.conversation_id for r in by_name["invalid_utf8_array.json"]] == ["2", "3"]
    assert by_name["missing_emotion.json"] == []  # emotions are only required with require_labels
    with pytest.raises(InvalidConversation) as exc:
        data.conversation_from_json({"conversation_ID": 1, "conversation": []}, source="x")
    assert (exc.value.reason, exc.value.field) == ("empty conversation", "conversation")


def test_control_characters_are_kept_and_escaped(tmp_path):
    convs, rejects = readers.parse_conversations((BAD / "control_chars.json").read_bytes(), "control_chars.json")
    assert rejects == [] and "\u0000" in convs[0].utterances[0].text and "\u0007" in convs[0].utterances[0].text
    splits.prepare(str(BAD / "control_chars.json"), None, str(tmp_path), split="random", val_fraction=0.0)
    raw = (tmp_path / "train.json").read_bytes()
    assert b"\\u0000" in raw and b"\x00" not in raw
    assert json.loads(raw)[0]["conversation"][0]["text"] == convs[0].utterances[0].text


@pytest.mark.parametrize("name, position, message", [
    ("not_json.json", "1:1", "not valid JSON"),
    ("truncated_array.json", ":", "not valid JSON"),
    ("top_level_number.json", "1:1", "top level is a JSON int"),
    ("top_level_dict.json", "1:1", "top level is a JSON object"),
])
def test_file_errors(name, position, message):
    with pytest.raises(FileError) as exc:
        readers.parse_conversations((BAD / name).read_bytes(), name)
    err = exc.value
    assert err.source == name and position in err.position and message in err.message
    assert str(err).startswith(f"{name}:") and "\n" not in str(err)


def test_read_conversations_records_file_errors_and_continues(tmp_path):
    result = readers.read_conversations([str(BAD / "truncated_array.json"), str(BAD / "duplicate_across_a.json"),
                                      str(tmp_path / "missing.json")])
    assert _ids(result.conversations) == [1, 2] and result.rejects == []
    assert [e.source.rsplit("/", 1)[-1] for e in result.file_errors] == ["truncated_array.json", "missing.json"]


def test_duplicate_ids_across_files():
    a, b = str(BAD / "duplicate_across_a.json"), str(BAD / "duplicate_across_b.json")
    result = readers.read_conversations([a, b])
    assert _ids(result.conversations) == [1, 2, 3]
    assert [c.source for c in result.conversations] == [a, a, b]
    (r,) = result.rejects
    assert r.source == b and r.conversation_id == "2" and a in r.reason


def test_jsonl_and_folder_input(tmp_path):
    lines = [json.dumps(_conv_json(i)) for i in (5, 6)]
    (tmp_path / "part-1.jsonl").write_text("\n".join(lines) + "\n\n")
    (tmp_path / "part-0.data").write_text(json.dumps(_conv_json(4)) + "\n")  # detected by content: starts with {
    (tmp_path / "_SUCCESS.json").write_text("junk")  # hidden: skipped
    result = readers.read_conversations([str(tmp_path / "part-1.jsonl"), str(tmp_path / "part-0.data")])
    assert _ids(result.conversations) == [5, 6, 4] and result.rejects == []
    assert _ids(readers.read_conversations(str(tmp_path)).conversations) == [5, 6]  # folder: .json/.jsonl only


def test_size_is_never_a_reason_to_reject(tmp_path):
    long_conv = _conv_json(1, n=10_000)
    big_text = _conv_json(2)
    big_text["conversation"][0]["text"] = "blah " * 200_000  # 1 MB utterance
    path = tmp_path / "big.json"
    path.write_text(json.dumps([long_conv, big_text]))
    start = time.perf_counter()
    result = readers.read_conversations(str(path), require_labels=True)
    assert time.perf_counter() - start < 5
    assert result.rejects == [] and [len(c.utterances) for c in result.conversations] == [10_000, 3]
    assert len(result.conversations[1].utterances[0].text) == 1_000_000
    assert data.conversation_to_json(result.conversations[0])["conversation"][-1]["video_name"] == "dia1utt10000.mp4"


# --------------------------------------------------------------------------- records + predictions


def test_ids_extra_fields_and_accessors():
    obj = _conv_json("0042")
    obj["conversation"][0]["video_source"] = ["S01E01", "00:00:01.000", "00:00:02.000"]
    obj["conversation"][0]["video_name"] = "stale.mp4"
    conv = data.conversation_from_json(obj, source="s")
    assert conv.id == 42 and conv.utterances[0].extra == {"video_source": obj["conversation"][0]["video_source"]}
    out = data.conversation_to_json(conv)
    assert list(out["conversation"][0]) == ["utterance_ID", "text", "speaker", "emotion", "video_source", "video_name"]
    assert out["conversation"][0]["video_name"] == "dia42utt1.mp4"
    assert conv.emotions() == {1: "joy", 2: "surprise", 3: "neutral"} and conv.causes_of(1) == [1]
    assert conv.causes_of(3) == [] and conv.pairs == (Pair(1, "joy", 1), Pair(2, "surprise", 1))
    wild = data.conversation_from_json(_conv_json("../weird id/ü"), source="s")
    assert wild.id == "../weird id/ü" and data.conversation_from_json(_conv_json(" "), source="s").id == " "
    unlabelled = data.conversation_from_json({"conversation_ID": 3, "conversation": [
        {"utterance_ID": 1, "text": "hi", "speaker": "A"}]}, source="s")
    assert unlabelled.pairs is None and "emotion-cause_pairs" not in data.conversation_to_json(unlabelled)
    pred = data.conversation_to_json(unlabelled, emotions={1: "joy"}, pairs=[(1, "joy", 1)])
    assert pred["conversation"][0]["emotion"] == "joy" and pred["emotion-cause_pairs"] == [["1_joy", "1"]]


def test_write_predictions_official_format(tmp_path):
    records = []
    for cid in (10, 9, 100):
        rec = data.conversation_to_json(data.conversation_from_json(_conv_json(cid), source="s"))
        rec["conversation"][0]["parse_status"] = "ok"  # not official: dropped
        records.append(rec)
    out = tmp_path / "Subtask_2_pred.json"
    data.write_predictions(records, str(out))
    raw = out.read_text()
    pred = json.loads(raw)
    assert [c["conversation_ID"] for c in pred] == [9, 10, 100]
    assert list(pred[0]) == ["conversation_ID", "conversation", "emotion-cause_pairs"]
    assert list(pred[0]["conversation"][0]) == ["utterance_ID", "text", "speaker", "emotion", "video_name"]
    assert pred[0]["emotion-cause_pairs"] == [["1_joy", "1"], ["2_surprise", "1"]]
    assert raw.startswith('[\n    {\n        "conversation_ID": 9,')
    with pytest.raises(ValueError, match="duplicate"):
        data.write_predictions(records + records[:1], str(out))


def test_counts_table_lists_every_emotion():
    table = splits.counts_table({"train": splits.counts([_conv(1)]), "val": splits.counts([])})
    lines = table.splitlines()
    assert "train" in lines[0] and "val" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == ["conversations", "utterances", "pairs", *EMOTIONS]
    assert lines[1].split()[1:] == ["1", "0"] and lines[2].split()[1:] == ["3", "0"]


def _conv_json(cid, n=3):
    emotions = ["joy", "surprise", "neutral"] + ["neutral"] * (n - 3)
    return {"conversation_ID": cid,
            "conversation": [{"utterance_ID": i + 1, "text": f"line {i + 1} .", "speaker": "AB"[i % 2],
                              "emotion": emotions[i]} for i in range(n)],
            "emotion-cause_pairs": [["1_joy", "1"], ["2_surprise", "1"]]}


def _conv(cid):
    return data.conversation_from_json(_conv_json(cid), source="mem")
