"""``build_optimizer``: AdamW with decoupled weight decay, none on norms, biases and other 1-D parameters."""

from __future__ import annotations

import torch
from torch import nn

from .adamw import AdamW


def _wants_decay(name: str, param: torch.Tensor) -> bool:
    return param.dim() >= 2 and "norm" not in name


def build_optimizer(
    model: nn.Module,
    lr: float = 3e-4,
    weight_decay: float = 0.0,
    *,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    fused: bool | None = None,
    optimizer_type: str = "adamw",
    backend: str = "auto",
) -> torch.optim.Optimizer:
    """``veofast.optim.AdamW`` over ``model``'s trainable parameters in two groups (with and without weight decay).

    ``backend="auto"``: the Triton step when every parameter is on CUDA, else torch's foreach implementation.
    ``fused``: VeOmni's switch. veofast's step is fused already (one Triton pass per tensor), so None and True keep
    it; False takes torch's foreach step (with ``backend="triton"``: a ValueError).
    """
    if optimizer_type != "adamw":
        raise ValueError(f"build_optimizer: optimizer_type must be 'adamw', got {optimizer_type!r}")
    if fused is False and backend == "triton":
        raise ValueError("build_optimizer: fused=False takes torch's foreach step, but backend='triton' was asked for")
    if not lr > 0:
        raise ValueError(f"build_optimizer: lr must be > 0, got {lr}")
    if not weight_decay >= 0:
        raise ValueError(f"build_optimizer: weight_decay must be >= 0, got {weight_decay}")
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if _wants_decay(name, param) else no_decay).append(param)
    params = decay + no_decay
    if not params:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return AdamW(
        [g for g in groups if g["params"]],
        lr=lr,
        betas=betas,
        eps=eps,
        foreach=True if fused is False else None,
        backend=backend,
    )
