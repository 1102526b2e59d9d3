"""What an inference run returns and writes as ``summary.json`` (``dataclasses.asdict`` of ``InferenceSummary``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mecpe.layout import InferenceLayout


@dataclass(frozen=True)
class StageSummary:
    """One stage in this run: utterances predicted, the predictor actors' busy seconds, and their rate."""

    utterances: int
    actor_s: float
    utt_per_s_per_actor: float | None


@dataclass(frozen=True)
class Stages:
    emotion: StageSummary
    cause: StageSummary


@dataclass(frozen=True)
class Resources:
    """What each predictor actor asked for (after fitting a small CPU-only cluster), and how many there were."""

    num_actors: int
    num_gpus: float
    num_cpus: float
    accelerator_type: str | None
    batch_size: int
    share_base: bool


@dataclass(frozen=True)
class ThisRun:
    """The work of this invocation (a resumed run counts only what it did itself)."""

    shards: int
    records: int
    rejects: int
    pipeline_s: float
    stages: Stages
    utt_per_s: float | None
    gpu_peak_gib: float  # the largest predictor actor's peak allocated GPU memory
    # the engine's work per stage (``mecpe.engine.stats.StageStats`` summed over the batches: prefill / decoding
    # device seconds, passes, tokens) and each predictor actor's start-up (model + adapters loaded) in seconds
    engine: dict[str, Any]
    resources: Resources


@dataclass(frozen=True)
class InferenceSummary:
    """The output folder's totals (every run that wrote into it) and this run's work, timings and provenance."""

    run_id: str
    output: str
    conversations: int
    utterances: int
    rejects: int
    rejects_by_stage: dict[str, int]
    retryable_rejects: int
    parse_status: dict[str, dict[str, int]]
    dropped_utterances: dict[str, int]
    duplicate_shard_copies_ignored: int
    resumed: bool
    done_before_this_run: int
    this_run: ThisRun
    wall_s: float
    has_gold: bool
    provenance: dict[str, Any]
    finished: str

    @property
    def pred_file(self) -> str:
        return InferenceLayout(self.output).pred

    @property
    def rejects_file(self) -> str:
        return InferenceLayout(self.output).rejects
