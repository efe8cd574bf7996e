"""One optimizer step over a list of micro-batches: the heart of the training loop.

The step learns the global numbers (label tokens, tokens, FLOPs) with one all-reduce, accumulates the
gradients of ``sum(token losses) / global label count`` over its micro-batches (gradient sync only on the
last), clips the global gradient norm over the right process groups and steps the optimizer, unless the
loss or the gradient norm is not finite, in which case it skips the update. ``veofast.optim.AdamW`` takes the
clipping factor into its update instead of a separate pass that scales every gradient in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from veofast.distributed.grad_norm import clip_coefficient, clip_grad_norm, total_grad_norm
from veofast.distributed.parallel_state import ParallelState
from veofast.distributed.sequence_parallel import shard_micro_batch
from veofast.optim import AdamW
from veofast.utils.flops import training_flops


@dataclass
class StepResult:
    """What one step did, reduced over all ranks (plain Python numbers)."""

    loss: float
    aux_loss: float | None
    grad_norm: float
    tokens: int
    label_tokens: int
    flops: float
    skipped: bool


def to_device(micro_batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in micro_batch.items()}


def document_lengths(micro_batch: dict) -> list[int]:
    """Lengths of the documents in a micro-batch (host tensors, before they move to the device)."""
    if micro_batch.get("cu_seqlens") is not None:
        return torch.diff(micro_batch["cu_seqlens"]).tolist()
    if micro_batch.get("attention_mask") is not None:
        return micro_batch["attention_mask"].sum(dim=-1).tolist()
    batch, seq_len = micro_batch["input_ids"].shape
    return [seq_len] * batch


def train_step(
    model: nn.Module,
    micro_batches: list[dict],
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    *,
    config,
    ps: ParallelState,
    max_grad_norm: float,
) -> StepResult:
    """Forward, backward, clip and update over ``micro_batches`` (this rank's share of one global batch)."""
    device, group = ps.device, ps.fsdp_group
    fsdp = isinstance(model, FSDPModule)
    lengths = [n for mb in micro_batches for n in document_lengths(mb)]
    # the ranks of a sequence-parallel group share their micro-batches: each counts its share of tokens and FLOPs
    share = 1.0 / ps.sp_size
    if ps.sp_enabled:
        micro_batches = [shard_micro_batch(mb, ps.sp_rank, ps.sp_size) for mb in micro_batches]
    counts = torch.tensor(
        [sum(mb["num_label_tokens"] for mb in micro_batches), sum(lengths) * share,
         training_flops(config, lengths) * share],
        dtype=torch.float64, device=device,
    )
    dist.all_reduce(counts, group=group)
    label_tokens, tokens, flops = counts.tolist()
    # Each rank's loss is its token-loss sum over the global count; FSDP / DDP average gradients over the
    # group, so the backward loss is scaled by the group size to make the result sum(loss) / global count.
    grad_scale = float(ps.fsdp_size)
    global_aux = getattr(getattr(model, "module", model), "router_stats_reducer", None) is not None
    step_loss = torch.zeros((), device=device)
    step_aux = torch.zeros((), device=device)
    for index, micro_batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        if fsdp:
            model.set_requires_gradient_sync(last)
        out = model(**to_device(micro_batch, device), num_items_in_batch=max(int(label_tokens), 1))
        loss = out.lm_loss * grad_scale
        if out.aux_loss is not None:
            step_aux += out.aux_loss.detach() / len(micro_batches)
            if config.output_router_logits:
                # a mean over the micro-batches; a per-rank aux loss is then averaged by the group's gradient
                # averaging, a global one (same value on every rank) is scaled back up like the LM loss
                aux_scale = grad_scale if global_aux else 1.0
                loss = loss + config.router_aux_loss_coef * out.aux_loss / len(micro_batches) * aux_scale
        if fsdp or ps.world_size == 1 or last:
            loss.backward()
        else:
            with model.no_sync():
                loss.backward()
        step_loss += out.lm_loss.detach()
    if isinstance(optimizer, AdamW):
        # every trainable parameter, with a gradient or not: the reductions must be the same on every rank
        grad_norm = total_grad_norm([p for p in model.parameters() if p.requires_grad])
        step_kwargs = {"grad_scale": clip_coefficient(grad_norm, max_grad_norm)}
    else:
        grad_norm, step_kwargs = clip_grad_norm(model, max_grad_norm), {}
    reduced = torch.stack([step_loss.float(), step_aux.float()])
    dist.all_reduce(reduced, group=group)
    loss_value = reduced[0].item()
    aux_value = reduced[1].item() / ps.fsdp_size
    grad_norm_value = grad_norm.item()
    finite = math.isfinite(loss_value) and math.isfinite(grad_norm_value)
    if finite:
        optimizer.step(**step_kwargs)
        lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(
        loss=loss_value, aux_loss=aux_value if config.is_moe else None, grad_norm=grad_norm_value,
        tokens=round(tokens), label_tokens=round(label_tokens), flops=flops, skipped=not finite,
    )
