"""Tokenizer and model loading (4-bit NF4, LoRA adapters), device/dtype choice. Where the weights come from (hub,
folder, S3 mirror, GGUF file, packaged model) is ``mecpe.sources``.

Why these choices:

* EOS is the token that ends an assistant turn in the chat template, whatever the tokenizer file says (SmolLM2's
  GGUF reads as ``<|im_start|>`` under transformers 5.17): training appends it to every answer, decoding stops at it.
* The pad token is never EOS: with pad = eos the collator masks EOS out of the labels and the model never learns to
  stop (a defect of the reference system). It is an existing safe token where the vocabulary has one (Llama-2's
  ``<unk>``, SmolLM2's ``<|endoftext|>``); only a vocabulary without one gets a new ``<pad>``, and ``load_model``
  then grows the embeddings deterministically (new rows = mean of the old ones), so training and inference
  processes build the same base. Adapters never store the embeddings (``save_adapter``).
* The 4-bit compute dtype is chosen here, once, from the device: bf16 where the GPU has it, fp16 on older GPUs
  (T4), fp32 on CPU (bitsandbytes' CPU backend). The reference misspelt this option and silently computed in fp32.
* 4-bit on CPU: bitsandbytes has a CPU backend; ``device_map={"": "cpu"}`` loads NF4 ``Linear4bit`` layers. Its CPU
  matmul needs every quantized layer's ``in_features`` to be a multiple of the quantization block size (64), hence
  the tiny model's sizes (``mecpe.tiny``).

This module knows models, not data: no ECF parsing, no prompts.
"""

from __future__ import annotations

from typing import Any

import torch

from mecpe import sources
from mecpe.special_tokens import set_eos_and_pad
from mecpe.config import LoraSettings, ModelConfig, QuantizationConfig


# ---------------------------------------------------------------- device, dtype, quantization

def pick_device(local_rank: int | None = None) -> str:
    """``cuda:<local_rank>`` (or ``cuda:0``) when a GPU is visible, else ``cpu``."""
    if not torch.cuda.is_available():
        return "cpu"
    n = torch.cuda.device_count()
    return f"cuda:{local_rank if local_rank is not None and 0 <= local_rank < n else 0}"


def compute_dtype(quant_cfg: QuantizationConfig | None, device: str) -> torch.dtype:
    """Explicit ``compute_dtype`` wins; ``auto``: bf16 on GPUs that have it (compute capability >= 8), fp16 on
    older GPUs (T4), fp32 on CPU (bitsandbytes' CPU kernels and CPU matmuls are fp32-native)."""
    name = quant_cfg.compute_dtype if quant_cfg is not None else "auto"
    if name != "auto":
        return getattr(torch, name)
    if str(device).startswith("cuda") and torch.cuda.is_available():
        dev = torch.device(device)
        major, _ = torch.cuda.get_device_capability(dev.index if dev.index is not None else 0)
        return torch.bfloat16 if major >= 8 else torch.float16
    return torch.float32


def use_shape_agnostic_attention(device: str) -> None:
    """On CUDA, turn PyTorch's cuDNN attention backend off for SDPA, leaving the flash and memory-efficient kernels.

    cuDNN's attention builds an execution plan for every new input shape, on the CPU, in the hundreds of
    milliseconds (bench/RESULTS.md, 2026-11-29 profile: 10 s of 11 s in three warm-up training steps). mecpe's
    shapes change all the time: token-budget training batches, packed inference rows, and every decoding step (the
    KV length grows), so that cost never amortizes; the other kernels have none."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)


def quantization_config(quant_cfg: QuantizationConfig | None, device: str):
    """NF4 ``BitsAndBytesConfig`` (double quantization as configured), or None for mode ``none``."""
    if quant_cfg is None or quant_cfg.mode == "none":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=quant_cfg.double_quant,
                              bnb_4bit_compute_dtype=compute_dtype(quant_cfg, device))


# ---------------------------------------------------------------- tokenizer and model

def load_tokenizer(source: str, *, revision: str | None = None, trust_remote_code: bool = False,
                   for_inference: bool = False):
    """``AutoTokenizer`` with the special tokens training and inference rely on, whatever the tokenizer file (or
    the transformers version reading it) says:

    * EOS is the token that ends an assistant turn in the chat template: what training appends to every answer
      and what decoding stops at;
    * PAD is an existing safe token; only a vocabulary without one gets a new ``<pad>`` (``load_model`` then
      grows the embeddings; adapters never store them). Both from ``mecpe.special_tokens.set_eos_and_pad``.

    Left padding for inference (batched generation and last-token scoring need it), right padding for training."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    set_eos_and_pad(tok, source)
    tok.padding_side = "left" if for_inference else "right"
    return tok


def load_base_tokenizer(model_cfg: ModelConfig, *, for_inference: bool = False):
    """The tokenizer of ``model.base`` (resolved through ``mecpe.sources``; a revision applies to hub ids only)."""
    source = sources.resolve(model_cfg.base, model_cfg.cache_dir)
    revision = model_cfg.revision if source == model_cfg.base else None
    return load_tokenizer(source, revision=revision, trust_remote_code=model_cfg.trust_remote_code,
                          for_inference=for_inference)


def resize_embeddings(model, num_tokens: int, pad_to_multiple_of: int = 64) -> bool:
    """Grow the embeddings to ``num_tokens`` (no-op if already large enough). New rows (input and output) are the
    mean of the old rows: deterministic, unlike transformers' sampled mean-resizing, and never a likely output."""
    emb = model.get_input_embeddings()
    old = emb.weight.shape[0]
    if num_tokens <= old:
        return False
    model.resize_token_embeddings(num_tokens, pad_to_multiple_of=pad_to_multiple_of, mean_resizing=False)
    with torch.no_grad():
        for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
            if layer is not None and layer.weight.shape[0] > old:
                layer.weight[old:] = layer.weight[:old].float().mean(0, keepdim=True).to(layer.weight.dtype)
    return True


def load_model(model_cfg: ModelConfig, quant_cfg: QuantizationConfig | None, *, device: str = "cpu",
               for_training: bool = False, tokenizer=None):
    """The base causal LM on ``device`` (4-bit NF4 unless ``quant_cfg.mode == "none"``).

    Given the tokenizer, the embeddings are resized to it and its pad id is set in the model's configs. For
    training a 4-bit model, ``prepare_model_for_kbit_training`` runs without gradient checkpointing (the trainer
    decides that) and the KV cache is turned off."""
    from transformers import AutoModelForCausalLM

    use_shape_agnostic_attention(device)
    source = sources.resolve(model_cfg.base, model_cfg.cache_dir)
    qcfg = quantization_config(quant_cfg, device)
    kwargs: dict[str, Any] = {
        "dtype": compute_dtype(quant_cfg, device),
        "device_map": {"": device},
        "trust_remote_code": model_cfg.trust_remote_code,
    }
    if model_cfg.revision and source == model_cfg.base:  # a hub id; mirrors, GGUFs and local dirs have no revisions
        kwargs["revision"] = model_cfg.revision
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if tokenizer is not None:
        resize_embeddings(model, len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
        model.config.eos_token_id = tokenizer.eos_token_id
        if model.generation_config is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            model.generation_config.eos_token_id = tokenizer.eos_token_id
    if for_training:
        model.config.use_cache = False
        if qcfg is not None:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model.eval()
    return model


def get_peft_config(lora_cfg: LoraSettings):
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                      target_modules=lora_cfg.target_modules, bias="none")


def load_adapter(model, adapter_uri: str, name: str, *, cache_dir: str = "~/.cache/mecpe/models"):
    """Attach a saved LoRA adapter (local dir or ``s3://``) as ``name``; returns the ``PeftModel``."""
    from peft import PeftModel

    path = sources.resolve(adapter_uri, cache_dir, key=f"{name} adapter")
    if isinstance(model, PeftModel):
        model.load_adapter(path, adapter_name=name, is_trainable=False)
        return model
    return PeftModel.from_pretrained(model, path, adapter_name=name, is_trainable=False)


def load_for_inference(model_cfg: ModelConfig, quant_cfg: QuantizationConfig | None, adapters: dict[str, str],
                       device: str = "cpu"):
    """One base model with every adapter attached (``model.set_adapter(name)`` switches), in eval mode, and a
    left-padding tokenizer. The first adapter is active on return."""
    tokenizer = load_base_tokenizer(model_cfg, for_inference=True)
    model = load_model(model_cfg, quant_cfg, device=device, tokenizer=tokenizer)
    for name, uri in adapters.items():
        model = load_adapter(model, uri, name, cache_dir=model_cfg.cache_dir)
    if adapters:
        model.set_adapter(next(iter(adapters)))
    model.eval()
    return model, tokenizer
