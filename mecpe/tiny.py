"""The tiny local Llama-architecture model that stands in for Llama-2-13b-chat where no weights can be fetched (tests,
the CPU demo, the learnability check).

Built from a training file: a byte-level BPE tokenizer trained on its texts and the prompt vocabulary (so the prompt
words and each emotion label are compact tokens), and a small random-init ``LlamaForCausalLM`` with the same
architecture, chat template and special tokens as Llama-2-chat (``<s>``, ``</s>``, ``<unk>``, a separate ``<pad>``).
Deterministic: the same data and seed give the same files. Sizes are multiples of 64 so bitsandbytes' CPU NF4
kernels accept them.
"""

from __future__ import annotations

import os
import random
from typing import Sequence

import torch

from mecpe import data, prompts
from mecpe.modeling import PAD_TOKEN

# Llama-2-chat format; special tokens come from the tokenizer's variables, never literal text.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set sys = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
    "{% set messages = messages[1:] %}{% else %}{% set sys = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + (sys if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)
_SPECIALS = ["<unk>", "<s>", "</s>", PAD_TOKEN]  # ids 0..3


def _read(files: Sequence[str]) -> list[data.Conversation]:
    """Conversations of the training files (labels optional); an unreadable file is an error."""
    res = data.read_conversations(list(files))
    if res.file_errors:
        raise ValueError(f"cannot build the tiny model: {'; '.join(map(str, res.file_errors[:3]))}")
    if not res.conversations:
        raise ValueError(f"no conversations in {list(files)}")
    return res.conversations


def _tokenizer_corpus(convs: list, rng: random.Random, num_prompts: int = 300) -> list[str]:
    """Utterance texts and speakers, plus rendered prompts and targets so the prompt vocabulary
    ("utterance_", "::", the labels, "[INST]") gets compact tokens."""
    corpus = [u.text for c in convs for u in c.utterances] + sorted({u.speaker for c in convs for u in c.utterances})
    for conv in rng.sample(convs, min(num_prompts, len(convs))):
        utt = rng.choice(conv.utterances)
        emotions = {u.id: (u.emotion if u.emotion in data.EMOTIONS else "neutral") for u in conv.utterances}
        corpus.append("[INST] " + prompts.emotion_prompt_text(conv, utt.id) + " [/INST]")
        corpus.append("[INST] " + prompts.cause_prompt_text(conv, utt.id, emotions) + " [/INST]")
        corpus.append(prompts.emotion_target(utt.id, emotions[utt.id]))
        corpus.append(prompts.cause_target(sorted(rng.sample(range(1, len(conv.utterances) + 1),
                                                             rng.randint(0, min(3, len(conv.utterances)))))))
    corpus += [prompts.emotion_target(i, lab) for i in range(1, 40) for lab in data.EMOTIONS]
    return corpus


def build_tokenizer(convs: list, seed: int = 0, vocab_size: int = 2048):
    """Byte-level BPE trained on the conversations and the prompt vocabulary, Llama-2 special tokens and chat
    template; every emotion label is one token (after a space)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(_tokenizer_corpus(convs, random.Random(seed)), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    # Like Llama's tokenizer, plain encoding prepends <s> (prompts are built with add_special_tokens=False).
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bpe.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token=PAD_TOKEN, model_max_length=4096)
    tok.chat_template = LLAMA2_CHAT_TEMPLATE
    multi = [lab for lab in data.EMOTIONS if len(tok(" " + lab, add_special_tokens=False)["input_ids"]) != 1]
    if multi:
        raise RuntimeError(f"tiny tokenizer: labels {multi} are not single tokens; raise vocab_size")
    return tok


def build_tiny_model(out_dir: str, data_files: Sequence[str], seed: int = 0, vocab_size: int = 2048) -> str:
    """Tokenizer + a small random-init ``LlamaForCausalLM`` (~1.3M parameters), saved with ``save_pretrained`` to
    ``out_dir`` (a local folder). Returns ``out_dir``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    convs = _read(data_files)
    tok = build_tokenizer(convs, seed, vocab_size)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=384, max_position_embeddings=4096,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir
