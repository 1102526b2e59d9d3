"""The corpus benchmark's own checks (bench/ecf_corpus.py, bench/bench_corpus.py, bench/limits.py), on files alone:
the corpus ids, the exactly-once check that must fail when a conversation is missing or repeated, the agreement
with the 1x run and the parameter count. No model, no Ray: the benchmark itself is a script, run by hand."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_corpus  # noqa: E402
import ecf_corpus  # noqa: E402
import limits  # noqa: E402

DATA = os.environ.get("MECPE_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data" / "ecf"))
needs_data = pytest.mark.skipif(not os.path.exists(os.path.join(DATA, ecf_corpus.TEST_FILE)), reason="no ECF data")


@needs_data
def test_corpus_has_new_ids_and_real_lengths(tmp_path):
    counts = ecf_corpus.write_corpus(DATA, 2, str(tmp_path / "c.jsonl"))
    assert counts["conversations"] == 682 and counts["utterances"] == 6202
    ids = ecf_corpus.input_ids(str(tmp_path / "c.jsonl"))
    official = {str(c["conversation_ID"]) for c in ecf_corpus.test_conversations(DATA)}
    assert len(set(ids)) == 682 and not set(ids) & official
    assert ecf_corpus.original_id(int(ids[341])) == (2, int(ids[0]) - ecf_corpus.ID_STRIDE)


def _output(folder: Path, pred_ids, reject_ids) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    pred = [{"conversation_ID": i, "conversation": [{"utterance_ID": 1, "emotion": "joy"}, {"utterance_ID": 2,
                                                                                         "emotion": "neutral"}],
             "emotion-cause_pairs": [["1_joy", "1"], ["1_joy", "2"]]} for i in pred_ids]
    (folder / ecf_corpus.PRED_FILE).write_text(json.dumps(pred))
    (folder / ecf_corpus.REJECTS_FILE).write_text("".join(json.dumps({"conversation_id": str(i)}) + "\n"
                                                          for i in reject_ids))
    return str(folder)


def test_check_output_needs_every_conversation_exactly_once(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"conversation_ID": i, "conversation": []}) + "\n" for i in (1, 2, 3)))
    assert ecf_corpus.check_output(str(corpus), _output(tmp_path / "ok", [1, 3], [2]))["ok"]
    missing = ecf_corpus.check_output(str(corpus), _output(tmp_path / "missing", [1], [2]))
    assert not missing["ok"] and missing["missing"] == 1
    twice = ecf_corpus.check_output(str(corpus), _output(tmp_path / "twice", [1, 2, 3], [2]))
    assert not twice["ok"] and twice["more_than_once"] == 1


def test_agreement_compares_copy_one_with_the_1x_run(tmp_path):
    x1 = _output(tmp_path / "x1", [1375, 1376], [])
    corpus = _output(tmp_path / "corpus", [100_000 + 1375, 100_000 + 1376, 200_000 + 1375], [])
    pred = json.loads(Path(corpus, ecf_corpus.PRED_FILE).read_text())
    pred[1]["conversation"][0]["emotion"] = "anger"  # one of four utterances of copy 1 differs
    Path(corpus, ecf_corpus.PRED_FILE).write_text(json.dumps(pred))
    ag = bench_corpus.agreement(x1, corpus)
    assert ag == {"utterances_compared": 4, "missing": 0, "emotion_equal": 0.75, "causes_equal": 1.0}


def test_model_shape_counts_smollm2_parameters():
    smollm2 = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
               "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True}
    shape = limits.model_shape(smollm2)
    assert shape["params"] == 134_515_008  # SmolLM2-135M's published count
    assert limits.stage_flops(shape, {"computed_tokens": 10, "generated_tokens": 0}) == \
        20 * shape["non_embedding_params"]


def test_saved_adapters_hold_the_asked_ensemble(tmp_path):
    """``--emotion-members N``: adapters saved by an earlier call are reused only when they are N emotion adapters
    (members by the pipeline's seeds) and a cause adapter, all still on disk; the inference then averages them."""
    dirs = {name: tmp_path / name for name in ("e", "c", "e1", "e2")}
    for d in dirs.values():
        d.mkdir()
    saved = {"emotion": str(dirs["e"]), "cause": str(dirs["c"]), "emotion_ensemble": [str(dirs["e1"]), str(dirs["e2"])]}
    Path(bench_corpus.adapters_file(str(tmp_path))).write_text(json.dumps(saved))
    assert bench_corpus.saved_adapters(str(tmp_path), 3) == saved
    assert bench_corpus.saved_adapters(str(tmp_path), 1) is None  # another ensemble: train again
    dirs["e2"].rmdir()
    assert bench_corpus.saved_adapters(str(tmp_path), 3) is None  # the machine lost one
    assert bench_corpus.member_seeds(bench_corpus.CONFIG, ["training.seed=2"], 3) == [1002, 2002]

    class Args:
        set, actors, num_gpus, max_batch_tokens, batch_size = [], 1, 1.0, 1024, 8

    assert f"inference.emotion_ensemble=[{dirs['e1']},{dirs['e2']}]" in bench_corpus.infer_overrides(Args, saved)
    assert "inference.emotion_ensemble=[]" in bench_corpus.infer_overrides(Args, {"emotion": "e", "cause": "c"})
