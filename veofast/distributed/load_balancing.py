"""The MoE load-balancing loss over the global batch instead of each rank's micro-batch.

Every rank sums its router statistics (per-expert assignment counts and router probabilities, see
``veofast.models.moe``) with those of the other data-parallel ranks before the loss is formed, so all ranks
compute the same loss value: the one a single rank would get on the concatenated micro-batches. Gradients
flow only into the local probabilities; the training step scales the loss by the group size, so that after
the group's gradient averaging each rank's contribution counts once.

Under sequence parallelism the sum runs over the data x sequence group (``ps.fsdp_group``): each rank of an SP
group holds its group's mean statistics (``sequence_parallel`` averages them) and ``1/sp`` of its tokens, so the
sums are the global totals; and the gradient, which the SP mean's backward averages over the group, comes out as
``sum_r dL/ds_r`` after the training step's scaling by ``dp * sp`` and FSDP's averaging, as without SP.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .parallel_state import ParallelState


class GlobalRouterStats:
    """``(stats (2, E), num_tokens) -> (global stats, global num_tokens)`` summed over ``group``.

    The returned stats have the global value and the gradient of the local ones (the other ranks' share is a
    constant here: their own backward accounts for it).
    """

    def __init__(self, group: dist.ProcessGroup):
        self.group = group

    def __call__(self, stats: torch.Tensor, num_tokens: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """``num_tokens``: an int, or a 0-dim tensor (the real tokens of a padded batch), read without a host sync."""
        count = torch.as_tensor(num_tokens, dtype=stats.dtype, device=stats.device).reshape(1)
        totals = torch.cat([stats.detach().reshape(-1), count])
        dist.all_reduce(totals, group=self.group)
        global_stats = totals[:-1].view_as(stats)
        return stats + (global_stats - stats.detach()), totals[-1]


def apply_global_load_balancing(model: nn.Module, ps: ParallelState) -> bool:
    """Make ``model``'s load-balancing loss global over the data-parallel ranks; True if it was applied.

    Not applied to dense models or to a single data-parallel rank (where sequence parallelism, if on, already
    combines the statistics of the whole micro-batch).
    """
    config = getattr(model, "config", None)
    if config is None or not config.is_moe or ps.dp_size == 1:
        return False
    model.router_stats_reducer = GlobalRouterStats(ps.fsdp_group if ps.sp_enabled else ps.dp_group)
    return True
