"""Dynamic-batching packer: speed of the C++ and Python best-fit-decreasing packers, and packing efficiency.

Lengths are log-normal (median 600 tokens, sigma 1.0), clipped to [1, 8192]; the budget is 8192 tokens (a few
speed cases use other budgets, with the median scaled in proportion).

- speed: sequences packed per second by one call over n sequences (n = the buffer sizes 200 and 2000, and a
  large 100k; n = 200 also at budgets 2048, 32768 and 131072), C++ (``veofast._C``) vs the pure-Python
  fallback, on one core. Both are called the way the dynamic batcher calls them: ``pack_sequences(int64 array,
  int budget, backend=...)``, results as returned (``indices``, ``offsets`` arrays). ``cpp_fixed_us`` is the
  cost of a C++ call over one sequence: the part of a call that does not scale with n (the wrapper, the
  arguments, the two result arrays, the radix counters), which bounds the speed-up at small n.
- efficiency: a stream of sequences through ``DynamicBatcher`` with buffers of 200 and 2000: real tokens /
  (budget * micro-batches), beside the lower bound ``ceil(sum(len) / budget)`` micro-batches and a sequential
  next-fit baseline.

Run: ``python bench/packer.py [--sequences 20000]``; results append to ``bench/results/packer.jsonl``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for ``bench`` when run as python bench/<suite>.py

from bench.common import print_table, record  # noqa: E402
from veofast.data.dynamic_batching import DynamicBatcher
from veofast.data.packing import cpp_available, pack_sequences

BUDGET = 8192


def lognormal_lengths(n: int, seed: int, budget: int = BUDGET) -> np.ndarray:
    """(n,) int64 log-normal lengths, median 600 * budget / 8192, sigma 1.0, clipped to [1, budget]."""
    rng = np.random.default_rng(seed)
    median = 600 * budget / BUDGET
    return np.clip(np.round(rng.lognormal(math.log(median), 1.0, n)), 1, budget).astype(np.int64)


def seconds_per_call(fn, *, min_seconds: float = 0.5, repeats: int = 5) -> float:
    """Median over ``repeats`` rounds of the mean time of ``fn()`` in a round of at least ``min_seconds``."""
    fn()
    rounds = []
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds / repeats:
                break
        rounds.append(elapsed / calls)
    return float(np.median(rounds))


SPEED_CASES = [(200, BUDGET), (2000, BUDGET), (100_000, BUDGET), (200, 2048), (200, 32768), (200, 131072)]


def bench_speed() -> list[dict]:
    """C++ vs Python over ``SPEED_CASES`` (n sequences, budget): the buffer sizes at our budget, a large n, and
    the default buffer at other budgets (the C++ sort takes more radix passes, and its bitset of low rooms more
    words, as the budget grows)."""
    rows = []
    fixed_us = None
    if cpp_available():
        one = np.ones(1, dtype=np.int64)
        fixed_us = 1e6 * seconds_per_call(lambda: pack_sequences(one, BUDGET, backend="cpp"))
    for n, budget in SPEED_CASES:
        lengths = lognormal_lengths(n, seed=n, budget=budget)
        row = {"bench": "speed", "n": n, "budget": budget}
        py_s = seconds_per_call(
            lambda lengths=lengths, budget=budget: pack_sequences(lengths, budget, backend="python")
        )
        row["python_seq_per_s"] = n / py_s
        if cpp_available():
            cpp_s = seconds_per_call(
                lambda lengths=lengths, budget=budget: pack_sequences(lengths, budget, backend="cpp")
            )
            row["cpp_seq_per_s"] = n / cpp_s
            row["speedup"] = py_s / cpp_s
            row["cpp_us_per_call"] = 1e6 * cpp_s
            row["cpp_fixed_us"] = fixed_us
        row["python_us_per_call"] = 1e6 * py_s
        rows.append(record("packer", row))
    return rows


def next_fit_bins(lengths: np.ndarray) -> int:
    bins, room = 0, 0
    for length in lengths.tolist():
        if length > room:
            bins, room = bins + 1, BUDGET
        room -= length
    return bins


def bench_efficiency(sequences: int) -> list[dict]:
    rows = []
    lengths = lognormal_lengths(sequences + 10 * 2000, seed=0)  # the tail keeps the last buffers full
    for buffer_size in (200, 2000):
        stream = iter([{"input_ids": np.zeros(n, np.int64), "labels": np.zeros(n, np.int64)} for n in lengths])
        batcher = DynamicBatcher(stream, budget_at=lambda _: BUDGET, max_tokens=BUDGET, buffer_size=buffer_size)
        taken, micro_batches, tokens = 0, 0, 0
        start = time.perf_counter()
        while taken < sequences:
            samples = batcher.next_micro_batch()
            taken += len(samples)
            micro_batches += 1
            tokens += sum(len(s["input_ids"]) for s in samples)
        elapsed = time.perf_counter() - start
        row = {
            "bench": "efficiency",
            "buffer_size": buffer_size,
            "sequences": taken,
            "tokens": tokens,
            "micro_batches": micro_batches,
            "lower_bound": math.ceil(tokens / BUDGET),
            "efficiency": tokens / (BUDGET * micro_batches),
            "next_fit_efficiency": lengths[:taken].sum() / (BUDGET * next_fit_bins(lengths[:taken])),
            "batcher_seq_per_s": taken / elapsed,
            "packer": "cpp" if cpp_available() else "python",
        }
        rows.append(record("packer", row))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sequences", type=int, default=20_000, help="sequences streamed per efficiency run")
    parser.add_argument("--quick", action="store_true", help="5,000 sequences per efficiency run")
    args = parser.parse_args()
    if args.quick:
        args.sequences = 5_000
    speed = bench_speed()
    print("packer speed (sequences/s, one call over n sequences, one core)")
    columns = ["n", "budget", "cpp_seq_per_s", "python_seq_per_s", "speedup", "cpp_us_per_call", "python_us_per_call"]
    print_table(speed, columns)
    if cpp_available():
        print(f"fixed cost of a C++ call (n=1, through pack_sequences): {speed[0]['cpp_fixed_us']:.2f} us")
    print()
    efficiency = bench_efficiency(args.sequences)
    print(f"packing efficiency, log-normal lengths (median 600, max {BUDGET}), budget {BUDGET}")
    print_table(
        efficiency,
        ["buffer_size", "sequences", "micro_batches", "lower_bound", "efficiency", "next_fit_efficiency", "packer"],
    )


if __name__ == "__main__":
    main()
