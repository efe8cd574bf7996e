"""Where each veofast parameter lives in a Hugging Face checkpoint.

veofast parameter names are transformers 5's in-memory names, so most parameters are stored under their own
name. The exception is the stacked expert weights of the MoE layers, which HF checkpoints store per expert:

- ``<p>.experts.gate_up_proj (E, 2I, H)``: expert ``e``'s rows ``[0, I)`` are ``<p>.experts.{e}.gate_proj.weight
  (I, H)`` and rows ``[I, 2I)`` are ``<p>.experts.{e}.up_proj.weight (I, H)``;
- ``<p>.experts.down_proj (E, H, I)``: expert ``e`` is ``<p>.experts.{e}.down_proj.weight (H, I)``.

A parameter is described as a list of ``Block``: each block is one tensor on disk and the box of the parameter
it fills. Loading reads, for each block, only the part that overlaps the local shard of the parameter;
saving cuts the full parameter into its blocks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from dataclasses import dataclass

_STACKED_EXPERTS = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<kind>gate_up_proj|down_proj)$")
# Keys some older checkpoints carry that hold no weights (recomputed RoPE frequencies).
_IGNORED_KEY = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class Block:
    """One checkpoint tensor ``key`` of shape ``disk_shape`` filling ``param[offset : offset + shape]``.

    ``disk_shape`` is ``shape`` with any leading size-1 dims dropped when the disk tensor has fewer dims (one
    expert of a stacked ``(E, ...)`` parameter is ``shape (1, ...)`` in the parameter and ``(...)`` on disk).
    """

    key: str
    offset: tuple[int, ...]
    shape: tuple[int, ...]
    disk_shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def is_ignored_key(key: str) -> bool:
    """True for checkpoint keys that carry no weights and are skipped on load."""
    return _IGNORED_KEY.search(key) is not None


def param_blocks(name: str, shape: tuple[int, ...], disk_keys: Collection[str] | None = None) -> list[Block]:
    """The checkpoint tensors that make up parameter ``name`` of global ``shape``.

    With ``disk_keys`` (the keys of a checkpoint being loaded) a stacked expert parameter stored under its
    own name is read as one tensor; otherwise (and always when saving, ``disk_keys=None``) the standard
    per-expert HF layout is used.
    """
    shape = tuple(shape)
    match = _STACKED_EXPERTS.match(name)
    if match is None or len(shape) != 3 or (disk_keys is not None and name in disk_keys):
        return [Block(name, (0,) * len(shape), shape, shape)]
    prefix, kind = match["prefix"], match["kind"]
    num_experts, rows, cols = shape
    if kind == "down_proj":
        return [
            Block(f"{prefix}.{e}.down_proj.weight", (e, 0, 0), (1, rows, cols), (rows, cols))
            for e in range(num_experts)
        ]
    if rows % 2:
        raise ValueError(f"{name}: a stacked gate_up_proj needs an even dim 1 (2 * intermediate), got shape {shape}")
    half = rows // 2
    blocks = []
    for e in range(num_experts):
        blocks.append(Block(f"{prefix}.{e}.gate_proj.weight", (e, 0, 0), (1, half, cols), (half, cols)))
        blocks.append(Block(f"{prefix}.{e}.up_proj.weight", (e, half, 0), (1, half, cols), (half, cols)))
    return blocks
