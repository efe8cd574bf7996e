"""Loggers that know the process rank: ``logger.info_rank0(...)`` logs on global rank 0 only."""

from __future__ import annotations

import logging
import os
import sys


class RankLogger(logging.LoggerAdapter):
    """A logger adapter with ``*_rank0`` methods and the rank in every line of a multi-process run."""

    def process(self, msg, kwargs):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return (f"[rank{os.environ.get('RANK', '0')}] {msg}" if world > 1 else msg), kwargs

    def info_rank0(self, msg, *args, **kwargs):
        if os.environ.get("RANK", "0") == "0":
            self.info(msg, *args, **kwargs)

    def warning_rank0(self, msg, *args, **kwargs):
        if os.environ.get("RANK", "0") == "0":
            self.warning(msg, *args, **kwargs)


def _log_level() -> str:
    """``VEOFAST_LOG_LEVEL`` (any case, default INFO) as a level name; ``ValueError`` naming the variable for a
    value that is not one."""
    value = os.environ.get("VEOFAST_LOG_LEVEL", "INFO")
    if value.upper() not in logging.getLevelNamesMapping():
        raise ValueError(f"VEOFAST_LOG_LEVEL={value!r} is not a logging level: use DEBUG, INFO, WARNING or ERROR")
    return value.upper()


def setup_logging() -> None:
    """One stderr handler for all of veofast, at ``VEOFAST_LOG_LEVEL`` (default INFO), not propagated to the root
    logger (no line twice). Entry points call it (``tasks/train.py``); library modules only take loggers, so that
    importing them leaves the logging of the program that imports them as it was."""
    root = logging.getLogger("veofast")
    if not root.handlers:
        level = _log_level()
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(level)
        root.propagate = False


def get_logger(name: str) -> RankLogger:
    """A rank-aware logger under ``veofast`` (what reaches the terminal is ``setup_logging``'s business)."""
    return RankLogger(logging.getLogger(name if name.startswith("veofast") else f"veofast.{name}"), {})
