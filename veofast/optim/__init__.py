"""Optimizers and learning-rate schedules."""

from .adamw import AdamW
from .lr_scheduler import build_lr_scheduler, lr_multiplier
from .optimizer import build_optimizer

__all__ = ["AdamW", "build_lr_scheduler", "build_optimizer", "lr_multiplier"]
