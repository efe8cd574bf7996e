"""The parallel state: every parallel axis of a run on one named DeviceMesh.

The main mesh has the axes ``("dp", "sp", "tp")`` (data, Ulysses sequence, tensor parallel), with
``dp * sp * tp == world_size``. FSDP shards parameters over ``"dp"`` and ``"sp"`` folded together (the
flattened ``"dp_sp"`` axis), as VeOmni does, so sequence parallelism costs no extra parameter memory.

Expert parallelism regroups the same ranks as ``("ep_fsdp", "ep")`` with ``ep_fsdp * ep == world_size``:
expert weights are sliced over ``"ep"`` on the expert dimension and FSDP-sharded over ``"ep_fsdp"``; every
other parameter uses the main mesh. ``ep`` ranks are consecutive global ranks; ``ep_host_group`` is a CPU
(gloo) group of the same ranks, for host-side values (token counts) that must not wait for the device.

Usage::

    init_parallel_state(dp_size=2, ulysses_size=2)
    ps = get_parallel_state()
    ps.dp_rank, ps.sp_group, ps.fsdp_mesh
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

DP_MODES = ("ddp", "fsdp1", "fsdp2")


@dataclass(frozen=True)
class ParallelState:
    """Sizes, ranks, meshes and process groups of one run. Built by ``init_parallel_state``."""

    world_size: int
    global_rank: int
    local_rank: int
    device_type: str
    dp_size: int
    sp_size: int
    tp_size: int
    ep_size: int
    pp_size: int
    cp_size: int
    dp_mode: str
    device_mesh: DeviceMesh
    fsdp_mesh: DeviceMesh
    ep_device_mesh: DeviceMesh
    ep_host_group: dist.ProcessGroup | None = None

    # --- devices ---
    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.device_type == "cuda" else torch.device("cpu")

    # --- data parallel (ranks that see different data) ---
    @property
    def dp_mesh(self) -> DeviceMesh:
        return self.device_mesh["dp"]

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.dp_mesh.get_group()

    @property
    def dp_rank(self) -> int:
        return self.device_mesh.get_local_rank("dp")

    @property
    def dp_enabled(self) -> bool:
        return self.dp_size > 1

    # --- Ulysses sequence parallel ---
    @property
    def sp_mesh(self) -> DeviceMesh:
        return self.device_mesh["sp"]

    @property
    def sp_group(self) -> dist.ProcessGroup:
        return self.sp_mesh.get_group()

    @property
    def sp_rank(self) -> int:
        return self.device_mesh.get_local_rank("sp")

    @property
    def sp_enabled(self) -> bool:
        return self.sp_size > 1

    # --- tensor parallel ---
    @property
    def tp_mesh(self) -> DeviceMesh:
        return self.device_mesh["tp"]

    @property
    def tp_group(self) -> dist.ProcessGroup:
        return self.tp_mesh.get_group()

    @property
    def tp_rank(self) -> int:
        return self.device_mesh.get_local_rank("tp")

    @property
    def tp_enabled(self) -> bool:
        return self.tp_size > 1

    # --- FSDP: data parallel and sequence parallel folded into one shard axis (the field ``fsdp_mesh``) ---
    @property
    def fsdp_group(self) -> dist.ProcessGroup:
        return self.fsdp_mesh.get_group()

    @property
    def fsdp_size(self) -> int:
        return self.dp_size * self.sp_size

    # --- expert parallel ---
    @property
    def ep_mesh(self) -> DeviceMesh:
        return self.ep_device_mesh["ep"]

    @property
    def ep_group(self) -> dist.ProcessGroup:
        return self.ep_mesh.get_group()

    @property
    def ep_rank(self) -> int:
        return self.ep_device_mesh.get_local_rank("ep")

    @property
    def ep_enabled(self) -> bool:
        return self.ep_size > 1

    @property
    def ep_fsdp_mesh(self) -> DeviceMesh:
        """The mesh over which expert weights are FSDP-sharded (ranks holding the same experts)."""
        return self.ep_device_mesh["ep_fsdp"]

    @property
    def ep_fsdp_size(self) -> int:
        return self.world_size // self.ep_size

    @property
    def is_main_process(self) -> bool:
        return self.global_rank == 0


_PARALLEL_STATE: ParallelState | None = None


def _check_size(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"init_parallel_state: {name} must be a positive int, got {value!r}")


def _ensure_process_group(device_type: str) -> None:
    """Initialise torch.distributed from torchrun's environment, or as a single process without one (ValueError for
    a WORLD_SIZE above 1 without MASTER_ADDR)."""
    if dist.is_initialized():
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend=backend)
    elif os.environ.get("WORLD_SIZE", "1") != "1":  # else each process would train alone, unaware of the others
        raise ValueError(
            f"init_parallel_state: WORLD_SIZE={os.environ['WORLD_SIZE']} is set but MASTER_ADDR is not; launch with "
            "torchrun, or set MASTER_ADDR, MASTER_PORT and RANK as well"
        )
    else:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)


def init_parallel_state(
    dp_size: int = -1,
    tp_size: int = 1,
    ep_size: int = 1,
    pp_size: int = 1,
    cp_size: int = 1,
    ulysses_size: int = 1,
    dp_mode: str = "fsdp2",
    device_type: str | None = None,
) -> ParallelState:
    """Build the run's meshes and make them available through ``get_parallel_state()``.

    ``dp_size=-1`` takes what the other axes leave of the world size. Initialises torch.distributed (NCCL on
    CUDA, gloo on CPU) if the caller has not. Sizes that do not multiply to the world size, and ``device_type='cuda'``
    without a visible GPU, raise ValueError; pipeline and context parallelism are not implemented and raise
    NotImplementedError when > 1. Returns when every rank has built the meshes (a barrier over all ranks).
    """
    global _PARALLEL_STATE
    if dp_mode not in DP_MODES:
        raise ValueError(f"init_parallel_state: dp_mode must be one of {DP_MODES}, got {dp_mode!r}")
    for name, value in (
        ("tp_size", tp_size),
        ("ep_size", ep_size),
        ("pp_size", pp_size),
        ("cp_size", cp_size),
        ("ulysses_size", ulysses_size),
    ):
        _check_size(name, value)
    if pp_size > 1:
        raise NotImplementedError("init_parallel_state: pipeline parallelism (pp_size > 1) is not implemented")
    if cp_size > 1:
        raise NotImplementedError(
            "init_parallel_state: ring context parallelism (cp_size > 1) is not implemented; "
            "use Ulysses sequence parallelism (ulysses_size) for long sequences"
        )
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"init_parallel_state: device_type must be 'cuda' or 'cpu', got {device_type!r}")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError("init_parallel_state: device_type 'cuda' but this process sees no CUDA device; use 'cpu'")
    _ensure_process_group(device_type)
    world_size = dist.get_world_size()

    non_dp = tp_size * ulysses_size
    if dp_size == -1:
        if world_size % non_dp:
            raise ValueError(
                f"init_parallel_state: world size {world_size} is not divisible by "
                f"tp_size * ulysses_size = {tp_size} * {ulysses_size} = {non_dp}"
            )
        dp_size = world_size // non_dp
    _check_size("dp_size", dp_size)
    if dp_size * non_dp != world_size:
        raise ValueError(
            f"init_parallel_state: dp_size * ulysses_size * tp_size = {dp_size} * {ulysses_size} * {tp_size} "
            f"= {dp_size * non_dp} must equal the world size {world_size}"
        )
    if world_size % ep_size:
        raise ValueError(f"init_parallel_state: ep_size {ep_size} does not divide the world size {world_size}")

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    mesh = init_device_mesh(device_type, (dp_size, ulysses_size, tp_size), mesh_dim_names=("dp", "sp", "tp"))
    fsdp_mesh = mesh["dp", "sp"]._flatten("dp_sp")
    ep_mesh = init_device_mesh(device_type, (world_size // ep_size, ep_size), mesh_dim_names=("ep_fsdp", "ep"))
    ep_host_group = None
    if ep_size > 1:  # host ints (token counts) of the EP group travel over a CPU group: no device sync
        if device_type == "cpu":
            ep_host_group = ep_mesh["ep"].get_group()
        else:
            groups = [list(range(start, start + ep_size)) for start in range(0, world_size, ep_size)]
            ep_host_group, _ = dist.new_subgroups_by_enumeration(groups, backend="gloo")
    # No rank leaves before every rank has built its groups: a gloo rank still connecting one fails ("Connection
    # closed by peer") when a peer that got through exits, e.g. on a configuration error raised on every rank.
    dist.barrier(device_ids=[local_rank] if device_type == "cuda" else None)
    _PARALLEL_STATE = ParallelState(
        world_size=world_size,
        global_rank=dist.get_rank(),
        local_rank=local_rank,
        device_type=device_type,
        dp_size=dp_size,
        sp_size=ulysses_size,
        tp_size=tp_size,
        ep_size=ep_size,
        pp_size=pp_size,
        cp_size=cp_size,
        dp_mode=dp_mode,
        device_mesh=mesh,
        fsdp_mesh=fsdp_mesh,
        ep_device_mesh=ep_mesh,
        ep_host_group=ep_host_group,
    )
    return _PARALLEL_STATE


def get_parallel_state() -> ParallelState:
    """The state built by ``init_parallel_state``; raises RuntimeError if it was not called."""
    if _PARALLEL_STATE is None:
        raise RuntimeError("get_parallel_state: call init_parallel_state(...) first")
    return _PARALLEL_STATE


def is_parallel_state_initialized() -> bool:
    return _PARALLEL_STATE is not None


def destroy_parallel_state() -> None:
    """Forget the parallel state and destroy the default process group (for tests and clean exits)."""
    global _PARALLEL_STATE
    _PARALLEL_STATE = None
    if dist.is_initialized():
        dist.destroy_process_group()
