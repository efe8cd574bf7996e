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


def get_logger(name: str) -> RankLogger:
    """A rank-aware logger; the first call sets up one stderr handler for all of veofast."""
    root = logging.getLogger("veofast")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("VEOFAST_LOG_LEVEL", "INFO"))
        root.propagate = False
    return RankLogger(logging.getLogger(name if name.startswith("veofast") else f"veofast.{name}"), {})
