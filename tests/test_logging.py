"""The messages mecpe's entry points drop (``mecpe.drop_harmless_warnings``), and only those: a filter that let
them through would put them back in every run's output; one that swallowed its neighbours would hide a real
warning (Ray's, when token authentication is off)."""

from __future__ import annotations

import logging

import mecpe


def _passes(logger_name: str, msg: str, level: int = logging.WARNING) -> bool:
    logger = logging.getLogger(logger_name)
    record = logger.makeRecord(logger_name, level, __file__, 0, msg, (), None)
    return bool(logger.filter(record))


def test_harmless_messages_dropped_others_kept():
    mecpe.drop_harmless_warnings()
    mecpe.drop_harmless_warnings()  # each entry point calls it; filters are added once
    token = "ray._private.authentication.authentication_token_setup"
    assert not _passes(token, "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=...")
    assert _passes(token, "Token authentication is disabled for this Ray cluster. Anyone with network access ...")
    assert _passes(token, "Generated new authentication token and saved to ~/.ray/auth_token", logging.INFO)
    assert len(logging.getLogger(token).filters) == 1
    bnb = "bitsandbytes.backends.cpu.ops"
    assert not _passes(bnb, "Failed to load CPU gemm_4bit_forward from kernels-community: Kernel repository ...")
    assert _passes(bnb, "some other bitsandbytes warning")
