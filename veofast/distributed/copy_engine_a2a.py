"""An intra-node all-to-all carried by the GPUs' copy engines instead of SM kernels, through symmetric memory.

NCCL runs an all-to-all as kernels that occupy SMs, so the GEMMs and attention it should hide behind slow down.
Here each rank writes its outgoing block ``j`` straight into rank ``j``'s receive buffer, a symmetric-memory
allocation mapped into every rank of the group (``torch.distributed._symmetric_memory``): a same-device
``copy_`` of contiguous tensors of one dtype is a ``cudaMemcpyAsync``, which the driver performs on a copy
engine, over NVLink when the destination is a peer mapping. The only SM work of a call is two barrier kernels
of one 32-thread block each. All ranks of the group must be on one node (peer access between every pair).

Semantics: ``dist.all_to_all_single`` with equal splits, asynchronous. ``CopyEngineAllToAll.start(send)`` takes
``send: (P, rows, cols)`` contiguous, block ``j`` for rank ``j``, and returns a ``CopyEngineWork`` whose
``wait()`` returns the received ``(P, rows, cols)``, block ``i`` from rank ``i``.

Protocol of one call, everything on the instance's side stream (calls run one after another there, so any
number may be in flight), with ``P`` ranks, one receive buffer per rank:

1. The side stream waits for the current stream: ``send`` is ready, and so is every read of an earlier result
   that was queued before this ``start``.
2. The own block ``send[rank]`` goes to the result locally.
3. Barrier, channel 0 ("entry"): it returns once every rank's side stream reached it, so every rank has
   finished its previous call there, including the copy out of its receive buffer: all receive buffers may be
   overwritten now. This is what makes one buffer (rather than two) safe.
4. Pushes: ``send[j]`` -> block ``rank`` of rank ``j``'s receive buffer, for each peer ``j``; with more than two
   ranks each peer's copy has its own stream, so several copy engines work at once.
5. Barrier, channel 1 ("exit"): a rank's barrier kernel starts only after its pushes completed (stream order;
   the copy streams are joined first) and signals with release semantics at system scope; the barrier returns
   once every peer signalled, so every block addressed to this rank has landed. (That a copy's peer writes are
   visible once the next operation of its stream starts is what torch's own symmetric-memory collectives, e.g.
   ``_low_contention_all_gather``, rely on as well.)
6. Copy out (``copy_out=True``, the default): the peers' blocks go from the receive buffer to a fresh tensor
   (allocated by ``start``), a local device-to-device ``cudaMemcpyAsync``. The result then lives as long as the
   caller keeps it; the copy costs ``(P - 1) / P`` of the tensor's bytes read and written in HBM once more.
   With ``copy_out=False`` the result is a view of the receive buffer, valid only until the next ``start`` on
   this instance (reads queued on the current stream before that ``start`` are safe: step 1 orders them before
   the next entry barrier); ``wait()`` raises if a later call has started.
7. An event is recorded; ``wait()`` makes the current stream wait for it.

The barriers are the symmetric-memory handle's ``barrier`` (a compare-and-swap on each peer's signal pad, then a
spin on this rank's). A barrier that does not complete within ``timeout_ms`` traps on the device, which leaves
the process's CUDA context unusable: a rank that stops calling is fatal, and ranks that call with different
shapes get wrong results, as with mismatched NCCL collectives. Multicast is never used.

Nothing here touches CUDA or symmetric memory at import time; the module imports on a machine without a GPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_ENTRY_CHANNEL = 0
_EXIT_CHANNEL = 1


def check_send(
    send: torch.Tensor, *, world_size: int, dtype: torch.dtype, device: torch.device, capacity_bytes: int
) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``send`` is a contiguous ``(world_size, rows, cols)`` tensor of
    ``dtype`` on ``device`` (a CUDA device) with at most ``capacity_bytes`` bytes."""
    if not isinstance(send, torch.Tensor):
        raise TypeError(f"send must be a torch.Tensor, got {type(send).__name__}")
    if send.dim() != 3 or send.shape[0] != world_size:
        raise ValueError(f"send must be (P={world_size}, rows, cols) with block j for rank j, got {tuple(send.shape)}")
    if not send.is_contiguous():
        raise ValueError("send must be contiguous (call .contiguous() on it)")
    if send.dtype != dtype:
        raise ValueError(f"send has dtype {send.dtype}, but this all-to-all was built for {dtype}")
    nbytes = send.numel() * send.element_size()
    if nbytes > capacity_bytes:
        raise ValueError(
            f"send holds {nbytes} bytes, more than the receive buffer's {capacity_bytes}: "
            f"build the CopyEngineAllToAll with max_bytes >= {nbytes}"
        )
    if send.device.type != "cuda":
        raise ValueError(f"send must be a CUDA tensor (copy engines move it), got device {send.device}")
    if send.device != device:
        raise ValueError(f"send is on {send.device}, but this all-to-all's buffers are on {device}")


class CopyEngineWork:
    """One call of ``CopyEngineAllToAll.start``; ``wait()`` returns the received ``(P, rows, cols)``."""

    def __init__(self, owner: CopyEngineAllToAll, call: int, done: torch.cuda.Event, result: torch.Tensor,
                 is_view: bool):
        self._owner = owner
        self._call = call
        self._done = done
        self.result = result  # where the received blocks land: read it only after wait()
        self._is_view = is_view

    def wait(self) -> torch.Tensor:
        """Make the current stream wait for the all-to-all and return its result (block ``i`` from rank ``i``)."""
        if self._is_view and self._owner._calls != self._call:
            raise RuntimeError(
                "this result was a view of the receive buffer (copy_out=False), which a later start() on the same "
                "CopyEngineAllToAll overwrites: wait for it before the next start(), or use copy_out=True"
            )
        torch.cuda.current_stream(self._owner.device).wait_event(self._done)
        return self.result


class CopyEngineAllToAll:
    """Equal-split all-to-alls over ``group`` (all ranks on one node) for tensors of ``dtype`` with up to
    ``max_bytes`` bytes per rank, carried by copy engines; see the module docstring for the protocol.

    Collective to construct (every rank of ``group``, same arguments); allocates a ``max_bytes`` symmetric-memory
    receive buffer on the current CUDA device. Every rank must call ``start`` with the same shapes in the same
    order, as with any collective. ``timeout_ms`` bounds each barrier's wait for the peers (0: wait forever).
    """

    def __init__(self, group: dist.ProcessGroup | None, dtype: torch.dtype, max_bytes: int, *,
                 timeout_ms: int = 300_000):
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < dtype.itemsize:
            raise ValueError(f"max_bytes must be an int of at least one element of {dtype}, got {max_bytes!r}")
        if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int) or timeout_ms < 0:
            raise ValueError(f"timeout_ms must be an int >= 0 (0: no timeout), got {timeout_ms!r}")
        if not torch.cuda.is_available():
            raise ValueError("CopyEngineAllToAll needs CUDA GPUs (symmetric memory, copy engines); none is available")
        if not dist.is_initialized():
            raise ValueError("CopyEngineAllToAll needs torch.distributed: call dist.init_process_group first")
        import torch.distributed._symmetric_memory as symm_mem

        group = group if group is not None else dist.group.WORLD
        self.group = group
        self.dtype = dtype
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.timeout_ms = timeout_ms
        self._capacity = max_bytes // dtype.itemsize  # elements
        self.capacity_bytes = self._capacity * dtype.itemsize
        self._buffer = symm_mem.empty(self._capacity, dtype=dtype, device=self.device)
        try:
            self._handle = symm_mem.rendezvous(self._buffer, group.group_name)
            # flat views of every rank's receive buffer, mapped into this device's address space
            self._peer_buffers = [
                self._buffer if j == self.rank else self._handle.get_buffer(j, (self._capacity,), dtype)
                for j in range(self.world_size)
            ]
        except Exception as e:
            raise RuntimeError(
                f"symmetric-memory rendezvous failed on rank {self.rank}: the copy-engine all-to-all needs every "
                f"rank of the group on one node with peer access between all GPUs ({e})"
            ) from e
        # high priority: the only kernels here are the tiny barriers, which should not queue behind compute
        self._stream = torch.cuda.Stream(self.device, priority=-1)
        # the push to rank + k runs on _copy_streams[k - 1]; the first one is the side stream itself
        self._copy_streams = [
            self._stream if k == 1 else torch.cuda.Stream(self.device, priority=-1) for k in range(1, self.world_size)
        ]
        self._calls = 0

    def start(self, send: torch.Tensor, *, copy_out: bool = True) -> CopyEngineWork:
        """Start the all-to-all of ``send: (P, rows, cols)`` (contiguous, block ``j`` for rank ``j``) after the work
        queued so far on the current stream. With ``copy_out=False`` the result is a view of the receive buffer,
        valid until the next ``start`` (see the module docstring)."""
        check_send(send, world_size=self.world_size, dtype=self.dtype, device=self.device,
                   capacity_bytes=self.capacity_bytes)
        size, rank = self.world_size, self.rank
        shape, numel = send.shape, send.numel()
        recv = self._buffer[:numel].view(shape)
        result = torch.empty_like(send) if copy_out else recv
        side = self._stream
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            result[rank].copy_(send[rank])
            self._handle.barrier(channel=_ENTRY_CHANNEL, timeout_ms=self.timeout_ms)
        forks = [stream for stream in self._copy_streams if stream is not side]
        for stream in forks:  # fork after the entry barrier
            stream.wait_stream(side)
        for step, stream in enumerate(self._copy_streams, start=1):
            peer = (rank + step) % size
            with torch.cuda.stream(stream):
                self._peer_buffers[peer][:numel].view(shape)[rank].copy_(send[peer])
        for stream in forks:  # join before the exit barrier
            side.wait_stream(stream)
            send.record_stream(stream)
        with torch.cuda.stream(side):
            self._handle.barrier(channel=_EXIT_CHANNEL, timeout_ms=self.timeout_ms)
            if copy_out:
                if rank > 0:
                    result[:rank].copy_(recv[:rank])
                if rank < size - 1:
                    result[rank + 1:].copy_(recv[rank + 1:])
            done = torch.cuda.Event()
            done.record(side)
        send.record_stream(side)
        if copy_out:
            result.record_stream(side)
        self._calls += 1
        return CopyEngineWork(self, self._calls, done, result, not copy_out)


_ENGINES: dict[tuple[str, torch.dtype, torch.device], CopyEngineAllToAll] = {}


def copy_engine_for(group: dist.ProcessGroup, send: torch.Tensor) -> CopyEngineAllToAll:
    """The process-wide ``CopyEngineAllToAll`` of ``group`` for ``send``'s dtype and device, built on first use and
    rebuilt (twice as large) when ``send`` outgrows its buffer. Collective: every rank of ``group`` must call it
    with the same shapes in the same order, so that all build (or grow) their engines together."""
    if send.device.type != "cuda":
        raise ValueError(f"the copy-engine all-to-all moves CUDA tensors between GPUs, got a tensor on {send.device}")
    key = (group.group_name, send.dtype, send.device)
    engine = _ENGINES.get(key)
    nbytes = send.numel() * send.element_size()
    if engine is None or engine.capacity_bytes < nbytes:
        grown = max(nbytes, 2 * engine.capacity_bytes) if engine is not None else nbytes
        engine = _ENGINES[key] = CopyEngineAllToAll(group, send.dtype, grown)
    return engine
