"""``build_lr_scheduler``: linear warmup from ``lr_start``, then constant, linear or cosine decay down to ``lr_min``."""

from __future__ import annotations

import functools
import math
import numbers

import torch
from torch.optim.lr_scheduler import LambdaLR

DECAY_STYLES = ("constant", "linear", "cosine")


class ScheduleLR(LambdaLR):
    """A ``LambdaLR`` whose ``load_state_dict`` takes only the step count from the saved state and sets every group's
    lr from this scheduler's own schedule at that step. A run resumed with a changed schedule (a larger max_steps,
    another peak lr) then follows the new schedule from its first step on, whatever lr the optimizer's loaded
    state carried."""

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_epoch = state_dict["last_epoch"]
        self._step_count = state_dict["_step_count"]
        lrs = [base_lr * schedule(self.last_epoch) for base_lr, schedule in zip(self.base_lrs, self.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = lrs


def lr_multiplier(
    step: int,
    *,
    train_steps: int,
    warmup_steps: int,
    decay_steps: int,
    style: str,
    min_ratio: float,
    start_ratio: float = 0.0,
) -> float:
    """The factor applied to the peak lr at ``step`` (0-based count of finished optimizer steps). The warm-up rises
    linearly from ``start_ratio`` (before the first step) to 1 (at its last step)."""
    if warmup_steps > 0 and step < warmup_steps:
        return start_ratio + (1.0 - start_ratio) * (step + 1) / warmup_steps
    if style == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps))
    if style == "linear":
        decay = 1.0 - progress
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * decay


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    train_steps: int,
    lr: float | None = None,
    lr_decay_style: str = "cosine",
    lr_decay_ratio: float = 1.0,
    lr_warmup_ratio: float = 0.0,
    lr_min: float = 0.0,
    lr_start: float = 0.0,
) -> ScheduleLR:
    """Warm up linearly from ``lr_start`` over ``lr_warmup_ratio * train_steps`` steps, then decay over
    ``lr_decay_ratio`` of the remaining steps to ``lr_min`` (``constant`` keeps the peak). The arguments are VeOmni's,
    in its order.

    Each param group peaks at its own lr; ``lr`` (default: the first group's) is the peak that ``lr_min`` and
    ``lr_start`` are given against, so a group of another lr follows the same shape scaled to its own."""
    if lr_decay_style not in DECAY_STYLES:
        raise ValueError(f"build_lr_scheduler: lr_decay_style must be one of {DECAY_STYLES}, got {lr_decay_style!r}")
    if isinstance(train_steps, bool) or not isinstance(train_steps, numbers.Integral) or train_steps < 1:
        raise ValueError(f"build_lr_scheduler: train_steps must be an int >= 1, got {train_steps!r}")
    if not 0.0 <= lr_warmup_ratio <= 1.0:
        raise ValueError(f"build_lr_scheduler: lr_warmup_ratio must be in [0, 1], got {lr_warmup_ratio}")
    if not 0.0 < lr_decay_ratio <= 1.0:
        raise ValueError(f"build_lr_scheduler: lr_decay_ratio must be in (0, 1], got {lr_decay_ratio}")
    peak = lr if lr is not None else optimizer.param_groups[0]["lr"]
    if not peak > 0:
        raise ValueError(f"build_lr_scheduler: the peak lr must be > 0, got {peak}")
    if not lr_min >= 0:
        raise ValueError(f"build_lr_scheduler: lr_min must be >= 0, got {lr_min}")
    if lr_min > peak:
        raise ValueError(f"build_lr_scheduler: lr_min {lr_min} is above the peak lr {peak}")
    if not 0 <= lr_start <= peak:
        raise ValueError(f"build_lr_scheduler: lr_start must be in [0, the peak lr {peak}], got {lr_start}")
    warmup = int(lr_warmup_ratio * train_steps)
    decay = max(1, int(lr_decay_ratio * (train_steps - warmup)))
    # A partial, not an object with state: nothing of the schedule itself is saved; ScheduleLR restores the step.
    schedule = functools.partial(
        lr_multiplier, train_steps=train_steps, warmup_steps=warmup, decay_steps=decay, style=lr_decay_style,
        min_ratio=lr_min / peak, start_ratio=lr_start / peak,
    )
    return ScheduleLR(optimizer, schedule)
