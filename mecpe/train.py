"""QLoRA supervised fine-tuning of the emotion or the cause model as a Ray Train job.

``run_training`` (driver) names the run, returns at once when that run already finished, and otherwise builds a
``TorchTrainer`` whose workers run ``train_loop``: tokenizer and 4-bit base loaded by ``mecpe.modeling``, examples
built by ``mecpe.prompts``, LoRA + trl ``SFTTrainer``, Ray Train checkpoints.

Examples are pre-tokenized here (``mecpe.prompts`` builds the ids, never this module) with labels = -100 on the
prompt, so the loss is on the answer and its EOS only (the reference trained on the prompt too and masked EOS out).
Nothing is truncated: an example still longer than ``prompt.max_prompt_tokens + prompt.max_answer_tokens`` after the
prompt builder's shortening is trained as is and reported (count and ids, in the logs and in the metrics).

Which emotions the cause model sees (``training.cause_emotions``): ``gold`` (the method); ``noised`` (each
utterance's label replaced by a random other label with probability ``training.cause_noise_rate``, seeded per
conversation); ``predicted`` (an emotion model's predictions, passed to ``run_training`` as ``predicted_emotions``).
Cause examples are the utterances whose *shown* emotion is not neutral (what inference asks about), each with its
gold causes as target (``[]`` for an utterance that is neutral in gold).

Resume: the run name is ``<task>-<hash of everything that shapes the adapter>`` (or ``storage.run_name``), so a
re-run with the same settings uses the same ``RunConfig(storage_path, name)``. Ray Train then restores the run's
checkpoint list and ``ray.train.get_checkpoint()`` returns the latest one. ``RayTrainReportCallback`` stores each
Hugging Face checkpoint folder (adapter, optimizer, scheduler, RNG states, ``trainer_state.json``) as the
``checkpoint/`` sub-folder of a Ray checkpoint; the worker downloads it and passes that sub-folder to
``trainer.train(resume_from_checkpoint=...)``, which restores global step, optimizer, scheduler and RNG and skips the
batches already seen. Every checkpoint carries ``mecpe_checkpoint_rank<r>.json`` (size and sha256 of each file, written
before Ray Train uploads the folder); a resumed worker verifies the checkpoint it is given against it and, when that
one is truncated or partly uploaded, falls back to the newest complete checkpoint stored under the run (reported in
the metrics as ``skipped_checkpoints``); a complete checkpoint newer than Ray Train's latest (a worker killed after
uploading it, before the controller took the report) is used too. A finished run has ``<storage>/<run>/adapter/`` with a completion marker written last; a
re-run then returns without starting Ray Train at all.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from mecpe import storage
from mecpe.config import Config, config_hash, dump_config, load_config


TASKS = ("emotion", "cause")
META_FILE = "mecpe_train.json"
COMPLETE_MARKER = ".mecpe_train_complete"  # written last into the adapter folder
FAULT_MARKER = ".fault_injected"  # in the run folder: the test-only fault fires once per run
ERROR_FILE = "mecpe_error.json"  # in the run folder: why the last attempt stopped without an adapter
CHECKPOINT_MANIFEST = "mecpe_checkpoint_rank{rank}.json"  # in each HF checkpoint folder: size + sha256 per file
HF_CHECKPOINT = "checkpoint"  # RayTrainReportCallback.CHECKPOINT_NAME: the HF folder inside a Ray checkpoint
LABELS = ("neutral", "anger", "disgust", "fear", "joy", "sadness", "surprise")  # == mecpe.data.EMOTIONS
# Training settings that do not change the adapter (bookkeeping, tests), left out of the run hash.
_NOT_HASHED = {"fail_after_step", "save_steps", "num_to_keep", "logging_steps", "eval_steps"}
_MAX_LISTED = 50  # over-budget example ids kept in the metrics


@dataclass
class TrainResult:
    run_name: str
    run_dir: str  # <storage.path>/<run_name>: Ray Train's run folder (checkpoints) and the adapter
    adapter_uri: str  # <run_dir>/adapter/
    metrics: dict = field(default_factory=dict)
    global_step: int = 0
    config_hash: str = ""
    reused: bool = False  # True: the run had already finished; nothing was trained


def _log(msg: str) -> None:
    print(f"[mecpe.train] {msg}", flush=True)


# =============================================================================================== examples


def shown_emotions(conv: Any, mode: str = "gold", *, noise_rate: float = 0.2, seed: int = 42,
                   predicted: Mapping[str, Mapping[int, str]] | None = None) -> dict[int, str]:
    """The emotion labels the cause model reads for one conversation (see the module docstring)."""
    gold = {u.id: u.emotion for u in conv.utterances}
    if mode == "gold":
        return gold
    if mode == "noised":
        rng = random.Random(f"{seed}:{conv.id}")  # str seeds are hashed with sha512: stable across processes
        return {uid: (rng.choice([x for x in LABELS if x != lab]) if rng.random() < noise_rate else lab)
                for uid, lab in gold.items()}
    if mode == "predicted":
        pred = (predicted or {}).get(str(conv.id))
        missing = [uid for uid in gold if not pred or pred.get(uid) not in LABELS]
        if missing:
            raise ValueError(f"conversation {conv.id}: no predicted emotion for utterances {missing[:10]}")
        return {uid: pred[uid] for uid in gold}
    raise ValueError(f"unknown cause_emotions mode {mode!r}")


def normalize_predictions(obj: Any) -> dict[str, dict[int, str]]:
    """``{conversation_id: {utterance_id: label}}`` from that mapping (str or int keys), or from a list of
    prediction records in the official format (``Subtask_2_pred.json``), or from a JSON file (local or s3://)."""
    if isinstance(obj, (str, os.PathLike)):
        obj = storage.read_json(str(obj))
    if isinstance(obj, list):
        obj = {rec["conversation_ID"]: {u["utterance_ID"]: u.get("emotion") for u in rec["conversation"]}
               for rec in obj}
    if not isinstance(obj, Mapping):
        raise TypeError(f"predicted emotions: expected a mapping or a list of records, got {type(obj).__name__}")
    return {str(cid): {int(uid): lab for uid, lab in utts.items()} for cid, utts in obj.items()}


def build_examples(task: str, convs: Sequence[Any], builder: Any, *, max_answer_tokens: int = 64,
                   emotions_of: Any = None) -> tuple[list[dict], dict]:
    """Pre-tokenized examples (``input_ids``, ``labels`` = -100 on the prompt, ``length``, ids) and their stats.

    ``builder`` is a ``mecpe.prompts.PromptBuilder``; ``emotions_of(conv) -> {utt: label}`` gives the emotions
    the cause model reads (default: gold). Over-budget examples are kept (never cut) and listed in the stats."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    budget = builder.max_prompt_tokens + max_answer_tokens
    rows: list[dict] = []
    shortened = dropped = 0
    over: list[str] = []
    for conv in convs:
        if task == "emotion":
            items = [(u.id, builder.emotion_prompt(conv, u.id), builder.emotion_answer(u.id, u.emotion))
                     for u in conv.utterances]
        else:
            shown = emotions_of(conv) if emotions_of else {u.id: u.emotion for u in conv.utterances}
            items = [(u.id, builder.cause_prompt(conv, u.id, shown), builder.cause_answer(conv.causes_of(u.id)))
                     for u in conv.utterances if shown[u.id] != "neutral"]
        for uid, prompt, answer in items:
            ids = prompt.ids + answer
            rows.append({"input_ids": ids, "labels": [-100] * len(prompt) + list(answer), "length": len(ids),
                         "conv_id": str(conv.id), "utt_id": int(uid)})
            if prompt.dropped_utterances:
                shortened += 1
                dropped += prompt.dropped_utterances
            if len(ids) > budget:
                over.append(f"{conv.id}:{uid}")
    lengths = [r["length"] for r in rows]
    stats = {"examples": len(rows), "conversations": len(convs), "shortened_prompts": shortened,
             "dropped_utterances": dropped, "over_budget": len(over), "over_budget_ids": over[:_MAX_LISTED],
             "token_budget": budget, "max_length": max(lengths, default=0),
             "mean_length": round(sum(lengths) / len(lengths), 1) if lengths else 0.0}
    return rows, stats


class PadCollator:
    """Right-pads a batch with the pad id (never eos, so EOS stays a learned target) and masks padding in the
    labels; extra columns (``length``, ids) are dropped."""

    def __init__(self, pad_token_id: int, eos_token_id: int | None = None):
        if pad_token_id is None or pad_token_id == eos_token_id:
            raise ValueError("the pad token must exist and differ from eos (else EOS would be masked out)")
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), -100, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[i, :n] = torch.as_tensor(e["input_ids"])
            labels[i, :n] = torch.as_tensor(e["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class TokenBudgetBatchSampler:
    """Micro-batches under a token budget: examples sorted by length are cut into runs whose padded size
    (count x longest) stays within ``max_tokens``; the runs are shuffled (seed + epoch). Short examples come many
    to a batch and long ones few, so every step does about the same work at almost no padding, and a 4-bit base
    dequantizes its weights once per ``max_tokens`` tokens instead of once per fixed example count.

    Deterministic for a seed, so a resumed run skips exactly the batches it already trained on."""

    def __init__(self, lengths: Sequence[int], max_tokens: int, seed: int = 0):
        if max_tokens < 1:
            raise ValueError(f"training.max_batch_tokens must be positive, got {max_tokens}")
        self.batches: list[list[int]] = []
        batch: list[int] = []
        for i in sorted(range(len(lengths)), key=lambda k: (lengths[k], k)):
            # ascending order: the newest example is the longest, so the padded size is count x its length
            if batch and (len(batch) + 1) * lengths[i] > max_tokens:
                self.batches.append(batch)
                batch = []
            batch.append(i)  # an example longer than the budget alone is a batch of one (reported, never cut)
        if batch:
            self.batches.append(batch)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        order = list(range(len(self.batches)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return (self.batches[k] for k in order)


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


def read_split(uri: str | None, limit: int | None) -> list:
    """Conversations of a split (the first ``limit``). An unreadable file is an error; invalid conversations are
    skipped with a count (a prepared split has none: ``prepare`` already set them aside)."""
    if not uri:
        return []
    from mecpe.data import read_conversations

    res = read_conversations(uri, require_labels=True)
    if res.file_errors:
        raise ValueError(f"{uri}: unreadable: {'; '.join(str(e) for e in res.file_errors[:3])}")
    if res.rejects:
        _log(f"{uri}: {len(res.rejects)} invalid conversations skipped, e.g. "
             f"{res.rejects[0].location}: {res.rejects[0].reason}")
    return res.conversations[:limit] if limit is not None else res.conversations


# =============================================================================================== device choices


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


# =============================================================================================== callbacks


def _callbacks():
    from transformers import TrainerCallback

    class ThroughputCallback(TrainerCallback):
        """Useful-token throughput: non-pad tokens per second of wall time (per worker) and the share of the
        padded batches they fill, added to every training log line (so TensorBoard and Ray metrics get them).

        Counted by a forward pre-hook on the model (training forwards only), so it sees the collated batches
        whatever the data loader does."""

        def __init__(self):
            self._useful, self._padded = 0, 0  # device-side sums: no host sync per micro-batch
            self.useful = self.padded = 0
            self._mark = (0, 0, time.perf_counter())
            self.started = None

        def attach(self, model) -> None:
            model.register_forward_pre_hook(self._count, with_kwargs=True)

        def _count(self, module, args, kwargs):
            if not module.training:
                return
            mask, ids = kwargs.get("attention_mask"), kwargs.get("input_ids")
            if ids is None:
                return
            self._padded += ids.numel()
            self._useful = self._useful + (mask.sum() if mask is not None else ids.numel())

        def _collect(self) -> None:
            self.useful += int(self._useful)
            self.padded += self._padded
            self._useful, self._padded = 0, 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()
            self._mark = (self.useful, self.padded, self.started)

        def window(self) -> dict:
            self._collect()
            u0, p0, t0 = self._mark
            now = time.perf_counter()
            du, dp = self.useful - u0, self.padded - p0
            self._mark = (self.useful, self.padded, now)
            return {"useful_tokens_per_s": round(du / max(now - t0, 1e-9), 1),
                    "useful_token_fraction": round(du / dp, 4) if dp else 0.0}

        def totals(self) -> dict:
            self._collect()
            secs = time.perf_counter() - (self.started or time.perf_counter())
            return {"useful_tokens": self.useful, "padded_tokens": self.padded,
                    "useful_tokens_per_s": round(self.useful / max(secs, 1e-9), 1),
                    "useful_token_fraction": round(self.useful / self.padded, 4) if self.padded else 0.0}

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is None:
                return
            if "loss" in logs:  # training log lines
                logs.update(self.window())
                if state.log_history and state.log_history[-1].get("step") == state.global_step:
                    state.log_history[-1].update(logs)  # Trainer appended it before calling on_log
            if state.is_world_process_zero:  # one compact line instead of transformers' printer
                shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items()
                                 if k not in ("entropy", "num_tokens", "epoch"))
                _log(f"step {state.global_step}/{state.max_steps}: {shown}")

    class FaultInjectionCallback(TrainerCallback):
        """Test only: kill rank 0 with ``os._exit(1)`` right after the checkpoint of ``step`` is registered by
        Ray Train, once per run (a marker in the run folder stops the restarted attempt from failing again)."""

        def __init__(self, step: int, marker_uri: str, rank: int):
            self.step, self.marker_uri, self.rank = step, marker_uri, rank

        def on_save(self, args, state, control, **kwargs):
            if self.rank != 0 or state.global_step != self.step or storage.exists(self.marker_uri):
                return
            import ray.train

            ray.train.get_all_reported_checkpoints()  # blocks until the controller has registered the report
            storage.write_json(self.marker_uri, {"step": self.step, "time": time.time()})
            _log(f"fault injection: killing rank 0 after the checkpoint of step {self.step}")
            sys.stdout.flush()
            os._exit(1)

    class TensorBoardSyncCallback(TrainerCallback):
        """Rank 0 copies its TensorBoard events to ``<run>/tensorboard/`` at every checkpoint and at the end, so
        an attempt that dies keeps its curves up to its last checkpoint (event file names are unique per attempt)."""

        def __init__(self, local_dir: str, uri: str, rank: int):
            self.local_dir, self.uri, self.rank = local_dir, uri, rank

        def sync(self) -> None:
            if self.rank == 0 and os.path.isdir(self.local_dir):
                storage.upload_dir(self.local_dir, self.uri)

        def on_save(self, args, state, control, **kwargs):
            self.sync()

        def on_train_end(self, args, state, control, **kwargs):
            self.sync()

    class ManifestCallback(TrainerCallback):
        """Writes ``mecpe_checkpoint_rank<r>.json`` (size and sha256 of every file of this rank's HF checkpoint
        folder) right after the Trainer saved it and before ``RayTrainReportCallback`` uploads it, so a resumed run
        can tell a complete checkpoint from a truncated or partly uploaded one (see ``_restore_checkpoint``)."""

        def __init__(self, rank: int, world: int):
            self.rank, self.world = rank, world

        def on_save(self, args, state, control, **kwargs):
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            if os.path.isdir(folder):
                write_manifest(folder, self.rank, state.global_step, self.world)

    return ThroughputCallback, FaultInjectionCallback, TensorBoardSyncCallback, ManifestCallback


# =============================================================================================== training function


def _file_digest(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: str, rank: int, step: int, world_size: int = 1) -> str:
    """Size and sha256 of every file in a local HF checkpoint folder (other ranks' manifests excluded)."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, folder).replace(os.sep, "/")
            if rel.startswith("mecpe_checkpoint_rank"):
                continue
            files[rel] = {"size": os.path.getsize(full), "sha256": _file_digest(full)}
    path = os.path.join(folder, CHECKPOINT_MANIFEST.format(rank=rank))
    with open(path, "w", encoding="utf-8") as fh:
        json.dump({"step": step, "rank": rank, "world_size": world_size, "files": files}, fh, indent=1)
    return path


def verify_checkpoint(folder: str) -> str | None:
    """None when the local HF checkpoint folder is complete, else why not: the manifest of every rank (rank 0's
    gives the world size) must be there and every file it lists must have its size and sha256 (a truncated or partly
    copied folder fails)."""
    manifests = sorted(n for n in (os.listdir(folder) if os.path.isdir(folder) else [])
                       if n.startswith("mecpe_checkpoint_rank") and n.endswith(".json"))
    if CHECKPOINT_MANIFEST.format(rank=0) not in manifests:
        return f"no {CHECKPOINT_MANIFEST.format(rank=0)} (incomplete or not written by mecpe)"
    for name in manifests:
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as fh:
                manifest = json.load(fh)
            listed = manifest["files"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"{name} unreadable: {type(exc).__name__}: {exc}"
        if manifest.get("rank") == 0:
            absent = [r for r in range(int(manifest.get("world_size") or 1))
                      if CHECKPOINT_MANIFEST.format(rank=r) not in manifests]
            if absent:
                return f"no manifest of rank(s) {absent} (a rank's upload is missing)"
        for rel, want in listed.items():
            path = os.path.join(folder, rel)
            if not os.path.isfile(path):
                return f"{rel} missing"
            size = os.path.getsize(path)
            if size != want["size"]:
                return f"{rel} has {size} bytes, expected {want['size']} (truncated)"
            if _file_digest(path) != want["sha256"]:
                return f"{rel} sha256 differs from {name}"
    if not os.path.exists(os.path.join(folder, "trainer_state.json")):
        return "no trainer_state.json"
    return None


def _stored_checkpoints(run_uri: str) -> list[tuple[int, str]]:
    """(global step, URI of the HF folder) of every checkpoint folder stored under the run, newest first; folders
    whose trainer_state.json cannot be read are left out (they cannot be resumed from anyway)."""
    out = []
    try:
        states = storage.list_files(run_uri, suffixes=("/trainer_state.json",))
    except FileNotFoundError:
        return []
    for uri in states:
        folder = uri[: -len("/trainer_state.json")]
        if not folder.rsplit("/", 2)[-2].startswith("checkpoint_") or not folder.endswith("/" + HF_CHECKPOINT):
            continue
        try:
            out.append((int(storage.read_json(uri)["global_step"]), folder))
        except Exception:  # noqa: BLE001 - a truncated state file: not a candidate
            continue
    return sorted(out, key=lambda x: x[0], reverse=True)


def _restore_checkpoint(checkpoint: Any, local_dir: str, run_uri: str | None = None,
                        skipped: list | None = None) -> str | None:
    """The local path of the complete HF checkpoint folder to resume from, or None (start from step 0).

    Candidates are the checkpoint folders stored under ``run_uri``, newest step first, and Ray Train's latest
    registered checkpoint (``checkpoint``). The newest one that verifies against its manifest wins: a truncated or
    partly uploaded folder is passed over (logged, and appended to ``skipped`` as {checkpoint, reason}), and a
    complete folder newer than Ray Train's latest (a worker killed after the upload but before the controller took
    its report) saves recomputing those steps. With none complete, training starts from step 0 (same seed and data,
    so the same run); failing instead would only make Ray Train restart the workers into the same state."""
    skipped = [] if skipped is None else skipped
    stored = _stored_checkpoints(run_uri) if run_uri else []
    latest_name = os.path.basename(str(checkpoint.path).rstrip("/")) if checkpoint is not None else None
    candidates: list[tuple[str, Any]] = [(uri, None) for _, uri in stored]
    if latest_name and not any(uri.rstrip("/").rsplit("/", 2)[-2] == latest_name for uri in
                               (u for u, _ in candidates)):
        candidates.append((storage.join(str(checkpoint.path), HF_CHECKPOINT), checkpoint))  # not listable: last
    for i, (uri, ray_ckpt) in enumerate(candidates):
        local = os.path.join(local_dir, f"resume-{i}")
        try:
            if ray_ckpt is not None:
                local = os.path.join(ray_ckpt.to_directory(local), HF_CHECKPOINT)
            else:
                storage.download_dir(uri, local)
        except OSError as exc:
            problem = f"cannot download: {type(exc).__name__}: {exc}"
        else:
            problem = verify_checkpoint(local)
        if problem is None:
            name = uri.rstrip("/").rsplit("/", 2)[-2]
            if latest_name and name != latest_name:
                _log(f"resuming from {uri}: complete, and newer than Ray Train's latest registered checkpoint "
                     f"{latest_name}")
            return local
        skipped.append({"checkpoint": uri, "reason": problem})
        _log(f"checkpoint {uri} is incomplete ({problem}); trying an earlier one")
    if candidates:
        _log(f"no complete checkpoint under {run_uri}: training starts again from step 0")
    return None


def _adapter_to_fp32_unless_bf16(model, compute_dtype) -> None:
    """trl keeps QLoRA adapter weights in bf16 (QLoRA paper). Under fp16 AMP (T4) or fp32 (CPU) they must be fp32:
    AMP's grad scaler refuses low-precision gradients, and fp32 compute gains nothing from bf16 weights."""
    import torch

    if compute_dtype == torch.bfloat16:
        return
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def _renamed_args(config_cls, *, checkpointing: bool, warmup_ratio: float, group_by_length: bool) -> dict:
    """Arguments transformers renamed in 5.x, under the names this version knows."""
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


def _dataset(rows: list[dict]):
    from datasets import Dataset

    return Dataset.from_list(rows) if rows else None


def train_loop(config: dict) -> dict:
    """Ray Train worker function: build examples, load the 4-bit base, LoRA SFT with trl, resume, save."""
    import ray.train
    import torch
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
    from transformers import PrinterCallback, ProgressCallback
    from trl import SFTConfig

    from mecpe import modeling
    from mecpe.prompts import PromptBuilder

    # Token-budget batches change shape every step; expandable segments let the caching allocator grow blocks
    # instead of carving new ones (+3% on the H200, bench/RESULTS.md). Set before the first CUDA allocation.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    cfg = Config.model_validate(config["cfg"])
    task, run_uri, run_name = config["task"], config["run_uri"], config["run_name"]
    tcfg = cfg.training
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = modeling.pick_device(ctx.get_local_rank()) if cfg.scaling.use_gpu else "cpu"

    source = modeling.resolve_model_source(cfg.model.base, cfg.model.cache_dir)
    revision = cfg.model.revision if source == cfg.model.base else None
    tok = modeling.load_tokenizer(source, revision=revision, trust_remote_code=cfg.model.trust_remote_code)
    builder = PromptBuilder(tok, cfg.prompt.max_prompt_tokens)
    predicted = config.get("predicted_emotions")
    predicted = normalize_predictions(predicted) if predicted else None

    def emotions_of(conv):
        return shown_emotions(conv, tcfg.cause_emotions, noise_rate=tcfg.cause_noise_rate, seed=tcfg.seed,
                              predicted=predicted)

    splits = {"train": read_split(config["train_uri"], cfg.data.limit_train),
              "val": read_split(config.get("val_uri"), cfg.data.limit_val)}
    rows, stats = {}, {}
    for name, convs in splits.items():
        rows[name], stats[name] = build_examples(task, convs, builder, max_answer_tokens=cfg.prompt.max_answer_tokens,
                                                 emotions_of=emotions_of)
        if rank == 0:
            s = stats[name]
            _log(f"{task}/{name}: {s['examples']} examples from {s['conversations']} conversations, "
                 f"{s['shortened_prompts']} prompts shortened ({s['dropped_utterances']} utterances dropped), "
                 f"{s['over_budget']} over the {s['token_budget']}-token budget (kept, not cut)"
                 + (f": {s['over_budget_ids'][:20]}" if s["over_budget"] else ""))
    if not rows["train"]:
        raise ValueError(f"no {task} training examples in {config['train_uri']}")

    t_load = time.perf_counter()
    model = modeling.load_model(cfg.model, cfg.quantization, device=device, for_training=True, tokenizer=tok)
    load_s = round(time.perf_counter() - t_load, 1)
    dtype = modeling.compute_dtype(cfg.quantization, device)
    grad_ckpt = use_gradient_checkpointing(tcfg.gradient_checkpointing, device)
    optim = pick_optimizer(tcfg.optim, device)
    if rank == 0:
        _log(f"device {device}, compute dtype {str(dtype).removeprefix('torch.')}, gradient checkpointing "
             f"{'on' if grad_ckpt else 'off'}, {world} worker(s), optimizer {optim}"
             + (f" ({tcfg.optim} needs CUDA: falling back to {optim} on CPU)" if optim != tcfg.optim else ""))

    Throughput, FaultInjection, TensorBoardSync, Manifest = _callbacks()
    with tempfile.TemporaryDirectory(prefix=f"mecpe-{run_name}-") as work:
        out_dir = os.path.join(work, "hf")
        eval_at_steps = bool(tcfg.eval_steps and rows["val"])
        args = SFTConfig(
            output_dir=out_dir,
            num_train_epochs=tcfg.epochs, max_steps=tcfg.max_steps,
            per_device_train_batch_size=tcfg.per_device_batch_size,
            per_device_eval_batch_size=tcfg.per_device_batch_size,
            gradient_accumulation_steps=tcfg.grad_accum,
            learning_rate=tcfg.learning_rate, lr_scheduler_type=tcfg.lr_scheduler,
            optim=optim, weight_decay=tcfg.weight_decay, max_grad_norm=tcfg.max_grad_norm,
            **_renamed_args(SFTConfig, checkpointing=grad_ckpt, warmup_ratio=tcfg.warmup_ratio,
                            group_by_length=tcfg.group_by_length),
            bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, use_cpu=device == "cpu",
            logging_strategy="steps", logging_steps=tcfg.logging_steps, logging_first_step=True,
            save_strategy="steps", save_steps=tcfg.save_steps,
            save_total_limit=1,  # local copies only; storage keeps training.num_to_keep (CheckpointConfig)
            eval_strategy="steps" if eval_at_steps else "no", eval_steps=tcfg.eval_steps if eval_at_steps else None,
            seed=tcfg.seed, data_seed=tcfg.seed,
            report_to=["tensorboard"], disable_tqdm=True,
            max_length=None, packing=False,  # no truncation: over-budget examples are reported, not cut
            dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False,
            dataloader_num_workers=0, dataloader_pin_memory=device != "cpu",
            ddp_find_unused_parameters=False,  # LoRA uses every adapter weight in every step
        )
        throughput = Throughput()
        callbacks = [TensorBoardSync(os.path.join(out_dir, "runs"), storage.join(run_uri, "tensorboard"), rank),
                     Manifest(rank, world),  # before the report: the manifest travels inside the checkpoint
                     RayTrainReportCallback()]
        if tcfg.fail_after_step is not None:
            callbacks.append(FaultInjection(tcfg.fail_after_step, storage.join(run_uri, FAULT_MARKER), rank))
        trainer_cls = _trainer_class(tcfg.max_batch_tokens)
        trainer = trainer_cls(model=model, args=args, train_dataset=_dataset(rows["train"]),
                              eval_dataset=_dataset(rows["val"]), processing_class=tok,
                              data_collator=PadCollator(tok.pad_token_id, tok.eos_token_id),
                              peft_config=modeling.get_peft_config(cfg.lora), callbacks=callbacks)
        _adapter_to_fp32_unless_bf16(trainer.model, dtype)
        throughput.attach(trainer.model)
        trainer.callback_handler.callbacks.insert(0, throughput)  # before TensorBoard sees the logs
        for cb in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(cb)
        trainer = prepare_trainer(trainer)

        skipped_checkpoints: list[dict] = []
        resume = _restore_checkpoint(ray.train.get_checkpoint(), work, run_uri, skipped_checkpoints)
        resumed_from = None
        if resume:
            with open(os.path.join(resume, "trainer_state.json"), encoding="utf-8") as fh:
                resumed_from = json.load(fh).get("global_step")
            if rank == 0:
                _log(f"resuming from the checkpoint of step {resumed_from}")
        try:
            output = trainer.train(resume_from_checkpoint=resume)
        except torch.OutOfMemoryError as exc:
            if world > 1:  # the other ranks wait in a collective: only a raise (and Ray's restart) frees them
                raise
            # Deterministic: every restart would reload the base and run out of memory on the same batch, so the
            # run ends here with the fix in the message instead of Ray Train retrying it max_failures times.
            msg = (f"out of GPU memory at step {trainer.state.global_step} on {device} "
                   f"(per_device_batch_size={tcfg.per_device_batch_size}, max_batch_tokens={tcfg.max_batch_tokens}, "
                   f"gradient checkpointing {'on' if grad_ckpt else 'off'}, longest example "
                   f"{stats['train']['max_length']} tokens): lower training.per_device_batch_size (or "
                   f"training.max_batch_tokens), set training.gradient_checkpointing=on or lower "
                   f"prompt.max_prompt_tokens. {str(exc).splitlines()[0]}")
            storage.write_json(storage.join(run_uri, ERROR_FILE), {"error": "out_of_memory", "message": msg})
            _log(msg)
            return {"error": msg}
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
            "global_step": trainer.state.global_step,
            "resumed_from_step": resumed_from,
            "skipped_checkpoints": skipped_checkpoints,
            "first_logged_step": attempt_steps[0] if attempt_steps else None,
            "throughput": throughput.totals(),
            "examples": stats,
            "device": device, "compute_dtype": str(dtype).removeprefix("torch."), "optimizer": optim,
            "gradient_checkpointing": grad_ckpt, "num_workers": world,
            "model_load_s": load_s,
            "gpu_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None,
            "log_history": history,
        })
        if rank == 0:
            _save_adapter(trainer, tok, cfg, task, config, metrics, os.path.join(work, "adapter"))
    return _jsonable(metrics)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _save_adapter(trainer, tok, cfg: Config, task: str, config: dict, metrics: dict, local: str) -> None:
    """LoRA adapter + tokenizer + resolved config + mecpe_train.json -> ``<run>/adapter/``; the marker goes last."""
    trainer.model.save_pretrained(local)
    tok.save_pretrained(local)
    with open(os.path.join(local, "config.yaml"), "w", encoding="utf-8") as fh:
        fh.write(dump_config(cfg))
    meta = {"task": task, "run_name": config["run_name"], "config_hash": config["config_hash"],
            "global_step": metrics["global_step"], "base_model": cfg.model.base, "revision": cfg.model.revision,
            "cause_emotions": cfg.training.cause_emotions if task == "cause" else None,
            "metrics": {k: v for k, v in metrics.items() if k != "log_history"},
            "log_history": metrics["log_history"]}
    with open(os.path.join(local, META_FILE), "w", encoding="utf-8") as fh:
        json.dump(_jsonable(meta), fh, indent=2)
    adapter_uri = storage.join(config["run_uri"], "adapter")
    storage.upload_dir(local, adapter_uri)
    storage.write_json(storage.join(adapter_uri, COMPLETE_MARKER),
                       {"run_name": config["run_name"], "global_step": metrics["global_step"], "time": time.time()})
    _log(f"adapter written to {adapter_uri}")


# =============================================================================================== driver


def _input_digest(uri: str | None) -> list[str] | None:
    """sha256 of every file of a split (content only: moving the data does not rename the run)."""
    if not uri:
        return None
    return [storage.sha256(f) for f in storage.list_files(uri)]


def run_identity(cfg: Config, task: str, train_uri: str, val_uri: str | None,
                 predicted: Mapping | None = None) -> tuple[str, str]:
    """(run name, config hash): task + hash of model, data (incl. input sha256), prompt, quantization, LoRA and
    training hyperparameters. Storage, scaling and bookkeeping keys (``_NOT_HASHED``) are left out, so a run can
    resume on another cluster size or with another checkpoint cadence."""
    d = cfg.data
    parts = {
        "task": task,
        "model": cfg.model.model_dump(mode="json", exclude={"cache_dir", "build_tiny_if_missing"}),
        "data": {"split": d.split, "val_fraction": d.val_fraction, "seed": d.seed, "limit_train": d.limit_train,
                 "limit_val": d.limit_val, "train_sha256": _input_digest(train_uri),
                 "val_sha256": _input_digest(val_uri)},
        "prompt": cfg.prompt.model_dump(mode="json"), "quantization": cfg.quantization.model_dump(mode="json"),
        "lora": cfg.lora.model_dump(mode="json"),
        "training": cfg.training.model_dump(mode="json", exclude=_NOT_HASHED),
    }
    if task == "emotion":  # the cause-only settings do not shape an emotion adapter
        for key in ("cause_emotions", "cause_noise_rate"):
            parts["training"].pop(key)
    elif cfg.training.cause_emotions == "predicted":
        parts["predicted_emotions"] = config_hash({k: {str(u): v for u, v in utts.items()}
                                                   for k, utts in (predicted or {}).items()}, length=16)
    chash = config_hash(parts)
    return cfg.storage.run_name or f"{task}-{chash}", chash


def finished_result(run_dir: str) -> TrainResult | None:
    """The result of a run whose adapter is complete (marker present), else None."""
    adapter = storage.join(run_dir, "adapter")
    if not storage.exists(storage.join(adapter, COMPLETE_MARKER)):
        return None
    meta = storage.read_json(storage.join(adapter, META_FILE))
    return TrainResult(run_name=meta["run_name"], run_dir=run_dir, adapter_uri=adapter,
                       metrics={**meta.get("metrics", {}), "log_history": meta.get("log_history", [])},
                       global_step=int(meta["global_step"]), config_hash=meta.get("config_hash", ""))


def _storage_env(cfg: Config) -> dict[str, str]:
    """Non-secret S3 settings from the config, as environment for mecpe.storage (driver and workers)."""
    env: dict[str, str] = {}
    if cfg.storage.s3_endpoint:
        env["MECPE_S3_ENDPOINT"] = cfg.storage.s3_endpoint
    if cfg.storage.s3_region:
        env["AWS_REGION"] = cfg.storage.s3_region
    return env


def _ensure_ray(cfg: Config) -> None:
    """Use the running Ray, else ``ray.init(address=cfg.ray_address or $RAY_ADDRESS)`` (local when neither)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=cfg.ray_address or os.environ.get("RAY_ADDRESS"))


def run_training(cfg: Config, task: str, *, train_convs_uri: str | None = None, val_convs_uri: str | None = None,
                 predicted_emotions: Mapping | str | list | None = None) -> TrainResult:
    """Train (or resume, or just return) the ``task`` adapter of ``cfg``; see the module docstring.

    Splits default to ``<output_dir>/data/{train,val}.json`` (``mecpe.data.prepare``); a missing val split means no
    validation loss. ``predicted_emotions`` (cause task with ``training.cause_emotions=predicted``): a mapping
    ``{conversation_id: {utterance_id: label}}``, a list of official-format prediction records, or a JSON URI."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    fail = cfg.training.fail_after_step
    if fail is not None and (fail <= 0 or fail % cfg.training.save_steps):
        raise ValueError(f"training.fail_after_step={fail} must be a positive multiple of training.save_steps "
                         f"({cfg.training.save_steps}): the fault fires right after that step's checkpoint")
    if cfg.training.packing:
        raise ValueError("training.packing is not supported: examples are pre-tokenized with answer-only labels "
                         "and trained without cross-example attention; set training.packing=false")
    os.environ.update(_storage_env(cfg))  # mecpe.storage reads the endpoint from the environment; the config wins
    data_dir = storage.join(cfg.output_dir, "data")
    train_uri = train_convs_uri or storage.join(data_dir, "train.json")
    val_uri = val_convs_uri or storage.join(data_dir, "val.json")
    if val_convs_uri is None and not storage.exists(val_uri):
        val_uri = None
    predicted = None
    if task == "cause" and cfg.training.cause_emotions == "predicted":
        if predicted_emotions is None:
            raise ValueError("training.cause_emotions=predicted needs predicted_emotions (mapping or JSON file)")
        predicted = normalize_predictions(predicted_emotions)

    run_name, chash = run_identity(cfg, task, train_uri, val_uri, predicted)
    run_dir = storage.join(cfg.storage.path, run_name)
    done = finished_result(run_dir)
    if done is not None:
        _log(f"run {run_name} already finished (step {done.global_step}); adapter: {done.adapter_uri}")
        done.reused = True
        return done

    _ensure_ray(cfg)
    fs, fs_path = storage.get_filesystem(cfg.storage.path, endpoint=cfg.storage.s3_endpoint,
                                         region=cfg.storage.s3_region)
    remote = storage.is_remote(cfg.storage.path)
    sc = cfg.scaling
    # Ray Train's print patch tees every print twice and leaks output that libraries capture from stdout (dill's
    # dis.dis in datasets' fingerprinting): workers print plainly.
    env = {**_storage_env(cfg), "RAY_TRAIN_ENABLE_PRINT_PATCH": os.environ.get("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "task": task, "run_name": run_name,
                           "config_hash": chash, "run_uri": run_dir, "train_uri": train_uri, "val_uri": val_uri,
                           "predicted_emotions": {k: {str(u): v for u, v in utts.items()}
                                                  for k, utts in predicted.items()} if predicted else None},
        scaling_config=ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                     resources_per_worker=sc.resources_per_worker,
                                     accelerator_type=sc.accelerator_type),
        run_config=RunConfig(
            name=run_name, storage_path=fs_path, storage_filesystem=fs if remote else None,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.training.num_to_keep),
            failure_config=FailureConfig(max_failures=sc.max_failures,
                                         max_preemption_failures=sc.max_preemption_failures),
            worker_runtime_env={"env_vars": env}),
    )
    _log(f"training {task} run {run_name} -> {run_dir}")
    error_uri = storage.join(run_dir, ERROR_FILE)
    if storage.exists(error_uri):
        storage.delete(error_uri)  # from an earlier attempt; this one may fare better (another GPU)
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    done = finished_result(run_dir)
    if done is None and storage.exists(error_uri):
        raise RuntimeError(f"run {run_name}: {storage.read_json(error_uri)['message']}")
    if done is None:
        raise RuntimeError(f"run {run_name} ended without a complete adapter at {storage.join(run_dir, 'adapter')}")
    return done


def main_train(config_path: str | None, task: str, overrides: Iterable[str] | None = None) -> int:
    """``mecpe train --config FILE --task emotion|cause [key=value ...]``."""
    from mecpe.pipeline import step_train

    cfg = load_config(config_path, list(overrides or []))
    res = step_train(cfg, task)
    print(f"[mecpe] {task} adapter: {res.adapter_uri} (run {res.run_name}, step {res.global_step}"
          f"{', already finished' if res.reused else ''})")
    return 0
