"""Differentiable all-gather and reduce-scatter of rows over a process group (token-gather expert parallelism).

``P`` ranks each hold ``n_i`` rows; ``sizes = [n_0, ..., n_{P-1}]`` are known on every host (``host_row_counts``
exchanges them through a CPU group, so the device never waits for the host), and ``m = max(sizes)``.

- ``gather_rows(x (n_r, ...), m, group) -> (P * m, ...)``: block ``j`` holds rank ``j``'s rows, padded with zeros
  to ``m``. Backward: the reduce-scatter of the gradient (rank ``r`` gets the sum over ranks of block ``r``, its
  first ``n_r`` rows).
- ``scatter_sum_rows(y (P * m, ...), n_r, group) -> (n_r, ...)``: the sum over ranks of block ``r``, first ``n_r``
  rows. Backward: the all-gather of the gradient (padded to ``m``).

Both run as plain collectives on the caller's stream order (NCCL kernels on the communication stream, which the
compute stream waits for; no host wait). The reduce-scatter sums in the tensors' dtype.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

# torch 2.13 renamed all_gather_into_tensor (same signature); the GPU image has an older torch
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def host_row_counts(num_rows: int, host_group: dist.ProcessGroup) -> list[int]:
    """Every rank's ``num_rows`` (a host int), exchanged over ``host_group``: a CPU (gloo) group with the ranks of
    the device group, so that nothing waits for the device."""
    mine = torch.tensor([num_rows], dtype=torch.int64)
    counts = torch.empty(dist.get_world_size(host_group), dtype=torch.int64)
    _all_gather_single(counts, mine, group=host_group)
    return counts.tolist()


def _pad_rows(x: torch.Tensor, rows: int, value: float = 0) -> torch.Tensor:
    """``x`` with ``rows - len(x)`` rows of ``value`` appended (``x`` itself when none are missing)."""
    missing = rows - x.shape[0]
    if missing == 0:
        return x.contiguous()
    return F.pad(x, (0, 0) * (x.dim() - 1) + (0, missing), value=value)


def all_gather_rows(x: torch.Tensor, max_rows: int, group: dist.ProcessGroup, pad_value: float = 0) -> torch.Tensor:
    """Non-differentiable ``gather_rows`` (e.g. for integer ids), padding with ``pad_value``."""
    x = _pad_rows(x, max_rows, pad_value)
    out = x.new_empty((dist.get_world_size(group) * max_rows, *x.shape[1:]))
    _all_gather_single(out, x, group=group)
    return out


def _reduce_scatter_rows(y: torch.Tensor, num_rows: int, group: dist.ProcessGroup) -> torch.Tensor:
    out = y.new_empty((y.shape[0] // dist.get_world_size(group), *y.shape[1:]))
    dist.reduce_scatter_tensor(out, y.contiguous(), group=group)
    return out[:num_rows]


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, max_rows: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.num_rows, ctx.group = x.shape[0], group
        return all_gather_rows(x, max_rows, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _reduce_scatter_rows(grad, ctx.num_rows, ctx.group), None, None


class _ScatterSumRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor, num_rows: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.max_rows, ctx.group = y.shape[0] // dist.get_world_size(group), group
        return _reduce_scatter_rows(y, num_rows, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_gather_rows(grad, ctx.max_rows, ctx.group), None, None


def gather_rows(x: torch.Tensor, max_rows: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Every rank's rows ``(P * max_rows, ...)``, rank ``j``'s in block ``j`` (zero-padded); differentiable."""
    return _GatherRows.apply(x, max_rows, group)


def scatter_sum_rows(y: torch.Tensor, num_rows: int, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's block of ``y (P * m, ...)`` summed over ranks, its first ``num_rows`` rows; differentiable."""
    if y.shape[0] % dist.get_world_size(group):
        raise ValueError(f"scatter_sum_rows: {y.shape[0]} rows do not split into {dist.get_world_size(group)} blocks")
    return _ScatterSumRows.apply(y, num_rows, group)
