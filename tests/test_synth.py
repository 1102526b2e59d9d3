"""Tests for mecpe.synth: the synthetic corpus is valid ECF Subtask 2 data, deterministic, and follows its rules."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from mecpe import data, readers, storage, synth


@pytest.fixture(scope="module")
def corpus():
    return synth.generate(400, 100, seed=0)


def _bytes(records) -> bytes:
    return storage.dumps_json(records)


def test_format_validates_with_zero_rejects(corpus):
    for name, recs in zip(("train", "test"), corpus):
        convs, rejects = readers.parse_conversations(_bytes(recs), f"synth-{name}", require_labels=True)
        assert rejects == []
        assert len(convs) == len(recs)
        # parsed and written back: the same records (schema and key order of the real data)
        assert [data.conversation_to_json(c) for c in convs] == recs


def test_same_seed_same_bytes_other_seed_differs():
    a, b = synth.generate(50, 20, seed=3), synth.generate(50, 20, seed=3)
    assert _bytes(a[0]) + _bytes(a[1]) == _bytes(b[0]) + _bytes(b[1])
    assert _bytes(synth.generate(50, 20, seed=4)[0]) != _bytes(a[0])


def test_ids_disjoint_and_consecutive(corpus):
    train, test = corpus
    assert [r["conversation_ID"] for r in train] == list(range(1, 401))
    assert [r["conversation_ID"] for r in test] == list(range(401, 501))


def test_rules_hold_on_every_conversation(corpus):
    lengths = set()
    for rec in corpus[0] + corpus[1]:
        cid, utts = rec["conversation_ID"], rec["conversation"]
        lengths.add(len(utts))
        assert synth.MIN_UTTERANCES <= len(utts) <= synth.MAX_UTTERANCES
        want_pairs = []
        for k, u in enumerate(utts, start=1):
            assert u["utterance_ID"] == k
            assert u["speaker"] in synth.SPEAKERS
            assert u["video_name"] == f"dia{cid}utt{k}.mp4"
            words = u["text"].rstrip(".").split()
            assert synth.MIN_WORDS <= len(words) <= synth.MAX_WORDS
            assert all(w in synth.NEUTRAL_WORDS or w in synth.CUE_TO_EMOTION for w in words)
            cues = synth.cue_words(u["text"])
            if u["emotion"] == "neutral":
                assert cues == []
            else:
                assert len(cues) == 1 and synth.CUE_TO_EMOTION[cues[0]] == u["emotion"]
                assert words[0] not in synth.CUE_TO_EMOTION  # the cue is never the first word
                want_pairs += [[f"{k}_{u['emotion']}", str(c)] for c in synth.expected_causes(k)]
        assert rec["emotion-cause_pairs"] == want_pairs
        for (emo, cause) in rec["emotion-cause_pairs"]:
            assert 1 <= int(cause) <= int(emo.split("_")[0])  # causes at or before the target
    assert len(lengths) >= 5  # several conversation lengths


def test_most_emotional_utterances_have_two_causes(corpus):
    causes = Counter()
    for rec in corpus[0]:
        for emo, _ in rec["emotion-cause_pairs"]:
            causes[(rec["conversation_ID"], emo)] += 1
    assert sum(n >= 2 for n in causes.values()) / len(causes) > 0.8


@pytest.mark.parametrize("split", [0, 1])
def test_neutral_share_and_every_emotion_present(corpus, split):
    counts = Counter(u["emotion"] for r in corpus[split] for u in r["conversation"])
    assert set(counts) == set(data.EMOTIONS)
    share = counts["neutral"] / sum(counts.values())
    assert 0.5 <= share <= 0.65, share


def test_write_corpus_writes_both_files(tmp_path):
    counts = synth.write_corpus(str(tmp_path), num_train=20, num_test=5, seed=1)
    assert counts["train"]["conversations"] == 20 and counts["test"]["conversations"] == 5
    train, test = synth.generate(20, 5, seed=1)
    assert json.loads((tmp_path / "train.json").read_bytes()) == train
    assert (tmp_path / "test.json").read_bytes() == storage.dumps_json(test)
    res = readers.read_conversations(str(tmp_path), require_labels=True)
    assert (res.rejects, res.file_errors, len(res.conversations)) == ([], [], 25)


def test_rules_text_names_every_cue_word():
    for words in synth.CUES.values():
        for w in words:
            assert w in synth.RULES


def test_write_corpus_to_s3(s3_server):
    uri = f"s3://{s3_server['bucket']}/synth"
    counts = synth.write_corpus(uri, num_train=5, num_test=2, seed=0)
    assert counts["test"]["uri"] == f"{uri}/test.json"
    assert storage.read_json(f"{uri}/train.json") == synth.generate(5, 2, seed=0)[0]


def test_cli_data_synth(tmp_path, capsys):
    from mecpe.cli import main

    assert main(["data", "synth", "--out", str(tmp_path), "--train", "6", "--test", "3", "--seed", "5"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["train"]["conversations"] == 6 and counts["test"]["conversations"] == 3
    assert json.loads((tmp_path / "test.json").read_text()) == synth.generate(6, 3, seed=5)[1]
