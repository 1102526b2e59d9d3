"""Which tokens end an answer and which one pads a batch, read from the tokenizer's chat template rather than from
what the tokenizer file (or the transformers version reading it) declares.

Real tokenizers disagree with themselves: SmolLM2's GGUF reads with ``<|im_start|>`` as EOS under transformers 5.17
and ``<|im_end|>`` under 5.24, and its pad token equals its EOS; Llama-2 has no pad token at all. Training appends
EOS to every answer and decoding stops at it, so EOS must be the token that ends an assistant turn in the template;
padding must never be EOS (the collator would mask EOS out of the labels) nor a token prompts contain.
"""

from __future__ import annotations

PAD_TOKEN = "<pad>"  # added only to a vocabulary without a safe token to pad with
_SENTINEL = "\x00MECPE_TURN\x00"


def _special_ids(tok) -> set[int]:
    """Ids of every special token: the named ones and added tokens flagged special (5.17 does not list
    ``<|im_end|>`` among SmolLM2's named special tokens)."""
    ids = set(tok.all_special_ids)
    ids |= {i for i, t in getattr(tok, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    return ids


def _rendered(tok, messages: list[dict], **kw) -> str | None:
    try:
        return tok.apply_chat_template(messages, tokenize=False, **kw)
    except Exception:  # noqa: BLE001 - templates may refuse a conversation shape; then there is nothing to learn
        return None


def turn_end_token(tok) -> str | None:
    """The token that ends an assistant turn in the chat template: the first special token after the assistant's
    content (ChatML ``<|im_end|>``, Llama-2 ``</s>``). None without a template or such a token."""
    if not getattr(tok, "chat_template", None):
        return None
    text = _rendered(tok, [{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL}])
    if not text or _SENTINEL not in text:
        return None
    specials = _special_ids(tok)
    for i in tok(text.split(_SENTINEL, 1)[1], add_special_tokens=False)["input_ids"]:
        if i in specials:
            return tok.convert_ids_to_tokens(i)
    return None


def prompt_token_ids(tok) -> set[int]:
    """Every token the chat template itself writes around a user turn and an assistant answer (prompts use these)."""
    text = _rendered(tok, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])
    ids = set(tok(text, add_special_tokens=False)["input_ids"]) if text else set()
    return ids | {i for i in (tok.bos_token_id,) if i is not None}


def safe_pad_token(tok) -> str | None:
    """An existing token that can pad: the tokenizer's own pad, else its unknown token, else an unused special
    token; never EOS (the collator would mask EOS out with the padding) and never a token the chat template writes.
    None when the vocabulary has none (then a new ``<pad>`` is added and the embeddings grow)."""
    banned = prompt_token_ids(tok) | {tok.eos_token_id}
    candidates = [tok.pad_token_id, tok.unk_token_id] + sorted(_special_ids(tok))
    for i in candidates:
        if i is not None and i not in banned:
            return tok.convert_ids_to_tokens(i)
    return None


def set_eos_and_pad(tok, source: str = "the tokenizer") -> bool:
    """EOS := ``turn_end_token`` (where the template names one); PAD := the tokenizer's own pad when it is safe,
    else ``safe_pad_token``, else a new ``<pad>``. Returns True when a token was added (the model's embeddings must
    then grow: ``mecpe.modeling.resize_embeddings``)."""
    end = turn_end_token(tok)
    if end is not None and end != tok.eos_token:
        tok.eos_token = end
    if tok.eos_token_id is None:
        raise ValueError(f"{source}: the tokenizer has no EOS token and its chat template names none")
    if tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id and \
            tok.pad_token_id not in prompt_token_ids(tok):
        return False
    pad = safe_pad_token(tok)
    if pad is not None:
        tok.pad_token = pad
        return False
    tok.add_special_tokens({"pad_token": PAD_TOKEN})
    return True
