"""Gradient norm and clipping that are correct under FSDP2, DDP and expert parallelism.

Each gradient's squared norm is summed over exactly the ranks that hold distinct pieces of it: the mesh
dimensions on which its DTensor is sharded (FSDP2's, and expert parallelism's for expert weights). Replicated
copies are counted once. No host-device synchronisation: the norm and the clip factor stay on the device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard


def _reduce_groups(param: torch.Tensor) -> tuple:
    groups = []
    if isinstance(param, DTensor):
        mesh = param.device_mesh
        for dim, placement in enumerate(param.placements):
            # _StridedShard (FSDP2 over a dim that EP/TP also shards) is no Shard subclass in recent torch
            if isinstance(placement, (Shard, _StridedShard)) and mesh.size(dim) > 1:
                groups.append(mesh.get_group(dim))
    return tuple(groups)


def _squares(grads: list[torch.Tensor], param: torch.Tensor) -> torch.Tensor:
    """The summed squares of ``grads`` (fp32 scalar); 0 on ``param``'s (local) device when there are none."""
    if not grads:
        local = param.to_local() if isinstance(param, DTensor) else param
        return torch.zeros((), dtype=torch.float32, device=local.device)
    return torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) ** 2 for g in grads]).sum()


@torch.no_grad()
def total_grad_norm(parameters) -> torch.Tensor:
    """The global L2 norm of the gradients of ``parameters`` (fp32 scalar on the gradients' device).

    A parameter without a gradient counts as a zero gradient, and still joins its groups' reductions: every rank
    must pass the same parameters, but some may lack gradients on some ranks (not on others) without a hang.
    """
    by_groups: dict[tuple, tuple[list[torch.Tensor], torch.Tensor]] = {}
    for param in parameters:
        grads, _ = by_groups.setdefault(_reduce_groups(param), ([], param))
        if param.grad is not None:
            grads.append(param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad)
    total = None
    for groups, (grads, first) in by_groups.items():
        squares = _squares(grads, first)
        for group in groups:
            dist.all_reduce(squares, group=group)
        total = squares if total is None else total + squares.to(total.device)
    if total is None:
        return torch.zeros(())
    return total.sqrt()


def clip_coefficient(norm: torch.Tensor, max_norm: float) -> torch.Tensor | None:
    """The factor that brings gradients of global norm ``norm`` to at most ``max_norm`` (a device scalar, 1 when
    the norm is not finite: the loop skips such steps), or None when ``max_norm`` <= 0 (no clipping)."""
    if max_norm <= 0:
        return None
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    # decided on the norm, not on the factor: an infinite norm gives a finite factor of 0
    return torch.where(torch.isfinite(norm), coef, torch.ones_like(coef))


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Scale all gradients so their global norm is at most ``max_norm`` (<= 0: measure only); return the
    norm before clipping. Non-finite norms leave the gradients untouched (the loop skips such steps)."""
    # every trainable parameter, with a gradient or not: the reductions must be the same on every rank
    norm = total_grad_norm([p for p in model.parameters() if p.requires_grad])
    params = [p for p in model.parameters() if p.grad is not None]
    coef = clip_coefficient(norm, max_norm) if params else None
    if coef is not None:
        for p in params:
            grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            grad.mul_(coef.to(grad.device, grad.dtype))
    return norm
