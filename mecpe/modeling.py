"""Tokenizer and model loading (4-bit NF4, LoRA adapters), device/dtype choice, node-local caching of remote weights.

Why these choices:

* The pad token is a dedicated ``<pad>``, never eos: with pad = eos the collator masks eos out of the labels and the
  model never learns to stop (a defect of the reference system). Adding it may grow the vocabulary; ``load_model``
  then resizes the embeddings, deterministically (new rows = mean of the old ones), so training and inference
  processes build the same base.
* The 4-bit compute dtype is chosen here, once, from the device: bf16 where the GPU has it, fp16 on older GPUs
  (T4), fp32 on CPU (bitsandbytes' CPU backend). The reference misspelt this option and silently computed in fp32.
* 4-bit on CPU: bitsandbytes has a CPU backend; ``device_map={"": "cpu"}`` loads NF4 ``Linear4bit`` layers. Its CPU
  matmul needs every quantized layer's ``in_features`` to be a multiple of the quantization block size (64), hence
  the tiny model's sizes (``mecpe.tiny``).

This module knows models, not data: no ECF parsing, no prompts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Any

import torch

from mecpe import storage
from mecpe.config import LoraSettings, ModelConfig, QuantizationConfig

PAD_TOKEN = "<pad>"
_COMPLETE = ".mecpe_complete"


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


# ---------------------------------------------------------------- sources

def resolve_model_source(source: str, cache_dir: str = "~/.cache/mecpe/models") -> str:
    """A local directory (itself), a hub id (itself: ``from_pretrained`` fetches it) or a remote mirror
    (``s3://...``): downloaded once per node into ``cache_dir/<sha256(uri)[:16]>``.

    Concurrent actors on one node take a file lock; the download goes to a temp dir that is renamed into place
    with a completion marker inside, so a crashed download is never mistaken for a complete one. The cache is keyed
    by URI: a changed mirror needs a new URI."""
    if source.startswith("file://"):
        source = source[len("file://"):]
    if "://" not in source:
        local = os.path.expanduser(source)
        return os.path.abspath(local) if os.path.exists(local) else source
    from filelock import FileLock

    cache = os.path.expanduser(cache_dir)
    os.makedirs(cache, exist_ok=True)
    target = os.path.join(cache, hashlib.sha256(source.encode()).hexdigest()[:16])
    if os.path.exists(os.path.join(target, _COMPLETE)):
        return target
    with FileLock(target + ".lock"):
        if os.path.exists(os.path.join(target, _COMPLETE)):
            return target
        tmp = f"{target}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)  # an incomplete earlier attempt
        storage.download_dir(source, tmp)
        with open(os.path.join(tmp, _COMPLETE), "w", encoding="utf-8") as fh:
            json.dump({"uri": source, "time": time.time()}, fh)
        os.replace(tmp, target)
    return target


# ---------------------------------------------------------------- tokenizer and model

def load_tokenizer(source: str, *, revision: str | None = None, trust_remote_code: bool = False,
                   for_inference: bool = False):
    """``AutoTokenizer`` with a pad token distinct from eos (adds ``<pad>`` when missing or equal to eos; the
    model's embeddings are then resized by ``load_model``). Left padding for inference (batched generation and
    last-token scoring need it), right padding for training."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
    tok.padding_side = "left" if for_inference else "right"
    return tok


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
    source = resolve_model_source(model_cfg.base, model_cfg.cache_dir)
    qcfg = quantization_config(quant_cfg, device)
    kwargs: dict[str, Any] = {
        "dtype": compute_dtype(quant_cfg, device),
        "device_map": {"": device},
        "trust_remote_code": model_cfg.trust_remote_code,
    }
    if model_cfg.revision and source == model_cfg.base:  # a hub id; mirrors and local dirs have no revisions
        kwargs["revision"] = model_cfg.revision
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if tokenizer is not None:
        resize_embeddings(model, len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
        if model.generation_config is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
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

    path = resolve_model_source(adapter_uri, cache_dir)
    if isinstance(model, PeftModel):
        model.load_adapter(path, adapter_name=name, is_trainable=False)
        return model
    return PeftModel.from_pretrained(model, path, adapter_name=name, is_trainable=False)


def load_for_inference(model_cfg: ModelConfig, quant_cfg: QuantizationConfig | None, adapters: dict[str, str],
                       device: str = "cpu"):
    """One base model with every adapter attached (``model.set_adapter(name)`` switches), in eval mode, and a
    left-padding tokenizer. The first adapter is active on return."""
    source = resolve_model_source(model_cfg.base, model_cfg.cache_dir)
    revision = model_cfg.revision if source == model_cfg.base else None
    tokenizer = load_tokenizer(source, revision=revision, trust_remote_code=model_cfg.trust_remote_code,
                               for_inference=True)
    model = load_model(model_cfg, quant_cfg, device=device, tokenizer=tokenizer)
    for name, uri in adapters.items():
        model = load_adapter(model, uri, name, cache_dir=model_cfg.cache_dir)
    if adapters:
        model.set_adapter(next(iter(adapters)))
    model.eval()
    return model, tokenizer
