"""Ulysses sequence parallelism: how much of the all-to-all hides behind compute, and how SP=2 scales.

One 7B-shaped dense decoder layer (hidden 4096, 32 query / 8 KV heads, head_dim 128, FFN 11008, bf16 weights and
activations, no FSDP) runs forward + backward over 64k packed tokens per SP group (five long documents; they
straddle the rank boundary). Cases, timed side by side and interleaved round by round; the first four for each
``--head-chunks`` count ``C`` (the chunked pipeline of ``UlyssesAttention``; default: its automatic count and 1):

- ``overlap``: SP=2, all-to-alls asynchronous and overlapped (the default ``comm_mode="async"``);
- ``sync``: SP=2, every all-to-all waited for right after its launch (no overlap);
- ``compute``: SP=2 per-rank work with the all-to-alls replaced by local copies (``comm_mode="skip"``);
- ``comm``: the same all-to-alls alone (q, k, v, output, each in ``C`` chunks; forward and backward);
- ``1gpu``: the plain layer on one GPU over the same 64k tokens (every rank runs it alone, no communication);
- ``1gpu_half``: the plain layer on one GPU over the first half of every document (32k tokens).

Derived: ``hidden% = 1 - (overlap - compute) / (sync - compute)`` (share of the all-to-all time that the overlap
hides); ``eff = 1gpu / (2 * overlap)``: SP=2 tokens/s over twice one GPU's on the *same* documents (same FLOPs, so
the quadratic attention term is accounted for); ``eff_half`` compares FLOP/s per GPU against one GPU on the
half-length documents; all three per chunk count. A profiler trace of the overlapped case (rank 0) goes to the
results directory as ``ulysses_trace_rank0_chunks<C>.json.gz``; from its kernels, ``trace_hidden%`` is the share of
NCCL kernel time during which a compute kernel ran too. Rank 0 prints a table and appends JSON lines (each with
its ``head_chunks``; null for the one-GPU cases) to ``<results>/ulysses.jsonl``.

    torchrun --nproc_per_node=2 bench/ulysses.py [--quick] [--tokens 65536] [--ops-backend auto]
        [--transport nccl|copy_engine] [--head-chunks 4 2 1]
    torchrun --nproc_per_node=2 bench/ulysses.py --tiny     # CPU / gloo smoke run with a tiny layer
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import gzip
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.append(str(Path(__file__).resolve().parents[1]))  # for ``bench``; an installed veofast comes first

from bench.common import H200_BF16_TFLOPS, output_dir, print_table, record  # noqa: E402
from veofast.distributed.parallel_state import init_parallel_state  # noqa: E402
from veofast.distributed.sequence_parallel import UlyssesAttention, apply_sequence_parallel  # noqa: E402
from veofast.distributed.ulysses_comm import TRANSPORTS, InFlight  # noqa: E402
from veofast.models.config import DecoderConfig  # noqa: E402
from veofast.models.decoder import DecoderLayer  # noqa: E402
from veofast.models.rotary import rotary_frequencies  # noqa: E402
from veofast.utils.helper import exit_process  # noqa: E402

SHAPE_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
}
SHAPE_TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 8,
}  # 2 local KV heads at SP=2: the pipeline runs with 2 chunks
DOC_SHARES = (6, 4, 3, 2, 1)  # five documents: 3/8, 1/4, 3/16, 1/8, 1/16 of the tokens
logger = logging.getLogger("bench.ulysses")


def doc_lengths(tokens: int) -> list[int]:
    unit = tokens // sum(DOC_SHARES)
    lengths = [unit * s for s in DOC_SHARES]
    lengths[0] += tokens - sum(lengths)
    return lengths


def layer_flops(config: DecoderConfig, lengths: list[int]) -> float:
    """Forward + backward FLOPs of one dense decoder layer over documents of ``lengths`` (causal attention)."""
    h, d = config.hidden_size, config.head_dim
    attention = h * d * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    params = attention + 3 * h * config.intermediate_size
    return 6.0 * params * sum(lengths) + 6.0 * config.num_attention_heads * d * sum(n * n for n in lengths)


class Inputs:
    """A packed sequence on ``device``: ``hidden (T, H)``, ``grad (T, H)``, ``positions (T,)``, ``cu_seqlens``."""

    def __init__(self, config: DecoderConfig, lengths: list[int], device, dtype, seed: int = 0):
        generator = torch.Generator(device="cpu").manual_seed(seed)
        total = sum(lengths)
        self.hidden = torch.randn(total, config.hidden_size, generator=generator).to(device, dtype)
        self.grad = torch.randn(total, config.hidden_size, generator=generator).to(device, dtype)
        self.positions = torch.cat([torch.arange(n) for n in lengths]).to(device)
        self.cu_seqlens = torch.tensor([0, *lengths]).cumsum(0).to(device=device, dtype=torch.int32)
        self.max_seqlen = max(lengths)

    def window(self, rank: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self.hidden.shape[0] // size
        part = slice(rank * n, (rank + 1) * n)
        return self.hidden[part].clone(), self.positions[part].clone(), self.grad[part].clone()


def layer_output(layer, *args) -> torch.Tensor:
    """The residual stream after ``layer`` (``DecoderLayer`` returns it as ``out + residual``)."""
    out, residual, _ = layer(*args)
    return out + residual


def make_step(layer, hidden, positions, grad, inputs: Inputs, inv_freq, scaling) -> Callable[[], torch.Tensor]:
    """One forward + backward of ``layer``; parameter and input gradients are dropped first (no accumulation)."""
    hidden = hidden.detach().requires_grad_(True)

    def step() -> torch.Tensor:
        for p in layer.parameters():
            p.grad = None
        hidden.grad = None
        out, residual, _ = layer(hidden, positions, inputs.cu_seqlens, inputs.max_seqlen, inv_freq, scaling)
        torch.autograd.backward((out, residual), (grad, grad))  # the layer's output is out + residual
        return out

    return step


def timed(fn: Callable[[], object], iterations: int, device) -> float:
    """Wall time of ``iterations`` calls in ms per call, ranks aligned first (CUDA events on a GPU)."""
    dist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iterations):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iterations
    t0 = time.perf_counter()
    for _ in range(iterations):
        fn()
    return (time.perf_counter() - t0) * 1e3 / iterations


def all_to_all_alone(
    config: DecoderConfig, tokens: int, size: int, device, dtype, group, transport: str, chunks: int = 1
) -> Callable[[], None]:
    """The layer's eight all-to-alls (q, k, v, output; forward and backward), each in ``chunks`` pieces as the
    head-chunked pipeline sends them, one after another, on buffers of their size, over ``transport``."""
    n, d = tokens // size, config.head_dim
    kv = max(config.num_key_value_heads, size)
    widths = [config.num_attention_heads, kv, kv, config.num_attention_heads] * 2
    buffers = [
        torch.randn(size, n, w // (size * chunks) * d, device=device, dtype=dtype)
        for w in widths
        for _ in range(chunks)
    ]

    def run() -> None:
        for send in buffers:
            flight = InFlight(group, "sync", transport)
            flight.start(send)
            flight.finish()

    return run


def set_mode(layer, mode: str, transport: str | None = None, head_chunks: int | None = None) -> None:
    for module in layer.modules():
        if isinstance(module, UlyssesAttention):
            module.comm_mode = mode
            if transport is not None:
                module.comm_transport = transport
            if head_chunks is not None:
                module.head_chunks = head_chunks


def chunk_counts(layer, requested: list[int] | None) -> list[int]:
    """The ``--head-chunks`` counts (default: 2 if the layer's local KV heads allow it, and 1), each checked on the
    layer."""
    (module,) = [m for m in layer.modules() if isinstance(m, UlyssesAttention)]
    counts = list(dict.fromkeys(requested or ([2] if module.local_kv_heads % 2 == 0 else []) + [1]))
    for c in counts:
        module.head_chunks = c  # ValueError for a count that does not divide the local KV heads
    module.head_chunks = 1
    return counts


def pick_ops_backend(config: DecoderConfig, device, dtype) -> tuple[DecoderConfig, str | None]:
    """``config``, or a copy with ``ops_backend="torch"`` and the reason when a small fwd+bwd of the layer fails."""
    if config.ops_backend == "torch":
        return config, None
    try:
        with torch.device(device):
            layer = DecoderLayer(config, 0).to(dtype)
        inputs = Inputs(config, [100, 200], device, dtype)
        inv_freq = rotary_frequencies(config)[0].to(device)
        make_step(layer, inputs.hidden, inputs.positions, inputs.grad, inputs, inv_freq, 1.0)()
        return config, None
    except Exception as exc:  # noqa: BLE001 - a failing fast path is reported and the torch reference used
        reason = f"ops_backend={config.ops_backend!r} failed ({type(exc).__name__}: {exc}); using 'torch'"[:500]
        logger.warning(reason)
        return dataclasses.replace(config, ops_backend="torch"), reason


def trace_overlap(trace_path: Path) -> dict:
    """From a chrome trace: NCCL kernel time, and the share of it during which a non-NCCL kernel also ran."""
    with gzip.open(trace_path, "rt") as f:
        events = json.load(f).get("traceEvents", [])
    kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") == "kernel" and "dur" in e]
    comm = [(e["ts"], e["ts"] + e["dur"]) for e in kernels if "nccl" in e.get("name", "").lower()]
    compute = sorted((e["ts"], e["ts"] + e["dur"]) for e in kernels if "nccl" not in e.get("name", "").lower())
    merged: list[list[float]] = []
    for a, b in compute:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    total = sum(b - a for a, b in comm)
    covered = sum(max(0.0, min(b, mb) - max(a, ma)) for a, b in comm for ma, mb in merged)
    return {"trace_nccl_ms": total / 1e3, "trace_hidden%": 100.0 * covered / total if total else None}


def write_trace(step: Callable, iterations: int, rank: int, results: Path, name: str) -> Path | None:
    """Profile ``iterations`` steps (every rank runs them; rank 0 records) into ``<results>/<name>``."""
    dist.barrier()
    if rank != 0:
        for _ in range(iterations):
            step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return None
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(iterations):
            step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    results.mkdir(parents=True, exist_ok=True)
    path = results / name
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return path


def run(args) -> list[dict]:
    tiny = args.tiny
    device_type = "cpu" if tiny or not torch.cuda.is_available() else "cuda"
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=300))
    ps = init_parallel_state(dp_size=1, ulysses_size=int(os.environ.get("WORLD_SIZE", "1")), device_type=device_type)
    rank, size, device = ps.sp_rank, ps.sp_size, ps.device
    if size < 2:
        raise SystemExit("bench/ulysses.py: run it under torchrun with --nproc_per_node=2 (or more)")
    dtype = torch.float32 if device_type == "cpu" else torch.bfloat16
    tokens = args.tokens if not tiny else 512
    tokens -= tokens % size
    config = DecoderConfig(
        model_type="llama",
        num_hidden_layers=1,
        vocab_size=32000,
        ops_backend="torch" if device_type == "cpu" else args.ops_backend,
        **(SHAPE_TINY if tiny else SHAPE_7B),
    )
    config, fallback = pick_ops_backend(config, device, dtype)
    torch.manual_seed(0)
    with torch.device(device):
        layer = DecoderLayer(config, 0).to(dtype)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.02)
    inv_freq, scaling = rotary_frequencies(config)
    inv_freq = inv_freq.to(device)
    sp_layer = apply_sequence_parallel(copy.deepcopy(layer), ps)
    counts = chunk_counts(sp_layer, args.head_chunks)

    lengths = doc_lengths(tokens)
    half_lengths = [n // 2 for n in lengths]
    inputs = Inputs(config, lengths, device, dtype)
    half = Inputs(config, half_lengths, device, dtype, seed=1)
    local_hidden, local_positions, local_grad = inputs.window(rank, size)
    steps = {
        "sp": make_step(sp_layer, local_hidden, local_positions, local_grad, inputs, inv_freq, scaling),
        "1gpu": make_step(layer, inputs.hidden, inputs.positions, inputs.grad, inputs, inv_freq, scaling),
        "1gpu_half": make_step(layer, half.hidden, half.positions, half.grad, half, inv_freq, scaling),
    }
    for c in counts:
        steps[f"comm/{c}"] = all_to_all_alone(config, tokens, size, device, dtype, ps.sp_group, args.transport, c)
    base = {
        "shape": "tiny" if tiny else "7B-layer",
        "tokens": tokens,
        "docs": lengths,
        "sp": size,
        "transport": args.transport,
        "ops_backend": config.ops_backend,
        "dtype": str(dtype).removeprefix("torch."),
        "fallback": fallback,
    }

    # correctness: this rank's slice of the SP output against the whole-sequence layer, for every chunk count
    set_mode(sp_layer, "async", args.transport)
    errs = {}
    with torch.no_grad():
        n = tokens // size
        whole = layer_output(
            layer, inputs.hidden, inputs.positions, inputs.cu_seqlens, inputs.max_seqlen, inv_freq, scaling
        )
        ref = whole[rank * n : (rank + 1) * n].float()
        del whole
        for c in counts:
            set_mode(sp_layer, "async", head_chunks=c)
            part = layer_output(
                sp_layer, local_hidden, local_positions, inputs.cu_seqlens, inputs.max_seqlen, inv_freq, scaling
            )
            errs[c] = ((part.float() - ref).abs().max() / ref.abs().max()).item()
            del part
        del ref

    # a case is "<name>/<chunks>" for the SP cases and the all-to-alls alone, "<name>" for the one-GPU ones
    cases = [f"{name}/{c}" for c in counts for name in ("overlap", "sync", "compute", "comm")] + ["1gpu", "1gpu_half"]
    mode_of = {"overlap": "async", "sync": "sync", "compute": "skip"}

    def call(case: str) -> Callable[[], object]:
        name, _, chunks = case.partition("/")
        if name in mode_of:
            set_mode(sp_layer, mode_of[name], head_chunks=int(chunks))
            return steps["sp"]
        return steps[case]

    rounds, per_round = (3, 3) if args.quick else (5, 4)
    if tiny:
        rounds, per_round = 2, 2
    times: dict[str, list[float]] = {c: [] for c in cases}
    peaks: dict[str, float | None] = {}
    errors: dict[str, str] = {}

    def attempt(case: str, iterations: int) -> float | None:
        """Time ``case``; a failure on any rank drops the case on every rank (its error is kept)."""
        try:
            result, ok = timed(call(case), iterations, device), 1.0
        except Exception as exc:  # noqa: BLE001 - recorded per case, the other cases still run
            errors[case], result, ok = f"{type(exc).__name__}: {exc}"[:500], None, 0.0
            if device.type == "cuda":
                torch.cuda.empty_cache()
        flag = torch.tensor([ok], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if flag.item() == 0.0:
            errors.setdefault(case, "failed on another rank")
            return None
        return result

    for case in cases:  # warm-up (Triton compilation and autotuning happen here) and peak memory
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        if attempt(case, 2) is not None:
            peaks[case] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    for _ in range(rounds):
        for case in cases:
            if case not in errors and (t := attempt(case, per_round)) is not None:
                times[case].append(t)
    ms = {c: statistics.median(v) if v else float("nan") for c, v in times.items()}

    flops_full, flops_half = layer_flops(config, lengths), layer_flops(config, half_lengths)
    rows = []
    for case in cases:
        name, _, chunks = case.partition("/")
        tok = {"1gpu_half": sum(half_lengths)}.get(name, tokens)
        flops = {"1gpu": flops_full, "1gpu_half": flops_half, "comm": None}.get(name, flops_full / size)
        rows.append(
            {
                **base,
                "case": name,
                "head_chunks": int(chunks) if chunks else None,
                "ms": ms[case],
                "ms_all": times[case],
                "tokens_case": tok,
                "tflops_per_gpu": flops / ms[case] / 1e9 if flops else None,
                "peak_gib": peaks.get(case),
                "error": errors.get(case),
            }
        )
    exposed_sync1 = ms["sync/1"] - ms["compute/1"] if 1 in counts else float("nan")
    for c in counts:
        trace_info: dict = {}
        if f"overlap/{c}" not in errors:
            set_mode(sp_layer, "async", head_chunks=c)
            trace_path = write_trace(
                steps["sp"], 2 if tiny else 3, rank, output_dir(), f"ulysses_trace_rank0_chunks{c}.json.gz"
            )
            if trace_path is not None:
                trace_info = {"trace": str(trace_path), **trace_overlap(trace_path)}
        overlap, sync, compute, comm = (ms[f"{name}/{c}"] for name in ("overlap", "sync", "compute", "comm"))
        exposed_sync, exposed_overlap = sync - compute, overlap - compute
        summary = {
            "head_chunks": c,
            "exposed_sync_ms": exposed_sync,
            "exposed_overlap_ms": exposed_overlap,
            "hidden%": 100.0 * (1.0 - exposed_overlap / exposed_sync) if exposed_sync > 0 else None,
            "hidden%_vs_comm": 100.0 * (1.0 - exposed_overlap / comm) if comm > 0 else None,
            # against the unchunked all-to-alls' exposed time: chunking's smaller messages cannot inflate it
            "hidden%_vs_sync1": 100.0 * (1.0 - exposed_overlap / exposed_sync1) if exposed_sync1 > 0 else None,
            "sp_tokens_per_s": tokens / overlap * 1e3,
            "1gpu_tokens_per_s": tokens / ms["1gpu"] * 1e3,
            "eff": ms["1gpu"] / (size * overlap),
            "eff_half": (flops_full / (size * overlap)) / (flops_half / ms["1gpu_half"]),
            "sp_tflops_per_gpu": flops_full / size / overlap / 1e9,
            "sp_mfu%": 100.0 * flops_full / size / overlap / 1e9 / H200_BF16_TFLOPS,
            "max_rel_err": errs[c],
            "half_docs": half_lengths,
        }
        rows.append({**base, "case": "summary", **summary, **trace_info})
    set_mode(sp_layer, "async", head_chunks=counts[0])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timed rounds")
    parser.add_argument("--tiny", action="store_true", help="tiny layer on CPU/gloo (a smoke run of this script)")
    parser.add_argument("--tokens", type=int, default=65536, help="tokens per SP group (default 64k)")
    parser.add_argument(
        "--ops-backend",
        default="auto",
        choices=("auto", "triton", "torch"),
        help="backend of the layer's fused ops (falls back to 'torch', logged, if a small run fails)",
    )
    parser.add_argument(
        "--transport",
        default="nccl",
        choices=TRANSPORTS,
        help="what carries the all-to-alls: NCCL kernels or the copy engines (symmetric memory)",
    )
    parser.add_argument(
        "--head-chunks",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="chunk counts of the head-chunked pipeline to compare (default: 2 and 1)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    code, rank = 0, 0
    try:
        rows = run(args)
        rank = dist.get_rank()
    except Exception as exc:  # noqa: BLE001 - the failure is recorded, then the process exits non-zero
        traceback.print_exc()
        rank = dist.get_rank() if dist.is_initialized() else 0
        rows = [{"case": "failed", "error": f"{type(exc).__name__}: {exc}"}]
        code = 1
    if rank == 0:
        for row in rows:
            record("ulysses", row)
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        print(f"\n{device}: one decoder layer fwd+bwd, ms per step on each rank (median of rounds)")
        print_table(
            [r for r in rows if r.get("case") != "summary"],
            ["case", "head_chunks", "ms", "tokens_case", "tflops_per_gpu", "peak_gib", "error"],
        )
        summaries = [r for r in rows if r.get("case") == "summary"]
        if summaries:
            print("\nper chunk count (hidden% = 1 - (overlap - compute) / (sync - compute)):")
            print_table(
                summaries,
                [
                    "head_chunks",
                    "hidden%",
                    "hidden%_vs_sync1",
                    "exposed_overlap_ms",
                    "exposed_sync_ms",
                    "eff",
                    "eff_half",
                    "sp_mfu%",
                    "max_rel_err",
                    "trace_hidden%",
                ],
            )
        for row in summaries:
            print("\n" + "\n".join(f"{k}: {v}" for k, v in row.items() if k not in ("docs", "dtype")))
    exit_process(code)


if __name__ == "__main__":
    main()
