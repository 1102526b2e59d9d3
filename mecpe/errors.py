"""The errors a user can cause, under one base: the CLI catches ``MecpeError`` only, prints its message on one
line and exits with its ``exit_code``; any other exception is a bug and keeps its traceback. Each also derives from
the built-in type it used to be (``ValueError``, ``FileNotFoundError``, ``RuntimeError``), so library callers that
catch those still do. Nothing outside the CLI catches and converts them (``tests/test_architecture.py``)."""

from __future__ import annotations


class MecpeError(Exception):
    """A fault of the input, the config, an output folder or the cluster, named in the message."""

    exit_code = 2  # the CLI's "the input or the config is at fault"


class ConfigError(MecpeError, ValueError):
    """A config value (or a command-line argument standing for one) that cannot work."""


class InputError(MecpeError, ValueError):
    """Input data that cannot serve the step (no valid conversation, unlabelled data where labels are needed)."""


class MissingInputError(MecpeError, FileNotFoundError):
    """A file or folder the step was pointed at does not exist."""


class EvaluationError(InputError):
    """Input the official scorer rejects (it would exit or crash); the message says where."""


class CorruptStateError(MecpeError, ValueError):
    """A state file mecpe wrote itself is damaged: the disk or another writer is to blame."""


class RunMismatchError(MecpeError, RuntimeError):
    """The output location holds results of a different run (other config, adapters or input)."""


class UnschedulableError(MecpeError, RuntimeError):
    """The cluster can never hold the workers or actors a step asks for."""


class NodeLocalPathError(MecpeError, RuntimeError):
    """A step would hand a path on the driver's disk to workers on other machines."""


class RunStoppedError(MecpeError, RuntimeError):
    """A training worker stopped its run on an error every restart would repeat (out of GPU memory on the same
    batch, a base model that cannot be loaded); the message says what to change."""
