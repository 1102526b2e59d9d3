"""Tokenizer and model loading (4-bit NF4, LoRA adapters), device/dtype choice. Where the weights come from (hub,
folder, S3 mirror, GGUF file, packaged model) is ``mecpe.sources``.

Why these choices:

* EOS is the token that ends an assistant turn in the chat template, whatever the tokenizer file says (SmolLM2's
  GGUF reads as ``<|im_start|>`` under transformers 5.17): training appends it to every answer, decoding stops at it.
* The pad token is never EOS: with pad = eos the collator masks EOS out of the labels and the model never learns to
  stop (a defect of the reference system). It is an existing safe token where the vocabulary has one (Llama-2's
  ``<unk>``, SmolLM2's ``<|endoftext|>``); only a vocabulary without one gets a new ``<pad>``, and ``load_base``
  then grows the embeddings deterministically (new rows = mean of the old ones), so training and inference
  processes build the same base. Adapters never store the embeddings (``save_adapter``).
* The 4-bit compute dtype is chosen here, once, from the device: bf16 where the GPU has it, fp16 on older GPUs
  (T4), fp32 on CPU (bitsandbytes' CPU backend). The reference misspelt this option and silently computed in fp32.
* Inference may merge a LoRA adapter into a plain (non-quantized) base (``load_merged``): no LoRA matmuls, one
  kernel per linear layer. A stage then owns its copy of the base (SmolLM2-135M: cheap); 4-bit bases keep their
  adapters unmerged (merging would dequantize a 13B model into bf16).
* 4-bit on CPU: bitsandbytes has a CPU backend; ``device_map={"": "cpu"}`` loads NF4 ``Linear4bit`` layers. Its CPU
  matmul needs every quantized layer's ``in_features`` to be a multiple of the quantization block size (64), hence
  the tiny model's sizes (``mecpe.tiny``).

This module knows models, not data: no ECF parsing, no prompts.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch

from mecpe import sources
from mecpe.special_tokens import set_eos_and_pad
from mecpe.config import LoraSettings, ModelConfig, QuantizationConfig


log = logging.getLogger("mecpe.modeling")


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


def _trl_model_args(**fields):
    """trl's ``ModelConfig``, the input of its ``get_quantization_config`` / ``get_peft_config``: mecpe's own
    sections stay the schema (validated, documented, hashed into run names) and trl turns them into the library
    objects. (trl 1.16 has no ``get_kbit_device_map``: ``load_base`` places the whole model on its one device.)"""
    from trl import ModelConfig as TrlModelArgs

    return TrlModelArgs(**fields)


def quantization_config(quant_cfg: QuantizationConfig | None, device: str):
    """NF4 ``BitsAndBytesConfig`` (double quantization as configured, compute dtype from ``compute_dtype``) through
    trl's ``get_quantization_config``, or None for mode ``none``."""
    if quant_cfg is None or quant_cfg.mode == "none":
        return None
    from trl import get_quantization_config

    dtype = str(compute_dtype(quant_cfg, device)).removeprefix("torch.")
    return get_quantization_config(_trl_model_args(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   use_bnb_nested_quant=quant_cfg.double_quant, dtype=dtype))


def get_peft_config(lora_cfg: LoraSettings):
    """The ``LoraConfig`` of ``lora`` through trl's ``get_peft_config`` (causal LM, no bias training)."""
    from trl import get_peft_config as trl_peft_config

    args = _trl_model_args(use_peft=True, lora_r=lora_cfg.r, lora_alpha=lora_cfg.alpha,
                           lora_dropout=lora_cfg.dropout)
    # set after construction: trl's __post_init__ turns a one-name list into a string, which peft reads as a regex
    # over whole module paths (matching nothing)
    args.lora_target_modules = lora_cfg.target_modules
    return trl_peft_config(args)


# ---------------------------------------------------------------- tokenizer and model

def load_tokenizer(source: str, *, revision: str | None = None, trust_remote_code: bool = False,
                   for_inference: bool = False):
    """``AutoTokenizer`` with the special tokens training and inference rely on, whatever the tokenizer file (or
    the transformers version reading it) says:

    * EOS is the token that ends an assistant turn in the chat template: what training appends to every answer
      and what decoding stops at;
    * PAD is an existing safe token; only a vocabulary without one gets a new ``<pad>`` (``load_base`` then
      grows the embeddings; adapters never store them). Both from ``mecpe.special_tokens.set_eos_and_pad``.

    Left padding for inference (batched generation and last-token scoring need it), right padding for training."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    set_eos_and_pad(tok, source)
    tok.padding_side = "left" if for_inference else "right"
    return tok


def load_base_tokenizer(model_cfg: ModelConfig, *, for_inference: bool = False):
    """The tokenizer of ``model.base`` alone (token counts, prompt budgets); ``load`` gives it with the model."""
    path, revision = sources.resolve_base(model_cfg.base, model_cfg.revision, model_cfg.cache_dir)
    return load_tokenizer(path, revision=revision, trust_remote_code=model_cfg.trust_remote_code,
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


def load_base(path: str, model_cfg: ModelConfig, quant_cfg: QuantizationConfig | None, *, revision: str | None,
              device: str, tokenizer, for_training: bool = False):
    """The base causal LM read from ``path`` (``model.base`` resolved) on ``device``, 4-bit NF4 unless
    ``quant_cfg.mode == "none"``; the embeddings resized to ``tokenizer`` and its pad/eos ids set in the model's
    configs. For training a 4-bit model, ``prepare_model_for_kbit_training`` runs without gradient checkpointing
    (the trainer decides that) and the KV cache is turned off."""
    from transformers import AutoModelForCausalLM

    use_shape_agnostic_attention(device)
    qcfg = quantization_config(quant_cfg, device)
    kwargs: dict[str, Any] = {
        "dtype": compute_dtype(quant_cfg, device),
        "device_map": {"": device},
        "trust_remote_code": model_cfg.trust_remote_code,
    }
    if revision:
        kwargs["revision"] = revision
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
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


def load_adapter(model, adapter_uri: str, name: str, *, cache_dir: str = "~/.cache/mecpe/models"):
    """Attach a saved LoRA adapter (local dir or ``s3://``) as ``name``; returns the ``PeftModel``."""
    from peft import PeftModel

    path = sources.resolve(adapter_uri, cache_dir, key=f"{name} adapter")
    if isinstance(model, PeftModel):
        model.load_adapter(path, adapter_name=name, is_trainable=False)
        return model
    return PeftModel.from_pretrained(model, path, adapter_name=name, is_trainable=False)


def load(model_cfg: ModelConfig, quant_cfg: QuantizationConfig | None, *, device: str = "cpu",
         for_training: bool = False, adapters: Mapping[str, str] | None = None):
    """The one load sequence of training, inference and the benchmarks: ``model.base`` resolved once
    (``mecpe.sources``), its tokenizer with the special tokens (right padding for training, left for inference),
    the base sized to it, then each adapter by name (``model.set_adapter(name)`` switches; the first is active).
    Returns (model, tokenizer)."""
    path, revision = sources.resolve_base(model_cfg.base, model_cfg.revision, model_cfg.cache_dir)
    tokenizer = load_tokenizer(path, revision=revision, trust_remote_code=model_cfg.trust_remote_code,
                               for_inference=not for_training)
    model = load_base(path, model_cfg, quant_cfg, revision=revision, device=device, tokenizer=tokenizer,
                      for_training=for_training)
    for name, uri in (adapters or {}).items():
        model = load_adapter(model, uri, name, cache_dir=model_cfg.cache_dir)
    if adapters:
        model.set_adapter(next(iter(adapters)))
        model.eval()
    return model, tokenizer


def merges_adapters(setting: bool | str, quant_cfg: QuantizationConfig | None) -> bool:
    """``inference.merge_adapters``: true/false as given; auto = only when the base is not quantized."""
    if setting == "auto":
        return quant_cfg is None or quant_cfg.mode == "none"
    if not isinstance(setting, bool):
        raise ValueError(f"merge_adapters: true, false or auto, not {setting!r}")
    if setting and quant_cfg is not None and quant_cfg.mode != "none":
        raise ValueError("merge_adapters=true needs quantization.mode none (a 4-bit base keeps its adapters unmerged)")
    return setting


def load_merged(model_cfg: ModelConfig, quant_cfg: QuantizationConfig | None, *, device: str = "cpu",
                adapter: str | None = None, name: str = "default"):
    """(model, tokenizer) for inference: the base with ``adapter`` (a LoRA adapter URI, or None for the plain base)
    merged into its weights, a plain transformers model without peft layers."""
    model, tokenizer = load(model_cfg, quant_cfg, device=device, adapters={name: adapter} if adapter else None)
    if adapter:
        model = model.merge_and_unload()
        model.eval()
    return model, tokenizer


def load_soup(model_cfg: ModelConfig, quant_cfg: QuantizationConfig | None, *, device: str = "cpu",
              adapters: Sequence[str]):
    """(model, tokenizer): one plain model whose weights are the mean of the base with each adapter merged in, i.e.
    the base plus the mean of the adapters' weight updates (a uniform model soup of LoRA fine-tunes of one base):
    an ensemble that costs one forward pass (``inference.emotion_ensemble_mode=soup``). The members are merged one
    at a time into a second copy, and the running mean is taken in float32 per tensor."""
    if not adapters:
        raise ValueError("a soup needs at least one adapter")
    soup, tokenizer = load_merged(model_cfg, quant_cfg, device=device, adapter=adapters[0])
    params = dict(soup.named_parameters())
    for k, uri in enumerate(adapters[1:], 2):
        member, _ = load_merged(model_cfg, quant_cfg, device=device, adapter=uri)
        with torch.no_grad():
            for name, weight in member.named_parameters():
                mean = params[name].float()
                params[name].copy_(mean + (weight.float() - mean) / k)
        del member
    return soup, tokenizer


def liger_installed(setting: str) -> bool:
    """Whether Liger's kernels can be used; without the package (the `gpu` extra) the job goes on without them,
    exact but slower, after one warning naming ``setting`` (the config key that asked for them)."""
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is not None:
        return True
    log.warning("%s: liger-kernel is not installed here (pip install -e '.[gpu]'); running without its fused "
                "kernels: the same method, slower and with more GPU memory", setting)
    return False


def fuse_kernels(model, device: str) -> bool:
    """``inference.liger_kernels``: Liger's fused Triton kernels for ``model``'s forwards: RMSNorm, SwiGLU (or
    Gemma's GeGLU) and RoPE, each one kernel instead of several elementwise ones (RMSNorm alone is eight: casts, pow,
    mean, add, rsqrt, two multiplies), no loss kernels (inference computes none). The norms and MLPs are patched on
    this model's modules; RoPE through the model family's module function, so for every model of that family in
    this process (a predictor actor holds one family). CUDA only, and needs liger-kernel (the gpu extra): elsewhere
    the model is left as it is, with a log line. Returns whether the kernels were applied."""
    if not str(device).startswith("cuda"):
        log.info("inference.liger_kernels: Triton kernels need CUDA; %s runs without them", device)
        return False
    if not liger_installed("inference.liger_kernels"):
        return False
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    _apply_liger_kernel_to_instance(base, rope=True, rms_norm=True, swiglu=True, geglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    return True


def cap_gpu_memory(device: str, gib: float | None) -> float | None:
    """``inference.gpu_memory_gib``: limit this process's CUDA caching allocator on ``device`` to ``gib`` GiB
    (``torch.cuda.set_per_process_memory_fraction``; an allocation beyond it raises out-of-memory, as on a GPU of
    that size). Returns the fraction set, None when there is no cap or no CUDA device."""
    if gib is None or not str(device).startswith("cuda"):
        return None
    if gib <= 0:
        raise ValueError(f"gpu_memory_gib must be positive, not {gib}")
    dev = torch.device(device)
    total = torch.cuda.get_device_properties(dev).total_memory
    fraction = min(1.0, gib * 2**30 / total)
    torch.cuda.set_per_process_memory_fraction(fraction, dev)
    return fraction
