"""Shared helpers of the benchmark suites: timing, peak-memory measurement, result records and tables.

Every suite compares providers side by side in one process, prints a table and appends one JSON line per
measurement to ``bench/results/<suite>.jsonl``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Ceilings measured on one H200 (../shared/ANCHORS.md): dense bf16 matmul and device-to-device copy.
H200_BF16_TFLOPS = 784.0
H200_COPY_TBPS = 4.21


def environment() -> dict:
    """Versions and device of this run, recorded with every result."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


# GPU cycles of the sleep queued before each timed call (about 2 ms on an H200, longer than the host takes to queue
# a batch of calls): the host queues the call's kernels meanwhile, so the time between the events is the GPU's,
# not the host's launch latency.
_QUEUE_AHEAD_CYCLES = 4_000_000


def time_ms(fn: Callable[[], object], *, warmup: int = 5, repeats: int = 20) -> float:
    """Median time of ``fn()`` in milliseconds: on a GPU between CUDA events around the call, with a sleep kernel
    queued before the start event so that the launches of ``fn`` do not count (the same for every provider);
    perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(_QUEUE_AHEAD_CYCLES)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    import time

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_gib(fn: Callable[[], object]) -> float | None:
    """Peak CUDA memory that ``fn()`` allocates above what was allocated before it, in GiB (None on CPU)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def record(suite: str, row: dict, *, results_dir: Path | None = None) -> dict:
    """Append ``row`` (with the environment) as one JSON line to ``<results_dir>/<suite>.jsonl``
    (default: ``output_dir()``)."""
    full = {"suite": suite, **environment(), **row}
    results_dir = results_dir or output_dir()
    results_dir.mkdir(parents=True, exist_ok=True)
    with open(results_dir / f"{suite}.jsonl", "a") as f:
        f.write(json.dumps(full) + "\n")
    return full


def print_table(rows: list[dict], columns: list[str]) -> None:
    """Print ``rows`` as an aligned text table with the given columns."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.1f}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def output_dir() -> Path:
    """Where a suite writes results: ``$VEOFAST_BENCH_RESULTS`` if set, else ``bench/results``."""
    return Path(os.environ.get("VEOFAST_BENCH_RESULTS", RESULTS_DIR))
