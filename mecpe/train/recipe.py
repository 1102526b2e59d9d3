"""The training recipe: what each Ray Train worker runs (``train_loop``), top to bottom like the method.

    examples (mecpe.prompts ids, answer-only labels) -> 4-bit base (mecpe.modeling) -> trl SFTTrainer with LoRA
    -> resume from the newest complete checkpoint -> fit -> validation loss -> adapter + metrics to storage (rank 0)

Resume: ``ray.train.get_checkpoint()`` and the checkpoints stored under the run give the newest complete HF checkpoint
(``mecpe.train.checkpoints``), passed to ``trainer.train(resume_from_checkpoint=...)``, which restores global step,
optimizer, scheduler and RNG and skips the batches already seen.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from mecpe import layout, modeling, storage
from mecpe.config import LoraSettings, ModelConfig, PromptConfig, QuantizationConfig, TrainingConfig
from mecpe.errors import InputError
from mecpe.layout import TrainRunLayout
from mecpe.prompts import PromptBuilder
from mecpe.train.examples import (
    PackedCollator, TokenBudgetBatchSampler, build_examples, build_packed_rows, emotion_repeats, read_split,
    shown_emotions, window_packed_masks,
)

log = logging.getLogger("mecpe.train")


@dataclass(frozen=True)
class TrainLoopSpec:
    """Everything ``train_loop`` uses, built once by the driver (``mecpe.train.driver.loop_spec``): the run, its
    data, and the config sections that shape the adapter. Only this crosses into the Ray Train workers."""

    task: str
    run_name: str
    run_uri: str  # <storage.path>/<run_name>
    config_hash: str
    train_uri: str
    val_uri: str | None
    limit_train: int | None
    limit_val: int | None
    model: ModelConfig
    quantization: QuantizationConfig
    lora: LoraSettings
    prompt: PromptConfig
    training: TrainingConfig
    use_gpu: bool
    storage_settings: dict
    predicted_emotions: dict | None  # normalized {conversation_id: {utterance_id: label}} (cause_emotions=predicted)
    config_record: str  # the whole resolved config as YAML, written beside the adapter as its record; not read here


@dataclass
class Worker:
    """Who and where this worker is."""

    spec: TrainLoopSpec
    rank: int
    world: int
    device: str


# ----------------------------------------------------------------------------------------------- setup steps


def _setup_worker(config: dict) -> Worker:
    import ray.train

    from mecpe import log_to_stdout

    log_to_stdout()
    # Token-budget batches change shape every step; expandable segments let the caching allocator grow blocks
    # instead of carving new ones (+3% on the H200, bench/RESULTS.md). Set before the first CUDA allocation.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    spec: TrainLoopSpec = config["spec"]
    storage.configure(spec.storage_settings)
    ctx = ray.train.get_context()
    device = modeling.pick_device(ctx.get_local_rank()) if spec.use_gpu else "cpu"
    return Worker(spec, ctx.get_world_rank(), ctx.get_world_size(), device)


def _setup_examples(w: Worker, builder: PromptBuilder) -> tuple[dict, dict]:
    """Train and validation examples of the task (rows, stats per split)."""
    spec, tcfg = w.spec, w.spec.training
    predicted = spec.predicted_emotions

    def emotions_of(conv):
        return shown_emotions(conv, tcfg.cause_emotions, noise_rate=tcfg.cause_noise_rate, seed=tcfg.seed,
                              predicted=predicted)

    splits = {"train": read_split(spec.train_uri, spec.limit_train),
              "val": read_split(spec.val_uri, spec.limit_val)}
    build = build_packed_rows if tcfg.reuse_prefix else build_examples
    repeats = (emotion_repeats(splits["train"], tcfg.emotion_balance)
               if spec.task == "emotion" and tcfg.emotion_balance > 0 else None)
    if repeats and w.rank == 0:
        log.info("emotion/train: targets repeated per label (training.emotion_balance=%g): %s", tcfg.emotion_balance,
                 repeats)
    rows, stats = {}, {}
    for name, convs in splits.items():
        rows[name], stats[name] = build(spec.task, convs, builder, emotions_of=emotions_of,
                                        max_answer_tokens=spec.prompt.max_answer_tokens,
                                        repeats=repeats if name == "train" else None)  # validation loss as it comes
        if w.rank == 0:
            s = stats[name]
            log.info("%s/%s: %d examples from %d conversations, %d prompts shortened (%d utterances dropped), %d "
                     "over the %d-token budget (kept, not cut)%s; %d tokens%s", spec.task, name, s["examples"],
                     s["conversations"], s["shortened_prompts"], s["dropped_utterances"], s["over_budget"],
                     s["token_budget"], f": {s['over_budget_ids'][:20]}" if s["over_budget"] else "",
                     s["computed_tokens"], f" in {s['rows']} rows (one per example: {s['example_tokens']})"
                     if "rows" in s else "")
    if not rows["train"]:
        raise InputError(f"no {spec.task} training examples in {spec.train_uri}")
    return rows, stats


def use_gradient_checkpointing(setting: str, device: str) -> bool:
    """``auto``: off on CPU (memory is not the limit there); on a GPU, off with >= 70 GiB (H100/H200 class, where
    it costs ~25% speed for nothing: 13B NF4, r 16, batch 4 x 1024 fits), on below (A100 40 GB, T4)."""
    if setting != "auto":
        return setting == "on"
    if not str(device).startswith("cuda"):
        return False
    import torch

    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    return total < 70 * 2**30


def pick_optimizer(name: str, device: str) -> str:
    """bitsandbytes' paged / 8-bit optimizers need CUDA: on CPU they fall back to ``adamw_torch``."""
    if not str(device).startswith("cuda") and any(k in name for k in ("paged", "8bit", "bnb")):
        return "adamw_torch"
    return name


def _renamed_args(config_cls, *, checkpointing: bool, warmup_ratio: float, group_by_length: bool) -> dict:
    """Arguments transformers renamed within 5.x (5.17 and 5.2x), under the names this version knows."""
    fields = config_cls.__dataclass_fields__
    prefix = "activation" if "activation_checkpointing" in fields else "gradient"
    out = {f"{prefix}_checkpointing": checkpointing,
           f"{prefix}_checkpointing_kwargs": {"use_reentrant": False} if checkpointing else None}
    ratio = min(max(warmup_ratio, 0.0), 0.999)
    out.update({"warmup_ratio": ratio} if "warmup_ratio" in fields else {"warmup_steps": ratio})  # float < 1: ratio
    if "train_sampling_strategy" in fields:
        out["train_sampling_strategy"] = "group_by_length" if group_by_length else "random"
    else:
        out["group_by_length"] = group_by_length
    return out


def _sft_config(w: Worker, out_dir: str, *, grad_ckpt: bool, optim: str, has_val: bool):
    """trl's ``SFTConfig`` from the training section (the one place config keys become Trainer arguments).

    Why not ``TrlParser`` reading the YAML into ``SFTConfig`` directly: the experiment's schema is mecpe's (the
    ``training`` section, validated with its descriptions and hashed into the run name), and it must not move with
    transformers' renames inside 5.x (``_renamed_args``: the image has 5.17, CPU installs 5.2x). Several arguments
    are not settings at all but follow from the worker's device: bf16/fp16/CPU, Liger (CUDA only), the optimizer's
    CPU fallback, pinned memory; others are fixed by the method (no truncation, our own example building)."""
    import torch
    from trl import SFTConfig

    tcfg, dtype = w.spec.training, modeling.compute_dtype(w.spec.quantization, w.device)
    eval_at_steps = bool(tcfg.eval_steps and has_val)
    cuda = w.device.startswith("cuda")
    return SFTConfig(
        output_dir=out_dir,
        num_train_epochs=tcfg.epochs, max_steps=tcfg.max_steps,
        per_device_train_batch_size=tcfg.per_device_batch_size, per_device_eval_batch_size=tcfg.per_device_batch_size,
        gradient_accumulation_steps=tcfg.grad_accum,
        learning_rate=tcfg.learning_rate, lr_scheduler_type=tcfg.lr_scheduler,
        optim=optim, weight_decay=tcfg.weight_decay, max_grad_norm=tcfg.max_grad_norm,
        **_renamed_args(SFTConfig, checkpointing=grad_ckpt, warmup_ratio=tcfg.warmup_ratio,
                        group_by_length=tcfg.group_by_length),
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, use_cpu=not cuda,
        # Triton kernels: CUDA only
        use_liger_kernel=tcfg.use_liger_kernel and cuda and modeling.liger_installed("training.use_liger_kernel"),
        logging_strategy="steps", logging_steps=tcfg.logging_steps, logging_first_step=True,
        save_strategy="steps", save_steps=tcfg.save_steps,
        save_total_limit=1,  # local copies only; storage keeps training.num_to_keep (CheckpointConfig)
        eval_strategy="steps" if eval_at_steps else "no", eval_steps=tcfg.eval_steps if eval_at_steps else None,
        seed=tcfg.seed, data_seed=tcfg.seed,
        report_to=["tensorboard"], disable_tqdm=True,
        max_length=None, packing=False,  # no truncation: over-budget examples are reported, not cut
        dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False,
        dataloader_num_workers=0, dataloader_pin_memory=cuda,
        ddp_find_unused_parameters=False,  # LoRA uses every adapter weight in every step
    )


def _trainer_class(max_batch_tokens: int | None):
    """trl's ``SFTTrainer``, with token-budget micro-batches when ``max_batch_tokens`` is set."""
    from trl import SFTTrainer

    if not max_batch_tokens:
        return SFTTrainer

    class TokenBudgetSFTTrainer(SFTTrainer):
        def get_train_dataloader(self):
            from torch.utils.data import DataLoader

            sampler = TokenBudgetBatchSampler(list(self.train_dataset["length"]), max_batch_tokens, self.args.seed)
            loader = DataLoader(self.train_dataset, batch_sampler=sampler, collate_fn=self.data_collator,
                                num_workers=self.args.dataloader_num_workers,
                                pin_memory=self.args.dataloader_pin_memory)
            return self.accelerator.prepare(loader)  # DDP: each rank takes every world-th batch

    return TokenBudgetSFTTrainer


def _adapter_to_fp32_unless_bf16(model, compute_dtype) -> None:
    """trl keeps QLoRA adapter weights in bf16 (QLoRA paper). Under fp16 AMP (T4) or fp32 (CPU) they must be fp32:
    AMP's grad scaler refuses low-precision gradients, and fp32 compute gains nothing from bf16 weights."""
    import torch

    if compute_dtype == torch.bfloat16:
        return
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def _setup_trainer(w: Worker, tok, model, rows: dict, work: str, *, grad_ckpt: bool, optim: str):
    """trl's SFTTrainer (its own collator pads with the tokenizer's pad id and the labels with -100) with LoRA, our
    callbacks, and Ray Train's report callback; returns (trainer, throughput callback)."""
    from datasets import Dataset
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
    from transformers import PrinterCallback, ProgressCallback

    from mecpe.train.callbacks import (
        LogLineCallback, ManifestCallback, PreemptionCheckpointCallback, TensorBoardSyncCallback, ThroughputCallback,
    )

    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:  # else EOS would be masked out with padding
        raise ValueError("the tokenizer's pad token must exist and differ from eos")
    out_dir = os.path.join(work, "hf")
    args = _sft_config(w, out_dir, grad_ckpt=grad_ckpt, optim=optim, has_val=bool(rows["val"]))
    collator = None
    if w.spec.training.reuse_prefix:
        impl = getattr(model.config, "_attn_implementation", None) or "eager"
        collator = PackedCollator(tok.pad_token_id, impl)
    throughput = ThroughputCallback(w.world)
    callbacks = [throughput, LogLineCallback(),
                 TensorBoardSyncCallback(os.path.join(out_dir, "runs"), storage.join(w.spec.run_uri, "tensorboard"), w.rank),
                 PreemptionCheckpointCallback(),
                 ManifestCallback(w.rank, w.world),  # before the report: the manifest travels inside the checkpoint
                 RayTrainReportCallback()]
    trainer = _trainer_class(w.spec.training.max_batch_tokens)(
        model=model, args=args, processing_class=tok, peft_config=modeling.get_peft_config(w.spec.lora),
        data_collator=collator,
        train_dataset=Dataset.from_list(rows["train"]),
        eval_dataset=Dataset.from_list(rows["val"]) if rows["val"] else None, callbacks=callbacks)
    _adapter_to_fp32_unless_bf16(trainer.model, modeling.compute_dtype(w.spec.quantization, w.device))
    if collator is not None:
        window_packed_masks(trainer.model)  # sliding-window layers: their own masks (the batch keeps one for trl)
    throughput.attach(trainer.model, tok.pad_token_id, collator)
    # ours first: the throughput fields must be in the logs before TensorBoard and the log line see them
    handler = trainer.callback_handler
    handler.callbacks.sort(key=lambda cb: not isinstance(cb, (ThroughputCallback, LogLineCallback)))
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    return prepare_trainer(trainer), throughput


def _setup_resume(w: Worker, work: str) -> tuple[str | None, Any, list]:
    """(local checkpoint folder or None, its ``TrainerState`` or None, checkpoints passed over)."""
    import ray.train
    from transformers import TrainerState

    from mecpe.train.checkpoints import restore_checkpoint

    skipped: list[dict] = []
    resume = restore_checkpoint(ray.train.get_checkpoint(), work, w.spec.run_uri, skipped)
    state = TrainerState.load_from_json(os.path.join(resume, "trainer_state.json")) if resume else None
    if state is not None and w.rank == 0:
        log.info("resuming from the checkpoint of step %s", state.global_step)
    return resume, state, skipped


def _restore_finished(trainer, checkpoint: str, state):
    """Adapter weights and trainer state from a checkpoint of the run's last step (the node was lost before the
    adapter was written), without training: ``trainer.train`` resumed from it would run one step more."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict
    from transformers.trainer_utils import TrainOutput

    set_peft_model_state_dict(trainer.model, load_peft_weights(checkpoint, device="cpu"))
    trainer.state = state
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    return TrainOutput(state.global_step, sum(losses) / len(losses) if losses else 0.0, {})


def _out_of_memory(w: Worker, trainer, exc, stats: dict, grad_ckpt: bool) -> dict:
    """A single worker out of GPU memory: every restart would reload the base and fail on the same batch, so the
    run ends here with the fix in the message instead of Ray Train retrying it max_failures times."""
    tcfg = w.spec.training
    msg = (f"out of GPU memory at step {trainer.state.global_step} on {w.device} "
           f"(per_device_batch_size={tcfg.per_device_batch_size}, max_batch_tokens={tcfg.max_batch_tokens}, "
           f"gradient checkpointing {'on' if grad_ckpt else 'off'}, longest example {stats['train']['max_length']} "
           f"tokens): lower training.per_device_batch_size (or training.max_batch_tokens), set "
           f"training.gradient_checkpointing=on or lower prompt.max_prompt_tokens. {str(exc).splitlines()[0]}")
    storage.write_json(TrainRunLayout(w.spec.run_uri).error, {"error": "out_of_memory", "message": msg})
    log.error(msg)
    return {"error": msg}


def _unloadable(w: Worker, exc: BaseException) -> dict:
    """A base model that cannot be loaded from a local path (files missing, a tokenizer transformers cannot read)
    fails the same way on every restart: the run ends here with the reason instead of Ray Train retrying it
    max_failures times (100 by default, ~5 s each)."""
    msg = (f"the base model {w.spec.model.base} could not be loaded on {w.device}: "
           f"{type(exc).__name__}: {next((line for line in str(exc).splitlines() if line.strip()), '')}")
    if w.rank == 0:
        storage.write_json(TrainRunLayout(w.spec.run_uri).error, {"error": "model_load", "message": msg})
    log.error(msg)
    return {"error": msg}


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _save_adapter(w: Worker, trainer, tok, metrics: dict, local: str) -> None:
    """LoRA adapter + tokenizer + resolved config + mecpe_train.json -> ``<run>/adapter/``; the marker goes last."""
    spec = w.spec
    # LoRA weights only: the base's embeddings never change (LoRA does not train them; a pad token added to a
    # vocabulary without a safe one is re-created identically at load, mecpe.modeling.resize_embeddings), and peft
    # would otherwise store the whole matrix with every adapter once the vocabulary grew (32,001 x 5,120 for Llama-2).
    trainer.model.save_pretrained(local, save_embedding_layers=False)
    tok.save_pretrained(local)
    with open(os.path.join(local, layout.CONFIG_FILE), "w", encoding="utf-8") as fh:
        fh.write(spec.config_record)
    meta = {"task": spec.task, "run_name": spec.run_name, "config_hash": spec.config_hash,
            "global_step": metrics["global_step"], "base_model": spec.model.base, "revision": spec.model.revision,
            "cause_emotions": spec.training.cause_emotions if spec.task == "cause" else None,
            "prompt": spec.prompt.model_dump(mode="json"),
            "metrics": {k: v for k, v in metrics.items() if k != "log_history"},
            "log_history": metrics["log_history"]}
    with open(os.path.join(local, layout.TRAIN_META_FILE), "w", encoding="utf-8") as fh:
        json.dump(_jsonable(meta), fh, indent=2)
    adapter_uri = TrainRunLayout(spec.run_uri).adapter
    storage.upload_dir(local, adapter_uri)
    storage.write_json(layout.adapter_marker(adapter_uri),
                       {"run_name": spec.run_name, "global_step": metrics["global_step"], "time": time.time()})
    log.info("adapter written to %s", adapter_uri)


# ----------------------------------------------------------------------------------------------- the loop


def train_loop(config: dict) -> dict:
    """Ray Train worker function: examples -> 4-bit base -> LoRA SFT with trl -> resume -> fit -> adapter."""
    import torch

    w = _setup_worker(config)
    t_load = time.perf_counter()
    try:
        model, tok = modeling.load(w.spec.model, w.spec.quantization, device=w.device, for_training=True)
    except (ValueError, OSError) as exc:
        if isinstance(exc, OSError) and not os.path.isdir(w.spec.model.base):
            raise  # object storage or a hub may be down for a while: Ray Train's restart tries again
        return _unloadable(w, exc)
    load_s = round(time.perf_counter() - t_load, 1)
    rows, stats = _setup_examples(w, PromptBuilder(tok, **w.spec.prompt.builder_kwargs()))
    grad_ckpt = use_gradient_checkpointing(w.spec.training.gradient_checkpointing, w.device)
    optim = pick_optimizer(w.spec.training.optim, w.device)
    dtype = modeling.compute_dtype(w.spec.quantization, w.device)
    if w.rank == 0:
        log.info("device %s, compute dtype %s, gradient checkpointing %s, %d worker(s), optimizer %s%s", w.device,
                 str(dtype).removeprefix("torch."), "on" if grad_ckpt else "off", w.world, optim,
                 f" ({w.spec.training.optim} needs CUDA: {optim} on CPU)" if optim != w.spec.training.optim else "")

    with tempfile.TemporaryDirectory(prefix=f"mecpe-{w.spec.run_name}-") as work:
        trainer, throughput = _setup_trainer(w, tok, model, rows, work, grad_ckpt=grad_ckpt, optim=optim)
        resume, state, skipped = _setup_resume(w, work)
        resumed_from = state.global_step if state is not None else None
        try:
            if state is not None and state.max_steps and state.global_step >= state.max_steps:
                output = _restore_finished(trainer, resume, state)
            else:
                output = trainer.train(resume_from_checkpoint=resume)
        except torch.OutOfMemoryError as exc:
            if w.world > 1:  # the other ranks wait in a collective: only a raise (and Ray's restart) frees them
                raise
            return _out_of_memory(w, trainer, exc, stats, grad_ckpt)

        history = list(trainer.state.log_history)
        metrics = {k: v for k, v in output.metrics.items() if isinstance(v, (int, float))}
        # Over the whole run (the history survives resumes); some transformers versions divide only this
        # attempt's loss sum by all steps after a resume.
        logged = [h["loss"] for h in history if "loss" in h]
        metrics["train_loss"] = sum(logged) / len(logged) if logged else output.training_loss
        if rows["val"]:
            metrics.update(trainer.evaluate())
        attempt_steps = [h["step"] for h in history if "loss" in h and h["step"] > (resumed_from or 0)]
        metrics.update({
            "global_step": trainer.state.global_step, "resumed_from_step": resumed_from,
            "skipped_checkpoints": skipped, "first_logged_step": attempt_steps[0] if attempt_steps else None,
            "throughput": throughput.totals(), "examples": stats,
            "device": w.device, "compute_dtype": str(dtype).removeprefix("torch."), "optimizer": optim,
            "gradient_checkpointing": grad_ckpt, "num_workers": w.world, "model_load_s": load_s,
            "use_liger_kernel": bool(trainer.args.use_liger_kernel),
            "gpu_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if w.device.startswith("cuda")
            else None,
            "log_history": trainer.state.log_history,
        })
        if w.rank == 0:
            _save_adapter(w, trainer, tok, metrics, os.path.join(work, layout.ADAPTER_DIR))
    return _jsonable(metrics)
