"""mecpe: emotion-cause pair extraction (SemEval-2024 Task 3 Subtask 2) with QLoRA fine-tunes on Ray."""

import logging
import sys
import warnings

__version__ = "0.1.0"


def log_to_stdout(level: int = logging.INFO) -> None:
    """Send mecpe's progress lines (``[mecpe.<part>] ...``) to stdout. Called by the process entry points that own
    their output (the CLI, a Ray Train worker, a predictor actor); a library user configures logging as they like."""
    logger = logging.getLogger("mecpe")
    if not any(getattr(h, "_mecpe", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
        handler._mecpe = True
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    drop_harmless_warnings()


def _not_the_hub_kernel_miss(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


def _not_the_token_auth_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Token authentication is enabled for this Ray cluster")


def drop_harmless_warnings() -> None:
    """Drop three messages every CPU run printed, once per process, that ask nothing of a user:

    * bitsandbytes (>= 0.50, on CPUs with AVX512-BF16) tries to fetch an optional faster 4-bit CPU kernel from the
      Hugging Face hub when it is imported; without network or the repository's trust it says "Failed to load CPU
      gemm_4bit_forward from kernels-community" and uses its own CPU kernel, which is what runs anyway.
    * peft 0.21 reads transformers' ``is_gradient_checkpointing``, deprecated in transformers 5.x, when it wraps a
      model (each actor that loads an adapter): a FutureWarning about their code, not mecpe's or the user's.
    * Ray (>= 2.60) turns token authentication on when it starts a local instance (the embedded default) and says
      so as a WARNING, with how to opt out: the protection mecpe wants (tests/test_reliability_security.py checks
      it), nothing to act on. Its warning when authentication is off is kept.

    Called by the process entry points (CLI, Ray Train worker, predictor actor) before they import either."""
    cpu_ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if _not_the_hub_kernel_miss not in cpu_ops.filters:
        cpu_ops.addFilter(_not_the_hub_kernel_miss)
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    token_setup = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if _not_the_token_auth_notice not in token_setup.filters:
        token_setup.addFilter(_not_the_token_auth_notice)
