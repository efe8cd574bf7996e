"""Deterministic, sharding-independent parameter initialisation."""

from __future__ import annotations

import zlib

import torch
from torch.distributed.tensor import DTensor


def _init_value(name: str, shape: torch.Size, std: float, generator: torch.Generator, device) -> torch.Tensor:
    """The full initial value of parameter ``name``: ones for norm weights, zeros for biases, else normal(0, std)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, device=device)
    if name.endswith(".bias"):
        return torch.zeros(shape, device=device)
    return torch.randn(shape, generator=generator, device=device) * std


@torch.no_grad()
def init_parameter(param: torch.Tensor, name: str, seed: int, std: float) -> None:
    """Fill ``param`` (a tensor or a DTensor shard) from a generator seeded by ``seed`` and ``name``."""
    local = param.to_local() if isinstance(param, DTensor) else param
    device = local.device if local.device.type != "meta" else torch.device("cpu")
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    full = _init_value(name, param.shape, std, generator, device)
    if isinstance(param, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        index = tuple(slice(o, o + s) for o, s in zip(offset, shape))
        full = full[index]
    local.copy_(full.to(local.dtype))
