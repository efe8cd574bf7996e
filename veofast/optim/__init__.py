"""Optimizers and learning-rate schedules."""

from .lr_scheduler import build_lr_scheduler, lr_multiplier
from .optimizer import build_optimizer

__all__ = ["build_lr_scheduler", "build_optimizer", "lr_multiplier"]
