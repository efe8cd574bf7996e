"""Where the time of one expert-parallel MoE layer (fwd+bwd) goes on 2 GPUs: a profiler timeline per rank.

Prints, for rank 0: wall ms per step, the busy time of the GPU (union of all kernel intervals), NCCL kernel time,
the time when NCCL ran alone (exposed communication), idle gaps, and the top kernels. Writes the chrome trace of
rank 0 to $OUT/ep_trace_rank0.json.gz.

Usage: torchrun --nproc_per_node=2 tools/gpu_jobs/ep_diag.py
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, ".")
from bench.moe_ep import expert_weights, fwd_bwd, setup, tokens  # noqa: E402
from veofast.distributed.expert_parallel import ExpertParallelDispatcher  # noqa: E402


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    """Total length (ms) of the union of ``(start_us, end_us)`` intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total / 1e3


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    args = argparse.Namespace(tokens=16384, hidden=2048, inter=768, experts=128, topk=8)
    if os.environ.get("EP_DIAG_SMOKE"):  # a tiny CPU run that only checks the script itself
        args = argparse.Namespace(tokens=64, hidden=32, inter=16, experts=8, topk=2)
    device = setup()
    rank, world = dist.get_rank(), dist.get_world_size()
    gate_up, down = expert_weights(args, device, torch.bfloat16)
    local = args.experts // world
    gate_up = gate_up[rank * local : (rank + 1) * local].clone().requires_grad_()
    down = down[rank * local : (rank + 1) * local].clone().requires_grad_()
    inputs = tokens(args, device, torch.bfloat16, seed=1 + rank)
    dispatch = os.environ.get("EP_DIAG_DISPATCH", "allgather")
    host_group = dist.new_group(backend="gloo") if device.type == "cuda" else None
    dispatcher = ExpertParallelDispatcher(args.experts, dist.group.WORLD, dispatch=dispatch, host_group=host_group)
    step = lambda: fwd_bwd(dispatcher, inputs, gate_up, down)
    for _ in range(5):
        step()
    _sync()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(10):
        step()
    _sync()
    wall = (time.perf_counter() - t0) * 100  # ms per step
    steps = 3
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        dist.barrier()
        _sync()
        for _ in range(steps):
            step()
        _sync()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    spans = [(e.time_range.start, e.time_range.end) for e in kernels] or [(0.0, 0.0)]
    nccl = [(e.time_range.start, e.time_range.end) for e in kernels if "nccl" in e.name.lower()]
    compute = [(e.time_range.start, e.time_range.end) for e in kernels if "nccl" not in e.name.lower()]
    first, last = min(s for s, _ in spans), max(e for _, e in spans)
    busy, nccl_ms, compute_ms = _union_ms(spans), _union_ms(nccl), _union_ms(compute)
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name[:90], []).append((e.time_range.end - e.time_range.start) / 1e3)
    if rank == 0:
        print(f"EP={world}, {args.tokens} tokens/GPU, E={args.experts}, K={args.topk}, H={args.hidden}, I={args.inter}")
        print(f"wall {wall:.2f} ms/step (10 steps, no profiler)")
        print(
            f"profiled {steps} steps: span {(last - first) / 1e3 / steps:.2f} ms/step, GPU busy {busy / steps:.2f}, "
            f"compute kernels {compute_ms / steps:.2f}, NCCL kernels {nccl_ms / steps:.2f}, NCCL alone (exposed) "
            f"{(busy - compute_ms) / steps:.2f}, idle {((last - first) / 1e3 - busy) / steps:.2f} ms/step"
        )
        print("top kernels (ms per step, calls per step):")
        for name, times in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:20]:
            print(f"  {sum(times) / steps:7.3f} {len(times) // steps:4d}  {name}")
        cpu = sorted(
            (e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU),
            key=lambda e: -e.self_cpu_time_total,
        )
        print("top CPU ops by self time (ms per step):")
        for e in cpu[:10]:
            print(f"  {e.self_cpu_time_total / 1e3 / steps:7.3f} {e.count // steps:4d}  {e.key[:90]}")
        out = os.environ.get("OUT")
        if out:
            path = f"/tmp/ep_trace_rank{rank}.json"
            prof.export_chrome_trace(path)
            with open(path, "rb") as src, gzip.open(f"{out}/ep_trace_rank0.json.gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
