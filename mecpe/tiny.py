"""The tiny local Llama-architecture model that stands in for Llama-2-13b-chat where no weights can be fetched (tests,
the CPU demo, the learnability check).

Built from a training file: a byte-level BPE tokenizer trained on its texts and the prompt vocabulary (so the prompt
words and each emotion label are compact tokens), and a small random-init ``LlamaForCausalLM`` with the same
architecture, chat template and special tokens as Llama-2-chat (``<s>``, ``</s>``, ``<unk>``, a separate ``<pad>``).
Deterministic: the same data and seed give the same files. Sizes are multiples of 64 so bitsandbytes' CPU NF4
kernels accept them.

A random base cannot be taught the task by LoRA alone (measured on the synthetic corpus, ``mecpe.synth``): the
output layer stays frozen under LoRA (trl refuses adapters on it), and at init std 0.02 x hidden 128 it caps every
logit near +-2.6, so no answer can become confident; and adapters on a random base stay at the class prior. A real
base model is pretrained, so this one can be too, on the training file's text only: ``output_scale`` widens the
frozen output layer, and ``pretrain_steps`` of *recap* pretraining (a conversation, then its utterance lines again in
shuffled order) form the look-up of a line by its id that the questions need.
"""

from __future__ import annotations

import logging
import os
import random
import time
from typing import Sequence

import torch

from mecpe import data, prompts, readers, storage
from mecpe.errors import InputError
from mecpe.labels import EMOTIONS
from mecpe.special_tokens import PAD_TOKEN

log = logging.getLogger("mecpe.tiny")
BUILD_FILE = "mecpe_tiny.json"  # how the model was built (sizes, seed, pretraining figures), next to config.json

# Llama-2-chat format; special tokens come from the tokenizer's variables, never literal text.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set sys = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
    "{% set messages = messages[1:] %}{% else %}{% set sys = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + (sys if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)
_SPECIALS = ("<unk>", "<s>", "</s>", PAD_TOKEN)  # ids 0..3


def _read(files: Sequence[str]) -> list[data.Conversation]:
    """Conversations of the training files (labels optional); an unreadable file is an error."""
    res = readers.read_conversations(list(files))
    if res.file_errors:
        raise InputError(f"cannot build the tiny model: {'; '.join(map(str, res.file_errors[:3]))}")
    if not res.conversations:
        raise InputError(f"no conversations in {list(files)}")
    return res.conversations


def _tokenizer_corpus(convs: list, rng: random.Random, num_prompts: int = 300) -> list[str]:
    """Utterance texts and speakers, plus rendered prompts and targets so the prompt vocabulary
    ("utterance_", "::", the labels, "[INST]") gets compact tokens."""
    corpus = [u.text for c in convs for u in c.utterances] + sorted({u.speaker for c in convs for u in c.utterances})
    for conv in rng.sample(convs, min(num_prompts, len(convs))):
        utt = rng.choice(conv.utterances)
        emotions = {u.id: (u.emotion if u.emotion in EMOTIONS else "neutral") for u in conv.utterances}
        corpus.append("[INST] " + prompts.emotion_prompt_text(conv, utt.id) + " [/INST]")
        corpus.append("[INST] " + prompts.cause_prompt_text(conv, utt.id, emotions) + " [/INST]")
        corpus.append(prompts.emotion_target(utt.id, emotions[utt.id]))
        corpus.append(prompts.cause_target(sorted(rng.sample(range(1, len(conv.utterances) + 1),
                                                             rng.randint(0, min(3, len(conv.utterances)))))))
    corpus += [prompts.emotion_target(i, lab) for i in range(1, 40) for lab in EMOTIONS]
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
        vocab_size=vocab_size, special_tokens=list(_SPECIALS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    # Like Llama's tokenizer, plain encoding prepends <s> (prompts are built with add_special_tokens=False).
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bpe.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token=PAD_TOKEN, model_max_length=4096)
    tok.chat_template = LLAMA2_CHAT_TEMPLATE
    multi = [lab for lab in EMOTIONS if len(tok(" " + lab, add_special_tokens=False)["input_ids"]) != 1]
    if multi:
        raise RuntimeError(f"tiny tokenizer: labels {multi} are not single tokens; raise vocab_size")
    return tok


def recap_sequences(tokenizer, convs: Sequence[data.Conversation], seed: int = 0) -> list[list[int]]:
    """Pretraining text: each conversation as the emotion prompt shows it (chat head, intro, one line per utterance),
    then the same lines again in shuffled order, then EOS. Predicting a repeated line needs a look-up of the earlier
    line with the same id: the retrieval both questions need. No questions, no answers, no labels."""
    builder = prompts.PromptBuilder(tokenizer, max_prompt_tokens=1 << 30)
    rng = random.Random(seed)
    seqs = []
    for conv in convs:
        _, blocks = builder.blocks(conv)
        order = list(range(len(blocks)))
        rng.shuffle(order)
        seqs.append(builder.head + builder.intro["emotion"] + [t for b in blocks for t in b]
                    + [t for k in order for t in blocks[k]] + [tokenizer.eos_token_id])
    return seqs


def pretrain(model, tokenizer, seqs: list[list[int]], steps: int, seed: int = 0, batch_size: int = 16,
             learning_rate: float = 3e-3) -> dict:
    """Causal-LM training of everything but the output layer (kept frozen as LoRA will keep it, so tokens absent
    from this text, such as the answer labels, stay reachable). AdamW, 5% warm-up then cosine, clip 1.0; batches
    drawn in a seeded order. Returns the figures of the run."""
    from transformers import DataCollatorForLanguageModeling, get_cosine_schedule_with_warmup

    collate = DataCollatorForLanguageModeling(tokenizer, mlm=False)  # pads; labels = ids with padding ignored
    model.lm_head.weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=learning_rate, betas=(0.9, 0.98), weight_decay=0.01)
    sched = get_cosine_schedule_with_warmup(opt, max(1, round(0.05 * steps)), steps)
    rng = random.Random(seed)
    order: list[int] = []
    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        if len(order) < batch_size:
            more = list(range(len(seqs)))
            rng.shuffle(more)
            order += more
        idx, order = order[:batch_size], order[batch_size:]
        loss = model(**collate([{"input_ids": seqs[i]} for i in idx])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0 or step == steps:
            log.info("tiny model pretraining: step %d/%d, loss %.3f", step, steps, sum(losses[-50:]) / len(losses[-50:]))
    model.lm_head.weight.requires_grad_(True)
    model.eval()
    tail = losses[-20:]
    return {"steps": steps, "sequences": len(seqs), "batch_size": batch_size, "learning_rate": learning_rate,
            "final_loss": round(sum(tail) / max(1, len(tail)), 4), "seconds": round(time.perf_counter() - t0, 1)}


def build_tiny_model(out_dir: str, data_files: Sequence[str], seed: int = 0, vocab_size: int = 2048,
                     num_layers: int = 4, output_scale: float = 1.0, pretrain_steps: int = 0) -> str:
    """Tokenizer + a small random-init ``LlamaForCausalLM`` (hidden 128, ~1M parameters at 4 layers), its output
    layer scaled by ``output_scale``, then ``pretrain_steps`` of recap pretraining on ``data_files`` (0 = none);
    saved with ``save_pretrained`` to ``out_dir`` (a local folder) with ``mecpe_tiny.json``. Returns ``out_dir``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    convs = _read(data_files)
    tok = build_tokenizer(convs, seed, vocab_size)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=384, max_position_embeddings=4096,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    build = {"seed": seed, "num_layers": num_layers, "output_scale": output_scale, "pretrain_steps": pretrain_steps,
             "vocab_size": len(tok), "data_files": list(data_files), "pretraining": None}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            model.lm_head.weight.mul_(output_scale)
        if pretrain_steps > 0:
            build["pretraining"] = pretrain(model, tok, recap_sequences(tok, convs, seed), pretrain_steps, seed)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    storage.write_json(os.path.join(out_dir, BUILD_FILE), build, indent=2)
    return out_dir
