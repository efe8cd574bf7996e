"""Expert parallelism (EP): each rank of an EP group owns ``E / ep`` experts, and tokens travel to them.

Parameters. ``apply_expert_parallel`` slices each MoE layer's stacked expert weights (``gate_up_proj (E, 2I, H)``,
``down_proj (E, H, I)``) on the expert dimension and replaces them with DTensors on the parallel state's ``"ep"``
mesh with placement ``Shard(0)``: the global shape stays ``(E, ...)`` and rank r holds experts
``[r * E/ep, (r + 1) * E/ep)``. ``shard_experts`` then gives each ``Experts`` module its own FSDP2 unit over the
``"ep_fsdp"`` mesh (the ranks holding the same experts), the same way FSDP2 composes with tensor parallelism
(both meshes are slices of one 2-D ``("ep_fsdp", "ep")`` mesh): the sharded parameters become DTensors on that
2-D mesh, ``(_StridedShard(0), Shard(0))`` (or ``(Shard(1), Shard(0))`` when there are fewer local experts than
``ep_fsdp`` ranks). Because the layout is an ordinary DTensor, everything that treats DTensors generically works
unchanged: the seeded init (``models/init.py`` fills each shard from the full tensor, so EP=1 and EP=2 start from
identical weights), the HF loader and saver (each rank reads only its slice of its own experts), DCP checkpoints,
and the gradient norm (``grad_norm.py`` reduces over every sharded mesh dimension: ``ep_fsdp`` and ``ep``).

Gradients. An expert weight's gradient on its owner already sums the contributions of every token sent to it by
the EP group (the backward of the dispatch all-to-all). FSDP would then average over the ``ep_fsdp`` ranks only,
while the training step scales each rank's loss by the FSDP size (``dp * sp``, the world size) for the non-expert
parameters, which FSDP averages over the whole world. So the expert units divide by the same world-wide factor
(``set_gradient_divide_factor(fsdp_size)``): expert and non-expert gradients are both ``sum_r dloss_r / dW``.

Forward of one MoE layer (``ExpertParallelDispatcher``, installed as ``Experts.dispatcher``), T tokens, top-K:

1. per-expert counts of this rank's ``(token, slot)`` assignments ``(E,)``; an async all-to-all of them starts
   (each rank learns how many rows it will receive per local expert from each source rank) ...
2. ... while ``moe_permute`` groups this rank's T*K token copies by expert (rows for rank j's experts are one
   contiguous block, in rank order).
3. One host sync per layer: the split sizes of the row all-to-all must be Python ints for
   ``all_to_all_single`` (NCCL and gloo take host-side split lists), so the send and receive counts per rank
   come to the host in one ``.tolist()``. This is the only host-device sync; it is unavoidable for EP > 1 with
   this collective API.
4. ``all_to_all_single`` of the rows for other ranks' experts (uneven splits; rows for this rank's own experts
   never enter it), overlapped with the FFN of the first half of the local experts on this rank's own rows.
5. Received rows are ordered by (source rank, local expert); ``moe_permute`` with K=1 regroups them by local
   expert (stable), ``expert_ffn`` runs the local experts on them, and they go back to (source, expert) order.
6. The reverse all-to-all, overlapped with the second half of the local experts on this rank's own rows; then
   ``moe_unpermute`` weights each row by its router probability and sums each token's K rows.
The all-to-alls are a pair of autograd functions (start / wait): the backward of the wait launches the reverse
exchange of the gradient and the backward of the start waits for it, so (autograd runs later-created nodes
first) the backward of the work done between them in forward overlaps the gradient exchange.

Load-balancing loss: the router statistics stay per rank (each rank's aux loss covers its own tokens, and the
training step averages it over micro-batches and ranks), as with EP=1 and plain data parallelism; a
global-batch aux loss (statistics all-reduced before the loss) is not implemented.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard

from veofast.models.moe import Experts
from veofast.ops import expert_ffn, moe_permute, moe_unpermute

from .parallel_state import ParallelState

EXPERT_PARAM_NAMES = ("gate_up_proj", "down_proj")


class _Exchange:
    """An all-to-all in flight between ``_AllToAllStart`` and ``_AllToAllWait`` (forward, then backward)."""

    def __init__(self, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup):
        self.output_splits, self.input_splits, self.group = output_splits, input_splits, group
        self.work = None
        self.grad = None  # the gradient of the exchange's input, filled by the reverse exchange in backward

    def launch(self, rows: torch.Tensor, output_splits: list[int], input_splits: list[int]) -> torch.Tensor:
        out = rows.new_empty((sum(output_splits), *rows.shape[1:]))
        self.work = dist.all_to_all_single(
            out, rows.contiguous(), output_splits, input_splits, group=self.group, async_op=True
        )
        return out

    def wait(self) -> None:
        self.work.wait()
        self.work = None


class _AllToAllStart(torch.autograd.Function):
    """Launches the exchange; its backward waits for the reverse exchange launched by ``_AllToAllWait``'s."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, exchange: _Exchange) -> torch.Tensor:
        ctx.exchange = exchange
        return exchange.launch(rows, exchange.output_splits, exchange.input_splits)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        del grad  # the placeholder passed on by _AllToAllWait.backward
        exchange = ctx.exchange
        exchange.wait()
        grad_rows, exchange.grad = exchange.grad, None
        return grad_rows, None


class _AllToAllWait(torch.autograd.Function):
    """Waits for the exchange; its backward launches the reverse exchange of the gradient (without waiting)."""

    @staticmethod
    def forward(ctx, received: torch.Tensor, exchange: _Exchange) -> torch.Tensor:
        ctx.exchange = exchange
        exchange.wait()
        return received.view_as(received)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        exchange = ctx.exchange
        exchange.grad = exchange.launch(grad, exchange.input_splits, exchange.output_splits)
        # _AllToAllStart.backward waits for the exchange and returns exchange.grad; ``grad`` (still being read by
        # the exchange, and left unchanged) only stands in for the gradient of the start's output
        return grad, None


def all_to_all_start(rows: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> tuple:
    """Start a differentiable uneven all-to-all of ``rows (sum(input_splits), ...)``; returns ``(received,
    exchange)``: ``received (sum(output_splits), ...)`` is valid only after ``all_to_all_wait``. Work done between
    the two (in forward, and in reverse order in backward) overlaps the communication: autograd runs the backward
    of later-created nodes first, so the gradient exchange launched by the wait's backward runs while the backward
    of that work runs, and the start's backward waits for it."""
    exchange = _Exchange(output_splits, input_splits, group)
    return _AllToAllStart.apply(rows, exchange), exchange


def all_to_all_wait(received: torch.Tensor, exchange: _Exchange) -> torch.Tensor:
    """Wait for the exchange started by ``all_to_all_start``; returns ``received``, now valid."""
    return _AllToAllWait.apply(received, exchange)


def _local(weight: torch.Tensor) -> torch.Tensor:
    """The local experts of an expert weight: a DTensor's local shard (differentiably), a plain tensor as is."""
    return weight.to_local() if isinstance(weight, DTensor) else weight


class _GatherRows(torch.autograd.Function):
    """``x[index]`` for a permutation ``index``; the backward gathers with the inverse permutation (no scatter-add)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        index = index.long()
        inverse = torch.empty_like(index).scatter_(0, index, torch.arange(index.shape[0], device=index.device))
        return grad.index_select(0, inverse), None


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x (R, ...)`` reordered by the permutation ``index (R,)`` of ``[0, R)``: row i of the result is
    ``x[index[i]]``. Differentiable wrt ``x``."""
    return _GatherRows.apply(x, index)


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    """Rows per expert ``(E,)`` -> cumulative end rows ``(E,)`` int32."""
    return counts.cumsum(0).to(torch.int32)


class ExpertParallelDispatcher:
    """``moe_ffn`` across an EP group: dispatch rows to their experts' owners, run the local experts, combine.

    Called as ``dispatcher(hidden, topk_ids, topk_weights, gate_up_proj, down_proj, backend=...)`` with
    ``hidden (T, H)``, ``topk_ids / topk_weights (T, K)`` (global expert ids in ``[0, num_experts)``), and the
    expert weights either as DTensors sharded ``Shard(0)`` over the EP mesh (global ``(E, 2I, H)`` / ``(E, H, I)``)
    or as this rank's plain ``(E/ep, 2I, H)`` / ``(E/ep, H, I)`` slices. Returns ``(T, H)`` in hidden's dtype.
    Every rank of ``group`` must call it the same number of times (it runs collectives).

    Overlap: rows whose expert lives on this rank never enter the all-to-alls. Their FFN is split in two by
    local expert (experts ``[0, L//2)`` and ``[L//2, L)``): the first half runs while the dispatch exchange is in
    flight, the second while the combine exchange is, and in backward the same halves' backward runs under the
    two gradient exchanges.
    """

    def __init__(self, num_experts: int, group: dist.ProcessGroup):
        ep_size = dist.get_world_size(group)
        if num_experts % ep_size:
            raise ValueError(f"expert parallelism: num_experts={num_experts} is not divisible by ep_size={ep_size}")
        self.num_experts = num_experts
        self.group = group
        self.ep_size = ep_size
        self.ep_rank = dist.get_rank(group)
        self.num_local_experts = num_experts // ep_size

    def __repr__(self) -> str:
        return f"ExpertParallelDispatcher(num_experts={self.num_experts}, ep_size={self.ep_size})"

    def __call__(
        self,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        gate_up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        *,
        backend: str = "auto",
    ) -> torch.Tensor:
        ep, rank, num_local = self.ep_size, self.ep_rank, self.num_local_experts
        gate_up, down = _local(gate_up_proj), _local(down_proj)
        if gate_up.shape[0] != num_local or down.shape[0] != num_local:
            raise ValueError(
                f"expert parallelism: expected this rank's {num_local} experts, got gate_up_proj "
                f"{tuple(gate_up.shape)} and down_proj {tuple(down.shape)}"
            )
        if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != hidden.shape[0]:
            raise ValueError(
                f"expert parallelism: need topk_ids and topk_weights of shape (T={hidden.shape[0]}, K), got "
                f"{tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}"
            )

        # 1. Per-expert counts of this rank's assignments (no host sync), exchanged asynchronously: afterwards
        #    recv_counts[i, l] = rows that rank i sends to this rank's local expert l.
        flat_ids = topk_ids.reshape(-1).long()
        send_counts = torch.zeros(self.num_experts, dtype=torch.int64, device=hidden.device)
        send_counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))
        recv_counts = torch.empty_like(send_counts)
        work = dist.all_to_all_single(recv_counts, send_counts, group=self.group, async_op=True)
        # 2. Meanwhile, group this rank's token copies by (global) expert: rank j's rows are one contiguous block.
        permuted = moe_permute(hidden, topk_ids, self.num_experts, backend=backend)
        work.wait()
        send_counts, recv_counts = send_counts.view(ep, num_local), recv_counts.view(ep, num_local).clone()
        own_counts = send_counts[rank]  # rows of this rank's tokens for its own experts (never exchanged)
        recv_counts[rank] = 0
        half = num_local // 2
        # 3. The one host sync of the layer: all_to_all_single needs its split sizes as Python ints.
        sizes = torch.cat([send_counts.sum(1), recv_counts.sum(1), own_counts[:half].sum().view(1)]).tolist()
        send_splits, recv_splits, rows_a = sizes[:ep], sizes[ep : 2 * ep], sizes[2 * ep]
        own_start, own_rows = sum(send_splits[:rank]), send_splits[rank]
        send_splits[rank] = 0
        # Pieces of the permuted rows by ``split`` (its backward writes all their gradients into one tensor),
        # not by slicing (each slice's backward would add a full-size zero-padded gradient).
        before, own_a, own_b, after = permuted.rows.split(
            [own_start, rows_a, own_rows - rows_a, permuted.rows.shape[0] - own_start - own_rows]
        )

        # 4. Dispatch the other ranks' rows; meanwhile the first half of the local experts on this rank's rows.
        # (with one of the two pieces empty, as on both ranks of EP=2, the other is sent as is: no copy)
        remote = after if before.shape[0] == 0 else before if after.shape[0] == 0 else torch.cat([before, after])
        received, dispatch = all_to_all_start(remote, recv_splits, send_splits, self.group)
        out_a = own_a  # with a single local expert there is no first half (own_a is empty)
        if half:
            out_a = expert_ffn(own_a, _offsets(own_counts[:half]), gate_up[:half], down[:half], backend=backend)
        received = all_to_all_wait(received, dispatch)
        # 5. Received rows are ordered (source rank, local expert): regroup by local expert, run, order back.
        local_ids = torch.repeat_interleave(
            torch.arange(num_local, device=hidden.device).repeat(ep),
            recv_counts.reshape(-1),
            output_size=sum(recv_splits),
        )
        grouped = moe_permute(received, local_ids[:, None], num_local, backend=backend)
        out_rows = expert_ffn(grouped.rows, grouped.expert_offsets, gate_up, down, backend=backend)
        # 6. Combine: results back to their token's rank; meanwhile the second half of the local experts.
        returned, combine = all_to_all_start(
            gather_rows(out_rows, grouped.row_index), send_splits, recv_splits, self.group
        )
        out_b = expert_ffn(own_b, _offsets(own_counts[half:]), gate_up[half:], down[half:], backend=backend)
        returned = all_to_all_wait(returned, combine)
        # 7. Rows back in permuted order, then each token's K rows weighted by its router probabilities and summed.
        returned_before, returned_after = returned.split([own_start, returned.shape[0] - own_start])
        out = torch.cat([returned_before, out_a, out_b, returned_after])
        return moe_unpermute(out, permuted.row_index, topk_weights, backend=backend)


def _experts_modules(model: nn.Module) -> list[tuple[str, Experts]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Experts)]


def check_expert_parallel(model: nn.Module, ep_size: int) -> list[tuple[str, Experts]]:
    """The model's ``Experts`` modules, after checking that EP of size ``ep_size`` can split them (ValueError if
    not). Runs no collective, so every rank raises the same error before any communication."""
    experts = _experts_modules(model)
    if not experts:
        raise ValueError(
            f"expert parallelism (ep_size={ep_size}) needs an MoE model, but the model has no Experts modules; "
            "set ep_size=1"
        )
    for name, module in experts:
        if module.num_experts % ep_size:
            raise ValueError(
                f"expert parallelism: {name} has num_experts={module.num_experts}, which is not divisible by "
                f"ep_size={ep_size}; choose an ep_size that divides the number of experts"
            )
        for pname in EXPERT_PARAM_NAMES:
            if isinstance(getattr(module, pname), DTensor):
                raise ValueError(f"expert parallelism: {name}.{pname} is already a DTensor (applied twice?)")
    return experts


@torch.no_grad()
def apply_expert_parallel(model: nn.Module, ps: ParallelState) -> None:
    """Slice every ``Experts`` module's weights to this rank's experts as ``Shard(0)`` DTensors on ``ps.ep_mesh``
    and install an ``ExpertParallelDispatcher``. The model may be on meta (nothing allocated) or on a device
    (the full weights are initialised or loaded; each rank keeps a copy of its slice)."""
    experts = check_expert_parallel(model, ps.ep_size)
    for _, module in experts:
        num_local = module.num_experts // ps.ep_size
        start = ps.ep_rank * num_local
        for pname in EXPERT_PARAM_NAMES:
            param = getattr(module, pname)
            local = param[start : start + num_local]
            if not local.is_meta:
                local = local.clone()  # do not keep the full weight alive through a view
            sharded = DTensor.from_local(
                local, ps.ep_mesh, [Shard(0)], run_check=False, shape=param.shape, stride=param.stride()
            )
            setattr(module, pname, nn.Parameter(sharded, requires_grad=param.requires_grad))
        module.dispatcher = ExpertParallelDispatcher(module.num_experts, ps.ep_group)


def shard_experts(model: nn.Module, ps: ParallelState, fsdp_kwargs: dict) -> None:
    """Put each ``Experts`` module in its own FSDP2 unit over ``ps.ep_fsdp_mesh`` (call after
    ``apply_expert_parallel`` and before the enclosing layers are sharded), with the world-wide gradient divide
    factor explained in the module docstring. ``fsdp_kwargs`` are those of the other units; the mesh is replaced.
    """
    for name, module in _experts_modules(model):
        kwargs = {**fsdp_kwargs, "mesh": ps.ep_fsdp_mesh}
        if not isinstance(module.gate_up_proj, DTensor):
            raise ValueError(f"shard_experts: {name} is not expert-parallel; call apply_expert_parallel first")
        num_local = module.num_experts // ps.ep_size
        if num_local % ps.ep_fsdp_size:
            # Fewer (or unevenly many) local experts than ep_fsdp ranks: shard inside each expert instead.
            kwargs["shard_placement_fn"] = lambda param: Shard(1)
        fully_shard(module, **kwargs)
        module.set_gradient_divide_factor(float(ps.fsdp_size))
        if ps.device_type == "cpu" and ps.ep_fsdp_size > 1:
            # The factor makes FSDP reduce-scatter with PREMUL_SUM, which gloo lacks: sum, then divide instead.
            # Not on a 1-rank ep_fsdp mesh, which runs no reduce-scatter (and torch 2.13 would divide twice there).
            module.set_force_sum_reduction_for_comms(True)
