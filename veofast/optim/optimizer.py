"""``build_optimizer``: AdamW with decoupled weight decay, none on norms, biases and other 1-D parameters."""

from __future__ import annotations

import torch
from torch import nn


def _wants_decay(name: str, param: torch.Tensor) -> bool:
    return param.dim() >= 2 and "norm" not in name


def build_optimizer(
    model: nn.Module,
    lr: float = 3e-4,
    weight_decay: float = 0.0,
    *,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    optimizer_type: str = "adamw",
    fused: bool | None = None,
) -> torch.optim.Optimizer:
    """AdamW over ``model``'s trainable parameters in two groups (with and without weight decay).

    ``fused=None`` uses the fused CUDA implementation when every parameter is on CUDA, else foreach.
    """
    if optimizer_type != "adamw":
        raise ValueError(f"build_optimizer: optimizer_type must be 'adamw', got {optimizer_type!r}")
    if lr <= 0:
        raise ValueError(f"build_optimizer: lr must be > 0, got {lr}")
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if _wants_decay(name, param) else no_decay).append(param)
    params = decay + no_decay
    if not params:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    if fused is None:
        fused = all(p.device.type == "cuda" for p in params)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps, fused=fused, foreach=None if fused else True
    )
