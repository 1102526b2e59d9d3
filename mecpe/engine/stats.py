"""The work counters of one engine call: each call returns its own (no process-wide counters to diff)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class StageStats:
    """Work counters of one stage call. ``prompt_tokens`` is what running every full prompt would cost;
    ``computed_tokens`` the prompt tokens actually run (each distinct prefix once + questions + forced answer
    starts); ``generated_tokens`` the answer tokens run (scored label tokens, or decoding steps); ``seconds`` the
    call's busy time (wall clock), ``prefill_s`` / ``decode_s`` its device time by phase."""

    prompts: int = 0
    prompt_tokens: int = 0
    computed_tokens: int = 0
    generated_tokens: int = 0
    forward_passes: int = 0
    seconds: float = 0.0
    prefill_s: float = 0.0  # device time of the passes over whole prompts (scoring, decoding's first pass)
    decode_s: float = 0.0  # device time of the one-token-per-block decoding passes after it
    decode_steps: int = 0
    # the decoding loop's host time by part (wall clock, no extra syncs): waiting for the step's tokens (the one sync:
    # the device's queued work), the per-slot bookkeeping and mask building, and issuing the forward's kernels
    decode_wait_s: float = 0.0
    decode_host_s: float = 0.0
    decode_launch_s: float = 0.0

    def add(self, other: "StageStats") -> "StageStats":
        """Add ``other``'s counters into these (an accumulator of several calls); returns self."""
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)
        return self
