"""The differentiable, asynchronous all-to-alls of Ulysses sequence parallelism.

Ulysses moves attention inputs from "this rank's tokens, all heads" to "all tokens, this rank's heads" and the
attention output back. Every all-to-all here is launched asynchronously and waited for as late as possible, in
the forward and in the backward, so that it runs under computation:

- ``launch_heads_to_sequence`` / ``wait_heads_to_sequence`` split one all-to-all in two autograd nodes. Between
  them the caller computes (e.g. the next projection). In the backward the wait node launches the reverse
  all-to-all and the launch node waits for it, so the reverse transfer runs under the backward of whatever was
  computed in between.
- ``all_to_all_linear`` fuses the output all-to-all with the output projection, split by heads: the projection
  of the heads this rank already holds runs while the other ranks' heads are in flight. Its backward computes the
  input gradient first, launches its all-to-all, and computes the weight gradient under it.
- Head chunks (``UlyssesAttention(head_chunks=C)``): ``head_chunk_sends`` cuts one projection into the send blocks
  of ``C`` chunks of this rank's heads, each launched with ``launch_all_to_all`` and waited for with
  ``wait_heads_to_sequence``; the chunks' attention outputs go back with ``launch_all_to_all`` and
  ``wait_all_to_all_linear`` waits for all of them and applies the output projection (its backward launches the
  reverse all-to-alls, last chunk first, and the ``launch_all_to_all`` nodes wait for them).

Layouts: with ``P`` ranks in the group, ``n`` tokens per rank and ``N = P * n``, a "sequence-sharded" tensor is
``(n, heads, d)`` and a "head-sharded" one is ``(N, heads / P, d)``; rank ``i`` holds tokens
``[i * n, (i + 1) * n)`` and heads ``[i * heads / P, (i + 1) * heads / P)``.

``mode`` selects how the collectives run: ``"async"`` (overlapped; the default), ``"sync"`` (each all-to-all is
waited for right after its launch: the no-overlap baseline of the benchmark) or ``"skip"`` (no communication at
all, the send buffer stands for the received one: wrong results, for measuring the computation alone in
benchmarks). ``transport`` selects what carries them: ``"nccl"`` (``all_to_all_single``, the default) or
``"copy_engine"`` (the GPUs' copy engines through symmetric memory, ``copy_engine_a2a``: no SMs taken from the
computation it overlaps; all ranks of the group on one node).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .copy_engine_a2a import copy_engine_for
from .row_collectives import all_gather_single

COMM_MODES = ("async", "sync", "skip")
TRANSPORTS = ("nccl", "copy_engine")


def check_comm_mode(mode: str) -> None:
    if mode not in COMM_MODES:
        raise ValueError(f"Ulysses communication mode must be one of {COMM_MODES}, got {mode!r}")


def check_transport(transport: str) -> None:
    if transport not in TRANSPORTS:
        raise ValueError(f"Ulysses all-to-all transport must be one of {TRANSPORTS}, got {transport!r}")


class InFlight:
    """One all-to-all between its launch and its wait. ``start`` takes a ``(P, rows, cols)`` contiguous buffer
    whose block ``j`` goes to rank ``j`` and returns the receive buffer (block ``i`` from rank ``i``), whose
    contents are only valid after ``finish``."""

    def __init__(self, group: dist.ProcessGroup | None, mode: str, transport: str = "nccl", *, label: str = ""):
        self.group = group
        self.mode = mode
        self.transport = transport
        self.label = label  # what it carries (e.g. "q1": chunk 1's queries), for tests and debugging
        self.work = None  # a dist.Work or a CopyEngineWork: wait() makes the current stream wait for it
        self.buffer: torch.Tensor | None = None

    def start(self, send: torch.Tensor) -> torch.Tensor:
        assert self.buffer is None, "an InFlight carries one collective at a time"
        send = send.contiguous()
        if self.mode == "skip":
            recv = send
        elif self.transport == "copy_engine":
            self.work = copy_engine_for(self.group or dist.group.WORLD, send).start(send)
            recv = self.work.result
            if self.mode == "sync":
                self.work.wait()
                self.work = None
        else:
            recv = torch.empty_like(send)
            self.work = dist.all_to_all_single(recv, send, group=self.group, async_op=self.mode == "async")
        self.buffer = recv
        return recv

    def finish(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
            self.work = None
        buffer, self.buffer = self.buffer, None
        assert buffer is not None, "finish() without start()"
        return buffer


class _Launch(torch.autograd.Function):
    """Forward: start the all-to-all of ``send (P, rows, cols)``. Backward: wait for the reverse one."""

    @staticmethod
    def forward(ctx, send: torch.Tensor, flight: InFlight) -> torch.Tensor:
        ctx.flight = flight
        return flight.start(send)

    @staticmethod
    def backward(ctx, grad_in_flight: torch.Tensor):
        # the gradient arriving here is the receive buffer of the reverse all-to-all launched by _Wait.backward
        return ctx.flight.finish(), None


class _Wait(torch.autograd.Function):
    """Forward: wait for the all-to-all and hand its result on. Backward: launch the reverse all-to-all."""

    @staticmethod
    def forward(ctx, recv: torch.Tensor, flight: InFlight) -> torch.Tensor:
        ctx.flight = flight
        result = flight.finish()
        assert result.data_ptr() == recv.data_ptr(), "_Wait must follow the _Launch of the same InFlight"
        return recv

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.flight.start(grad), None


def launch_all_to_all(send: torch.Tensor, flight: InFlight) -> torch.Tensor:
    """Start the all-to-all of ``send (P, rows, cols)`` (block ``j`` to rank ``j``; any strides: ``InFlight.start``
    makes it contiguous); returns the in-flight receive buffer for ``wait_heads_to_sequence`` or
    ``wait_all_to_all_linear``. Differentiable: the backward waits for the reverse all-to-all."""
    return _Launch.apply(send, flight)


def head_chunk_sends(x: torch.Tensor, size: int, chunks: int) -> list[torch.Tensor]:
    """The send blocks of ``x (n, heads, d)`` (this rank's tokens) for ``chunks`` chunks of every rank's heads:
    ``chunks`` views ``(P, n, heads / (P * chunks) * d)``; block ``j`` of view ``c`` holds rank ``j``'s local heads
    ``[c * heads / (P * chunks), (c + 1) * heads / (P * chunks))``.

    No data moves here: the views are strided, and ``InFlight.start`` gathers each into its contiguous send buffer
    (one copy of ``x`` in all, as without chunks). With more than one chunk the split is a single ``unbind``, so the
    backward assembles the chunks' gradients with one copy (a stack) instead of a zero-filled tensor per chunk.
    """
    n, heads, d = x.shape
    assert heads % (size * chunks) == 0, f"{heads} heads do not split into {size} ranks x {chunks} chunks"
    if chunks == 1:
        return [x.reshape(n, size, heads // size * d).transpose(0, 1)]
    parts = x.reshape(n, size, chunks, heads // (size * chunks) * d).unbind(2)
    return [part.transpose(0, 1) for part in parts]


def launch_heads_to_sequence(x: torch.Tensor, flight: InFlight) -> torch.Tensor:
    """Start moving ``x (n, heads, d)`` (this rank's tokens) to head-sharded layout; returns the in-flight buffer
    ``(P, n, heads / P * d)`` to pass to ``wait_heads_to_sequence``. ``heads`` must be divisible by ``P``."""
    size = dist.get_world_size(flight.group)
    return launch_all_to_all(head_chunk_sends(x, size, 1)[0], flight)


def wait_heads_to_sequence(in_flight: torch.Tensor, flight: InFlight, head_dim: int) -> torch.Tensor:
    """Wait for ``launch_heads_to_sequence``; returns ``(N, heads / P, d)``: all tokens, this rank's heads."""
    size, n, cols = in_flight.shape
    return _Wait.apply(in_flight, flight).view(size * n, cols // head_dim, head_dim)


class _AllToAllLinear(torch.autograd.Function):
    """``y = sequence_gather(x) @ weight.T`` with the all-to-all overlapped by the local heads' share of the GEMM.

    x: (N, c) head-sharded (c = this rank's heads * d, contiguous); weight: (out, P * c), its column block ``j``
    belonging to rank ``j``'s heads. Returns y: (n, out) for this rank's tokens.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, group, rank: int, size: int, mode: str, transport: str):
        cols = x.shape[1]
        send = x.view(size, x.shape[0] // size, cols)
        flight = InFlight(group, mode, transport)
        flight.start(send)
        blocks = [weight[:, j * cols:(j + 1) * cols] for j in range(size)]
        y = send[rank] @ blocks[rank].t()  # this rank's heads for its own tokens: needs no communication
        recv = flight.finish()
        for j in range(size):
            if j != rank:
                y = torch.addmm(y, recv[j], blocks[j].t())
        ctx.save_for_backward(recv, weight)
        ctx.group, ctx.rank, ctx.mode, ctx.transport = group, rank, mode, transport
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        recv, weight = ctx.saved_tensors
        size, n, cols = recv.shape
        grad_y = grad_y.contiguous()
        blocks = [weight[:, j * cols:(j + 1) * cols] for j in range(size)]
        grad_send = grad_y.new_empty((size, n, cols))
        for j in range(size):
            torch.mm(grad_y, blocks[j], out=grad_send[j])
        flight = InFlight(ctx.group, ctx.mode, ctx.transport)
        flight.start(grad_send)
        grad_weight = None
        if ctx.needs_input_grad[1]:  # under the all-to-all: dW^T block j = recv[j]^T @ dy
            grad_weight_t = weight.new_empty((size, cols, weight.shape[0]))
            for j in range(size):
                torch.mm(recv[j].t(), grad_y, out=grad_weight_t[j])
            grad_weight = grad_weight_t.view(size * cols, weight.shape[0]).t()
        grad_x = flight.finish().view(size * n, cols)
        return grad_x, grad_weight, None, None, None, None, None


def all_to_all_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    group: dist.ProcessGroup | None,
    *,
    mode: str = "async",
    transport: str = "nccl",
) -> torch.Tensor:
    """Move ``x (N, local_heads * d)`` (all tokens, this rank's heads) back to this rank's tokens and apply the
    bias-free linear ``weight (out, heads * d)``: returns ``(N / P, out)``, as ``F.linear`` on the gathered heads."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    return _AllToAllLinear.apply(x.contiguous(), weight, group, rank, size, mode, transport)


class _WaitAllToAllLinear(torch.autograd.Function):
    """``y = sequence_gather(x_0, ..., x_{C-1}) @ weight.T`` for head chunks whose all-to-alls are in flight.

    Inputs: ``weight (out, P * C * w)`` (its columns ordered rank, chunk, ``w``: the usual head order), the
    ``InFlight`` of each chunk, the in-flight receive buffers ``recv_c (P, n, w)`` (block ``i``: rank ``i``'s
    heads of chunk ``c`` for this rank's tokens) and this rank's own blocks ``own_c (n, w)`` (the rows of its
    send buffer that stay here; used before the wait, their gradient flows through ``recv_c``). Returns
    ``y (n, out)``.

    Forward: the received blocks are gathered into ``x (n, P, C, w)`` = ``(n, heads * d)`` (one copy of the
    attention output, saved for the weight gradient) so that the projection runs as ``P`` GEMMs of depth ``C * w``
    with fp32 accumulation inside each, rather than ``P * C`` bf16 accumulations. The own heads' GEMM runs before
    the last chunk's wait: it, with the gathering of the other chunks, hides the last chunk's exchange (the
    earlier chunks' exchanges ran under the later chunks' attention).

    Backward: the input gradient of the last chunk first (its attention backward runs first), its reverse
    all-to-all launched at once, then the chunk before, ...; the weight gradient runs under them all. The
    ``launch_all_to_all`` node of each chunk waits for its reverse all-to-all.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, group, rank: int, flights: list[InFlight], *tensors: torch.Tensor):
        chunks = len(flights)
        recvs, owns = tensors[:chunks], tensors[chunks:]
        size, n, width = recvs[0].shape
        cols = chunks * width
        x = recvs[0].new_empty((n, size, chunks, width))
        for c in range(chunks):
            x[:, rank, c].copy_(owns[c])

        def gather(c: int) -> None:
            recv = flights[c].finish()
            assert recv.data_ptr() == recvs[c].data_ptr(), "wait_all_to_all_linear takes the launched buffers"
            for j in range(size):
                if j != rank:
                    x[:, j, c].copy_(recv[j])

        for c in range(chunks - 1):
            gather(c)
        rows = x.view(n, size, cols)
        blocks = [weight[:, j * cols:(j + 1) * cols] for j in range(size)]
        y = rows[:, rank] @ blocks[rank].t()  # this rank's heads for its own tokens: under the last chunk's exchange
        gather(chunks - 1)
        for j in range(size):
            if j != rank:
                y = torch.addmm(y, rows[:, j], blocks[j].t())
        ctx.save_for_backward(x, weight)
        ctx.flights = flights
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, weight = ctx.saved_tensors
        n, size, chunks, width = x.shape
        cols = chunks * width
        grad_y = grad_y.contiguous()
        grad_recvs: list[torch.Tensor | None] = [None] * chunks
        for c in reversed(range(chunks)):
            grad_send = grad_y.new_empty((size, n, width))
            for j in range(size):
                start = j * cols + c * width
                torch.mm(grad_y, weight[:, start:start + width], out=grad_send[j])
            grad_recvs[c] = ctx.flights[c].start(grad_send)
        grad_weight = None
        if ctx.needs_input_grad[0]:  # under the all-to-alls: dW^T block j = x[:, j]^T @ dy
            rows = x.view(n, size, cols)
            grad_weight_t = weight.new_empty((size, cols, weight.shape[0]))
            for j in range(size):
                torch.mm(rows[:, j].t(), grad_y, out=grad_weight_t[j])
            grad_weight = grad_weight_t.view(size * cols, weight.shape[0]).t()
        return grad_weight, None, None, None, *grad_recvs, *([None] * chunks)


def wait_all_to_all_linear(
    in_flight: list[torch.Tensor],
    flights: list[InFlight],
    own_blocks: list[torch.Tensor],
    weight: torch.Tensor,
    group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """Wait for the output all-to-alls of ``C`` head chunks and apply the bias-free linear ``weight (out, heads *
    d)``: returns ``(n, out)`` for this rank's tokens, as ``F.linear`` on the gathered heads.

    ``in_flight[c]``: what ``launch_all_to_all`` returned for chunk ``c``'s attention output ``(N, heads_c, d)``
    seen as ``(P, n, heads_c * d)`` (block ``j``: rank ``j``'s tokens); ``own_blocks[c]``: block ``rank`` of that
    send tensor. See ``_WaitAllToAllLinear`` for the schedule.
    """
    assert len(in_flight) == len(flights) == len(own_blocks) >= 1
    rank = dist.get_rank(group)
    return _WaitAllToAllLinear.apply(weight, group, rank, list(flights), *in_flight, *own_blocks)


def gather_sequence_start(x: torch.Tensor, group: dist.ProcessGroup | None, mode: str):
    """Start all-gathering a non-differentiable ``x (n,)`` along the sequence; returns ``(out (N,), work)``;
    ``out`` is valid after ``work.wait()`` (``work`` is None when nothing is in flight)."""
    size = dist.get_world_size(group)
    if mode == "skip":
        return x.repeat(size), None
    out = x.new_empty((size * x.shape[0],))
    work = all_gather_single(out, x.contiguous(), group=group, async_op=mode == "async")
    return out, work


class _SequenceMean(torch.autograd.Function):
    """Mean of a tensor over the ranks of a group; the backward is the adjoint when every rank's loss counts."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out / dist.get_world_size(group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad / dist.get_world_size(ctx.group), None


def sequence_mean(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """``x`` averaged over ``group``, differentiable: rank ``r``'s gradient is the group mean of the incoming ones."""
    return _SequenceMean.apply(x, group)
