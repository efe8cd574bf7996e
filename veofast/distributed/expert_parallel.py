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

Forward of one MoE layer (``ExpertParallelDispatcher``, installed as ``Experts.dispatcher``), T tokens, top-K,
L = E / ep local experts. Tokens travel, not (token, slot) rows: a token goes once to each rank that holds at least
one of its K experts, and comes back as that rank's partial sum over those experts (as DeepEP does). With
top-8 over 2 ranks that moves one row per token each way instead of about four. Two dispatches do this:

**All-gather** (``dispatch="allgather"``; what ``"auto"`` picks when another rank needs at least
``GATHER_MIN_SHARE`` of a rank's tokens under uniform routing: E=128, top-8 at EP=2 and EP=4). When nearly every
token travels to every rank anyway (99.6% at EP=2), sending all of them costs no extra bytes and needs no
routing-dependent sizes, hence no device-to-host sync at all:

1. The ranks' token counts travel between the hosts over a CPU group (``ParallelState.ep_host_group``); the
   device never waits. Each rank pads to the largest count.
2. All-gather of the hidden states, router weights and expert ids (padding rows route to -1: nowhere).
3. One ``moe_ffn`` over all the group's tokens with this rank's experts (``first_expert``: slots routed elsewhere
   drop out). The permuted rows are sized for the worst case (``T_group * K``), but the grouped GEMMs and the
   SwiGLU only touch the rows that exist.
4. Reduce-scatter of the partial sums (in the activations' dtype) back to the tokens' ranks.
The backward swaps the collectives (reduce-scatter of the hidden states' gradient, all-gather of the output's).
With ``check_ids`` (the default; the models turn it off, as their router's ids are in range) each rank's flag for
expert ids out of range travels with its token count, and every rank raises the same ValueError before any
device collective; computing the flag is then the dispatch's one host sync.

**All-to-all** (``dispatch="alltoall"``; larger EP, where a token needs only some ranks):

1. Per destination rank: the tokens it needs and the slots routed to it, and a flag for expert ids out of
   range. An async all-to-all of these counts starts, and the send order (tokens grouped by destination, in
   token order) is built on the device meanwhile.
2. One host sync per layer: ``all_to_all_single`` takes its split sizes as Python ints, and ``moe_ffn`` sizes
   its rows exactly from the slot counts, so the counts come to the host in one ``.tolist()``. This is the only
   host-device sync; every rank raises the same ValueError here if any rank saw an id out of range. On 2×H200
   (16384 tokens per GPU, E=128, top-8) it leaves the GPU idle about 2 ms per layer fwd+bwd, the largest part
   of what EP=2 costs over EP=1 (10.2 against 7.14 ms, ``tools/gpu_jobs/ep_diag.py``).
3. Dispatch: the sent tokens' hidden states, their router weights and their expert ids (made local to the
   destination, -1 for slots routed elsewhere) in three async all-to-alls.
4. One ``moe_ffn`` call runs the local experts on this rank's own tokens and the received ones together (slots
   routed elsewhere drop out): on one H200 at 16384 tokens per rank, E=128, top-8, that is 0.94x the EP=1 time,
   where the own tokens first (under the dispatch) and the received ones after took 1.07x, and with the own tokens
   in two halves around the received ones 1.20x (``tools/gpu_jobs/ep_compute.py``): bigger expert groups and one
   pass over the weights gain more than the overlap of a 64 MiB exchange can. The received tokens' partial sums
   go back in the combine all-to-all.
5. Each token's output: its own partial sum plus those that came back (``index_add`` per source rank; the
   partial sums are in the activations' dtype, so bf16 outputs round twice where EP=1 rounds once).
The exchanges are pairs of autograd functions (start / wait, ``row_collectives.exchange_start``): the backward of
the wait launches the reverse exchange of the gradient and the backward of the start waits for it, so (autograd
runs later-created nodes first) the backward of the work done between them in forward overlaps the gradient
exchange. In both dispatches the combine runs that way around the caller's ``side`` work (the shared expert of a
Qwen2-MoE block).

Load-balancing loss: as with EP=1 and plain data parallelism, each rank's aux loss covers its own tokens and the
training step averages it over micro-batches and ranks, unless ``train.global_load_balancing`` forms it from the
router statistics of the whole data-parallel group (``load_balancing.py``); expert parallelism changes neither.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard

from veofast.models.moe import Experts
from veofast.ops import moe_ffn

from .parallel_state import ParallelState
from .row_collectives import (
    AllToAll,
    ReduceScatter,
    all_gather_rows,
    exchange_start,
    exchange_wait,
    gather_rows,
    host_all_gather,
)

EXPERT_PARAM_NAMES = ("gate_up_proj", "down_proj")
DISPATCH_MODES = ("auto", "allgather", "alltoall")
# "auto" gathers when another rank needs at least this share of a rank's tokens (uniform routing): at E=128,
# top-8 that is EP=2 (99.6%) and EP=4 (90%), not EP=8 (66%)
GATHER_MIN_SHARE = 0.75


def _miss_probability(num_experts: int, num_local: int, top_k: int) -> float:
    """Probability that none of a token's ``top_k`` distinct, uniformly drawn experts is among ``num_local``."""
    p = 1.0
    for i in range(top_k):
        p *= max(num_experts - num_local - i, 0) / (num_experts - i)
    return p


def _local(weight: torch.Tensor) -> torch.Tensor:
    """The local experts of an expert weight: a DTensor's local shard (differentiably), a plain tensor as is."""
    return weight.to_local() if isinstance(weight, DTensor) else weight


class _DispatchPlan(NamedTuple):
    """Who sends what in one layer (``S`` tokens sent, ``R`` received, ``ep`` ranks).

    send_token: (S,) int64 this rank's tokens to send, grouped by destination rank, in token order within one.
    send_dest: (S,) int64 the destination rank of each.
    send_splits / recv_splits: tokens to / from each rank (0 for this rank itself).
    local_rows: the slots that this rank's experts compute: those of its own tokens and of the received ones.
    """

    send_token: torch.Tensor
    send_dest: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    local_rows: int


class ExpertParallelDispatcher:
    """``moe_ffn`` across an EP group: send tokens to their experts' owners, run the local experts, combine.

    Called as ``dispatcher(hidden, topk_ids, topk_weights, gate_up_proj, down_proj, backend=...)`` with
    ``hidden (T, H)``, ``topk_ids / topk_weights (T, K)`` (global expert ids in ``[0, num_experts)``), and the
    expert weights either as DTensors sharded ``Shard(0)`` over the EP mesh (global ``(E, 2I, H)`` / ``(E, H, I)``)
    or as this rank's plain ``(E/ep, 2I, H)`` / ``(E/ep, H, I)`` slices. Returns ``(T, H)`` in hidden's dtype.
    ``check_ids``: raise ValueError on expert ids out of range on every rank before any row moves (the all-to-all
    dispatch always does; the all-gather dispatch then syncs with the device once; the models pass False, their
    router's ids are in range). ``side``: an optional callable returning ``(T, H)`` (e.g. the shared expert), run
    while the combine is in flight (and its backward while the combine's gradient is) and added to the output.
    Every rank of ``group`` must call it the same number of times (it runs collectives). See the module docstring
    for the protocol.
    """

    def __init__(
        self,
        num_experts: int,
        group: dist.ProcessGroup,
        *,
        dispatch: str = "auto",
        host_group: dist.ProcessGroup | None = None,
    ):
        ep_size = dist.get_world_size(group)
        if num_experts % ep_size:
            raise ValueError(f"expert parallelism: num_experts={num_experts} is not divisible by ep_size={ep_size}")
        if dispatch not in DISPATCH_MODES:
            raise ValueError(f"expert parallelism: dispatch must be one of {DISPATCH_MODES}, got {dispatch!r}")
        if host_group is None and dist.get_backend(group) == "gloo":
            host_group = group  # already a CPU group
        if dispatch == "allgather" and host_group is None:
            raise ValueError(
                "expert parallelism: dispatch='allgather' needs host_group, a gloo group with the ranks of group "
                "(ParallelState.ep_host_group), to exchange token counts without a device sync"
            )
        self.num_experts = num_experts
        self.group = group
        self.host_group = host_group
        self.dispatch = dispatch
        self.ep_size = ep_size
        self.ep_rank = dist.get_rank(group)
        self.num_local_experts = num_experts // ep_size

    def __repr__(self) -> str:
        return (
            f"ExpertParallelDispatcher(num_experts={self.num_experts}, ep_size={self.ep_size}, "
            f"dispatch={self.dispatch!r})"
        )

    def strategy(self, top_k: int) -> str:
        """The dispatch used for top-``top_k`` routing: ``"allgather"`` or ``"alltoall"`` (see the module
        docstring; ``"auto"`` picks the gather when another rank needs at least ``GATHER_MIN_SHARE`` of a rank's
        tokens under uniform routing, and a host group is there)."""
        if self.dispatch != "auto":
            return self.dispatch
        if self.host_group is None:
            return "alltoall"
        share = 1.0 - _miss_probability(self.num_experts, self.num_local_experts, top_k)
        return "allgather" if share >= GATHER_MIN_SHARE else "alltoall"

    def _plan(self, topk_ids: torch.Tensor) -> _DispatchPlan:
        """Steps 1-2 of the protocol: counts, their exchange, the one host sync and the send order."""
        ep, rank, num_local = self.ep_size, self.ep_rank, self.num_local_experts
        num_tokens = topk_ids.shape[0]
        device = topk_ids.device
        ids = topk_ids.long()
        out_of_range = ((ids < 0) | (ids >= self.num_experts)).any()
        owner = ids.clamp(0, self.num_experts - 1) // num_local  # (T, K) the rank holding each slot's expert
        needs = torch.zeros(num_tokens, ep, dtype=torch.bool, device=device).scatter_(1, owner, True)  # (T, ep)
        # counts[j] = (tokens to rank j, slots routed to rank j, out-of-range flag); scatter_add, not bincount
        # (which syncs on CUDA)
        slots = torch.zeros(ep, dtype=torch.int64, device=device).scatter_add_(
            0, owner.view(-1), torch.ones_like(owner.view(-1))
        )
        counts = torch.stack([needs.sum(0), slots, out_of_range.long().expand(ep)], dim=1)
        recv_counts = torch.empty_like(counts)
        work = dist.all_to_all_single(recv_counts, counts, group=self.group, async_op=True)
        # Meanwhile: the send order. Position of each (destination, token) pair among the pairs that travel.
        needs[:, rank] = False
        travels = needs.t().reshape(-1)  # (ep * T,) in (destination, token) order
        position = travels.cumsum(0) - 1
        work.wait()
        # tokens to each rank; tokens, slots and flags from each rank (this rank's own slots among them)
        sizes = torch.cat([counts[:, 0], recv_counts.t().reshape(-1)]).tolist()
        send_splits, recv_splits = sizes[:ep], sizes[ep : 2 * ep]
        slots_from, flags = sizes[2 * ep : 3 * ep], sizes[3 * ep : 4 * ep]
        if any(flags):
            raise self._bad_id_error([i for i, flag in enumerate(flags) if flag])
        send_splits[rank] = recv_splits[rank] = 0
        num_send = sum(send_splits)
        # Scatter each travelling pair's flat index to its position (the rest to a spare slot, then dropped).
        pair = torch.arange(ep * num_tokens, device=device)
        send_pair = torch.empty(num_send + 1, dtype=torch.int64, device=device)
        send_pair.scatter_(0, torch.where(travels, position, num_send), pair)
        send_pair = send_pair[:num_send]
        return _DispatchPlan(
            send_token=send_pair % max(num_tokens, 1),
            send_dest=send_pair // max(num_tokens, 1),
            send_splits=send_splits,
            recv_splits=recv_splits,
            local_rows=sum(slots_from),
        )

    def __call__(
        self,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        gate_up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        *,
        check_ids: bool = True,
        backend: str = "auto",
        side=None,
    ) -> torch.Tensor:
        num_local = self.num_local_experts
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
        if self.strategy(topk_ids.shape[1]) == "allgather":
            return self._gather_tokens(hidden, topk_ids, topk_weights, gate_up, down, backend, side, check_ids)
        return self._exchange_tokens(hidden, topk_ids, topk_weights, gate_up, down, backend, side)

    def _bad_id_error(self, bad_ranks: list[int]) -> ValueError:
        return ValueError(
            f"expert parallelism: topk_ids outside [0, num_experts={self.num_experts}) on EP rank(s) {bad_ranks}"
        )

    def _gather_tokens(self, hidden, topk_ids, topk_weights, gate_up, down, backend, side, check_ids):
        """The all-gather dispatch: every rank's tokens, ids and weights to every rank of the group; the local
        experts' partial sums for all of them; reduce-scatter back to the tokens' ranks. With ``check_ids`` (a
        host sync on a GPU) each rank's flag for ids out of range travels with its token count, so every rank
        raises before any device collective."""
        bad_ids = check_ids and bool(((topk_ids < 0) | (topk_ids >= self.num_experts)).any())
        counts, flags = zip(*host_all_gather([hidden.shape[0], int(bad_ids)], self.host_group), strict=True)
        if any(flags):
            raise self._bad_id_error([j for j, flag in enumerate(flags) if flag])
        padded = max(counts)
        all_ids = all_gather_rows(topk_ids, padded, self.group, pad_value=-1)  # padding rows route nowhere
        out = moe_ffn(
            gather_rows(hidden, padded, self.group),
            all_ids,
            gather_rows(topk_weights, padded, self.group),
            gate_up,
            down,
            first_expert=self.ep_rank * self.num_local_experts,
            backend=backend,
        )
        combine = ReduceScatter(hidden.shape[0], padded, self.group)
        partial = exchange_start(out, combine)
        side_out = side() if side is not None else None  # under the combine
        out = exchange_wait(partial, combine)
        return out if side_out is None else out + side_out

    def _exchange_tokens(self, hidden, topk_ids, topk_weights, gate_up, down, backend, side) -> torch.Tensor:
        """The all-to-all dispatch (steps 1-5 of the module docstring)."""
        num_local = self.num_local_experts
        plan = self._plan(topk_ids)
        splits = (plan.recv_splits, plan.send_splits)

        # 3. Dispatch the tokens, their weights and their ids (local to the destination, -1 for other ranks').
        ids = topk_ids.long()
        sent_ids = ids.index_select(0, plan.send_token) - (plan.send_dest * num_local)[:, None]
        sent_ids = torch.where((sent_ids >= 0) & (sent_ids < num_local), sent_ids, -1).to(torch.int32)
        recv_ids = sent_ids.new_empty((sum(plan.recv_splits), ids.shape[1]))
        ids_work = dist.all_to_all_single(recv_ids, sent_ids, *splits, group=self.group, async_op=True)
        hidden_exchange, weights_exchange = AllToAll(*splits, self.group), AllToAll(*splits, self.group)
        recv_hidden = exchange_start(hidden.index_select(0, plan.send_token), hidden_exchange)
        recv_weights = exchange_start(topk_weights.index_select(0, plan.send_token), weights_exchange)
        own_ids = ids - self.ep_rank * num_local
        own_ids = torch.where((own_ids >= 0) & (own_ids < num_local), own_ids, -1).to(torch.int32)
        recv_hidden = exchange_wait(recv_hidden, hidden_exchange)
        recv_weights = exchange_wait(recv_weights, weights_exchange)
        ids_work.wait()
        # 4. The local experts on own and received tokens in one call; the received tokens' partial sums go back.
        out = moe_ffn(
            torch.cat([hidden, recv_hidden]),
            torch.cat([own_ids, recv_ids]),
            torch.cat([topk_weights, recv_weights]),
            gate_up,
            down,
            first_expert=0,
            num_rows=plan.local_rows,
            backend=backend,
        )
        out, partial = out.split([hidden.shape[0], recv_hidden.shape[0]])
        combine = AllToAll(plan.send_splits, plan.recv_splits, self.group)
        returned = exchange_start(partial, combine)
        side_out = side() if side is not None else None  # under the combine
        returned = exchange_wait(returned, combine)
        # 5. Own partial sums plus those from each rank (one index_add per rank: indices unique within one). Also
        #    the empty ones: every rank's graph must reach every exchange, or a rank would skip a backward exchange
        #    that its peers run.
        for tokens, part in zip(plan.send_token.split(plan.send_splits), returned.split(plan.send_splits), strict=True):
            out = out.index_add(0, tokens, part)
        return out if side_out is None else out + side_out


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
def apply_expert_parallel(model: nn.Module, ps: ParallelState, dispatch: str = "auto") -> None:
    """Slice every ``Experts`` module's weights to this rank's experts as ``Shard(0)`` DTensors on ``ps.ep_mesh``
    and install an ``ExpertParallelDispatcher`` (``dispatch``: its token dispatch). The model may be on meta
    (nothing allocated) or on a device (the full weights are initialised or loaded; each rank keeps a copy of its
    slice)."""
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
        module.dispatcher = ExpertParallelDispatcher(
            module.num_experts, ps.ep_group, dispatch=dispatch, host_group=ps.ep_host_group
        )


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
