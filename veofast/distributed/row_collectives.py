"""Differentiable collectives over the rows of tensors, for expert parallelism's token dispatches.

``P`` ranks each hold ``n_i`` rows; ``sizes = [n_0, ..., n_{P-1}]`` are known on every host (``host_all_gather``
exchanges them through a CPU group, so the device never waits for the host), and ``m = max(sizes)``.

- ``gather_rows(x (n_r, ...), m, group) -> (P * m, ...)``: block ``j`` holds rank ``j``'s rows, padded with zeros
  to ``m``. Backward: the reduce-scatter of the gradient (rank ``r`` gets the sum over ranks of block ``r``, its
  first ``n_r`` rows).
- ``ReduceScatter`` (an ``Exchange``, below): ``(P * m, ...)`` in, the sum over ranks of block ``r`` out (its
  first ``n_r`` rows). Backward: the all-gather of the gradient (padded to ``m``).

The gather runs as a plain collective on the caller's stream order (NCCL kernels on the communication stream, which the
compute stream waits for; no host wait). The reduce-scatter sums in the tensors' dtype.

Collectives in flight (``exchange_start`` / ``exchange_wait``): an ``Exchange`` (an uneven all-to-all, or a
reduce-scatter of rows) is launched by one autograd node and waited for by another, so that work done between them
runs under the communication. In backward, the wait's node launches the reverse collective of the gradient and the
start's node waits for it; autograd runs later-created nodes first, so the backward of the work done in between
runs under the reverse collective too.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

# torch 2.13 renamed all_gather_into_tensor (same signature); the GPU image has an older torch
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def host_all_gather(values: list[int], host_group: dist.ProcessGroup) -> list[list[int]]:
    """Every rank's ``values`` (host ints, as many on every rank), exchanged over ``host_group``: a CPU (gloo)
    group with the ranks of the device group, so that nothing waits for the device. Row ``j`` is rank ``j``'s."""
    mine = torch.tensor(values, dtype=torch.int64)
    gathered = torch.empty(dist.get_world_size(host_group) * len(values), dtype=torch.int64)
    all_gather_single(gathered, mine, group=host_group)
    return gathered.view(-1, len(values)).tolist()


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
    all_gather_single(out, x, group=group)
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


def gather_rows(x: torch.Tensor, max_rows: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Every rank's rows ``(P * max_rows, ...)``, rank ``j``'s in block ``j`` (zero-padded); differentiable."""
    return _GatherRows.apply(x, max_rows, group)


class Exchange:
    """One collective between ``exchange_start`` and ``exchange_wait``, forward and then backward. Subclasses say
    how to ``run`` it (``reverse``: the backward's collective, of the gradient) and which part of the received
    buffer is the result (``finish``); ``pad`` shapes a gradient for the reverse run."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.work = None
        self.grad = None  # the gradient of the start's input, filled by the reverse collective in backward

    def run(self, x: torch.Tensor, reverse: bool) -> tuple[torch.Tensor, dist.Work]:
        raise NotImplementedError

    def finish(self, received: torch.Tensor) -> torch.Tensor:
        return received

    def pad(self, grad: torch.Tensor) -> torch.Tensor:
        return grad

    def launch(self, x: torch.Tensor, reverse: bool) -> torch.Tensor:
        received, self.work = self.run(x.contiguous(), reverse)
        return received

    def wait(self) -> None:
        self.work.wait()
        self.work = None


class AllToAll(Exchange):
    """``all_to_all_single`` of rows: ``input_splits`` rows to each rank, ``output_splits`` from each."""

    def __init__(self, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup):
        super().__init__(group)
        self.output_splits, self.input_splits = output_splits, input_splits

    def run(self, x, reverse):
        if reverse:
            output_splits, input_splits = self.input_splits, self.output_splits
        else:
            output_splits, input_splits = self.output_splits, self.input_splits
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        return out, dist.all_to_all_single(out, x, output_splits, input_splits, group=self.group, async_op=True)


class ReduceScatter(Exchange):
    """Reduce-scatter of rows: ``(P * max_rows, ...)`` in, this rank's first ``num_rows`` rows of the sum
    out; the reverse is the all-gather of the (padded) gradient."""

    def __init__(self, num_rows: int, max_rows: int, group: dist.ProcessGroup):
        super().__init__(group)
        self.num_rows, self.max_rows = num_rows, max_rows

    def run(self, x, reverse):
        size = dist.get_world_size(self.group)
        if reverse:
            out = x.new_empty((size * self.max_rows, *x.shape[1:]))
            return out, all_gather_single(out, x, group=self.group, async_op=True)
        out = x.new_empty((self.max_rows, *x.shape[1:]))
        return out, dist.reduce_scatter_tensor(out, x, group=self.group, async_op=True)

    def finish(self, received):
        return received[: self.num_rows]

    def pad(self, grad):
        return _pad_rows(grad, self.max_rows)


class _ExchangeStart(torch.autograd.Function):
    """Launches the exchange; its backward waits for the reverse exchange launched by ``_ExchangeWait``'s."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, exchange: Exchange) -> torch.Tensor:
        ctx.exchange = exchange
        return exchange.launch(x, reverse=False)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        del grad  # the placeholder passed on by _ExchangeWait.backward
        exchange = ctx.exchange
        exchange.wait()
        grad_x, exchange.grad = exchange.grad, None
        return grad_x, None


class _ExchangeWait(torch.autograd.Function):
    """Waits for the exchange; its backward launches the reverse exchange of the gradient (without waiting)."""

    @staticmethod
    def forward(ctx, received: torch.Tensor, exchange: Exchange) -> torch.Tensor:
        ctx.exchange, ctx.received_shape = exchange, received.shape
        exchange.wait()
        return exchange.finish(received).view_as(exchange.finish(received))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        exchange = ctx.exchange
        exchange.grad = exchange.launch(exchange.pad(grad), reverse=True)
        # _ExchangeStart.backward waits for the exchange and returns exchange.grad: a zero-stride placeholder of
        # the received buffer's shape stands for the gradient of the start's output
        return grad.new_zeros(()).expand(ctx.received_shape), None


def exchange_start(x: torch.Tensor, exchange: Exchange) -> torch.Tensor:
    """Start ``exchange`` of ``x``; returns the receive buffer, valid only after ``exchange_wait``."""
    return _ExchangeStart.apply(x, exchange)


def exchange_wait(received: torch.Tensor, exchange: Exchange) -> torch.Tensor:
    """Wait for ``exchange``; returns its result (a view of ``received``)."""
    return _ExchangeWait.apply(received, exchange)
