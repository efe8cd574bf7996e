"""Per-step metrics: JSON lines in the output directory, and TensorBoard / W&B when asked for and installed."""

from __future__ import annotations

import importlib.util
import json
import math
import os

from .helper import move_aside
from .logging import get_logger

logger = get_logger(__name__)


def _finite_or_none(value):
    """``value``, or None for a non-finite float."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _ends_a_line(path: str) -> bool:
    """Whether the file ``path`` is empty or ends with a newline."""
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def check_logging_backends(*, use_tensorboard: bool, use_wandb: bool) -> None:
    """ValueError naming the setting (``train.use_tensorboard`` / ``train.use_wandb``) whose package is not
    installed; imports nothing, so a run can check this before it starts any work."""
    for setting, wanted, package in (
        ("train.use_tensorboard", use_tensorboard, "tensorboard"),
        ("train.use_wandb", use_wandb, "wandb"),
    ):
        if wanted and importlib.util.find_spec(package) is None:
            raise ValueError(f"{setting}: {package} is not installed; pip install {package}, or set {setting} false")


class MetricsWriter:
    """Writes one JSON object per call to ``<output_dir>/metrics.jsonl`` (rank 0 only).

    A non-finite number (the loss of a skipped step) is written as null: ``NaN`` and ``Infinity`` are not JSON, and
    strict readers (jq, JavaScript, Go) refuse the whole line. A resumed run (``resume``) appends to the file of the
    run it continues; a run started from scratch keeps an earlier run's file as ``metrics.<k>.jsonl`` and starts a
    new one, so one file never mixes two runs' steps.
    """

    def __init__(self, output_dir: str, *, enabled: bool, resume: bool = False, use_tensorboard: bool = False,
                 use_wandb: bool = False, wandb_project: str = "veofast", wandb_name: str | None = None,
                 config: dict | None = None):
        self.enabled = enabled
        self.tensorboard = self.wandb = None
        if not enabled:
            return
        check_logging_backends(use_tensorboard=use_tensorboard, use_wandb=use_wandb)
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, "metrics.jsonl")
        if not resume and os.path.isfile(path) and os.path.getsize(path) > 0:
            logger.info("metrics: %s holds an earlier run's metrics; kept them as %s", path, move_aside(path))
        self.file = open(path, "a")
        if resume and not _ends_a_line(path):  # a record cut short (a crash mid-write): the next one starts anew
            self.file.write("\n")
        if use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        if use_wandb:
            import wandb

            self.wandb = wandb.init(project=wandb_project, name=wandb_name, config=config, dir=output_dir)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({key: _finite_or_none(value) for key, value in record.items()}) + "\n")
        self.file.flush()
        step = record.get("step")
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
