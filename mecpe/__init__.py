"""mecpe: emotion-cause pair extraction (SemEval-2024 Task 3 Subtask 2) with QLoRA fine-tunes on Ray."""

import logging
import sys

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
