"""The tiny model builder: recap pretraining text, a pretrained base that learned something, the build record, and a
pipeline that refuses to reuse a tiny model built with other settings."""

from __future__ import annotations

import json
import math

import pytest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from mecpe import synth

    out = tmp_path_factory.mktemp("synth")
    synth.write_corpus(str(out), num_train=40, num_test=4, seed=3)
    return out


def test_recap_sequences_repeat_each_line_once_more(corpus):
    from mecpe import prompts, readers
    from mecpe.tiny import build_tokenizer, recap_sequences

    convs = readers.read_conversations([str(corpus / "train.json")]).conversations
    tok = build_tokenizer(convs)
    seqs = recap_sequences(tok, convs, seed=0)
    builder = prompts.PromptBuilder(tok, 1 << 30)
    start = len(builder.head) + len(builder.intro["emotion"])
    shuffled = 0
    for conv, seq in zip(convs, seqs):
        lines = [prompts.emotion_block(u) for u in conv.utterances]
        assert seq[:start] == builder.head + builder.intro["emotion"] and seq[-1] == tok.eos_token_id
        text = tok.decode(seq[start:-1])
        assert text.startswith("".join(lines))  # the conversation as the prompts show it
        recap = text[len("".join(lines)):].splitlines(keepends=True)
        assert sorted(recap) == sorted(lines)  # then every line once more
        shuffled += recap != lines
    assert shuffled > len(convs) // 2


def test_pretraining_lowers_the_loss_and_is_recorded(corpus, tmp_path):
    from mecpe.tiny import BUILD_FILE, build_tiny_model

    out = build_tiny_model(str(tmp_path / "tiny"), [str(corpus / "train.json")], num_layers=2, output_scale=10.0,
                           pretrain_steps=30)
    built = json.loads((tmp_path / "tiny" / BUILD_FILE).read_text())
    assert built["num_layers"] == 2 and built["output_scale"] == 10.0 and built["pretrain_steps"] == 30
    assert built["pretraining"]["final_loss"] < 0.6 * math.log(built["vocab_size"])  # a random model: > log(vocab)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2


def test_pipeline_refuses_a_tiny_model_built_otherwise(corpus, tmp_path):
    from mecpe.config import load_config
    from mecpe.pipeline import ensure_model
    from mecpe.tiny import build_tiny_model

    build_tiny_model(str(tmp_path / "tiny"), [str(corpus / "train.json")], num_layers=2)
    base = [f"model.base={tmp_path}/tiny", "model.build_tiny_if_missing=true", f"data.data_dir={corpus}",
            "data.train_file=train.json"]
    ensure_model(load_config(None, base + ["model.tiny.num_layers=2"]))  # same recipe: reused
    with pytest.raises(ValueError, match="model.tiny"):
        ensure_model(load_config(None, base + ["model.tiny.pretrain_steps=5", "model.tiny.num_layers=2"]))
