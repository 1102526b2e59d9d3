"""Trainer callbacks of the training job: throughput in the logs, TensorBoard curves kept in storage, checkpoint
manifests, and a just-in-time checkpoint when Ray reports that a node of the run is being preempted."""

from __future__ import annotations

import logging
import os
import time

from transformers import TrainerCallback

from mecpe import storage
from mecpe.train.checkpoints import write_manifest

log = logging.getLogger(__name__)


class ThroughputCallback(TrainerCallback):
    """Adds ``useful_tokens_per_s`` (non-pad tokens per wall second over the logging window, all ranks together) and
    ``useful_token_fraction`` (their share of the padded batches) to every training log line, so the job log,
    TensorBoard and ``log_history`` carry them; with packed rows (``training.reuse_prefix``) also
    ``example_tokens_per_s``, the tokens one row per example would have fed in that time (what the sharing saves).

    Counted by a forward pre-hook on this rank's batches (``input_ids`` that are not the pad token; padding is a token
    no prompt contains), kept on the device until a log line reads them, times the world size."""

    def __init__(self, world_size: int = 1):
        self.world = world_size
        self.padded = 0
        self.pad_id: int | None = None
        self.collator = None  # a PackedCollator: its example_tokens count
        self._useful = None  # device tensor: non-pad tokens fed so far (this rank)
        self._alloc = (0, 0)  # CUDA allocator: (device allocations, retries after freeing the cache) at the last log
        self._mark: tuple[int, int, int, float] | None = None  # (useful, padded, example, time) at the last log line
        self.started: float | None = None
        self.useful = 0

    def attach(self, model, pad_token_id: int, collator=None) -> None:
        self.pad_id, self.collator = pad_token_id, collator
        model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        ids = kwargs.get("input_ids")
        if module.training and ids is not None:
            self.padded += ids.numel() * self.world
            n = (ids != self.pad_id).sum()
            self._useful = n if self._useful is None else self._useful + n

    def _examples(self) -> int:
        return getattr(self.collator, "example_tokens", 0) * self.world

    def _read(self) -> int:
        return int(self._useful.item()) * self.world if self._useful is not None else 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()
        self._mark = (self._read(), self.padded, self._examples(), self.started)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or self._mark is None:
            return
        useful, examples, now = self._read(), self._examples(), time.perf_counter()
        u0, p0, e0, t0 = self._mark
        du, dp, dt = useful - u0, self.padded - p0, max(now - t0, 1e-9)
        self._mark, self.useful = (useful, self.padded, examples, now), useful
        logs["useful_tokens_per_s"] = round(du / dt, 1)
        logs["useful_token_fraction"] = round(du / dp, 4) if dp else 0.0
        if self.collator is not None:
            logs["example_tokens_per_s"] = round((examples - e0) / dt, 1)
            logs["num_tokens"] = useful  # trl sums the attention mask, which is 4D (columns x columns) here
        logs.update(self._allocator())
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(logs)  # the Trainer appended the line before calling on_log

    def _allocator(self) -> dict:
        """On CUDA, what the caching allocator did in the window: cudaMalloc calls and retries (a retry frees the
        whole cache first: slow) and what it holds; steps that grow the pool are slower (host-side counters)."""
        import torch

        if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            return {}
        st = torch.cuda.memory_stats()
        now = (st.get("num_device_alloc", 0), st.get("num_alloc_retries", 0))
        delta, self._alloc = (now[0] - self._alloc[0], now[1] - self._alloc[1]), now
        return {"cuda_mallocs": delta[0], "cuda_alloc_retries": delta[1],
                "cuda_reserved_gib": round(st.get("reserved_bytes.all.current", 0) / 2**30, 2)}

    def totals(self) -> dict:
        secs = max(time.perf_counter() - (self.started or time.perf_counter()), 1e-9)
        self.useful = self._read()
        out = {"useful_tokens": self.useful, "padded_tokens": self.padded,
               "useful_tokens_per_s": round(self.useful / secs, 1),
               "useful_token_fraction": round(self.useful / self.padded, 4) if self.padded else 0.0}
        if self.collator is not None:
            out.update(example_tokens=self._examples(), example_tokens_per_s=round(self._examples() / secs, 1))
        return out


class LogLineCallback(TrainerCallback):
    """One compact log line per logging step on rank 0 (instead of transformers' printer)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items()
                             if k not in ("entropy", "num_tokens", "epoch"))
            log.info("step %d/%d: %s", state.global_step, state.max_steps, shown)


class TensorBoardSyncCallback(TrainerCallback):
    """Rank 0 copies its TensorBoard events to ``<run>/tensorboard/`` at every checkpoint and at the end, so an
    attempt that dies keeps its curves up to its last checkpoint (event file names are unique per attempt)."""

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
    """Writes this rank's manifest into the HF checkpoint folder right after the Trainer saved it and before
    ``RayTrainReportCallback`` uploads it (``mecpe.train.checkpoints``)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def on_save(self, args, state, control, **kwargs):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):
            write_manifest(folder, self.rank, state.global_step, self.world)


class PreemptionCheckpointCallback(TrainerCallback):
    """A spot node of the run got its termination notice (Ray's drain with the preemption reason and a deadline):
    checkpoint at the end of this step, once, instead of losing the steps since the last periodic checkpoint. Ray
    Train then restarts the run on other nodes from that checkpoint and counts a preemption, not a failure
    (``scaling.max_preemption_failures``). ``ray.train.get_preemption_info`` is a barrier every rank reaches once per
    step, so all ranks take the same decision."""

    def __init__(self):
        self.saved_for: tuple | None = None

    def on_step_end(self, args, state, control, **kwargs):
        import ray.train

        info = ray.train.get_preemption_info()
        if info is None:
            return
        key = tuple(info.preempted_node_ids)
        if key != self.saved_for:
            self.saved_for = key
            control.should_save = True
            if state.is_world_process_zero:
                log.warning("node(s) %s preempted (deadline %s ms): checkpointing after step %d", list(key),
                            info.deadline_ms, state.global_step)
