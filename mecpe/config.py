"""Typed configuration for every mecpe step.

One YAML file is the full record of an experiment. It is loaded into these pydantic models
(unknown keys are errors, so a typo never silently falls back to a default), then
``key.sub=value`` overrides from the command line are applied. Configs travel into Ray workers
as plain dicts (``model_dump()``) and are re-validated there.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

DEFAULT_DATA_DIR = "../shared/data/ecf"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DataConfig(_Strict):
    """Where the ECF files are. ``MECPE_DATA`` overrides ``data_dir``; file paths are relative to it."""

    data_dir: str = DEFAULT_DATA_DIR
    train_file: str = "reconstructed/Subtask_2_train.json"
    test_file: str = "NUSTM_SemEval-2024_ECAC/data/Subtask_2_test.json"
    split: Literal["random", "reference"] = "random"
    val_fraction: float = 0.1
    seed: int = 42
    # Use only the first N conversations of each split (quick runs); null = all.
    limit_train: int | None = None
    limit_val: int | None = None
    limit_test: int | None = None

    def resolved_dir(self) -> str:
        return _abs(os.environ.get("MECPE_DATA") or self.data_dir)

    def path(self, name: str) -> str:
        if "://" in name or os.path.isabs(name):
            return name
        return str(Path(self.resolved_dir()) / name)


class ModelConfig(_Strict):
    """Base model: a hub id, a local directory or an ``s3://`` mirror of the weights."""

    base: str = "meta-llama/Llama-2-13b-chat-hf"
    revision: str | None = None
    trust_remote_code: bool = False
    # Local cache for s3:// mirrors (fetched once per node).
    cache_dir: str = "~/.cache/mecpe/models"
    # Build the tiny local model at ``base`` when it is absent (embedded default only).
    build_tiny_if_missing: bool = False
    attn_implementation: str | None = None


class QuantizationConfig(_Strict):
    mode: Literal["nf4", "none"] = "nf4"
    double_quant: bool = True
    # auto: bf16 where the device supports it, else fp16 on GPU, fp32 on CPU.
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"


class LoraSettings(_Strict):
    r: int = 16
    alpha: int = 16
    dropout: float = 0.1
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )


class PromptConfig(_Strict):
    # Prompt (not answer) token budget: longer conversations are shortened around the target.
    max_prompt_tokens: int = 1024
    max_answer_tokens: int = 64


class TrainingConfig(_Strict):
    epochs: float = 1.0
    max_steps: int = -1
    per_device_batch_size: int = 4
    grad_accum: int = 4
    learning_rate: float = 2e-3
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    optim: str = "paged_adamw_32bit"
    weight_decay: float = 0.001
    max_grad_norm: float = 0.3
    # auto: on when GPU memory is too small to run without it.
    gradient_checkpointing: Literal["auto", "on", "off"] = "auto"
    packing: bool = False
    group_by_length: bool = True
    # Token budget per micro-batch (examples x longest, padding included). When set, each micro-batch holds as many
    # examples of similar length as fit (per_device_batch_size is ignored): even GPU load, <2% padding.
    max_batch_tokens: int | None = None
    save_steps: int = 50
    num_to_keep: int = 2
    logging_steps: int = 10
    eval_steps: int | None = None
    seed: int = 42
    # Cause model training emotions: gold labels, predictions of an emotion adapter, or gold with noise.
    cause_emotions: Literal["gold", "predicted", "noised"] = "gold"
    cause_noise_rate: float = 0.2
    # Test-only fault injection: os._exit in a worker after this global step (once per run).
    fail_after_step: int | None = None


class ScalingSettings(_Strict):
    num_workers: int = 1
    use_gpu: bool = False
    accelerator_type: str | None = None
    resources_per_worker: dict[str, float] | None = None
    max_failures: int = 100
    # Node preemptions (spot) are counted apart from failures; -1 = always resume after one.
    max_preemption_failures: int = -1


class StorageConfig(_Strict):
    """Local dir or ``s3://bucket/prefix``. The S3 endpoint is not a secret; credentials never live here."""

    path: str = "outputs/runs"
    s3_endpoint: str | None = None
    s3_region: str | None = None
    run_name: str | None = None


class InferenceConfig(_Strict):
    emotion_adapter: str | None = None
    cause_adapter: str | None = None
    # One 4-bit base with both adapters in each actor, or separate models per stage.
    share_base: bool = False
    emotion_method: Literal["score", "generate"] = "score"
    # Emotions the cause stage reads: the emotion stage's predictions, or the input's gold labels (oracle/benchmarks).
    cause_input: Literal["predicted", "gold"] = "predicted"
    batch_size: int = 8  # conversations per map_batches call
    max_batch_tokens: int = 16384
    num_actors: int = 1
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    accelerator_type: str | None = None
    max_new_tokens: int = 24
    reuse_prefix: bool = True
    lines_per_block: int = 256


class Config(_Strict):
    """A whole experiment. Every step reads the sections it needs."""

    output_dir: str = "outputs/local"
    ray_address: str | None = None
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    inference_scaling: ScalingSettings | None = None


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides (values parsed as YAML) to a nested dict, in order."""
    out = json.loads(json.dumps(raw))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = _parse_value(value)
    return out


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or defaults), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [])
    try:
        cfg = Config.model_validate(raw)
    except Exception as exc:  # pydantic's message names the field
        raise ValueError(f"{path or '<defaults>'}: invalid config: {exc}") from exc
    return absolute_paths(cfg)


def _abs(path: str | None) -> str | None:
    if path is None or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def absolute_paths(cfg: Config) -> Config:
    """Local paths made absolute against the driver's working directory.

    Ray Train and Ray Data workers do not run in the driver's folder, so a relative ``outputs/tiny-model`` would
    be looked up elsewhere (and a missing local model is then tried as a hub id). ``model.base`` and the adapters
    count as local when they exist here, when they start with ``.``, ``/`` or ``~``, or when the tiny model is to be
    built there; otherwise they stay hub ids (``meta-llama/Llama-2-13b-chat-hf`` also looks like a relative path).
    """

    def local_model(p: str | None, build: bool = False) -> str | None:
        if p is None or "://" in p:
            return p
        if build or p.startswith((".", "/", "~")) or os.path.exists(os.path.expanduser(p)):
            return _abs(p)
        return p

    cfg.output_dir = _abs(cfg.output_dir)
    cfg.storage.path = _abs(cfg.storage.path)
    cfg.data.data_dir = _abs(cfg.data.data_dir)
    cfg.model.base = local_model(cfg.model.base, cfg.model.build_tiny_if_missing)
    cfg.inference.emotion_adapter = local_model(cfg.inference.emotion_adapter)
    cfg.inference.cause_adapter = local_model(cfg.inference.cause_adapter)
    return cfg


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def config_hash(*parts: Any, length: int = 10) -> str:
    """Stable short hash of JSON-able parts (pydantic models are dumped first)."""
    norm = [p.model_dump(mode="json") if isinstance(p, BaseModel) else p for p in parts]
    blob = json.dumps(norm, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


# What every key does: the README's config reference is generated from this (tests keep the two in sync).
FIELD_DOCS: dict[str, str] = {
    "output_dir": "where a step writes its outputs (local folder or s3:// prefix)",
    "ray_address": "Ray cluster to join; null = RAY_ADDRESS or a new local instance",
    "data.data_dir": "ECF folder; MECPE_DATA overrides it; the file paths below are relative to it",
    "data.train_file": "training file, split into train/val by conversation",
    "data.test_file": "gold test file: inference input and scoring reference, never trained on",
    "data.split": "random (seeded, by conversation) or reference (the reference system's 81/9/10 split)",
    "data.val_fraction": "share of training conversations held out for validation",
    "data.seed": "seed of the train/val split",
    "data.limit_train": "train on the first N training conversations only; null = all",
    "data.limit_val": "validate on the first N validation conversations only; null = all",
    "data.limit_test": "infer and score the first N test conversations only; null = all",
    "model.base": "base model: hub id, local folder or s3:// mirror of the weights",
    "model.revision": "hub revision (commit) of the base model",
    "model.trust_remote_code": "allow model code from the hub; off unless you trust the source",
    "model.cache_dir": "node-local cache for s3:// model mirrors (fetched once per node)",
    "model.build_tiny_if_missing": "build the tiny local model at model.base when absent (embedded default)",
    "model.attn_implementation": "attention kernel (sdpa, flash_attention_2, eager); null = transformers' choice",
    "quantization.mode": "nf4 (QLoRA: 4-bit NF4 base) or none (plain LoRA on a bf16/fp32 base)",
    "quantization.double_quant": "quantize the NF4 scales too (saves ~0.4 bit per parameter)",
    "quantization.compute_dtype": "auto = bf16 where supported, fp16 on GPUs without bf16 (T4), fp32 on CPU",
    "lora.r": "LoRA rank",
    "lora.alpha": "LoRA scaling numerator (scale = alpha / r)",
    "lora.dropout": "dropout on the LoRA input",
    "lora.target_modules": "modules that get adapters: a list of names or all-linear",
    "prompt.max_prompt_tokens": "prompt budget; longer conversations drop utterances far from the target",
    "prompt.max_answer_tokens": "longest answer (with EOS) an example may have",
    "training.epochs": "passes over the training examples (ignored when max_steps > 0)",
    "training.max_steps": "optimizer steps; -1 = by epochs",
    "training.per_device_batch_size": "examples per worker per micro-batch",
    "training.grad_accum": "micro-batches per optimizer step",
    "training.learning_rate": "peak learning rate",
    "training.lr_scheduler": "transformers scheduler name",
    "training.warmup_ratio": "share of steps spent warming up",
    "training.optim": "transformers optimizer name (paged_adamw_32bit needs CUDA; CPU falls back to adamw_torch)",
    "training.weight_decay": "AdamW weight decay",
    "training.max_grad_norm": "gradient clipping norm",
    "training.gradient_checkpointing": "auto = on only when GPU memory is too small to run without it",
    "training.packing": "must stay false (raises): use max_batch_tokens for dense, low-padding batches",
    "training.group_by_length": "batch examples of similar length (less padding)",
    "training.max_batch_tokens": "token budget per micro-batch (examples x longest); null = per_device_batch_size "
                                 "examples per micro-batch",
    "training.save_steps": "checkpoint every N optimizer steps (resume point after preemption)",
    "training.num_to_keep": "checkpoints kept in storage",
    "training.logging_steps": "log loss and throughput every N steps",
    "training.eval_steps": "validation loss every N steps; null = at the end only",
    "training.seed": "training seed",
    "training.cause_emotions": "emotions shown to the cause model in training: gold, predicted or noised",
    "training.cause_noise_rate": "share of utterance emotions replaced at random when cause_emotions=noised",
    "training.fail_after_step": "test only: kill a worker once after this global step",
    "scaling.num_workers": "training workers (DDP ranks)",
    "scaling.use_gpu": "one GPU per worker",
    "scaling.accelerator_type": "require this GPU type (A100, T4, ...); null = any",
    "scaling.resources_per_worker": "extra resources per worker, e.g. {CPU: 8}",
    "scaling.max_failures": "worker failures tolerated before the run fails (preemptions are counted apart)",
    "scaling.max_preemption_failures": "node preemptions tolerated before the run fails; -1 = unlimited",
    "storage.path": "training runs: local folder or s3://bucket/prefix",
    "storage.s3_endpoint": "S3-compatible endpoint URL (not a secret); credentials come from the environment",
    "storage.s3_region": "S3 region",
    "storage.run_name": "training run name; null = task + hash of everything that shapes the result",
    "inference.emotion_adapter": "emotion LoRA adapter folder (local or s3://); null = base model only",
    "inference.cause_adapter": "cause LoRA adapter folder (local or s3://); null = base model only",
    "inference.share_base": "one 4-bit base with both adapters per actor instead of one model per stage",
    "inference.emotion_method": "score (pick the most likely of the seven labels) or generate (greedy + parse)",
    "inference.cause_input": "emotions read by the cause stage: predicted (the method) or gold (oracle analysis, benchmarks)",
    "inference.batch_size": "conversations per map_batches call",
    "inference.max_batch_tokens": "token budget of one forward pass",
    "inference.num_actors": "model actors per stage",
    "inference.num_gpus": "GPUs per actor (1 on a T4 node; 0 on CPU)",
    "inference.num_cpus": "CPUs per actor",
    "inference.accelerator_type": "require this GPU type for the actors (T4 on the cluster); null = any",
    "inference.max_new_tokens": "longest generated answer",
    "inference.reuse_prefix": "compute each conversation's prompt prefix once and share its KV cache",
    "inference.lines_per_block": "JSON Lines rows per Ray Data block when reading",
    "inference_scaling": "optional scaling section for inference actors (same keys as scaling); null = inference.*",
}


def config_reference_markdown() -> str:
    """Markdown table of every config key, its default and what it does (for the README)."""
    rows = ["| key | default | what it does |", "|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = f"{prefix}{name}"
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, key + ".")
                continue
            if key not in FIELD_DOCS:
                raise KeyError(f"config key {key} has no entry in FIELD_DOCS")
            default = field.get_default(call_default_factory=True)
            shown = json.dumps(default) if not isinstance(default, str) else default
            rows.append(f"| `{key}` | `{shown}` | {FIELD_DOCS[key]} |")

    walk(Config, "")
    return "\n".join(rows)
