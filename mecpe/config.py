"""Typed configuration for every mecpe step.

One YAML file is the full record of an experiment. It is loaded into these pydantic models (unknown keys are errors,
so a typo never silently falls back to a default), then ``key.sub=value`` overrides from the command line are applied.
Each field's ``description`` is what docs/configuration.md's table says about it (generated; a test keeps the two
equal, and another fails when a documented key is read nowhere). The config stops at the drivers: Ray workers
receive specs built from it (``train.recipe.TrainLoopSpec``, ``infer.stages.PredictorSpec``) holding only the
sections they use.

Precedence, everywhere: a value set in the config (file or override) wins over the environment, which wins over the
built-in default (``data.data_dir`` over ``MECPE_DATA``; ``storage.s3_endpoint`` / ``s3_region`` over
``MECPE_S3_ENDPOINT`` / ``AWS_REGION``). Credentials are never config values: the AWS SDK reads them from the
environment.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mecpe.errors import ConfigError, MissingInputError
from mecpe.labels import EMOTIONS, RuleCause

DEFAULT_DATA_DIR = "../shared/data/ecf"
DecodeStep = Literal["dynamic", "static", "graph"]  # inference.decode_step (mecpe.engine.steps)
# inference.prefill_attention (mecpe.engine.scoring)
PrefillAttention = Literal["sdpa", "ragged", "ragged_compiled", "flex", "compiled"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DataConfig(_Strict):
    data_dir: str | None = Field(None, description="data folder (local or s3://); null = `MECPE_DATA`, else "
                                                    "`../shared/data/ecf`; the file paths below are relative to it")
    train_file: str = Field("NUSTM_MECPE/data/all_data_pair.txt",
                            description="training file (ECF 1.0 text, SemEval JSON or JSON Lines), split into "
                                        "train/val by conversation")
    test_file: str = Field("NUSTM_SemEval-2024_ECAC/data/Subtask_2_test.json",
                           description="gold test file: inference input and scoring reference, never trained on")
    split: Literal["random", "reference"] = Field(
        "random", description="random (seeded, by conversation) or reference (the reference system's 81/9/10 split)")
    val_fraction: float = Field(0.1, description="share of training conversations held out for validation")
    seed: int = Field(42, description="seed of the train/val split")
    limit_train: int | None = Field(None, description="train on the first N training conversations only; null = all")
    limit_val: int | None = Field(None, description="validate on the first N validation conversations only; "
                                                    "null = all")
    limit_test: int | None = Field(None, description="infer and score the first N test conversations only (the "
                                                     "report says so); null = all")
    synthesize_if_missing: bool = Field(False, description="write the learnable synthetic corpus (`mecpe data "
                                                            "synth`, defaults) into data_dir when train_file is absent")

    def resolved_dir(self) -> str:
        """The data folder: ``data_dir`` if set, else ``MECPE_DATA``, else the default next to the repository."""
        return _abs(self.data_dir or os.environ.get("MECPE_DATA") or DEFAULT_DATA_DIR)

    def path(self, name: str) -> str:
        if "://" in name or os.path.isabs(name):
            return name
        base = self.resolved_dir()
        return f"{base.rstrip('/')}/{name}" if "://" in base else str(Path(base) / name)


class TinyModelSettings(_Strict):
    num_layers: int = Field(4, description="decoder layers of the tiny model (hidden size 128)")
    output_scale: float = Field(1.0, description="factor on the random output layer: LoRA keeps it frozen, and at "
                                                 "1.0 no answer can become confident (`mecpe.tiny`)")
    pretrain_steps: int = Field(0, description="steps of recap pretraining on the training file's text when "
                                               "building (16 conversations a step); 0 = a random base")
    seed: int = Field(0, description="seed of the tokenizer, the weights and the pretraining order")


class ModelConfig(_Strict):
    base: str = Field("meta-llama/Llama-2-13b-chat-hf",
                      description="base model: hub id, local folder or s3:// mirror of the weights")
    revision: str | None = Field(None, description="hub revision (commit) of the base model")
    trust_remote_code: bool = Field(False, description="allow model code from the hub; off unless you trust the "
                                                       "source")
    cache_dir: str = Field("~/.cache/mecpe/models", description="node-local cache for s3:// model mirrors and "
                                                                "adapters (fetched once per node)")
    build_tiny_if_missing: bool = Field(False, description="build the tiny local model at model.base from the "
                                                           "training file when absent, in the prepare step (embedded "
                                                           "default)")
    tiny: TinyModelSettings = Field(default_factory=TinyModelSettings)
    attn_implementation: str | None = Field(None, description="attention kernel (sdpa, eager); null = "
                                                              "transformers' choice")


class QuantizationConfig(_Strict):
    mode: Literal["nf4", "none"] = Field("nf4", description="nf4 (QLoRA: 4-bit NF4 base) or none (plain LoRA on a "
                                                            "bf16/fp32 base)")
    double_quant: bool = Field(True, description="quantize the NF4 scales too (saves ~0.4 bit per parameter)")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto = bf16 where supported, fp16 on GPUs without bf16 (T4), fp32 on CPU")


class LoraSettings(_Strict):
    r: int = Field(16, description="LoRA rank")
    alpha: int = Field(16, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.1, description="dropout on the LoRA input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="modules that get adapters: a list of names or all-linear")


class PromptConfig(_Strict):
    max_prompt_tokens: int = Field(1024, description="prompt budget; longer conversations drop utterances far from "
                                                     "the target")
    max_answer_tokens: int = Field(64, description="longest answer (with EOS) an example may have")
    layout: Literal["question", "prefix"] = Field(
        "question", description="where the instruction goes: question (the reference's) repeats it in every "
        "utterance's question; prefix states it once in the conversation prefix that the questions share and asks "
        "each utterance in a few tokens (~30 fewer tokens per utterance and stage to compute). Adapters answer the "
        "layout they were trained on: inference refuses an adapter of another layout")

    def builder_kwargs(self) -> dict:
        """``mecpe.prompts.PromptBuilder``'s settings from this section: training, inference and the benchmarks build
        prompts from the same ones."""
        return {"max_prompt_tokens": self.max_prompt_tokens, "layout": self.layout}


class TrainingConfig(_Strict):
    epochs: float = Field(1.0, description="passes over the training examples (ignored when max_steps > 0)")
    max_steps: int = Field(-1, description="optimizer steps; -1 = by epochs")
    per_device_batch_size: int = Field(4, description="examples per worker per micro-batch")
    grad_accum: int = Field(4, description="micro-batches per optimizer step")
    learning_rate: float = Field(2e-3, description="peak learning rate")
    lr_scheduler: str = Field("cosine", description="transformers scheduler name")
    warmup_ratio: float = Field(0.03, description="share of steps spent warming up")
    optim: str = Field("paged_adamw_32bit", description="transformers optimizer name (paged_adamw_32bit needs CUDA; "
                                                        "CPU falls back to adamw_torch)")
    weight_decay: float = Field(0.001, description="AdamW weight decay")
    max_grad_norm: float = Field(0.3, description="gradient clipping norm")
    gradient_checkpointing: Literal["auto", "on", "off"] = Field(
        "auto", description="auto = on only when GPU memory is too small to run without it")
    group_by_length: bool = Field(True, description="batch examples of similar length (less padding)")
    max_batch_tokens: int | None = Field(None, description="token budget per micro-batch (rows x longest); "
                                                           "null = per_device_batch_size rows per micro-batch")
    reuse_prefix: bool = Field(False, description="pack each conversation's targets behind one copy of its prompt "
                                                  "prefix (exact: the same loss and gradients as one example per "
                                                  "target, ~5x fewer tokens on ECF); a row is then a conversation")
    use_liger_kernel: bool = Field(False, description="Liger's fused Triton kernels (RMSNorm, SwiGLU, RoPE, linear "
                                                      "cross-entropy; the `gpu` extra); CUDA only, ignored on CPU")
    save_steps: int = Field(50, description="checkpoint every N optimizer steps (resume point after preemption)")
    num_to_keep: int = Field(2, description="checkpoints kept in storage")
    logging_steps: int = Field(10, description="log loss and throughput every N steps")
    eval_steps: int | None = Field(None, description="validation loss every N steps; null = at the end only")
    seed: int = Field(42, description="training seed")
    cause_emotions: Literal["gold", "predicted", "noised"] = Field(
        "gold", description="emotions shown to the cause model in training: gold, predicted or noised")
    cause_noise_rate: float = Field(0.2, description="share of utterance emotions replaced at random when "
                                                     "cause_emotions=noised")
    emotion_balance: float = Field(0.0, ge=0.0, le=1.0, description=(
        "class balance of the emotion training targets: each target of label L is trained round((n_max / n_L) ** "
        "emotion_balance) times (n: targets per label in the training split; as repeated answer blocks, so the "
        "same as a loss weight); 0 = as they come, 0.5 = square-root balance, 1 = every label weighs the same"))
    emotion_ensemble: int = Field(1, ge=1, description=(
        "emotion adapters the pipeline trains, identical but for their seed (training.seed + 1000 k for k = 0 .. "
        "n-1), and averages at inference (inference.emotion_ensemble); 1 = one adapter"))

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _on_off(cls, value):
        """YAML reads a bare on / off as a boolean (``gradient_checkpointing: off``, ``...=on``)."""
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class ScalingSettings(_Strict):
    num_workers: int = Field(1, description="training workers (DDP ranks)")
    use_gpu: bool = Field(False, description="one GPU per worker")
    accelerator_type: str | None = Field(None, description="require this GPU type (A100, T4, ...); null = any")
    resources_per_worker: dict[str, float] | None = Field(None, description="extra resources per worker, e.g. "
                                                                            "{CPU: 8}")
    max_failures: int = Field(100, description="worker failures tolerated before the run fails (preemptions are "
                                               "counted apart)")
    max_preemption_failures: int = Field(-1, description="node preemptions tolerated before the run fails; "
                                                         "-1 = unlimited")
    concurrent_trainings: int = Field(1, ge=1, description="trainings the pipeline runs at once (emotion ensemble "
                                      "members and the cause model are independent); each asks for its workers, so on "
                                      "one GPU give each a share, e.g. resources_per_worker {GPU: 0.25}")


class StorageConfig(_Strict):
    path: str = Field("outputs/runs", description="training runs: local folder or s3://bucket/prefix")
    s3_endpoint: str | None = Field(None, description="S3-compatible endpoint URL (not a secret); null = "
                                                      "`MECPE_S3_ENDPOINT`; credentials come from the environment")
    s3_region: str | None = Field(None, description="S3 region; null = `AWS_REGION` / `AWS_DEFAULT_REGION`")
    run_name: str | None = Field(None, description="training run name; null = task + hash of everything that "
                                                   "shapes the result")
    shared_filesystem: bool = Field(False, description="every node mounts the local paths of this config (outputs, "
                                                       "runs, model, inputs) at the same place (NFS, EFS); without it "
                                                       "a step on a multi-node cluster refuses local paths")


class InferenceConfig(_Strict):
    emotion_adapter: str | None = Field(None, description="emotion LoRA adapter folder (local or s3://); null = "
                                                          "base model only")
    cause_adapter: str | None = Field(None, description="cause LoRA adapter folder (local or s3://); null = base "
                                                        "model only")
    emotion_ensemble: list[str] = Field(
        default_factory=list, description="further emotion LoRA adapters (local or s3://), e.g. the same recipe "
        "trained with other seeds: the emotion stage scores the seven labels with emotion_adapter and each of these on "
        "the same base and averages them (the mean probability, as a log-probability) before emotion_bias and the "
        "choice; method score only; the pipeline fills it from training.emotion_ensemble; [] = one adapter")
    emotion_ensemble_mode: Literal["average", "soup"] = Field(
        "average", description="how the emotion ensemble combines its adapters: average (each scores the labels, "
        "their probabilities averaged: one scoring pass per adapter) or soup (one model whose weights are the base "
        "plus the mean of the adapters' updates: one pass, as for one adapter; needs merged adapters, so "
        "quantization.mode none and merge_adapters auto or true)")
    share_base: bool = Field(False, description="one 4-bit base with both adapters per actor instead of one model "
                                                "per stage")
    emotion_method: Literal["score", "generate"] = Field(
        "score", description="score (pick the most likely of the seven labels) or generate (greedy + parse)")
    emotion_bias: dict[str, float] | None = Field(
        None, description="added to each label's answer log-probability before the choice (score method), e.g. "
                          "{neutral: 0, joy: 0.8}; the pipeline fills it when validation.fit_emotion_bias; null = none")
    rule_causes: list[RuleCause] = Field(
        default_factory=list, description="causes added to the cause model's answer of every emotional utterance "
        "(the union): self (the utterance itself), previous (the one before it); the rule baseline's causes. The "
        "seed team added self-causes to its system; on ECF validation the rule beat SmolLM2-135M's cause model in "
        "all 6 runs measured (bench/RESULTS.md); [] = the model's answer alone")
    cause_input: Literal["predicted", "gold"] = Field(
        "predicted", description="emotions read by the cause stage: predicted (the method) or gold (oracle "
                                 "analysis, benchmarks)")
    batch_size: int = Field(8, description="conversations per map_batches call")
    max_batch_tokens: int = Field(16384, description="token budget of one forward pass")
    num_actors: int = Field(1, description="model actors per stage")
    num_gpus: float = Field(0.0, description="GPUs per actor (1 on a T4 node; 0 on CPU)")
    num_cpus: float = Field(1.0, description="CPUs per actor")
    accelerator_type: str | None = Field(None, description="require this GPU type for the actors (T4 on the "
                                                           "cluster); null = any")
    max_new_tokens: int = Field(24, description="longest generated answer")
    reuse_prefix: bool = Field(True, description="compute each conversation's prompt prefix once and share its KV "
                                                 "cache")
    lines_per_block: int = Field(256, description="JSON Lines rows per Ray Data block when reading")
    merge_adapters: bool | Literal["auto"] = Field(
        "auto", description="give each stage its own copy of the base with its LoRA adapter merged into the weights "
                            "(no LoRA matmuls at inference: fewer FLOPs and kernels); auto = when quantization.mode is "
                            "none (a small bf16/fp32 base such as SmolLM2), never for NF4 (a merged 13B would be "
                            "bf16, twice); merging in bf16 rounds the merged weights, so scores move in the last bits")
    decode_step: DecodeStep = Field(
        "dynamic", description="how cause decoding steps run: dynamic (the mask and cache grow a column per slot and "
                               "finished rows leave the batch), static (fixed shapes for a whole batch: the cache's "
                               "preallocated room, one mask opened a column at a time), graph (static, each step one "
                               "CUDA graph replay on a GPU: the host issues one launch instead of every operator); "
                               "models with sliding-window layers always run dynamic")
    prefill_attention: PrefillAttention = Field(
        "sdpa", description="attention of the prefill forwards (label scoring; the pass before decoding steps): sdpa "
                            "(packed rows' dense mask), ragged (one flat sequence, varlen attention calls without a "
                            "mask, FlashAttention's or the mem-efficient kernel's; no sliding-window models; "
                            "mecpe.engine.ragged), ragged_compiled (ragged, the decoder compiled for dynamic lengths: "
                            "mecpe.engine.compiled), flex (FlexAttention block masks, label scoring's decoder compiled "
                            "at static buckets; 6% of answers changed in bf16 for +1% speed: bench/RESULTS.md) or "
                            "compiled (sdpa, label scoring's decoder compiled); model on sdpa")
    liger_kernels: bool = Field(
        False, description="Liger's fused Triton kernels (RMSNorm, SwiGLU/GeGLU, RoPE) in the predictor actors' "
                           "forwards; on an H100 slower (SmolLM2 actor 954.2 -> 756.9 utt/s, first use including "
                           "Triton's compiling) with 5% of conversations answered otherwise "
                           "(bench/results/2026-12-07-liger-h100), so off; CUDA only; needs liger-kernel (gpu extra)")
    gpu_memory_gib: float | None = Field(
        None, description="cap each predictor actor's GPU memory (torch.cuda.set_per_process_memory_fraction), e.g. "
                          "15 to run fractional actors on one large GPU as T4-sized ones; null = no cap")

    @field_validator("emotion_bias")
    @classmethod
    def _known_labels(cls, value):
        unknown = sorted(set(value or {}) - set(EMOTIONS))
        if unknown:
            raise ValueError(f"emotion_bias: unknown labels {unknown}; the labels are {list(EMOTIONS)}")
        return value

    @model_validator(mode="after")
    def _ensemble_scores(self):
        if self.emotion_ensemble and self.emotion_method != "score":
            raise ValueError("emotion_ensemble averages label scores: it needs emotion_method score, not "
                             f"{self.emotion_method!r}")
        if self.emotion_ensemble and not self.emotion_adapter:
            raise ValueError("emotion_ensemble adds adapters to emotion_adapter, which is not set")
        return self

    def adapter_keys(self) -> list[tuple[str, str | None]]:
        """(config key, URI) of every adapter the stages load: the emotion adapter, the ensemble's, the cause
        adapter."""
        return [("inference.emotion_adapter", self.emotion_adapter),
                *((f"inference.emotion_ensemble[{k}]", uri) for k, uri in enumerate(self.emotion_ensemble)),
                ("inference.cause_adapter", self.cause_adapter)]

    def bias_vector(self) -> list[float] | None:
        """``emotion_bias`` in EMOTIONS order (missing labels: 0), or None."""
        return None if self.emotion_bias is None else [float(self.emotion_bias.get(e, 0.0)) for e in EMOTIONS]


class ValidationConfig(_Strict):
    score: bool = Field(False, description="run the trained system on the validation split and score it "
                                           "(`validation/metrics.json`): what choices are made on; the test set "
                                           "never is")
    fit_emotion_bias: bool = Field(False, description="fit inference.emotion_bias on the validation split's label "
                                                      "scores (maximises the official weighted_f1 with self/previous "
                                                      "causes; implies score) and infer the test set with it")


class Config(_Strict):
    """A whole experiment. Every step reads the sections it needs."""

    output_dir: str = Field("outputs/local", description="where a step writes its outputs (local folder or s3:// "
                                                         "prefix)")
    ray_address: str | None = Field(None, description="Ray cluster to join; null = RAY_ADDRESS or a new local "
                                                      "instance")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)

    @model_validator(mode="after")
    def _soup_merges(self):
        inf = self.inference
        if inf.emotion_ensemble_mode == "soup" and (self.quantization.mode != "none" or inf.merge_adapters is False):
            raise ValueError("inference.emotion_ensemble_mode=soup averages the adapters merged into the base's "
                             f"weights: it needs quantization.mode none (not {self.quantization.mode!r}) and "
                             f"inference.merge_adapters auto or true (not {inf.merge_adapters!r})")
        return self

    def extras(self) -> set[str]:
        """The pyproject extras its settings need beyond mecpe's dependencies (a config's ``# Install:`` line names
        them; tests/test_jobs.py holds every config to it)."""
        return {"gpu"} if self.training.use_liger_kernel else set()


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides (values parsed as YAML) to a nested dict, in order."""
    out = json.loads(json.dumps(raw))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = _parse_value(value)
    return out


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or defaults), apply overrides, validate; local paths made absolute."""
    raw: dict[str, Any] = {}
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                raw = yaml.safe_load(fh) or {}
        except FileNotFoundError:
            raise MissingInputError(f"{path}: no such config file") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [])
    try:
        cfg = Config.model_validate(raw)
    except Exception as exc:  # pydantic's message names the field
        raise ConfigError(f"{path or '<defaults>'}: invalid config: {exc}") from exc
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
    cfg.inference.emotion_ensemble = [local_model(u) for u in cfg.inference.emotion_ensemble]
    return cfg


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def config_hash(*parts: Any, length: int = 10) -> str:
    """Stable short hash of JSON-able parts (pydantic models are dumped first)."""
    norm = [p.model_dump(mode="json") if isinstance(p, BaseModel) else p for p in parts]
    blob = json.dumps(norm, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def config_keys() -> dict[str, Any]:
    """Every leaf key (``section.name``) with its pydantic field, in declaration order."""
    out: dict[str, Any] = {}

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
            else:
                out[f"{prefix}{name}"] = field

    walk(Config, "")
    return out


def config_reference_markdown() -> str:
    """Markdown table of every config key, its default and its description (docs/configuration.md)."""
    rows = ["| key | default | what it does |", "|---|---|---|"]
    for key, field in config_keys().items():
        if not field.description:
            raise KeyError(f"config key {key} has no description")
        default = field.get_default(call_default_factory=True)
        shown = json.dumps(default) if not isinstance(default, str) else default
        rows.append(f"| `{key}` | `{shown}` | {field.description} |")
    return "\n".join(rows)
