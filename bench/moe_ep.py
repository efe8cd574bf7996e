"""Benchmark of expert parallelism (EP=2 over 2 GPUs) against EP=1 on one GPU, at a Qwen3-30B-A3B MoE layer:
H=2048, I=768, E=128, top-8, bf16, random routing (softmax top-k of random logits), 16384 tokens per GPU.

    torchrun --nproc_per_node=2 bench/moe_ep.py [--repeats 20] [--tokens 16384 ...]

Tables (rank 0 prints them and appends JSON lines to ``bench/results/moe_ep.jsonl``):

- layer fwd+bwd: EP=1 (``moe_ffn`` with all 128 experts, rank 0 alone while rank 1 waits) vs EP=2
  (``ExpertParallelDispatcher``, 64 experts per GPU, each GPU with its own 16384 tokens) with each token dispatch
  (``allgather``: every token to every GPU, no host sync; ``alltoall``: tokens to the GPUs that hold their
  experts, one host sync per layer); time, TFLOP/s per GPU (18*T*K*H*I per GPU), ratio EP=2 / EP=1 (target
  <= 1.25), and the EP=2 output error against ``moe_ffn`` on the same tokens;
- collectives at the layer's message size, nccl-tests bus bandwidth (algbw * (n-1)/n, algbw = the larger of the
  input and output sizes over the time) against the ANCHORS.md all-to-all values for the same link (158 GB/s at
  16 MB ... 329 at 1 GB, interpolated in log size): ``all_to_all_single`` with even splits of as many token rows
  per peer as this routing sends, the layer's own all-to-all (only the rows for the other GPUs), and the
  all-gather and reduce-scatter of all the tokens (the ``allgather`` dispatch);
- dispatch/combine: from a profiler pass over EP=2 fwd+bwd, the GPU time of NCCL kernels (count-exchange,
  dispatch, combine and their backward) and its share of the layer time (part of it overlaps expert GEMMs).
On a CPU (gloo, fp32) it runs as a smoke test with small shapes.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import H200_BF16_TFLOPS, print_table, record, time_ms  # noqa: E402
from veofast.distributed.expert_parallel import ExpertParallelDispatcher  # noqa: E402
from veofast.ops import moe_ffn  # noqa: E402

SUITE = "moe_ep"
DISPATCHES = ("allgather", "alltoall")
MIB = 2**20
# ANCHORS.md: 2xH200 NCCL all_to_all_single bus bandwidth (GB/s) by message size
A2A_ANCHORS = ((16 * MIB, 158.0), (64 * MIB, 233.0), (256 * MIB, 280.0), (1024 * MIB, 329.0))


def anchor_busbw(size: int) -> float:
    """The ANCHORS all-to-all bus bandwidth at ``size`` bytes, interpolated in log2(size) (clamped at the ends)."""
    points = [(math.log2(s), bw) for s, bw in A2A_ANCHORS]
    x = min(max(math.log2(size), points[0][0]), points[-1][0])
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per GPU")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=768)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    return parser.parse_args()


def setup() -> torch.device:
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        return torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def expert_weights(args, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """All experts' ``gate_up (E, 2I, H)`` and ``down (E, H, I)``, identical on every rank (seed 0)."""
    generator = torch.Generator(device=device).manual_seed(0)
    gate_up = torch.randn(args.experts, 2 * args.inter, args.hidden, generator=generator, device=device) * 0.02
    down = torch.randn(args.experts, args.hidden, args.inter, generator=generator, device=device) * 0.02
    return gate_up.to(dtype), down.to(dtype)


def tokens(args, device, dtype, seed: int) -> dict:
    """One GPU's tokens: ``hidden (T, H)``, random routing ``ids / weights (T, K)``, ``grad_out (T, H)``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(args.tokens, args.hidden, generator=generator, device=device).to(dtype)
    logits = torch.randn(args.tokens, args.experts, generator=generator, device=device)
    weights, ids = torch.topk(torch.softmax(logits, dim=-1), args.topk, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).to(dtype)
    grad_out = torch.randn(args.tokens, args.hidden, generator=generator, device=device).to(dtype)
    return {"hidden": hidden.requires_grad_(), "ids": ids, "weights": weights.requires_grad_(), "grad_out": grad_out}


def fwd_bwd(ffn, inputs: dict, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    for t in (inputs["hidden"], inputs["weights"], gate_up, down):
        t.grad = None
    out = ffn(inputs["hidden"], inputs["ids"], inputs["weights"], gate_up, down, check_ids=False, backend="auto")
    out.backward(inputs["grad_out"])
    return out


def nccl_kernel_ms(fn) -> tuple[float | None, int]:
    """GPU time (ms) and count of NCCL kernels during one ``fn()``, from the profiler (None on CPU)."""
    if not torch.cuda.is_available():
        return None, 0
    from torch.autograd import DeviceType

    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        torch.cuda.synchronize()
    total_us, count = 0.0, 0
    for event in prof.events():
        if event.device_type == DeviceType.CUDA and "nccl" in event.name.lower():
            total_us += event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
            count += 1
    return total_us / 1e3, count


def sync_free(fn) -> bool | None:
    """Whether one ``fn()`` runs without a device-to-host sync (CUDA's sync debug mode raises on one; None on
    CPU)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return True
    except RuntimeError:
        return False
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


def max_over_ranks(value: float, device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def bench_layer(args, device, dtype, rank: int, world: int) -> list[dict]:
    """EP=1 on rank 0 alone, then EP=world on all ranks; rows for the table."""
    flops = 18.0 * args.tokens * args.topk * args.hidden * args.inter
    shape = {
        "tokens_per_gpu": args.tokens,
        "H": args.hidden,
        "I": args.inter,
        "E": args.experts,
        "K": args.topk,
        "dtype": str(dtype).removeprefix("torch."),
    }
    gate_up, down = expert_weights(args, device, dtype)
    inputs = tokens(args, device, dtype, seed=1 + rank)
    rows = []

    ms1 = None
    if rank == 0:
        full_gate_up, full_down = gate_up.clone().requires_grad_(), down.clone().requires_grad_()
        ms1 = time_ms(
            lambda: fwd_bwd(moe_ffn, inputs, full_gate_up, full_down), warmup=args.warmup, repeats=args.repeats
        )
        rows.append(
            {
                "case": "EP=1 (1 GPU)",
                **shape,
                "experts_per_gpu": args.experts,
                "ms": ms1,
                "tflops": flops / ms1 / 1e9,
                "pct_peak": 100 * flops / ms1 / 1e9 / H200_BF16_TFLOPS,
            }
        )
        del full_gate_up, full_down
    dist.barrier()

    local = args.experts // world
    local_gate_up = gate_up[rank * local : (rank + 1) * local].clone().requires_grad_()
    local_down = down[rank * local : (rank + 1) * local].clone().requires_grad_()
    host_group = dist.new_group(backend="gloo") if device.type == "cuda" else None  # token counts (all-gather)
    for dispatch in DISPATCHES:
        dispatcher = ExpertParallelDispatcher(args.experts, dist.group.WORLD, dispatch=dispatch, host_group=host_group)

        def ep_step(dispatcher=dispatcher):
            return fwd_bwd(dispatcher, inputs, local_gate_up, local_down)

        ms2 = max_over_ranks(time_ms(ep_step, warmup=args.warmup, repeats=args.repeats), device)
        # correctness: EP output on this rank's tokens vs moe_ffn with all experts on the same tokens
        with torch.no_grad():
            ref = moe_ffn(inputs["hidden"], inputs["ids"], inputs["weights"], gate_up, down).float()
            out = dispatcher(inputs["hidden"], inputs["ids"], inputs["weights"], local_gate_up, local_down).float()
            rel_err = max_over_ranks(float((out - ref).norm() / ref.norm()), device)
        host_syncs = sync_free(ep_step)
        nccl_ms, nccl_kernels = nccl_kernel_ms(ep_step)
        nccl_ms = max_over_ranks(nccl_ms, device) if nccl_ms is not None else None
        row = {
            "case": f"EP={world} ({world} GPUs), {dispatch}",
            "dispatch": dispatch,
            **shape,
            "experts_per_gpu": local,
            "ms": ms2,
            "tflops": flops / ms2 / 1e9,
            "pct_peak": 100 * flops / ms2 / 1e9 / H200_BF16_TFLOPS,
            "rel_err_vs_ep1": rel_err,
            "host_sync_free": host_syncs,
            "nccl_ms": nccl_ms,
            "nccl_kernels": nccl_kernels,
            "nccl_share": nccl_ms / ms2 if nccl_ms is not None else None,
        }
        if ms1 is not None:
            row["ratio_vs_ep1"] = ms2 / ms1
            row["meets_1.25x"] = ms2 / ms1 <= 1.25
        rows.append(row)
    return rows


def tokens_per_peer(args, device, dtype, world: int) -> int:
    """Token rows this GPU's routing sends to each other GPU in the layer (their mean over the other GPUs)."""
    rank = dist.get_rank()
    ids = tokens(args, device, dtype, seed=1 + rank)["ids"]
    owner = ids // (args.experts // world)
    needs = torch.zeros(ids.shape[0], world, dtype=torch.bool, device=device).scatter_(1, owner, True)
    needs[:, rank] = False
    return int(needs.sum()) // max(world - 1, 1)


def bench_collectives(args, device, dtype, world: int) -> list[dict]:
    """The dispatches' collectives at the layer's message size: ``all_to_all_single`` with even splits (its bus
    bandwidth) and with the layer's remote rows only (no block for this GPU itself); all-gather and reduce-scatter
    of all the tokens."""
    chunk = int(max_over_ranks(tokens_per_peer(args, device, dtype, world), device))
    rank = dist.get_rank()
    tokens = torch.randn(args.tokens, args.hidden, device=device).to(dtype)
    gathered = torch.empty(world * args.tokens, args.hidden, device=device, dtype=dtype)
    cases = []
    for case, splits_self in (("all_to_all token rows, even splits", True), ("all_to_all remote rows (layer)", False)):
        splits = [0 if (r == rank and not splits_self) else chunk for r in range(world)]
        send = torch.randn(sum(splits), args.hidden, device=device).to(dtype)
        recv = torch.empty_like(send)
        cases.append((case, send, lambda recv=recv, send=send, s=splits: dist.all_to_all_single(recv, send, s, s)))
    cases.append(("all_gather of all tokens", gathered, lambda: dist.all_gather_into_tensor(gathered, tokens)))
    cases.append(("reduce_scatter of all tokens", gathered, lambda: dist.reduce_scatter_tensor(tokens, gathered)))
    out = []
    for case, largest, run in cases:
        ms = max_over_ranks(time_ms(run, warmup=args.warmup, repeats=args.repeats), device)
        size = largest.numel() * largest.element_size()
        row = {"case": case, "bytes_per_gpu": size, "ms": ms, "algbw_gbps": size / ms / 1e6}
        if "remote rows" not in case:  # uneven splits have no bus-bandwidth convention
            row["busbw_gbps"] = row["algbw_gbps"] * (world - 1) / world
            row["anchor_busbw_gbps"] = anchor_busbw(size)
            row["pct_anchor"] = 100 * row["busbw_gbps"] / row["anchor_busbw_gbps"]
        out.append(row)
    return out


def main() -> int:
    args = parse_args()
    device = setup()
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    code = 0
    if args.experts % world:
        if rank == 0:
            print(f"--experts {args.experts} is not divisible by the world size {world}")
        return 1
    for title, fn, columns in (
        (
            "MoE layer fwd+bwd",
            bench_layer,
            [
                "case",
                "experts_per_gpu",
                "ms",
                "tflops",
                "pct_peak",
                "ratio_vs_ep1",
                "meets_1.25x",
                "rel_err_vs_ep1",
                "host_sync_free",
                "nccl_ms",
                "nccl_kernels",
                "nccl_share",
            ],
        ),
        (
            "collectives",
            bench_collectives,
            ["case", "bytes_per_gpu", "ms", "algbw_gbps", "busbw_gbps", "anchor_busbw_gbps", "pct_anchor"],
        ),
    ):
        try:
            rows = fn(args, device, dtype, rank, world) if fn is bench_layer else fn(args, device, dtype, world)
            if rank == 0:
                print(f"\n{title} (world {world}, {args.tokens} tokens per GPU)")
                print_table(rows, columns)
                for row in rows:
                    record(SUITE, {"table": title, **row})
        except Exception:  # report and go on with the next table
            code = 1
            print(f"[rank {rank}] {title} failed:\n{traceback.format_exc()}", flush=True)
            if rank == 0:
                record(SUITE, {"table": title, "error": traceback.format_exc(limit=3)})
    return code


if __name__ == "__main__":
    from veofast.utils.helper import exit_process

    status = 1
    try:
        status = main()
    except Exception:
        traceback.print_exc()
    exit_process(status)
