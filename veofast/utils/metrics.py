"""Per-step metrics: JSON lines in the output directory, and TensorBoard / W&B when asked for and installed."""

from __future__ import annotations

import json
import os

from .logging import get_logger

logger = get_logger(__name__)


class MetricsWriter:
    """Writes one JSON object per call to ``<output_dir>/metrics.jsonl`` (rank 0 only)."""

    def __init__(self, output_dir: str, *, enabled: bool, use_tensorboard: bool = False, use_wandb: bool = False,
                 wandb_project: str = "veofast", wandb_name: str | None = None, config: dict | None = None):
        self.enabled = enabled
        self.tensorboard = self.wandb = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.file = open(os.path.join(output_dir, "metrics.jsonl"), "a")
        if use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(os.path.join(output_dir, "tensorboard"))
            except ImportError as exc:
                raise ValueError(f"train.use_tensorboard: tensorboard is not installed ({exc})") from exc
        if use_wandb:
            try:
                import wandb
            except ImportError as exc:
                raise ValueError(f"train.use_wandb: wandb is not installed ({exc})") from exc
            self.wandb = wandb.init(project=wandb_project, name=wandb_name, config=config, dir=output_dir)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
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
