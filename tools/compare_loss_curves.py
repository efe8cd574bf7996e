"""Compare the loss curves of two training runs (``metrics.jsonl`` files) and record the result.

    python tools/compare_loss_curves.py RUN_A/metrics.jsonl RUN_B/metrics.jsonl --label "triton vs torch"

Prints the largest and the mean absolute difference of the per-step losses and of the final 20-step average,
and appends one JSON line to ``bench/results/loss_curves.jsonl`` (or ``$VEOFAST_BENCH_RESULTS``).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import record  # noqa: E402


def losses(path: str) -> dict[int, float]:
    out = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            out[row["step"]] = row["loss"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    a, b = losses(args.a), losses(args.b)
    steps = sorted(set(a) & set(b))
    if not steps:
        raise SystemExit("the two runs share no step")
    diffs = [abs(a[s] - b[s]) for s in steps]
    tail = steps[-20:]
    row = {
        "label": args.label, "steps": len(steps), "max_abs_diff": max(diffs), "mean_abs_diff": sum(diffs) / len(diffs),
        "first_loss": [a[steps[0]], b[steps[0]]], "final_avg_loss": [sum(a[s] for s in tail) / len(tail),
                                                                      sum(b[s] for s in tail) / len(tail)],
    }
    record("loss_curves", row)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
