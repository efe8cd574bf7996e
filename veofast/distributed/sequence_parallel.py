"""Ulysses sequence parallelism (SP): each rank of an SP group holds a slice of every packed micro-batch.

Data side: ``shard_micro_batch`` pads a packed micro-batch to a multiple of the SP size, shifts the labels on
the whole sequence and gives each rank its contiguous slice of tokens (the document boundaries stay whole).

Model side: ``apply_sequence_parallel`` replaces every decoder layer's ``self_attn`` by a ``UlyssesAttention``
that holds the very same submodules (parameter names do not change: ``model.layers.0.self_attn.q_proj.weight``).
It projects this rank's tokens, moves q, k, v with all-to-alls to "all tokens, ``heads / sp`` heads", runs
``varlen_attention`` over the full ``cu_seqlens`` and moves the output back (see ``ulysses_comm`` for how the
all-to-alls hide behind computation), in ``head_chunks`` chunks of whole GQA groups pipelined so that one chunk's
attention hides the next chunk's exchanges (``UlyssesAttention``). With fewer KV heads than SP ranks each KV
head is replicated so every rank gets one. MoE blocks get their router statistics averaged over the SP group, so
the load-balancing loss is the one of the whole micro-batch.

Loss: each rank's LM loss is the sum over its slice divided by the global label count (the loop sums the
slices' ``num_label_tokens`` over the data x sequence group); the backward is scaled by ``dp * sp`` because
FSDP averages gradients over that group. Gradients that cross ranks travel back through the reverse
all-to-alls, so no extra loss reduction over the SP group is needed (and none must be done).

Limitation: the (at most ``sp - 1``) padding tokens of a micro-batch take part in the router statistics of
the MoE load-balancing loss, as padding does in any padded batch; they never reach the LM loss.
"""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from veofast.models.layers import Attention
from veofast.models.moe import SparseMoeBlock
from veofast.ops import apply_rotary, varlen_attention

from .ulysses_comm import (
    InFlight,
    all_to_all_linear,
    check_comm_mode,
    check_transport,
    gather_sequence_start,
    head_chunk_sends,
    launch_all_to_all,
    sequence_mean,
    wait_all_to_all_linear,
    wait_heads_to_sequence,
)

IGNORE_INDEX = -100
_KNOWN_KEYS = {"input_ids", "labels", "shift_labels", "position_ids", "cu_seqlens", "max_seqlen",
               "num_label_tokens", "attention_mask"}


# ------------------------------------------------------------------------------------------------------- data side
def shard_micro_batch(micro_batch: dict, sp_rank: int, sp_size: int) -> dict:
    """This SP rank's slice of a packed micro-batch (host tensors, as the packing collator makes them).

    In: ``input_ids (1, T)``, ``labels (1, T)`` (HF-unshifted, -100 at document starts) or ``shift_labels``,
    ``position_ids (1, T)``, ``cu_seqlens (docs + 1,) int32``, ``max_seqlen``, ``num_label_tokens``; a micro-batch
    without ``cu_seqlens`` is one document. ``T`` is padded to ``T' = sp_size * ceil(T / sp_size)`` with an extra
    document of ``T' - T`` tokens (id 0, labels -100).

    Out: ``input_ids``, ``position_ids``, ``shift_labels`` ``(1, T' / sp_size)`` (tokens
    ``[sp_rank * T' / sp_size, (sp_rank + 1) * T' / sp_size)``; ``shift_labels[t] = labels[t + 1]``, taken on the
    whole sequence before slicing), the full ``cu_seqlens`` and ``max_seqlen`` (attention sees the whole sequence)
    and ``num_label_tokens``: this slice's count of ``shift_labels != -100``.
    """
    if not (isinstance(sp_size, int) and sp_size >= 1 and isinstance(sp_rank, int) and 0 <= sp_rank < sp_size):
        raise ValueError(f"shard_micro_batch: need 0 <= sp_rank < sp_size, got sp_rank={sp_rank}, sp_size={sp_size}")
    unknown = sorted(set(micro_batch) - _KNOWN_KEYS)
    if unknown:
        raise ValueError(f"shard_micro_batch: do not know how to split the keys {unknown} over sequence ranks")
    input_ids = micro_batch["input_ids"]
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(
            f"shard_micro_batch: sequence parallelism needs packed micro-batches with input_ids of shape (1, T) "
            f"(set train.rmpad_with_pos_ids or train.rmpad), got {tuple(input_ids.shape)}"
        )
    mask = micro_batch.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise ValueError("shard_micro_batch: a packed micro-batch must not hold padding (attention_mask has zeros)")
    total = input_ids.shape[1]
    cu_seqlens = micro_batch.get("cu_seqlens")
    if cu_seqlens is None:
        cu_seqlens, max_seqlen = torch.tensor([0, total], dtype=torch.int32), total
    else:
        max_seqlen = micro_batch.get("max_seqlen")
        if max_seqlen is None:
            raise ValueError("shard_micro_batch: max_seqlen must be given with cu_seqlens")
    position_ids = micro_batch.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(total, dtype=torch.int64)[None]
    if micro_batch.get("shift_labels") is not None:
        shift_labels = micro_batch["shift_labels"]
    elif micro_batch.get("labels") is not None:
        shift_labels = F.pad(micro_batch["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]
    else:
        shift_labels = None

    pad = -total % sp_size
    if pad:
        input_ids = torch.cat([input_ids, input_ids.new_zeros((1, pad))], dim=1)
        position_ids = torch.cat([position_ids, torch.arange(pad, dtype=position_ids.dtype)[None]], dim=1)
        cu_seqlens = torch.cat([cu_seqlens, cu_seqlens.new_tensor([total + pad])])
        max_seqlen = max(int(max_seqlen), pad)
        if shift_labels is not None:
            shift_labels = torch.cat([shift_labels, shift_labels.new_full((1, pad), IGNORE_INDEX)], dim=1)
    part = (total + pad) // sp_size
    window = slice(sp_rank * part, (sp_rank + 1) * part)
    out = {"input_ids": input_ids[:, window].contiguous(), "position_ids": position_ids[:, window].contiguous(),
           "cu_seqlens": cu_seqlens, "max_seqlen": int(max_seqlen)}
    if shift_labels is not None:
        out["shift_labels"] = shift_labels[:, window].contiguous()
        out["num_label_tokens"] = int((out["shift_labels"] != IGNORE_INDEX).sum())
    return out


# ------------------------------------------------------------------------------------------------------ model side
def ulysses_kv_replication(num_heads: int, num_kv_heads: int, sp_size: int) -> int:
    """How many times each KV head is repeated so that ``sp_size`` ranks each get whole heads (1: none).

    Raises ValueError when the query heads do not split over ``sp_size`` ranks, or the KV heads neither split
    over them nor divide ``sp_size``.
    """
    if num_heads % sp_size:
        raise ValueError(
            f"Ulysses sequence parallelism: num_attention_heads ({num_heads}) must be divisible by ulysses_size "
            f"({sp_size}); choose an ulysses_size that divides it"
        )
    if num_kv_heads % sp_size == 0:
        return 1
    if sp_size % num_kv_heads:
        raise ValueError(
            f"Ulysses sequence parallelism: num_key_value_heads ({num_kv_heads}) must be divisible by ulysses_size "
            f"({sp_size}) or divide it (KV heads are then replicated); choose another ulysses_size"
        )
    return sp_size // num_kv_heads


class UlyssesAttention(nn.Module):
    """``Attention`` over a sequence split across an SP group: same submodules, same parameter names.

    ``forward(hidden (n, H), position_ids (n,), cu_seqlens (docs + 1,) of the whole sequence, max_seqlen,
    inv_freq, rope_scaling) -> (n, H)`` with ``n = N / sp`` this rank's tokens.

    After the all-to-alls a rank holds ``heads / sp`` query heads and ``kv_heads * kv_repeat / sp`` (the "local
    KV heads") KV heads. ``head_chunks = C`` splits them into ``C`` chunks of whole GQA groups: chunk ``c`` holds
    local KV heads ``[c * kv / C, (c + 1) * kv / C)`` and their query heads (so ``C`` must divide the local KV heads).
    ``C = 1`` (the default) is the unchunked schedule. On 2xH200 (7B layer, 64k tokens, copy-engine transport)
    chunking did not pay: smaller exchanges cost more in all (4.2 ms for 2 chunks against 2.7 unchunked), and the
    unchunked overlap already hid 61-72% of the all-to-all time against 24-67% for 2 chunks (``bench/ulysses.py
    --head-chunks``; runs vary by a few ms).

    Forward, each all-to-all hidden by what follows it (``ulysses_comm`` has the launch/wait nodes):

    1. gather positions; q projection -> launch chunk 0's q; k projection -> launch chunk 0's k; v projection ->
       launch chunk 0's v (chunk 0's q and k travel under the k and v projections); then launch chunks 1..C-1's
       q, k, v. Each chunk's send block is one contiguous copy of a strided view of the projection
       (``head_chunk_sends``): the same single copy of q, k, v as without chunks, no extra full-size copy.
    2. for each chunk ``c``: wait q_c, k_c -> RoPE (under v_c); wait v_c -> ``varlen_attention`` on the chunk's
       heads -> launch its output all-to-all. Chunk ``c``'s attention runs while chunks ``c+1..``'s inputs and
       chunk ``c-1``'s output are in flight; only chunk 0's input exchange (1/C of it, mostly under the
       projections) waits on the critical path.
    3. ``wait_all_to_all_linear``: the received outputs are gathered and ``o_proj`` runs once over all heads,
       its share for this rank's own heads first, under the last chunk's exchange. (A per-chunk accumulated
       ``o_proj`` would hide nothing more: the earlier chunks' exchanges already run under attention, and it would
       round the bf16 output ``C`` times more often and reread it ``C`` times.)

    Backward, by autograd's order (among ready nodes the one created last runs first): the ``o_proj`` backward
    computes chunk C-1's output gradient, launches its reverse all-to-all, then chunk C-2's, ..., and the weight
    gradient under them. Chunk ``c``'s output launch node (created in the loop, after every input launch) waits
    for its reverse exchange, then chunk ``c``'s attention backward runs, then its input wait nodes launch the
    reverse all-to-alls of v_c, k_c, q_c. The next ready node created last is chunk ``c-1``'s output launch node,
    so chunk ``c-1``'s attention backward runs while chunk ``c``'s input gradients travel; the input launch nodes
    (created before the loop) wait only after chunk 0's attention backward. Chunk 0's v gradient is waited for
    after RoPE's backward, its k gradient under the v projection's backward and q's under k's. With ``C = 1``
    (the unchunked schedule) the attention, forward and backward, waits for the whole of q, k, v, and nothing
    overlaps it. ``tests/distributed/workers/sp_attention_worker.py`` checks this order.
    """

    def __init__(self, attn: Attention, group, sp_size: int, *, comm_mode: str = "async", comm_transport: str = "nccl",
                 head_chunks: int = 1):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.num_heads, self.num_kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.backend = attn.backend
        self.kv_repeat = ulysses_kv_replication(self.num_heads, self.num_kv_heads, sp_size)
        if self.o_proj.bias is not None:
            raise ValueError("UlyssesAttention: o_proj with a bias is not supported")
        self.group = group
        self.sp_size = sp_size
        self.local_kv_heads = self.num_kv_heads * self.kv_repeat // sp_size
        self.comm_mode = comm_mode
        self.comm_transport = comm_transport
        self.head_chunks = head_chunks

    @property
    def comm_mode(self) -> str:
        return self._comm_mode

    @comm_mode.setter
    def comm_mode(self, mode: str) -> None:
        check_comm_mode(mode)
        self._comm_mode = mode

    @property
    def comm_transport(self) -> str:
        """What carries the all-to-alls: ``"nccl"`` or ``"copy_engine"`` (see ``ulysses_comm``)."""
        return self._comm_transport

    @comm_transport.setter
    def comm_transport(self, transport: str) -> None:
        check_transport(transport)
        self._comm_transport = transport

    @property
    def head_chunks(self) -> int:
        """How many chunks of this rank's heads the pipeline runs."""
        return self._head_chunks

    @head_chunks.setter
    def head_chunks(self, chunks: int) -> None:
        if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1 or self.local_kv_heads % chunks:
            raise ValueError(
                f"UlyssesAttention: head_chunks must be an int >= 1 that divides the {self.local_kv_heads} KV head(s) "
                f"each of the {self.sp_size} ranks holds ({self.num_kv_heads} KV heads"
                + (f" x {self.kv_repeat} replicas" if self.kv_repeat > 1 else "")
                + f" / ulysses_size {self.sp_size}), got {chunks!r}"
            )
        self._head_chunks = chunks

    def _launch(self, send: torch.Tensor, label: str) -> tuple[torch.Tensor, InFlight]:
        flight = InFlight(self.group, self.comm_mode, self.comm_transport, label=label)
        return launch_all_to_all(send, flight), flight

    def _replicate(self, kv: torch.Tensor) -> torch.Tensor:
        return kv.repeat_interleave(self.kv_repeat, dim=1) if self.kv_repeat > 1 else kv

    def forward(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        inv_freq: torch.Tensor,
        rope_scaling: float,
    ) -> torch.Tensor:
        n, d, size, chunks = hidden.shape[0], self.head_dim, self.sp_size, self.head_chunks
        positions, positions_work = gather_sequence_start(position_ids, self.group, self.comm_mode)
        q = self.q_proj(hidden).view(n, self.num_heads, d)
        if self.q_norm is not None:
            q = self.q_norm(q)
        sends = {"q": head_chunk_sends(q, size, chunks)}
        flying = {"q": [self._launch(sends["q"][0], "q0")]}
        k = self.k_proj(hidden).view(n, self.num_kv_heads, d)
        if self.k_norm is not None:
            k = self.k_norm(k)
        sends["k"] = head_chunk_sends(self._replicate(k), size, chunks)
        flying["k"] = [self._launch(sends["k"][0], "k0")]
        v = self.v_proj(hidden).view(n, self.num_kv_heads, d)
        sends["v"] = head_chunk_sends(self._replicate(v), size, chunks)
        flying["v"] = [self._launch(sends["v"][0], "v0")]
        for c in range(1, chunks):
            for name in ("q", "k", "v"):
                flying[name].append(self._launch(sends[name][c], f"{name}{c}"))
        del q, k, v, sends  # the send buffers live in the flights; the projections are not needed any more
        if positions_work is not None:
            positions_work.wait()
        outs, own_blocks = [], []
        for c in range(chunks):
            q = wait_heads_to_sequence(*flying["q"][c], d)
            k = wait_heads_to_sequence(*flying["k"][c], d)
            # Out of place: q and k are views of the all-to-all's custom-Function output, which autograd
            # forbids modifying in place.
            q, k = apply_rotary(q, k, positions, inv_freq, scaling=rope_scaling, backend=self.backend)
            v = wait_heads_to_sequence(*flying["v"][c], d)
            out = varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True,
                                   backend=self.backend)
            if chunks == 1:
                return all_to_all_linear(out.reshape(out.shape[0], -1), self.o_proj.weight, self.group,
                                         mode=self.comm_mode, transport=self.comm_transport)
            send = out.reshape(size, n, -1)  # block j: rank j's tokens
            outs.append(self._launch(send, f"o{c}"))
            own_blocks.append(send[dist.get_rank(self.group)])
        return wait_all_to_all_linear([buf for buf, _ in outs], [flight for _, flight in outs], own_blocks,
                                      self.o_proj.weight, self.group)

    def extra_repr(self) -> str:
        return (f"sp_size={self.sp_size}, kv_repeat={self.kv_repeat}, head_chunks={self.head_chunks}, "
                f"comm_mode={self.comm_mode!r}, comm_transport={self.comm_transport!r}")


def _average_router_stats(group):
    def hook(module: nn.Module, args, output):
        out, stats = output
        return out, sequence_mean(stats, group)

    return hook


def _sp_group_on_one_host(ps) -> bool:
    """Whether every rank of ``ps.sp_group`` runs on this host (collective over the group)."""
    hosts = [None] * ps.sp_size
    dist.all_gather_object(hosts, socket.gethostname(), group=ps.sp_group)
    return len(set(hosts)) == 1


def resolve_transport(transport: str, ps) -> str:
    """``"auto"`` -> ``"copy_engine"`` when the run is on CUDA and every rank of the SP group is on this host (the
    copy engines then move the all-to-alls over NVLink without taking SMs from the attention they hide behind:
    on 2xH200 they hid 61-67% of it where NCCL hid 3-4%), else ``"nccl"``; other values are checked and kept
    (ValueError for ``"copy_engine"`` on the CPU or with an SP group over several hosts). Collective over
    ``ps.sp_group`` when it has to look at the hosts (every rank of it must call)."""
    on_cuda = getattr(ps, "device_type", "cpu") == "cuda"
    if transport != "auto":
        check_transport(transport)
        if transport == "copy_engine" and not on_cuda:
            raise ValueError("ulysses_transport 'copy_engine' moves CUDA tensors between GPUs; this run is on the CPU")
        if transport == "copy_engine" and ps.sp_size > 1 and not _sp_group_on_one_host(ps):
            raise ValueError(
                f"ulysses_transport 'copy_engine' needs every rank of a sequence-parallel group on one node, but the "
                f"{ps.sp_size} ranks of this one (ulysses_size) span several hosts; use 'auto' or 'nccl'"
            )
        return transport
    if not on_cuda or ps.sp_size == 1:
        return "nccl"
    return "copy_engine" if _sp_group_on_one_host(ps) else "nccl"


def apply_sequence_parallel(
    model: nn.Module, ps, *, comm_mode: str = "async", head_chunks: int = 1, transport: str = "auto"
) -> nn.Module:
    """Make ``model`` run on its SP rank's slice of each micro-batch (in place; before FSDP; meta is fine).

    Every ``Attention`` becomes a ``UlyssesAttention`` over ``ps.sp_group`` (``ps.sp_size`` ranks) with
    ``head_chunks`` and the all-to-all ``transport`` (``"auto"``:
    ``resolve_transport``); every ``SparseMoeBlock`` averages its router
    statistics over the group. Raises ValueError if the head counts do not split over ``ps.sp_size`` ranks (see
    ``ulysses_kv_replication``), ``head_chunks`` does not divide a layer's local KV heads, or the model has no
    ``Attention``; the model is left unchanged then.
    """
    check_comm_mode(comm_mode)
    transport = resolve_transport(transport, ps)
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, Attention)]
    if not targets:
        raise ValueError("apply_sequence_parallel: the model has no veofast Attention module to parallelise")
    group = ps.sp_group
    wrapped = [UlyssesAttention(attn, group, ps.sp_size, comm_mode=comm_mode, comm_transport=transport,
                                head_chunks=head_chunks)
               for _, _, attn in targets]  # every check before the first replacement
    for (parent, name, _), ulysses in zip(targets, wrapped, strict=True):
        setattr(parent, name, ulysses)
    for module in model.modules():
        if isinstance(module, SparseMoeBlock):
            module.register_forward_hook(_average_router_stats(group))
    return model
