"""Real tokenizers through prompt building, training labels and answer parsing.

SmolLM2-135M-Instruct (ChatML; its GGUF reads with ``<|im_start|>`` as EOS under transformers 5.17 and with
pad = EOS under 5.24) and a tokenizer with Llama-2's special tokens and no pad token at all. EOS must be the token
that ends an assistant turn, PAD an existing token that is neither EOS nor written by the template, the loss must
cover the answer and its EOS and nothing else, and every target must parse back to itself."""

from __future__ import annotations

import json
import os

import pytest

from mecpe import modeling
from mecpe.prompts import PromptBuilder, cause_target, emotion_target, parse_causes, parse_emotion
from mecpe.train.examples import TASKS, build_examples, build_packed_rows

from _tiny import conversations, llama2_like_model, smollm2_dir


@pytest.fixture(scope="module")
def smol():
    return modeling.load_tokenizer(smollm2_dir())


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return llama2_like_model(str(tmp_path_factory.mktemp("llama2-like")))


def _resaved(src: str, dest, **special) -> str:
    """The tokenizer of ``src`` saved again with its special tokens set as some transformers version reads them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    for key, value in special.items():
        setattr(tok, key, value)
    tok.save_pretrained(dest)
    return str(dest)


def test_smollm2_eos_ends_the_assistant_turn_and_pad_is_an_existing_token(smol, tmp_path):
    assert smol.eos_token == "<|im_end|>" and smol.pad_token == "<|endoftext|>"
    assert len(smol) == 49152  # nothing added: the embedding matrix keeps its size
    turn = smol.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}],
                                    tokenize=False)
    assert "ok<|im_end|>" in turn
    # as transformers 5.17 reads the GGUF (EOS <|im_start|>, no pad) and as 5.24 does (pad = EOS)
    for variant, special in (("517", {"eos_token": "<|im_start|>", "pad_token": None}),
                             ("524", {"eos_token": "<|im_end|>", "pad_token": "<|im_end|>"})):
        fixed = modeling.load_tokenizer(_resaved(smollm2_dir(), tmp_path / variant, **special))
        assert (fixed.eos_token, fixed.pad_token, len(fixed)) == ("<|im_end|>", "<|endoftext|>", 49152), variant


def test_llama2_case_pads_with_unk_without_growing_the_vocabulary(llama_dir):
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(llama_dir)
    assert raw.pad_token is None
    tok = modeling.load_tokenizer(llama_dir)
    assert (tok.eos_token, tok.pad_token, len(tok)) == ("</s>", "<unk>", len(raw))


def test_no_safe_token_adds_pad(tmp_path):
    tok = modeling.load_tokenizer(llama2_like_model(str(tmp_path / "m"), specials=("<s>", "</s>")))
    assert tok.pad_token == "<pad>" and tok.pad_token_id not in (tok.eos_token_id, tok.bos_token_id)


@pytest.mark.parametrize("which", ["smollm2", "llama2-like"])
def test_prompts_labels_and_parsing(which, smol, llama_dir):
    """Every training target, tokenized on its own and packed: the labels are exactly the answer and EOS, the prompt
    ends with the template's assistant header, and decoding the answer parses back to the gold label or causes."""
    tok = smol if which == "smollm2" else modeling.load_tokenizer(llama_dir)
    builder = PromptBuilder(tok, 384)  # long conversations get shortened around the target
    convs = conversations(12)
    by_id = {str(c.id): c for c in convs}
    tail = tok.decode(builder.tail)
    for task in TASKS:
        rows, stats = build_examples(task, convs, builder)
        assert stats["examples"] == len(rows) > 10 and stats["shortened_prompts"] > 0
        answers = []
        for row in rows:
            conv = by_id[row["conv_id"]]
            n = sum(lab != -100 for lab in row["labels"])
            learned, prompt = row["input_ids"][-n:], row["input_ids"][:-n]
            assert row["labels"] == [-100] * len(prompt) + learned
            assert learned[-1] == tok.eos_token_id and tok.eos_token_id not in learned[:-1]
            assert tok.pad_token_id not in row["input_ids"]
            assert tok.decode(prompt).endswith(tail)
            text = tok.decode(learned[:-1])
            if task == "emotion":
                gold = next(u.emotion for u in conv.utterances if u.id == row["utt_id"])
                assert text == emotion_target(row["utt_id"], gold)
                assert parse_emotion(text, row["utt_id"]) == (gold, "ok")
            else:
                gold = sorted(conv.causes_of(row["utt_id"]))
                assert text == cause_target(gold)
                assert parse_causes(text, len(conv.utterances)) == (gold, "ok")
            answers.append(learned)
        # packed rows train on the same answers
        packed, pstats = build_packed_rows(task, convs, builder)
        assert pstats["computed_tokens"] < pstats["example_tokens"] == stats["example_tokens"]
        got = []
        for r in packed:
            ids, labels, owner = r["input_ids"], r["labels"], r["block_ids"]
            for k in sorted(set(owner) - {-1}):
                got.append([t for t, lab, o in zip(ids, labels, owner) if o == k and lab != -100])
        assert sorted(got) == sorted(answers)


def test_label_answers_are_distinct_after_their_common_start(smol):
    """Emotion scoring compares the seven answers token by token after their common start."""
    from mecpe.labels import EMOTIONS

    builder = PromptBuilder(smol)
    answers = [builder.emotion_answer(7, lab) for lab in EMOTIONS]
    assert len({tuple(a) for a in answers}) == 7
    common = os.path.commonprefix(answers)
    assert smol.decode(common).startswith("utterance_7 ::")
    assert all(a[len(common):] for a in answers)


def test_converted_folder_records_what_it_came_from():
    marker = json.loads(open(os.path.join(smollm2_dir(), ".mecpe_complete"), encoding="utf-8").read())
    assert marker["gguf"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and len(marker["sha256"]) == 64
    assert marker["eos_token"] == "<|im_end|>"
    assert os.path.basename(smollm2_dir()) == f"gguf-{marker['sha256'][:16]}"
